// The emulated device's build of the remaining kernel files: the same files, compiled by g++
// against this directory's CUDA shim.
#include "cuda/pam_kernels.cu"
#include "cuda/schedule_kernels.cu"
