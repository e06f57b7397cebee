// cat_bn_prelu on CPU: eval-mode BN-PReLU of a channel concatenation, written straight into the
// output (DABNet's bn_prelu_1/2/3 follow concatenations): one read of each input, one write, and
// no concatenated intermediate.
#include <ATen/ops/cat.h>
#include <torch/library.h>

#include "../checks.h"
#include "alloc.h"
#include "isa.h"
#include "loops.h"

namespace dabnet {
namespace cpu {
inline namespace DABNET_CPU_ISA {  // see isa.h

namespace {

// o[j] = PReLU(x[j] * s + t) for j < n: VEC, the parameters of channel j (an NHWC pixel's run);
// otherwise one channel's scalars (an NCHW plane). Restrict pointers, so that GCC vectorizes it.
template <bool VEC, typename T, typename acc_t>
inline void bn_prelu_run(T* __restrict__ o, const T* __restrict__ x, const acc_t* __restrict__ s,
                         const acc_t* __restrict__ t, const acc_t* __restrict__ a, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const int64_t c = VEC ? j : 0;
    o[j] = T(prelu(acc_t(x[j]) * s[c] + t[c], a[c]));
  }
}

// The same for kNarrow or fewer channels (DABNet's 3-channel input injection) over n pixels: one
// loop over pixels with the channel parameters in registers. Called per pixel, such a run cost
// more than the wide input's whole run (per-run vector/scalar dispatch): 1x(32+3)x256x512 fp32
// channels_last 2.9 -> 1.9 ms.
constexpr int64_t kNarrow = 4;
template <typename T, typename acc_t>
void bn_prelu_narrow(T* __restrict__ o, int64_t o_stride, const T* __restrict__ x, int64_t Ci,
                     const acc_t* s, const acc_t* t, const acc_t* a, int64_t n) {
  acc_t S[kNarrow] = {}, Tt[kNarrow] = {}, A[kNarrow] = {};
  for (int64_t c = 0; c < Ci; ++c) S[c] = s[c], Tt[c] = t[c], A[c] = a[c];
  for (int64_t q = 0; q < n; ++q)
    for (int64_t c = 0; c < Ci; ++c)
      o[q * o_stride + c] = T(prelu(acc_t(x[q * Ci + c]) * S[c] + Tt[c], A[c]));
}

}  // namespace

at::Tensor cat_bn_prelu(at::TensorList xs, const at::Tensor& scale, const at::Tensor& shift,
                        const at::Tensor& slope) {
  TORCH_CHECK(!xs.empty(), "dabnet: cat_bn_prelu needs at least one input");
  int64_t Ct = 0;
  for (size_t i = 0; i < xs.size(); ++i) {
    check_input(xs[i], "xs[i]");
    check_like(xs[i], xs[0], "xs[i]");
    TORCH_CHECK(xs[i].size(0) == xs[0].size(0) && xs[i].size(2) == xs[0].size(2) &&
                    xs[i].size(3) == xs[0].size(3),
                "dabnet: cat_bn_prelu inputs must agree in N, H and W, got ", xs[0].sizes(),
                " and ", xs[i].sizes());
    Ct += xs[i].size(1);
  }
  bool cl;
  const at::Tensor x0 = canonical(xs[0], cl);
  const int64_t N = x0.size(0), H = x0.size(2), W = x0.size(3), HW = H * W;
  at::Tensor out = empty_out({N, Ct, H, W}, x0.options().memory_format(fmt(cl)));
  // Checks the parameter vectors against the concatenated channel count.
  const at::Tensor like = at::empty({1, Ct, 1, 1}, x0.options());
  check_vec(scale, like, "scale");
  check_vec(shift, like, "shift");
  check_vec(slope, like, "slope", /*allow_single=*/true);
  if (out.numel() == 0) return out;
  std::vector<at::Tensor> ins;
  for (const auto& x : xs) ins.push_back(x.contiguous(fmt(cl)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x0.scalar_type(), "cat_bn_prelu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto s = to_vec<acc_t>(scale, Ct), t = to_vec<acc_t>(shift, Ct), a = to_vec<acc_t>(slope, Ct);
    scalar_t* op = out.data_ptr<scalar_t>();
    // Channel offset, width and data of each input in the concatenation.
    std::vector<int64_t> off(ins.size() + 1, 0);
    std::vector<const scalar_t*> src(ins.size());
    for (size_t i = 0; i < ins.size(); ++i) {
      off[i + 1] = off[i] + ins[i].size(1);
      src[i] = ins[i].data_ptr<scalar_t>();
    }
    const acc_t *sp = s.data(), *tp = t.data(), *ap = a.data();
    if (!cl) {
      // Output plane p = n*Ct + c comes from input i's plane n*Ci + (c - off[i]).
      at::parallel_for(0, N * Ct, 1, [&](int64_t begin, int64_t end) {
        for (int64_t p = begin; p < end; ++p) {
          const int64_t n = p / Ct, c = p % Ct;
          const size_t i = std::upper_bound(off.begin(), off.end(), c) - off.begin() - 1;
          const int64_t Ci = off[i + 1] - off[i];
          bn_prelu_run<false>(op + p * HW, src[i] + (n * Ci + c - off[i]) * HW, sp + c, tp + c,
                              ap + c, HW);
        }
      });
    } else {
      // Pixel by pixel: each input's channels are one run of the output pixel's Ct; inputs of
      // few channels take a whole block of pixels at a time.
      at::parallel_for(0, N * HW, 64, [&](int64_t begin, int64_t end) {
        for (size_t i = 0; i < src.size(); ++i) {
          const int64_t o0 = off[i], Ci = off[i + 1] - o0;
          if (Ci <= kNarrow)
            bn_prelu_narrow(op + begin * Ct + o0, Ct, src[i] + begin * Ci, Ci, sp + o0, tp + o0,
                            ap + o0, end - begin);
        }
        for (int64_t q = begin; q < end; ++q)
          for (size_t i = 0; i < src.size(); ++i) {
            const int64_t o0 = off[i], Ci = off[i + 1] - o0;
            if (Ci > kNarrow)
              bn_prelu_run<true>(op + q * Ct + o0, src[i] + q * Ci, sp + o0, tp + o0, ap + o0, Ci);
          }
      });
    }
  });
  return out;
}

}  // namespace DABNET_CPU_ISA
}  // namespace cpu
}  // namespace dabnet

// Registered once, from the baseline build (isa.h).
#ifndef DABNET_CPU_VARIANT
DABNET_CPU_DECLARE(cat_bn_prelu)

TORCH_LIBRARY_IMPL(dabnet, CPU, m) {
  m.impl("cat_bn_prelu", DABNET_CPU_KERNEL(cat_bn_prelu));
}
#endif
