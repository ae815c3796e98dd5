// CUDA backend (layer 2 of DESIGN.md): the one way the kernel sources launch a kernel.
//
// A function rather than the <<<...>>> syntax, so that a template kernel's name keeps its commas,
// and so that the emulated device (csrc/emu), which compiles these same sources with g++ and has
// no <<<...>>>, runs the call on the CPU instead: there emu::launch executes every block of the
// grid, the threads of a block as fibers (csrc/emu/cuda_runtime.h).
#pragma once
#include <cuda_runtime.h>

#include <utility>

namespace fusedwarm {
namespace gpu {

// Enqueues kernel<<<grid, block, 0, stream>>>(args...) and returns the launch status.
template <class... Params, class... Args>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t stream, Args&&... args) {
#if defined(FUSEDWARM_EMULATED)
  return emu::launch(kernel, grid, block, stream, std::forward<Args>(args)...);
#else
  kernel<<<grid, block, 0, stream>>>(std::forward<Args>(args)...);
  return cudaGetLastError();
#endif
}

}  // namespace gpu
}  // namespace fusedwarm
