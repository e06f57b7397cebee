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

// Eval neck in shared memory, streaming rows. A block owns CT channels x TW columns of one image
// over a segment of rows, and walks down it TR output rows per step. Shared memory holds a ring of
// kRows = TR + 2D slots, each one staged input row of TW + 2D columns (a halo of D each side) x CT
// channels, element f = col * CT + ct (channel fastest: consecutive threads touch consecutive
// addresses in both layouts); ring row j is input row h0 - D + j, in slot j % kRows. A step reads
// kRows consecutive ring rows, so each input row is staged once per segment: halos cost only in W
// (and 2D rows per segment). Values are kept in the accumulation type, converted once.
//
// A step has two phases, each pixel's work done once (not once per output that needs it):
//  A. the vertical convs (3x1 and dilated 3x1, bias, PReLU) at every staged column of the step's
//     TR rows, zero outside the image, into two rows of TR x kRowElems (mid);
//  B. the horizontal convs from three of those values each, and the final BN-PReLU: one write.
// Thread tid handles elements f = tid + a*kThreads (a < kPasses) of every row, when staging and in
// A, and outputs e = tid % kRowThreads + a*kRowThreads in rows tid / kRowThreads + m*kOutRows in B.
// 256 is a multiple of CT, so a thread keeps one channel. All shapes are constants: no runtime
// division in the index math.
template <int CT, int TW, int TR, int D>
struct NeckRing {
  static constexpr int kCT = CT, kTR = TR, kD = D;
  static constexpr int kRowElems = (TW + 2 * D) * CT;  // elements of one staged row
  static constexpr int kRows = TR + 2 * D;             // ring slots
  static constexpr int kMid = TR * kRowElems;          // one branch's phase-A values
  static constexpr int kElems = kRows * kRowElems + 2 * kMid;  // shared memory, elements
  static constexpr int kPasses = (kRowElems + kThreads - 1) / kThreads;
  static constexpr int kRowThreads = TW * CT < kThreads ? TW * CT : kThreads;
  static constexpr int kOutRows = kThreads / kRowThreads;  // output rows computed side by side
  static_assert(kThreads % CT == 0, "a thread must keep one channel");
  static_assert(TR % kOutRows == 0 && (TW * CT) % kRowThreads == 0, "uneven output split");
  // Shortest segment: at most 2x the rows staged, and two steps, so every ring wraps.
  static constexpr int kLeastSeg = 2 * TR > 2 * D ? 2 * TR : 2 * D;

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

  template <typename T>
  struct Staged {
    T v[kPasses][TR];
  };

  // Ring rows j0 .. j0+TR-1 into registers: this thread's elements, zero outside the tensor.
  template <typename T, typename S>
  DABNET_HD void load(const S* x, const Geo& g, int j0, int tid, Staged<T>& s) const {
    const int h = h0 - D + j0;
    for (int a = 0; a < kPasses; ++a) {
      const int f = tid + a * kThreads, w = w0 - D + f / CT, c = c0 + f % CT;
      const bool ok = f < kRowElems && w >= 0 && w < g.W && c < g.C;
      const S* px = x + (ok ? g.offset(n, c, h, w) : 0);  // row r: px + r * sH
      for (int r = 0; r < TR; ++r)
        s.v[a][r] = ok && h + r >= 0 && h + r < g.H ? T(px[r * g.sH]) : T(0);
    }
  }

  // The registers of load(j0) into their slots.
  template <typename T>
  DABNET_HD void store(T* smem, int j0, int tid, const Staged<T>& s) const {
    for (int r = 0; r < TR; ++r) {
      T* slot = smem + (j0 + r) % kRows * kRowElems;  // a constant modulus: no division
      for (int a = 0; a < kPasses; ++a)
        if (kRowElems % kThreads == 0 || tid + a * kThreads < kRowElems)
          slot[tid + a * kThreads] = s.v[a][r];
    }
  }

  static constexpr int kRing = kRows * kRowElems;  // the ring's elements
  // Offset o of a slot, moved by a row offset (|dr| <= 2D rows), wrapped into the ring.
  DABNET_HD static int wrap(int o) { return o < 0 ? o + kRing : o >= kRing ? o - kRing : o; }

  // Phase A of step k: both vertical convs at this thread's elements of the step's TR rows. A
  // thread walks down its columns: rows h-1, h, h+1 slide through registers (one new read a
  // row) and the offsets of rows h+1, h-d, h+d advance a slot at a time, wrapping at the end.
  template <typename T>
  DABNET_HD void vertical(T* smem, const Geo& g, const NeckChannel<T>& p, int d, int k,
                          int tid) const {
    const T* ring = smem;
    T* mid = smem + kRing;
    const int mid0 = (k * TR + D) % kRows * kRowElems;  // slot of input row h0 + k*TR
    for (int a = 0; a < kPasses; ++a) {
      const int f = tid + a * kThreads, w = w0 - D + f / CT;
      if (f >= kRowElems) break;
      const bool in = w >= 0 && w < g.W;  // a 1x3 conv's input is zero outside the image
      int next = wrap(mid0 + kRowElems), up = wrap(mid0 - d * kRowElems),
          down = wrap(mid0 + d * kRowElems);
      T x0 = ring[wrap(mid0 - kRowElems) + f], x1 = ring[mid0 + f];
      DABNET_UNROLL(2)  // fully unrolled, 2 passes x 8 rows spilled under 3 blocks per SM
      for (int i = 0; i < TR; ++i) {
        const T x2 = ring[next + f];
        mid[i * kRowElems + f] = in ? neck_conv(p, 0, x0, x1, x2) : T(0);
        mid[kMid + i * kRowElems + f] = in ? neck_conv(p, 2, ring[up + f], x1, ring[down + f])
                                           : T(0);
        x0 = x1;
        x1 = x2;
        next = wrap(next + kRowElems);
        up = wrap(up + kRowElems);
        down = wrap(down + kRowElems);
      }
    }
  }

  // Phase B of step k: this thread's outputs, from three phase-A values of each branch; a thread
  // walks down its column, kOutRows rows at a time.
  template <typename T, typename S>
  DABNET_HD void horizontal(const T* smem, S* out, const Geo& g, const NeckChannel<T>& p, int d,
                            int k, int tid) const {
    const int c = c0 + tid % CT;
    if (c >= g.C) return;
    const int i0 = tid / kRowThreads, last = rows - k * TR < TR ? rows - k * TR : TR, dc = d * CT;
    for (int a = 0; a < TW * CT / kRowThreads; ++a) {
      const int e = tid % kRowThreads + a * kRowThreads, col = e / CT;
      if (w0 + col >= g.W) break;  // col grows with a
      const T* t1 = smem + kRing + i0 * kRowElems + D * CT + e;  // phase A, 3x1 branch
      S* po = out + g.offset(n, c, h0 + k * TR + i0, w0 + col);
      for (int i = i0; i < last; i += kOutRows) {
        const T* t2 = t1 + kMid;  // dilated branch
        *po = S(neck_final(p, neck_conv(p, 1, t1[-CT], t1[0], t1[CT]),
                           neck_conv(p, 3, t2[-dc], t2[0], t2[dc])));
        t1 += kOutRows * kRowElems;
        po += kOutRows * g.sH;
      }
    }
  }
};

// The ring of each layout and halo D, T the accumulation type. A step loads TR x (TW + 2D) x CT
// inputs, issued together before the step's arithmetic: with 2-4 blocks per SM that is 25-40 KB
// in flight per SM in float32 (Little's law on an H100/H200 asks for about 20-30 KB).
// NCHW: one channel, 128 columns, 16 rows. channels_last: 32 bytes of staged channels per pixel
// (8 float, 4 double) over 32 columns, 8 rows; at D = 16, 16 bytes over 64 columns, so that the
// ring's 40 rows of 128 pixels stay at ~86 KB (two blocks per SM) and the halo costs 1.5x, not 2x.
template <typename T, bool CL, int D>
using NeckRingFor = NeckRing<CL ? int((D == 16 ? 16 : 32) / sizeof(T)) : 1,
                             CL ? (D == 16 ? 64 : 32) : 128, CL ? 8 : 16, D>;

}  // namespace cuda
}  // namespace dabnet
