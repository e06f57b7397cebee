// Bilinear upsampling (align_corners=False) on CPU, for DABNet's final x8 upsampling of the logits:
// upsample_bilinear, and upsample_argmax, the labels of the same without materializing the
// upsampled logits (for 19 classes at 512x1024 that tensor is 40 MB written and read again; the
// labels are 4 MB).
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "../checks.h"
#include "alloc.h"
#include "isa.h"
#include "loops.h"

namespace dabnet {
namespace cpu {
inline namespace DABNET_CPU_ISA {  // see isa.h

namespace {

// Source index pair and weights of one output coordinate, as ATen's upsample_bilinear2d
// (align_corners=False, scale = in/out) computes them. Not contracted into an FMA: the source
// index must round as ATen's does (3/7 * 3.5 - 0.5 is 1 unfused, just below 1 fused), or a zero
// weight lands on another pixel, and 0 * inf there turns a label into NaN's.
template <typename acc_t>
struct Lerp {
  std::vector<int64_t> i0, i1;
  std::vector<acc_t> l0, l1;
  __attribute__((optimize("fp-contract=off"))) Lerp(int64_t in, int64_t out)
      : i0(out), i1(out), l0(out), l1(out) {
    const acc_t scale = acc_t(in) / acc_t(out);
    for (int64_t o = 0; o < out; ++o) {
      const acc_t src = std::max(scale * (acc_t(o) + acc_t(0.5)) - acc_t(0.5), acc_t(0));
      const int64_t a = std::min<int64_t>(int64_t(src), in - 1);
      i0[o] = a;
      // Along an axis of unchanged size ATen blends each pixel with itself (weights 1 and 0):
      // an infinite logit becomes NaN there, and never its neighbour.
      i1[o] = a + (a < in - 1 && in != out ? 1 : 0);
      l1[o] = src - a;
      l0[o] = acc_t(1) - l1[o];
    }
  }
};

// Outputs grouped by their left source index (i0 is nondecreasing in o): [begin[s], begin[s+1])
// all read the source pair (i0, i1) of segment s. Blending a segment from two broadcast values
// vectorizes; gathering row[i0[o]] per output does not (x8 upsampling: segments of 8).
struct Segments {
  std::vector<int64_t> begin, i0, i1;
  template <typename acc_t>
  explicit Segments(const Lerp<acc_t>& l) {
    const int64_t out = int64_t(l.i0.size());
    for (int64_t o = 0; o < out; ++o)
      if (o == 0 || l.i0[o] != l.i0[o - 1]) {
        begin.push_back(o);
        i0.push_back(l.i0[o]);
        i1.push_back(l.i1[o]);
      }
    begin.push_back(out);
  }
};


// The geometry of one upsampling, and the first of its two passes: blending the two source rows
// of an output row (one class at a time, w values, from an NCHW L; or all classes at once from a
// channels_last one). Both blends are one explicit FMA (affine), as is the second pass: the two
// layouts' outputs are bit for bit equal.
template <typename scalar_t>
struct Bilinear {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N, K, h, w, out_h;
  const Lerp<acc_t> ly, lx;
  const Segments seg;
  const scalar_t* L;
  Bilinear(const at::Tensor& x, int64_t oh, int64_t ow)
      : N(x.size(0)), K(x.size(1)), h(x.size(2)), w(x.size(3)), out_h(oh), ly(h, oh), lx(w, ow),
        seg(lx), L(x.data_ptr<scalar_t>()) {}
  int64_t nseg() const { return int64_t(seg.i0.size()); }
  // row[i * stride] for i < w: class k's source rows for output row r (= n*out_h + y), blended.
  void blend_rows(int64_t r, int64_t k, acc_t* row, int64_t stride) const {
    const int64_t n = r / out_h, y = r % out_h;
    const acc_t a = ly.l0[y], b = ly.l1[y];
    const scalar_t* p0 = L + ((n * K + k) * h + ly.i0[y]) * w;
    const scalar_t* p1 = L + ((n * K + k) * h + ly.i1[y]) * w;
    for (int64_t i = 0; i < w; ++i) row[i * stride] = affine(acc_t(p1[i]), b, a * acc_t(p0[i]));
  }
  // The same for all classes at once, from a channels_last L: row[i * K + k], one flat loop.
  void blend_rows_cl(int64_t r, acc_t* __restrict__ row) const {
    const int64_t n = r / out_h, y = r % out_h, wk = w * K;
    const acc_t a = ly.l0[y], b = ly.l1[y];
    const scalar_t* __restrict__ p0 = L + (n * h + ly.i0[y]) * wk;
    const scalar_t* __restrict__ p1 = L + (n * h + ly.i1[y]) * wk;
    for (int64_t j = 0; j < wk; ++j) row[j] = affine(acc_t(p1[j]), b, a * acc_t(p0[j]));
  }
};

// Calls f(r, k, vals) for every output row r (= n*out_h + y) and class k, vals being the out_w
// upsampled values: the two source rows are blended first (w values), then gathered along W.
template <typename scalar_t, typename F>
void bilinear_rows(const at::Tensor& x, int64_t out_h, int64_t out_w, F f) {
  using acc_t = at::opmath_type<scalar_t>;
  const Bilinear<scalar_t> bl(x, out_h, out_w);
  const auto& seg = bl.seg;
  const auto& lx = bl.lx;
  at::parallel_for(0, bl.N * out_h, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> row(bl.w), val(out_w);
    const acc_t* __restrict__ l0 = lx.l0.data();
    const acc_t* __restrict__ l1 = lx.l1.data();
    acc_t* __restrict__ vp = val.data();
    for (int64_t r = begin; r < end; ++r)
      for (int64_t k = 0; k < bl.K; ++k) {
        bl.blend_rows(r, k, row.data(), 1);
        for (int64_t sg = 0; sg < bl.nseg(); ++sg) {
          const acc_t u = row[seg.i0[sg]], v = row[seg.i1[sg]];
#pragma omp simd  // a segment is 8 outputs at x8: one vector (GCC left this loop scalar)
          for (int64_t o = seg.begin[sg]; o < seg.begin[sg + 1]; ++o)
            vp[o] = affine(v, l1[o], l0[o] * u);  // as blend_pixel
        }
        f(r, k, vp);  // through vp (restrict), as every access to val here
      }
  });
}

// One channels_last output pixel: d[k] = l0 * u[k] + l1 * v[k] for its K classes. With K known
// and at least one 32-byte vector long, the classes go in whole vectors, the last one overlapping
// its predecessor (classes 11-18 of 19: the same values written twice) instead of a scalar tail,
// which cost more than the vectors; u and v then stay in registers across a segment's pixels.
template <int KK, typename acc_t>
inline void blend_pixel(acc_t* __restrict__ d, const acc_t* __restrict__ u,
                        const acc_t* __restrict__ v, acc_t l0, acc_t l1, int64_t K) {
  constexpr int V = 32 / int(sizeof(acc_t));
  if constexpr (KK >= V) {
    for (int b = 0; b + V <= KK; b += V)
      for (int l = 0; l < V; ++l) d[b + l] = affine(v[b + l], l1, l0 * u[b + l]);
    if constexpr (KK % V != 0)
      for (int l = KK - V; l < KK; ++l) d[l] = affine(v[l], l1, l0 * u[l]);
  } else {
    for (int64_t k = 0; k < (KK ? KK : K); ++k) d[k] = affine(v[k], l1, l0 * u[k]);
  }
}

// channels_last (x too): output row r is out_w pixels of K contiguous classes. The source rows are
// blended into a (w, K) buffer in one flat loop (class by class from NCHW, strided, it had cost
// a third of the whole), so each output pixel blends two K-vectors into K contiguous outputs:
// vector stores, where writing class by class into the strided row took 3x as long. Same
// formulas, in the same order, as bilinear_rows.
// KK: the class count known at compile time (0: K at run time). Per output pixel the K-long blend
// is a loop whose setup and scalar tail cost more than its body at K = 19 (Cityscapes); with a
// constant K, GCC emits straight-line vector code.
template <typename scalar_t, int KK>
void bilinear_rows_cl(const at::Tensor& x, scalar_t* out, int64_t out_h, int64_t out_w) {
  using acc_t = at::opmath_type<scalar_t>;
  const Bilinear<scalar_t> bl(x, out_h, out_w);
  const int64_t K = KK ? KK : bl.K;
  const auto& seg = bl.seg;
  // A narrower output type is written through an acc_t row, converted in one pass: per pixel,
  // K = 19 classes leave a scalar tail of 3 whose bf16 rounding cost more than the vector part
  // (bf16 took 2.5x fp32's time); the whole row converts without a tail.
  constexpr bool kDirect = std::is_same_v<scalar_t, acc_t>;
  at::parallel_for(0, bl.N * out_h, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> row(bl.w * K), wide(kDirect ? 0 : out_w * K);
    for (int64_t r = begin; r < end; ++r) {
      bl.blend_rows_cl(r, row.data());
      scalar_t* dst = out + r * out_w * K;
      acc_t* buf = kDirect ? reinterpret_cast<acc_t*>(dst) : wide.data();
      for (int64_t sg = 0; sg < bl.nseg(); ++sg) {
        const acc_t* __restrict__ u = row.data() + seg.i0[sg] * K;
        const acc_t* __restrict__ v = row.data() + seg.i1[sg] * K;
        for (int64_t o = seg.begin[sg]; o < seg.begin[sg + 1]; ++o)
          blend_pixel<KK>(buf + o * K, u, v, bl.lx.l0[o], bl.lx.l1[o], K);
      }
      if constexpr (!kDirect) store_run(dst, wide.data(), out_w * K);
    }
  });
}

// The labels of bilinear_rows_cl's values, without storing those. Per output row the source
// rows are blended as there; then each run of up to 8 output pixels that share a source pair
// blends its K classes 8 pixels at a time (one vector per class) and keeps the running maximum
// and its class in registers. Class by class over whole rows, with the maxima in memory, it took
// 233 instructions per pixel at K = 19 (5.2 ms for 1x19x64x128 -> 512x1024 on 2 cores; 1.1 ms
// now). The values are upsample_bilinear's, bit for bit (the same formulas), so the labels are
// their argmax (for bf16, of the float values before rounding).
template <typename scalar_t>
void argmax_rows(const at::Tensor& x, int64_t* lab, int64_t out_h, int64_t out_w) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int B = 8;
  const Bilinear<scalar_t> bl(x, out_h, out_w);
  const int64_t K = bl.K;
  const auto& seg = bl.seg;
  // The horizontal weights, padded so that a run shorter than B reads inside the vector.
  std::vector<acc_t> L0(out_w + B, acc_t(0)), L1(out_w + B, acc_t(0));
  std::copy(bl.lx.l0.begin(), bl.lx.l0.end(), L0.begin());
  std::copy(bl.lx.l1.begin(), bl.lx.l1.end(), L1.begin());
  at::parallel_for(0, bl.N * out_h, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> row(bl.w * K);
    for (int64_t r = begin; r < end; ++r) {
      bl.blend_rows_cl(r, row.data());
      int64_t* dst = lab + r * out_w;
      for (int64_t sg = 0; sg < bl.nseg(); ++sg) {
        const acc_t* __restrict__ u = row.data() + seg.i0[sg] * K;
        const acc_t* __restrict__ v = row.data() + seg.i1[sg] * K;
        for (int64_t o0 = seg.begin[sg]; o0 < seg.begin[sg + 1]; o0 += B) {
          const acc_t* __restrict__ l0 = L0.data() + o0;
          const acc_t* __restrict__ l1 = L1.data() + o0;
          acc_t best[B];
          int32_t cls[B];  // int32, the float's width, so that the select vectorizes
          for (int j = 0; j < B; ++j) {
            best[j] = affine(v[0], l1[j], l0[j] * u[0]);
            cls[j] = 0;
          }
          for (int64_t k = 1; k < K; ++k) {
            const acc_t uk = u[k], vk = v[k];
            const int32_t kk = int32_t(k);
#pragma omp simd  // one vector of B pixels: unrolled first, GCC would not put it back together
            for (int j = 0; j < B; ++j) {
              const acc_t val = affine(vk, l1[j], l0[j] * uk), b = best[j];
              // As torch.argmax: the first maximum wins, and NaN beats every number (the first
              // NaN wins). Bitwise and unconditional, so that both selects are blends: with
              // || GCC stored the maximum through a masked store, which stalled the next load.
              const bool gt = (val > b) | ((val != val) & (b == b));
              best[j] = gt ? val : b;
              cls[j] = gt ? kk : cls[j];
            }
          }
          const int64_t m = std::min<int64_t>(B, seg.begin[sg + 1] - o0);
          for (int64_t j = 0; j < m; ++j) dst[o0 + j] = cls[j];
        }
      }
    }
  });
}

void check_upsample(const at::Tensor& x, int64_t out_h, int64_t out_w, const char* name) {
  check_input(x, name);
  TORCH_CHECK(out_h > 0 && out_w > 0, "dabnet: upsample output size must be positive, got ",
              out_h, "x", out_w);
  // An empty image has no pixels to blend from, whatever the batch: with N or C zero the output
  // would be empty too, but F.interpolate refuses it all the same, and so do we.
  TORCH_CHECK(x.size(2) > 0 && x.size(3) > 0, "dabnet: cannot upsample an input with an empty ",
              "spatial size (", name, " has shape ", x.sizes(), ")");
}

}  // namespace

at::Tensor upsample_bilinear(const at::Tensor& x_, int64_t out_h, int64_t out_w) {
  check_upsample(x_, out_h, out_w, "x");
  bool cl;
  const at::Tensor x = canonical(x_, cl);  // small: classes x H/8 x W/8
  const int64_t K = x.size(1);
  at::Tensor out = empty_out({x.size(0), K, out_h, out_w}, x.options().memory_format(fmt(cl)));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "upsample_bilinear", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    if (cl) {
      (K == 19 ? bilinear_rows_cl<scalar_t, 19> : bilinear_rows_cl<scalar_t, 0>)(x, o, out_h, out_w);
      return;
    }
    bilinear_rows<scalar_t>(x, out_h, out_w, [&](int64_t r, int64_t k, const auto* val) {
      const int64_t n = r / out_h, y = r % out_h;
      scalar_t* dst = o + ((n * K + k) * out_h + y) * out_w;
      store_run(dst, val, out_w);
    });
  });
  return out;
}

at::Tensor upsample_argmax(const at::Tensor& x_, int64_t out_h, int64_t out_w) {
  check_upsample(x_, out_h, out_w, "logits");
  TORCH_CHECK(x_.size(1) > 0 && x_.size(1) <= INT32_MAX,
              "dabnet: upsample_argmax needs between 1 and 2^31 - 1 classes, got ", x_.size(1));
  at::Tensor labels = empty_out({x_.size(0), out_h, out_w}, x_.options().dtype(at::kLong));
  if (labels.numel() == 0) return labels;
  const at::Tensor x = x_.contiguous(at::MemoryFormat::ChannelsLast);  // small: the logits
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "upsample_argmax", [&] {
    argmax_rows<scalar_t>(x, labels.data_ptr<int64_t>(), out_h, out_w);
  });
  return labels;
}

}  // namespace DABNET_CPU_ISA
}  // namespace cpu
}  // namespace dabnet

// Registered once, from the baseline build (isa.h).
#ifndef DABNET_CPU_VARIANT
DABNET_CPU_DECLARE(upsample_bilinear)
DABNET_CPU_DECLARE(upsample_argmax)

TORCH_LIBRARY_IMPL(dabnet, CPU, m) {
  m.impl("upsample_bilinear", DABNET_CPU_KERNEL(upsample_bilinear));
  m.impl("upsample_argmax", DABNET_CPU_KERNEL(upsample_argmax));
}
#endif
