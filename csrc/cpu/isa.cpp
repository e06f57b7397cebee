// Which build of the CPU kernels runs (see isa.h). Compiled once, for the baseline ISA.
#include "isa.h"

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

std::string isa_name() { return use_avx2() ? "avx2" : "base"; }

}  // namespace cpu
}  // namespace dabnet
