// Index math and per-pixel arithmetic of the CUDA kernels, callable from host and device and free
// of CUDA and torch headers, so tests/cpp/cuda_index_test.cpp runs this very code on the host
// (emulating blocks and threads with loops) and checks it against a naive implementation.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define DABNET_HD __host__ __device__ __forceinline__
// Put before a host/device template that kernels instantiate with device-only functors: it
// silences nvcc's host/device call check for those instantiations (they never run on the host).
#define DABNET_EXEC_CHECK_DISABLE _Pragma("nv_exec_check_disable")
#define DABNET_UNROLL _Pragma("unroll")
#else
#define DABNET_HD inline
#define DABNET_EXEC_CHECK_DISABLE
#define DABNET_UNROLL
#endif

namespace dabnet {
namespace cuda {

constexpr int kThreads = 256;  // threads per block of every kernel

// Sizes and element strides of an (N, C, H, W) tensor. NCHW and channels_last differ only in the
// strides, so one kernel serves both. A dimension of size 1 never multiplies a nonzero index, so
// tensors of equal sizes in the same memory format share one Geo.
struct Geo {
  int64_t N;
  int C, H, W;
  int64_t sN, sC, sH, sW;
  int64_t M;  // positions (n, h, w) per channel: N*H*W
  DABNET_HD int64_t offset(int64_t n, int c, int h, int w) const {
    return n * sN + c * sC + h * sH + w * sW;
  }
};

// Position p = (n*H + h)*W + w, advanced in fixed steps without division: the step is decomposed
// once into (n, h, w) with h < H and w < W, so each advance carries at most once per digit.
// It also carries off = n*sN + h*sH + w*sW, the offset of (n, 0, h, w), advanced by additions
// only (no 64-bit multiply per position).
struct Cursor {
  int64_t n;
  int h, w;
  int64_t off;
  Cursor() = default;
  DABNET_HD Cursor(const Geo& g, int64_t p) {
    const int64_t q = p / g.W;
    w = int(p - q * g.W);
    n = q / g.H;
    h = int(q - n * g.H);
    off = n * g.sN + h * g.sH + w * g.sW;
  }
  DABNET_HD void advance(const Cursor& step, const Geo& g) {
    w += step.w;
    h += step.h;
    n += step.n;
    off += step.off;
    if (w >= g.W) {
      w -= g.W;
      ++h;
      off += g.sH - g.W * g.sW;
    }
    if (h >= g.H) {
      h -= g.H;
      ++n;
      off += g.sN - g.H * g.sH;
    }
  }
};

// Launch shape of the channel x position kernels: block (cx channels, py positions), grid
// (groups of cx channels, chunks of positions). It depends on the shape only, never on the device,
// so the reductions, which merge per block in a fixed order, are deterministic.
struct Plan {
  int cx, py;
  int64_t groups;
  int64_t chunks;
};

constexpr int64_t kMaxChunk = int64_t(1) << 24;  // positions per block: float counts stay exact
constexpr int64_t kMaxChunks = 65535;            // gridDim.y limit

// NCHW: a block walks one channel's contiguous positions. channels_last: threadIdx.x runs over
// adjacent channels, so a warp reads contiguous memory in both layouts.
inline Plan plan(const Geo& g, bool cl, int per_thread) {
  Plan p;
  p.cx = 1;
  if (cl)
    while (p.cx < 32 && p.cx < g.C) p.cx *= 2;
  p.py = kThreads / p.cx;
  p.groups = (int64_t(g.C) + p.cx - 1) / p.cx;
  const int64_t per_block = int64_t(p.py) * per_thread;
  int64_t chunks = (g.M + per_block - 1) / per_block;
  const int64_t least = (g.M + kMaxChunk - 1) / kMaxChunk;
  if (chunks < least) chunks = least;
  if (chunks > kMaxChunks) chunks = kMaxChunks;
  p.chunks = chunks < 1 ? 1 : chunks;
  return p;
}

// Thread ty of chunk b (of P) visits positions b*M/P + ty, + py, ... below (b+1)*M/P: f(cursor, p).
DABNET_EXEC_CHECK_DISABLE
template <typename F>
DABNET_HD void for_positions(const Geo& g, int64_t b, int64_t P, int ty, int py, F&& f) {
  const int64_t p0 = b * g.M / P, p1 = (b + 1) * g.M / P;
  if (p0 + ty >= p1) return;
  Cursor cur(g, p0 + ty);
  const Cursor step(g, py);
  for (int64_t p = p0 + ty; p < p1; p += py) {
    f(cur, p);
    cur.advance(step, g);
  }
}

// As for_positions, in batches of U positions: load(u, cursor) for every position of a batch
// first, then store(u, cursor) for each, so a thread keeps U independent loads in flight (a load
// can never wait behind an earlier store of the same thread, which the compiler must assume
// aliases it). The positions, and their order within each phase, are those of for_positions.
DABNET_EXEC_CHECK_DISABLE
template <int U, typename L, typename S>
DABNET_HD void for_positions_batched(const Geo& g, int64_t b, int64_t P, int ty, int py, L&& load,
                                     S&& store) {
  const int64_t p0 = b * g.M / P, p1 = (b + 1) * g.M / P;
  if (p0 + ty >= p1) return;
  Cursor cur(g, p0 + ty);
  const Cursor step(g, py);
  // Positions left for this thread, counted in 32 bits (p1 - p0 <= kMaxChunk).
  int left = int((p1 - p0 - ty + py - 1) / py);
  for (; left > 0; left -= U) {
    Cursor at[U];
    DABNET_UNROLL
    for (int u = 0; u < U; ++u) {
      at[u] = cur;
      if (u < left) load(u, at[u]);
      cur.advance(step, g);
    }
    DABNET_UNROLL
    for (int u = 0; u < U; ++u)
      if (u < left) store(u, at[u]);
  }
}

template <typename T>
DABNET_HD T prelu(T s, T a) {
  return s > T(0) ? s : a * s;
}

// ------------------------------------------------------------------------------ DAB neck
// One channel's BN-folded neck parameters: convs [3x1, 1x3, dilated 3x1, dilated 1x3] with taps w,
// bias b and PReLU slope a, then the final BN-PReLU (fs, ft, fa) of the branch sum.
template <typename T>
struct NeckChannel {
  T w[4][3], b[4], a[4], fs, ft, fa;
};

// The neck at one pixel (h, w). x.at(dr, dc) is the input at (h+dr, w+dc), zero outside the image;
// x.col_in(dc) says whether column w+dc lies inside it. A first conv's output is zero outside the
// image (the 1x3 conv zero-pads its own input), not prelu(bias).
template <typename T, typename Src>
DABNET_HD T neck_point(const Src& x, const NeckChannel<T>& p, int d) {
  T t1[3], t2[3];
  for (int k = 0; k < 3; ++k) {
    const int c1 = k - 1, c2 = (k - 1) * d;
    t1[k] = x.col_in(c1) ? prelu(p.b[0] + p.w[0][0] * x.at(-1, c1) + p.w[0][1] * x.at(0, c1) +
                                     p.w[0][2] * x.at(1, c1),
                                 p.a[0])
                         : T(0);
    t2[k] = x.col_in(c2) ? prelu(p.b[2] + p.w[2][0] * x.at(-d, c2) + p.w[2][1] * x.at(0, c2) +
                                     p.w[2][2] * x.at(d, c2),
                                 p.a[2])
                         : T(0);
  }
  const T b1 = prelu(p.b[1] + p.w[1][0] * t1[0] + p.w[1][1] * t1[1] + p.w[1][2] * t1[2], p.a[1]);
  const T b2 = prelu(p.b[3] + p.w[3][0] * t2[0] + p.w[3][1] * t2[1] + p.w[3][2] * t2[2], p.a[3]);
  return prelu(p.fs * (b1 + b2) + p.ft, p.fa);
}

// Input read straight from global memory (the path for dilations the tile does not hold).
template <typename T, typename S>
struct GlobalSrc {
  const S* x;
  int64_t off;  // offset of (n, c, h, w)
  const Geo& g;
  int h, w;
  DABNET_HD bool col_in(int dc) const { return w + int64_t(dc) >= 0 && w + int64_t(dc) < g.W; }
  DABNET_HD T at(int dr, int dc) const {
    const int64_t r = h + int64_t(dr);
    return r >= 0 && r < g.H && col_in(dc) ? T(x[off + dr * g.sH + dc * g.sW]) : T(0);
  }
};

// Input read from a tile staged in shared memory, zero-filled outside the image.
template <typename T, typename S, int CT>
struct TileSrc {
  const S* tile;
  int base;  // index of (h, w, c) in the tile
  int row;   // tile row stride (elements)
  int w, W;
  DABNET_HD bool col_in(int dc) const { return w + dc >= 0 && w + dc < W; }
  DABNET_HD T at(int dr, int dc) const { return T(tile[base + dr * row + dc * CT]); }
};

constexpr int kMaxTileDilation = 16;  // larger dilations take the global-memory path

// An output tile of TH x TW pixels and CT channels of one image, staged with a halo of d rows and
// columns on each side: tile element e = (row*RW + col)*CT + ct, channel fastest, then column, so
// consecutive threads read consecutive addresses in both layouts (CT = 1 for NCHW).
template <int CT, int TH, int TW>
struct NeckTile {
  static_assert(kThreads % CT == 0, "a thread must keep one channel across its outputs");
  static constexpr int kCT = CT;
  static constexpr int kOutputs = TH * TW * CT;
  int d, RW, RH;
  int64_t n;
  int c0, h0, w0;

  DABNET_HD static int64_t tiles_w(const Geo& g) { return (g.W + TW - 1) / TW; }
  DABNET_HD static int64_t tiles_h(const Geo& g) { return (g.H + TH - 1) / TH; }
  DABNET_HD static int64_t groups(const Geo& g) { return (g.C + CT - 1) / CT; }
  DABNET_HD static int64_t blocks(const Geo& g) {
    return g.N * groups(g) * tiles_h(g) * tiles_w(g);
  }
  DABNET_HD static int64_t elems(int d) { return int64_t(TH + 2 * d) * (TW + 2 * d) * CT; }

  // Block b: column tiles fastest, so neighbouring blocks share their halos in L2.
  DABNET_HD NeckTile(const Geo& g, int d_, int64_t b) : d(d_), RW(TW + 2 * d_), RH(TH + 2 * d_) {
    const int64_t tw = tiles_w(g), th = tiles_h(g), gr = groups(g);
    w0 = int(b % tw) * TW;
    b /= tw;
    h0 = int(b % th) * TH;
    b /= th;
    c0 = int(b % gr) * CT;
    n = b / gr;
  }

  // Stages tile element e: the input at (h0-d+row, w0-d+col, c0+ct), or zero outside the tensor.
  template <typename S>
  DABNET_HD void stage(const S* x, S* tile, const Geo& g, int e) const {
    const int ct = e % CT, q = e / CT, col = q % RW, row = q / RW;
    const int h = h0 - d + row, w = w0 - d + col, c = c0 + ct;
    const bool in = h >= 0 && h < g.H && w >= 0 && w < g.W && c < g.C;
    tile[e] = in ? x[g.offset(n, c, h, w)] : S(0);
  }

  // Output element e (same channel order as stage) from the staged tile, if inside the tensor.
  template <typename T, typename S>
  DABNET_HD void output(const S* tile, S* out, const Geo& g, const NeckChannel<T>& p, int e) const {
    const int ct = e % CT, q = e / CT, col = q % TW, row = q / TW;
    const int h = h0 + row, w = w0 + col, c = c0 + ct;
    if (h >= g.H || w >= g.W || c >= g.C) return;
    const TileSrc<T, S, CT> src{tile, ((row + d) * RW + col + d) * CT + ct, RW * CT, w, g.W};
    out[g.offset(n, c, h, w)] = S(neck_point(src, p, d));
  }
};

// The tile of each layout: NCHW tiles are wide rows of one channel; channels_last tiles hold
// 32 bytes of channels per pixel (one memory sector) over 8 x 8 pixels.
template <typename S, bool CL>
using NeckTileFor = NeckTile<CL ? int(32 / sizeof(S)) : 1, CL ? 8 : 16, CL ? 8 : 64>;

}  // namespace cuda
}  // namespace dabnet
