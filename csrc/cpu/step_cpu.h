#pragma once
#include "../step_args.h"

namespace fusedwarm {

struct CpuBackend {
  template <class Rule>
  static void run(const StepLists& L, const typename Rule::Hyper& h);
};

}  // namespace fusedwarm
