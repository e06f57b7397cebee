// The CUDA emulation's runtime: launches, one fiber per CUDA thread, barriers, warp operations,
// shared memory, and the dabnet_cuemu op registrations. Blocks run one after another; in a block
// a thread runs until it waits (at __syncthreads, a warp operation) or exits, then the next ready
// thread runs, in forward, reverse or random order (set_schedule / $CUEMU_ORDER). Every error
// (a bad launch, threads waiting at different barriers, a deadlock, an exited lane in a shuffle
// mask, a write past a shared array) becomes a c10::Error, a RuntimeError in Python.
#include <ATen/core/Tensor.h>
#include <c10/core/CPUAllocator.h>
#include <sys/mman.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "cuemu.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define CUEMU_ASAN 1
#else
#define CUEMU_ASAN 0
#endif

dim3 threadIdx, blockIdx, blockDim, gridDim;

// Context switch (x86-64 System V): saves the callee-saved registers, MXCSR and the x87 control
// word on the current stack, stores the stack pointer in *from, and resumes the stack `to`.
extern "C" void cuemu_switch(void** from, void* to);
asm(R"(
  .text
  .globl cuemu_switch
  .type cuemu_switch, @function
cuemu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cuemu_switch, .-cuemu_switch
  .section .note.GNU-stack,"",@progbits
  .text
)");

namespace cuemu {
namespace {

constexpr size_t kStack = CUEMU_ASAN ? 512 << 10 : 128 << 10;  // per thread, guard page below
constexpr size_t kCanary = 16 << 10;  // NaN bytes after each shared array; must stay intact
constexpr size_t kArena = 1 << 20;    // shared memory + canaries of one block
constexpr uint8_t kPoison = 0xFF;     // NaN in float64/32/16 and bfloat16

enum class St : uint8_t { Ready, Barrier, Warp, Done };
const char* const kWarpName[] = {"__shfl_sync", "__shfl_up_sync", "__shfl_down_sync",
                                 "__shfl_xor_sync", "__syncwarp"};

struct Thread {
  void* sp = nullptr;
  dim3 tid;
  St st = St::Ready;
  const char* file = nullptr;  // where it waits
  int line = 0;
  WarpOp op = kSyncWarp;
  unsigned mask = 0;
  int arg = 0, width = 32;
  uint64_t bits = 0;
#if CUEMU_ASAN
  void* fake_stack = nullptr;
#endif
};

struct SharedArray {
  size_t offset, bytes;
};

struct Config {
  std::string order = "forward";  // forward | reverse | random
  uint64_t seed = 0;
};

// Everything about the launch in progress (one at a time: launches hold `mutex`).
struct Launch {
  const char *file = nullptr;
  int line = 0;
  void (*body)(void*) = nullptr;
  void* ctx = nullptr;
  dim3 grid, block;
  int nthreads = 0;
  size_t dyn = 0, limit = 0, used = 0;  // shared bytes: dynamic, allowed in all, arena in use
  std::map<std::pair<const char*, int>, SharedArray> statics;
  size_t static_bytes = 0;
  std::vector<Thread> threads;
  std::vector<int> queue;  // ready threads, run from `head`
  size_t head = 0;
  int live = 0, current = -1;
  std::string error;
  std::mt19937_64 rng;
};

std::mutex mutex;
Config config;
Launch L;
void* sched_sp = nullptr;
char* stacks = nullptr;  // kMaxBlockThreads stacks
unsigned char* arena = nullptr;
std::map<const void*, int> optin;  // cudaFuncAttributeMaxDynamicSharedMemorySize per kernel
std::string pending;               // launch error not yet collected by a launch check
std::map<std::string, int64_t> launches;  // "file:line" -> launches
// Record-only mode (bench/sass.py): launches are checked and logged, never run.
bool record_only = false;
std::vector<std::string> launch_log_;  // "file:line|gx,gy,gz|bx,by,bz|smem|what" per launch
#if CUEMU_ASAN
void* sched_fake = nullptr;
const void* main_bottom = nullptr;
size_t main_size = 0;
#endif

std::string where(const char* file, int line) {
  std::string f = file ? file : "?";
  size_t slash = f.rfind("/csrc/");
  if (slash == std::string::npos) slash = f.rfind("/tests/");
  return (slash == std::string::npos ? f : f.substr(slash + 1)) + ":" + std::to_string(line);
}

std::string hex(unsigned v) {
  char b[16];
  std::snprintf(b, sizeof b, "0x%08x", v);
  return b;
}

std::string coords(const dim3& d) {
  return "(" + std::to_string(d.x) + "," + std::to_string(d.y) + "," + std::to_string(d.z) + ")";
}

std::string block_desc() {
  return "kernel launched at " + where(L.file, L.line) + ", block " + coords(blockIdx);
}

// ------------------------------------------------------------------------------- fibers
void to_scheduler(bool exiting) {
  Thread& t = L.threads[L.current];
#if CUEMU_ASAN
  __sanitizer_start_switch_fiber(exiting ? nullptr : &t.fake_stack, main_bottom, main_size);
#else
  (void)exiting;
#endif
  cuemu_switch(&t.sp, sched_sp);
#if CUEMU_ASAN
  __sanitizer_finish_switch_fiber(t.fake_stack, nullptr, nullptr);
#endif
}

// Called on a thread's stack: records the first error of the launch and never returns.
[[noreturn]] void fail(const std::string& msg) {
  if (L.error.empty()) L.error = msg;
  to_scheduler(true);
  std::abort();  // unreachable: a failed launch never resumes its threads
}

[[noreturn]] void thread_main() {
#if CUEMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &main_bottom, &main_size);
#endif
  try {
    L.body(L.ctx);
  } catch (const std::exception& e) {
    fail(block_desc() + ", thread " + coords(threadIdx) + ": exception: " + e.what());
  }
  L.threads[L.current].st = St::Done;
  --L.live;
  to_scheduler(true);
  std::abort();
}

// A fresh stack whose first switch "returns" into thread_main.
void* fresh_stack(int i) {
  char* base = stacks + size_t(i) * kStack;
#if CUEMU_ASAN
  __asan_unpoison_memory_region(base + 4096, kStack - 4096);  // frames of an abandoned thread
#endif
  auto* top = reinterpret_cast<uint64_t*>(base + kStack);
  top[-1] = 0;  // fake return address: thread_main starts with the ABI's stack alignment
  top[-2] = reinterpret_cast<uint64_t>(&thread_main);
  for (int r = 3; r <= 8; ++r) top[-r] = 0;  // rbp, rbx, r12-r15
  uint32_t fp[2];
  asm volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(fp[0]), "=m"(fp[1]));
  std::memcpy(&top[-9], fp, 8);
  return &top[-9];
}

void run_thread(int i) {
  L.current = i;
  threadIdx = L.threads[i].tid;
#if CUEMU_ASAN
  __sanitizer_start_switch_fiber(&sched_fake, stacks + size_t(i) * kStack, kStack);
#endif
  cuemu_switch(&sched_sp, L.threads[i].sp);
#if CUEMU_ASAN
  __sanitizer_finish_switch_fiber(sched_fake, nullptr, nullptr);
#endif
  L.current = -1;
}

// Appends threads to the ready queue in the schedule's order.
void make_ready(std::vector<int>& ids) {
  if (config.order == "reverse") std::reverse(ids.begin(), ids.end());
  if (config.order == "random") std::shuffle(ids.begin(), ids.end(), L.rng);
  for (int i : ids) {
    L.threads[i].st = St::Ready;
    L.queue.push_back(i);
  }
}

std::string thread_desc(int i) {
  const Thread& t = L.threads[i];
  std::string s = "thread " + coords(t.tid) + " at ";
  if (t.st == St::Barrier) return s + "__syncthreads (" + where(t.file, t.line) + ")";
  return s + kWarpName[t.op] + " (" + where(t.file, t.line) + ")";
}

// Every live thread waits: releases a barrier that they all wait at, or fails.
void all_waiting() {
  int first = -1;
  std::vector<int> ids;
  for (int i = 0; i < L.nthreads; ++i) {
    const Thread& t = L.threads[i];
    if (t.st == St::Done) continue;
    if (t.st == St::Warp) {
      std::string why = " waits for lanes of its mask that never arrive";
      for (int l = 0; l < 32; ++l) {
        const int o = i - i % 32 + l;
        if ((t.mask >> l & 1u) && (o >= L.nthreads || L.threads[o].st == St::Done))
          why = ", but lane " + std::to_string(l) + " of its mask " + hex(t.mask) + " has exited";
      }
      if (L.error.empty()) L.error = block_desc() + ": deadlock: " + thread_desc(i) + why;
      return;
    }
    if (first < 0) first = i;
    const Thread& f = L.threads[first];
    if (t.file != f.file || t.line != f.line) {
      if (L.error.empty())
        L.error = block_desc() + ": threads wait at different __syncthreads: " +
                  thread_desc(first) + ", " + thread_desc(i);
      return;
    }
    ids.push_back(i);
  }
  make_ready(ids);
}

// ------------------------------------------------------------------------- shared memory
void poison_canary(size_t at) {
  std::memset(arena + at, kPoison, kCanary);
#if CUEMU_ASAN
  ASAN_POISON_MEMORY_REGION(arena + at, kCanary);
#endif
}

// Offsets: dynamic shared memory at 0, its canary, then each static array and its canary.
void check_canaries() {
  struct Region {
    size_t end, bytes;
    std::string name;
  };
  std::vector<Region> regions = {{L.dyn, L.dyn, "dynamic shared memory"}};
  for (const auto& [site, a] : L.statics)
    regions.push_back({a.offset + a.bytes, a.bytes,
                       "__shared__ array of " + where(site.first, site.second)});
  static const std::vector<unsigned char> poison(kCanary, kPoison);
  for (const Region& r : regions) {
    const size_t at = (r.end + 255) / 256 * 256;
#if CUEMU_ASAN
    ASAN_UNPOISON_MEMORY_REGION(arena + at, kCanary);
#endif
    if (std::memcmp(arena + at, poison.data(), kCanary) == 0) continue;
    size_t k = 0;
    while (arena[at + k] == kPoison) ++k;
    if (L.error.empty())
      L.error = block_desc() + ": a thread wrote past the end of the " + r.name + " (" +
                std::to_string(r.bytes) + " bytes), " + std::to_string(at + k - r.end) +
                " bytes after it";
    return;
  }
}

void run_block(int64_t linear) {
  blockIdx = dim3(unsigned(linear % L.grid.x), unsigned(linear / L.grid.x % L.grid.y),
                  unsigned(linear / L.grid.x / L.grid.y));
#if CUEMU_ASAN
  ASAN_UNPOISON_MEMORY_REGION(arena, L.used);
#endif
  std::memset(arena, kPoison, L.used);
  poison_canary((L.dyn + 255) / 256 * 256);
  for (auto& [site, a] : L.statics) poison_canary((a.offset + a.bytes + 255) / 256 * 256);
  std::vector<int> ids(L.nthreads);
  for (int i = 0; i < L.nthreads; ++i) {
    Thread& t = L.threads[i];
    t = Thread();
    t.tid = dim3(unsigned(i % L.block.x), unsigned(i / L.block.x % L.block.y),
                 unsigned(i / L.block.x / L.block.y));
    t.sp = fresh_stack(i);
    ids[i] = i;
  }
  L.queue.clear();
  L.head = 0;
  L.live = L.nthreads;
  make_ready(ids);
  while (L.live > 0 && L.error.empty()) {
    if (L.head == L.queue.size()) {
      L.queue.clear();
      L.head = 0;
      all_waiting();
      continue;
    }
    run_thread(L.queue[L.head++]);
  }
  if (L.error.empty()) check_canaries();
}

std::string check_config(dim3 grid, dim3 block, size_t smem, const void* key) {
  std::ostringstream e;
  const int64_t threads = int64_t(block.x) * block.y * block.z;
  if (grid.x < 1 || grid.y < 1 || grid.z < 1 || grid.x > kMaxGridX || grid.y > kMaxGridYZ ||
      grid.z > kMaxGridYZ)
    e << "grid " << coords(grid) << " outside sm_90's limits (x in 1..2^31-1, y and z in "
      << "1..65535)";
  else if (block.x < 1 || block.y < 1 || block.z < 1 || block.x > 1024 || block.y > 1024 ||
           block.z > kMaxBlockZ || threads > kMaxBlockThreads)
    e << "block " << coords(block) << " outside sm_90's limits (x, y <= 1024, z <= 64, at most "
      << "1024 threads)";
  else if (smem > size_t(kOptinShared))
    e << smem << " bytes of dynamic shared memory: sm_90 allows at most " << kOptinShared;
  else if (smem > size_t(kDefaultShared)) {
    const auto it = key ? optin.find(key) : optin.end();
    if (it == optin.end() || size_t(it->second) < smem)
      e << smem << " bytes of dynamic shared memory, above the default 48 KiB, without a "
        << "cudaFuncSetAttribute(cudaFuncAttributeMaxDynamicSharedMemorySize) opt-in of as many "
        << "bytes for this kernel" << (key ? "" : " (the emulation checks the opt-in only for "
                                                 "kernels launched through a function pointer)");
  }
  return e.str();
}

// ---------------------------------------------------------------------- allocator, ops
// The CPU allocator while an emulated op runs: every new block filled with 0xFF bytes, so an
// output element that no kernel writes is NaN.
struct PoisonAllocator final : c10::Allocator {
  c10::Allocator* base = nullptr;
  c10::DataPtr allocate(size_t n) override {
    c10::DataPtr p = base->allocate(n);
    if (n) std::memset(p.get(), kPoison, n);
    return p;
  }
  c10::DeleterFnPtr raw_deleter() const override { return base->raw_deleter(); }
  void copy_data(void* dest, const void* src, size_t n) const override {
    base->copy_data(dest, src, n);
  }
};
PoisonAllocator poison_alloc;
int op_depth = 0;

struct OpScope {
  OpScope() {
    if (op_depth++ > 0) return;
    pending.clear();
    poison_alloc.base = c10::GetCPUAllocator();
    c10::SetCPUAllocator(&poison_alloc, /*priority=*/0);
    TORCH_CHECK(c10::GetCPUAllocator() == &poison_alloc,
                "cuemu: could not install the NaN-poisoning CPU allocator (another allocator "
                "has a higher priority)");
  }
  ~OpScope() {
    if (--op_depth > 0) return;
    c10::SetCPUAllocator(poison_alloc.base, 0);
  }
};

struct ScopedKernel final : c10::OperatorKernel {
  c10::KernelFunction fn;
  explicit ScopedKernel(c10::KernelFunction f) : fn(std::move(f)) {}
  void operator()(const c10::OperatorHandle& op, c10::DispatchKeySet ks, torch::jit::Stack* s) {
    OpScope scope;
    fn.callBoxed(op, ks, s);
    TORCH_CHECK(pending.empty(), "cuemu: a kernel launch failed and no launch check caught it: ",
                pending);
  }
};

void set_schedule(std::string order, int64_t seed) {
  TORCH_CHECK(order == "forward" || order == "reverse" || order == "random",
              "cuemu: schedule order must be forward, reverse or random, got '", order, "'");
  std::lock_guard<std::mutex> g(mutex);
  config.order = order;
  config.seed = uint64_t(seed);
}

std::vector<std::string> launch_counts(bool reset) {
  std::lock_guard<std::mutex> g(mutex);
  std::vector<std::string> out;
  for (const auto& [site, n] : launches) out.push_back(site + " " + std::to_string(n));
  if (reset) launches.clear();
  return out;
}

void set_record_only(bool on) {
  std::lock_guard<std::mutex> g(mutex);
  record_only = on;
}

std::vector<std::string> launch_log(bool reset) {
  std::lock_guard<std::mutex> g(mutex);
  std::vector<std::string> out = launch_log_;
  if (reset) launch_log_.clear();
  return out;
}

struct Init {
  Init() {
    if (const char* o = std::getenv("CUEMU_ORDER")) config.order = o;
    if (const char* s = std::getenv("CUEMU_SEED")) config.seed = std::strtoull(s, nullptr, 10);
    void* m = mmap(nullptr, kStack * kMaxBlockThreads, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    TORCH_CHECK(m != MAP_FAILED, "cuemu: cannot map thread stacks");
    stacks = static_cast<char*>(m);
    for (int i = 0; i < kMaxBlockThreads; ++i)  // a stack overflow faults instead of corrupting
      mprotect(stacks + size_t(i) * kStack, 4096, PROT_NONE);
    arena = static_cast<unsigned char*>(std::aligned_alloc(256, kArena));
  }
} init;

}  // namespace

// --------------------------------------------------------------------------- device API
void syncthreads(const char* file, int line) {
  Thread& t = L.threads[L.current];
  t.st = St::Barrier;
  t.file = file;
  t.line = line;
  to_scheduler(false);
}

uint64_t warp_op(const char* file, int line, WarpOp op, unsigned mask, uint64_t bits, int arg,
                 int width) {
  const int me = L.current, lane = me % 32, warp0 = me - lane;
  auto at = [&] {  // built only for an error message
    return block_desc() + ", thread " + coords(threadIdx) + " at " + kWarpName[op] + " (" +
           where(file, line) + ")";
  };
  if (!(mask >> lane & 1u))
    fail(at() + ": its mask " + hex(mask) + " does not name its own lane " + std::to_string(lane));
  if (width < 1 || width > 32 || (width & (width - 1)))
    fail(at() + ": width " + std::to_string(width) + " is not a power of 2 up to 32");
  Thread& t = L.threads[me];
  t.st = St::Warp;
  t.file = file;
  t.line = line;
  t.op = op;
  t.mask = mask;
  t.arg = arg;
  t.width = width;
  t.bits = bits;
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    if (warp0 + l >= L.nthreads || L.threads[warp0 + l].st == St::Done)
      fail(at() + ": lane " + std::to_string(l) + " of its mask " + hex(mask) +
           " has exited");
    const Thread& o = L.threads[warp0 + l];
    if (o.st != St::Warp) {  // not there yet: wait for it
      to_scheduler(false);
      return L.threads[me].bits;
    }
    if (o.file != file || o.line != line || o.mask != mask || o.op != op)
      fail(at() + ": lane " + std::to_string(l) + " of its mask waits at " + kWarpName[o.op] +
           " (" + where(o.file, o.line) + ") with mask " + hex(o.mask));
  }
  // The last lane of the mask has arrived: exchange, then release the others.
  uint64_t in[32];
  for (int l = 0; l < 32; ++l) in[l] = (mask >> l & 1u) ? L.threads[warp0 + l].bits : 0;
  std::vector<int> others;
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    const Thread& o = L.threads[warp0 + l];
    const int base = l / width * width;
    int src = l;
    if (op == kShflIdx) src = base + ((o.arg % width) + width) % width;
    if (op == kShflUp) src = l - o.arg >= base ? l - o.arg : l;
    if (op == kShflDown) src = l + o.arg < base + width ? l + o.arg : l;
    if (op == kShflXor) src = (l ^ o.arg) < base + width ? l ^ o.arg : l;
    // A source lane outside the mask gives an undefined value: all-ones bits (NaN).
    L.threads[warp0 + l].bits = (mask >> src & 1u) ? in[src] : ~uint64_t(0);
    if (l != lane) others.push_back(warp0 + l);
  }
  make_ready(others);
  t.st = St::Ready;
  return t.bits;
}

void* static_shared(const char* file, int line, size_t bytes, size_t align) {
  auto it = L.statics.find({file, line});
  if (it == L.statics.end()) {
    const size_t at = (L.used + std::max<size_t>(align, 256) - 1) / 256 * 256;
    L.static_bytes += bytes;
    const std::string site = where(file, line);
    if (L.static_bytes > size_t(kDefaultShared))
      fail(block_desc() + ": static __shared__ arrays (" + std::to_string(L.static_bytes) +
           " bytes at " + site + ") exceed sm_90's 48 KiB");
    if (L.static_bytes + L.dyn > L.limit)
      fail(block_desc() + ": static (" + std::to_string(L.static_bytes) + " bytes) plus dynamic (" +
           std::to_string(L.dyn) + " bytes) shared memory exceed the " +
           std::to_string(L.limit) + " bytes this kernel may use");
    const size_t canary = (at + bytes + 255) / 256 * 256;
    TORCH_CHECK(canary + kCanary <= kArena, "cuemu: shared arena too small");
    std::memset(arena + at, kPoison, bytes);
    poison_canary(canary);
    L.used = canary + kCanary;
    it = L.statics.emplace(std::make_pair(file, line), SharedArray{at, bytes}).first;
  }
  return arena + it->second.offset;
}

void* dynamic_shared() { return arena; }

// ----------------------------------------------------------------------------- host API
void launch_impl(const char* file, int line, const void* key, void (*body)(void*), void* ctx,
                 dim3 grid, dim3 block, size_t smem, const char* what) {
  std::lock_guard<std::mutex> g(mutex);
  TORCH_CHECK(L.current < 0 && L.body == nullptr, "cuemu: a kernel launched another kernel");
  const std::string bad = check_config(grid, block, smem, key);
  if (!bad.empty()) {  // as on a GPU: the launch does nothing; the launch check reports it
    if (pending.empty()) pending = "launch at " + where(file, line) + ": " + bad;
    return;
  }
  const int64_t blocks = int64_t(grid.x) * grid.y * grid.z;
  TORCH_CHECK(blocks <= (int64_t(1) << 26), "cuemu: grid of ", blocks,
              " blocks is too large to emulate");
  ++launches[where(file, line)];
  if (record_only) {  // the launch's shape, for the static model of bench/sass.py; no execution
    std::ostringstream rec;
    rec << where(file, line) << "|" << grid.x << "," << grid.y << "," << grid.z << "|" << block.x
        << "," << block.y << "," << block.z << "|" << smem << "|" << (what ? what : "");
    launch_log_.push_back(rec.str());
    return;
  }
  L = Launch();
  L.file = file;
  L.line = line;
  L.body = body;
  L.ctx = ctx;
  L.grid = grid;
  L.block = block;
  L.nthreads = int(block.x * block.y * block.z);
  L.threads.resize(L.nthreads);
  L.dyn = smem;
  const auto it = key ? optin.find(key) : optin.end();
  L.limit = std::max<size_t>(kDefaultShared, it == optin.end() ? 0 : size_t(it->second));
  L.used = (smem + 255) / 256 * 256 + kCanary;
  L.rng.seed(config.seed * 0x9E3779B97F4A7C15ull + launches[where(file, line)]);
  gridDim = grid;
  blockDim = block;
  std::vector<int64_t> order(blocks);
  for (int64_t b = 0; b < blocks; ++b) order[b] = b;
  if (config.order == "reverse") std::reverse(order.begin(), order.end());
  if (config.order == "random") std::shuffle(order.begin(), order.end(), L.rng);
  for (int64_t b : order) {
    run_block(b);
    if (!L.error.empty()) break;
  }
  const std::string err = L.error;
  L = Launch();
  TORCH_CHECK(err.empty(), "cuemu: ", err);
}

cudaError_t func_set_attribute(const void* key, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || value > kOptinShared)
    return cudaErrorInvalidValue;
  std::lock_guard<std::mutex> g(mutex);
  optin[key] = value;
  return cudaSuccess;
}

const char* error_string(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
  }
  return "unknown error";
}

void check_error(cudaError_t e, const char* expr, const char* file, int line) {
  TORCH_CHECK(e == cudaSuccess, "cuemu: CUDA error: ", error_string(e), " (", expr, " at ",
              where(file, line), ")");
}

void check_launch(const char* file, int line) {
  if (pending.empty()) return;
  const std::string p = pending;
  pending.clear();
  TORCH_CHECK(false, "cuemu: CUDA error: invalid configuration argument (", p,
              "; reported by the launch check at ", where(file, line), ")");
}

void check_device(const c10::Device& d) {
  TORCH_CHECK(d.is_cpu(), "cuemu: the emulated GPU runs CPU tensors, got a tensor on ", d);
}

void Registrar::add(const char* name, c10::KernelFunction fn) {
  lib.impl(name, torch::CppFunction::makeFromBoxedFunctor(
                     std::make_unique<ScopedKernel>(std::move(fn))));
}

AutoRegister::AutoRegister(void (*init)(Registrar&), const char* file, int line) {
  static std::vector<std::unique_ptr<torch::Library>> libs;  // registrations live with the .so
  libs.push_back(std::make_unique<torch::Library>(torch::Library::IMPL, "dabnet_cuemu",
                                                  c10::DispatchKey::CPU, file, line));
  Registrar r{*libs.back()};
  init(r);
}

}  // namespace cuemu

TORCH_LIBRARY_FRAGMENT(dabnet_cuemu, m) {
  m.def("set_schedule(str order, int seed) -> ()", &cuemu::set_schedule);
  m.def("launch_counts(bool reset) -> str[]", &cuemu::launch_counts);
  m.def("set_record_only(bool on) -> ()", &cuemu::set_record_only);
  m.def("launch_log(bool reset) -> str[]", &cuemu::launch_log);
}
