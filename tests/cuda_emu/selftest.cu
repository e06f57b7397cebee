// Kernels that test the CUDA emulation itself (tests/test_cuda_emu.py): translated and compiled
// like csrc/cuda, and run as dabnet_cuemu::selftest(cpu_tensor, name, args). Plain CUDA: where
// they do not fail, they would return the same on a GPU.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <string>
#include <vector>

namespace {

__device__ int counter;

// Counts the threads that run, and records the order in which blocks and the threads of the first
// block to run start.
__global__ void count_kernel(int* n, int* thread_order, int* block_order) {
  const int t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const int b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const int i = atomicAdd(n, 1);
  if (i < int(blockDim.x * blockDim.y * blockDim.z)) thread_order[i] = t;  // the first block
  if (t == 0 && counter < 4096) block_order[atomicAdd(&counter, 1)] = b;  // the first 4096
}

// 64 threads: out[t] = sh[63 - t] after every thread stored sh[t] = t (mode 0), or without the
// barrier (1), at two different barriers (2), after half the threads exited (3), one thread's
// write past the array (4), shared memory read before any write (5).
__global__ void sync_kernel(float* out, int mode) {
  __shared__ float sh[64];
  const int t = threadIdx.x;
  if (mode == 5) {
    out[t] = sh[t];
    return;
  }
  if (mode == 3 && t >= 32) return;
  sh[t] = float(t);
  if (mode == 4 && t == 0) sh[64 + 100] = 1.0f;
  if (mode == 2 && t < 32) {
    __syncthreads();
  } else if (mode != 1) {
    __syncthreads();
  }
  out[t] = mode == 3 ? sh[31 - t] : sh[63 - t];
}

// 64 threads (2 warps): the last `exited` lanes of each warp return; the others shuffle their lane
// number with `mask`. op: 0 idx, 1 up, 2 down, 3 xor, 4 a full-mask shuffle while lanes 16-31
// wait at a barrier (deadlock).
__global__ void shfl_kernel(float* out, int op, unsigned mask, int arg, int width, int exited) {
  const int t = threadIdx.x, lane = t % 32;
  if (lane >= 32 - exited) return;
  const float v = float(lane);
  float r = -1;
  if (op == 0) r = __shfl_sync(mask, v, arg, width);
  if (op == 1) r = __shfl_up_sync(mask, v, unsigned(arg), width);
  if (op == 2) r = __shfl_down_sync(mask, v, unsigned(arg), width);
  if (op == 3) r = __shfl_xor_sync(mask, v, arg, width);
  if (op == 4) {
    if (lane >= 16) __syncthreads();
    r = __shfl_sync(0xffffffffu, v, 0);
  }
  out[t] = r;
}

__global__ void smem_kernel(float* out) {
  extern __shared__ float dyn[];
  out[threadIdx.x] = dyn[threadIdx.x];
}

at::Tensor selftest(const at::Tensor&, std::string name, std::vector<int64_t> a) {
  const auto opt = at::TensorOptions().dtype(at::kFloat);
  if (name == "launch") {  // a: grid xyz, block xyz, dynamic shared bytes, opt-in bytes
    at::Tensor out = at::zeros({1 + 1024 + 4096}, opt.dtype(at::kInt));
    int* p = out.data_ptr<int>();
    counter = 0;
    if (a[7] > 0) C10_CUDA_CHECK(cudaFuncSetAttribute(count_kernel,
                                 cudaFuncAttributeMaxDynamicSharedMemorySize, int(a[7])));
    count_kernel<<<dim3(a[0], a[1], a[2]), dim3(a[3], a[4], a[5]), size_t(a[6])>>>(p, p + 1,
                                                                                 p + 1025);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
  }
  at::Tensor out = at::empty({64}, opt);
  if (name == "sync") sync_kernel<<<1, 64>>>(out.data_ptr<float>(), int(a[0]));
  if (name == "shfl")
    shfl_kernel<<<1, 64>>>(out.data_ptr<float>(), int(a[0]), unsigned(a[1]), int(a[2]),
                           int(a[3]), int(a[4]));
  if (name == "smem") smem_kernel<<<1, 64, 64 * sizeof(float)>>>(out.data_ptr<float>());
  if (name == "untouched") out = at::empty({64}, opt);  // no kernel writes it
  if (name == "unchecked") {  // a launch that fails, and no launch check
    sync_kernel<<<dim3(1, 70000), 64>>>(out.data_ptr<float>(), 0);
    return out;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

// `cpu`: any CPU tensor, for the dispatcher to pick the CPU kernel.
TORCH_LIBRARY_FRAGMENT(dabnet_cuemu, m) {
  m.def("selftest(Tensor cpu, str name, int[] args) -> Tensor");
}

TORCH_LIBRARY_IMPL(dabnet, CUDA, m) { m.impl("selftest", &selftest); }
