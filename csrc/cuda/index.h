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
// aliases it). The stored positions, and their order, are those of for_positions; so are the
// loaded ones, except that the last batch loads the thread's first position in place of
// positions past the end (load must be free of side effects).
DABNET_EXEC_CHECK_DISABLE
template <int U, typename L, typename S>
DABNET_HD void for_positions_batched(const Geo& g, int64_t b, int64_t P, int ty, int py, L&& load,
                                     S&& store) {
  const int64_t p0 = b * g.M / P, p1 = (b + 1) * g.M / P;
  if (p0 + ty >= p1) return;
  Cursor cur(g, p0 + ty);
  const Cursor first = cur, step(g, py);
  // Positions left for this thread, counted in 32 bits (p1 - p0 <= kMaxChunk).
  int left = int((p1 - p0 - ty + py - 1) / py);
  for (; left > 0; left -= U) {
    Cursor at[U];
    DABNET_UNROLL_ALL
    for (int u = 0; u < U; ++u) {
      // Past the chunk's end a slot loads the thread's first position (never stored): no branch
      // between the loads, so the compiler issues all of them before it uses any (a load under
      // `if` got the conversion of its values hoisted next to it: one position in flight). Not
      // the batch's own first position: the compiler would copy that load's registers, a wait.
      at[u] = u < left ? cur : first;
      load(u, at[u]);
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

// Two values moved by one shared-memory access (a thread's pair of elements).
template <typename E>
struct alignas(2 * sizeof(E)) NeckPair {
  E v[2];
};

// A pair of x's values in the accumulation type T (dab_neck.cu overloads it for bfloat16).
template <typename T, typename S>
DABNET_HD NeckPair<T> widen(const NeckPair<S>& p) {
  return {{T(p.v[0]), T(p.v[1])}};
}

// Eval neck in shared memory, streaming rows. A block owns CT channels x TW columns of one image
// over a segment of rows, and walks down it TR output rows per step. Each staged input row has
// TW + 2D columns (a halo of D each side) x CT channels, element f = col * CT + ct (channel
// fastest: consecutive threads touch consecutive addresses in both layouts). Thread t owns the
// pair of elements f = 2t, 2t+1 of every row (two channels of one pixel, or in NCHW, where
// CT = 1, two columns): it stages them, runs both vertical convs on them and (inside the halo)
// writes their outputs; kBlock = the row's pairs rounded up to whole warps (threads past the row
// stage zeros). The pair is adjacent in memory (x is contiguous in its layout): one address for
// both loads and stores, and one shared-memory access moves both values.
// Ring row j is input row h0 - D + j; a step reads kRows = TR + 2D consecutive ring rows, so each
// input row is staged once per segment: halos cost only in W (and 2D rows per segment). The ring is
// kept in the accumulation type, or in x's type where that would not fit two blocks per SM
// (dab_neck.cu: NeckRingType), each row in two slots,
// j % kRows and j % kRows + kRows, so that a step's kRows rows are contiguous from its first slot:
// every ring and phase-A address of a step is one register plus a constant.
//
// A step has two phases, each pixel's work done once (not once per output that needs it):
//  A. the vertical convs (3x1 and dilated 3x1, bias, PReLU) at every staged element of the step's
//     TR rows, zero outside the image (column()), into two arrays of TR x kStride (mid). A thread
//     reads only its own ring columns: no barrier between staging and phase A;
//  B. the horizontal convs from three of those values each, and the final BN-PReLU: one write.
// All shapes are constants: no runtime division in the index math.
template <int CT, int TW, int TR, int D>
struct NeckRing {
  static constexpr int kCT = CT, kTR = TR, kD = D;
  static constexpr int kRowElems = (TW + 2 * D) * CT;  // elements of one staged row
  static constexpr int kRows = TR + 2 * D;             // ring slots
  static constexpr int kBlock = ((kRowElems + 1) / 2 + 31) / 32 * 32;  // threads
  static constexpr int kStride = 2 * kBlock;           // elements of a slot or a phase-A row
  static constexpr int kMid = TR * kStride;            // one branch's phase-A values
  static constexpr int kRing = 2 * kRows * kStride;    // the ring: each row in two slots
  static_assert(CT == 1 || CT % 2 == 0, "a pair is two columns (CT = 1) or two channels");
  static_assert(kBlock <= 1024, "one thread per pair of a row's elements");
  // Shortest segment: two steps (every ring wraps), and 4x its 2D halo rows, so that those rows
  // (staged once per segment, with the block's setup) add at most a quarter to the rows staged.
  static constexpr int kLeastSeg = 2 * TR > 8 * D ? 2 * TR : 8 * D;
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
  // fewer than 512 blocks (2-5 of these blocks are resident per SM: 512 fill a 132-SM GPU):
  // short segments fill the GPU but stage 2D more rows each and repeat the block's setup.
  DABNET_HD static int segment(const Geo& g) {
    int seg = (g.H + TR - 1) / TR * TR;
    while (seg / 2 >= kLeastSeg && blocks(g, seg) < 512) seg = (seg / 2 + TR - 1) / TR * TR;
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

  // Element f's image column and channel.
  DABNET_HD int col(int f) const { return w0 - D + f / CT; }
  DABNET_HD int chan(int f) const { return c0 + f % CT; }

  // Thread t's parameters, one set per element of its pair: `channel(c)` gives channel c's (c
  // clamped to C - 1: lanes past C work, write nothing), with the vertical convs zeroed where the
  // element's column lies outside the image (a 1x3 conv's input is zero there; its staged inputs
  // are zero too, so both convs give prelu(0) = 0 without a select per element).
  template <typename T, typename F>
  DABNET_HD void params(const Geo& g, int t, const F& channel, NeckChannel<T> (&p)[2]) const {
    for (int v = 0; v < 2; ++v) {
      const int f = 2 * t + v, c = chan(f), w = col(f);
      p[v] = channel(c < g.C ? c : g.C - 1);
      if (w < 0 || w >= g.W)
        for (int k = 0; k < 3; k += 2) {
          p[v].b[k] = T(0);
          for (int j = 0; j < 3; ++j) p[v].w[k][j] = T(0);
        }
    }
  }

  template <typename S>
  struct Staged {
    S v[TR][2];
  };

  // Ring rows j0 .. j0+TR-1 of thread t's pair into registers, zero outside the tensor.
  template <typename S>
  DABNET_HD void load(const S* x, const Geo& g, int j0, int t, Staged<S>& s) const {
    const int h = h0 - D + j0, f = 2 * t;
    bool ok[2];
    for (int v = 0; v < 2; ++v)
      ok[v] = f + v < kRowElems && col(f + v) >= 0 && col(f + v) < g.W && chan(f + v) < g.C;
    // Element f + 1 is px[1]: x is contiguous in its layout (W fastest in NCHW, C in
    // channels_last). px is only read where ok.
    const S* px = x + g.offset(n, chan(f), h, col(f));
    DABNET_UNROLL_ALL
    for (int r = 0; r < TR; ++r, px += g.sH) {
      const bool in = unsigned(h + r) < unsigned(g.H);
      for (int v = 0; v < 2; ++v) {
        const bool read = ok[v] && in;  // one predicate: one zeroing instruction, not two
        s.v[r][v] = read ? px[v] : S(0.f);
      }
    }
  }

  // The registers of load(j0) into both slots of each row, as the ring's type R.
  template <typename R, typename S>
  DABNET_HD void store(R* ring, int j0, int t, const Staged<S>& s) const {
    const int s0 = j0 % kRows;  // a constant modulus: no division
    NeckPair<R>* a = reinterpret_cast<NeckPair<R>*>(ring + s0 * kStride) + t;
    DABNET_UNROLL_ALL
    for (int r = 0; r < TR; ++r) {
      const NeckPair<R> q{{R(s.v[r][0]), R(s.v[r][1])}};
      a[r * kBlock] = q;                                           // slot s0 + r < 2 kRows
      a[(r + (s0 + r < kRows ? kRows : -kRows)) * kBlock] = q;  // its twin
    }
  }

  // Phase A of step k: both vertical convs at thread t's pair of the step's TR rows. Rows h-1, h,
  // h+1 slide through registers (one new read a row); rows h-d and h+d are read at constant
  // offsets from two pointers.
  template <typename S, typename T>
  DABNET_HD void vertical(const S* ring, T* mid, const NeckChannel<T> (&p)[2], int d, int k,
                          int t) const {
    using RP = NeckPair<S>;
    const RP* x = reinterpret_cast<const RP*>(ring) + ((k * TR) % kRows + D) * kBlock + t;
    const RP *up = x - d * kBlock, *down = x + d * kBlock;
    NeckPair<T>* m = reinterpret_cast<NeckPair<T>*>(mid) + t;
    // each ring value converted once, when read (rows h-1, h, h+1 slide as T)
    NeckPair<T> x0 = widen<T>(x[-kBlock]), x1 = widen<T>(x[0]);
    DABNET_UNROLL_ALL
    for (int i = 0; i < TR; ++i) {
      const NeckPair<T> x2 = widen<T>(x[(i + 1) * kBlock]), u = widen<T>(up[i * kBlock]),
                        w = widen<T>(down[i * kBlock]);
      NeckPair<T> a, b;
      for (int v = 0; v < 2; ++v) {
        a.v[v] = neck_conv(p[v], 0, x0.v[v], x1.v[v], x2.v[v]);
        b.v[v] = neck_conv(p[v], 2, u.v[v], x1.v[v], w.v[v]);
      }
      m[i * kBlock] = a;
      m[kMid / 2 + i * kBlock] = b;
      x0 = x1;
      x1 = x2;
    }
  }

  // Phase B of step k: the outputs of thread t's pair (inside the halo), from three phase-A
  // values of each branch.
  template <typename T, typename S>
  DABNET_HD void horizontal(const T* mid, S* out, const Geo& g, const NeckChannel<T> (&p)[2],
                            int d, int k, int t) const {
    const int f = 2 * t;
    bool ok[2];
    for (int v = 0; v < 2; ++v) {
      const int w = col(f + v);
      ok[v] = w >= w0 && w < w0 + TW && w < g.W && chan(f + v) < g.C;
    }
    if (!ok[0] && !ok[1]) return;
    const int last = rows - k * TR < TR ? rows - k * TR : TR, dc = d * CT;
    using MP = NeckPair<T>;
    const MP* t1 = reinterpret_cast<const MP*>(mid) + t;
    const MP* t2 = t1 + kMid / 2;
    const T *t2l = mid + kMid + f - dc, *t2r = mid + kMid + f + dc;  // CT = 1: d may be odd
    S* po = out + g.offset(n, chan(f), h0 + k * TR, col(f));  // element f + 1: po[1]
    DABNET_UNROLL_ALL
    for (int i = 0; i < TR; ++i, po += g.sH) {
      const int o = i * kBlock;
      T a[2][3], b[2][3];  // each element's three taps of each branch
      const MP c1 = t1[o], c2 = t2[o];
      if (CT == 1) {  // the pair is two columns: neighbours one column and d columns away
        const MP l1 = t1[o - 1], r1 = t1[o + 1];
        const T s[4] = {l1.v[1], c1.v[0], c1.v[1], r1.v[0]};
        for (int v = 0; v < 2; ++v) {
          a[v][0] = s[v], a[v][1] = s[v + 1], a[v][2] = s[v + 2];
          b[v][0] = t2l[2 * o + v], b[v][1] = c2.v[v], b[v][2] = t2r[2 * o + v];
        }
      } else {  // two channels of one pixel: neighbours CT and dc elements away, pairs too
        const MP l1 = t1[o - CT / 2], r1 = t1[o + CT / 2];
        const MP l2 = t2[o - dc / 2], r2 = t2[o + dc / 2];
        for (int v = 0; v < 2; ++v) {
          a[v][0] = l1.v[v], a[v][1] = c1.v[v], a[v][2] = r1.v[v];
          b[v][0] = l2.v[v], b[v][1] = c2.v[v], b[v][2] = r2.v[v];
        }
      }
      // Computed whatever i, stored above the image's last row only: predicated stores, not a
      // branch around the arithmetic.
      for (int v = 0; v < 2; ++v) {
        const S y = S(neck_final(p[v], neck_conv(p[v], 1, a[v][0], a[v][1], a[v][2]),
                                 neck_conv(p[v], 3, b[v][0], b[v][1], b[v][2])));
        if (ok[v] && i < last) po[v] = y;
      }
    }
  }
};

// The ring of each layout and halo D, T the accumulation type. A step loads TR x (TW + 2D) x CT
// inputs, issued together before the step's arithmetic.
// NCHW: one channel, 128 columns, 16 rows. channels_last: 8 rows (16 at D = 16) of 1 KB of accumulation-type
// channels (TW pixels x CT channels, CT at least a pair), wider and thinner as the halo grows so
// that a staged row stays within 1.5x its outputs: 32 pixels up to D = 4, 64 at 8, 128 at 16
// (float: 8, 8, 4, 2 channels).
constexpr int neck_cl_tile_w(int D) { return D <= 4 ? 32 : D == 8 ? 64 : 128; }
constexpr int neck_cl_channels(int D, int bytes) {
  return 1024 / bytes / neck_cl_tile_w(D) < 2 ? 2 : 1024 / bytes / neck_cl_tile_w(D);
}
template <typename T, bool CL, int D>
using NeckRingFor = NeckRing<CL ? neck_cl_channels(D, int(sizeof(T))) : 1,
                             CL ? neck_cl_tile_w(D) : 128, CL && D < 16 ? 8 : 16, D>;

}  // namespace cuda
}  // namespace dabnet
