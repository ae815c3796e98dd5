// The CPU backend instantiated for Lion (step_cpu_impl.h).
#include "step_cpu_impl.h"

namespace fusedwarm {

template void CpuBackend::run<fw::Lion>(const StepLists&, const fw::Lion::Hyper&);

}  // namespace fusedwarm
