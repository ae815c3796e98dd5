// The CPU element loop, torch-free so that tests/test_vectorized.py can compile it on its own
// and check that the compiler vectorizes it.
#pragma once
#include "fusedwarm/update.cuh"

namespace fusedwarm {

// Software prefetch. The hardware prefetchers follow each array only within a 4 KiB page and
// restart at the next one; with up to six arrays whose page offsets differ (small tensors come
// from the heap at arbitrary addresses) their restarts stop coinciding, and the loop ran up to 2x
// slower than with equal offsets (16.7M-element x16 bf16 AdamW, one thread: 1.40 ns/element with
// equal offsets, 2.74 with offsets 0, 1024, 2048, 3072, 512 bytes). So the loop runs in blocks of
// kPrefetchBlock elements and first prefetches, in every array, the block kPrefetchAhead elements
// further on: 1.24 to 1.34 ns/element for all those offsets.
constexpr int64_t kPrefetchBlock = 128;
constexpr int64_t kPrefetchAhead = 1024;

// Prefetches the cache lines of p[0 .. count) (for writing when `write`).
template <class T>
inline void prefetch(const T* p, int64_t count, bool write) {
  constexpr int64_t kLine = 64 / sizeof(T) > 0 ? 64 / sizeof(T) : 1;
  for (int64_t k = 0; k < count; k += kLine) {
    if (write) {
      __builtin_prefetch(p + k, 1);
    } else {
      __builtin_prefetch(p + k, 0);
    }
  }
}

// The element loop of one chunk; returns the number of elements skipped for a non-finite
// gradient. Everything arrives by value and the arrays are __restrict, so the compiler knows the
// stores (an int8 extra-bits store may alias anything) cannot change the scalars or pointers, and
// vectorizes the branch-free element function, one element per lane. `coef` is the update-size
// control's coefficients of the row that holds [begin, end): fw::Uncontrolled without control or
// for a row whose coefficients are (1, 1), fw::Blended otherwise, never a runtime choice between
// the two (update.cuh says why). [begin, end) lies in one block of the random stream, whose key
// is `key` (philox.cuh, stream_key). The vector loop counts in 32 bits (its position in a block of
// kPrefetchBlock elements, the random counter, the skips): 64-bit index lanes cost a fifth more
// vector operations per element.
template <class Rule, class P, class S, class M = fw::Ieee, class C = fw::Uncontrolled>
int64_t run_chunk(const typename Rule::Scalars sc, const uint32_t key, const float grad_scale, const C coef,
                  int64_t begin, int64_t end, typename P::storage* __restrict w,
                  const typename P::storage* __restrict g, typename P::extra_storage* __restrict ext,
                  typename S::storage* __restrict s0, typename S::storage* __restrict s1) {
  constexpr int kS = Rule::kStates;
  typename S::storage unused{};
  int64_t skipped = 0;
  for (int64_t b0 = begin; b0 < end; b0 += kPrefetchBlock) {
    const int32_t len = static_cast<int32_t>(b0 + kPrefetchBlock < end ? kPrefetchBlock : end - b0);
    const int64_t ahead = b0 + kPrefetchAhead;
    if (ahead + kPrefetchBlock <= end) {
      prefetch(w + ahead, kPrefetchBlock, true);
      prefetch(g + ahead, kPrefetchBlock, false);
      if (P::K > 0) prefetch(ext + ahead, kPrefetchBlock, true);
      if (kS > 0) prefetch(s0 + ahead, kPrefetchBlock, true);
      if (kS > 1) prefetch(s1 + ahead, kPrefetchBlock, true);
    }
    typename P::storage* __restrict wb = w + b0;
    const typename P::storage* __restrict gb = g + b0;
    typename P::extra_storage* __restrict eb = P::K > 0 ? ext + b0 : ext;
    typename S::storage* __restrict s0b = kS > 0 ? s0 + b0 : s0;
    typename S::storage* __restrict s1b = kS > 1 ? s1 + b0 : s1;
    const uint32_t counter = fw::element_counter(key, static_cast<uint64_t>(b0));
    int32_t block_skipped = 0;
#pragma omp simd reduction(+ : block_skipped)
    for (int32_t j = 0; j < len; ++j) {
      int32_t e = P::K > 0 ? static_cast<int32_t>(eb[j]) : 0;
      const bool ok = fw::update_element<Rule, P, S, M>(sc, counter + static_cast<uint32_t>(j), wb[j], e, gb[j],
                                                        grad_scale, kS > 0 ? s0b[j] : unused,
                                                        kS > 1 ? s1b[j] : unused, coef);
      if (P::K > 0) eb[j] = static_cast<typename P::extra_storage>(e);
      block_skipped += ok ? 0 : 1;
    }
    skipped += block_skipped;
  }
  return skipped;
}

}  // namespace fusedwarm
