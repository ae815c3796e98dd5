// The emulated CUDA device (DESIGN.md, layer 2): what a kernel file sees of CUDA, for g++.
//
// The kernel sources compile unchanged: __CUDA_ARCH__ is defined, so the math headers take their
// device branches, and the device intrinsics they call follow the GPU's rules (each arithmetic
// intrinsic is one IEEE operation rounded to nearest even, and a NaN result is the GPU's NaN,
// 0x7FFFFFFF, whatever the operands). A launch (emu::launch) runs every block of the grid, one
// block at a time; the threads of a block are fibers (runtime.cpp), so __syncthreads is a real
// barrier: each thread runs until it reaches one, and no thread passes it before every thread of
// the block has arrived. __shared__ variables are static, which is one copy per block because
// blocks run one after another (launches are serialized). Atomics need no atomicity: fibers
// switch only at barriers.
#pragma once
#include <tuple>
#include <type_traits>
#include <utility>

#include "cuda_runtime_api.h"

#ifndef __CUDA_ARCH__
#define __CUDA_ARCH__ 900
#endif
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __shared__ static

struct alignas(8) uint2 {
  unsigned int x, y;
};
struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};

// The executing thread's coordinates, set by the runtime before it resumes a fiber.
extern uint3 threadIdx;
extern uint3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;

void __syncthreads();

namespace fusedwarm {
namespace emu {

inline float gpu_nan(float r) { return r != r ? __builtin_bit_cast(float, 0x7FFFFFFFu) : r; }

// Runs thread(context) once for every thread of every block of `grid` and returns the launch
// status: cudaErrorInvalidConfiguration for a grid or block the GPU would reject,
// cudaErrorLaunchFailure when threads of a block reach different barriers.
cudaError_t run_grid(dim3 grid, dim3 block, void (*thread)(void*), void* context);

template <class... Params, class... Args>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t, Args&&... args) {
  // The arguments are copied once, as a real launch copies them to the device.
  struct Call {
    void (*kernel)(Params...);
    std::tuple<std::decay_t<Params>...> params;
  } call{kernel, std::tuple<std::decay_t<Params>...>(std::forward<Args>(args)...)};
  return run_grid(grid, block, [](void* c) {
    auto* call = static_cast<Call*>(c);
    std::apply(call->kernel, call->params);
  }, &call);
}

// The BoxedLaunch of a kernel (cuda_runtime_api.h).
template <class... Params, size_t... I>
cudaError_t launch_unboxed(void (*kernel)(Params...), dim3 grid, dim3 block, void** params,
                           std::index_sequence<I...>) {
  return launch(kernel, grid, block, nullptr, *static_cast<const std::decay_t<Params>*>(params[I])...);
}

template <class... Params>
constexpr size_t arity(void (*)(Params...)) {
  return sizeof...(Params);
}

template <auto Kernel>
cudaError_t launch_boxed(dim3 grid, dim3 block, void** params) {
  return launch_unboxed(Kernel, grid, block, params, std::make_index_sequence<arity(Kernel)>());
}

}  // namespace emu
}  // namespace fusedwarm

inline unsigned int __float_as_uint(float x) { return __builtin_bit_cast(unsigned int, x); }
inline float __uint_as_float(unsigned int b) { return __builtin_bit_cast(float, b); }
inline float __int2float_rn(int x) { return static_cast<float>(x); }
inline float __fadd_rn(float a, float b) { return fusedwarm::emu::gpu_nan(a + b); }
inline float __fsub_rn(float a, float b) { return fusedwarm::emu::gpu_nan(a - b); }
inline float __fmul_rn(float a, float b) { return fusedwarm::emu::gpu_nan(a * b); }
inline float __fdiv_rn(float a, float b) { return fusedwarm::emu::gpu_nan(a / b); }
inline float __fsqrt_rn(float a) { return fusedwarm::emu::gpu_nan(__builtin_sqrtf(a)); }

inline unsigned long long atomicAdd(unsigned long long* address, unsigned long long value) {
  const unsigned long long old = *address;
  *address = old + value;
  return old;
}
