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
#define DABNET_PRAGMA(x) _Pragma(#x)
#define DABNET_UNROLL(n) DABNET_PRAGMA(unroll n)  // nvcc's unroll factor for the loop that follows
#define DABNET_UNROLL_ALL _Pragma("unroll")        // the loop that follows, fully unrolled
#else
#define DABNET_UNROLL(n)
#define DABNET_UNROLL_ALL
#define DABNET_HD inline
#define DABNET_EXEC_CHECK_DISABLE
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
    DABNET_UNROLL_ALL
    for (int u = 0; u < U; ++u) {
      at[u] = cur;
      if (u < left) load(u, at[u]);
      cur.advance(step, g);
    }
    DABNET_UNROLL_ALL
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

// Conv k of the neck (NeckChannel order) at one pixel from its three taps, with bias and PReLU.
template <typename T>
DABNET_HD T neck_conv(const NeckChannel<T>& p, int k, T x0, T x1, T x2) {
  return prelu(p.b[k] + p.w[k][0] * x0 + p.w[k][1] * x1 + p.w[k][2] * x2, p.a[k]);
}

// The final BN-PReLU of the two branches' sum.
template <typename T>
DABNET_HD T neck_final(const NeckChannel<T>& p, T b1, T b2) {
  return prelu(p.fs * (b1 + b2) + p.ft, p.fa);
}

// The neck at one pixel (h, w). x.at(dr, dc) is the input at (h+dr, w+dc), zero outside the image;
// x.col_in(dc) says whether column w+dc lies inside it. A first conv's output is zero outside the
// image (the 1x3 conv zero-pads its own input), not prelu(bias).
template <typename T, typename Src>
DABNET_HD T neck_point(const Src& x, const NeckChannel<T>& p, int d) {
  T t1[3], t2[3];
  for (int k = 0; k < 3; ++k) {
    const int c1 = k - 1, c2 = (k - 1) * d;
    t1[k] = x.col_in(c1) ? neck_conv(p, 0, x.at(-1, c1), x.at(0, c1), x.at(1, c1)) : T(0);
    t2[k] = x.col_in(c2) ? neck_conv(p, 2, x.at(-d, c2), x.at(0, c2), x.at(d, c2)) : T(0);
  }
  return neck_final(p, neck_conv(p, 1, t1[0], t1[1], t1[2]), neck_conv(p, 3, t2[0], t2[1], t2[2]));
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

constexpr int kMaxTileDilation = 16;  // larger dilations take the global-memory path

// The halo a ring is compiled for: the smallest of 2, 4, 8, 16 that holds dilation d.
DABNET_HD constexpr int neck_halo(int d) { return d <= 2 ? 2 : d <= 4 ? 4 : d <= 8 ? 8 : 16; }

// Eval neck in shared memory, streaming rows. A block owns CT channels x TW columns of one image
// over a segment of rows, and walks down it TR output rows per step. Each staged input row has
// TW + 2D columns (a halo of D each side) x CT channels, element f = col * CT + ct (channel
// fastest: consecutive threads touch consecutive addresses in both layouts). Thread f owns element
// f of every row: it stages it, runs both vertical convs on it and (inside the halo) writes its
// output column; kBlock = kRowElems rounded up to whole warps (threads past kRowElems stage zeros).
// Ring row j is input row h0 - D + j; a step reads kRows = TR + 2D consecutive ring rows, so each
// input row is staged once per segment: halos cost only in W (and 2D rows per segment). The ring is
// kept in x's type (half the shared memory of float for 16-bit types), each row in two slots,
// j % kRows and j % kRows + kRows, so that a step's kRows rows are contiguous from its first slot:
// every ring and phase-A address of a step is one register plus a constant.
//
// A step has two phases, each pixel's work done once (not once per output that needs it):
//  A. the vertical convs (3x1 and dilated 3x1, bias, PReLU) at every staged element of the step's
//     TR rows, zero outside the image (column()), into two arrays of TR x kBlock (mid). A thread
//     reads only its own ring column: no barrier between staging and phase A;
//  B. the horizontal convs from three of those values each, and the final BN-PReLU: one write.
// All shapes are constants: no runtime division in the index math.
template <int CT, int TW, int TR, int D>
struct NeckRing {
  static constexpr int kCT = CT, kTR = TR, kD = D;
  static constexpr int kRowElems = (TW + 2 * D) * CT;  // elements of one staged row
  static constexpr int kRows = TR + 2 * D;             // ring slots
  static constexpr int kBlock = (kRowElems + 31) / 32 * 32;  // threads, and a row's stride
  static constexpr int kMid = TR * kBlock;             // one branch's phase-A values
  static constexpr int kRing = 2 * kRows * kBlock;     // the ring: each row in two slots
  static_assert(kBlock % CT == 0, "a thread must keep one channel");
  static_assert(kBlock <= 1024, "one thread per staged element of a row");
  // Shortest segment: at most 2x the rows staged, and two steps, so every ring wraps.
  static constexpr int kLeastSeg = 2 * TR > 2 * D ? 2 * TR : 2 * D;
  // Shared memory: phase A (T, the accumulation type) first, then the ring (S, x's type).
  template <typename S, typename T>
  static constexpr int64_t bytes() {
    return 2 * kMid * int64_t(sizeof(T)) + kRing * int64_t(sizeof(S));
  }

  int64_t n;
  int c0, h0, w0, rows;  // rows: output rows of this block's segment inside the image

  DABNET_HD static int64_t groups(const Geo& g) { return (g.C + CT - 1) / CT; }
  DABNET_HD static int64_t tiles_w(const Geo& g) { return (g.W + TW - 1) / TW; }
  DABNET_HD static int64_t segments(const Geo& g, int seg) { return (g.H + seg - 1) / seg; }
  DABNET_HD static int64_t blocks(const Geo& g, int seg) {
    return g.N * groups(g) * tiles_w(g) * segments(g, seg);
  }
  // Rows per segment: all of H, halved (in whole steps, down to kLeastSeg) while the grid has
  // fewer than 1024 blocks: short segments stage more rows but fill the GPU.
  DABNET_HD static int segment(const Geo& g) {
    int seg = (g.H + TR - 1) / TR * TR;
    while (seg / 2 >= kLeastSeg && blocks(g, seg) < 1024) seg = (seg / 2 + TR - 1) / TR * TR;
    return seg;
  }

  // Block b: channel groups fastest (blocks in flight share pixels' sectors in L2), then columns.
  DABNET_HD NeckRing(const Geo& g, int seg, int64_t b) {
    const int64_t gr = groups(g), tw = tiles_w(g), sg = segments(g, seg);
    c0 = int(b % gr) * CT;
    b /= gr;
    w0 = int(b % tw) * TW;
    b /= tw;
    h0 = int(b % sg) * seg;
    n = b / sg;
    rows = g.H - h0 < seg ? g.H - h0 : seg;
  }
  DABNET_HD int steps() const { return (rows + TR - 1) / TR; }

  // Thread f's parameters: its channel's, with the vertical convs zeroed where its column lies
  // outside the image (a 1x3 conv's input is zero there; its staged inputs are zero too, so both
  // convs give prelu(0) = 0 without a select per element).
  template <typename T>
  DABNET_HD NeckChannel<T> column(NeckChannel<T> p, const Geo& g, int f) const {
    const int w = w0 - D + f / CT;
    if (w < 0 || w >= g.W)
      for (int k = 0; k < 3; k += 2) {
        p.b[k] = T(0);
        for (int j = 0; j < 3; ++j) p.w[k][j] = T(0);
      }
    return p;
  }

  template <typename S>
  struct Staged {
    S v[TR];
  };

  // Ring rows j0 .. j0+TR-1 of element f into registers, zero outside the tensor.
  template <typename S>
  DABNET_HD void load(const S* x, const Geo& g, int j0, int f, Staged<S>& s) const {
    const int h = h0 - D + j0, w = w0 - D + f / CT, c = c0 + f % CT;
    const bool ok = f < kRowElems && w >= 0 && w < g.W && c < g.C;
    const S* px = x + (ok ? g.offset(n, c, h, w) : 0);
    DABNET_UNROLL_ALL
    for (int r = 0; r < TR; ++r, px += g.sH)  // a running pointer: one add a row
      s.v[r] = ok && unsigned(h + r) < unsigned(g.H) ? *px : S(0.f);
  }

  // The registers of load(j0) into both slots of each row.
  template <typename S>
  DABNET_HD void store(S* ring, int j0, int f, const Staged<S>& s) const {
    const int s0 = j0 % kRows;  // a constant modulus: no division
    S* a = ring + s0 * kBlock + f;
    DABNET_UNROLL_ALL
    for (int r = 0; r < TR; ++r) {
      a[r * kBlock] = s.v[r];                                           // slot s0 + r < 2 kRows
      a[(r + (s0 + r < kRows ? kRows : -kRows)) * kBlock] = s.v[r];  // its twin
    }
  }

  // Phase A of step k: both vertical convs at element f of the step's TR rows. Rows h-1, h, h+1
  // slide through registers (one new read a row); rows h-d and h+d are read at constant offsets
  // from two pointers.
  template <typename S, typename T>
  DABNET_HD void vertical(const S* ring, T* mid, const NeckChannel<T>& p, int d, int k,
                          int f) const {
    const S* x = ring + ((k * TR) % kRows + D) * kBlock + f;  // input row h0 + k*TR
    const S *up = x - d * kBlock, *down = x + d * kBlock;
    T* m = mid + f;
    T x0 = T(x[-kBlock]), x1 = T(x[0]);
    DABNET_UNROLL_ALL
    for (int i = 0; i < TR; ++i) {
      const T x2 = T(x[(i + 1) * kBlock]);
      m[i * kBlock] = neck_conv(p, 0, x0, x1, x2);
      m[kMid + i * kBlock] = neck_conv(p, 2, T(up[i * kBlock]), x1, T(down[i * kBlock]));
      x0 = x1;
      x1 = x2;
    }
  }

  // Phase B of step k: the outputs of element f's column (a thread inside the halo), from three
  // phase-A values of each branch.
  template <typename T, typename S>
  DABNET_HD void horizontal(const T* mid, S* out, const Geo& g, const NeckChannel<T>& p, int d,
                            int k, int f) const {
    const int col = f / CT - D, c = c0 + f % CT;
    if (col < 0 || col >= TW || w0 + col >= g.W || c >= g.C) return;
    const int last = rows - k * TR < TR ? rows - k * TR : TR, dc = d * CT;
    const T *t1 = mid + f, *t2 = t1 + kMid, *t2l = t2 - dc, *t2r = t2 + dc;
    S* po = out + g.offset(n, c, h0 + k * TR, w0 + col);
    DABNET_UNROLL_ALL
    for (int i = 0; i < TR; ++i, po += g.sH) {
      const int o = i * kBlock;
      // Computed whatever i, stored below the image's last row only: a predicated store, not a
      // branch around the arithmetic (which would recompute the addresses in each branch).
      const S y = S(neck_final(p, neck_conv(p, 1, t1[o - CT], t1[o], t1[o + CT]),
                               neck_conv(p, 3, t2l[o], t2[o], t2r[o])));
      if (i < last) *po = y;
    }
  }
};

// The ring of each layout and halo D, T the accumulation type. A step loads TR x (TW + 2D) x CT
// inputs, issued together before the step's arithmetic.
// NCHW: one channel, 128 columns, 16 rows. channels_last: 32 bytes of staged channels per pixel
// (8 float, 4 double) over 32 columns, 8 rows; at D = 16, 16 bytes over 64 columns (the halo costs
// 1.5x, not 2x; the ring of 40 rows of 96 pixels fits twice per SM for 16-bit types).
template <typename T, bool CL, int D>
using NeckRingFor = NeckRing<CL ? int((D == 16 ? 16 : 32) / sizeof(T)) : 1,
                             CL ? (D == 16 ? 64 : 32) : 128, CL ? 8 : 16, D>;

}  // namespace cuda
}  // namespace dabnet
