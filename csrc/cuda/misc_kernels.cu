// CUDA backend (layer 2 of DESIGN.md): the kernels that are not step variants, as one module
// ("misc"), compiled once on first use like a variant: the warmup/schedule factors of a batch of
// steps (fw::factors, the values the step kernel uses, for logging), and fusedwarm.pam's
// element-wise PA operations and tiled PAM matmul. All arithmetic is fw::pam_* (pam.cuh) and IEEE
// additions with __fadd_rn (no contraction).
#if !defined(__CUDACC_RTC__)
#include <cuda_runtime.h>
#endif

#include "step_abi.h"

namespace fusedwarm {
namespace gpu {

constexpr int kElemThreads = kPamElementThreads;  // the element-wise kernels' block (step_abi.h)
constexpr int kTileDim = kPamTileDim;              // the matmul's square tile: one output per thread

namespace {

template <fw::PamOp Op>
__device__ __forceinline__ void pam_elementwise(const float* __restrict a, const float* __restrict b,
                                                float* __restrict out, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < n; k += stride) {
    out[k] = fw::pam_apply<Op>(a[k], b != nullptr ? b[k] : 0.0f);
  }
}

}  // namespace
}  // namespace gpu
}  // namespace fusedwarm

extern "C" __global__ void __launch_bounds__(fusedwarm::kThreads)
    fw_schedule_factors(const int64_t* steps, int64_t n, const fw::Schedule schedule, float* out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const fw::Factors f = fw::factors(schedule, steps[i]);
  out[4 * i] = f.warmup;
  out[4 * i + 1] = f.schedule;
  out[4 * i + 2] = f.lr;
  out[4 * i + 3] = f.adaptive;
}

#define FW_PAM_KERNEL(name, op)                                                                                  \
  extern "C" __global__ void __launch_bounds__(fusedwarm::gpu::kElemThreads)                                     \
      name(const float* __restrict a, const float* __restrict b, float* __restrict out, int64_t n) {             \
    fusedwarm::gpu::pam_elementwise<op>(a, b, out, n);                                                           \
  }
FW_PAM_KERNEL(fw_pam_mul, fw::PamOp::kMul)
FW_PAM_KERNEL(fw_pam_div, fw::PamOp::kDiv)
FW_PAM_KERNEL(fw_pam_sqrt, fw::PamOp::kSqrt)
FW_PAM_KERNEL(fw_pam_exp2, fw::PamOp::kExp2)
FW_PAM_KERNEL(fw_pam_log2, fw::PamOp::kLog2)
#undef FW_PAM_KERNEL

// Block (bx, by) computes the kTileDim x kTileDim tiles of C at rows bx*kTileDim and columns
// (by + j gridDim.y)*kTileDim for j = 0, 1, ...: rows on grid.x (up to 2^31 - 1 tiles), columns
// on grid.y (at most 65535 blocks, each looping over its column tiles). A and B pass through
// shared memory one kTileDim-wide slab of k at a time, and each thread adds its products in
// increasing k, so the sum order is the CPU backend's; a NaN sum is stored as the canonical NaN.
extern "C" __global__ void __launch_bounds__(fusedwarm::gpu::kTileDim* fusedwarm::gpu::kTileDim)
    fw_pam_matmul(const float* __restrict a, const float* __restrict b, float* __restrict c, int64_t m, int64_t k,
                  int64_t n) {
  constexpr int kTileDim = fusedwarm::gpu::kTileDim;
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

// The kernels of this file, for the emulated device's launch table (emu/kernel_table.h).
#define FW_KERNELS(X)                                                                                     \
  X(fw_schedule_factors) X(fw_pam_mul) X(fw_pam_div) X(fw_pam_sqrt) X(fw_pam_exp2) X(fw_pam_log2) \
  X(fw_pam_matmul)
