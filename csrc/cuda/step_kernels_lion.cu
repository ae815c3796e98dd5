// The multi-tensor step kernels of Lion, every weight format, state dtype and arithmetic.
#include "step_kernels.cuh"

namespace fusedwarm {
namespace gpu {
FW_INSTANTIATE_RULE(fw::Lion)
}  // namespace gpu
}  // namespace fusedwarm
