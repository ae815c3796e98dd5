"""The extension's source list and compile flags: shared by the JIT build and setup.py (no torch import)."""

CPU_SOURCES = ("ops.cpp", "cpu/step_cpu.cpp", "cpu/pam_cpu.cpp")
CUDA_SOURCES = ("cuda/ops_cuda.cpp", "cuda/step_kernels.cu", "cuda/pam_cuda.cpp", "cuda/pam_kernels.cu")
HEADER_SUFFIXES = (".h", ".cuh")

# -ffp-contract=off / --fmad=false: no fused multiply-add that one backend would do and the other
# not (DESIGN.md: backends agree bit for bit). No fast-math anywhere; -fno-math-errno only lets
# sqrt compile to the (IEEE, correctly rounded) instruction without an errno branch, which keeps
# the element loop vectorizable. -march=native: the build is made on the machine that runs it,
# and the JIT cache key includes this CPU's feature flags.
CXX_FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fopenmp")
CUDA_FLAGS = ("-O3", "--fmad=false", "-lineinfo")
LD_FLAGS = ("-fopenmp",)
