// Which build of the CPU kernels runs (see isa.h). Compiled once, for the baseline ISA.
#include "isa.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

namespace dabnet {
namespace cpu {

bool use_avx2() {
#if defined(DABNET_WITH_AVX2) && defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  static const bool yes = [] {
    const char* force = std::getenv("DABNET_CPU_ISA");
    if (force && std::strcmp(force, "base") == 0) return false;
    __builtin_cpu_init();  // needed before __builtin_cpu_supports in a static initializer
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return yes;
#else
  return false;
#endif
}

#ifdef DABNET_WITH_BF16_STORE
namespace avx2 {
void bf16_store_avx512(const float* src, c10::BFloat16* dst, int64_t n);  // bf16_store.cpp
}
#endif

namespace {
std::atomic<bool> g_bf16_store_on{true};  // set_bf16_store
}

bool set_bf16_store(bool on) { return g_bf16_store_on.exchange(on); }

Bf16Store bf16_store() {
  static const Bf16Store f = []() -> Bf16Store {
#ifdef DABNET_WITH_BF16_STORE
    const char* off = std::getenv("DABNET_CPU_BF16");
    if (!use_avx2() || (off && std::strcmp(off, "0") == 0)) return nullptr;
    __builtin_cpu_init();
    const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                     __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                     __builtin_cpu_supports("avx512bf16");
    return has ? &avx2::bf16_store_avx512 : nullptr;
#else
    return nullptr;
#endif
  }();
  return g_bf16_store_on.load(std::memory_order_relaxed) ? f : nullptr;
}

std::string isa_name() {
  if (!use_avx2()) return "base";
  return bf16_store() ? "avx2+avx512bf16" : "avx2";  // as the kernels run now
}

}  // namespace cpu
}  // namespace dabnet
