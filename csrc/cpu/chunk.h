// The CPU element loop, torch-free so that tests/test_vectorized.py can compile it on its own
// and check that the compiler vectorizes it.
#pragma once
#include "fusedwarm/update.cuh"

namespace fusedwarm {

// The element loop of one chunk; returns the number of elements skipped for a non-finite
// gradient. Everything arrives by value and the arrays are __restrict, so the compiler knows the
// stores (an int8 extra-bits store may alias anything) cannot change the scalars or pointers, and
// vectorizes the branch-free element function, one element per lane. `coef` is the update-size
// control's coefficients of the row that holds [begin, end): fw::Uncontrolled without control or
// for a row whose coefficients are (1, 1), fw::Blended otherwise, never a runtime choice between
// the two (update.cuh says why). [begin, end) lies in one block of the random stream, whose key
// is `key` (philox.cuh, stream_key).
template <class Rule, class P, class S, class M = fw::Ieee, class C = fw::Uncontrolled>
int64_t run_chunk(const typename Rule::Scalars sc, const uint32_t key, const float grad_scale, const C coef,
                  int64_t begin, int64_t end, typename P::storage* __restrict w,
                  const typename P::storage* __restrict g, typename P::extra_storage* __restrict ext,
                  typename S::storage* __restrict s0, typename S::storage* __restrict s1) {
  constexpr int kS = Rule::kStates;
  typename S::storage unused{};
  int64_t skipped = 0;
#pragma omp simd reduction(+ : skipped)
  for (int64_t k = begin; k < end; ++k) {
    int32_t e = P::K > 0 ? static_cast<int32_t>(ext[k]) : 0;
    const bool ok = fw::update_element<Rule, P, S, M>(sc, key, static_cast<uint64_t>(k), w[k], e, g[k],
                                                      grad_scale, kS > 0 ? s0[k] : unused, kS > 1 ? s1[k] : unused,
                                                      coef);
    if (P::K > 0) ext[k] = static_cast<typename P::extra_storage>(e);
    skipped += ok ? 0 : 1;
  }
  return skipped;
}

}  // namespace fusedwarm
