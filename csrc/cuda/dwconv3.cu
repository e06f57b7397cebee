// dwconv3 on CUDA: forward, grad_input (the same stencil with the taps reversed) and grad_weight
// (a deterministic per-channel reduction). The tap kernel also serves the eval dwconv3_bn_prelu.
#include <torch/library.h>

#include "../checks.h"
#include "common.cuh"
#include "kernels.h"

namespace dabnet {
namespace cuda {

namespace {

// Input at (n, c, h, w) shifted by k*d along the axis (k = -1, 0, 1), zero past the border.
template <typename scalar_t>
struct Taps {
  const scalar_t* x;
  Geo g;
  int axis, d;
  template <typename T>
  __device__ __forceinline__ void load(const Cursor& cur, int64_t o, T v[3]) const {
    const int pos = axis == 0 ? cur.h : cur.w, lim = axis == 0 ? g.H : g.W;
    const int64_t step = (axis == 0 ? g.sH : g.sW) * d;
    v[0] = pos >= d ? T(x[o - step]) : T(0);
    v[1] = T(x[o]);
    v[2] = pos < lim - d ? T(x[o + step]) : T(0);
  }
};

// conv = k0*x[-d] + k1*x[0] + k2*x[+d] with k = the conv taps (reversed for grad_input). With an
// eval BN (fold): out = prelu(scalar_t(conv) * scale + shift, slope): the conv rounded to the
// output type, then normalized, exactly as the backward recomputes them (dwconv3, then
// bn_prelu's BnBackward), so that forward and backward pick the same PReLU branch even for a
// pre-activation within rounding of 0 (folding the BN scale into the taps did not).
template <typename scalar_t>
struct Tap3Op {
  using acc_t = at::opmath_type<scalar_t>;
  Taps<scalar_t> in;
  scalar_t* out;
  const scalar_t* w;  // (C, 3)
  bool flip, fold;
  BnParams<acc_t> bn;
  BnChannel<acc_t> ch;
  acc_t k[3];

  __device__ void setup(int c) {
    if (fold) ch = bn.channel(c);
#pragma unroll
    for (int j = 0; j < 3; ++j) k[j] = acc_t(w[int64_t(c) * 3 + (flip ? 2 - j : j)]);
  }
  __device__ void operator()(const Cursor& cur, int c) const {
    const int64_t o = in.g.offset(cur.n, c, cur.h, cur.w);
    acc_t v[3];
    in.load(cur, o, v);
    const scalar_t conv = scalar_t(k[0] * v[0] + k[1] * v[1] + k[2] * v[2]);
    out[o] = fold ? scalar_t(prelu(acc_t(conv) * ch.scale + ch.shift, ch.slope)) : conv;
  }
};

// grad_w[c][k] = sum over positions of grad_out * x shifted by (k-1)d.
template <typename scalar_t>
struct GradWeightOp {
  using acc_t = at::opmath_type<scalar_t>;
  Taps<scalar_t> in;
  const scalar_t* g;
  __device__ void setup(int) {}
  __device__ Vec<acc_t, 3> operator()(const Cursor& cur, int c) const {
    const int64_t o = in.g.offset(cur.n, c, cur.h, cur.w);
    acc_t v[3];
    in.load(cur, o, v);
    const acc_t gv = acc_t(g[o]);
    return {{gv * v[0], gv * v[1], gv * v[2]}};
  }
};

}  // namespace

void tap3(const at::Tensor& x, const at::Tensor& out, const at::Tensor& weight, int axis,
          int64_t dilation, bool flip, bool cl, const BnTensors* bn) {
  if (x.numel() == 0) return;
  const Geo g = make_geo(x);
  const at::Tensor w = weight.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dwconv3_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    Tap3Op<scalar_t> op;
    op.in = {x.data_ptr<scalar_t>(), g, axis, clamp_dilation(dilation, g)};
    op.out = out.data_ptr<scalar_t>();
    op.w = w.data_ptr<scalar_t>();
    op.flip = flip;
    op.fold = bn != nullptr;
    if (bn) op.bn = BnParams<acc_t>::of(*bn);
    launch_map(op, g, cl);
  });
}

at::Tensor dwconv3(const at::Tensor& x_, const at::Tensor& weight, int64_t dilation) {
  check_input(x_);
  const int axis = check_dw_weight(weight, x_, dilation);
  const c10::cuda::CUDAGuard guard(x_.device());
  bool cl;
  const at::Tensor x = canonical(x_, cl);
  at::Tensor out = empty_as(x, cl);
  tap3(x, out, weight, axis, dilation, /*flip=*/false, cl, nullptr);
  return out;
}

std::tuple<at::Tensor, at::Tensor> dwconv3_backward(const at::Tensor& grad_out,
                                                    const at::Tensor& x_, const at::Tensor& weight,
                                                    int64_t dilation, std::array<bool, 2> mask) {
  check_grad(grad_out, x_);
  const int axis = check_dw_weight(weight, x_, dilation);
  const c10::cuda::CUDAGuard guard(x_.device());
  bool cl;
  const at::Tensor x = canonical(x_, cl);
  const at::Tensor g = grad_out.contiguous(fmt(cl));
  at::Tensor grad_x, grad_w;
  if (mask[0]) {
    // d/dx of sum_k w_k x[i + (k-1)d] is the same stencil with w reversed.
    grad_x = empty_as(x, cl);
    tap3(g, grad_x, weight, axis, dilation, /*flip=*/true, cl, nullptr);
  }
  if (mask[1]) {
    const Geo geo = make_geo(x);
    at::Tensor sums = at::zeros({3, geo.C}, x.options().dtype(at::kDouble));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dwconv3_bwd_cuda", [&] {
      GradWeightOp<scalar_t> op;
      op.in = {x.data_ptr<scalar_t>(), geo, axis, clamp_dilation(dilation, geo)};
      op.g = g.data_ptr<scalar_t>();
      launch_reduce<Sum<3>>(op, geo, cl, x, StoreSums{sums.data_ptr<double>(), geo.C});
    });
    grad_w = sums.t().to(weight.scalar_type()).reshape(weight.sizes()).contiguous();
  }
  return {grad_x, grad_w};
}

}  // namespace cuda
}  // namespace dabnet

TORCH_LIBRARY_IMPL(dabnet, CUDA, m) {
  m.impl("dwconv3", &dabnet::cuda::dwconv3);
  m.impl("dwconv3_backward", &dabnet::cuda::dwconv3_backward);
}
