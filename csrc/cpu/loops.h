// Building blocks of the CPU kernels. Tensors arrive in one of two dense layouts:
//   NCHW  : a "run" is one image row of W elements, all of one channel (per-run scalar params);
//   NHWC  : a "run" is the C channels of one pixel (params indexed by position in the run).
// Every inner loop walks a contiguous run, so the compiler vectorizes it in both layouts.
#pragma once
#include "isa.h"
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <type_traits>
#include <vector>

#include "../layout.h"

namespace dabnet {
namespace cpu {
inline namespace DABNET_CPU_ISA {  // see isa.h

struct Geo {
  int64_t N, C, H, W;
  bool cl;  // channels_last
  explicit Geo(const at::Tensor& x, bool cl_)
      : N(x.size(0)), C(x.size(1)), H(x.size(2)), W(x.size(3)), cl(cl_) {}
};

// Calls f(i, j, value) for every element of the 1-D or 2-D parameter tensor t (index j = 0 for
// 1-D), read in place in t's dtype: no tensor is made, where a .to() per parameter (six per
// bn_prelu call) cost as much dispatch as a small input's whole kernel.
template <typename F>
void read_params(const at::Tensor& t, F f) {
  const int64_t n0 = t.size(0), n1 = t.dim() == 2 ? t.size(1) : 1;
  const int64_t s0 = t.stride(0), s1 = t.dim() == 2 ? t.stride(1) : 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "read_params", [&] {
    const scalar_t* p = t.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < n0; ++i)
      for (int64_t j = 0; j < n1; ++j) f(i, j, double(p[i * s0 + j * s1]));
  });
}

// Per-channel parameters (C values, or one for all) as a vector of the accumulation type.
template <typename acc_t>
std::vector<acc_t> to_vec(const at::Tensor& v, int64_t C) {
  TORCH_INTERNAL_ASSERT(v.numel() == C || v.numel() == 1, "dabnet: ", C, " parameters expected");
  std::vector<acc_t> out(C);
  const bool single = v.numel() == 1;
  read_params(v.dim() == 1 ? v : v.reshape({-1}), [&](int64_t i, int64_t, double a) {
    if (single) out.assign(C, acc_t(a));
    else out[i] = acc_t(a);
  });
  return out;
}

// PReLU as a select between y and y*slope. Both are computed first, so the select compiles to a
// compare and a blend, never a branch (a data-dependent branch mispredicts on about half of all
// real activations and was 7x slower here), and no load becomes conditional (that stops GCC from
// vectorizing). Three vector ops where max(y,0) + slope*min(y,0) took five (GCC keeps -0 and NaN
// semantics, so max/min became compare+and pairs): the eval neck got 25% faster. Exact: y*slope
// is F.prelu's product.
template <typename acc_t>
inline acc_t prelu(acc_t y, acc_t slope) {
  const acc_t neg = y * slope;
  return y < acc_t(0) ? neg : y;
}

// PReLU for a slope in [0, 1], where y*slope lies between y and 0: max(y, y*slope), two vector ops
// instead of three (the eval neck, compute-bound, got 17% faster). Exact: it returns y or
// y*slope, and NaN propagates (y > p is false). `a > b ? a : b` is maxps' own definition, so
// GCC emits one maxps for it.
template <typename acc_t>
inline acc_t prelu_unit(acc_t y, acc_t slope) {
  const acc_t p = y * slope;
  return y > p ? y : p;
}

// prelu, or prelu_unit where the caller has checked that every slope it passes is in [0, 1].
template <bool UNIT, typename acc_t>
inline acc_t act(acc_t y, acc_t slope) {
  return UNIT ? prelu_unit(y, slope) : prelu(y, slope);
}

template <typename acc_t>
inline bool unit_slope(acc_t s) {
  return s >= acc_t(0) && s <= acc_t(1);
}

// dst[i] = T(src[i]) for i < n: a run of results computed in acc_t and stored in the output type.
// bfloat16 goes through bf16_store() (isa.h) where the CPU has AVX512_BF16, bit for bit the same.
template <typename T, typename acc_t>
inline void store_run(T* __restrict__ dst, const acc_t* __restrict__ src, int64_t n) {
  if constexpr (std::is_same_v<T, c10::BFloat16> && std::is_same_v<acc_t, float>) {
    if (const Bf16Store fast = bf16_store()) return fast(src, dst, n);
  }
  for (int64_t i = 0; i < n; ++i) dst[i] = T(src[i]);
}

// out[i] for i < n through f(dst, i0, m), which computes results i0 .. i0+m-1 in acc_t into
// dst[0 .. m): straight into the output when T is acc_t; otherwise kStage at a time into a buffer
// on the stack, then store_run. Per element the buffer costs an L1 store and load, fewer
// instructions than the bf16 rounding that store_run saves.
constexpr int64_t kStage = 512;
template <typename T, typename acc_t, typename F>
inline void staged_run(T* out, int64_t n, const F& f) {
  if constexpr (std::is_same_v<T, acc_t>) {
    f(out, int64_t(0), n);
  } else {
    alignas(64) acc_t buf[kStage];
    for (int64_t i0 = 0; i0 < n; i0 += kStage) {
      const int64_t m = std::min(kStage, n - i0);
      f(buf, i0, m);
      store_run(out + i0, buf, m);
    }
  }
}

// x * s + t rounded the same way in every loop. A backward that recomputes a BN output must pick
// the PReLU branch its forward picked; whether the compiler contracts x * s + t into an FMA is
// otherwise decided per loop, and a pre-activation within rounding of 0 then flips sides.
// DABNET_CPU_FMA: defined by the AVX2+FMA build (setup.py), where std::fma is one instruction.
template <typename acc_t>
inline acc_t affine(acc_t x, acc_t s, acc_t t) {
#ifdef DABNET_CPU_FMA
  return std::fma(x, s, t);
#else
  return x * s + t;  // no FMA instruction to contract into
#endif
}

// Tap parameters [w0 | w1 | w2 | bias | slope | scale | shift] (see tap3_run) from a depthwise
// (C,1,3,1)/(C,1,1,3) weight. flip reverses the taps (the adjoint, for grad_input). bias: zero
// (dab_neck, which folds its BatchNorms into the taps, fills it in); slope: the PReLU slope;
// scale/shift: an eval BatchNorm applied after the rounded conv (kEpiBnPrelu). Each length C.
template <typename acc_t>
std::vector<acc_t> tap_params(const at::Tensor& w, int64_t C, bool flip = false,
                              const acc_t* slope = nullptr, const acc_t* scale = nullptr,
                              const acc_t* shift = nullptr) {
  TORCH_INTERNAL_ASSERT(w.numel() == 3 * C, "dabnet: ", 3 * C, " conv taps expected");
  std::vector<acc_t> prm(7 * C, acc_t(0));
  read_params(w.reshape({C, 3}),
              [&](int64_t c, int64_t k, double a) { prm[(flip ? 2 - k : k) * C + c] = acc_t(a); });
  for (int64_t c = 0; c < C; ++c) {
    prm[4 * C + c] = slope ? slope[c] : acc_t(0);
    prm[5 * C + c] = scale ? scale[c] : acc_t(1);
    prm[6 * C + c] = shift ? shift[c] : acc_t(0);
  }
  return prm;
}

// The folded BN y = x * scale + shift, computed identically wherever a backward recomputes a
// forward's BN output to choose PReLU's branch (see affine): from the statistics as the forward
// returns them (rounded to stat_type), in double, then rounded to acc_t.
template <typename acc_t>
void fold_bn(const std::vector<double>& w, const std::vector<double>& b,
             const std::vector<double>& mean, const std::vector<double>& var, double eps,
             std::vector<acc_t>& scale, std::vector<acc_t>& shift) {
  const size_t C = w.size();
  scale.resize(C);
  shift.resize(C);
  for (size_t c = 0; c < C; ++c) {
    const double s = w[c] / std::sqrt(var[c] + eps);
    scale[c] = acc_t(s);
    shift[c] = acc_t(b[c] - mean[c] * s);
  }
}

// What tap3_run does after the three taps, s = bias + w0*a + w1*b + w2*c:
constexpr int kEpiNone = 0;   // out = s
constexpr int kEpiPrelu = 1;  // out = PReLU(s): BatchNorm already folded into taps and bias
// out = PReLU(affine(out_t(s), scale, shift)): the conv rounded to the output type, then the eval
// BatchNorm, exactly as the backward recomputes them (dwconv3, then bn_prelu_backward), so that
// forward and backward pick the same PReLU branch for a pre-activation within rounding of 0.
constexpr int kEpiBnPrelu = 2;

// The 3-tap kernel with its epilogue EPI (above) on one run of n elements. prm is laid out
// [w0 | w1 | w2 | bias | slope | scale | shift], each block C long. VEC: index the blocks by
// position (NHWC run over channels); otherwise prm already points at the run's channel.
template <int EPI, bool VEC, typename out_t, typename in_t, typename acc_t>
inline void tap3_run(out_t* __restrict__ out, const in_t* __restrict__ a,
                     const in_t* __restrict__ b, const in_t* __restrict__ c,
                     const acc_t* __restrict__ prm, int64_t C, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t j = VEC ? i : 0;
    acc_t s = prm[3 * C + j] + prm[j] * acc_t(a[i]) + prm[C + j] * acc_t(b[i]) +
              prm[2 * C + j] * acc_t(c[i]);
    if (EPI == kEpiPrelu) s = prelu(s, prm[4 * C + j]);
    if (EPI == kEpiBnPrelu)
      s = prelu(affine(acc_t(out_t(s)), prm[5 * C + j], prm[6 * C + j]), prm[4 * C + j]);
    out[i] = out_t(s);
  }
}

// The longest run plane_runs hands out where it needs scratch (zeros past the border, gathered
// border columns): the scratch then stays a few KiB per thread even for rows of 2^31 elements,
// where sizing it by W had tripled a huge input's peak memory.
constexpr int64_t kRunMax = 4096;
inline int64_t run_scratch(int64_t W) { return std::min(W, kRunMax); }

// Visits the runs of NCHW plane p (= n*C + c) for 3 taps along axis (0: H, 1: W) with dilation d:
//   f(offset, a, b, c, n) with a/b/c the input run shifted by -d, 0, +d (zeros past the border).
// Along W a row is visited in up to three parts: the columns whose two neighbours both lie inside
// the row are read in place, in one run (no copy: copying every row to a padded buffer took half
// the 1x3 conv's time); the up-to-2d border columns get their shifted taps gathered into edge,
// zero past the border. Runs that need scratch are at most run_scratch(W) long.
// edge: scratch of 2 * run_scratch(W); zero: run_scratch(W) zeros.
template <typename T, typename F>
inline void plane_runs(const T* x, const Geo& g, int axis, int64_t d, int64_t p, T* edge,
                       const T* zero, F&& f) {
  const int64_t H = g.H, W = g.W, base = p * H * W, R = run_scratch(W);
  const T* xp = x + base;
  const int64_t lo = std::min(d, W), hi = std::max(lo, W - d);  // [lo, hi): both taps inside
  for (int64_t h = 0; h < H; ++h) {
    const T* row = xp + h * W;
    const int64_t off = base + h * W;
    if (axis == 0) {
      const T* up = h - d >= 0 ? row - d * W : nullptr;
      const T* down = h + d < H ? row + d * W : nullptr;
      for (int64_t i = 0; i < W; i += R)
        f(off + i, up ? up + i : zero, row + i, down ? down + i : zero, std::min(R, W - i));
      continue;
    }
    const auto border = [&](int64_t i0, int64_t i1) {
      for (int64_t s = i0; s < i1; s += R) {
        const int64_t e = std::min(i1, s + R);
        T *a = edge, *c = edge + R;
        for (int64_t i = s; i < e; ++i) {
          a[i - s] = i - d >= 0 ? row[i - d] : T(0);
          c[i - s] = i + d < W ? row[i + d] : T(0);
        }
        f(off + s, a, row + s, c, e - s);
      }
    };
    border(0, lo);
    if (hi > lo) f(off + lo, row + lo - d, row + lo, row + lo + d, hi - lo);
    border(hi, W);
  }
}

// Visits the pixels of NHWC row r (= n*H + h); each run is the C channels of one pixel.
template <typename T, typename F>
inline void row_runs(const T* x, const Geo& g, int axis, int64_t d, int64_t r, const T* zero,
                     F&& f) {
  const int64_t H = g.H, W = g.W, C = g.C, h = r % H;
  const T* xr = x + r * W * C;
  for (int64_t w = 0; w < W; ++w) {
    const T* b = xr + w * C;
    const T *a, *c;
    if (axis == 0) {
      a = h - d >= 0 ? b - d * W * C : zero;
      c = h + d < H ? b + d * W * C : zero;
    } else {
      a = w - d >= 0 ? b - d * C : zero;
      c = w + d < W ? b + d * C : zero;
    }
    f(r * W * C + w * C, a, b, c, C);
  }
}

// out = tap3 with epilogue EPI of NCHW plane p (= n*C + c) of x; edge, zero: see plane_runs.
template <int EPI, typename T, typename out_t, typename acc_t>
inline void tap3_plane(const T* x, out_t* out, const Geo& g, int axis, int64_t d, int64_t p,
                       const acc_t* prm, T* edge, const T* zero) {
  const acc_t* pc = prm + p % g.C;
  plane_runs(x, g, axis, d, p, edge, zero,
             [&](int64_t off, const T* a, const T* b, const T* c, int64_t n) {
               tap3_run<EPI, false>(out + off, a, b, c, pc, g.C, n);
             });
}

// out = tap3 with epilogue EPI (see tap3_run) of x along axis, whole tensor, in parallel.
template <int EPI, typename T, typename out_t, typename acc_t>
void run_tap3(const T* x, out_t* out, const Geo& g, int axis, int64_t d, const acc_t* prm) {
  const int64_t C = g.C;
  if (!g.cl) {
    at::parallel_for(0, g.N * C, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> edge(2 * run_scratch(g.W)), zero(run_scratch(g.W), T(0));
      for (int64_t p = begin; p < end; ++p)
        tap3_plane<EPI>(x, out, g, axis, d, p, prm, edge.data(), zero.data());
    });
  } else {
    at::parallel_for(0, g.N * g.H, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> zero(C, T(0));
      for (int64_t r = begin; r < end; ++r)
        row_runs(x, g, axis, d, r, zero.data(),
                 [&](int64_t off, const T* a, const T* b, const T* c, int64_t n) {
                   tap3_run<EPI, true>(out + off, a, b, c, prm, C, n);
                 });
    });
  }
}

constexpr int64_t kBlock = 512;  // elements summed in acc_t before spilling into double
constexpr int kLanes = 8;        // partial sums per block (see channel_reduce)

// Sums K (1 to 3) per-channel quantities over (N, H, W): f(offset, channel, s0, s1, s2) adds an
// element's quantities to the acc_t sums s0..s2 (by reference: returning an array kept GCC from
// vectorizing the loop).
// out is [K][C] doubles. The order of summation is fixed (independent of the thread count), so
// results are deterministic.
template <int K, typename acc_t, typename F>
void channel_reduce(const Geo& g, F f, double* out) {
  static_assert(K >= 1 && K <= 3, "channel_reduce sums one to three quantities");
  const int64_t C = g.C, HW = g.H * g.W;
  if (!g.cl) {
    at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
      const F fl(f);  // a local copy: its captures are visibly loop-invariant
      for (int64_t c = begin; c < end; ++c) {
        std::array<double, K> tot{};
        for (int64_t n = 0; n < g.N; ++n) {
          const int64_t base = (n * C + c) * HW;
          for (int64_t i0 = 0; i0 < HW; i0 += kBlock) {
            // kLanes independent partial sums (a float sum is never reassociated by the
            // compiler): the lane loop maps onto SIMD registers, and the order stays fixed, so
            // the result does not depend on the ISA or the thread count.
            acc_t s0[kLanes] = {}, s1[kLanes] = {}, s2[kLanes] = {};
            const int64_t i1 = std::min(HW, i0 + kBlock);
            int64_t i = i0;
            for (; i + kLanes <= i1; i += kLanes)
#pragma omp simd
              for (int l = 0; l < kLanes; ++l) fl(base + i + l, c, s0[l], s1[l], s2[l]);
            for (int l = 0; i < i1; ++i, ++l) fl(base + i, c, s0[l], s1[l], s2[l]);
            for (int l = 0; l < kLanes; ++l) {
              tot[0] += s0[l];
              if constexpr (K > 1) tot[1] += s1[l];
              if constexpr (K > 2) tot[2] += s2[l];
            }
          }
        }
        for (int k = 0; k < K; ++k) out[k * C + c] = tot[k];
      }
    });
    return;
  }
  const int64_t M = g.N * HW, nchunk = std::min<int64_t>(M, 64);
  std::vector<double> part(nchunk * K * C, 0.0);
  at::parallel_for(0, nchunk, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> s(K * C);
    for (int64_t ch = begin; ch < end; ++ch) {
      double* P = part.data() + ch * K * C;
      const int64_t q0 = ch * M / nchunk, q1 = (ch + 1) * M / nchunk;
      for (int64_t b0 = q0; b0 < q1; b0 += kBlock / 8) {
        std::fill(s.begin(), s.end(), acc_t(0));
        for (int64_t q = b0; q < std::min(q1, b0 + kBlock / 8); ++q)
          for (int64_t c = 0; c < C; ++c) {
            acc_t v[3] = {0, 0, 0};
            f(q * C + c, c, v[0], v[1], v[2]);
            for (int k = 0; k < K; ++k) s[k * C + c] += v[k];
          }
        for (int64_t i = 0; i < K * C; ++i) P[i] += s[i];
      }
    }
  });
  std::fill(out, out + K * C, 0.0);
  for (int64_t ch = 0; ch < nchunk; ++ch)
    for (int64_t i = 0; i < K * C; ++i) out[i] += part[ch * K * C + i];
}

// Applies f(offset, channel) to every element, in parallel.
template <typename F>
void channel_map(const Geo& g, F f) {
  const int64_t C = g.C, HW = g.H * g.W;
  if (!g.cl) {
    at::parallel_for(0, g.N * C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const int64_t c = p % C, base = p * HW;
        for (int64_t i = 0; i < HW; ++i) f(base + i, c);
      }
    });
  } else {
    at::parallel_for(0, g.N * HW, 64, [&](int64_t begin, int64_t end) {
      for (int64_t q = begin; q < end; ++q)
        for (int64_t c = 0; c < C; ++c) f(q * C + c, c);
    });
  }
}

}  // namespace DABNET_CPU_ISA
}  // namespace cpu
}  // namespace dabnet
