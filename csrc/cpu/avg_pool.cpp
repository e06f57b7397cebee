// DABNet's input-injection pool on CPU: F.avg_pool2d(x, 3, stride=2, padding=1), the zero padding
// counted (every window is divided by 9), floor((H - 1) / 2) + 1 outputs per side. The image has
// 3 channels, and kernels that vectorize over channels (ATen's channels_last avg_pool2d, oneDNN's
// depthwise conv that stood in for it) fill 3 lanes of 8. Here an output row is flat passes over
// whole rows, vectorized over pixels x channels alike: the three source rows summed, then each
// pixel with its two neighbours and divided by 9; the outputs are every other pixel of that.
#include <torch/library.h>

#include <type_traits>

#include "../checks.h"
#include "alloc.h"
#include "isa.h"
#include "loops.h"

namespace dabnet {
namespace cpu {
inline namespace DABNET_CPU_ISA {  // see isa.h

namespace {

// planes images of H x W pixels of P values each (NCHW: N*C planes of P = 1; channels_last: N
// planes of P = C) into planes x Ho x Wo x P.
template <typename T>
void pool_rows(const T* x, T* out, int64_t planes, int64_t H, int64_t W, int64_t P, int64_t Ho,
               int64_t Wo) {
  using acc_t = at::opmath_type<T>;
  const int64_t rw = W * P;
  at::parallel_for(0, planes * Ho, 1, [&](int64_t begin, int64_t end) {
    // v: column sums with a zero pixel each side (the padding); h: v's 3-pixel sums over 9 (the
    // general path only); o: an output row in acc_t, for a narrower T (else the output itself).
    constexpr bool kDirect = std::is_same_v<T, acc_t>;
    std::vector<acc_t> v((W + 2) * P, acc_t(0)), h(P == 3 ? 0 : rw), o(kDirect ? 0 : Wo * P);
    acc_t* vs = v.data() + P;
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / Ho, y = 2 * (r % Ho);  // the window's middle row (always inside)
      const T* __restrict__ r1 = x + (n * H + y) * rw;
      const T* __restrict__ r0 = y > 0 ? r1 - rw : nullptr;
      const T* __restrict__ r2 = y + 1 < H ? r1 + rw : nullptr;
      if (r0 && r2)
        for (int64_t j = 0; j < rw; ++j) vs[j] = acc_t(r0[j]) + acc_t(r1[j]) + acc_t(r2[j]);
      else if (r0 || r2) {
        const T* __restrict__ q = r0 ? r0 : r2;
        for (int64_t j = 0; j < rw; ++j) vs[j] = acc_t(q[j]) + acc_t(r1[j]);
      } else {
        for (int64_t j = 0; j < rw; ++j) vs[j] = acc_t(r1[j]);
      }
      T* row_out = out + r * Wo * P;
      acc_t* __restrict__ dst = kDirect ? reinterpret_cast<acc_t*>(row_out) : o.data();
      if (P == 3) {  // the image: the pixel's 3 values as constants, so the loop is straight-line
        for (int64_t ox = 0; ox < Wo; ++ox)
          for (int64_t c = 0; c < 3; ++c) {
            const acc_t* q = vs + 6 * ox + c;
            dst[3 * ox + c] = (q[-3] + q[0] + q[3]) / acc_t(9);
          }
      } else {
        // Every pixel's window sum, though only every other one is kept: this loop vectorizes.
        for (int64_t j = 0; j < rw; ++j) h[j] = (vs[j - P] + vs[j] + vs[j + P]) / acc_t(9);
        for (int64_t ox = 0; ox < Wo; ++ox)
          for (int64_t c = 0; c < P; ++c) dst[ox * P + c] = h[2 * ox * P + c];
      }
      if constexpr (!kDirect) store_run(row_out, dst, Wo * P);
    }
  });
}

}  // namespace

at::Tensor avg_pool3x3s2(const at::Tensor& x_) {
  check_input(x_, "x");
  bool cl;
  const at::Tensor x = canonical(x_, cl);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(H > 0 && W > 0, "dabnet: avg_pool3x3s2 needs a non-empty image, got shape ",
              x.sizes());
  const int64_t Ho = (H - 1) / 2 + 1, Wo = (W - 1) / 2 + 1;
  at::Tensor out = empty_out({N, C, Ho, Wo}, x.options().memory_format(fmt(cl)));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "avg_pool3x3s2", [&] {
    pool_rows<scalar_t>(x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), cl ? N : N * C, H, W,
                        cl ? C : 1, Ho, Wo);
  });
  return out;
}

}  // namespace DABNET_CPU_ISA
}  // namespace cpu
}  // namespace dabnet

// Registered once, from the baseline build (isa.h).
#ifndef DABNET_CPU_VARIANT
DABNET_CPU_DECLARE(avg_pool3x3s2)

TORCH_LIBRARY_IMPL(dabnet, CPU, m) {
  m.impl("avg_pool3x3s2", DABNET_CPU_KERNEL(avg_pool3x3s2));
}
#endif
