// Eval-mode DAB neck on CUDA in one kernel: each block stages a tile of x plus a halo of d rows and
// columns in shared memory, then every thread computes both branches (3x1 -> 1x3 and dilated
// 3x1 -> dilated 1x3, each with bias + PReLU) and the final BN-PReLU in registers and writes its
// outputs once. Dilations above kMaxTileDilation (or a tile that does not fit in shared memory)
// take a global-memory path with the same per-pixel arithmetic (index.h: neck_point).
#include <torch/library.h>

#include "../checks.h"
#include "common.cuh"

namespace dabnet {
namespace cuda {

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

template <typename scalar_t, typename Tile>
__global__ void __launch_bounds__(kThreads)
    neck_tile_kernel(const scalar_t* x, scalar_t* out, const Geo g,
                     const NeckParams<at::opmath_type<scalar_t>> prm, int d) {
  extern __shared__ __align__(16) unsigned char smem[];
  scalar_t* tile = reinterpret_cast<scalar_t*>(smem);
  const Tile t(g, d, blockIdx.x);
  const int n_stage = int(Tile::elems(d));
  for (int e = threadIdx.x; e < n_stage; e += kThreads) t.stage(x, tile, g, e);
  __syncthreads();
  // Output e has channel c0 + e % CT; with e stepping by kThreads that is fixed per thread.
  const int c = t.c0 + threadIdx.x % Tile::kCT;
  if (c >= g.C) return;
  const auto p = prm.channel(c);
  for (int e = threadIdx.x; e < Tile::kOutputs; e += kThreads) t.output(tile, out, g, p, e);
}

// Global-memory path: one pixel per call, 18 (cached) loads instead of a staged tile.
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

// Launches the tile kernel; false when its tile does not fit in this device's shared memory.
template <typename scalar_t, typename Tile>
bool launch_tile(const scalar_t* x, scalar_t* out, const Geo& g,
                 const NeckParams<at::opmath_type<scalar_t>>& prm, int d) {
  const int64_t bytes = Tile::elems(d) * int64_t(sizeof(scalar_t));
  int dev = 0, optin = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  if (bytes > optin) return false;
  auto kernel = neck_tile_kernel<scalar_t, Tile>;
  if (bytes > 48 * 1024)  // above the default limit, a kernel must opt in
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        int(bytes)));
  const int64_t blocks = Tile::blocks(g);
  TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), "dabnet: dab_neck input too large");
  kernel<<<unsigned(blocks), kThreads, size_t(bytes), stream()>>>(x, out, g, prm, d);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
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
      done = cl ? launch_tile<scalar_t, NeckTileFor<scalar_t, true>>(xp, op, g, prm, d)
                : launch_tile<scalar_t, NeckTileFor<scalar_t, false>>(xp, op, g, prm, d);
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
