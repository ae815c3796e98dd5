// CPU backend: loops over tensors and, in parallel, over elements; all math is in
// include/fusedwarm/update.cuh.
#include "step_cpu.h"

#include <ATen/Parallel.h>

#include <atomic>

#include "chunk.h"

namespace fusedwarm {

namespace {

constexpr int64_t kGrain = 1 << 14;

template <class Rule, class P, class S, class M>
void run_typed(const StepLists& L, const typename Rule::Hyper& h) {
  using PS = typename P::storage;
  using SS = typename S::storage;
  constexpr int kS = Rule::kStates;
  const float lr = L.lr_tensor ? L.lr_tensor->data_ptr<float>()[0] : static_cast<float>(L.lr);
  const uint64_t seed = static_cast<uint64_t>(L.seed);
  for (size_t i = 0; i < L.params.size(); ++i) {
    const int64_t n = L.params[i].numel();
    if (n == 0) continue;
    const int64_t step = L.steps[i].data_ptr<int64_t>()[0];
    const auto sc = Rule::template scalars<fw::Ieee>(h, lr, step);
    const uint64_t stream = fw::stream_key(seed, static_cast<uint32_t>(L.tensor_ids[i]), static_cast<uint64_t>(step));
    PS* w = static_cast<PS*>(L.params[i].data_ptr());
    const PS* g = static_cast<const PS*>(L.grads[i].data_ptr());
    auto* ext = P::K > 0 ? static_cast<typename P::extra_storage*>(L.extras[i].data_ptr()) : nullptr;
    SS* s0 = kS > 0 ? static_cast<SS*>(L.states[0][i].data_ptr()) : nullptr;
    SS* s1 = kS > 1 ? static_cast<SS*>(L.states[1][i].data_ptr()) : nullptr;
    const float grad_scale = L.grad_scales ? L.grad_scales->data_ptr<float>()[i] : 1.0f;
    std::atomic<int64_t> skipped{0};
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      const int64_t k = run_chunk<Rule, P, S, M>(sc, stream, grad_scale, begin, end, w, g, ext, s0, s1);
      if (k != 0) skipped.fetch_add(k, std::memory_order_relaxed);
    });
    if (L.nonfinite) L.nonfinite->data_ptr<int64_t>()[i] += skipped.load();
  }
}

}  // namespace

template <class Rule>
void CpuBackend::run(const StepLists& L, const typename Rule::Hyper& h) {
  dispatch_arithmetic(L, [&](auto mtag) {
    dispatch_storage(L, [&](auto ptag, auto stag) {
      run_typed<Rule, typename decltype(ptag)::type, typename decltype(stag)::type, typename decltype(mtag)::type>(
          L, h);
    });
  });
}

template void CpuBackend::run<fw::AdamW>(const StepLists&, const fw::AdamW::Hyper&);
template void CpuBackend::run<fw::SGD>(const StepLists&, const fw::SGD::Hyper&);
template void CpuBackend::run<fw::SGDMomentum>(const StepLists&, const fw::SGDMomentum::Hyper&);
template void CpuBackend::run<fw::Lion>(const StepLists&, const fw::Lion::Hyper&);

}  // namespace fusedwarm
