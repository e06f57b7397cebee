// Building blocks of the CUDA kernels: a channel x position kernel that maps a functor ("op")
// over a tensor in packs of up to 16 bytes, and a deterministic per-channel reduction built on the
// same walk. The op interface is described above map_kernel.
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
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <type_traits>

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

// ------------------------------------------------------------------------- packed access
// V elements moved by one load or store instruction (16 bytes: LDG.128/STG.128).
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// Pack o (in units of packs) of p, or zeros when !ok (predicated: no branch).
template <typename T, int V>
__device__ __forceinline__ Pack<T, V> load_pack(const T* p, int64_t o, bool ok = true) {
  Pack<T, V> r;
  if (ok) {
    r = reinterpret_cast<const Pack<T, V>*>(p)[o];
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) r.v[k] = T(0);
  }
  return r;
}

template <typename T, int V>
__device__ __forceinline__ void store_pack(T* p, int64_t o, const Pack<T, V>& v) {
  reinterpret_cast<Pack<T, V>*>(p)[o] = v;
}

// How a kernel walks its tensors: V adjacent elements per access, V channels of one pixel in
// channels_last (CL) or V columns of one row in NCHW. V = 1 is the plain element walk.
template <int V_, bool CL_>
struct Lanes {
  static constexpr int V = V_;
  static constexpr bool CL = CL_ && V_ > 1;
  static constexpr int kC = CL ? V : 1;  // distinct channels in one access
  // Channel of lane k of channel group c (the walk's "channel" counts groups of kC).
  __host__ __device__ static int channel(int c, int k) { return CL ? c * V + k : c; }
  // Which per-channel constants lane k uses.
  __host__ __device__ static constexpr int slot(int k) { return CL ? k : 0; }
};

// The geometry of g in packs of V: channels_last groups V channels, NCHW V columns; every stride
// is then counted in packs. A stride of a size-1 dimension multiplies only 0 and may be anything.
inline Geo packed_geo(Geo g, bool cl, int V) {
  if (V == 1) return g;
  if (cl)
    g.C /= V;
  else
    g.W /= V;
  g.sN /= V, g.sC /= V, g.sH /= V, g.sW /= V;
  if (cl) g.sC = 1;
  else g.sW = 1;
  g.M = g.N * g.H * g.W;
  return g;
}

// Calls f(Lanes<V, cl>{}, packed geometry) with V = 16 bytes of T when the layout allows it
// (channels_last: C a multiple of V; NCHW: W a multiple of V, so a pack never straddles a row) and
// every pointer is 16-byte aligned (a storage offset may break that), else f(Lanes<1>{}, g).
template <typename T, typename F>
void with_lanes(const Geo& g, bool cl, std::initializer_list<const void*> ptrs, F&& f) {
  constexpr int V = 16 / int(sizeof(T));
  bool ok = (cl ? g.C : g.W) % V == 0;
  for (const void* p : ptrs) ok = ok && reinterpret_cast<uintptr_t>(p) % 16 == 0;
  if (ok && cl)
    f(Lanes<V, true>{}, packed_geo(g, true, V));
  else if (ok)
    f(Lanes<V, false>{}, packed_geo(g, false, V));
  else
    f(Lanes<1, false>{}, g);
}

// Calls f(std::integral_constant<int, r>{}) for a runtime r in [0, V): one instantiation per r.
template <int V, int R = 0, typename F>
void with_shift(int r, F&& f) {
  if constexpr (R < V) {
    if (r == R)
      f(std::integral_constant<int, R>{});
    else
      with_shift<V, R + 1>(r, f);
  }
}

// -------------------------------------------------------------------------------- map
// Every op: setup(c) once per thread (it keeps one channel group for life, so per-channel
// constants live in registers), Regs load(cursor, c), then store(c, regs) (map) or
// accumulate(c, regs, sums) (reduce), which may also store.
constexpr int kMapBatch = 2;  // positions in flight per thread in the map kernels
// In the reductions: 2, or 1 for ops that load 5 packs or more per position (the conv whose taps
// straddle packs: 2 made ptxas spill in bf16), which keeps 80 bytes in flight per thread anyway.
template <typename Op>
constexpr int kReduceBatch = Op::kPacks >= 5 ? 1 : 2;

// At least 2 blocks per SM (at most 128 registers): with every load of a batch in flight, ptxas
// otherwise held some fp16 stencils at 64 registers and spilled inside their loops.
template <typename Op>
__global__ void __launch_bounds__(kThreads, 2) map_kernel(const Op op, const Geo g) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= g.C) return;
  Op o = op;
  o.setup(c);
  typename Op::Regs r[kMapBatch];
  for_positions_batched<kMapBatch>(
      g, blockIdx.y, gridDim.y, threadIdx.y, blockDim.y,
      [&](int u, const Cursor& cur) { r[u] = o.load(cur, c); },
      [&](int u, const Cursor&) { o.store(c, r[u]); });
}

// An op written per element, operator()(cursor, c) (the neck's global path), on the same walk.
template <typename Op>
struct ElementOp {
  using Regs = Cursor;
  Op op;
  __device__ void setup(int c) { op.setup(c); }
  __device__ Regs load(const Cursor& cur, int) const { return cur; }
  __device__ void store(int c, const Regs& cur) const { op(cur, c); }
};

// Whether Op has a load() (a map op) or is written per element. C++17 (std::void_t), not a
// requires-expression: torch 2.11, the GPU machine's, builds extensions with -std=c++17.
template <typename Op, typename = void>
struct HasLoad : std::false_type {};
template <typename Op>
struct HasLoad<Op, std::void_t<decltype(&Op::load)>> : std::true_type {};

// g: the geometry in packs (packed_geo).
template <typename Op>
void launch_map(const Op& op, const Geo& g, bool cl) {
  if constexpr (!HasLoad<Op>::value) {
    launch_map(ElementOp<Op>{op}, g, cl);
  } else {
    if (g.M == 0 || g.C == 0) return;
    const Plan pl = plan(g, cl, 2 * kMapBatch);
    map_kernel<<<dim3(unsigned(pl.groups), unsigned(pl.chunks)), dim3(pl.cx, pl.py), 0,
                 stream()>>>(op, g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
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

// Stage 1: block (group, chunk) reduces its positions in a fixed tree over threadIdx.y and writes
// one partial per channel: partial[c * chunks + chunk]. No atomics. Op::kC channels per thread.
template <typename R, typename Op>
__global__ void __launch_bounds__(kThreads)
    reduce_kernel(const Op op, const Geo g, Vec<typename Op::acc_t, R::size>* partial) {
  using V = Vec<typename Op::acc_t, R::size>;
  constexpr int L = Op::kC;
  __shared__ V sh[kThreads][L];
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  V s[L] = {};
  if (c < g.C) {
    Op o = op;
    o.setup(c);
    typename Op::Regs r[kReduceBatch<Op>];
    // The loads of a batch are independent; they are summed in position order after it.
    for_positions_batched<kReduceBatch<Op>>(
        g, blockIdx.y, gridDim.y, threadIdx.y, blockDim.y,
        [&](int u, const Cursor& cur) { r[u] = o.load(cur, c); },
        [&](int u, const Cursor&) { o.accumulate(c, r[u], s); });
  }
  const int t = threadIdx.y * blockDim.x + threadIdx.x;
#pragma unroll
  for (int l = 0; l < L; ++l) sh[t][l] = s[l];
  __syncthreads();
  for (int stride = blockDim.y / 2; stride > 0; stride >>= 1) {
    if (threadIdx.y < stride)
      for (int l = 0; l < L; ++l) R::merge(sh[t][l], sh[t + stride * blockDim.x][l]);
    __syncthreads();
  }
  if (threadIdx.y == 0 && c < g.C)
    for (int l = 0; l < L; ++l)
      partial[int64_t(Op::channel(c, l)) * gridDim.y + blockIdx.y] = sh[t][l];
}

// Stage 2: block (c, j) merges channel c's partials j * kFinishSpan ... (at most kFinishSpan of
// them) in double, in one round of loads: thread t loads partials t, t + kThreads, ... all before
// its first add; then a fixed tree (shuffles within each warp, then across the warps).
// fin(c * gridDim.y + j, total) writes the result: fin(c, total) when one block takes a channel.
constexpr int kFinishLoads = 4;  // partials per thread, all in flight together
constexpr int kFinishSpan = kThreads * kFinishLoads;

template <typename R, typename T>
__device__ __forceinline__ void warp_merge(Vec<T, R::size>& s) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    Vec<T, R::size> o;
#pragma unroll
    for (int k = 0; k < R::size; ++k) o.v[k] = __shfl_down_sync(0xffffffffu, s.v[k], off);
    R::merge(s, o);
  }
}

template <typename R, typename T, typename Fin>
__global__ void __launch_bounds__(kThreads)
    finish_kernel(const Vec<T, R::size>* partial, int P, const Fin fin) {
  using V = Vec<double, R::size>;
  __shared__ V warp_sum[kThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const Vec<T, R::size>* p = partial + int64_t(blockIdx.x) * P + int64_t(blockIdx.y) * kFinishSpan;
  const int left = P - int(blockIdx.y) * kFinishSpan,
            n = left < kFinishSpan ? left : kFinishSpan;  // partials of this block
  Vec<T, R::size> v[kFinishLoads];
#pragma unroll
  for (int i = 0; i < kFinishLoads; ++i) {
    const int b = i * kThreads + threadIdx.x;
    if (b < n) v[i] = p[b];
    else v[i] = {};
  }
  V s = {};
#pragma unroll
  for (int i = 0; i < kFinishLoads; ++i) {
    V d;
#pragma unroll
    for (int k = 0; k < R::size; ++k) d.v[k] = double(v[i].v[k]);
    R::merge(s, d);
  }
  warp_merge<R>(s);
  if (lane == 0) warp_sum[warp] = s;
  __syncthreads();
  if (warp == 0) {
    s = lane < kThreads / 32 ? warp_sum[lane] : V{};
    warp_merge<R>(s);
    if (lane == 0) fin(int64_t(blockIdx.x) * gridDim.y + blockIdx.y, s);
  }
}

// fin of a level below the last: its totals are the next level's partials.
template <int K>
struct StorePartials {
  Vec<double, K>* out;
  __device__ void operator()(int64_t i, const Vec<double, K>& s) const { out[i] = s; }
};

// One finish launch: grid (C, blocks per channel).
template <typename R, typename T, typename Fin>
void finish_level(const Vec<T, R::size>* part, int C, int P, const Fin& fin) {
  const unsigned per_channel = unsigned((P + kFinishSpan - 1) / kFinishSpan);
  finish_kernel<R><<<dim3(unsigned(C), per_channel), kThreads, 0, stream()>>>(part, P, fin);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Merges P partials per channel into fin: one launch for up to kFinishSpan partials, else levels
// of kFinishSpan each (more than kFinishSpan chunks only for channels of ~2^20 positions or more).
template <typename R, typename T, typename Fin>
void launch_finish(const Vec<T, R::size>* part, int C, int P, const Fin& fin,
                   const at::Tensor& like) {
  if (P <= kFinishSpan) return finish_level<R>(part, C, P, fin);
  using V = Vec<double, R::size>;
  const int G = (P + kFinishSpan - 1) / kFinishSpan;
  const at::Tensor buf = at::empty({int64_t(C) * G * int64_t(sizeof(V))},
                                   like.options().dtype(at::kByte));
  V* next = reinterpret_cast<V*>(buf.data_ptr());
  finish_level<R>(part, C, P, StorePartials<R::size>{next});
  launch_finish<R>(static_cast<const V*>(next), C, G, fin, like);
}

// Positions per reducing thread: 8, halved (down to 2) while the grid has fewer blocks than
// kFillBlocks / packs (the loads in flight are the resident threads' packs: 1024 blocks of 256
// threads is ~8 per SM of a 132-SM GPU, for an op that loads one pack per position) and each
// channel's partials stay within one finish round. A function of the shape and the op only, never
// of the device, so the partials are merged in the same order everywhere.
constexpr int64_t kFillBlocks = 1024;
inline Plan reduce_plan(const Geo& g, bool cl, int packs) {
  Plan pl = plan(g, cl, 8);
  for (int per = 4; per >= 2 && pl.groups * pl.chunks * packs < kFillBlocks; per /= 2) {
    const Plan q = plan(g, cl, per);
    if (q.chunks > kFinishSpan) break;
    pl = q;
  }
  return pl;
}

// Reduces op over every position of every channel with reducer R; fin(c, Vec<double>) stores.
// g: the geometry in packs; C: the number of channels. Nothing runs when there are no positions.
template <typename R, typename Op, typename Fin>
void launch_reduce(const Op& op, const Geo& g, bool cl, int C, const at::Tensor& like,
                   const Fin& fin) {
  using V = Vec<typename Op::acc_t, R::size>;
  if (g.M == 0 || g.C == 0) return;
  const Plan pl = reduce_plan(g, cl, Op::kPacks);
  const at::Tensor buf = at::empty({int64_t(C) * pl.chunks * int64_t(sizeof(V))},
                                   like.options().dtype(at::kByte));
  V* part = reinterpret_cast<V*>(buf.data_ptr());
  reduce_kernel<R><<<dim3(unsigned(pl.groups), unsigned(pl.chunks)), dim3(pl.cx, pl.py), 0,
                     stream()>>>(op, g, part);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  launch_finish<R>(static_cast<const V*>(part), C, int(pl.chunks), fin, like);
}

// fin for Sum<K>: out[k * C + c] = total k (a (K, C) double tensor).
struct StoreSums {
  double* out;
  int C;
  template <int K>
  __device__ void operator()(int64_t c, const Vec<double, K>& s) const {
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

// ------------------------------------------------------------------ sources and ops
// A source gives, per pack, Regs load(cursor, c) and scalar_t value(regs, k) for lane k, and
// acc_t sample(ch): one value of channel ch (the shift of the statistics).

// The tensor itself.
template <typename scalar_t_, typename L_>
struct PlainSrc {
  using scalar_t = scalar_t_;
  using L = L_;
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr int kPacks = 1;  // packs loaded per position
  struct Regs {
    int64_t o;
    Pack<scalar_t, L::V> v;
  };
  const scalar_t* x;
  Geo g;       // in packs
  int64_t sc;  // channel stride in elements
  __device__ void setup(int) {}
  __device__ Regs load(const Cursor& cur, int c) const {
    Regs r;
    r.o = cur.off + int64_t(c) * g.sC;
    r.v = load_pack<scalar_t, L::V>(x, r.o);
    return r;
  }
  __device__ scalar_t value(const Regs& r, int k) const { return r.v.v[k]; }
  __device__ acc_t sample(int ch) const { return acc_t(x[int64_t(ch) * sc]); }
};

// out = value, or with Fold prelu(value * scale + shift, slope): an eval BatchNorm, or a training
// one with the batch statistics. The value is rounded to scalar_t first, as the backward
// recomputes it, so forward and backward take the same PReLU branch. Fold is a template
// parameter: a runtime flag costs the BN-PReLU arithmetic (then discarded) in the plain conv.
template <typename Src, bool Fold>
struct ApplyOp {
  using scalar_t = typename Src::scalar_t;
  using acc_t = typename Src::acc_t;
  using L = typename Src::L;
  using Regs = typename Src::Regs;
  Src src;
  scalar_t* out;
  BnParams<acc_t> bn;
  acc_t scale[L::kC], shift[L::kC], slope[L::kC];
  __device__ void setup(int c) {
    src.setup(c);
    if constexpr (Fold) {
#pragma unroll
      for (int j = 0; j < L::kC; ++j) {
        const BnChannel<acc_t> ch = bn.channel(L::channel(c, j));
        scale[j] = ch.scale, shift[j] = ch.shift, slope[j] = ch.slope;
      }
    }
  }
  __device__ Regs load(const Cursor& cur, int c) const { return src.load(cur, c); }
  __device__ void store(int, const Regs& r) const {
    Pack<scalar_t, L::V> y;
#pragma unroll
    for (int k = 0; k < L::V; ++k) {
      const int j = L::slot(k);
      const scalar_t v = src.value(r, k);
      if constexpr (Fold)
        y.v[k] = scalar_t(prelu(acc_t(v) * scale[j] + shift[j], slope[j]));
      else
        y.v[k] = v;
    }
    store_pack(out, r.o, y);
  }
};

// Batch statistics as shifted sums: sum(v - K) and sum((v - K)^2) with K = src.sample(c), a value
// of the channel, so the sums do not cancel when |mean| >> std; no division per element, and
// partials add exactly as sums (every partial of a channel has the same shift).
template <typename Src>
struct StatsOp {
  using acc_t = typename Src::acc_t;
  using L = typename Src::L;
  using Regs = typename Src::Regs;
  static constexpr int kC = L::kC, kPacks = Src::kPacks;
  Src src;
  acc_t K[L::kC];
  __host__ __device__ static int channel(int c, int k) { return L::channel(c, k); }
  __device__ void setup(int c) {
    src.setup(c);
#pragma unroll
    for (int j = 0; j < L::kC; ++j) K[j] = src.sample(L::channel(c, j));
  }
  __device__ Regs load(const Cursor& cur, int c) const { return src.load(cur, c); }
  __device__ void accumulate(int, const Regs& r, Vec<acc_t, 2>* s) const {
#pragma unroll
    for (int k = 0; k < L::V; ++k) {
      const int j = L::slot(k);
      const acc_t d = acc_t(src.value(r, k)) - K[j];
      s[j].v[0] += d;
      s[j].v[1] += d * d;
    }
  }
};

// fin of the statistics: batch mean and biased variance in the accumulation type.
template <typename Src, typename T>
struct StoreMeanVar {
  Src src;
  T *mean, *var;
  double M;  // elements per channel
  __device__ void operator()(int64_t c, const Vec<double, 2>& s) const {
    const double m1 = s.v[0] / M;
    mean[c] = T(double(src.sample(int(c))) + m1);
    var[c] = T(fmax(s.v[1] / M - m1 * m1, 0.0));
  }
};

// Batch mean and variance of src's values into mean and var (accumulation type, C channels).
template <typename Src>
void batch_stats(const Src& src, const Geo& pg, bool cl, int C, int64_t M, const at::Tensor& like,
                 at::Tensor& mean, at::Tensor& var) {
  using acc_t = typename Src::acc_t;
  launch_reduce<Sum<2>>(StatsOp<Src>{src}, pg, cl, C, like,
                        StoreMeanVar<Src, acc_t>{src, mean.data_ptr<acc_t>(),
                                                 var.data_ptr<acc_t>(), double(M)});
}

}  // namespace cuda
}  // namespace dabnet
