// dwconv3_bn_prelu on CPU. Eval: one pass, the conv then BatchNorm and PReLU in its epilogue
// (computed as the backward recomputes them: see kEpiBnPrelu).
// Training: the batch statistics of the conv output are needed before anything can be normalized,
// so it is dwconv3 followed by bn_prelu.
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> dwconv3_bn_prelu(
    const at::Tensor& x_, const at::Tensor& conv_weight, int64_t dilation, const at::Tensor& weight,
    const at::Tensor& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, const at::Tensor& prelu_weight, bool training,
    double eps) {
  const int axis = check_dwconv3_bn_prelu(x_, conv_weight, dilation, weight, bias, running_mean,
                                          running_var, prelu_weight, training);
  if (training) return bn_prelu(dwconv3(x_, conv_weight, dilation), weight, bias, running_mean,
                                running_var, prelu_weight, training, eps);
  bool cl;
  const at::Tensor x = canonical(x_, cl);
  const Geo g(x, cl);
  const int64_t C = g.C;
  at::Tensor out = empty_out_as(x, cl);
  // Eval returns copies of the running statistics; the BN is folded from those copies, as the
  // backward (which receives them) folds it.
  const auto sopt = x.options().dtype(stat_type(x));
  at::Tensor mean = running_mean->to(sopt, false, /*copy=*/true),
             var = running_var->to(sopt, false, /*copy=*/true);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dwconv3_bn_prelu_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> scale, shift;
    fold_bn(to_vec<double>(weight, C), to_vec<double>(bias, C), to_vec<double>(mean, C),
            to_vec<double>(var, C), eps, scale, shift);
    const auto slope = to_vec<acc_t>(prelu_weight, C);
    const auto prm = tap_params<acc_t>(conv_weight, C, false, slope.data(), scale.data(),
                                       shift.data());
    if (x.numel() > 0)
      run_tap3<kEpiBnPrelu>(x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), g, axis, dilation,
                            prm.data());
  });
  return {out, mean, var};
}

}  // namespace DABNET_CPU_ISA
}  // namespace cpu
}  // namespace dabnet

// Registered once, from the baseline build (isa.h).
#ifndef DABNET_CPU_VARIANT
DABNET_CPU_DECLARE(dwconv3_bn_prelu)

TORCH_LIBRARY_IMPL(dabnet, CPU, m) {
  m.impl("dwconv3_bn_prelu", DABNET_CPU_KERNEL(dwconv3_bn_prelu));
}
#endif
