// bn_prelu on CUDA: BatchNorm2d (batch statistics by a one-pass reduction of shifted sums, or
// running statistics) then PReLU, and its backward (per-channel sums, then one elementwise pass that
// recomputes the BN output from x).
#include <torch/library.h>

#include <cmath>

#include "../checks.h"
#include "common.cuh"
#include "kernels.h"

namespace dabnet {
namespace cuda {

namespace {

// Backward, per element: y = x*scale + shift, gy = dL/dy through the PReLU.
template <typename scalar_t, typename L>
struct BnBackward {
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr int kC = L::kC, kPacks = 2;
  struct Regs {
    int64_t o;
    Pack<scalar_t, L::V> x, g;
  };
  const scalar_t *x, *g;
  Geo geo;  // in packs
  BnParams<acc_t> bn;
  BnChannel<acc_t> ch[L::kC];
  struct Point {
    acc_t x, g, y, gy, xhat;
  };
  __host__ __device__ static int channel(int c, int k) { return L::channel(c, k); }
  __device__ void setup(int c) {
#pragma unroll
    for (int j = 0; j < L::kC; ++j) ch[j] = bn.channel(L::channel(c, j));
  }
  __device__ Regs load(const Cursor& cur, int c) const {
    Regs r;
    r.o = cur.off + int64_t(c) * geo.sC;
    r.x = load_pack<scalar_t, L::V>(x, r.o);
    r.g = load_pack<scalar_t, L::V>(g, r.o);
    return r;
  }
  __device__ __forceinline__ Point at(const Regs& r, int k) const {
    const BnChannel<acc_t>& c = ch[L::slot(k)];
    Point p;
    p.x = acc_t(r.x.v[k]);
    p.g = acc_t(r.g.v[k]);
    p.y = p.x * c.scale + c.shift;
    p.gy = p.y > acc_t(0) ? p.g : c.slope * p.g;
    p.xhat = (p.x - c.mean) * c.invstd;
    return p;
  }
};

// Sums per channel: [gy | gy * xhat | g * y where y <= 0] (grad_bias, grad_weight, grad_slope).
template <typename scalar_t, typename L>
struct BnSumsOp : BnBackward<scalar_t, L> {
  using acc_t = at::opmath_type<scalar_t>;
  __device__ void accumulate(int, const typename BnSumsOp::Regs& r, Vec<acc_t, 3>* s) const {
#pragma unroll
    for (int k = 0; k < L::V; ++k) {
      const auto p = this->at(r, k);
      Vec<acc_t, 3>& t = s[L::slot(k)];
      t.v[0] += p.gy;
      t.v[1] += p.gy * p.xhat;
      t.v[2] += p.y > acc_t(0) ? acc_t(0) : p.g * p.y;
    }
  }
};

// grad_x = scale * (gy - k1 - xhat * k2), k1 = mean(gy), k2 = mean(gy * xhat) in training (the
// batch statistics depend on x), k1 = k2 = 0 in eval.
template <typename scalar_t, typename L>
struct BnGradXOp : BnBackward<scalar_t, L> {
  using acc_t = at::opmath_type<scalar_t>;
  scalar_t* gx;
  const double* sums;  // (3, C), or null in eval
  int C;
  double inv_m;
  acc_t k1[L::kC], k2[L::kC];
  __device__ void setup(int c) {
    BnBackward<scalar_t, L>::setup(c);
#pragma unroll
    for (int j = 0; j < L::kC; ++j) {
      const int ch = L::channel(c, j);
      k1[j] = sums ? acc_t(sums[ch] * inv_m) : acc_t(0);
      k2[j] = sums ? acc_t(sums[C + ch] * inv_m) : acc_t(0);
    }
  }
  __device__ void store(int, const typename BnGradXOp::Regs& r) const {
    Pack<scalar_t, L::V> y;
#pragma unroll
    for (int k = 0; k < L::V; ++k) {
      const int j = L::slot(k);
      const auto p = this->at(r, k);
      y.v[k] = scalar_t(this->ch[j].scale * (p.gy - k1[j] - p.xhat * k2[j]));
    }
    store_pack(gx, r.o, y);
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
    with_lanes<scalar_t>(g, cl, {x.data_ptr(), out.data_ptr()}, [&](auto lanes, const Geo& pg) {
      const PlainSrc<scalar_t, decltype(lanes)> src{x.data_ptr<scalar_t>(), pg, g.sC};
      if (training) batch_stats(src, pg, cl, g.C, g.M, x, mean, var);
      const BnTensors t = bn_tensors(x, weight, bias, mean, var, prelu_weight, eps);
      ApplyOp<std::decay_t<decltype(src)>, true> op;
      op.src = src;
      op.out = out.data_ptr<scalar_t>();
      op.bn = BnParams<acc_t>::of(t);
      launch_map(op, pg, cl);
    });
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
      with_lanes<scalar_t>(g, cl, {x.data_ptr(), gout.data_ptr(), mask[0] ? gx.data_ptr() : nullptr},
                           [&](auto lanes, const Geo& pg) {
        using L = decltype(lanes);
        BnBackward<scalar_t, L> base;
        base.x = x.data_ptr<scalar_t>();
        base.g = gout.data_ptr<scalar_t>();
        base.geo = pg;
        base.bn = BnParams<acc_t>::of(t);
        if (need_sums) {
          BnSumsOp<scalar_t, L> op;
          static_cast<BnBackward<scalar_t, L>&>(op) = base;
          launch_reduce<Sum<3>>(op, pg, cl, g.C, x, StoreSums{sums.data_ptr<double>(), g.C});
        }
        if (mask[0]) {
          BnGradXOp<scalar_t, L> op;
          static_cast<BnBackward<scalar_t, L>&>(op) = base;
          op.gx = gx.data_ptr<scalar_t>();
          op.sums = training ? sums.data_ptr<double>() : nullptr;
          op.inv_m = 1.0 / double(g.M);
          op.C = g.C;
          launch_map(op, pg, cl);
        }
      });
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
