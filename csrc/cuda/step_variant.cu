// One variant of the step kernels, as extern "C" kernels with fixed names (step_abi.h): the
// translation unit fusedwarm/_build.py compiles, with the variant's types given as macros:
//   FW_RULE   fw::AdamW, fw::SGD, fw::SGDMomentum or fw::Lion
//   FW_PARAM  fw::ParamF32 or fw::ParamHalf<fw::BF16Format|fw::F16Format, 0|8|16>
//   FW_STATE  fw::StateF32 or fw::StateBF16
//   FW_ARITH  fw::Ieee or fw::Pam
// NVRTC compiles it for the user's GPU, g++ for the emulated device (emu/step_variant.cpp).
#include "cuda/step_kernels.cuh"

#if !defined(FW_RULE) || !defined(FW_PARAM) || !defined(FW_STATE) || !defined(FW_ARITH)
#error "cuda/step_variant.cu needs FW_RULE, FW_PARAM, FW_STATE and FW_ARITH (see fusedwarm/_build.py)"
#endif

using FwHyper = FW_RULE::Hyper;

extern "C" __global__ void __launch_bounds__(fusedwarm::kThreads)
    fw_step(const fusedwarm::LaunchArgs a, const FwHyper h) {
  fusedwarm::gpu::step_body<FW_RULE, FW_PARAM, FW_STATE, FW_ARITH>(a, h);
}

extern "C" __global__ void __launch_bounds__(fusedwarm::kThreads)
    fw_norm_chunks(const fusedwarm::LaunchArgs a, const FwHyper h) {
  fusedwarm::gpu::norm_chunks_body<FW_RULE, FW_PARAM, FW_STATE, FW_ARITH>(a, h);
}

extern "C" __global__ void __launch_bounds__(fusedwarm::kThreads)
    fw_row_coefficients(const fusedwarm::LaunchArgs a, const FwHyper h) {
  fusedwarm::gpu::row_coefficients_body<FW_RULE>(a, h);
}

// The kernels of this file, for the emulated device's launch table (emu/kernel_table.h).
#define FW_KERNELS(X) X(fw_step) X(fw_norm_chunks) X(fw_row_coefficients)
