// Memory-format rules shared by the CPU and CUDA kernels: every kernel reads its input as NCHW- or
// channels_last-contiguous and writes its output in that same format.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

namespace dabnet {

inline at::MemoryFormat fmt(bool cl) {
  return cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// x as NCHW-contiguous or channels_last-contiguous; copies only when it is neither (and then
// to NCHW). The Python fake kernels (dabnet_kernels/ops.py, _out_format) mirror this rule.
inline at::Tensor canonical(const at::Tensor& x, bool& cl) {
  cl = !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  return cl ? x : x.contiguous();
}

inline at::Tensor empty_as(const at::Tensor& x, bool cl) {
  return at::empty(x.sizes(), x.options().memory_format(fmt(cl)));
}

// Statistics dtype: float64 for float64 input, float32 otherwise (as ATen's batch_norm).
inline at::ScalarType stat_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace dabnet
