// The multi-tensor step kernels of SGD without and with momentum, every weight format, state dtype
// and arithmetic.
#include "step_kernels.cuh"

namespace fusedwarm {
namespace gpu {
FW_INSTANTIATE_RULE(fw::SGD)
FW_INSTANTIATE_RULE(fw::SGDMomentum)
}  // namespace gpu
}  // namespace fusedwarm
