// bn_prelu on CUDA: BatchNorm2d (batch statistics by a one-pass Welford reduction, or running
// statistics) then PReLU, and its backward (per-channel sums, then one elementwise pass that
// recomputes the BN output from x).
#include <torch/library.h>

#include <cmath>

#include "../checks.h"
#include "common.cuh"
#include "kernels.h"

namespace dabnet {
namespace cuda {

namespace {

// Each element enters the Welford reduction as (count 1, mean x, M2 0).
template <typename scalar_t>
struct StatsOp {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x;
  Geo g;
  __device__ void setup(int) {}
  __device__ Vec<acc_t, 3> operator()(const Cursor& cur, int c) const {
    return {{acc_t(1), acc_t(x[g.offset(cur.n, c, cur.h, cur.w)]), acc_t(0)}};
  }
};

// fin of the statistics: batch mean and biased variance in the accumulation type.
template <typename T>
struct StoreMeanVar {
  T *mean, *var;
  __device__ void operator()(int c, const Vec<double, 3>& s) const {
    mean[c] = T(s.v[1]);
    var[c] = T(s.v[2] / s.v[0]);
  }
};

template <typename scalar_t>
struct BnPreluOp {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x;
  scalar_t* out;
  Geo g;
  BnParams<acc_t> bn;
  BnChannel<acc_t> ch;
  __device__ void setup(int c) { ch = bn.channel(c); }
  __device__ void operator()(const Cursor& cur, int c) const {
    const int64_t o = g.offset(cur.n, c, cur.h, cur.w);
    out[o] = scalar_t(prelu(acc_t(x[o]) * ch.scale + ch.shift, ch.slope));
  }
};

// Backward, per element: y = x*scale + shift, gy = dL/dy through the PReLU.
template <typename scalar_t>
struct BnBackward {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t *x, *g;
  Geo geo;
  BnParams<acc_t> bn;
  BnChannel<acc_t> ch;
  struct Point {
    acc_t x, g, y, gy;
  };
  __device__ __forceinline__ Point at(int64_t o) const {
    Point p;
    p.x = acc_t(x[o]);
    p.g = acc_t(g[o]);
    p.y = p.x * ch.scale + ch.shift;
    p.gy = p.y > acc_t(0) ? p.g : ch.slope * p.g;
    return p;
  }
};

// Sums per channel: [gy | gy * xhat | g * y where y <= 0] (grad_bias, grad_weight, grad_slope).
template <typename scalar_t>
struct BnSumsOp : BnBackward<scalar_t> {
  using acc_t = at::opmath_type<scalar_t>;
  __device__ void setup(int c) { this->ch = this->bn.channel(c); }
  __device__ Vec<acc_t, 3> operator()(const Cursor& cur, int c) const {
    const auto p = this->at(this->geo.offset(cur.n, c, cur.h, cur.w));
    const acc_t xhat = (p.x - this->ch.mean) * this->ch.invstd;
    return {{p.gy, p.gy * xhat, p.y > acc_t(0) ? acc_t(0) : p.g * p.y}};
  }
};

// grad_x = scale * (gy - k1 - xhat * k2), k1 = mean(gy), k2 = mean(gy * xhat) in training (the
// batch statistics depend on x), k1 = k2 = 0 in eval.
template <typename scalar_t>
struct BnGradXOp : BnBackward<scalar_t> {
  using acc_t = at::opmath_type<scalar_t>;
  scalar_t* gx;
  const double* sums;  // (3, C), or null in eval
  double inv_m;
  acc_t k1, k2;
  __device__ void setup(int c) {
    this->ch = this->bn.channel(c);
    k1 = sums ? acc_t(sums[c] * inv_m) : acc_t(0);
    k2 = sums ? acc_t(sums[this->geo.C + c] * inv_m) : acc_t(0);
  }
  __device__ void operator()(const Cursor& cur, int c) const {
    const int64_t o = this->geo.offset(cur.n, c, cur.h, cur.w);
    const auto p = this->at(o);
    const acc_t xhat = (p.x - this->ch.mean) * this->ch.invstd;
    gx[o] = scalar_t(this->ch.scale * (p.gy - k1 - xhat * k2));
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_prelu(
    const at::Tensor& x_, const at::Tensor& weight, const at::Tensor& bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
    const at::Tensor& prelu_weight, bool training, double eps) {
  check_input(x_);
  check_bn_prelu(x_, weight, bias, prelu_weight);
  check_stats(running_mean, running_var, x_, training);
  const c10::cuda::CUDAGuard guard(x_.device());
  bool cl;
  const at::Tensor x = canonical(x_, cl);
  const Geo g = make_geo(x);
  at::Tensor out = empty_as(x, cl);
  const auto sopt = x.options().dtype(stat_type(x));
  at::Tensor mean, var;
  if (training) {
    mean = at::empty({g.C}, sopt);
    var = at::empty({g.C}, sopt);
    if (g.M == 0) {  // empty batch: statistics are undefined, as in ATen
      mean.fill_(NAN);
      var.fill_(NAN);
    }
  } else {
    mean = running_mean->to(sopt, false, /*copy=*/true);
    var = running_var->to(sopt, false, /*copy=*/true);
  }
  if (x.numel() == 0) return {out, mean, var};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_prelu_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (training) {
      StatsOp<scalar_t> stats{x.data_ptr<scalar_t>(), g};
      launch_reduce<Welford>(stats, g, cl, x,
                             StoreMeanVar<acc_t>{mean.data_ptr<acc_t>(), var.data_ptr<acc_t>()});
    }
    const BnTensors t = bn_tensors(x, weight, bias, mean, var, prelu_weight, eps);
    BnPreluOp<scalar_t> op;
    op.x = x.data_ptr<scalar_t>();
    op.out = out.data_ptr<scalar_t>();
    op.g = g;
    op.bn = BnParams<acc_t>::of(t);
    launch_map(op, g, cl);
  });
  return {out, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_prelu_backward(
    const at::Tensor& grad_out, const at::Tensor& x_, const at::Tensor& weight,
    const at::Tensor& bias, const at::Tensor& prelu_weight, const at::Tensor& mean,
    const at::Tensor& var, bool training, double eps, std::array<bool, 4> mask) {
  check_bn_prelu_backward(grad_out, x_, weight, bias, prelu_weight, mean, var);
  const c10::cuda::CUDAGuard guard(x_.device());
  bool cl;
  const at::Tensor x = canonical(x_, cl);
  const at::Tensor gout = grad_out.contiguous(fmt(cl));
  const Geo g = make_geo(x);
  at::Tensor gx = mask[0] ? empty_as(x, cl) : at::Tensor();
  at::Tensor sums = at::zeros({3, g.C}, x.options().dtype(at::kDouble));
  const bool need_sums = training || mask[1] || mask[2] || mask[3];
  if (x.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_prelu_bwd_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const BnTensors t = bn_tensors(x, weight, bias, mean, var, prelu_weight, eps);
      BnBackward<scalar_t> base;
      base.x = x.data_ptr<scalar_t>();
      base.g = gout.data_ptr<scalar_t>();
      base.geo = g;
      base.bn = BnParams<acc_t>::of(t);
      if (need_sums) {
        BnSumsOp<scalar_t> op;
        static_cast<BnBackward<scalar_t>&>(op) = base;
        launch_reduce<Sum<3>>(op, g, cl, x, StoreSums{sums.data_ptr<double>(), g.C});
      }
      if (mask[0]) {
        BnGradXOp<scalar_t> op;
        static_cast<BnBackward<scalar_t>&>(op) = base;
        op.gx = gx.data_ptr<scalar_t>();
        op.sums = training ? sums.data_ptr<double>() : nullptr;
        op.inv_m = 1.0 / double(g.M);
        launch_map(op, g, cl);
      }
    });
  }
  auto vec = [&](int k, const at::Tensor& like) {
    at::Tensor v = sums[k];
    if (like.numel() == 1) v = v.sum({0}, /*keepdim=*/true);
    return v.to(like.scalar_type(), false, /*copy=*/true);  // outputs never alias
  };
  at::Tensor gw = mask[1] ? vec(1, weight) : at::Tensor();
  at::Tensor gb = mask[2] ? vec(0, bias) : at::Tensor();
  at::Tensor ga = mask[3] ? vec(2, prelu_weight) : at::Tensor();
  return {gx, gw, gb, ga};
}

}  // namespace cuda
}  // namespace dabnet

TORCH_LIBRARY_IMPL(dabnet, CUDA, m) {
  m.impl("bn_prelu", &dabnet::cuda::bn_prelu);
  m.impl("bn_prelu_backward", &dabnet::cuda::bn_prelu_backward);
}
