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
#include <ATen/ops/add.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/maximum.h>

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

// d[j] = PReLU(v * s + t) in acc_t for j < n, v = x[j], or with RES the sum x[j] + r[j] rounded to T (as
// add_ rounds it: a residual added on the way in). VEC, the parameters of channel j (an NHWC
// pixel's run); otherwise one channel's scalars (an NCHW plane). Restrict pointers, so that GCC
// vectorizes it.
template <bool RES, typename T, typename acc_t>
inline acc_t cat_in(const T* __restrict__ x, const T* __restrict__ r, int64_t j) {
  return RES ? acc_t(T(acc_t(x[j]) + acc_t(r[j]))) : acc_t(x[j]);
}

template <bool VEC, bool RES, typename T, typename acc_t>
inline void bn_prelu_acc(acc_t* __restrict__ d, const T* __restrict__ x, const T* __restrict__ r,
                         const acc_t* __restrict__ s, const acc_t* __restrict__ t,
                         const acc_t* __restrict__ a, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const int64_t c = VEC ? j : 0;
    d[j] = prelu(cat_in<RES, T, acc_t>(x, r, j) * s[c] + t[c], a[c]);
  }
}

// The same stored into o, in T (staged_run: a bf16 output goes through store_run).
template <bool VEC, bool RES, typename T, typename acc_t>
inline void bn_prelu_run(T* o, const T* x, const T* r, const acc_t* s, const acc_t* t,
                         const acc_t* a, int64_t n) {
  staged_run<T, acc_t>(o, n, [&](acc_t* d, int64_t i0, int64_t m) {
    const int64_t c = VEC ? i0 : 0;
    bn_prelu_acc<VEC, RES>(d, x + i0, RES ? r + i0 : r, s + c, t + c, a + c, m);
  });
}

// Inputs of kNarrow or fewer channels (DABNet's 3-channel input injection) are computed for a
// block's pixels as one run (parameters tiled) and then copied into place: per pixel, a run of 3
// cost about as much as the wide inputs' whole runs (1x(64+64+3)x128x256: 1.8x the time of 64+64).
constexpr int64_t kNarrow = 4;

// xs[0]'s values under pre0: its own BN-PReLU, rounded to T as affine_prelu_ stores it (the
// unfused sequence: a conv's output, affine_prelu_ in place, then the concatenation), over a run
// of n elements whose parameters are tiled per pixel.
template <bool RES, typename T, typename acc_t>
inline void pre_values(acc_t* __restrict__ v, const T* __restrict__ x, const T* __restrict__ r,
                       const acc_t* __restrict__ s, const acc_t* __restrict__ t,
                       const acc_t* __restrict__ a, int64_t n) {
  for (int64_t j = 0; j < n; ++j)
    v[j] = acc_t(T(prelu(affine(cat_in<RES, T, acc_t>(x, r, j), s[j], t[j]), a[j])));
}

// max(a, b) as torch.maximum: NaN if either is. Two selects that GCC vectorizes (a max, then a
// blend on a's NaN test); one expression with both tests became scalar branches per element
// (9 ms instead of 0.5 for DABNet's 35 pooled channels at 256x512).
template <typename acc_t>
inline acc_t max_nan(acc_t a, acc_t b) {
  const acc_t m = a > b ? a : b;  // b where either is NaN
  return a != a ? a : m;
}

// The pooled input at one output pixel, BN-PReLU'd into d: the max of its 2x2 window (pixels w00,
// w01 of one row, w10, w11 of the next), Ci channels. The max is a value of T: nothing to round.
template <typename T, typename acc_t>
inline void pool_bn_prelu_acc(acc_t* __restrict__ d, const T* __restrict__ w00,
                              const T* __restrict__ w01, const T* __restrict__ w10,
                              const T* __restrict__ w11, const acc_t* __restrict__ s,
                              const acc_t* __restrict__ t, const acc_t* __restrict__ a,
                              int64_t Ci) {
  for (int64_t c = 0; c < Ci; ++c) {
    const acc_t v =
        max_nan(max_nan(acc_t(w00[c]), acc_t(w01[c])), max_nan(acc_t(w10[c]), acc_t(w11[c])));
    d[c] = prelu(v * s[c] + t[c], a[c]);
  }
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
  if constexpr (std::is_same_v<T, acc_t>) {
    for (int64_t j = 0; j < n; ++j) {
      const int64_t c = VEC ? j : 0;
      if (RES) {
        y[j] = y[j] + r[j];
        o[j] = prelu(affine(y[j], s[c], t[c]), a[c]);
      } else {
        y[j] = prelu(affine(y[j], s[c], t[c]), a[c]);
      }
    }
  } else {  // through an acc_t buffer and store_run (see staged_run)
    alignas(64) acc_t buf[kStage];
    for (int64_t i0 = 0; i0 < n; i0 += kStage) {
      const int64_t m = std::min(kStage, n - i0), c0 = VEC ? i0 : 0;
      T* __restrict__ yi = y + i0;
      if (RES) {  // the sum, stored (rounded as add_ rounds it) before the BN-PReLU reads it
        for (int64_t j = 0; j < m; ++j) buf[j] = acc_t(yi[j]) + acc_t(r[i0 + j]);
        store_run(yi, buf, m);
      }
      for (int64_t j = 0; j < m; ++j) {
        const int64_t c = c0 + (VEC ? j : 0);
        buf[j] = prelu(affine(acc_t(yi[j]), s[c], t[c]), a[c]);
      }
      store_run(RES ? o + i0 : yi, buf, m);
    }
  }
}

// Channels_last: blocks of whole pixels, about kStage elements each, so that a bf16 block is stored
// in one store_run and a dense single input is one run, its channel parameters repeated along it
// (tiled), instead of a vector loop's setup and tail per pixel of C = 32..128 elements.
inline int64_t tile_pixels(int64_t C) { return std::max<int64_t>(1, kStage / C); }

template <typename acc_t>
std::vector<acc_t> tiled(const std::vector<acc_t>& v, int64_t reps) {
  std::vector<acc_t> out;
  out.reserve(v.size() * reps);
  for (int64_t i = 0; i < reps; ++i) out.insert(out.end(), v.begin(), v.end());
  return out;
}

// f(q, n) for consecutive blocks of n <= reps pixels starting at pixel q, in parallel.
template <typename F>
void pixel_tiles(int64_t P, int64_t reps, const F& f) {
  at::parallel_for(0, P, std::max<int64_t>(64, reps), [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; q += reps) f(q, std::min(reps, end - q));
  });
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
      const int64_t reps = tile_pixels(C);
      const auto S = tiled(s, reps), T = tiled(t, reps), A = tiled(a, reps);
      pixel_tiles(N * HW, reps, [&](int64_t q, int64_t n) {
        affine_prelu_run<true, RES>(yp + q * C, RES ? rp + q * C : nullptr,
                                    RES ? op + q * C : nullptr, S.data(), T.data(), A.data(), n * C);
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
                        const at::Tensor& slope, const c10::optional<at::Tensor>& add0_,
                        const c10::optional<at::TensorList>& pre0_, bool pool_last) {
  TORCH_CHECK(!xs.empty(), "dabnet: cat_bn_prelu needs at least one input");
  TORCH_CHECK(!pool_last || xs.size() >= 2, "dabnet: cat_bn_prelu's pool_last pools the last of ",
              "at least two inputs, got ", xs.size());
  const size_t last = xs.size() - 1;
  int64_t Ct = 0;
  for (size_t i = 0; i < xs.size(); ++i) {
    check_input(xs[i], "xs[i]");
    check_like(xs[i], xs[0], "xs[i]");
    const bool pooled = pool_last && i == last;  // 2x2 windows, stride 2, floor
    const int64_t H = xs[i].size(2) / (pooled ? 2 : 1), W = xs[i].size(3) / (pooled ? 2 : 1);
    TORCH_CHECK(xs[i].size(0) == xs[0].size(0) && H == xs[0].size(2) && W == xs[0].size(3),
                "dabnet: cat_bn_prelu inputs must agree in N, H and W", pooled ? " (the last one "
                "after its 2x2 max-pool)" : "", ", got ", xs[0].sizes(), " and ", xs[i].sizes());
    Ct += xs[i].size(1);
  }
  const bool res = add0_.has_value() && add0_->defined();
  if (res) {
    check_input(*add0_, "add0");
    check_like(*add0_, xs[0], "add0");
    TORCH_CHECK(add0_->sizes() == xs[0].sizes(), "dabnet: add0 must have xs[0]'s shape ",
                xs[0].sizes(), ", got ", add0_->sizes());
  }
  const bool pre = pre0_.has_value();
  if (pre) {
    TORCH_CHECK(pre0_->size() == 3, "dabnet: pre0 must be [scale, shift, slope] of xs[0]'s own "
                "BN-PReLU, got ", pre0_->size(), " tensors");
    const at::Tensor like0 = at::empty({1, xs[0].size(1), 1, 1}, xs[0].options());
    check_vec((*pre0_)[0], like0, "pre0 scale");
    check_vec((*pre0_)[1], like0, "pre0 shift");
    check_vec((*pre0_)[2], like0, "pre0 slope", /*allow_single=*/true);
  }
  bool cl;
  const at::Tensor x0 = canonical(xs[0], cl);
  const int64_t N = x0.size(0), H = x0.size(2), W = x0.size(3), HW = H * W;
  // Checks the parameter vectors against the concatenated channel count.
  const at::Tensor like = at::empty({1, Ct, 1, 1}, x0.options());
  check_vec(scale, like, "scale");
  check_vec(shift, like, "shift");
  check_vec(slope, like, "slope", /*allow_single=*/true);
  if (!cl && (pre || pool_last)) {
    // NCHW (the slower layout on CPU, kept for comparison): xs[0]'s own BN-PReLU and the pool
    // as separate passes, then the plain concatenation.
    std::vector<at::Tensor> ys(xs.begin(), xs.end());
    if (pre) {
      ys[0] = (res ? at::add(xs[0], *add0_) : xs[0]).contiguous().clone();
      affine_prelu_impl<false>(ys[0], at::Tensor(), at::Tensor(), (*pre0_)[0], (*pre0_)[1],
                               (*pre0_)[2], false);
    }
    if (pool_last) {
      const at::Tensor v = xs[last].slice(2, 0, 2 * H).slice(3, 0, 2 * W);
      const auto win = [&](int64_t dy, int64_t dx) {
        return v.slice(2, dy, 2 * H, 2).slice(3, dx, 2 * W, 2);
      };
      ys[last] = at::maximum(at::maximum(win(0, 0), win(0, 1)), at::maximum(win(1, 0), win(1, 1)));
    }
    return cat_bn_prelu(ys, scale, shift, slope, pre ? c10::nullopt : add0_, c10::nullopt, false);
  }
  at::Tensor out = empty_out({N, Ct, H, W}, x0.options().memory_format(fmt(cl)));
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
      return;
    }
    // channels_last: blocks of whole output pixels (tile_pixels), each computed in acc_t
    // straight into the output, or for a narrower type into a buffer stored at once
    // (store_run). One plain input: the block is one run, its parameters repeated per pixel
    // (tiled). Several: a run per input and pixel (the pooled input's from its 2x2 window),
    // except that the values of an input of few channels (kNarrow) and of xs[0] under pre0 are
    // first made for the whole block in v (n * Ci) and read from there.
    const int64_t reps = tile_pixels(Ct);
    const auto S = tiled(s, reps), T = tiled(t, reps), A = tiled(a, reps);
    const auto slice = [&](const std::vector<acc_t>& v, int64_t c0, int64_t c1) {
      return tiled(std::vector<acc_t>(v.begin() + c0, v.begin() + c1), reps);
    };
    std::vector<std::array<std::vector<acc_t>, 3>> narrow(src.size());
    for (size_t i = 0; i < src.size(); ++i)
      if (off[i + 1] - off[i] <= kNarrow)
        narrow[i] = {slice(s, off[i], off[i + 1]), slice(t, off[i], off[i + 1]),
                     slice(a, off[i], off[i + 1])};
    std::array<std::vector<acc_t>, 3> pp;  // pre0, tiled
    if (pre) {
      const int64_t C0 = off[1];
      for (int k = 0; k < 3; ++k) pp[k] = tiled(to_vec<acc_t>((*pre0_)[k], C0), reps);
    }
    const int64_t Hi = pool_last ? ins[last].size(2) : 0, Wi = pool_last ? ins[last].size(3) : 0;
    const scalar_t* none = nullptr;
    const auto block = [&](acc_t* d, acc_t* v, int64_t q, int64_t n) {
      if (src.size() == 1 && !pre) {
        const scalar_t* x = src[0].x + q * Ct;
        if (src[0].r)
          bn_prelu_acc<true, true>(d, x, src[0].r + q * Ct, S.data(), T.data(), A.data(), n * Ct);
        else
          bn_prelu_acc<true, false>(d, x, none, S.data(), T.data(), A.data(), n * Ct);
        return;
      }
      for (size_t i = 0; i < src.size(); ++i) {
        const int64_t o0 = off[i], Ci = off[i + 1] - o0;
        const scalar_t* x = src[i].x + q * Ci;
        const scalar_t* r = src[i].r ? src[i].r + q * Ci : nullptr;
        const acc_t *si = sp + o0, *ti = tp + o0, *ai = ap + o0;
        if (pool_last && i == last) {
          // pixel q's window, then the next pixel's: the coordinates advance without a division
          int64_t img = q / HW, h = q % HW / W, w = q % W;
          for (int64_t p = 0; p < n; ++p) {
            const scalar_t* w00 = src[i].x + ((img * Hi + 2 * h) * Wi + 2 * w) * Ci;
            pool_bn_prelu_acc(d + p * Ct + o0, w00, w00 + Ci, w00 + Wi * Ci, w00 + Wi * Ci + Ci,
                              si, ti, ai, Ci);
            if (++w == W) w = 0, h = h + 1 == H ? (++img, 0) : h + 1;
          }
          continue;
        }
        if (Ci > kNarrow && !(pre && i == 0)) {
          if (r)
            for (int64_t p = 0; p < n; ++p)
              bn_prelu_acc<true, true>(d + p * Ct + o0, x + p * Ci, r + p * Ci, si, ti, ai, Ci);
          else
            for (int64_t p = 0; p < n; ++p)
              bn_prelu_acc<true, false>(d + p * Ct + o0, x + p * Ci, none, si, ti, ai, Ci);
          continue;
        }
        if (pre && i == 0) {
          if (r) pre_values<true>(v, x, r, pp[0].data(), pp[1].data(), pp[2].data(), n * Ci);
          else pre_values<false>(v, x, none, pp[0].data(), pp[1].data(), pp[2].data(), n * Ci);
        } else {  // narrow: v holds this input's BN-PReLU outputs, copied into place below
          const auto& np = narrow[i];
          if (r) bn_prelu_acc<true, true>(v, x, r, np[0].data(), np[1].data(), np[2].data(), n * Ci);
          else bn_prelu_acc<true, false>(v, x, none, np[0].data(), np[1].data(), np[2].data(), n * Ci);
          for (int64_t p = 0; p < n; ++p)
            for (int64_t c = 0; c < Ci; ++c) d[p * Ct + o0 + c] = v[p * Ci + c];
          continue;
        }
        const acc_t* nv = nullptr;
        for (int64_t p = 0; p < n; ++p)
          bn_prelu_acc<true, false>(d + p * Ct + o0, v + p * Ci, nv, si, ti, ai, Ci);
      }
    };
    at::parallel_for(0, N * HW, std::max<int64_t>(64, reps), [&](int64_t begin, int64_t end) {
      constexpr bool direct = std::is_same_v<scalar_t, acc_t>;
      std::vector<acc_t> buf(direct ? 0 : reps * Ct), v(reps * Ct);
      for (int64_t q = begin; q < end; q += reps) {
        const int64_t n = std::min(reps, end - q);
        // (not a template: both branches compile for every type; the cast is taken for acc_t)
        block(direct ? reinterpret_cast<acc_t*>(op + q * Ct) : buf.data(), v.data(), q, n);
        if (!direct) store_run(op + q * Ct, buf.data(), n * Ct);
      }
    });
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
