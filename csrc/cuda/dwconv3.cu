// dwconv3 on CUDA: forward, grad_input (the same stencil with the taps reversed) and grad_weight
// (a deterministic per-channel reduction). The tap kernel also serves the eval dwconv3_bn_prelu.
#include <torch/library.h>

#include "../checks.h"
#include "common.cuh"
#include "kernels.h"

namespace dabnet {
namespace cuda {

namespace {

// The three taps of a pack: x shifted by -d, 0 and +d along the axis, zero past the border.
// R = 0: the shifted taps are whole packs, `step` packs away (channels_last, NCHW along H, or
// V = 1). R > 0: NCHW along W with d = reach * V + R; each shifted tap straddles two packs and is
// put together from them (the lane shuffle is fixed at compile time: register moves only).
template <typename scalar_t, typename L, int R>
struct Taps {
  using P = Pack<scalar_t, L::V>;
  static constexpr int V = L::V;
  const scalar_t* x;
  Geo g;         // in packs
  int axis;      // 0: H, 1: W
  int reach;     // d in positions of the walk along the axis (packs for NCHW along W)
  int64_t step;  // R = 0: the offset of tap +d, in packs
  __device__ __forceinline__ void load(const Cursor& cur, int64_t o, P v[3]) const {
    const int pos = axis == 0 ? cur.h : cur.w, lim = axis == 0 ? g.H : g.W;
    v[1] = load_pack<scalar_t, V>(x, o);
    if constexpr (R == 0) {
      v[0] = load_pack<scalar_t, V>(x, o - step, pos >= reach);
      v[2] = load_pack<scalar_t, V>(x, o + step, pos < lim - reach);
    } else {
      const P a = load_pack<scalar_t, V>(x, o - reach - 1, pos > reach);
      const P b = load_pack<scalar_t, V>(x, o - reach, pos >= reach);
      const P e = load_pack<scalar_t, V>(x, o + reach, pos < lim - reach);
      const P f = load_pack<scalar_t, V>(x, o + reach + 1, pos < lim - reach - 1);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        v[0].v[k] = k < R ? a.v[V - R + k] : b.v[k - R];
        v[2].v[k] = k + R < V ? e.v[k + R] : f.v[k + R - V];
      }
    }
  }
};

// The conv: k0*x[-d] + k1*x[0] + k2*x[+d] rounded to scalar_t, with k the conv taps (reversed
// for grad_input, the adjoint).
template <typename scalar_t_, typename L_, int R>
struct ConvSrc {
  using scalar_t = scalar_t_;
  using L = L_;
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr int kPacks = R == 0 ? 3 : 5;  // packs loaded per position
  struct Regs {
    int64_t o;
    Pack<scalar_t, L::V> v[3];
  };
  Taps<scalar_t, L, R> in;
  const scalar_t* w;  // (C, 3)
  bool flip;
  int64_t sc, sa;  // element strides of the channel and of the axis (sample)
  int d, lim;      // dilation and the axis' size, in elements
  acc_t k[L::kC][3];

  __device__ acc_t tap(int ch, int j) const {
    return acc_t(w[int64_t(ch) * 3 + (flip ? 2 - j : j)]);
  }
  __device__ void setup(int c) {
#pragma unroll
    for (int j = 0; j < L::kC; ++j)
#pragma unroll
      for (int t = 0; t < 3; ++t) k[j][t] = tap(L::channel(c, j), t);
  }
  __device__ Regs load(const Cursor& cur, int c) const {
    Regs r;
    r.o = cur.off + int64_t(c) * in.g.sC;
    in.load(cur, r.o, r.v);
    return r;
  }
  __device__ scalar_t value(const Regs& r, int i) const {
    const int j = L::slot(i);
    return scalar_t(k[j][0] * acc_t(r.v[0].v[i]) + k[j][1] * acc_t(r.v[1].v[i]) +
                    k[j][2] * acc_t(r.v[2].v[i]));
  }
  // The conv at the first position of channel ch (tap -d is padding there); explicit fma, so
  // that every caller rounds it the same way.
  __device__ acc_t sample(int ch) const {
    const int64_t o = int64_t(ch) * sc;
    const acc_t right = d < lim ? tap(ch, 2) * acc_t(in.x[o + int64_t(d) * sa]) : acc_t(0);
    return acc_t(scalar_t(fma(tap(ch, 1), acc_t(in.x[o]), right)));
  }
};

// Calls f(src) with the conv source of the widest access the tensors allow (see with_lanes).
template <typename scalar_t, typename F>
void with_conv(const at::Tensor& x, const at::Tensor& weight, int axis, int64_t dilation,
               bool flip, bool cl, std::initializer_list<const void*> ptrs, F&& f) {
  const Geo g = make_geo(x);
  const int d = clamp_dilation(dilation, g);
  with_lanes<scalar_t>(g, cl, ptrs, [&](auto lanes, const Geo& pg) {
    using L = decltype(lanes);
    auto make = [&](auto r, int reach, int64_t step) {
      ConvSrc<scalar_t, L, decltype(r)::value> src;
      src.in = {x.data_ptr<scalar_t>(), pg, axis, reach, step};
      src.w = weight.data_ptr<scalar_t>();
      src.flip = flip;
      src.sc = g.sC;
      src.sa = axis == 0 ? g.sH : g.sW;
      src.d = d;
      src.lim = axis == 0 ? g.H : g.W;
      f(src, pg);
    };
    const auto whole = std::integral_constant<int, 0>{};
    if constexpr (L::V == 1 || L::CL)
      make(whole, d, int64_t(d) * (axis == 0 ? pg.sH : pg.sW));
    else if (axis == 0)
      make(whole, d, int64_t(d) * pg.sH);
    else  // NCHW along W: d = reach * V + r
      with_shift<L::V>(d % L::V, [&](auto r) { make(r, d / L::V, d / L::V); });
  });
}

// grad_input (the flipped stencil of grad_out) and grad_weight in one pass: grad_w[k] = sum of
// x * grad_out shifted by (1-k)d, from the same three taps of grad_out (3 passes over memory).
template <typename Src>
struct BackwardOp {
  using scalar_t = typename Src::scalar_t;
  using acc_t = typename Src::acc_t;
  using L = typename Src::L;
  static constexpr int kC = L::kC, kPacks = Src::kPacks + 1;
  struct Regs {
    typename Src::Regs g;
    Pack<scalar_t, L::V> x;
  };
  Src gsrc;  // taps of grad_out, flipped
  const scalar_t* x;
  scalar_t* gx;  // null: grad_input not wanted
  __host__ __device__ static int channel(int c, int k) { return L::channel(c, k); }
  __device__ void setup(int c) { gsrc.setup(c); }
  __device__ Regs load(const Cursor& cur, int c) const {
    Regs r;
    r.g = gsrc.load(cur, c);
    r.x = load_pack<scalar_t, L::V>(x, r.g.o);
    return r;
  }
  __device__ void accumulate(int, const Regs& r, Vec<acc_t, 3>* s) const {
    if (gx) {
      Pack<scalar_t, L::V> y;
#pragma unroll
      for (int k = 0; k < L::V; ++k) y.v[k] = gsrc.value(r.g, k);
      store_pack(gx, r.g.o, y);
    }
#pragma unroll
    for (int k = 0; k < L::V; ++k) {
      const int j = L::slot(k);
      const acc_t xv = acc_t(r.x.v[k]);
      s[j].v[0] += xv * acc_t(r.g.v[2].v[k]);
      s[j].v[1] += xv * acc_t(r.g.v[1].v[k]);
      s[j].v[2] += xv * acc_t(r.g.v[0].v[k]);
    }
  }
};

}  // namespace

void tap3(const at::Tensor& x, const at::Tensor& out, const at::Tensor& weight_, int axis,
          int64_t dilation, bool flip, bool cl, const BnTensors* bn) {
  if (x.numel() == 0) return;
  const at::Tensor w = weight_.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dwconv3_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_conv<scalar_t>(x, w, axis, dilation, flip, cl, {x.data_ptr(), out.data_ptr()},
                        [&](const auto& src, const Geo& pg) {
                          using Src = std::decay_t<decltype(src)>;
                          if (bn) {
                            ApplyOp<Src, true> op{src, out.data_ptr<scalar_t>(),
                                                  BnParams<acc_t>::of(*bn)};
                            launch_map(op, pg, cl);
                          } else {
                            launch_map(ApplyOp<Src, false>{src, out.data_ptr<scalar_t>()}, pg, cl);
                          }
                        });
  });
}

void conv_batch_stats(const at::Tensor& x, const at::Tensor& weight_, int axis, int64_t dilation,
                      bool cl, at::Tensor& mean, at::Tensor& var) {
  const at::Tensor w = weight_.contiguous();
  const Geo g = make_geo(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dwconv3_stats_cuda", [&] {
    with_conv<scalar_t>(x, w, axis, dilation, /*flip=*/false, cl, {x.data_ptr()},
                        [&](const auto& src, const Geo& pg) {
                          batch_stats(src, pg, cl, g.C, g.M, x, mean, var);
                        });
  });
}

at::Tensor dwconv3(const at::Tensor& x_, const at::Tensor& weight, int64_t dilation) {
  check_input(x_);
  const int axis = check_dw_weight(weight, x_, dilation);
  const c10::cuda::CUDAGuard guard(x_.device());
  bool cl;
  const at::Tensor x = canonical(x_, cl);
  at::Tensor out = empty_as(x, cl);
  tap3(x, out, weight, axis, dilation, /*flip=*/false, cl, nullptr);
  return out;
}

std::tuple<at::Tensor, at::Tensor> dwconv3_backward(const at::Tensor& grad_out,
                                                    const at::Tensor& x_, const at::Tensor& weight,
                                                    int64_t dilation, std::array<bool, 2> mask) {
  check_grad(grad_out, x_);
  const int axis = check_dw_weight(weight, x_, dilation);
  const c10::cuda::CUDAGuard guard(x_.device());
  bool cl;
  const at::Tensor x = canonical(x_, cl);
  const at::Tensor g = grad_out.contiguous(fmt(cl));
  at::Tensor grad_x, grad_w;
  if (mask[0]) grad_x = empty_as(x, cl);
  if (!mask[1]) {
    // d/dx of sum_k w_k x[i + (k-1)d] is the same stencil with w reversed.
    if (mask[0]) tap3(g, grad_x, weight, axis, dilation, /*flip=*/true, cl, nullptr);
  } else {
    const Geo geo = make_geo(x);
    const at::Tensor w = weight.contiguous();
    at::Tensor sums = at::zeros({3, geo.C}, x.options().dtype(at::kDouble));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dwconv3_bwd_cuda", [&] {
      scalar_t* gx = mask[0] ? grad_x.data_ptr<scalar_t>() : nullptr;
      with_conv<scalar_t>(g, w, axis, dilation, /*flip=*/true, cl,
                          {g.data_ptr(), x.data_ptr(), gx},
                          [&](const auto& src, const Geo& pg) {
                            BackwardOp<std::decay_t<decltype(src)>> op{src, x.data_ptr<scalar_t>(), gx};
                            launch_reduce<Sum<3>>(op, pg, cl, geo.C, x,
                                                  StoreSums{sums.data_ptr<double>(), geo.C});
                          });
    });
    grad_w = sums.t().to(weight.scalar_type()).reshape(weight.sizes()).contiguous();
  }
  return {grad_x, grad_w};
}

}  // namespace cuda
}  // namespace dabnet

TORCH_LIBRARY_IMPL(dabnet, CUDA, m) {
  m.impl("dwconv3", &dabnet::cuda::dwconv3);
  m.impl("dwconv3_backward", &dabnet::cuda::dwconv3_backward);
}
