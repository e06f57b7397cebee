// Large CPU outputs in transparent huge pages. glibc serves an allocation above its mmap threshold
// (32 MiB at most, see kMinBytes) with a fresh mmap every time, and each 4 KiB page of it faults
// on first write: on a 2-core VM that was ~1.7 us a page, 18 of the 21 ms that DABNet's final x8
// upsampling (19 classes at 512x1024: 38 MiB) took. Aligned to 2 MiB and advised MADV_HUGEPAGE,
// the block faults once per 2 MiB (the kernel's THP setting "madvise", common on servers, honours
// exactly this). PyTorch does the same for every allocation when THP_MEM_ALLOC_ENABLE=1 is set
// before it starts; a library cannot set that for its users, so our kernels' large outputs do it.
#include "alloc.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/Allocator.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <new>
#include <unordered_map>
#include <utility>

#if defined(__linux__)
#include <pthread.h>
#include <sys/mman.h>
#endif

namespace dabnet {
namespace cpu {

namespace {

constexpr size_t kHuge = size_t(2) << 20;  // the x86-64 / arm64 huge page
// glibc's largest mmap threshold (64-bit): a smaller block, once freed, moves the threshold above
// its size, and the next one comes from the heap, already faulted in. Huge pages from 8 MiB made
// the fused model at 512x1024 fault 1.7-4.7 thousand times a forward (plus ~50 huge pages) where
// from 32 MiB it faulted 21 times (plus the logits' 19 huge pages), no faster; and a 16 MB
// concatenation alone took 4.1-4.9 ms instead of 1.8-2.8 (a fault and 2 MiB zeroed per page).
constexpr size_t kMinBytes = size_t(32) << 20;

// Freed blocks are kept for the next allocation of the same size, up to cap() in all: the same
// outputs come back every forward, and a fresh block faults its pages in again (each a fault and
// the page zeroed: the 38 MiB logits of a 512x1024 forward, 19 huge-page faults, 2-4 ms; where
// the kernel grants no huge pages, 9,700 faults). The cap is what a repeat of the work so far
// needs: for each block size, the most blocks of it ever live at once, summed (at least
// kCacheBytes; at most four times the most ever live in all, so that a stream of ever new shapes
// cannot grow it without end). A fixed 256 MiB was less than one
// frozen fp32 forward at 1024x2048 cycles through (about 470 MB), and every forward faulted
// 12-43 thousand pages in afresh; a cap of the most ever live at once still dropped the 160 MB
// logits each forward: freed last, they were the oldest block when the next forward's freed
// blocks overflowed it (78 huge pages faulted, 11-28 ms a forward). dabnet_kernels.
// empty_cpu_cache() returns what is kept.
constexpr size_t kCacheBytes = size_t(256) << 20;

struct BlockCache {
  std::mutex mu;
  std::unordered_map<void*, size_t> live;         // block -> bytes, for the deleter
  std::deque<std::pair<void*, size_t>> free;      // oldest first
  size_t free_bytes = 0;
  size_t live_bytes = 0, peak_live = 0;  // blocks in use now, and at most so far
  struct Count { size_t now = 0, peak = 0; };
  std::unordered_map<size_t, Count> by_size;  // block size -> blocks of it live, now and at most
  size_t need = 0;  // sum over sizes of size x peak: what a repeat of the work so far needs

  size_t cap() const {  // mu held
    return std::max(kCacheBytes, std::min(need, 4 * peak_live));
  }
  void note_live(size_t bytes) {  // mu held
    live_bytes += bytes;
    peak_live = std::max(peak_live, live_bytes);
    Count& c = by_size[bytes];
    if (++c.now > c.peak) {
      c.peak = c.now;
      need += bytes;
    }
  }
  void note_dead(size_t bytes) {  // mu held
    live_bytes -= bytes;
    by_size[bytes].now -= 1;
  }

  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mu);
    for (auto it = free.begin(); it != free.end(); ++it) {
      if (it->second != bytes) continue;
      void* p = it->first;
      free_bytes -= bytes;
      free.erase(it);
      live.emplace(p, bytes);
      note_live(bytes);
      return p;
    }
    return nullptr;
  }
  void add_live(void* p, size_t bytes) {
    std::lock_guard<std::mutex> lock(mu);
    live.emplace(p, bytes);
    note_live(bytes);
  }
  void give_back(void* p) {
    std::lock_guard<std::mutex> lock(mu);
    auto it = live.find(p);
    const size_t bytes = it == live.end() ? 0 : it->second;  // every block is registered
    if (it != live.end()) {
      live.erase(it);
      note_dead(bytes);
    }
    if (bytes == 0 || bytes > cap()) {
      std::free(p);
      return;
    }
    free.emplace_back(p, bytes);
    free_bytes += bytes;
    while (free_bytes > cap()) trim_oldest();
  }
  size_t release() {
    std::lock_guard<std::mutex> lock(mu);
    const size_t n = free_bytes;
    while (!free.empty()) trim_oldest();
    // Asked to give memory back: the cap starts again from what is live now.
    peak_live = live_bytes;
    need = 0;
    for (auto it = by_size.begin(); it != by_size.end();) {
      if (it->second.now == 0) {
        it = by_size.erase(it);
        continue;
      }
      it->second.peak = it->second.now;
      need += it->first * it->second.now;
      ++it;
    }
    return n;
  }
  void trim_oldest() {  // mu held
    std::free(free.front().first);
    free_bytes -= free.front().second;
    free.pop_front();
  }
};

BlockCache& cache() {
  static auto* c = [] {
    auto* made = new BlockCache();  // never destroyed: tensors may outlive static destruction
#if defined(__linux__)
    // A fork while another thread held the lock (DataLoader workers) must not leave the child's
    // copy locked forever: the child starts with a fresh mutex.
    pthread_atfork(nullptr, nullptr, [] { new (&cache().mu) std::mutex(); });
#endif
    return made;
  }();
  return *c;
}

void free_block(void* p) { cache().give_back(p); }

// DABNET_CPU_HUGE_PAGES=0 in the environment turns this off (read once).
bool huge_pages_enabled() {
  static const bool on = [] {
    const char* v = std::getenv("DABNET_CPU_HUGE_PAGES");
    return !(v && std::strcmp(v, "0") == 0);
  }();
  return on;
}

struct HugePageAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    const size_t bytes = (n + kHuge - 1) / kHuge * kHuge;
    void* p = cache().take(bytes);
    if (p == nullptr) {
      TORCH_CHECK_WITH(OutOfMemoryError, posix_memalign(&p, kHuge, bytes) == 0,
                       "dabnet: could not allocate ", n, " bytes");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
      madvise(p, bytes, MADV_HUGEPAGE);  // advice only: where THP is off it changes nothing
#endif
      cache().add_live(p, bytes);
    }
    return {p, p, &free_block, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &free_block; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

}  // namespace

at::Tensor empty_out(at::IntArrayRef sizes, const at::TensorOptions& options) {
  size_t bytes = options.dtype().itemsize();
  for (const int64_t s : sizes) bytes *= size_t(s);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (bytes >= kMinBytes && huge_pages_enabled() && options.device().is_cpu() &&
      options.layout() == at::kStrided && !options.pinned_memory()) {
    static HugePageAllocator alloc;
    return at::detail::empty_generic(sizes, &alloc, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                     options.dtype().toScalarType(),
                                     options.memory_format_opt());
  }
#endif
  return at::empty(sizes, options);
}

int64_t release_cached_blocks() { return static_cast<int64_t>(cache().release()); }

}  // namespace cpu
}  // namespace dabnet
