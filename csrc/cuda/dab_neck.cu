// Eval-mode DAB neck on CUDA in one kernel: each block streams a strip of x down a segment of
// rows through a ring of rows in shared memory (each row staged once, halos only in W), and every
// thread computes both branches (3x1 -> 1x3 and dilated 3x1 -> dilated 1x3, each with bias +
// PReLU) and the final BN-PReLU in registers and writes its outputs once. Dilations above
// kMaxTileDilation (or a ring that does not fit in shared memory) take a global-memory path with
// the same per-pixel arithmetic (index.h: neck_point).
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../checks.h"
#include "common.cuh"

namespace dabnet {
namespace cuda {

// index.h's widen for bfloat16 (in dabnet::cuda, where argument-dependent lookup finds it from
// index.h's templates). bfloat16 -> float is a 16-bit shift: from the 32-bit word that holds a
// ring pair, the low value is word << 16 and the high one word & 0xffff0000, one instruction
// each, where converting value by value took two (sm_90, channels_last D = 16: 200 of the step's
// 1698 instructions for 100 values).
template <typename T, std::enable_if_t<std::is_same_v<T, float>, int> = 0>
DABNET_HD NeckPair<float> widen(const NeckPair<c10::BFloat16>& p) {
  uint32_t word;
  memcpy(&word, &p, sizeof(word));
  const uint32_t bits[2] = {word << 16, word & 0xffff0000u};
  NeckPair<float> out;
  memcpy(&out, bits, sizeof(out));
  return out;
}

namespace {

// Pointers to the BN-folded parameters (accumulation type, contiguous).
template <typename T>
struct NeckParams {
  const T *w, *b, *a, *fs, *ft, *fa;  // w (4,C,3), b and a (4,C), the rest (C)
  int C;
  __device__ NeckChannel<T> channel(int c) const {
    NeckChannel<T> p;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
#pragma unroll
      for (int j = 0; j < 3; ++j) p.w[k][j] = w[(int64_t(k) * C + c) * 3 + j];
      p.b[k] = b[int64_t(k) * C + c];
      p.a[k] = a[int64_t(k) * C + c];
    }
    p.fs = fs[c];
    p.ft = ft[c];
    p.fa = fa[c];
    return p;
  }
};

// The ring's element type: the accumulation type (each value converted once, when staged, not at
// each of its three reads in phase A) where the shared memory still fits two blocks per SM (228 KB,
// 1 KB reserved per block), else x's type (16-bit types at channels_last D = 16).
template <typename scalar_t, typename Ring, typename acc_t = at::opmath_type<scalar_t>>
using NeckRingType =
    std::conditional_t<(Ring::template bytes<acc_t, acc_t>() <= 113 * 1024), acc_t, scalar_t>;

// Streams the rows of one segment through a ring in shared memory (index.h: NeckRing), one
// thread per pair of a row's staged elements. The next step's rows are loaded into registers
// before this step's arithmetic, so those loads are in flight while it runs. Every loop over rows
// is unrolled: a step is straight-line code with constant shared-memory offsets.
template <typename scalar_t, typename Ring>
__global__ void __launch_bounds__(Ring::kBlock, sizeof(scalar_t) == 8 ? 1 : 2)  // double: no spills
    neck_ring_kernel(const scalar_t* x, scalar_t* out, const Geo g,
                     const NeckParams<at::opmath_type<scalar_t>> prm, int d, int seg) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* mid = reinterpret_cast<acc_t*>(smem_raw);
  auto* ring = reinterpret_cast<NeckRingType<scalar_t, Ring>*>(mid + 2 * Ring::kMid);
  const Ring t(g, seg, blockIdx.x);
  const int tid = threadIdx.x;
  NeckChannel<acc_t> p[2];
  t.params(g, tid, [&](int c) { return prm.channel(c); }, p);
  constexpr int k2D = 2 * Ring::kD;
  typename Ring::template Staged<scalar_t> v;
  // The 2D rows above the first step's outputs, in whole steps (from TR > 2D on, the first step
  // stages the same rows [2D, TR) again, into the same slots, from the same thread).
  DABNET_UNROLL_ALL
  for (int j0 = 0; j0 < k2D; j0 += Ring::kTR) {
    t.load(x, g, j0, tid, v);
    t.store(ring, j0, tid, v);
  }
  const int steps = t.steps();
  t.load(x, g, k2D, tid, v);
  for (int k = 0; k < steps; ++k) {
    t.store(ring, k2D + k * Ring::kTR, tid, v);  // over rows no step from k on reads
    if (k + 1 < steps) t.load(x, g, k2D + (k + 1) * Ring::kTR, tid, v);
    t.vertical(ring, mid, p, d, k, tid);  // this thread's ring columns only: no barrier before
    __syncthreads();
    t.horizontal(mid, out, g, p, d, k, tid);
    __syncthreads();  // the next vertical overwrites what this one read
  }
}

// Global-memory path: one pixel per call, 18 (cached) loads instead of the ring.
template <typename scalar_t>
struct NeckOp {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x;
  scalar_t* out;
  Geo g;
  NeckParams<acc_t> prm;
  int d;
  NeckChannel<acc_t> p;
  __device__ void setup(int c) { p = prm.channel(c); }
  __device__ void operator()(const Cursor& cur, int c) const {
    const int64_t o = g.offset(cur.n, c, cur.h, cur.w);
    const GlobalSrc<acc_t, scalar_t> src{x, o, g, cur.h, cur.w};
    out[o] = scalar_t(neck_point(src, p, d));
  }
};

// Launches the ring kernel; false when its ring does not fit in this device's shared memory (then
// the global path runs).
template <typename scalar_t, typename Ring>
bool launch_ring(const scalar_t* x, scalar_t* out, const Geo& g,
                 const NeckParams<at::opmath_type<scalar_t>>& prm, int d) {
  const int64_t bytes =
      Ring::template bytes<NeckRingType<scalar_t, Ring>, at::opmath_type<scalar_t>>();
  int dev = 0, optin = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  if (bytes > optin) return false;
  auto kernel = neck_ring_kernel<scalar_t, Ring>;
  if (bytes > 48 * 1024)  // above the default limit, a kernel must opt in
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        int(bytes)));
  const int seg = Ring::segment(g);
  const int64_t blocks = Ring::blocks(g, seg);
  TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), "dabnet: dab_neck input too large");
  kernel<<<unsigned(blocks), Ring::kBlock, size_t(bytes), stream()>>>(x, out, g, prm, d, seg);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

// The ring compiled for the smallest halo that holds d, in x's layout.
template <typename scalar_t, bool CL>
bool launch_ring_for(const scalar_t* x, scalar_t* out, const Geo& g,
                     const NeckParams<at::opmath_type<scalar_t>>& prm, int d) {
  using acc_t = at::opmath_type<scalar_t>;
  switch (neck_halo(d)) {
    case 2: return launch_ring<scalar_t, NeckRingFor<acc_t, CL, 2>>(x, out, g, prm, d);
    case 4: return launch_ring<scalar_t, NeckRingFor<acc_t, CL, 4>>(x, out, g, prm, d);
    case 8: return launch_ring<scalar_t, NeckRingFor<acc_t, CL, 8>>(x, out, g, prm, d);
    default: return launch_ring<scalar_t, NeckRingFor<acc_t, CL, 16>>(x, out, g, prm, d);
  }
}

}  // namespace

at::Tensor dab_neck(const at::Tensor& x_, const at::Tensor& weight, const at::Tensor& bias,
                    const at::Tensor& slope, const at::Tensor& out_scale,
                    const at::Tensor& out_shift, const at::Tensor& out_slope, int64_t dilation) {
  check_neck(x_, weight, bias, slope, out_scale, out_shift, out_slope, dilation);
  const c10::cuda::CUDAGuard guard(x_.device());
  bool cl;
  const at::Tensor x = canonical(x_, cl);
  at::Tensor out = empty_as(x, cl);
  if (x.numel() == 0) return out;
  const Geo g = make_geo(x);
  const auto acc = stat_type(x);
  auto cvt = [&](const at::Tensor& t) { return t.detach().to(acc).contiguous(); };
  const at::Tensor w = cvt(weight), b = cvt(bias), a = cvt(slope), fs = cvt(out_scale),
                   ft = cvt(out_shift), fa = cvt(out_slope);
  const int d = clamp_dilation(dilation, g);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dab_neck_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const NeckParams<acc_t> prm{w.data_ptr<acc_t>(),  b.data_ptr<acc_t>(),  a.data_ptr<acc_t>(),
                                fs.data_ptr<acc_t>(), ft.data_ptr<acc_t>(), fa.data_ptr<acc_t>(),
                                g.C};
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    bool done = false;
    if (d <= kMaxTileDilation)
      done = cl ? launch_ring_for<scalar_t, true>(xp, op, g, prm, d)
                : launch_ring_for<scalar_t, false>(xp, op, g, prm, d);
    if (!done) {
      NeckOp<scalar_t> nop;
      nop.x = xp;
      nop.out = op;
      nop.g = g;
      nop.prm = prm;
      nop.d = d;
      launch_map(nop, g, cl);
    }
  });
  return out;
}

}  // namespace cuda
}  // namespace dabnet

TORCH_LIBRARY_IMPL(dabnet, CUDA, m) { m.impl("dab_neck", &dabnet::cuda::dab_neck); }
