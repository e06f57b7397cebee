// CPU entry points shared between op files.
#pragma once
#include "isa.h"
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace dabnet {
namespace cpu {
inline namespace DABNET_CPU_ISA {  // see isa.h

at::Tensor dwconv3(const at::Tensor& x, const at::Tensor& weight, int64_t dilation);

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_prelu(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
    const at::Tensor& prelu_weight, bool training, double eps);

}  // namespace DABNET_CPU_ISA
}  // namespace cpu
}  // namespace dabnet
