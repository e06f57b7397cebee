// Eval-mode BN-PReLU on folded parameters (y = x*scale + shift, then PReLU), on CPU:
//   cat_bn_prelu: of a channel concatenation, written straight into the output (DABNet's
//     bn_prelu_1/2/3 follow concatenations): one read of each input, one write, and no
//     concatenated intermediate; with add0, xs[0] + add0 in its place (a DAB block's last
//     residual sum, which nothing else reads);
//   affine_prelu_: in place, on a tensor nothing else needs (a conv's fresh output): the write
//     lands on cache lines the read just brought in, where a new output costs a read for
//     ownership too;
//   add_affine_prelu_: y += r in place (DAB's residual), and the BN-PReLU of the sum, in one pass
//     (the next module's first BN-PReLU), where add_ then bn_prelu read the sum twice.
#include <ATen/ops/cat.h>

#include <type_traits>
#include <torch/library.h>

#include "../checks.h"
#include "alloc.h"
#include "isa.h"
#include "loops.h"

namespace dabnet {
namespace cpu {
inline namespace DABNET_CPU_ISA {  // see isa.h

namespace {

// o[j] = PReLU(v * s + t) for j < n, v = x[j], or with RES the sum x[j] + r[j] rounded to T (as
// add_ rounds it: a residual added on the way in). VEC, the parameters of channel j (an NHWC
// pixel's run); otherwise one channel's scalars (an NCHW plane). Restrict pointers, so that GCC
// vectorizes it.
template <bool RES, typename T, typename acc_t>
inline acc_t cat_in(const T* __restrict__ x, const T* __restrict__ r, int64_t j) {
  return RES ? acc_t(T(acc_t(x[j]) + acc_t(r[j]))) : acc_t(x[j]);
}

template <bool VEC, bool RES, typename T, typename acc_t>
inline void bn_prelu_run(T* __restrict__ o, const T* __restrict__ x, const T* __restrict__ r,
                         const acc_t* __restrict__ s, const acc_t* __restrict__ t,
                         const acc_t* __restrict__ a, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const int64_t c = VEC ? j : 0;
    o[j] = T(prelu(cat_in<RES, T, acc_t>(x, r, j) * s[c] + t[c], a[c]));
  }
}

// The same for kNarrow or fewer channels (DABNet's 3-channel input injection) over n pixels: one
// loop over pixels with the channel parameters in registers. Called per pixel, such a run cost
// more than the wide input's whole run (per-run vector/scalar dispatch): 1x(32+3)x256x512 fp32
// channels_last 2.9 -> 1.9 ms.
constexpr int64_t kNarrow = 4;
template <bool RES, typename T, typename acc_t>
void bn_prelu_narrow(T* __restrict__ o, int64_t o_stride, const T* __restrict__ x,
                     const T* __restrict__ r, int64_t Ci, const acc_t* s, const acc_t* t,
                     const acc_t* a, int64_t n) {
  acc_t S[kNarrow] = {}, Tt[kNarrow] = {}, A[kNarrow] = {};
  for (int64_t c = 0; c < Ci; ++c) S[c] = s[c], Tt[c] = t[c], A[c] = a[c];
  for (int64_t q = 0; q < n; ++q)
    for (int64_t c = 0; c < Ci; ++c)
      o[q * o_stride + c] =
          T(prelu(cat_in<RES, T, acc_t>(x, r, q * Ci + c) * S[c] + Tt[c], A[c]));
}

// Input i of the concatenation: its data, and the residual added to it (input 0 only) or null.
template <typename T>
struct CatIn {
  const T* x;
  const T* r;
};

// The in-place forms over one run of n elements (VEC: parameters per element, an NHWC pixel's
// channels; else one channel's scalars): RES, y[j] <- y[j] + r[j] (rounded to T, as add_ rounds)
// and o[j] = PReLU(y[j]*s + t); else y[j] <- PReLU(y[j]*s + t). Three distinct restrict pointers:
// with o aliasing y instead, GCC would guard its vector loop with an overlap test that in-place
// calls always fail.
template <bool VEC, bool RES, typename T, typename acc_t>
inline void affine_prelu_run(T* __restrict__ y, const T* __restrict__ r, T* __restrict__ o,
                             const acc_t* __restrict__ s, const acc_t* __restrict__ t,
                             const acc_t* __restrict__ a, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const int64_t c = VEC ? j : 0;
    // Every store is a T(...) written in place: a named T local (a struct) is copied with a
    // load and a store in one statement, which GCC refuses to vectorize (scalar: 10x slower).
    if (RES) {
      y[j] = T(acc_t(y[j]) + acc_t(r[j]));
      o[j] = T(prelu(affine(acc_t(y[j]), s[c], t[c]), a[c]));  // the sum as stored, rounded
    } else {
      y[j] = T(prelu(affine(acc_t(y[j]), s[c], t[c]), a[c]));
    }
  }
}

// y is updated in place: it must already be dense in one of the two layouts.
bool dense_layout(const at::Tensor& y, const char* name) {
  const bool cl = !y.is_contiguous() && y.is_contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(cl || y.is_contiguous(), "dabnet: ", name, " is updated in place, so it must be "
              "contiguous (NCHW or channels_last), got strides ", y.strides());
  return cl;
}

// The body of affine_prelu_ (r, o undefined) and add_affine_prelu_.
template <bool RES>
void affine_prelu_impl(at::Tensor& y, const at::Tensor& r_, const at::Tensor& o,
                       const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& slope,
                       bool cl) {
  check_vec(scale, y, "scale");
  check_vec(shift, y, "shift");
  check_vec(slope, y, "slope", /*allow_single=*/true);
  if (y.numel() == 0) return;
  const at::Tensor r = RES ? r_.contiguous(fmt(cl)) : r_;
  const int64_t N = y.size(0), C = y.size(1), HW = y.size(2) * y.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "affine_prelu_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto s = to_vec<acc_t>(scale, C), t = to_vec<acc_t>(shift, C), a = to_vec<acc_t>(slope, C);
    scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t* rp = RES ? r.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* op = RES ? o.data_ptr<scalar_t>() : nullptr;
    if (!cl) {
      at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
        for (int64_t p = begin; p < end; ++p) {
          const int64_t c = p % C, off = p * HW;
          affine_prelu_run<false, RES>(yp + off, RES ? rp + off : nullptr, RES ? op + off : nullptr, &s[c], &t[c],
                                       &a[c], HW);
        }
      });
    } else {
      at::parallel_for(0, N * HW, 64, [&](int64_t begin, int64_t end) {
        for (int64_t q = begin; q < end; ++q)
          affine_prelu_run<true, RES>(yp + q * C, RES ? rp + q * C : nullptr, RES ? op + q * C : nullptr,
                                      s.data(), t.data(), a.data(), C);
      });
    }
  });
}

}  // namespace

void affine_prelu_(at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                   const at::Tensor& slope) {
  check_input(x);
  const bool cl = dense_layout(x, "x");
  affine_prelu_impl<false>(x, at::Tensor(), at::Tensor(), scale, shift, slope, cl);
}

at::Tensor add_affine_prelu_(at::Tensor& y, const at::Tensor& r, const at::Tensor& scale,
                             const at::Tensor& shift, const at::Tensor& slope) {
  check_input(y, "y");
  check_input(r, "r");
  check_like(r, y, "r");
  TORCH_CHECK(r.sizes() == y.sizes(), "dabnet: r must have y's shape ", y.sizes(), ", got ",
              r.sizes());
  const bool cl = dense_layout(y, "y");
  TORCH_CHECK(!r.is_same(y), "dabnet: add_affine_prelu_ needs r to be another tensor than y");
  at::Tensor out = empty_out_as(y, cl);
  affine_prelu_impl<true>(y, r, out, scale, shift, slope, cl);
  return out;
}

at::Tensor cat_bn_prelu(at::TensorList xs, const at::Tensor& scale, const at::Tensor& shift,
                        const at::Tensor& slope, const c10::optional<at::Tensor>& add0_) {
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
  const bool res = add0_.has_value() && add0_->defined();
  if (res) {
    check_input(*add0_, "add0");
    check_like(*add0_, xs[0], "add0");
    TORCH_CHECK(add0_->sizes() == xs[0].sizes(), "dabnet: add0 must have xs[0]'s shape ",
                xs[0].sizes(), ", got ", add0_->sizes());
  }
  bool cl;
  const at::Tensor x0 = canonical(xs[0], cl);
  const int64_t N = x0.size(0), H = x0.size(2), W = x0.size(3), HW = H * W;
  at::Tensor out = empty_out({N, Ct, H, W}, x0.options().memory_format(fmt(cl)));
  // Checks the parameter vectors against the concatenated channel count.
  const at::Tensor like = at::empty({1, Ct, 1, 1}, x0.options());
  check_vec(scale, like, "scale");
  check_vec(shift, like, "shift");
  check_vec(slope, like, "slope", /*allow_single=*/true);
  if (out.numel() == 0) return out;
  std::vector<at::Tensor> ins;
  for (const auto& x : xs) ins.push_back(x.contiguous(fmt(cl)));
  const at::Tensor add0 = res ? add0_->contiguous(fmt(cl)) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x0.scalar_type(), "cat_bn_prelu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto s = to_vec<acc_t>(scale, Ct), t = to_vec<acc_t>(shift, Ct), a = to_vec<acc_t>(slope, Ct);
    scalar_t* op = out.data_ptr<scalar_t>();
    // Channel offset, width and data of each input in the concatenation.
    std::vector<int64_t> off(ins.size() + 1, 0);
    std::vector<CatIn<scalar_t>> src(ins.size());
    for (size_t i = 0; i < ins.size(); ++i) {
      off[i + 1] = off[i] + ins[i].size(1);
      src[i] = {ins[i].data_ptr<scalar_t>(), i == 0 && res ? add0.data_ptr<scalar_t>() : nullptr};
    }
    const acc_t *sp = s.data(), *tp = t.data(), *ap = a.data();
    // Run of n elements of input i at element e of its tensor, into o (VEC: channel parameters
    // from channel c on; else channel c's).
    const auto run = [&](auto vec, scalar_t* o, size_t i, int64_t e, int64_t c, int64_t n) {
      const CatIn<scalar_t>& in = src[i];
      if (in.r)
        bn_prelu_run<decltype(vec)::value, true>(o, in.x + e, in.r + e, sp + c, tp + c, ap + c, n);
      else
        bn_prelu_run<decltype(vec)::value, false>(o, in.x + e, (const scalar_t*)nullptr, sp + c,
                                                  tp + c, ap + c, n);
    };
    if (!cl) {
      // Output plane p = n*Ct + c comes from input i's plane n*Ci + (c - off[i]).
      at::parallel_for(0, N * Ct, 1, [&](int64_t begin, int64_t end) {
        for (int64_t p = begin; p < end; ++p) {
          const int64_t n = p / Ct, c = p % Ct;
          const size_t i = std::upper_bound(off.begin(), off.end(), c) - off.begin() - 1;
          const int64_t Ci = off[i + 1] - off[i];
          run(std::false_type{}, op + p * HW, i, (n * Ci + c - off[i]) * HW, c, HW);
        }
      });
    } else {
      // Pixel by pixel: each input's channels are one run of the output pixel's Ct; inputs of
      // few channels take a whole block of pixels at a time.
      at::parallel_for(0, N * HW, 64, [&](int64_t begin, int64_t end) {
        for (size_t i = 0; i < src.size(); ++i) {
          const int64_t o0 = off[i], Ci = off[i + 1] - o0;
          if (Ci > kNarrow) continue;
          scalar_t* o = op + begin * Ct + o0;
          const scalar_t* x = src[i].x + begin * Ci;
          if (src[i].r)
            bn_prelu_narrow<true>(o, Ct, x, src[i].r + begin * Ci, Ci, sp + o0, tp + o0, ap + o0,
                                  end - begin);
          else
            bn_prelu_narrow<false>(o, Ct, x, (const scalar_t*)nullptr, Ci, sp + o0, tp + o0,
                                   ap + o0, end - begin);
        }
        for (int64_t q = begin; q < end; ++q)
          for (size_t i = 0; i < src.size(); ++i) {
            const int64_t o0 = off[i], Ci = off[i + 1] - o0;
            if (Ci > kNarrow) run(std::true_type{}, op + q * Ct + o0, i, q * Ci, o0, Ci);
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
DABNET_CPU_DECLARE(affine_prelu_)
DABNET_CPU_DECLARE(add_affine_prelu_)

TORCH_LIBRARY_IMPL(dabnet, CPU, m) {
  m.impl("cat_bn_prelu", DABNET_CPU_KERNEL(cat_bn_prelu));
  m.impl("affine_prelu_", DABNET_CPU_KERNEL(affine_prelu_));
  m.impl("add_affine_prelu_", DABNET_CPU_KERNEL(add_affine_prelu_));
}
#endif
