// Autograd for the differentiable dabnet:: ops, in C++ (TORCH_LIBRARY_IMPL(dabnet, Autograd)).
//
// The formulas are the ones of dabnet_kernels/ops.py:_autograd, which still serves the Triton
// twins (dabnet_triton::*). They live here for the C++/CUDA ops because a Python autograd
// kernel costs two Python round trips per op (forward and backward): dwconv3 forward+backward at
// 1x32x64x128 on a 2-core VM took ~420-460 us with one and ~300 us with this (medians; the kernels
// alone ~150 us).
// Forward and backward call the kernels through the dispatcher, so the fake kernels registered in
// Python make them traceable by torch.compile.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/batch_norm.h>
#include <ATen/ops/conv2d.h>
#include <ATen/ops/prelu.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <array>
#include <tuple>
#include <vector>

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

Tensor dwconv3(const Tensor& x, const Tensor& w, int64_t dilation) {
  static auto handle = op<Tensor(const Tensor&, const Tensor&, int64_t)>("dabnet::dwconv3");
  return handle.call(x, w, dilation);
}

std::tuple<Tensor, Tensor> dwconv3_backward(const Tensor& grad, const Tensor& x, const Tensor& w,
                                            int64_t dilation, std::array<bool, 2> mask) {
  static auto handle =
      op<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, int64_t,
                                    std::array<bool, 2>)>("dabnet::dwconv3_backward");
  return handle.call(grad, x, w, dilation, mask);
}

// The BN-PReLU half of bn_prelu and dwconv3_bn_prelu. Forward: what backward needs besides the
// saved tensors; mean and var are outputs but not differentiable. prelu_index: the position of
// prelu_weight among the op's tensor inputs (the indices of needs_input_grad), which absent running
// statistics shift.
void save_bn(AutogradContext* ctx, bool training, double eps, int64_t prelu_index,
             const Tensor& mean, const Tensor& var) {
  ctx->saved_data["training"] = training;
  ctx->saved_data["eps"] = eps;
  ctx->saved_data["prelu_index"] = prelu_index;
  ctx->mark_non_differentiable({mean, var});
}

// Backward: bn_prelu_backward from the BN input y (x, or the recomputed conv output) and the saved
// (weight, bias, prelu_weight, mean, var) starting at saved[from]; weight and bias are the tensor
// inputs w_index and w_index + 1.
std::tuple<Tensor, Tensor, Tensor, Tensor> bn_backward(AutogradContext* ctx, const Tensor& grad,
                                                       const Tensor& y, const variable_list& saved,
                                                       size_t from, bool need_y, int64_t w_index) {
  static auto handle = op<std::tuple<Tensor, Tensor, Tensor, Tensor>(
      const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
      const Tensor&, bool, double, std::array<bool, 4>)>("dabnet::bn_prelu_backward");
  const auto& d = ctx->saved_data;
  return handle.call(grad, y, saved[from], saved[from + 1], saved[from + 2], saved[from + 3],
                     saved[from + 4], d.at("training").toBool(), d.at("eps").toDouble(),
                     {need_y, ctx->needs_input_grad(w_index), ctx->needs_input_grad(w_index + 1),
                      ctx->needs_input_grad(d.at("prelu_index").toInt())});
}

// Higher-order gradients. The backward kernels have no autograd of their own, so a backward that
// is itself to be differentiated (create_graph=True: grad mode is on during backward, and some
// input of the backward requires grad) is computed instead by differentiating the op's ATen
// composite (F.conv2d / F.batch_norm / F.prelu, as dabnet_kernels.reference), whose backward ATen
// can differentiate again. Without this the second derivative came back as zeros.
bool graph_wanted(const variable_list& grads, const variable_list& saved) {
  if (!at::GradMode::is_enabled()) return false;
  for (const auto* list : {&grads, &saved})
    for (const auto& t : *list)
      if (t.defined() && t.requires_grad()) return true;
  return false;
}

Tensor dwconv3_composite(const Tensor& x, const Tensor& w, int64_t d) {
  const bool along_h = w.size(2) == 3;
  return at::conv2d(x, w, {}, {1, 1}, along_h ? std::vector<int64_t>{d, 0} : std::vector<int64_t>{0, d},
                    along_h ? std::vector<int64_t>{d, 1} : std::vector<int64_t>{1, d}, x.size(1));
}

// BN-PReLU of y from the saved (weight, bias, prelu_weight, mean, var) starting at saved[from]:
// batch statistics in training, else the saved (running) ones.
Tensor bn_prelu_composite(AutogradContext* ctx, const Tensor& y, const variable_list& saved,
                          size_t from) {
  const auto& d = ctx->saved_data;
  const bool training = d.at("training").toBool();
  const Tensor bn = at::batch_norm(y, saved[from], saved[from + 1],
                                   training ? Tensor() : saved[from + 3],
                                   training ? Tensor() : saved[from + 4], training, 0.0,
                                   d.at("eps").toDouble(), /*cudnn_enabled=*/true);
  return at::prelu(bn, saved[from + 2]);
}

// The gradients of out (given its incoming grad) as a graph, for the inputs that need them:
// wanted holds (index in needs_input_grad, position in the returned list, tensor).
variable_list composite_grads(AutogradContext* ctx, const Tensor& out, const Tensor& grad,
                              const std::vector<std::tuple<int64_t, size_t, Tensor>>& wanted,
                              size_t n_args) {
  variable_list result(n_args), inputs;
  std::vector<size_t> where;
  for (const auto& [index, pos, t] : wanted)
    if (ctx->needs_input_grad(index)) {
      inputs.push_back(t);
      where.push_back(pos);
    }
  if (inputs.empty()) return result;
  const auto g = torch::autograd::grad({out}, inputs, {grad}, /*retain_graph=*/true,
                                       /*create_graph=*/true, /*allow_unused=*/true);
  for (size_t k = 0; k < g.size(); ++k) result[where[k]] = g[k];
  return result;
}

struct DwConv3 : torch::autograd::Function<DwConv3> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& w, int64_t dilation) {
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->save_for_backward({x, w});
    ctx->saved_data["dilation"] = dilation;
    return dwconv3(x, w, dilation);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    if (graph_wanted(grads, saved))
      return composite_grads(
          ctx, dwconv3_composite(saved[0], saved[1], ctx->saved_data["dilation"].toInt()),
          grads[0], {{0, 0, saved[0]}, {1, 1, saved[1]}}, 3);
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
    save_bn(ctx, training, eps, 3 + after_running(running_mean), mean, var);
    return {out, mean, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    if (graph_wanted(grads, saved))
      return composite_grads(ctx, bn_prelu_composite(ctx, saved[0], saved, 1), grads[0],
                             {{0, 0, saved[0]}, {1, 1, saved[1]}, {2, 2, saved[2]},
                              {ctx->saved_data["prelu_index"].toInt(), 5, saved[3]}},
                             8);
    auto [gx, gw, gb, ga] =
        bn_backward(ctx, grads[0], saved[0], saved, 1, ctx->needs_input_grad(0), 1);
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
    save_bn(ctx, training, eps, 4 + after_running(running_mean), mean, var);
    return {out, mean, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &conv_weight = saved[1];
    const int64_t dilation = ctx->saved_data["dilation"].toInt();
    if (graph_wanted(grads, saved))
      return composite_grads(
          ctx, bn_prelu_composite(ctx, dwconv3_composite(x, conv_weight, dilation), saved, 2),
          grads[0],
          {{0, 0, x}, {1, 1, conv_weight}, {2, 3, saved[2]}, {3, 4, saved[3]},
           {ctx->saved_data["prelu_index"].toInt(), 7, saved[4]}},
          10);
    const bool need_x = ctx->needs_input_grad(0), need_cw = ctx->needs_input_grad(1);
    const Tensor y = dwconv3(x, conv_weight, dilation);
    auto [gy, gw, gb, ga] = bn_backward(ctx, grads[0], y, saved, 2, need_x || need_cw, 2);
    Tensor gx, gcw;
    if (need_x || need_cw)
      std::tie(gx, gcw) = dwconv3_backward(gy, x, conv_weight, dilation, {need_x, need_cw});
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
