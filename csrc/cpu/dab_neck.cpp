// Eval-mode DAB neck on CPU in one pass over memory. For each output row, the first convs of both
// branches (3x1 and dilated 3x1, BN folded in, PReLU) are computed into row buffers from the input
// rows they need (h±1, h±d; these stay in cache), then the 1x3 convs read those buffers, and the
// branch sum goes through the final BN-PReLU straight into the output.
#include <torch/library.h>

#include "../checks.h"
#include "loops.h"

namespace dabnet {
namespace cpu {

at::Tensor dab_neck(const at::Tensor& x_, const at::Tensor& weight, const at::Tensor& bias,
                    const at::Tensor& slope, const at::Tensor& out_scale,
                    const at::Tensor& out_shift, const at::Tensor& out_slope, int64_t d) {
  check_neck(x_, weight, bias, slope, out_scale, out_shift, out_slope, d);
  bool cl;
  const at::Tensor x = canonical(x_, cl);
  at::Tensor out = empty_as(x, cl);
  if (x.numel() == 0) return out;
  const Geo g(x, cl);
  const int64_t C = g.C, H = g.H, W = g.W, dd = std::min(d, W);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dab_neck_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // prm[k]: [w0 | w1 | w2 | bias | slope] of conv k (see tap3_run).
    auto wt = weight.detach().to(at::kDouble).contiguous();
    const auto bs = to_vec<acc_t>(bias.reshape({-1}), 4 * C), sl = to_vec<acc_t>(slope.reshape({-1}), 4 * C);
    std::vector<std::vector<acc_t>> prm(4);
    for (int k = 0; k < 4; ++k) {
      prm[k] = tap_params<acc_t>(wt[k], C);
      std::copy(bs.begin() + k * C, bs.begin() + (k + 1) * C, prm[k].begin() + 3 * C);
      std::copy(sl.begin() + k * C, sl.begin() + (k + 1) * C, prm[k].begin() + 4 * C);
    }
    const auto fs = to_vec<acc_t>(out_scale, C), ft = to_vec<acc_t>(out_shift, C),
               fa = to_vec<acc_t>(out_slope, C);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    auto final_run = [&](scalar_t* o, const acc_t* b1, const acc_t* b2, int64_t c0, bool vec, int64_t n) {
      for (int64_t i = 0; i < n; ++i) {
        const int64_t c = vec ? i : c0;
        const acc_t y = fs[c] * (b1[i] + b2[i]) + ft[c];
        o[i] = scalar_t(prelu(y, fa[c]));
      }
    };
    if (!cl) {
      at::parallel_for(0, g.N * C, 1, [&](int64_t begin, int64_t end) {
        // t1/t2: first-conv rows with zero padding of 1 and dd; the second convs read them shifted.
        std::vector<acc_t> t1(W + 2, 0), t2(W + 2 * dd, 0), b1(W), b2(W), zacc(W, 0);
        std::vector<scalar_t> zero(W, scalar_t(0));
        for (int64_t p = begin; p < end; ++p) {
          const int64_t c = p % C;
          const scalar_t* xp_ = xp + p * H * W;
          for (int64_t h = 0; h < H; ++h) {
            const scalar_t* r = xp_ + h * W;
            tap3_run<true, false>(t1.data() + 1, h >= 1 ? r - W : zero.data(), r,
                                  h + 1 < H ? r + W : zero.data(), prm[0].data() + c, C, W);
            tap3_run<true, false>(t2.data() + dd, h >= d ? r - d * W : zero.data(), r,
                                  h + d < H ? r + d * W : zero.data(), prm[2].data() + c, C, W);
            tap3_run<true, false>(b1.data(), t1.data(), t1.data() + 1, t1.data() + 2,
                                  prm[1].data() + c, C, W);
            if (d < W)
              tap3_run<true, false>(b2.data(), t2.data(), t2.data() + dd, t2.data() + 2 * dd,
                                    prm[3].data() + c, C, W);
            else
              tap3_run<true, false>(b2.data(), zacc.data(), t2.data() + dd, zacc.data(),
                                    prm[3].data() + c, C, W);
            final_run(op + p * H * W + h * W, b1.data(), b2.data(), c, false, W);
          }
        }
      });
    } else {
      at::parallel_for(0, g.N * H, 1, [&](int64_t begin, int64_t end) {
        std::vector<acc_t> t1(W * C), t2(W * C), b1(C), b2(C), zacc(C, 0);
        std::vector<scalar_t> zero(C, scalar_t(0));
        for (int64_t r = begin; r < end; ++r) {
          // First convs (along H) for every pixel of the row...
          row_runs(xp, g, 0, 1, r, zero.data(), [&](int64_t off, const scalar_t* a, const scalar_t* b,
                                                    const scalar_t* c, int64_t n) {
            tap3_run<true, true>(t1.data() + (off - r * W * C), a, b, c, prm[0].data(), C, n);
          });
          row_runs(xp, g, 0, d, r, zero.data(), [&](int64_t off, const scalar_t* a, const scalar_t* b,
                                                    const scalar_t* c, int64_t n) {
            tap3_run<true, true>(t2.data() + (off - r * W * C), a, b, c, prm[2].data(), C, n);
          });
          // ...then the second convs (along W) over those rows, and the final BN-PReLU.
          for (int64_t w = 0; w < W; ++w) {
            const acc_t* m1 = t1.data() + w * C;
            const acc_t* m2 = t2.data() + w * C;
            tap3_run<true, true>(b1.data(), w >= 1 ? m1 - C : zacc.data(), m1,
                                 w + 1 < W ? m1 + C : zacc.data(), prm[1].data(), C, C);
            tap3_run<true, true>(b2.data(), w >= d ? m2 - d * C : zacc.data(), m2,
                                 w + d < W ? m2 + d * C : zacc.data(), prm[3].data(), C, C);
            final_run(op + (r * W + w) * C, b1.data(), b2.data(), 0, true, C);
          }
        }
      });
    }
  });
  return out;
}

}  // namespace cpu
}  // namespace dabnet

TORCH_LIBRARY_IMPL(dabnet, CPU, m) { m.impl("dab_neck", &dabnet::cpu::dab_neck); }
