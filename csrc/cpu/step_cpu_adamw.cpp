// The CPU backend instantiated for AdamW (step_cpu_impl.h).
#include "step_cpu_impl.h"

namespace fusedwarm {

template void CpuBackend::run<fw::AdamW>(const StepLists&, const fw::AdamW::Hyper&);

}  // namespace fusedwarm
