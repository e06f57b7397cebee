// dwconv3 on CPU: forward, grad_input (the same kernel with the taps reversed) and grad_weight.
#include <torch/library.h>

#include "../checks.h"
#include "alloc.h"
#include "isa.h"
#include "kernels.h"
#include "loops.h"

namespace dabnet {
namespace cpu {
inline namespace DABNET_CPU_ISA {  // see isa.h

namespace {

// grad_w's three sums for one channel: s[k] = sum of g[i] * x[i + (k-1)d] over the channel's
// elements. Each sum is kept in kDotLanes partial sums, consecutive elements in consecutive lanes:
// the lane loop maps onto SIMD registers of any width and even a run's remainder (W - d is rarely a
// multiple of the vector width) is independent adds, not a chain of dependent scalar ones; the
// partial sums spill into double every ~kDotFlush elements. Fixed order: deterministic. (Per-run
// `omp simd` reductions were twice as slow along W: three runs per row, each with its remainder
// and horizontal sums.)
constexpr int kDotLanes = 16;
constexpr int64_t kDotFlush = 2048;

template <typename acc_t>
struct Dot3 {
  acc_t lane[3][kDotLanes] = {};
  double sum[3] = {0, 0, 0};
  int64_t pending = 0;  // elements in the lanes since the last spill

  // lane[k] += g[i] * x[i] for i in [0, n).
  template <typename T>
  void add(int k, const T* __restrict__ g, const T* __restrict__ x, int64_t n) {
    acc_t* __restrict__ s = lane[k];
    int64_t i = 0;
    for (; i + kDotLanes <= n; i += kDotLanes)
#pragma omp simd
      for (int l = 0; l < kDotLanes; ++l) s[l] += acc_t(g[i + l]) * acc_t(x[i + l]);
    for (int l = 0; i < n; ++i, ++l) s[l] += acc_t(g[i]) * acc_t(x[i]);
    if (k == 1 && (pending += n) >= kDotFlush) spill();
  }
  void spill() {
    for (int k = 0; k < 3; ++k)
      for (int l = 0; l < kDotLanes; ++l) {
        sum[k] += lane[k][l];
        lane[k][l] = acc_t(0);
      }
    pending = 0;
  }
  std::array<double, 3> total() {
    spill();
    return {sum[0], sum[1], sum[2]};
  }
};

// Adds one NCHW plane's grad_w sums to dot: g and x point at the plane. Tap k reads x shifted by
// (k-1)d, so its sum is one dot product of g and x offset against each other, over the range
// where the tap is inside the image (no gathered borders, no zeros).
template <typename T, typename acc_t>
void plane_wgrad(Dot3<acc_t>& dot, const T* g, const T* x, int64_t H, int64_t W, int axis,
                 int64_t d) {
  for (int64_t h = 0; h < H; ++h) {
    const T *gr = g + h * W, *xr = x + h * W;
    dot.add(1, gr, xr, W);
    if (axis == 0) {
      if (h - d >= 0) dot.add(0, gr, xr - d * W, W);
      if (h + d < H) dot.add(2, gr, xr + d * W, W);
    } else if (d < W) {
      dot.add(0, gr + d, xr, W - d);
      dot.add(2, gr, xr + d, W - d);
    }
  }
}

}  // namespace

at::Tensor dwconv3(const at::Tensor& x_, const at::Tensor& weight, int64_t dilation) {
  check_input(x_);
  const int axis = check_dw_weight(weight, x_, dilation);
  bool cl;
  const at::Tensor x = canonical(x_, cl);
  at::Tensor out = empty_out_as(x, cl);
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
  at::Tensor grad_x = mask[0] ? empty_out_as(x, cl) : at::Tensor();
  at::Tensor grad_w;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dwconv3_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const auto fprm = tap_params<acc_t>(weight, C, /*flip=*/true);
    // grad_x and grad_w in separate passes: one pass per plane computing both (grad_w while the
    // plane's grad_out was still in cache) was 20-35% slower at DABNet's shapes on a 2-core AMD
    // EPYC with 33 GB/s copy bandwidth (faster on a 13 GB/s one): short interleaved streams.
    if (mask[0] && x.numel() > 0) {
      // d/dx of sum_k w_k x[i + (k-1)d] is the same stencil with w reversed.
      run_tap3<kEpiNone>(gp, grad_x.data_ptr<scalar_t>(), geo, axis, dilation, fprm.data());
    }
    if (mask[1]) {
      // grad_w[c][k] = sum over (n, h, w) of g * x shifted by (k-1)d.
      std::vector<double> acc(3 * C, 0.0);
      if (x.numel() > 0 && !cl) {
        at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
          for (int64_t c = begin; c < end; ++c) {
            Dot3<acc_t> dot;
            for (int64_t n = 0; n < geo.N; ++n) {
              const int64_t off = (n * C + c) * geo.H * geo.W;
              plane_wgrad(dot, gp + off, xp + off, geo.H, geo.W, axis, dilation);
            }
            const auto tot = dot.total();
            for (int k = 0; k < 3; ++k) acc[k * C + c] = tot[k];
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
