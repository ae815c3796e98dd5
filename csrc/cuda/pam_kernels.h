// CUDA backend of fusedwarm.pam (layer 2 of DESIGN.md): torch-free kernel entry points; the
// adapter in pam_cuda.cpp checks the tensors and passes raw pointers and the current stream.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "fusedwarm/pam.cuh"

namespace fusedwarm {
namespace gpu {

// out[k] = op(a[k], b[k]) for k < n (b is ignored, and may be nullptr, for unary ops).
cudaError_t launch_pam_elementwise(fw::PamOp op, const float* a, const float* b, float* out, int64_t n,
                                   cudaStream_t stream);

// C (M x N) = A (M x K) PAM-times B (K x N), row-major and contiguous, each C[i, j] summed strictly
// sequentially over k from 0.0f, as the CPU backend does (bit-identical results).
cudaError_t launch_pam_matmul(const float* a, const float* b, float* c, int64_t m, int64_t k, int64_t n,
                              cudaStream_t stream);

}  // namespace gpu
}  // namespace fusedwarm
