// float -> bfloat16 stores through AVX512_BF16's vcvtneps2bf16, for the kernels' bf16 outputs
// (store_run, loops.h). Built in the AVX2 variant only (setup.py compiles every kernel file twice;
// the baseline build of this file is empty), and picked at run time by bf16_store() (isa.cpp)
// where the CPU has AVX512_BF16/F/BW/VL/DQ.
//
// Rounding: bit for bit c10::BFloat16(float) (round to nearest even). vcvtneps2bf16 rounds the
// same way but reads denormal inputs as zero and keeps a NaN's payload, where c10 rounds the
// denormal and returns one quiet NaN (0x7FC0): a vector holding either (vfpclassps finds them, at
// the cost of one instruction per 16 values) is converted by c10 instead.
// Why: GCC vectorizes c10's integer rounding at about 9 vector instructions per 8 values, which
// made the bf16 pointwise kernels ALU-bound at half the speed of their fp32 twins.
#include "isa.h"

#if defined(DABNET_CPU_VARIANT) && defined(DABNET_WITH_BF16_STORE)
#include <immintrin.h>

#include <c10/util/BFloat16.h>

#include <cstdint>

namespace dabnet {
namespace cpu {
inline namespace DABNET_CPU_ISA {

namespace {
constexpr int kQNaN = 0x01, kDenormal = 0x20, kSNaN = 0x80;  // vfpclassps categories
}

__attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16"))) void
bf16_store_avx512(const float* src, c10::BFloat16* dst, int64_t n) {
  constexpr int kSpecial = kQNaN | kDenormal | kSNaN;
  int64_t i = 0;
  // 32 values a step, unmasked: one special-value test for both halves, one vcvtne2ps2bf16, one
  // 64-byte store. The masked 16-value loop below, run over everything, had cost as much as the
  // arithmetic of the kernels it stores for (0.074 against 0.033 ns a value, Zen 4, hot in L1).
  for (; i + 32 <= n; i += 32) {
    const __m512 lo = _mm512_loadu_ps(src + i), hi = _mm512_loadu_ps(src + i + 16);
    if ((_mm512_fpclass_ps_mask(lo, kSpecial) | _mm512_fpclass_ps_mask(hi, kSpecial)) != 0) {
      for (int64_t j = i; j < i + 32; ++j) dst[j] = c10::BFloat16(src[j]);
      continue;
    }
    _mm512_storeu_si512(dst + i, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo)));
  }
  for (; i < n; i += 16) {  // the last 0-31 values, 16 at a time, masked
    const int64_t m = n - i < 16 ? n - i : 16;
    const __mmask16 lanes = __mmask16((1u << m) - 1u);
    const __m512 v = _mm512_maskz_loadu_ps(lanes, src + i);
    if (_mm512_mask_fpclass_ps_mask(lanes, v, kSpecial) != 0) {
      for (int64_t j = i; j < i + m; ++j) dst[j] = c10::BFloat16(src[j]);
      continue;
    }
    _mm256_mask_storeu_epi16(dst + i, lanes, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
  }
}

}  // namespace DABNET_CPU_ISA
}  // namespace cpu
}  // namespace dabnet
#endif
