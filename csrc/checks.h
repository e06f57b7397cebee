// Argument checks shared by the CPU and CUDA kernels: every failure is a TORCH_CHECK whose message
// names the argument and the problem (a RuntimeError in Python), never a crash.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace dabnet {

inline void check_input(const at::Tensor& x, const char* name = "x") {
  TORCH_CHECK(x.defined(), "dabnet: ", name, " is undefined");
  TORCH_CHECK(x.dim() == 4, "dabnet: ", name, " must be 4-D (N, C, H, W), got ", x.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "dabnet: ", name,
              " must be a floating-point tensor, got ", x.scalar_type());
}

inline void check_like(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.device() == x.device(), "dabnet: ", name, " is on ", t.device(),
              " but the input is on ", x.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "dabnet: ", name, " has dtype ", t.scalar_type(),
              " but the input has dtype ", x.scalar_type());
}

// Returns 0 for a (C,1,3,1) weight (taps along H) and 1 for (C,1,1,3) (taps along W).
inline int check_dw_weight(const at::Tensor& w, const at::Tensor& x, int64_t dilation,
                           const char* name = "weight") {
  check_like(w, x, name);
  TORCH_CHECK(w.dim() == 4 && w.size(0) == x.size(1) && w.size(1) == 1 &&
                  ((w.size(2) == 3 && w.size(3) == 1) || (w.size(2) == 1 && w.size(3) == 3)),
              "dabnet: ", name, " must have shape (C,1,3,1) or (C,1,1,3) with C=", x.size(1),
              ", got ", w.sizes());
  TORCH_CHECK(dilation >= 1, "dabnet: dilation must be >= 1, got ", dilation);
  return w.size(2) == 3 ? 0 : 1;
}

// A per-channel parameter vector of length C (or 1 where allow_single). Its dtype may differ from
// the input's (float32 parameters with a half input, as nn.BatchNorm2d allows): kernels read it in
// the accumulation type.
inline void check_vec(const at::Tensor& v, const at::Tensor& x, const char* name,
                      bool allow_single = false, bool same_dtype = false) {
  TORCH_CHECK(v.defined(), "dabnet: ", name, " is undefined");
  TORCH_CHECK(v.device() == x.device(), "dabnet: ", name, " is on ", v.device(),
              " but the input is on ", x.device());
  if (same_dtype) {
    TORCH_CHECK(v.scalar_type() == x.scalar_type(), "dabnet: ", name, " has dtype ",
                v.scalar_type(), " but the input has dtype ", x.scalar_type());
  } else {
    TORCH_CHECK(at::isFloatingType(v.scalar_type()), "dabnet: ", name, " must be floating-point");
  }
  TORCH_CHECK(v.dim() == 1 && (v.size(0) == x.size(1) || (allow_single && v.size(0) == 1)),
              "dabnet: ", name, " must have shape (", x.size(1), ")",
              allow_single ? " or (1)" : "", ", got ", v.sizes());
}

inline void check_stats(const c10::optional<at::Tensor>& rm, const c10::optional<at::Tensor>& rv,
                        const at::Tensor& x, bool training) {
  bool has_m = rm.has_value() && rm->defined(), has_v = rv.has_value() && rv->defined();
  TORCH_CHECK(has_m == has_v, "dabnet: running_mean and running_var must be given together");
  TORCH_CHECK(training || has_m, "dabnet: eval mode needs running_mean and running_var");
  if (has_m) {
    check_vec(*rm, x, "running_mean", false, false);
    check_vec(*rv, x, "running_var", false, false);
  }
  if (training) {
    TORCH_CHECK(x.numel() == 0 || x.numel() / x.size(1) > 1,
                "dabnet: training-mode BatchNorm needs more than 1 value per channel, got input ",
                x.sizes());
  }
}

inline void check_bn_prelu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                           const at::Tensor& prelu_weight) {
  check_vec(weight, x, "weight");
  check_vec(bias, x, "bias");
  check_vec(prelu_weight, x, "prelu_weight", /*allow_single=*/true);
}

// The eval-mode DAB neck: x, BN-folded conv parameters and the final BN-PReLU.
inline void check_neck(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                       const at::Tensor& slope, const at::Tensor& out_scale,
                       const at::Tensor& out_shift, const at::Tensor& out_slope, int64_t dilation) {
  check_input(x);
  const int64_t C = x.size(1);
  TORCH_CHECK(weight.dim() == 3 && weight.size(0) == 4 && weight.size(1) == C && weight.size(2) == 3,
              "dabnet: dab_neck weight must have shape (4, ", C, ", 3), got ", weight.sizes());
  TORCH_CHECK(bias.dim() == 2 && bias.size(0) == 4 && bias.size(1) == C,
              "dabnet: dab_neck bias must have shape (4, ", C, "), got ", bias.sizes());
  TORCH_CHECK(slope.dim() == 2 && slope.size(0) == 4 && slope.size(1) == C,
              "dabnet: dab_neck slope must have shape (4, ", C, "), got ", slope.sizes());
  for (const auto* t : {&weight, &bias, &slope})
    TORCH_CHECK(t->device() == x.device() && at::isFloatingType(t->scalar_type()),
                "dabnet: dab_neck parameters must be floating-point tensors on ", x.device());
  check_vec(out_scale, x, "out_scale");
  check_vec(out_shift, x, "out_shift");
  check_vec(out_slope, x, "out_slope");
  TORCH_CHECK(dilation >= 1, "dabnet: dilation must be >= 1, got ", dilation);
}

// grad_out of a backward op: same device, dtype and shape as the forward input x.
inline void check_grad(const at::Tensor& grad_out, const at::Tensor& x) {
  check_input(x);
  check_input(grad_out, "grad_out");
  check_like(grad_out, x, "grad_out");
  TORCH_CHECK(grad_out.sizes() == x.sizes(), "dabnet: grad_out has shape ", grad_out.sizes(),
              " but the input has shape ", x.sizes());
}

// Every argument of bn_prelu_backward but the flags.
inline void check_bn_prelu_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                    const at::Tensor& weight, const at::Tensor& bias,
                                    const at::Tensor& prelu_weight, const at::Tensor& mean,
                                    const at::Tensor& var) {
  check_grad(grad_out, x);
  check_bn_prelu(x, weight, bias, prelu_weight);
  check_vec(mean, x, "mean");
  check_vec(var, x, "var");
}

// Every argument of dwconv3_bn_prelu; returns the conv's axis as check_dw_weight.
inline int check_dwconv3_bn_prelu(const at::Tensor& x, const at::Tensor& conv_weight,
                                  int64_t dilation, const at::Tensor& weight,
                                  const at::Tensor& bias,
                                  const c10::optional<at::Tensor>& running_mean,
                                  const c10::optional<at::Tensor>& running_var,
                                  const at::Tensor& prelu_weight, bool training) {
  check_input(x);
  const int axis = check_dw_weight(conv_weight, x, dilation, "conv_weight");
  check_bn_prelu(x, weight, bias, prelu_weight);
  check_stats(running_mean, running_var, x, training);
  return axis;
}

}  // namespace dabnet
