// The emulated device's build of cuda/step_kernels_adamw.cu: the same file, compiled by g++ against
// this directory's CUDA shim.
#include "cuda/step_kernels_adamw.cu"
