// CPU backend host side (layers 2-3 of DESIGN.md): packs a checked call into TensorSlots and runs
// the call's step variant (cpu/step_variant.cpp, compiled on first use), on torch's threads.
#pragma once
#include "../step_args.h"

namespace fusedwarm {

struct CpuBackend {
  template <class Rule>
  static void run(const StepLists& L, const typename Rule::Hyper& h);
};

}  // namespace fusedwarm
