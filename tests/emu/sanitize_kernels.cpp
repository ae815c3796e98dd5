// The sanitizer driver's kernels and launches (sanitize.h): the real kernel sources, compiled by g++
// against the CUDA shim (csrc/emu) as the emulated device's own builds compile them
// (emu/step_variant.cpp, emu/misc_kernels.cpp), so __CUDA_ARCH__ is defined here and only here.
//
// cuda/step_variant.cu makes one variant per translation unit, as extern "C" kernels whose types
// come from macros; the driver runs every variant in one binary, so the step kernels here are
// templates of its own around the same device bodies (gpu::step_body, gpu::norm_chunks_body,
// gpu::row_coefficients_body). scripts/emu_sanitize.sh compiles this file once per rule, with
// FW_SANITIZE_RULE=fw::AdamW (fw::SGD, ...): that rule's step variants (FW_SANITIZE_PARAMS x both
// state formats x both arithmetics); and once without it: cuda/misc_kernels.cu's extern "C"
// kernels (schedule factors, PAM element-wise and matmul). The units compile in parallel, and a
// mutant of one kernel file recompiles only the units that include it.
//
// The launch functions mirror cuda/host.h's grid logic (DeviceStep::run,
// DeviceStep::schedule_factors, DevicePam), with the occupancy that the emulated device's host path
// (emu/ops_emu.cpp, resident_blocks) reads; keep them in step with those files. The driver checks
// the launches and blocks each step ran from the device's configuration, independently of this
// file.
#include <cuda_runtime.h>

#if !defined(__CUDA_ARCH__)
#error "the kernels must take their device branches: cuda_runtime.h must be the CUDA shim (-Icsrc/emu first)"
#endif

#include "sanitize.h"

#if defined(FW_SANITIZE_RULE)
#include "cuda/step_kernels.cuh"
#else
#include "cuda/misc_kernels.cu"
#endif

namespace fusedwarm {
namespace sanitize {
namespace {

// cuda/host.h's blocks_for: enough blocks of per_block threads for `threads` threads.
unsigned int blocks_for(int64_t threads, int per_block) {
  return static_cast<unsigned int>((threads + per_block - 1) / per_block);
}

}  // namespace

#if defined(FW_SANITIZE_RULE)

namespace {

// As cuda/step_variant.cu's fw_step, fw_norm_chunks and fw_row_coefficients, for any variant.
template <class Rule, class P, class S, class M>
__global__ void __launch_bounds__(kThreads) step_kernel(const LaunchArgs a, const typename Rule::Hyper h) {
  gpu::step_body<Rule, P, S, M>(a, h);
}

template <class Rule, class P, class S, class M>
__global__ void __launch_bounds__(kThreads) norm_chunks_kernel(const LaunchArgs a, const typename Rule::Hyper h) {
  gpu::norm_chunks_body<Rule, P, S, M>(a, h);
}

template <class Rule>
__global__ void __launch_bounds__(kThreads) row_coefficients_kernel(const LaunchArgs a,
                                                                    const typename Rule::Hyper h) {
  gpu::row_coefficients_body<Rule>(a, h);
}

}  // namespace

// cuda/host.h, DeviceStep::run (from its LaunchArgs on; the slot table is the driver's).
template <class Rule, class P, class S, class M>
cudaError_t launch_step(const LaunchArgs& args, const typename Rule::Hyper& hyper) {
  const dim3 block(kThreads);
  if (args.control.mode != fw::kControlNone) {
    cudaError_t err = emu::launch(norm_chunks_kernel<Rule, P, S, M>, dim3(blocks_for(args.num_chunks, kThreads)),
                                  block, nullptr, args, hyper);
    if (err != cudaSuccess) return err;
    err = emu::launch(row_coefficients_kernel<Rule>, dim3(blocks_for(args.num_rows, kThreads)), block, nullptr, args,
                      hyper);
    if (err != cudaSuccess) return err;
  }
  // As many blocks as can be resident at once: emu/ops_emu.cpp's resident_blocks (multiprocessors
  // times the configured blocks per multiprocessor).
  int sms = 0;
  const cudaError_t err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  if (err != cudaSuccess) return err;
  const int64_t resident = static_cast<int64_t>(sms) * emu::blocks_per_multiprocessor();
  const dim3 grid(static_cast<unsigned int>(args.num_tiles < resident ? args.num_tiles : resident));
  return emu::launch(step_kernel<Rule, P, S, M>, grid, block, nullptr, args, hyper);
}

#define FW_SANITIZE_INSTANTIATE(P, S, M) \
  template cudaError_t launch_step<FW_SANITIZE_RULE, P, S, M>(const LaunchArgs&, const FW_SANITIZE_RULE::Hyper&);
#define FW_SANITIZE_INSTANTIATE_PARAM(P)                  \
  FW_SANITIZE_INSTANTIATE(P, fw::StateF32, fw::Ieee)      \
  FW_SANITIZE_INSTANTIATE(P, fw::StateF32, fw::Pam)       \
  FW_SANITIZE_INSTANTIATE(P, fw::StateBF16, fw::Ieee)     \
  FW_SANITIZE_INSTANTIATE(P, fw::StateBF16, fw::Pam)
FW_SANITIZE_PARAMS(FW_SANITIZE_INSTANTIATE_PARAM)

#else  // FW_SANITIZE_RULE

// cuda/host.h, DevicePam::elementwise. As there (pam_impl.h calls it only for a nonempty tensor),
// nothing is launched for n == 0.
cudaError_t launch_pam_elementwise(fw::PamOp op, const float* a, const float* b, float* out, int64_t n) {
  using Kernel = void (*)(const float*, const float*, float*, int64_t);
  static const Kernel kernels[] = {fw_pam_mul, fw_pam_div, fw_pam_sqrt, fw_pam_exp2, fw_pam_log2};
  if (n == 0) return cudaSuccess;
  const int64_t needed = blocks_for(n, gpu::kElemThreads);
  const dim3 grid(static_cast<unsigned int>(needed < 65535 ? needed : 65535));
  return emu::launch(kernels[static_cast<int>(op)], grid, dim3(gpu::kElemThreads), nullptr, a, b, out, n);
}

// cuda/host.h, DevicePam::matmul.
cudaError_t launch_pam_matmul(const float* a, const float* b, float* c, int64_t m, int64_t k, int64_t n) {
  if (m == 0 || n == 0) return cudaSuccess;
  const int64_t col_tiles = (n + gpu::kTileDim - 1) / gpu::kTileDim;
  const dim3 grid(blocks_for(m, gpu::kTileDim), static_cast<unsigned int>(col_tiles < 65535 ? col_tiles : 65535));
  return emu::launch(fw_pam_matmul, grid, dim3(gpu::kTileDim, gpu::kTileDim), nullptr, a, b, c, m, k, n);
}

// cuda/host.h, DeviceStep::schedule_factors.
cudaError_t launch_schedule_factors(const int64_t* steps, int64_t n, const fw::Schedule& schedule, float* out) {
  if (n == 0) return cudaSuccess;
  return emu::launch(fw_schedule_factors, dim3(blocks_for(n, kThreads)), dim3(kThreads), nullptr, steps, n, schedule,
                     out);
}

#endif  // FW_SANITIZE_RULE

}  // namespace sanitize
}  // namespace fusedwarm
