// dwconv3 on CPU: forward, grad_input (the same kernel with the taps reversed) and grad_weight.
#include <torch/library.h>

#include "../checks.h"
#include "isa.h"
#include "kernels.h"
#include "loops.h"

namespace dabnet {
namespace cpu {
inline namespace DABNET_CPU_ISA {  // see isa.h

at::Tensor dwconv3(const at::Tensor& x_, const at::Tensor& weight, int64_t dilation) {
  check_input(x_);
  const int axis = check_dw_weight(weight, x_, dilation);
  bool cl;
  const at::Tensor x = canonical(x_, cl);
  at::Tensor out = empty_as(x, cl);
  if (x.numel() == 0) return out;
  const Geo g(x, cl);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dwconv3_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto prm = tap_params<acc_t>(weight, g.C);
    run_tap3<kEpiNone>(x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), g, axis, dilation,
                    prm.data());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> dwconv3_backward(const at::Tensor& grad_out,
                                                    const at::Tensor& x_, const at::Tensor& weight,
                                                    int64_t dilation, std::array<bool, 2> mask) {
  check_grad(grad_out, x_);
  const int axis = check_dw_weight(weight, x_, dilation);
  bool cl;
  const at::Tensor x = canonical(x_, cl);
  const at::Tensor g = grad_out.contiguous(fmt(cl));
  const Geo geo(x, cl);
  const int64_t C = geo.C;
  at::Tensor grad_x = mask[0] ? empty_as(x, cl) : at::Tensor();
  at::Tensor grad_w;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dwconv3_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const auto fprm = tap_params<acc_t>(weight, C, /*flip=*/true);
    // NCHW with grad_w: one pass over the planes computes both gradients (below). Otherwise:
    if (mask[0] && x.numel() > 0 && (cl || !mask[1])) {
      // d/dx of sum_k w_k x[i + (k-1)d] is the same stencil with w reversed.
      run_tap3<kEpiNone>(gp, grad_x.data_ptr<scalar_t>(), geo, axis, dilation, fprm.data());
    }
    if (mask[1]) {
      // grad_w[c][k] = sum over (n, h, w) of g * x shifted by (k-1)d: three dot products per run.
      std::vector<double> acc(3 * C, 0.0);
      if (x.numel() > 0 && !cl) {
        scalar_t* gxp = mask[0] ? grad_x.data_ptr<scalar_t>() : nullptr;
        at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
          std::vector<scalar_t> edge(2 * geo.W), zero(geo.W, scalar_t(0));
          for (int64_t c = begin; c < end; ++c)
            for (int64_t n = 0; n < geo.N; ++n) {
              // grad_x of this plane first: its grad_out is then still in cache for grad_w.
              if (gxp)
                tap3_plane<kEpiNone>(gp, gxp, geo, axis, dilation, n * C + c, fprm.data(),
                                     edge.data(), zero.data());
              plane_runs(xp, geo, axis, dilation, n * C + c, edge.data(), zero.data(),
                         [&](int64_t off, const scalar_t* a, const scalar_t* b, const scalar_t* cc,
                             int64_t len) {
                           acc_t s0 = 0, s1 = 0, s2 = 0;
                           const scalar_t* gr = gp + off;
                           // split the sums across SIMD lanes (_Pragma: inside a macro)
                           _Pragma("omp simd reduction(+ : s0, s1, s2)")
                           for (int64_t i = 0; i < len; ++i) {
                             s0 += acc_t(gr[i]) * acc_t(a[i]);
                             s1 += acc_t(gr[i]) * acc_t(b[i]);
                             s2 += acc_t(gr[i]) * acc_t(cc[i]);
                           }
                           acc[c] += s0;
                           acc[C + c] += s1;
                           acc[2 * C + c] += s2;
                         });
            }
        });
      } else if (x.numel() > 0) {
        // Rows are split into a fixed number of chunks, summed in order: deterministic.
        const int64_t R = geo.N * geo.H, nchunk = std::min<int64_t>(R, 64);
        std::vector<double> part(nchunk * 3 * C, 0.0);
        at::parallel_for(0, nchunk, 1, [&](int64_t begin, int64_t end) {
          std::vector<scalar_t> zero(C, scalar_t(0));
          std::vector<acc_t> s(3 * C);
          for (int64_t ch = begin; ch < end; ++ch) {
            double* P = part.data() + ch * 3 * C;
            for (int64_t r = ch * R / nchunk; r < (ch + 1) * R / nchunk; ++r) {
              std::fill(s.begin(), s.end(), acc_t(0));
              row_runs(xp, geo, axis, dilation, r, zero.data(),
                       [&](int64_t off, const scalar_t* a, const scalar_t* b, const scalar_t* cc,
                           int64_t len) {
                         const scalar_t* gr = gp + off;
                         for (int64_t i = 0; i < len; ++i) {
                           s[i] += acc_t(gr[i]) * acc_t(a[i]);
                           s[C + i] += acc_t(gr[i]) * acc_t(b[i]);
                           s[2 * C + i] += acc_t(gr[i]) * acc_t(cc[i]);
                         }
                       });
              for (int64_t i = 0; i < 3 * C; ++i) P[i] += s[i];
            }
          }
        });
        for (int64_t ch = 0; ch < nchunk; ++ch)
          for (int64_t i = 0; i < 3 * C; ++i) acc[i] += part[ch * 3 * C + i];
      }
      auto gw = at::empty({C, 3}, x.options().dtype(at::kDouble));
      double* q = gw.data_ptr<double>();
      for (int64_t c = 0; c < C; ++c)
        for (int k = 0; k < 3; ++k) q[c * 3 + k] = acc[k * C + c];
      grad_w = gw.to(weight.scalar_type()).reshape(weight.sizes()).contiguous();
    }
  });
  return {grad_x, grad_w};
}

}  // namespace DABNET_CPU_ISA
}  // namespace cpu
}  // namespace dabnet

// Registered once, from the baseline build (isa.h).
#ifndef DABNET_CPU_VARIANT
DABNET_CPU_DECLARE(dwconv3)
DABNET_CPU_DECLARE(dwconv3_backward)

TORCH_LIBRARY_IMPL(dabnet, CPU, m) {
  m.impl("dwconv3", DABNET_CPU_KERNEL(dwconv3));
  m.impl("dwconv3_backward", DABNET_CPU_KERNEL(dwconv3_backward));
}
#endif
