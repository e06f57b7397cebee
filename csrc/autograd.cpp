// Autograd for the differentiable dabnet:: ops, in C++ (TORCH_LIBRARY_IMPL(dabnet, Autograd)).
//
// The formulas are the ones of dabnet_kernels/ops.py:_autograd, which still serves the Triton
// twins (dabnet_triton::*). They live here for the C++/CUDA ops because a Python autograd
// kernel costs two Python round trips per op (forward and backward): measured ~240 us per
// dwconv3 forward+backward at 1x32x64x128 on a 2-core VM, next to ~150 us of kernel time.
// Forward and backward call the kernels through the dispatcher, so the fake kernels registered in
// Python make them traceable by torch.compile.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <array>
#include <tuple>

namespace dabnet {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<Tensor>;

template <class Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

std::tuple<Tensor, Tensor> dwconv3_backward(const Tensor& grad, const Tensor& x, const Tensor& w,
                                            int64_t dilation, std::array<bool, 2> mask) {
  static auto handle =
      op<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, int64_t,
                                    std::array<bool, 2>)>("dabnet::dwconv3_backward");
  return handle.call(grad, x, w, dilation, mask);
}

// BN-PReLU backward from x (or the recomputed conv output) and the saved statistics.
std::tuple<Tensor, Tensor, Tensor, Tensor> bn_prelu_backward(
    const Tensor& grad, const Tensor& x, const variable_list& saved, bool training, double eps,
    std::array<bool, 4> mask) {
  static auto handle = op<std::tuple<Tensor, Tensor, Tensor, Tensor>(
      const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
      const Tensor&, bool, double, std::array<bool, 4>)>("dabnet::bn_prelu_backward");
  // saved = (weight, bias, prelu_weight, mean, var)
  return handle.call(grad, x, saved[0], saved[1], saved[2], saved[3], saved[4], training, eps,
                     mask);
}

struct DwConv3 : torch::autograd::Function<DwConv3> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& w, int64_t dilation) {
    static auto handle = op<Tensor(const Tensor&, const Tensor&, int64_t)>("dabnet::dwconv3");
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->save_for_backward({x, w});
    ctx->saved_data["dilation"] = dilation;
    return handle.call(x, w, dilation);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto [gx, gw] = dwconv3_backward(grads[0], saved[0], saved[1],
                                     ctx->saved_data["dilation"].toInt(),
                                     {ctx->needs_input_grad(0), ctx->needs_input_grad(1)});
    return {gx, gw, Tensor()};
  }
};

// bn_prelu and dwconv3_bn_prelu return (out, mean, var); mean and var are not differentiable.
// Their tensor inputs (the indices of needs_input_grad) skip absent running statistics.
int64_t after_running(const OptTensor& running_mean) {
  return running_mean.has_value() && running_mean->defined() ? 2 : 0;
}

struct BnPrelu : torch::autograd::Function<BnPrelu> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight,
                               const Tensor& bias, const OptTensor& running_mean,
                               const OptTensor& running_var, const Tensor& prelu_weight,
                               bool training, double eps) {
    static auto handle = op<std::tuple<Tensor, Tensor, Tensor>(
        const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
        const Tensor&, bool, double)>("dabnet::bn_prelu");
    at::AutoDispatchBelowADInplaceOrView below;
    auto [out, mean, var] =
        handle.call(x, weight, bias, running_mean, running_var, prelu_weight, training, eps);
    ctx->save_for_backward({x, weight, bias, prelu_weight, mean, var});
    ctx->saved_data["training"] = training;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["prelu_index"] = 3 + after_running(running_mean);
    ctx->mark_non_differentiable({mean, var});
    return {out, mean, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto need = [&](int64_t i) { return ctx->needs_input_grad(i); };
    auto [gx, gw, gb, ga] = bn_prelu_backward(
        grads[0], saved[0], {saved.begin() + 1, saved.end()}, ctx->saved_data["training"].toBool(),
        ctx->saved_data["eps"].toDouble(),
        {need(0), need(1), need(2), need(ctx->saved_data["prelu_index"].toInt())});
    return {gx, gw, gb, Tensor(), Tensor(), ga, Tensor(), Tensor()};
  }
};

struct DwConv3BnPrelu : torch::autograd::Function<DwConv3BnPrelu> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& conv_weight,
                               int64_t dilation, const Tensor& weight, const Tensor& bias,
                               const OptTensor& running_mean, const OptTensor& running_var,
                               const Tensor& prelu_weight, bool training, double eps) {
    static auto handle = op<std::tuple<Tensor, Tensor, Tensor>(
        const Tensor&, const Tensor&, int64_t, const Tensor&, const Tensor&, const OptTensor&,
        const OptTensor&, const Tensor&, bool, double)>("dabnet::dwconv3_bn_prelu");
    at::AutoDispatchBelowADInplaceOrView below;
    auto [out, mean, var] = handle.call(x, conv_weight, dilation, weight, bias, running_mean,
                                        running_var, prelu_weight, training, eps);
    // The conv output is recomputed in backward (one cheap pass) instead of being kept alive.
    ctx->save_for_backward({x, conv_weight, weight, bias, prelu_weight, mean, var});
    ctx->saved_data["dilation"] = dilation;
    ctx->saved_data["training"] = training;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["prelu_index"] = 4 + after_running(running_mean);
    ctx->mark_non_differentiable({mean, var});
    return {out, mean, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto conv = op<Tensor(const Tensor&, const Tensor&, int64_t)>("dabnet::dwconv3");
    auto saved = ctx->get_saved_variables();
    auto need = [&](int64_t i) { return ctx->needs_input_grad(i); };
    const int64_t dilation = ctx->saved_data["dilation"].toInt();
    const Tensor& x = saved[0];
    const Tensor& conv_weight = saved[1];
    const bool need_conv = need(0) || need(1);
    Tensor y = conv.call(x, conv_weight, dilation);
    auto [gy, gw, gb, ga] = bn_prelu_backward(
        grads[0], y, {saved.begin() + 2, saved.end()}, ctx->saved_data["training"].toBool(),
        ctx->saved_data["eps"].toDouble(),
        {need_conv, need(2), need(3), need(ctx->saved_data["prelu_index"].toInt())});
    Tensor gx, gcw;
    if (need_conv) std::tie(gx, gcw) = dwconv3_backward(gy, x, conv_weight, dilation, {need(0), need(1)});
    return {gx, gcw, Tensor(), gw, gb, Tensor(), Tensor(), ga, Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor, Tensor> as_tuple(const variable_list& v) { return {v[0], v[1], v[2]}; }

}  // namespace
}  // namespace dabnet

TORCH_LIBRARY_IMPL(dabnet, Autograd, m) {
  using dabnet::OptTensor;
  using at::Tensor;
  m.impl("dwconv3", [](const Tensor& x, const Tensor& w, int64_t dilation) {
    return dabnet::DwConv3::apply(x, w, dilation);
  });
  m.impl("bn_prelu", [](const Tensor& x, const Tensor& weight, const Tensor& bias,
                        const OptTensor& running_mean, const OptTensor& running_var,
                        const Tensor& prelu_weight, bool training, double eps) {
    return dabnet::as_tuple(dabnet::BnPrelu::apply(x, weight, bias, running_mean, running_var,
                                                   prelu_weight, training, eps));
  });
  m.impl("dwconv3_bn_prelu",
         [](const Tensor& x, const Tensor& conv_weight, int64_t dilation, const Tensor& weight,
            const Tensor& bias, const OptTensor& running_mean, const OptTensor& running_var,
            const Tensor& prelu_weight, bool training, double eps) {
           return dabnet::as_tuple(dabnet::DwConv3BnPrelu::apply(x, conv_weight, dilation, weight,
                                                                 bias, running_mean, running_var,
                                                                 prelu_weight, training, eps));
         });
}
