// CPU output tensors. Compiled once (alloc.cpp), for every ISA build of the kernels.
#pragma once
#include <ATen/core/Tensor.h>

#include "../layout.h"

namespace dabnet {
namespace cpu {

// at::empty(sizes, options) on CPU, except that a tensor of 32 MiB or more is backed by 2 MiB
// transparent huge pages (see alloc.cpp). Same sizes, strides, dtype and memory format.
at::Tensor empty_out(at::IntArrayRef sizes, const at::TensorOptions& options);

// Frees the blocks that empty_out keeps for reuse (see alloc.cpp); returns their bytes.
int64_t release_cached_blocks();

// empty_as (layout.h) through empty_out: an output shaped like x, in x's format.
inline at::Tensor empty_out_as(const at::Tensor& x, bool cl) {
  return empty_out(x.sizes(), x.options().memory_format(fmt(cl)));
}

}  // namespace cpu
}  // namespace dabnet
