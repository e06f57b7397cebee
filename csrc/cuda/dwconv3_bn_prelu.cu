// dwconv3_bn_prelu on CUDA. Eval: one pass over memory, BatchNorm and PReLU in the conv's epilogue
// (computed as the backward recomputes them: see ApplyOp). Training: the batch statistics of the
// conv output are needed before anything can be normalized: one pass computes them from x (the
// conv recomputed, never written), a second recomputes the conv and applies BN-PReLU (3 passes
// over memory instead of 5).
#include <torch/library.h>

#include <cmath>

#include "../checks.h"
#include "common.cuh"
#include "kernels.h"

namespace dabnet {
namespace cuda {

std::tuple<at::Tensor, at::Tensor, at::Tensor> dwconv3_bn_prelu(
    const at::Tensor& x_, const at::Tensor& conv_weight, int64_t dilation, const at::Tensor& weight,
    const at::Tensor& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, const at::Tensor& prelu_weight, bool training,
    double eps) {
  const int axis = check_dwconv3_bn_prelu(x_, conv_weight, dilation, weight, bias, running_mean,
                                          running_var, prelu_weight, training);
  const c10::cuda::CUDAGuard guard(x_.device());
  bool cl;
  const at::Tensor x = canonical(x_, cl);
  at::Tensor out = empty_as(x, cl);
  const auto sopt = x.options().dtype(stat_type(x));
  at::Tensor mean, var;
  if (training) {
    mean = at::empty({x.size(1)}, sopt);
    var = at::empty({x.size(1)}, sopt);
    if (x.numel() == 0) {  // no positions: the statistics are undefined, as in ATen
      mean.fill_(NAN);
      var.fill_(NAN);
      return {out, mean, var};
    }
    conv_batch_stats(x, conv_weight, axis, dilation, cl, mean, var);
  } else {
    mean = running_mean->to(sopt, false, /*copy=*/true);
    var = running_var->to(sopt, false, /*copy=*/true);
  }
  const BnTensors t = bn_tensors(x, weight, bias, mean, var, prelu_weight, eps);
  tap3(x, out, conv_weight, axis, dilation, /*flip=*/false, cl, &t);
  return {out, mean, var};
}

}  // namespace cuda
}  // namespace dabnet

TORCH_LIBRARY_IMPL(dabnet, CUDA, m) { m.impl("dwconv3_bn_prelu", &dabnet::cuda::dwconv3_bn_prelu); }
