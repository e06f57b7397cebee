// Host check of the CUDA kernels' index math (csrc/cuda/index.h), run by tests/test_cuda.py:
//  1. the channel x position launch plan visits every element exactly once, and the cursor's
//     (n, h, w) matches the position it stands for, in NCHW and channels_last;
//  2. the eval DAB neck, computed by emulating the ring kernel (neck_ring_kernel's phases, thread
//     by thread, block by block, with the segment length the launcher picks and with short segments
//     that make every block wrap its ring) and the global-memory path, matches a naive
//     implementation that materializes both branches with explicit zero padding. Every output is
//     written exactly once.
// Prints "ok" and exits 0 on success; prints the first mismatch and exits 1 otherwise.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include <random>
#include <vector>

#include "cuda/index.h"

using namespace dabnet::cuda;

static int failures = 0;
#define EXPECT(cond, ...)                  \
  do {                                     \
    if (!(cond)) {                         \
      if (failures++ < 10) {               \
        std::printf("FAIL %s: ", #cond);   \
        std::printf(__VA_ARGS__);          \
        std::printf("\n");                 \
      }                                    \
    }                                      \
  } while (0)

static Geo make_geo(int64_t N, int C, int H, int W, bool cl) {
  Geo g{N, C, H, W, 0, 0, 0, 0, N * H * W};
  if (cl) {
    g.sC = 1, g.sW = C, g.sH = int64_t(W) * C, g.sN = int64_t(H) * W * C;
  } else {
    g.sW = 1, g.sH = W, g.sC = int64_t(H) * W, g.sN = int64_t(C) * H * W;
  }
  return g;
}

static void check_coverage(int64_t N, int C, int H, int W, bool cl, int per_thread) {
  const Geo g = make_geo(N, C, H, W, cl);
  const Plan pl = plan(g, cl, per_thread);
  EXPECT(pl.cx * pl.py == kThreads && pl.chunks >= 1 && pl.chunks <= kMaxChunks, "plan");
  std::vector<int> seen(size_t(N) * C * H * W, 0);
  for (int64_t gr = 0; gr < pl.groups; ++gr)
    for (int64_t b = 0; b < pl.chunks; ++b)
      for (int ty = 0; ty < pl.py; ++ty)
        for (int tx = 0; tx < pl.cx; ++tx) {
          const int c = int(gr * pl.cx + tx);
          if (c >= C) continue;
          // The batched walk stores the same positions in the same order; every batch loads
          // all 3 of its slots before its first store, a slot past the end loading the thread's
          // first position.
          std::vector<int64_t> order, loads, want, stores;
          std::vector<int> events, want_events;  // u for load u, 3 + u for store u
          for_positions(g, b, pl.chunks, ty, pl.py,
                        [&](const Cursor&, int64_t p) { order.push_back(p); });
          for_positions_batched<3>(
              g, b, pl.chunks, ty, pl.py,
              [&](int u, const Cursor& cur) {
                events.push_back(u);
                loads.push_back((cur.n * H + cur.h) * int64_t(W) + cur.w);
              },
              [&](int u, const Cursor& cur) {
                events.push_back(3 + u);
                stores.push_back((cur.n * H + cur.h) * int64_t(W) + cur.w);
              });
          for (size_t i = 0; i < order.size(); i += 3) {
            const size_t k = std::min<size_t>(3, order.size() - i);
            for (size_t u = 0; u < 3; ++u) {
              want_events.push_back(int(u));
              want.push_back(order[u < k ? i + u : 0]);
            }
            for (size_t u = 0; u < k; ++u) want_events.push_back(int(3 + u));
          }
          EXPECT(events == want_events, "batched walk: a batch's loads, then its stores");
          EXPECT(loads == want && stores == order, "batched walk order (N=%lld C=%d H=%d W=%d)",
                 (long long)N, C, H, W);
          for_positions(g, b, pl.chunks, ty, pl.py, [&](const Cursor& cur, int64_t p) {
            const int64_t w = p % W, h = (p / W) % H, n = p / W / H;
            EXPECT(cur.n == n && cur.h == h && cur.w == w, "cursor at p=%lld", (long long)p);
            EXPECT(cur.off == g.offset(n, 0, int(h), int(w)), "cursor offset at p=%lld",
                   (long long)p);
            const int64_t off = g.offset(cur.n, c, cur.h, cur.w);
            const int64_t want = cl ? ((n * H + h) * W + w) * C + c : ((n * C + c) * H + h) * W + w;
            EXPECT(off == want, "offset %lld != %lld", (long long)off, (long long)want);
            if (off >= 0 && off < int64_t(seen.size())) ++seen[off];
          });
        }
  for (size_t i = 0; i < seen.size(); ++i)
    EXPECT(seen[i] == 1, "element %zu visited %d times (N=%lld C=%d H=%d W=%d cl=%d)", i, seen[i],
           (long long)N, C, H, W, int(cl));
}

static double act(double s, double a) { return s > 0 ? s : a * s; }

// Naive neck on one (n, c) plane: explicit zero-padded intermediate images.
static void naive_neck(const std::vector<double>& X, int H, int W, const NeckChannel<double>& p,
                       int d, std::vector<double>& out) {
  auto xat = [&](int h, int w) { return h >= 0 && h < H && w >= 0 && w < W ? X[h * W + w] : 0.0; };
  std::vector<double> t1(H * W), t2(H * W);
  for (int h = 0; h < H; ++h)
    for (int w = 0; w < W; ++w) {
      t1[h * W + w] = act(p.b[0] + p.w[0][0] * xat(h - 1, w) + p.w[0][1] * xat(h, w) +
                              p.w[0][2] * xat(h + 1, w), p.a[0]);
      t2[h * W + w] = act(p.b[2] + p.w[2][0] * xat(h - d, w) + p.w[2][1] * xat(h, w) +
                              p.w[2][2] * xat(h + d, w), p.a[2]);
    }
  auto tat = [&](const std::vector<double>& t, int h, int w) {
    return w >= 0 && w < W ? t[h * W + w] : 0.0;
  };
  out.assign(H * W, 0.0);
  for (int h = 0; h < H; ++h)
    for (int w = 0; w < W; ++w) {
      const double b1 = act(p.b[1] + p.w[1][0] * tat(t1, h, w - 1) + p.w[1][1] * tat(t1, h, w) +
                                p.w[1][2] * tat(t1, h, w + 1), p.a[1]);
      const double b2 = act(p.b[3] + p.w[3][0] * tat(t2, h, w - d) + p.w[3][1] * tat(t2, h, w) +
                                p.w[3][2] * tat(t2, h, w + d), p.a[3]);
      out[h * W + w] = act(p.fs * (b1 + b2) + p.ft, p.fa);
    }
}

// An output element that counts its writes (compute stores S(value) into it).
struct Cell {
  double v = std::nan("");
  int writes = 0;
  Cell() = default;
  explicit Cell(double x) : v(x) {}
  Cell& operator=(const Cell& o) {
    v = o.v;
    ++writes;
    return *this;
  }
};

// neck_ring_kernel on the host: each phase of a block runs for every thread before the next one
// starts (a barrier); shared memory is NaN until written. Returns the outputs, NaN where none was
// written.
template <typename Ring>
static std::vector<double> ring_neck(const std::vector<double>& x, const Geo& g, int d, int seg,
                                     const std::vector<NeckChannel<double>>& prm) {
  std::vector<Cell> out(x.size());
  std::vector<double> ring(Ring::kRing), mid(2 * Ring::kMid);
  std::vector<typename Ring::template Staged<double>> v(Ring::kBlock);
  for (int64_t b = 0; b < Ring::blocks(g, seg); ++b) {
    const Ring t(g, seg, b);
    struct Params {
      NeckChannel<double> v[2];  // a thread's, one set per element of its pair
    };
    std::vector<Params> p(Ring::kBlock);
    for (int tid = 0; tid < Ring::kBlock; ++tid)
      t.params(g, tid, [&](int c) { return prm[c]; }, p[tid].v);
    auto params = [&](int tid) -> const NeckChannel<double>(&)[2] { return p[tid].v; };
    std::fill(ring.begin(), ring.end(), std::nan(""));
    std::fill(mid.begin(), mid.end(), std::nan(""));
    for (int j0 = 0; j0 < 2 * Ring::kD; j0 += Ring::kTR)
      for (int tid = 0; tid < Ring::kBlock; ++tid) {
        t.load(x.data(), g, j0, tid, v[tid]);
        t.store(ring.data(), j0, tid, v[tid]);
      }
    for (int tid = 0; tid < Ring::kBlock; ++tid) t.load(x.data(), g, 2 * Ring::kD, tid, v[tid]);
    for (int k = 0; k < t.steps(); ++k) {
      for (int tid = 0; tid < Ring::kBlock; ++tid) {
        t.store(ring.data(), 2 * Ring::kD + k * Ring::kTR, tid, v[tid]);
        if (k + 1 < t.steps()) t.load(x.data(), g, 2 * Ring::kD + (k + 1) * Ring::kTR, tid, v[tid]);
        t.vertical(ring.data(), mid.data(), params(tid), d, k, tid);
      }
      for (int tid = 0; tid < Ring::kBlock; ++tid)
        t.horizontal(mid.data(), out.data(), g, params(tid), d, k, tid);
    }
  }
  std::vector<double> vals(out.size());
  for (size_t i = 0; i < out.size(); ++i) {
    EXPECT(out[i].writes == 1, "ring d=%d D=%d seg=%d: element %zu written %d times", d,
           Ring::kD, seg, i, out[i].writes);
    vals[i] = out[i].v;
  }
  return vals;
}

template <bool CL, int D>
static void check_ring(const std::vector<double>& x, const Geo& g, int d,
                       const std::vector<NeckChannel<double>>& prm,
                       const std::vector<double>& global) {
  using Ring = NeckRingFor<double, CL, D>;
  // The launcher's segment, the shortest it picks, and all of H in one segment: the ring wraps
  // (a step overwrites the oldest slots) in every block from the second step on.
  const int whole = (g.H + Ring::kTR - 1) / Ring::kTR * Ring::kTR;
  for (int seg : {Ring::segment(g), Ring::kLeastSeg, whole}) {
    const std::vector<double> got = ring_neck<Ring>(x, g, d, seg, prm);
    for (size_t i = 0; i < got.size(); ++i)
      EXPECT(std::fabs(got[i] - global[i]) <= 1e-12 * (1 + std::fabs(global[i])),
             "ring path d=%d D=%d cl=%d seg=%d shape (%lld,%d,%d,%d) at element %zu: %g vs %g", d,
             D, int(CL), seg, (long long)g.N, g.C, g.H, g.W, i, got[i], global[i]);
  }
}

template <bool CL>
static void check_neck(int64_t N, int C, int H, int W, int d, std::mt19937& rng) {
  const Geo g = make_geo(N, C, H, W, CL);
  std::normal_distribution<double> nd;
  std::vector<double> x(size_t(N) * C * H * W);
  for (auto& v : x) v = nd(rng);
  std::vector<NeckChannel<double>> prm(C);
  for (auto& p : prm) {
    for (int k = 0; k < 4; ++k) {
      for (int j = 0; j < 3; ++j) p.w[k][j] = nd(rng);
      p.b[k] = nd(rng);
      p.a[k] = 0.25 * nd(rng);
    }
    p.fs = nd(rng), p.ft = nd(rng), p.fa = 0.25 * nd(rng);
  }
  const double nan = std::nan("");
  std::vector<double> global(x.size(), nan);
  // Global-memory path: one independent computation per element.
  for (int c = 0; c < C; ++c)
    for (int64_t p = 0; p < g.M; ++p) {
      const Cursor cur(g, p);
      const int64_t off = g.offset(cur.n, c, cur.h, cur.w);
      const GlobalSrc<double, double> src{x.data(), off, g, cur.h, cur.w};
      global[off] = neck_point(src, prm[c], d);
    }
  // The ring kernel, compiled for each halo that holds d (the launcher picks the smallest).
  if (d <= 2) check_ring<CL, 2>(x, g, d, prm, global);
  if (d <= 4) check_ring<CL, 4>(x, g, d, prm, global);
  if (d <= 8) check_ring<CL, 8>(x, g, d, prm, global);
  if (d <= 16) check_ring<CL, 16>(x, g, d, prm, global);
  std::vector<double> plane(H * W), want;
  for (int64_t n = 0; n < N; ++n)
    for (int c = 0; c < C; ++c) {
      for (int h = 0; h < H; ++h)
        for (int w = 0; w < W; ++w) plane[h * W + w] = x[g.offset(n, c, h, w)];
      naive_neck(plane, H, W, prm[c], d, want);
      for (int h = 0; h < H; ++h)
        for (int w = 0; w < W; ++w) {
          const int64_t off = g.offset(n, c, h, w);
          const double tol = 1e-12 * (1 + std::fabs(want[h * W + w]));
          EXPECT(std::fabs(global[off] - want[h * W + w]) <= tol,
                 "global path d=%d cl=%d at n=%lld c=%d h=%d w=%d: %g vs %g", d, int(CL),
                 (long long)n, c, h, w, global[off], want[h * W + w]);
        }
    }
}

int main() {
  std::mt19937 rng(1234);
  const int shapes[][4] = {{1, 1, 1, 1},  {2, 3, 5, 7},  {1, 33, 4, 9},   {3, 5, 17, 1},
                           {1, 2, 1, 70}, {2, 64, 3, 5}, {1, 7, 31, 130}, {4, 40, 6, 11}};
  for (const auto& s : shapes)
    for (int cl = 0; cl < 2; ++cl)
      for (int pt : {1, 4, 32}) check_coverage(s[0], s[1], s[2], s[3], cl, pt);
  // Many chunks with uneven boundaries.
  check_coverage(5, 3, 37, 41, false, 1);
  check_coverage(5, 3, 37, 41, true, 1);
  const int neck_shapes[][4] = {{1, 1, 1, 1},  {2, 3, 7, 9},   {1, 5, 20, 70}, {1, 9, 33, 17},
                                {2, 6, 5, 130}, {1, 10, 75, 3}, {2, 3, 41, 67}};
  for (const auto& s : neck_shapes)
    for (int d : {1, 2, 3, 4, 5, 8, 9, 16, 17, 40}) {
      check_neck<false>(s[0], s[1], s[2], s[3], d, rng);
      check_neck<true>(s[0], s[1], s[2], s[3], d, rng);
    }
  if (failures) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("ok\n");
  return 0;
}
