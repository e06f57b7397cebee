// Eval-mode DAB neck on CPU in one pass over memory. Per output row, one loop computes the first
// convs of both branches (3x1 and dilated 3x1, BN folded in, PReLU) into two row buffers from the
// input rows they need (h±1, h±d: these stay in cache); a second loop reads those buffers for both
// 1x3 convs, sums the branches and applies the final BN-PReLU straight into the output.
#include <torch/library.h>

#include "../checks.h"
#include "alloc.h"
#include "isa.h"
#include "loops.h"

namespace dabnet {
namespace cpu {
inline namespace DABNET_CPU_ISA {  // see isa.h

namespace {

// One channel's 3-tap conv with its BatchNorm folded in, then PReLU. Held by value in the loops, so
// its five numbers live in registers (through pointers the compiler would reload them, as the
// output might alias them).
template <typename acc_t>
struct Tap3 {
  acc_t w0, w1, w2, bias, slope;
  Tap3(const std::vector<acc_t>& prm, int64_t C, int64_t c)  // prm: [w0 | w1 | w2 | bias | slope]
      : w0(prm[c]), w1(prm[C + c]), w2(prm[2 * C + c]), bias(prm[3 * C + c]), slope(prm[4 * C + c]) {}
  template <bool UNIT>
  acc_t apply(acc_t a, acc_t b, acc_t c) const {
    return act<UNIT>(bias + w0 * a + w1 * b + w2 * c, slope);
  }
  bool unit() const { return unit_slope(slope); }
};

// NCHW: the neck of one channel's row. up1/dn1 and upd/dnd are the rows h-1/h+1 and h-d/h+d (or
// zero rows); t1/t2 are scratch rows with zero borders of 1 and dd = min(d, W) on each side (a
// shift of W or more reads only the border).
template <bool UNIT, typename T, typename acc_t>
void neck_row(T* __restrict__ out, const T* __restrict__ x, const T* __restrict__ up1,
              const T* __restrict__ dn1, const T* __restrict__ upd, const T* __restrict__ dnd,
              acc_t* __restrict__ t1, acc_t* __restrict__ t2, int64_t W, int64_t dd,
              const Tap3<acc_t> k[4], acc_t scale, acc_t shift, acc_t slope) {
  const Tap3<acc_t> k0 = k[0], k1 = k[1], k2 = k[2], k3 = k[3];
  acc_t* m1 = t1 + 1;  // based on t1/t2: the second loop reads what the first one writes
  acc_t* m2 = t2 + dd;
  for (int64_t i = 0; i < W; ++i) {
    const acc_t v = acc_t(x[i]);
    m1[i] = k0.template apply<UNIT>(acc_t(up1[i]), v, acc_t(dn1[i]));
    m2[i] = k2.template apply<UNIT>(acc_t(upd[i]), v, acc_t(dnd[i]));
  }
  staged_run<T, acc_t>(out, W, [&](acc_t* __restrict__ o, int64_t i0, int64_t n) {
    for (int64_t i = i0; i < i0 + n; ++i) {
      const acc_t y = k1.template apply<UNIT>(t1[i], t1[i + 1], t1[i + 2]) +
                      k3.template apply<UNIT>(t2[i], t2[i + dd], t2[i + 2 * dd]);
      o[i - i0] = act<UNIT>(scale * y + shift, slope);
    }
  });
}

// NHWC: the neck of one image row, W pixels of C channels. CC: C known at compile time (DABNet's
// 32 and 64; 0 = C at run time), so that the 23 parameter vectors, packed in one array (q, see
// below), are read at constant offsets from one register: with a pointer per vector (and per
// shifted pixel) the loops held some 20 live pointers and reloaded them from the stack, which
// made this layout 2-3x slower than NCHW. up1/dn1, upd/dnd: the rows h-1/h+1 and h-d/h+d of x (or
// zero rows). t1/t2: scratch rows of W + 2 and W + 2dd pixels (dd = min(d, W), as in neck_row)
// whose borders are zero, so that the second convs (along W) read shifted pixels unchecked.
// next: the row of x that the next call reads for the first time (its h+d), any readable row of
// W*C values if none.
template <int CC, bool UNIT, typename T, typename acc_t>
void neck_row_cl(T* __restrict__ out, const T* __restrict__ x, const T* __restrict__ up1,
                 const T* __restrict__ dn1, const T* __restrict__ upd, const T* __restrict__ dnd,
                 acc_t* __restrict__ t1, acc_t* __restrict__ t2, int64_t W, int64_t C_, int64_t dd,
                 const acc_t* __restrict__ q, acc_t* __restrict__ ob, const T* next) {
  const int64_t C = CC ? CC : C_;
  // q: [conv k: w0 | w1 | w2 | bias | slope] for k = 0..3, then [scale | shift | slope]
  const auto P = [&](int k, int j) { return q + (5 * k + j) * C; };
  acc_t* m1 = t1 + C;      // pixel 0 of the first conv along H of the local branch
  acc_t* m2 = t2 + dd * C;  // ... and of the context branch
  for (int64_t w = 0; w < W; ++w) {
    const int64_t o = w * C;
    for (int64_t i = 0; i < C; ++i) {
      const acc_t v = acc_t(x[o + i]);
      m1[o + i] = act<UNIT>(P(0, 3)[i] + P(0, 0)[i] * acc_t(up1[o + i]) + P(0, 1)[i] * v +
                                P(0, 2)[i] * acc_t(dn1[o + i]),
                            P(0, 4)[i]);
      m2[o + i] = act<UNIT>(P(2, 3)[i] + P(2, 0)[i] * acc_t(upd[o + i]) + P(2, 1)[i] * v +
                                P(2, 2)[i] * acc_t(dnd[o + i]),
                            P(2, 4)[i]);
    }
  }
  const int64_t dc = dd * C;
  // The row in acc_t: the output itself, or for a narrower type ob (W*C), stored at once.
  acc_t* __restrict__ dst;
  if constexpr (std::is_same_v<T, acc_t>) dst = out;
  else dst = ob;
  for (int64_t w = 0; w < W; ++w) {
    const int64_t o = w * C;
    // This loop reads only cached rows: fetch the next call's new row from memory meanwhile
    // (without it the first loop stalled on that row, perf annotate: half the time).
    for (int64_t b = 0; b < C * int64_t(sizeof(T)); b += 64)
      __builtin_prefetch(reinterpret_cast<const char*>(next + o) + b);
    for (int64_t i = 0; i < C; ++i) {
      const acc_t y1 = act<UNIT>(P(1, 3)[i] + P(1, 0)[i] * m1[o - C + i] + P(1, 1)[i] * m1[o + i] +
                                     P(1, 2)[i] * m1[o + C + i],
                                 P(1, 4)[i]);
      const acc_t y2 = act<UNIT>(P(3, 3)[i] + P(3, 0)[i] * m2[o - dc + i] +
                                     P(3, 1)[i] * m2[o + i] + P(3, 2)[i] * m2[o + dc + i],
                                 P(3, 4)[i]);
      dst[o + i] = act<UNIT>(P(4, 0)[i] * (y1 + y2) + P(4, 1)[i], P(4, 2)[i]);
    }
  }
  if constexpr (!std::is_same_v<T, acc_t>) store_run(out, ob, W * C);
}

}  // namespace

at::Tensor dab_neck(const at::Tensor& x_, const at::Tensor& weight, const at::Tensor& bias,
                    const at::Tensor& slope, const at::Tensor& out_scale,
                    const at::Tensor& out_shift, const at::Tensor& out_slope, int64_t d) {
  check_neck(x_, weight, bias, slope, out_scale, out_shift, out_slope, d);
  bool cl;
  const at::Tensor x = canonical(x_, cl);
  at::Tensor out = empty_out_as(x, cl);
  if (x.numel() == 0) return out;
  const Geo g(x, cl);
  const int64_t C = g.C, H = g.H, W = g.W, dd = std::min(d, W);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dab_neck_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // prm[k]: [w0 | w1 | w2 | bias | slope | ...] of conv k (see tap3_run), BN folded in.
    const auto bs = to_vec<acc_t>(bias.reshape({-1}), 4 * C), sl = to_vec<acc_t>(slope.reshape({-1}), 4 * C);
    std::vector<std::vector<acc_t>> prm(4);
    for (int k = 0; k < 4; ++k) {
      prm[k] = tap_params<acc_t>(weight[k], C);
      std::copy(bs.begin() + k * C, bs.begin() + (k + 1) * C, prm[k].begin() + 3 * C);
      std::copy(sl.begin() + k * C, sl.begin() + (k + 1) * C, prm[k].begin() + 4 * C);
    }
    const auto fs = to_vec<acc_t>(out_scale, C), ft = to_vec<acc_t>(out_shift, C),
               fa = to_vec<acc_t>(out_slope, C);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    if (!cl) {
      at::parallel_for(0, g.N * C, 1, [&](int64_t begin, int64_t end) {
        std::vector<acc_t> t1(W + 2, 0), t2(W + 2 * dd, 0);
        std::vector<scalar_t> zero(W, scalar_t(0));
        const scalar_t* z = zero.data();
        for (int64_t p = begin; p < end; ++p) {
          const int64_t c = p % C;
          const Tap3<acc_t> k[4] = {{prm[0], C, c}, {prm[1], C, c}, {prm[2], C, c}, {prm[3], C, c}};
          const bool unit = k[0].unit() && k[1].unit() && k[2].unit() && k[3].unit() &&
                            unit_slope(fa[c]);
          const scalar_t* xq = xp + p * H * W;
          for (int64_t h = 0; h < H; ++h) {
            const scalar_t* r = xq + h * W;
            // The common case, every slope of this channel in [0, 1], runs the cheaper PReLU.
            (unit ? neck_row<true, scalar_t, acc_t> : neck_row<false, scalar_t, acc_t>)(
                op + p * H * W + h * W, r, h >= 1 ? r - W : z, h + 1 < H ? r + W : z,
                h >= d ? r - d * W : z, h + d < H ? r + d * W : z, t1.data(), t2.data(), W, dd, k,
                fs[c], ft[c], fa[c]);
          }
        }
      });
    } else {
      std::vector<acc_t> q(23 * C);  // see neck_row_cl
      bool unit = true;
      for (int k = 0; k < 4; ++k)
        for (int j = 0; j < 5; ++j)
          std::copy_n(prm[k].begin() + j * C, C, q.begin() + (5 * k + j) * C);
      std::copy(fs.begin(), fs.end(), q.begin() + 20 * C);
      std::copy(ft.begin(), ft.end(), q.begin() + 21 * C);
      std::copy(fa.begin(), fa.end(), q.begin() + 22 * C);
      for (int k = 0; k < 4; ++k)
        for (int64_t c = 0; c < C; ++c) unit = unit && unit_slope(prm[k][4 * C + c]);
      for (int64_t c = 0; c < C; ++c) unit = unit && unit_slope(fa[c]);
      // Every slope in [0, 1] (the common case) runs the cheaper PReLU; C = 32 / 64 (DABNet's
      // necks) with constant offsets.
      auto row = unit ? (C == 32 ? neck_row_cl<32, true, scalar_t, acc_t>
                         : C == 64 ? neck_row_cl<64, true, scalar_t, acc_t>
                                   : neck_row_cl<0, true, scalar_t, acc_t>)
                      : (C == 32 ? neck_row_cl<32, false, scalar_t, acc_t>
                         : C == 64 ? neck_row_cl<64, false, scalar_t, acc_t>
                                   : neck_row_cl<0, false, scalar_t, acc_t>);
      at::parallel_for(0, g.N * H, 1, [&](int64_t begin, int64_t end) {
        std::vector<acc_t> t1((W + 2) * C, acc_t(0)), t2((W + 2 * dd) * C, acc_t(0));
        std::vector<acc_t> ob(std::is_same_v<scalar_t, acc_t> ? 0 : W * C);
        std::vector<scalar_t> zero(W * C, scalar_t(0));
        const scalar_t* z = zero.data();
        const int64_t rs = W * C;  // one image row
        for (int64_t r = begin; r < end; ++r) {
          const int64_t h = r % H;
          const scalar_t* xr = xp + r * rs;
          const bool more = r + 1 < end && h + 1 + d < H;  // the next row's h+d, in this image
          row(op + r * rs, xr, h >= 1 ? xr - rs : z, h + 1 < H ? xr + rs : z,
              h >= d ? xr - d * rs : z, h + d < H ? xr + d * rs : z, t1.data(), t2.data(), W, C,
              dd, q.data(), ob.data(), more ? xr + (d + 1) * rs : z);
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
DABNET_CPU_DECLARE(dab_neck)

TORCH_LIBRARY_IMPL(dabnet, CPU, m) {
  m.impl("dab_neck", DABNET_CPU_KERNEL(dab_neck));
}
#endif
