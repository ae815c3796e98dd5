// The CPU backend instantiated for SGD, SGDMomentum (step_cpu_impl.h).
#include "step_cpu_impl.h"

namespace fusedwarm {

template void CpuBackend::run<fw::SGD>(const StepLists&, const fw::SGD::Hyper&);
template void CpuBackend::run<fw::SGDMomentum>(const StepLists&, const fw::SGDMomentum::Hyper&);

}  // namespace fusedwarm
