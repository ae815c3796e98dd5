// The multi-tensor step kernels of AdamW, every weight format, state dtype and arithmetic.
#include "step_kernels.cuh"

namespace fusedwarm {
namespace gpu {
FW_INSTANTIATE_RULE(fw::AdamW)
}  // namespace gpu
}  // namespace fusedwarm
