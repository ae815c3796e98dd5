"""The extension's source list and compile flags: shared by the JIT build and setup.py.

Plain data read by setup.py without torch, so it imports nothing from torch or fusedwarm.
"""

import platform

CPU_SOURCES = ("ops.cpp", "ops_common.cpp", "cpu/step_cpu_adamw.cpp", "cpu/step_cpu_sgd.cpp", "cpu/step_cpu_lion.cpp",
               "cpu/pam_cpu.cpp")
CUDA_SOURCES = ("cuda/ops_cuda.cpp", "cuda/step_kernels_adamw.cu", "cuda/step_kernels_sgd.cu",
                "cuda/step_kernels_lion.cu", "cuda/schedule_kernels.cu", "cuda/pam_kernels.cu")
# The emulated CUDA device (csrc/emu): the CUDA backend's host path and kernel files, compiled by
# g++ against a CUDA shim into a library of its own (ops namespace fusedwarm_emu), built only
# when something asks for it (fusedwarm.emulator, the tests).
EMU_SOURCES = ("ops_common.cpp", "emu/ops_emu.cpp", "emu/runtime.cpp", "emu/step_kernels_adamw.cpp",
               "emu/step_kernels_sgd.cpp", "emu/step_kernels_lion.cpp", "emu/other_kernels.cpp")
HEADER_SUFFIXES = (".h", ".cuh", ".cu")

# -ffp-contract=off / --fmad=false: no fused multiply-add that one backend would do and the other
# not (DESIGN.md: backends agree bit for bit). No fast-math anywhere; -fno-math-errno only lets
# sqrt compile to the (IEEE, correctly rounded) instruction without an errno branch, which keeps
# the element loop vectorizable. -march=native: the build is made on the machine that runs it,
# and the JIT cache key includes this CPU's feature flags. -mprefer-vector-width=512 (x86-64):
# where the CPU has AVX-512, GCC's default tuning still picks 256-bit vectors; the element loop is
# compute-bound and runs about 1.4x faster with 512-bit ones (benchmarks/step.py). Without AVX-512
# the option changes nothing.
CXX_FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fopenmp") + (
    ("-mprefer-vector-width=512",) if platform.machine() in ("x86_64", "AMD64") else ())
CUDA_FLAGS = ("-O3", "--fmad=false", "-lineinfo")
LD_FLAGS = ("-fopenmp",)
# The emulator's kernels follow the same floating-point rules (no contraction, no fast-math); they
# need not be fast, so no -march=native and -O1 for a shorter build. The vector loads read
# halves and floats as uint4 words, as CUDA code does: -fno-strict-aliasing keeps g++ from
# assuming they cannot alias.
EMU_FLAGS = ("-O1", "-ffp-contract=off", "-fno-strict-aliasing")
