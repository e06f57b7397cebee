// CPU instruction sets. On x86-64 every kernel file in csrc/cpu is compiled twice: once for the
// baseline ISA (SSE2) into namespace dabnet::cpu::base, and once more, from a generated wrapper
// (setup.py, see prelude.h), for AVX2+FMA into dabnet::cpu::avx2. The registration, compiled only in
// the baseline build, picks one when the library loads. Distinct namespaces keep the two builds'
// inline functions and template instances from being merged by the linker.
#pragma once
#include <c10/util/BFloat16.h>

#include <cstdint>

#ifndef DABNET_CPU_ISA
#define DABNET_CPU_ISA base
#endif

namespace dabnet {
namespace cpu {

// True when the AVX2 kernels are built, the CPU has AVX2 and FMA, and DABNET_CPU_ISA is not
// "base" in the environment (which forces the baseline kernels, e.g. to test them).
bool use_avx2();

// dst[i] = c10::BFloat16(src[i]) for i < n, bit for bit, through AVX512_BF16 (bf16_store.cpp):
// that function where the AVX2 build runs on a CPU with AVX512_BF16/F/BW/VL/DQ, else null (and
// where DABNET_CPU_BF16=0 is in the environment, to compare the two).
using Bf16Store = void (*)(const float* src, c10::BFloat16* dst, int64_t n);
// GCC has the AVX512_BF16 intrinsics from version 10 on; older ones build without those stores.
#if defined(DABNET_WITH_AVX2) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 10 && \
    (defined(__x86_64__) || defined(__i386__))
#define DABNET_WITH_BF16_STORE 1
#endif
Bf16Store bf16_store();
// Turns those stores off (false) or back on for the whole process, for tests and A/B timings in
// one process; returns the previous setting.
bool set_bf16_store(bool on);

}  // namespace cpu
}  // namespace dabnet

// The kernel to register for function f of dabnet::cpu: the AVX2 build's when use_avx2().
#ifdef DABNET_WITH_AVX2
#define DABNET_CPU_KERNEL(f) \
  (::dabnet::cpu::use_avx2() ? &::dabnet::cpu::avx2::f : &::dabnet::cpu::base::f)
// Declares the AVX2 build's twin of base::f (same type; defined in the AVX2 translation unit).
#define DABNET_CPU_DECLARE(f)                   \
  namespace dabnet {                            \
  namespace cpu {                               \
  namespace avx2 {                              \
  decltype(::dabnet::cpu::base::f) f;           \
  }                                             \
  }                                             \
  }
#else
#define DABNET_CPU_KERNEL(f) (&::dabnet::cpu::base::f)
#define DABNET_CPU_DECLARE(f)
#endif
