// bn_prelu on CPU: BatchNorm2d (batch or running statistics) then PReLU, and its backward, which
// recomputes the BN output from x instead of saving it.
#include <torch/library.h>

#include <cmath>

#include "../checks.h"
#include "alloc.h"
#include "isa.h"
#include "kernels.h"
#include "loops.h"

namespace dabnet {
namespace cpu {
inline namespace DABNET_CPU_ISA {  // see isa.h

namespace {

// Batch mean and biased variance per channel, two passes in double.
template <typename scalar_t>
void batch_stats(const scalar_t* x, const Geo& g, std::vector<double>& mean,
                 std::vector<double>& var) {
  using acc_t = at::opmath_type<scalar_t>;
  const double M = double(g.N) * g.H * g.W;
  mean.assign(g.C, 0.0);
  var.assign(g.C, 0.0);
  channel_reduce<1, acc_t>(
      g, [&](int64_t i, int64_t, acc_t& s, acc_t&, acc_t&) { s += acc_t(x[i]); }, mean.data());
  for (auto& m : mean) m /= M;
  std::vector<acc_t> m_acc(mean.begin(), mean.end());
  channel_reduce<1, acc_t>(
      g,
      [&](int64_t i, int64_t c, acc_t& s, acc_t&, acc_t&) {
        const acc_t v = acc_t(x[i]) - m_acc[c];
        s += v * v;
      },
      var.data());
  for (auto& v : var) v /= M;
}

std::vector<double> to_double(const at::Tensor& v, int64_t C) { return to_vec<double>(v, C); }

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_prelu(
    const at::Tensor& x_, const at::Tensor& weight, const at::Tensor& bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
    const at::Tensor& prelu_weight, bool training, double eps) {
  check_input(x_);
  check_bn_prelu(x_, weight, bias, prelu_weight);
  check_stats(running_mean, running_var, x_, training);
  bool cl;
  const at::Tensor x = canonical(x_, cl);
  const Geo g(x, cl);
  const int64_t C = g.C;
  at::Tensor out = empty_out_as(x, cl);
  const auto sopt = x.options().dtype(stat_type(x));
  std::vector<double> mean, var;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_prelu_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    if (training) {
      if (x.numel() > 0) {
        batch_stats(xp, g, mean, var);
      } else {  // empty batch: statistics are undefined, as in ATen
        mean.assign(C, NAN);
        var.assign(C, NAN);
      }
    } else {
      mean = to_double(*running_mean, C);
      var = to_double(*running_var, C);
    }
    // The statistics as returned (and as the backward will see them).
    using stat_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    for (int64_t c = 0; c < C; ++c) {
      mean[c] = double(stat_t(mean[c]));
      var[c] = double(stat_t(var[c]));
    }
    const auto w = to_double(weight, C), b = to_double(bias, C);
    std::vector<acc_t> scale, shift;
    fold_bn(w, b, mean, var, eps, scale, shift);
    const auto slope = to_vec<acc_t>(prelu_weight, C);
    scalar_t* op = out.data_ptr<scalar_t>();
    channel_map(g, [&](int64_t i, int64_t c) {
      const acc_t y = affine(acc_t(xp[i]), scale[c], shift[c]);
      op[i] = scalar_t(prelu(y, slope[c]));
    });
  });
  at::Tensor m = at::empty({C}, sopt), v = at::empty({C}, sopt);
  AT_DISPATCH_FLOATING_TYPES(m.scalar_type(), "bn_prelu_stats", [&] {
    std::copy(mean.begin(), mean.end(), m.data_ptr<scalar_t>());  // already rounded to scalar_t
    std::copy(var.begin(), var.end(), v.data_ptr<scalar_t>());
  });
  return {out, m, v};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_prelu_backward(
    const at::Tensor& grad_out, const at::Tensor& x_, const at::Tensor& weight,
    const at::Tensor& bias, const at::Tensor& prelu_weight, const at::Tensor& mean_,
    const at::Tensor& var_, bool training, double eps, std::array<bool, 4> mask) {
  check_bn_prelu_backward(grad_out, x_, weight, bias, prelu_weight, mean_, var_);
  bool cl;
  const at::Tensor x = canonical(x_, cl);
  const at::Tensor gout = grad_out.contiguous(fmt(cl));
  const Geo g(x, cl);
  const int64_t C = g.C;
  const double M = double(g.N) * g.H * g.W;
  at::Tensor gx = mask[0] ? empty_out_as(x, cl) : at::Tensor();
  std::vector<double> sums(3 * C, 0.0);  // [sum gy | sum gy*xhat | sum g*y over y <= 0]
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_prelu_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = gout.data_ptr<scalar_t>();
    const auto w = to_double(weight, C), b = to_double(bias, C), mu = to_double(mean_, C),
               vr = to_double(var_, C);
    std::vector<acc_t> scale, shift, mean(C), invstd(C);
    fold_bn(w, b, mu, vr, eps, scale, shift);
    for (int64_t c = 0; c < C; ++c) {
      invstd[c] = acc_t(1.0 / std::sqrt(vr[c] + eps));
      mean[c] = acc_t(mu[c]);
    }
    const auto slope = to_vec<acc_t>(prelu_weight, C);
    if (x.numel() > 0 && (training || mask[1] || mask[2] || mask[3])) {
      channel_reduce<3, acc_t>(
          g,
          [&](int64_t i, int64_t c, acc_t& s0, acc_t& s1, acc_t& s2) {
            const acc_t xv = acc_t(xp[i]), gv = acc_t(gp[i]);
            const acc_t y = affine(xv, scale[c], shift[c]);
            // PyTorch's PReLU derivative: 1 for y > 0, the slope otherwise. Selects between values
            // computed unconditionally, so the loop vectorizes (see prelu in loops.h).
            const bool pos = y > acc_t(0);
            const acc_t a = slope[c], ga = gv * a, gneg = gv * y;
            const acc_t gy = pos ? gv : ga;
            s0 += gy;
            s1 += gy * (xv - mean[c]) * invstd[c];
            s2 += pos ? acc_t(0) : gneg;
          },
          sums.data());
    }
    if (mask[0] && x.numel() > 0) {
      std::vector<acc_t> k1(C), k2(C);  // grad_x = scale * (gy - k1 - xhat * k2)
      for (int64_t c = 0; c < C; ++c) {
        k1[c] = training ? acc_t(sums[c] / M) : acc_t(0);
        k2[c] = training ? acc_t(sums[C + c] / M) : acc_t(0);
      }
      scalar_t* gxp = gx.data_ptr<scalar_t>();
      channel_map(g, [&](int64_t i, int64_t c) {
        const acc_t xv = acc_t(xp[i]), gv = acc_t(gp[i]);
        const acc_t y = affine(xv, scale[c], shift[c]);
        const acc_t a = slope[c], ga = gv * a, gy = y > acc_t(0) ? gv : ga;
        const acc_t xhat = (xv - mean[c]) * invstd[c];
        gxp[i] = scalar_t(scale[c] * (gy - k1[c] - xhat * k2[c]));
      });
    }
  });
  auto vec = [&](int k, const at::Tensor& like) {
    auto t = at::empty({C}, x.options().dtype(at::kDouble));
    std::copy(sums.begin() + k * C, sums.begin() + (k + 1) * C, t.data_ptr<double>());
    if (like.numel() == 1) t = t.sum({0}, /*keepdim=*/true);
    return t.to(like.scalar_type());
  };
  at::Tensor gw = mask[1] ? vec(1, weight) : at::Tensor();
  at::Tensor gb = mask[2] ? vec(0, bias) : at::Tensor();
  at::Tensor ga = mask[3] ? vec(2, prelu_weight) : at::Tensor();
  return {gx, gw, gb, ga};
}

}  // namespace DABNET_CPU_ISA
}  // namespace cpu
}  // namespace dabnet

// Registered once, from the baseline build (isa.h).
#ifndef DABNET_CPU_VARIANT
DABNET_CPU_DECLARE(bn_prelu)
DABNET_CPU_DECLARE(bn_prelu_backward)

TORCH_LIBRARY_IMPL(dabnet, CPU, m) {
  m.impl("bn_prelu", DABNET_CPU_KERNEL(bn_prelu));
  m.impl("bn_prelu_backward", DABNET_CPU_KERNEL(bn_prelu_backward));
}
#endif
