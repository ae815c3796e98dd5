// CPU backend host side (step_cpu.h).
#include "cpu/step_cpu.h"

#include <ATen/Parallel.h>

#include <string>
#include <vector>

#include "variants.h"

namespace fusedwarm {

namespace {

// The variants' parallel loop: torch's (at::parallel_for), so a step uses torch's threads and
// honours torch.set_num_threads.
void parallel_for(int64_t begin, int64_t end, int64_t grain, void (*body)(void*, int64_t, int64_t), void* context) {
  at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) { body(context, b, e); });
}

// The entry point of CPU step variant `name`, compiled and loaded on its first use.
CpuStepFn step_function(const std::string& name) {
  static LoadedOnce<std::string, CpuStepFn> functions;
  return functions.get(name, [&] {
    return reinterpret_cast<CpuStepFn>(library_symbol(variant_file("cpu", name), kCpuStepSymbol));
  });
}

}  // namespace

template <class Rule>
void CpuBackend::run(const StepLists& L, const typename Rule::Hyper& h) {
  std::vector<TensorSlot> slots(L.params.size());
  const SlotTotals n = fill_slots(L, Rule::kStates, slots.data());
  const CpuStepFn step = n.slots != 0 ? step_function(step_variant(kRuleName<Rule>, L)) : nullptr;
  increment_steps(L);
  if (n.slots == 0) return;
  CpuStepCall call{};
  call.slots = slots.data();
  call.num_slots = n.slots;
  call.hyper = &h;
  call.lr = L.lr_tensor ? L.lr_tensor->data_ptr<float>()[0] : static_cast<float>(L.lr);
  call.seed = static_cast<uint64_t>(L.seed);
  call.control = L.control;
  call.parallel_for = &parallel_for;
  step(&call);
}

template void CpuBackend::run<fw::AdamW>(const StepLists&, const fw::AdamW::Hyper&);
template void CpuBackend::run<fw::SGD>(const StepLists&, const fw::SGD::Hyper&);
template void CpuBackend::run<fw::SGDMomentum>(const StepLists&, const fw::SGDMomentum::Hyper&);
template void CpuBackend::run<fw::Lion>(const StepLists&, const fw::Lion::Hyper&);

}  // namespace fusedwarm
