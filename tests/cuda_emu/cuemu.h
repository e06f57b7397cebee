// CPU emulation of the CUDA runtime and device API that csrc/cuda uses. Force-included (g++
// -include) before every file that tests/cuda_emu/translate.py rewrote; the shim/ headers stand in
// for c10/cuda/*. The kernels' own code is compiled unchanged: this header supplies the CUDA
// keywords, threadIdx & co., barriers, warp shuffles, launches and shared memory, implemented in
// runtime.cpp (one fiber per CUDA thread). See docs/cuda-emulation.md.
#pragma once
#include <c10/core/Device.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <typeinfo>

using std::sqrt;  // CUDA's math library has float overloads; the C one takes double only

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using uint3 = dim3;
struct CUstream_st;
typedef CUstream_st* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

// The running thread's coordinates: the scheduler sets them before it resumes a thread.
extern dim3 threadIdx, blockIdx, blockDim, gridDim;
constexpr int warpSize = 32;

namespace cuemu {

// sm_90 (H100/H200) limits.
constexpr int64_t kMaxGridX = (int64_t(1) << 31) - 1, kMaxGridYZ = 65535;
constexpr int kMaxBlockThreads = 1024, kMaxBlockZ = 64;
constexpr int kDefaultShared = 48 * 1024, kOptinShared = 227 * 1024;

// ------------------------------------------------------------------------------ device side
void syncthreads(const char* file, int line);
enum WarpOp { kShflIdx, kShflUp, kShflDown, kShflXor, kSyncWarp };
uint64_t warp_op(const char* file, int line, WarpOp op, unsigned mask, uint64_t bits, int arg,
                 int width);
inline void syncwarp(const char* file, int line, unsigned mask = 0xffffffffu) {
  warp_op(file, line, kSyncWarp, mask, 0, 0, 32);
}
void* static_shared(const char* file, int line, size_t bytes, size_t align);
void* dynamic_shared();

template <typename T>
T shfl(const char* file, int line, WarpOp op, unsigned mask, T v, int arg, int width = 32) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of 1-8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = warp_op(file, line, op, mask, bits, arg, width);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

// `__shared__ T x[N];` becomes `auto& x = *::cuemu::shared<T[N]>(__FILE__, __LINE__);`.
template <typename T>
T* shared(const char* file, int line) {
  return static_cast<T*>(static_shared(file, line, sizeof(T), alignof(T)));
}

// Blocks run one at a time and a thread runs until it waits, so a read-modify-write is atomic.
template <typename T>
T atomicAdd(T* p, T v) {
  const T old = *p;
  *p = old + v;
  return old;
}

// ------------------------------------------------------------------------------- host side
// `K<<<grid, block, smem, stream>>>(args)` becomes launch(site, key, [&] { K(args); }, grid, ...);
// key is K's address when K names one function (the cudaFuncSetAttribute opt-in is per kernel),
// else null.
// `what` names the launch for record-only mode (bench/sass.py): the mangled type of the launch's
// lambda, which carries the enclosing host function and its template arguments.
void launch_impl(const char* file, int line, const void* key, void (*body)(void*), void* ctx,
                 dim3 grid, dim3 block, size_t smem, const char* what = nullptr);
template <typename F>
void launch(const char* file, int line, const void* key, F&& body, dim3 grid, dim3 block,
            size_t smem = 0, cudaStream_t = nullptr) {
  using B = std::remove_reference_t<F>;
  launch_impl(file, line, key, [](void* b) { (*static_cast<B*>(b))(); }, &body, grid, block,
              smem, typeid(B).name());
}
template <typename Tag, typename F>
const void* key_of(F* f) {
  return reinterpret_cast<const void*>(f);
}

cudaError_t func_set_attribute(const void* key, cudaFuncAttribute attr, int value);
void check_error(cudaError_t e, const char* expr, const char* file, int line);
void check_launch(const char* file, int line);
const char* error_string(cudaError_t e);
void check_device(const c10::Device& d);

// TORCH_LIBRARY_IMPL(dabnet, CUDA, m) registers on dabnet_cuemu, CPU: each op runs with every CPU
// allocation NaN-poisoned and fails if a launch error was left unchecked.
struct Registrar {
  torch::Library& lib;
  void add(const char* name, c10::KernelFunction fn);
  template <typename R, typename... A>
  Registrar& impl(const char* name, R (*fn)(A...)) {
    add(name, c10::KernelFunction::makeFromUnboxedRuntimeFunction(fn));
    return *this;
  }
};
struct AutoRegister {
  AutoRegister(void (*init)(Registrar&), const char* file, int line);
};

}  // namespace cuemu

#define __syncthreads() ::cuemu::syncthreads(__FILE__, __LINE__)
#define __syncwarp(...) ::cuemu::syncwarp(__FILE__, __LINE__, ##__VA_ARGS__)
#define __shfl_sync(...) ::cuemu::shfl(__FILE__, __LINE__, ::cuemu::kShflIdx, __VA_ARGS__)
#define __shfl_up_sync(...) ::cuemu::shfl(__FILE__, __LINE__, ::cuemu::kShflUp, __VA_ARGS__)
#define __shfl_down_sync(...) ::cuemu::shfl(__FILE__, __LINE__, ::cuemu::kShflDown, __VA_ARGS__)
#define __shfl_xor_sync(...) ::cuemu::shfl(__FILE__, __LINE__, ::cuemu::kShflXor, __VA_ARGS__)
using cuemu::atomicAdd;

inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr attr, int) {
  if (attr != cudaDevAttrMaxSharedMemoryPerBlockOptin) return cudaErrorInvalidValue;
  *v = cuemu::kOptinShared;
  return cudaSuccess;
}
template <typename F>
cudaError_t cudaFuncSetAttribute(F* f, cudaFuncAttribute attr, int value) {
  return cuemu::func_set_attribute(reinterpret_cast<const void*>(f), attr, value);
}
inline const char* cudaGetErrorString(cudaError_t e) { return cuemu::error_string(e); }

#undef TORCH_LIBRARY_IMPL
#define TORCH_LIBRARY_IMPL(ns, key, m) CUEMU_IMPL_(m, C10_UID)
#define CUEMU_IMPL_(m, uid) CUEMU_IMPL__(m, uid)
#define CUEMU_IMPL__(m, uid)                                                        \
  static void cuemu_impl_##uid(::cuemu::Registrar&);                               \
  static const ::cuemu::AutoRegister cuemu_reg_##uid(&cuemu_impl_##uid, __FILE__, \
                                                     __LINE__);                    \
  static void cuemu_impl_##uid(::cuemu::Registrar& m)

// c10/cuda stand-ins (shim/c10/cuda/*.h include this header).
#define C10_CUDA_CHECK(EXPR) ::cuemu::check_error((EXPR), #EXPR, __FILE__, __LINE__)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ::cuemu::check_launch(__FILE__, __LINE__)
namespace c10 {
namespace cuda {
struct CUDAStream {
  cudaStream_t s;
  operator cudaStream_t() const { return s; }
  cudaStream_t stream() const { return s; }
};
inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return {nullptr}; }
struct CUDAGuard {  // the emulated GPU is the CPU
  explicit CUDAGuard(c10::Device d) { ::cuemu::check_device(d); }
};
}  // namespace cuda
}  // namespace c10
