"""The extension's sources, kernel variants and compile flags: shared by the JIT build and setup.py.

Plain data read by setup.py without torch, so it imports nothing from torch or fusedwarm.
"""

import platform

# The torch-facing library, built once (no CUDA toolkit needed): op schemas and registrations,
# argument checks and packing, the CPU host side and the non-step CPU ops. Sources that only a
# torch with CUDA needs (the GPU host side, which drives NVRTC-compiled kernels through the CUDA
# driver) are added there. The JIT build compiles each unit (a tuple of sources) as one
# translation unit, the units in parallel: torch's headers take most of a translation unit's
# compile time, so two units of several sources each build about twice as fast as one unit per
# source on a 2-core machine.
CORE_UNITS = (("ops.cpp", "cpu/pam_cpu.cpp"), ("ops_common.cpp", "variants.cpp", "cpu/step_cpu.cpp"))
CORE_CUDA_UNITS = (("cuda/ops_cuda.cpp",),)
# The emulated CUDA device (csrc/emu): the CUDA backend's host path compiled by g++ against a CUDA
# shim into a library of its own (ops namespace fusedwarm_emu), built only when something asks for
# it (fusedwarm.emulator, the tests); its kernels are variants like the others.
EMU_UNITS = (("ops_common.cpp", "variants.cpp", "emu/runtime.cpp"), ("emu/ops_emu.cpp",))

# Kernel variants, compiled on first use, one translation unit each with the variant's types as
# macros. A step variant's name is "<rule>.<weights>.<states>.<arithmetic>" (csrc/ops_common.cpp,
# step_variant); the CUDA and emulated backends also have the module "misc".
VARIANT_SOURCES = {"cpu": "cpu/step_variant.cpp", "cuda": "cuda/step_variant.cu", "emu": "emu/step_variant.cpp"}
MISC_SOURCES = {"cuda": "cuda/misc_kernels.cu", "emu": "emu/misc_kernels.cpp"}
RULES = {"adamw": "fw::AdamW", "sgd": "fw::SGD", "sgdm": "fw::SGDMomentum", "lion": "fw::Lion"}
WEIGHTS = {"f32": "fw::ParamF32"} | {
    f"{name}x{bits}": f"fw::ParamHalf<fw::{fmt},{bits}>"
    for name, fmt in (("bf16", "BF16Format"), ("f16", "F16Format")) for bits in (0, 8, 16)}
STATES = {"f32": "fw::StateF32", "bf16": "fw::StateBF16", "q8": "fw::StateQuant<8>", "q4": "fw::StateQuant<4>"}
ARITHMETICS = {"ieee": "fw::Ieee", "pam": "fw::Pam"}
SOURCE_SUFFIXES = (".h", ".cuh", ".cu", ".cpp")
# The files (paths under csrc, or folder prefixes ending in "/") each kind of variant is compiled
# from, which its cache key hashes: editing the torch-facing library's sources rebuilds no variant.
VARIANT_DEPENDENCIES = {
    "cpu": ("include/", "step_abi.h", "cpu/step_variant.cpp", "cpu/chunk.h"),
    "cuda": ("include/", "step_abi.h", "cuda/step_kernels.cuh", "cuda/step_variant.cu", "cuda/misc_kernels.cu"),
}
VARIANT_DEPENDENCIES["emu"] = VARIANT_DEPENDENCIES["cuda"] + (
    "emu/cuda_runtime.h", "emu/cuda_runtime_api.h", "emu/kernel_table.h", "emu/step_variant.cpp",
    "emu/misc_kernels.cpp")

# -ffp-contract=off / --fmad=false: no fused multiply-add that one backend would do and the other
# not (DESIGN.md: backends agree bit for bit). No fast-math anywhere; -fno-math-errno only lets
# sqrt compile to the (IEEE, correctly rounded) instruction without an errno branch, which keeps
# the element loop vectorizable. -march=native: the build is made on the machine that runs it,
# and the JIT cache key includes this CPU's feature flags. -mprefer-vector-width=512 (x86-64):
# where the CPU has AVX-512, GCC's default tuning still picks 256-bit vectors; the element loop is
# compute-bound and runs about 1.4x faster with 512-bit ones (benchmarks/step.py). Without AVX-512
# the option changes nothing.
FP_FLAGS = ("-ffp-contract=off", "-fno-math-errno")
# -fopenmp-simd: the element loops' `#pragma omp simd` (cpu/chunk.h) without OpenMP's runtime; without
# it GCC leaves the loops with a reduction scalar.
VARIANT_FLAGS = ("-O3", "-march=native", *FP_FLAGS, "-fopenmp-simd") + (
    ("-mprefer-vector-width=512",) if platform.machine() in ("x86_64", "AMD64") else ())
# The torch-facing library: host code (packing, checks) plus the CPU PAM ops. -fopenmp: ATen's
# at::parallel_for is OpenMP inside the headers, so without it the CPU ops would run on one thread.
CXX_FLAGS = ("-O2", "-march=native", *FP_FLAGS, "-fopenmp")
LD_FLAGS = ("-fopenmp",)
# NVRTC: C++17, no contraction, line info for profilers.
NVRTC_FLAGS = ("-std=c++17", "--fmad=false", "-lineinfo")
# The emulator's kernels follow the same floating-point rules (no contraction, no fast-math); they
# need not be fast, so no -march=native and -O1 for a shorter build. The vector loads read
# halves and floats as uint4 words, as CUDA code does: -fno-strict-aliasing keeps g++ from
# assuming they cannot alias.
EMU_FLAGS = ("-O1", "-ffp-contract=off", "-fno-strict-aliasing")
