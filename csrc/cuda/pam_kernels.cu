// CUDA backend of fusedwarm.pam: element-wise PA operations and the tiled PAM matmul. All
// arithmetic is fw::pam_* (pam.cuh) and IEEE additions with __fadd_rn (no contraction).
#include <cuda_runtime.h>

#include "launch.cuh"
#include "pam_kernels.h"

namespace fusedwarm {
namespace gpu {
namespace {

constexpr int kElemThreads = 256;
constexpr int kTileDim = 16;  // the matmul's square tile: one output per thread

template <fw::PamOp Op>
__global__ void __launch_bounds__(kElemThreads)
    pam_elementwise_kernel(const float* __restrict a, const float* __restrict b, float* __restrict out, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < n; k += stride) {
    out[k] = fw::pam_apply<Op>(a[k], b != nullptr ? b[k] : 0.0f);
  }
}

template <fw::PamOp Op>
cudaError_t launch_elementwise_typed(const float* a, const float* b, float* out, int64_t n, cudaStream_t stream) {
  const int64_t blocks_needed = (n + kElemThreads - 1) / kElemThreads;
  const unsigned int blocks = static_cast<unsigned int>(blocks_needed < 65535 ? blocks_needed : 65535);
  return launch(pam_elementwise_kernel<Op>, dim3(blocks), dim3(kElemThreads), stream, a, b, out, n);
}

// Block (bx, by) computes the kTileDim x kTileDim tiles of C at rows bx*kTileDim and columns
// (by + j gridDim.y)*kTileDim for j = 0, 1, ...: rows on grid.x (up to 2^31 - 1 tiles), columns
// on grid.y (at most 65535 blocks, each looping over its column tiles). A and B pass through
// shared memory one kTileDim-wide slab of k at a time, and each thread adds its products in
// increasing k, so the sum order is the CPU backend's; a NaN sum is stored as the canonical NaN.
__global__ void __launch_bounds__(kTileDim* kTileDim)
    pam_matmul_kernel(const float* __restrict a, const float* __restrict b, float* __restrict c, int64_t m,
                      int64_t k, int64_t n) {
  __shared__ float as[kTileDim][kTileDim];
  __shared__ float bs[kTileDim][kTileDim + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kTileDim + ty;
  for (int64_t col0 = static_cast<int64_t>(blockIdx.y) * kTileDim; col0 < n;
       col0 += static_cast<int64_t>(gridDim.y) * kTileDim) {
    const int64_t col = col0 + tx;
    float acc = 0.0f;
    for (int64_t k0 = 0; k0 < k; k0 += kTileDim) {
      const int64_t ka = k0 + tx, kb = k0 + ty;
      as[ty][tx] = (row < m && ka < k) ? a[row * k + ka] : 0.0f;
      bs[ty][tx] = (kb < k && col < n) ? b[kb * n + col] : 0.0f;
      __syncthreads();
      const int64_t left = k - k0;
      const int steps = left < kTileDim ? static_cast<int>(left) : kTileDim;
      for (int kk = 0; kk < steps; ++kk) acc = __fadd_rn(acc, fw::pam_mul(as[ty][kk], bs[kk][tx]));
      __syncthreads();
    }
    if (row < m && col < n) c[row * n + col] = fw::canonical_nan(acc);
  }
}

}  // namespace

cudaError_t launch_pam_elementwise(fw::PamOp op, const float* a, const float* b, float* out, int64_t n,
                                   cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  switch (op) {
    case fw::PamOp::kMul: return launch_elementwise_typed<fw::PamOp::kMul>(a, b, out, n, stream);
    case fw::PamOp::kDiv: return launch_elementwise_typed<fw::PamOp::kDiv>(a, b, out, n, stream);
    case fw::PamOp::kSqrt: return launch_elementwise_typed<fw::PamOp::kSqrt>(a, nullptr, out, n, stream);
    case fw::PamOp::kExp2: return launch_elementwise_typed<fw::PamOp::kExp2>(a, nullptr, out, n, stream);
    case fw::PamOp::kLog2: return launch_elementwise_typed<fw::PamOp::kLog2>(a, nullptr, out, n, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_pam_matmul(const float* a, const float* b, float* c, int64_t m, int64_t k, int64_t n,
                              cudaStream_t stream) {
  if (m == 0 || n == 0) return cudaSuccess;
  const int64_t row_tiles = (m + kTileDim - 1) / kTileDim, col_tiles = (n + kTileDim - 1) / kTileDim;
  const dim3 grid(static_cast<unsigned int>(row_tiles), static_cast<unsigned int>(col_tiles < 65535 ? col_tiles : 65535));
  return launch(pam_matmul_kernel, grid, dim3(kTileDim, kTileDim), stream, a, b, c, m, k, n);
}

}  // namespace gpu
}  // namespace fusedwarm
