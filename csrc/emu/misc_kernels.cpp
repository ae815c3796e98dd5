// The emulated device's build of cuda/misc_kernels.cu, compiled by g++ against this directory's
// CUDA shim.
#include "cuda/misc_kernels.cu"
#include "emu/kernel_table.h"
