// The emulated CUDA device (DESIGN.md, layer 2): the host-side CUDA runtime API the kernel files
// and host.h use, for g++. This directory comes first on the include path of the emulator's build
// only, so <cuda_runtime_api.h> and <cuda_runtime.h> name these files there and the toolkit's
// everywhere else. runtime.cpp implements the functions.
#pragma once
#include <cstddef>
#include <cstdint>

#define FUSEDWARM_EMULATED 1

enum cudaError {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
typedef cudaError cudaError_t;

struct CUstream_st;
typedef CUstream_st* cudaStream_t;

enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };

struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

const char* cudaGetErrorString(cudaError_t error);
cudaError_t cudaGetLastError();
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);

namespace fusedwarm {
namespace emu {
// The emulated occupancy: blocks of any kernel resident on one multiprocessor (configure()).
int blocks_per_multiprocessor();
// A launch from a table of pointers to the arguments, as cuLaunchKernel takes them: how the host
// path (cuda/host.h) launches the emulated kernels (emu/kernel_table.h, emu::launch_boxed).
using BoxedLaunch = cudaError_t (*)(dim3 grid, dim3 block, void** params);
}  // namespace emu
}  // namespace fusedwarm

template <class Kernel>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, Kernel, int, size_t) {
  *blocks = fusedwarm::emu::blocks_per_multiprocessor();
  return cudaSuccess;
}
