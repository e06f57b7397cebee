// Building blocks of the CUDA kernels: a channel x position kernel that maps a per-element functor
// over a tensor, and a deterministic per-channel reduction built on the same walk.
//
// Every functor ("op") has  setup(c)  run once per thread (a thread keeps one channel for its
// whole life, so per-channel constants live in registers) and  operator()(cursor, c).
#pragma once
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <limits>

#include "../layout.h"
#include "index.h"

namespace dabnet {
namespace cuda {

inline Geo make_geo(const at::Tensor& x) {
  constexpr int64_t kMax = std::numeric_limits<int>::max();
  TORCH_CHECK(x.size(1) <= kMax && x.size(2) <= kMax && x.size(3) <= kMax,
              "dabnet: C, H and W must each be below 2^31, got ", x.sizes());
  Geo g;
  g.N = x.size(0);
  g.C = int(x.size(1));
  g.H = int(x.size(2));
  g.W = int(x.size(3));
  g.sN = x.stride(0);
  g.sC = x.stride(1);
  g.sH = x.stride(2);
  g.sW = x.stride(3);
  g.M = g.N * g.H * g.W;
  TORCH_CHECK(g.M <= kMaxChunk * kMaxChunks, "dabnet: too many positions per channel (", g.M, ")");
  return g;
}

inline cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }

// A dilation of H or W or more reads only padding, so it is clamped into int range.
inline int clamp_dilation(int64_t d, const Geo& g) {
  return int(std::min<int64_t>(d, std::max(g.H, g.W)));
}

// -------------------------------------------------------------------------------- map
template <typename Op>
__global__ void __launch_bounds__(kThreads) map_kernel(const Op op, const Geo g) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= g.C) return;
  Op o = op;
  o.setup(c);
  for_positions(g, blockIdx.y, gridDim.y, threadIdx.y, blockDim.y,
                [&](const Cursor& cur, int64_t) { o(cur, c); });
}

template <typename Op>
void launch_map(const Op& op, const Geo& g, bool cl) {
  if (g.M == 0 || g.C == 0) return;
  const Plan pl = plan(g, cl, 4);
  map_kernel<<<dim3(unsigned(pl.groups), unsigned(pl.chunks)), dim3(pl.cx, pl.py), 0, stream()>>>(
      op, g);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------- reduce
template <typename T, int K>
struct Vec {
  T v[K];
};

// Per-channel sums of K quantities.
template <int K>
struct Sum {
  static constexpr int size = K;
  template <typename T>
  static __device__ __forceinline__ void merge(Vec<T, K>& a, const Vec<T, K>& b) {
#pragma unroll
    for (int k = 0; k < K; ++k) a.v[k] += b.v[k];
  }
};

// (count, mean, M2) with Chan et al.'s merge; an element x enters as (1, x, 0). Mean and variance
// in one pass without the cancellation of sum/sum-of-squares.
struct Welford {
  static constexpr int size = 3;
  template <typename T>
  static __device__ __forceinline__ void merge(Vec<T, 3>& a, const Vec<T, 3>& b) {
    if (b.v[0] == T(0)) return;
    const T n = a.v[0] + b.v[0], r = b.v[0] / n, delta = b.v[1] - a.v[1];
    a.v[1] += delta * r;
    a.v[2] += b.v[2] + delta * delta * a.v[0] * r;
    a.v[0] = n;
  }
};

// Stage 1: block (group, chunk) reduces its positions in a fixed tree over threadIdx.y and writes
// one partial per channel: partial[c * chunks + chunk]. No atomics.
template <typename R, typename Op>
__global__ void __launch_bounds__(kThreads)
    reduce_kernel(const Op op, const Geo g, Vec<typename Op::acc_t, R::size>* partial) {
  using V = Vec<typename Op::acc_t, R::size>;
  __shared__ V sh[kThreads];
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  V s = {};
  if (c < g.C) {
    Op o = op;
    o.setup(c);
    for_positions(g, blockIdx.y, gridDim.y, threadIdx.y, blockDim.y,
                  [&](const Cursor& cur, int64_t) { R::merge(s, o(cur, c)); });
  }
  const int t = threadIdx.y * blockDim.x + threadIdx.x;
  sh[t] = s;
  __syncthreads();
  for (int stride = blockDim.y / 2; stride > 0; stride >>= 1) {
    if (threadIdx.y < stride) R::merge(sh[t], sh[t + stride * blockDim.x]);
    __syncthreads();
  }
  if (threadIdx.y == 0 && c < g.C) partial[int64_t(c) * gridDim.y + blockIdx.y] = sh[t];
}

// Stage 2: one warp per channel merges its partials in double: lane l takes partials l, l+32, ...
// in order, then a fixed shuffle tree. fin(c, total) writes the result.
template <typename R, typename T, typename Fin>
__global__ void __launch_bounds__(kThreads)
    finish_kernel(const Vec<T, R::size>* partial, int C, int P, const Fin fin) {
  using V = Vec<double, R::size>;
  const int lane = threadIdx.x % 32;
  const int c = blockIdx.x * (kThreads / 32) + threadIdx.x / 32;
  if (c >= C) return;  // per warp: all of its lanes leave together
  V s = {};
  for (int b = lane; b < P; b += 32) {
    V v;
#pragma unroll
    for (int k = 0; k < R::size; ++k) v.v[k] = double(partial[int64_t(c) * P + b].v[k]);
    R::merge(s, v);
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    V o;
#pragma unroll
    for (int k = 0; k < R::size; ++k) o.v[k] = __shfl_down_sync(0xffffffffu, s.v[k], off);
    R::merge(s, o);
  }
  if (lane == 0) fin(c, s);
}

// Reduces op over every position of every channel with reducer R; fin(c, Vec<double>) stores.
// Nothing runs when there are no positions (the caller handles empty tensors).
template <typename R, typename Op, typename Fin>
void launch_reduce(const Op& op, const Geo& g, bool cl, const at::Tensor& like, const Fin& fin) {
  using V = Vec<typename Op::acc_t, R::size>;
  if (g.M == 0 || g.C == 0) return;
  const Plan pl = plan(g, cl, 32);
  const at::Tensor buf = at::empty({int64_t(g.C) * pl.chunks * int64_t(sizeof(V))},
                                   like.options().dtype(at::kByte));
  V* part = reinterpret_cast<V*>(buf.data_ptr());
  reduce_kernel<R><<<dim3(unsigned(pl.groups), unsigned(pl.chunks)), dim3(pl.cx, pl.py), 0,
                     stream()>>>(op, g, part);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const unsigned blocks = unsigned((int64_t(g.C) + kThreads / 32 - 1) / (kThreads / 32));
  finish_kernel<R><<<blocks, kThreads, 0, stream()>>>(part, g.C, int(pl.chunks), fin);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// fin for Sum<K>: out[k * C + c] = total k (a (K, C) double tensor).
struct StoreSums {
  double* out;
  int C;
  template <int K>
  __device__ void operator()(int c, const Vec<double, K>& s) const {
#pragma unroll
    for (int k = 0; k < K; ++k) out[int64_t(k) * C + c] = s.v[k];
  }
};

// ----------------------------------------------------------------------- BatchNorm
// Per-channel BN + PReLU parameters converted to the accumulation type on x's device.
struct BnTensors {
  at::Tensor w, b, mean, var, slope;
  double eps;
};

inline BnTensors bn_tensors(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                            const at::Tensor& mean, const at::Tensor& var,
                            const at::Tensor& slope, double eps) {
  const auto acc = stat_type(x);  // = at::opmath_type of x's dtype
  auto cvt = [&](const at::Tensor& t) { return t.detach().to(acc).contiguous(); };
  return {cvt(w), cvt(b), cvt(mean), cvt(var), cvt(slope), eps};
}

template <typename T>
struct BnChannel {
  T scale, shift, mean, invstd, slope;
};

template <typename T>
struct BnParams {
  const T *w = nullptr, *b = nullptr, *mean = nullptr, *var = nullptr, *slope = nullptr;
  bool single_slope = false;
  T eps = 0;
  static BnParams of(const BnTensors& t) {
    BnParams p;
    p.w = t.w.data_ptr<T>();
    p.b = t.b.data_ptr<T>();
    p.mean = t.mean.data_ptr<T>();
    p.var = t.var.data_ptr<T>();
    p.slope = t.slope.data_ptr<T>();
    p.single_slope = t.slope.numel() == 1;
    p.eps = T(t.eps);
    return p;
  }
  // y = x * scale + shift = (x - mean) * invstd * w + b.
  __device__ BnChannel<T> channel(int c) const {
    BnChannel<T> ch;
    ch.invstd = T(1) / sqrt(var[c] + eps);
    ch.mean = mean[c];
    ch.scale = w[c] * ch.invstd;
    ch.shift = b[c] - mean[c] * ch.scale;
    ch.slope = slope[single_slope ? 0 : c];
    return ch;
  }
};

}  // namespace cuda
}  // namespace dabnet
