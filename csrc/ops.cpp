// Every dabnet:: schema, defined once. Per-device kernels live in cpu/<op>.cpp and cuda/<op>.cu;
// autograd kernels in autograd.cpp; fake (meta) kernels are registered from Python
// (dabnet_kernels/ops.py).
#include <Python.h>
#include <torch/library.h>

#include <string>

namespace dabnet {
namespace cpu {
std::string isa_name();            // cpu/isa.cpp
int64_t release_cached_blocks();  // cpu/alloc.cpp
bool set_bf16_store(bool on);      // cpu/isa.cpp
}  // namespace cpu
}  // namespace dabnet

// A Python module named _C that does nothing but load this library (and with it the registrations).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(dabnet, m) {
  // Depthwise 3-tap conv, "same" zero padding, stride 1, no bias. weight (C,1,3,1) runs along H,
  // (C,1,1,3) along W.
  m.def("dwconv3(Tensor x, Tensor weight, int dilation) -> Tensor");
  m.def(
      "dwconv3_backward(Tensor grad_out, Tensor x, Tensor weight, int dilation, bool[2] output_mask)"
      " -> (Tensor grad_x, Tensor grad_weight)");
  // BatchNorm2d + PReLU. Returns (out, mean, var): in training the batch mean and biased variance
  // (the caller updates running statistics from them), in eval copies of the running statistics.
  // Statistics are float32 (float64 for float64 input).
  m.def(
      "bn_prelu(Tensor x, Tensor weight, Tensor bias, Tensor? running_mean, Tensor? running_var,"
      " Tensor prelu_weight, bool training, float eps) -> (Tensor out, Tensor mean, Tensor var)");
  // Recomputes the BN output from x: nothing but the statistics is saved in forward.
  m.def(
      "bn_prelu_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor bias, Tensor prelu_weight,"
      " Tensor mean, Tensor var, bool training, float eps, bool[4] output_mask)"
      " -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias, Tensor grad_prelu)");
  // dwconv3 then bn_prelu. Eval mode: one pass over memory.
  m.def(
      "dwconv3_bn_prelu(Tensor x, Tensor conv_weight, int dilation, Tensor weight, Tensor bias,"
      " Tensor? running_mean, Tensor? running_var, Tensor prelu_weight, bool training, float eps)"
      " -> (Tensor out, Tensor mean, Tensor var)");
  // Eval-mode DAB neck on BN-folded parameters:
  //   weight (4,C,3), bias (4,C), slope (4,C) for [3x1, 1x3, dilated 3x1, dilated 1x3],
  //   out_scale/out_shift/out_slope (C) for the final BN-PReLU of the branch sum.
  m.def(
      "dab_neck(Tensor x, Tensor weight, Tensor bias, Tensor slope, Tensor out_scale,"
      " Tensor out_shift, Tensor out_slope, int dilation) -> Tensor");
  // Eval-mode BN-PReLU (folded: y = x*scale + shift, then PReLU) of torch.cat(xs, 1), without the
  // concatenated intermediate.
  // With add0, xs[0] + add0 (rounded as add_ rounds) takes xs[0]'s place. With pre0 =
  // [scale, shift, slope], xs[0] (after add0) goes through its own BN-PReLU first, rounded to its
  // dtype (a conv's output whose BN-PReLU was not applied yet). With pool_last, the last input is
  // max-pooled 2x2, stride 2 (floor) on the way in (DABNet's downsampling block).
  m.def("cat_bn_prelu(Tensor[] xs, Tensor scale, Tensor shift, Tensor slope, Tensor? add0=None,"
        " Tensor[]? pre0=None, bool pool_last=False) -> Tensor");
  // The same on one tensor, in place: x = PReLU(x*scale + shift) (a fresh conv output).
  m.def("affine_prelu_(Tensor(a!) x, Tensor scale, Tensor shift, Tensor slope) -> ()");
  // y += r in place (a residual add), and returns PReLU(y*scale + shift) of the sum.
  m.def("add_affine_prelu_(Tensor(a!) y, Tensor r, Tensor scale, Tensor shift, Tensor slope)"
        " -> Tensor");
  // Bilinear upsampling, align_corners=False, as F.interpolate (DABNet's final x8 upsampling).
  m.def("upsample_bilinear(Tensor x, int out_h, int out_w) -> Tensor");
  // Labels of the bilinear (align_corners=False) upsampling of logits to (out_h, out_w): argmax
  // over classes without materializing the upsampled logits. Returns int64 (N, out_h, out_w).
  m.def("upsample_argmax(Tensor logits, int out_h, int out_w) -> Tensor");
  // F.avg_pool2d(x, 3, stride=2, padding=1), padding counted, floor: DABNet's input-injection pool
  // (CPU; ops.avg_pool3x3s2 routes other devices and gradients to ATen).
  m.def("avg_pool3x3s2(Tensor x) -> Tensor");
  // The frozen DABNet's inference forward (dabnet/frozen.py, CPU): the ops above in DABNet's
  // order on its folded parameters; logits, or with labels upsample_argmax's labels. params and
  // plan: see csrc/cpu/frozen.cpp.
  m.def("frozen_forward(Tensor x, Tensor[] params, int[] plan, bool labels) -> Tensor");
  // The instruction set the CPU kernels were picked for at load time: "avx2", "avx2+avx512bf16"
  // (bf16 outputs stored through AVX512_BF16, as set_cpu_bf16_store leaves it now) or "base".
  m.def("cpu_isa() -> str", &dabnet::cpu::isa_name);
  // AVX512_BF16 stores of bf16 outputs (csrc/cpu/bf16_store.cpp) off (0) or on (1) where the CPU
  // has them; returns the previous setting. For tests and A/B timings.
  m.def("set_cpu_bf16_store(bool on) -> bool", &dabnet::cpu::set_bf16_store);
  // Frees the large CPU output blocks kept for reuse; returns their bytes.
  m.def("empty_cpu_cache() -> int", &dabnet::cpu::release_cached_blocks);
}
