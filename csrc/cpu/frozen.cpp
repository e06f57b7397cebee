// The frozen DABNet's forward (dabnet/frozen.py) as one op: the same calls in the same order as
// FrozenDABNet._forward_py, made from C++. Between two ops the Python version spent 15-36 us on
// the interpreter coming back from each convolution with cold caches, 0.5 ms a forward at
// 256x512 (2-3% of it); here the glue is a few branches. Compiled once (not per ISA): it only
// calls the dispatcher, which runs the kernels picked at load time.
//
// params, in this order (tensors of the frozen model, built by FrozenDABNet._plan):
//   per initial conv i:  weight, scale, shift, slope  (its BN-PReLU; the last one's is pre0 of
//                        the first concatenation)
//   bn_prelu_1..3:       scale, shift, slope each
//   downsample_1, _2:    weight, scale, shift, slope each
//   per DAB module (block 1's, then block 2's): bn_relu_1 scale, shift, slope; conv3x3 weight;
//                        its BN-PReLU scale, shift, slope; the neck's 6 folded tensors; conv1x1
//                        weight
//   classifier weight.
// plan: [n_init, n_block1, n_block2, widen1, widen2, the n_init initial strides, the modules'
// dilations]. A weight that is an MKLDNN (packed) tensor runs through oneDNN's
// _convolution_pointwise, any other through at::conv2d: "same" padding, stride 1 but where given.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <ATen/ops/conv2d.h>
#include <torch/library.h>

#include <optional>
#include <vector>

namespace dabnet {
namespace cpu {

namespace {

constexpr int64_t kModuleTensors = 14, kHead = 5;

template <typename Sig>
c10::TypedOperatorHandle<Sig> dabnet_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

at::Tensor conv(const at::Tensor& x, const at::Tensor& w, int64_t stride) {
  const int64_t p = w.size(-1) / 2;
  if (!w.is_mkldnn()) return at::conv2d(x, w, {}, {stride, stride}, {p, p});
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_convolution_pointwise", "");
  torch::jit::Stack s{x, w, c10::IValue(), std::vector<int64_t>{p, p},
                      std::vector<int64_t>{stride, stride}, std::vector<int64_t>{1, 1},
                      int64_t(1), "none", c10::List<std::optional<c10::Scalar>>(), c10::IValue()};
  op.callBoxed(&s);
  return s[0].toTensor();
}

struct Ops {
  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&)> pool =
      dabnet_op<at::Tensor(const at::Tensor&)>("dabnet::avg_pool3x3s2");
  c10::TypedOperatorHandle<void(at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const at::Tensor&)>
      affine = dabnet_op<void(at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const at::Tensor&)>("dabnet::affine_prelu_");
  c10::TypedOperatorHandle<at::Tensor(at::Tensor&, const at::Tensor&, const at::Tensor&,
                                      const at::Tensor&, const at::Tensor&)>
      add_affine = dabnet_op<at::Tensor(at::Tensor&, const at::Tensor&, const at::Tensor&,
                                        const at::Tensor&, const at::Tensor&)>(
          "dabnet::add_affine_prelu_");
  using CatSig = at::Tensor(at::TensorList, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, const std::optional<at::Tensor>&,
                            const std::optional<at::TensorList>&, bool);
  c10::TypedOperatorHandle<CatSig> cat = dabnet_op<CatSig>("dabnet::cat_bn_prelu");
  using NeckSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&, int64_t);
  c10::TypedOperatorHandle<NeckSig> neck = dabnet_op<NeckSig>("dabnet::dab_neck");
  using UpSig = at::Tensor(const at::Tensor&, int64_t, int64_t);
  c10::TypedOperatorHandle<UpSig> up = dabnet_op<UpSig>("dabnet::upsample_bilinear");
  c10::TypedOperatorHandle<UpSig> argmax = dabnet_op<UpSig>("dabnet::upsample_argmax");
};

const Ops& ops() {
  static const Ops o;
  return o;
}

// The modules of one DAB block from params[base] on: (y, r) with y + r the block's output (the
// last module's sum is left to the concatenation that reads it), or (x, undefined) for none.
std::pair<at::Tensor, at::Tensor> block(at::Tensor x, at::TensorList p, int64_t base, int64_t n,
                                        at::IntArrayRef dilations) {
  if (n == 0) return {x, at::Tensor()};
  const Ops& o = ops();
  at::Tensor z = o.cat.call({x}, p[base], p[base + 1], p[base + 2], std::nullopt, std::nullopt,
                            false);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t m = base + kModuleTensors * i;
    at::Tensor y = conv(z, p[m + 3], 1);
    o.affine.call(y, p[m + 4], p[m + 5], p[m + 6]);
    y = conv(o.neck.call(y, p[m + 7], p[m + 8], p[m + 9], p[m + 10], p[m + 11], p[m + 12],
                         dilations[i]),
             p[m + 13], 1);
    if (i + 1 == n) return {y, x};
    const int64_t next = m + kModuleTensors;
    z = o.add_affine.call(y, x, p[next], p[next + 1], p[next + 2]);
    x = y;
  }
  return {x, at::Tensor()};  // not reached
}

// downsample_i: the conv, then its BN-PReLU; widening, [conv, 2x2 max-pool of x] concatenated.
at::Tensor down(const at::Tensor& x, at::TensorList p, int64_t base, bool widen) {
  at::Tensor y = conv(x, p[base], 2);
  if (widen) {
    return ops().cat.call({y, x}, p[base + 1], p[base + 2], p[base + 3], std::nullopt,
                          std::nullopt, true);
  }
  ops().affine.call(y, p[base + 1], p[base + 2], p[base + 3]);
  return y;
}

std::optional<at::Tensor> opt(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

}  // namespace

at::Tensor frozen_forward(const at::Tensor& x, at::TensorList p, at::IntArrayRef plan,
                          bool labels) {
  TORCH_CHECK(plan.size() >= kHead, "dabnet: frozen_forward's plan needs at least ", kHead,
              " entries, got ", plan.size());
  const int64_t n_init = plan[0], n1 = plan[1], n2 = plan[2];
  TORCH_CHECK(n_init >= 1 && n1 >= 0 && n2 >= 0, "dabnet: frozen_forward's plan has ", n_init,
              " initial convs and ", n1, " + ", n2, " modules");
  TORCH_CHECK(int64_t(plan.size()) == kHead + n_init + n1 + n2, "dabnet: frozen_forward's plan "
              "has ", plan.size(), " entries, expected ", kHead + n_init + n1 + n2);
  const int64_t want = 4 * n_init + 9 + 8 + kModuleTensors * (n1 + n2) + 1;
  TORCH_CHECK(int64_t(p.size()) == want, "dabnet: frozen_forward expects ", want,
              " tensors for this plan, got ", p.size());
  TORCH_CHECK(x.dim() == 4 && x.device().is_cpu(), "dabnet: frozen_forward runs an (N, C, H, W) "
              "CPU tensor, got ", x.sizes(), " on ", x.device());
  const at::IntArrayRef strides = plan.slice(kHead, n_init);
  const at::IntArrayRef dil = plan.slice(kHead + n_init);
  const Ops& o = ops();

  const at::Tensor inj1 = o.pool.call(x), inj2 = o.pool.call(inj1), inj3 = o.pool.call(inj2);
  at::Tensor y = x;
  for (int64_t i = 0; i < n_init; ++i) {
    y = conv(y, p[4 * i], strides[i]);
    if (i + 1 < n_init) o.affine.call(y, p[4 * i + 1], p[4 * i + 2], p[4 * i + 3]);
  }
  const int64_t last = 4 * (n_init - 1), bn = 4 * n_init, dn = bn + 9, mods = dn + 8;
  const std::vector<at::Tensor> pre0{p[last + 1], p[last + 2], p[last + 3]};
  // the last initial conv's BN-PReLU applied on the way into the concatenation (pre0)
  const at::Tensor b1_in =
      down(o.cat.call({y, inj1}, p[bn], p[bn + 1], p[bn + 2], std::nullopt, at::TensorList(pre0),
                      false),
           p, dn, plan[3] != 0);
  const auto [b1_out, r1] = block(b1_in, p, mods, n1, dil.slice(0, n1));
  const at::Tensor b2_in = down(
      o.cat.call({b1_out, b1_in, inj2}, p[bn + 3], p[bn + 4], p[bn + 5], opt(r1), std::nullopt,
                 false),
      p, dn + 4, plan[4] != 0);
  const auto [b2_out, r2] = block(b2_in, p, mods + kModuleTensors * n1, n2, dil.slice(n1));
  const at::Tensor out = conv(o.cat.call({b2_out, b2_in, inj3}, p[bn + 6], p[bn + 7], p[bn + 8],
                                         opt(r2), std::nullopt, false),
                              p[p.size() - 1], 1);
  return (labels ? o.argmax : o.up).call(out, x.size(2), x.size(3));
}

}  // namespace cpu
}  // namespace dabnet

TORCH_LIBRARY_IMPL(dabnet, CPU, m) { m.impl("frozen_forward", &dabnet::cpu::frozen_forward); }
// Packed weights are MKLDNN tensors, whose dispatch key outranks CPU's.
TORCH_LIBRARY_IMPL(dabnet, MkldnnCPU, m) {
  m.impl("frozen_forward", &dabnet::cpu::frozen_forward);
}
