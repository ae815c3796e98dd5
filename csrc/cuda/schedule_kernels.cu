// CUDA backend (layer 2 of DESIGN.md): the warmup/schedule factors of a batch of steps, for
// logging (fw::factors, the values the step kernel uses).
#include <cuda_runtime.h>

#include "launch.cuh"
#include "step_kernels.h"

namespace fusedwarm {
namespace gpu {
namespace {

__global__ void __launch_bounds__(kThreads)
    schedule_factors_kernel(const int64_t* steps, int64_t n, const fw::Schedule schedule, float* out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const fw::Factors f = fw::factors(schedule, steps[i]);
  out[4 * i] = f.warmup;
  out[4 * i + 1] = f.schedule;
  out[4 * i + 2] = f.lr;
  out[4 * i + 3] = f.adaptive;
}

}  // namespace

cudaError_t launch_schedule_factors(const int64_t* steps, int64_t n, const fw::Schedule& schedule, float* out,
                                    cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return launch(schedule_factors_kernel, dim3(static_cast<unsigned int>(blocks)), dim3(kThreads), stream, steps, n,
                schedule, out);
}

}  // namespace gpu
}  // namespace fusedwarm
