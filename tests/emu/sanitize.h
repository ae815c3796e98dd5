// The launches of the sanitizer driver: tests/emu/sanitize.cpp calls them, tests/emu/sanitize_kernels.cpp
// defines them (scripts/emu_sanitize.sh builds both with the sanitizers).
//
// Two kinds of translation unit, on purpose: sanitize_kernels.cpp includes the CUDA shim
// (csrc/emu/cuda_runtime.h), which defines __CUDA_ARCH__, so the kernel sources take their device
// branches (the GPU's intrinsics and NaNs) as in the emulated device's own build; the driver does
// not, so the layer-1 functions it calls for the expected values take their host branches, as the
// CPU backend compiles them. This header is all the two share: the shim's host API
// (cuda_runtime_api.h, first on the include path: cudaError_t, no __CUDA_ARCH__) and the step ABI.
#pragma once
#include <cuda_runtime_api.h>

#include "step_abi.h"

namespace fusedwarm {
namespace sanitize {

// The weight formats the step checks cover (each with both state formats and both arithmetics):
// sanitize.cpp runs them, sanitize_kernels.cpp instantiates launch_step for them, rule by rule.
using Bf16K0 = fw::ParamHalf<fw::BF16Format, 0>;
using Bf16K8 = fw::ParamHalf<fw::BF16Format, 8>;
using Bf16K16 = fw::ParamHalf<fw::BF16Format, 16>;
using F16K16 = fw::ParamHalf<fw::F16Format, 16>;
#define FW_SANITIZE_PARAMS(X)                                                   \
  X(fw::ParamF32) X(fusedwarm::sanitize::Bf16K0) X(fusedwarm::sanitize::Bf16K8) \
  X(fusedwarm::sanitize::Bf16K16) X(fusedwarm::sanitize::F16K16)

// One step of a call, launched as cuda/host.h (DeviceStep::run) launches it: with update-size
// control (args.control.mode != kControlNone), the chunk sums over blocks_for(num_chunks) blocks
// and the row coefficients over blocks_for(num_rows) blocks; then the step over
// min(num_tiles, resident blocks) blocks; all of kThreads threads. Returns the first failed
// launch's status. Defined for Rule's variants in the unit compiled with FW_SANITIZE_RULE=Rule.
template <class Rule, class P, class S, class M>
cudaError_t launch_step(const LaunchArgs& args, const typename Rule::Hyper& hyper);

// cuda/misc_kernels.cu's kernels, launched as cuda/host.h (DevicePam, DeviceStep::schedule_factors)
// launches them. b is nullptr for the unary operations.
cudaError_t launch_pam_elementwise(fw::PamOp op, const float* a, const float* b, float* out, int64_t n);
cudaError_t launch_pam_matmul(const float* a, const float* b, float* c, int64_t m, int64_t k, int64_t n);
cudaError_t launch_schedule_factors(const int64_t* steps, int64_t n, const fw::Schedule& schedule, float* out);

}  // namespace sanitize
}  // namespace fusedwarm
