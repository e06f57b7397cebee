// CUDA entry points shared between op files.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace dabnet {
namespace cuda {

struct BnTensors;

// out = PReLU(tap3(x) [* BN scale + shift]) along axis (0: H, 1: W), or the plain 3-tap conv when
// bn is null. flip reverses the taps (the adjoint, for grad_input). x and out share a layout.
void tap3(const at::Tensor& x, const at::Tensor& out, const at::Tensor& weight, int axis,
          int64_t dilation, bool flip, bool cl, const BnTensors* bn);

// Batch mean and biased variance (accumulation type, filled in) of dwconv3(x, weight) without
// writing the conv: the conv is recomputed from x.
void conv_batch_stats(const at::Tensor& x, const at::Tensor& weight, int axis, int64_t dilation,
                      bool cl, at::Tensor& mean, at::Tensor& var);

at::Tensor dwconv3(const at::Tensor& x, const at::Tensor& weight, int64_t dilation);

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_prelu(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
    const at::Tensor& prelu_weight, bool training, double eps);

}  // namespace cuda
}  // namespace dabnet
