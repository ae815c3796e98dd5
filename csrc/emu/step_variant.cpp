// The emulated device's build of one step variant: cuda/step_variant.cu, compiled by g++ against
// this directory's CUDA shim (fusedwarm/_build.py gives the variant's macros, as to NVRTC).
#include "cuda/step_variant.cu"
#include "emu/kernel_table.h"
