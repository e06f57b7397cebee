// cat_bn_prelu on CPU: eval-mode BN-PReLU of a channel concatenation, written straight into the
// output (DABNet's bn_prelu_1/2/3 follow concatenations): one read of each input, one write, and
// no concatenated intermediate.
#include <ATen/ops/cat.h>
#include <torch/library.h>

#include "../checks.h"
#include "isa.h"
#include "loops.h"

namespace dabnet {
namespace cpu {
inline namespace DABNET_CPU_ISA {  // see isa.h

at::Tensor cat_bn_prelu(at::TensorList xs, const at::Tensor& scale, const at::Tensor& shift,
                        const at::Tensor& slope) {
  TORCH_CHECK(!xs.empty(), "dabnet: cat_bn_prelu needs at least one input");
  int64_t Ct = 0;
  for (size_t i = 0; i < xs.size(); ++i) {
    check_input(xs[i], "xs[i]");
    check_like(xs[i], xs[0], "xs[i]");
    TORCH_CHECK(xs[i].size(0) == xs[0].size(0) && xs[i].size(2) == xs[0].size(2) &&
                    xs[i].size(3) == xs[0].size(3),
                "dabnet: cat_bn_prelu inputs must agree in N, H and W, got ", xs[0].sizes(),
                " and ", xs[i].sizes());
    Ct += xs[i].size(1);
  }
  bool cl;
  const at::Tensor x0 = canonical(xs[0], cl);
  const int64_t N = x0.size(0), H = x0.size(2), W = x0.size(3), HW = H * W;
  at::Tensor out = at::empty({N, Ct, H, W}, x0.options().memory_format(fmt(cl)));
  // Checks the parameter vectors against the concatenated channel count.
  const at::Tensor like = at::empty({1, Ct, 1, 1}, x0.options());
  check_vec(scale, like, "scale");
  check_vec(shift, like, "shift");
  check_vec(slope, like, "slope", /*allow_single=*/true);
  if (out.numel() == 0) return out;
  std::vector<at::Tensor> ins;
  for (const auto& x : xs) ins.push_back(x.contiguous(fmt(cl)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x0.scalar_type(), "cat_bn_prelu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto s = to_vec<acc_t>(scale, Ct), t = to_vec<acc_t>(shift, Ct), a = to_vec<acc_t>(slope, Ct);
    scalar_t* op = out.data_ptr<scalar_t>();
    // Channel offset and width of each input in the concatenation.
    std::vector<int64_t> off(ins.size() + 1, 0);
    for (size_t i = 0; i < ins.size(); ++i) off[i + 1] = off[i] + ins[i].size(1);
    auto run = [&](scalar_t* o, const scalar_t* x, int64_t n, int64_t c0, bool vec) {
      for (int64_t j = 0; j < n; ++j) {
        const int64_t c = vec ? c0 + j : c0;
        o[j] = scalar_t(prelu(acc_t(x[j]) * s[c] + t[c], a[c]));
      }
    };
    if (!cl) {
      // Output plane p = n*Ct + c comes from input i's plane n*Ci + (c - off[i]).
      at::parallel_for(0, N * Ct, 1, [&](int64_t begin, int64_t end) {
        for (int64_t p = begin; p < end; ++p) {
          const int64_t n = p / Ct, c = p % Ct;
          const size_t i = std::upper_bound(off.begin(), off.end(), c) - off.begin() - 1;
          const int64_t Ci = off[i + 1] - off[i];
          run(op + p * HW, ins[i].data_ptr<scalar_t>() + (n * Ci + c - off[i]) * HW, HW, c, false);
        }
      });
    } else {
      at::parallel_for(0, N * HW, 64, [&](int64_t begin, int64_t end) {
        for (int64_t q = begin; q < end; ++q)
          for (size_t i = 0; i < ins.size(); ++i) {
            const int64_t Ci = off[i + 1] - off[i];
            run(op + q * Ct + off[i], ins[i].data_ptr<scalar_t>() + q * Ci, Ci, off[i], true);
          }
      });
    }
  });
  return out;
}

}  // namespace DABNET_CPU_ISA
}  // namespace cpu
}  // namespace dabnet

// Registered once, from the baseline build (isa.h).
#ifndef DABNET_CPU_VARIANT
DABNET_CPU_DECLARE(cat_bn_prelu)

TORCH_LIBRARY_IMPL(dabnet, CPU, m) {
  m.impl("cat_bn_prelu", DABNET_CPU_KERNEL(cat_bn_prelu));
}
#endif
