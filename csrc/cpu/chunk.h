// The CPU element loop, torch-free so that tests/test_vectorized.py can compile it on its own
// and check that the compiler vectorizes it.
#pragma once
#include <algorithm>
#include <type_traits>

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

// The gradients of a span of kScanSpan elements are scanned before the span is updated: when
// every scaled gradient in it is finite (fw::scaled_grads_finite on the largest magnitude), its
// elements are updated without a per-element finiteness test, select and skip count: x16 bf16
// AdamW went from 0.46 to 0.44 ns/element (two threads, 16.7M elements; the loop alone is 7%
// faster, the scan costs 2%). A span with a non-finite gradient (an overflow, a loss-scale probe)
// is copied first, and the elements whose gradient is not finite are put back afterwards, as
// update_element leaves them.
constexpr int64_t kScanSpan = 1024;

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

// Two adjacent elements of 16-bit (weights, gradients, extra bits, states) or 8-bit (extra bits)
// storage, read and written as one 32- or 16-bit word. In such a word the first element's bits are
// a shift or a mask away from a float32's (a bfloat16 is its top half), so the vectorized loop
// widens a vector of words into two vectors of floats (the elements at even and at odd positions)
// in two instructions, and narrows them back in two, instead of unpacking 16-bit lanes in order
// (x16 bf16 AdamW: 122 -> 113 instructions per 32 elements, 8-12% faster on one thread in cache).
// The word's low half is the element at the lower address, so this needs a little-endian machine.
template <class T>
struct PairWord {
  static_assert(sizeof(T) <= 2, "pairs of 8- or 16-bit storage");
  using type = typename std::conditional<sizeof(T) == 2, uint32_t, uint16_t>::type;
};

template <class T>
inline void load_pair(const T* p, T& first, T& second) {
  typename PairWord<T>::type x;
  __builtin_memcpy(&x, p, sizeof x);
  first = static_cast<T>(x);
  second = static_cast<T>(x >> (8 * sizeof(T)));
}

// The same for extra bits, widened to int32 (sign-extended) by shifts of the word: a narrowing
// cast to int16/int8 and back costs the vectorized loop two conversions per vector.
template <class T>
inline void load_extra_pair(const T* p, int32_t& first, int32_t& second) {
  constexpr int kBits = 8 * sizeof(T);
  typename PairWord<T>::type x;
  __builtin_memcpy(&x, p, sizeof x);
  const uint32_t u = x;
  first = static_cast<int32_t>(u << (32 - kBits)) >> (32 - kBits);
  second = static_cast<int32_t>(u << (32 - 2 * kBits)) >> (32 - kBits);
}

// `first` and `second` are the two values' bits, zero- or sign-extended (only the low 8 sizeof(T)
// bits are stored). Taking them as uint32 keeps the odd elements' narrowing a mask of the word:
// with a T argument GCC 12 compiled the states' stores with two more shifts each.
template <class T>
inline void store_pair(T* p, uint32_t first, uint32_t second) {
  constexpr int kBits = 8 * sizeof(T);
  constexpr uint32_t kMask = (1u << kBits) - 1u;
  const typename PairWord<T>::type x = static_cast<typename PairWord<T>::type>((first & kMask) | (second << kBits));
  __builtin_memcpy(p, &x, sizeof x);
}

// Whether run_chunk's element loop goes by pairs: every array it touches holds 16-bit (or, extra
// bits, 8-bit) values, with IEEE arithmetic. float32 weights or states take the plain loop, and so
// does piecewise-affine arithmetic: GCC 12 leaves a scalar remainder copy of its pair loop (its
// branches are not if-converted there), which tests/test_vectorized.py would not tell from a
// loop left scalar by mistake.
template <class Rule, class P, class S, class M>
constexpr bool kPairLoop = __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__ && std::is_same<M, fw::Ieee>::value &&
                           sizeof(typename P::storage) == 2 && (Rule::kStates == 0 || sizeof(typename S::storage) == 2);

// Up to kScanSpan elements' storage, kept while a span with a non-finite gradient is updated.
template <class P, class S>
struct SpanCopy {
  typename P::storage w[kScanSpan];
  typename P::extra_storage ext[kScanSpan];
  typename S::storage s0[kScanSpan];
  typename S::storage s1[kScanSpan];
};

// The element loop of one chunk; returns the number of elements skipped for a non-finite
// gradient. Everything arrives by value and the arrays are __restrict, so the compiler knows the
// stores (an int8 extra-bits store may alias anything) cannot change the scalars or pointers, and
// vectorizes the branch-free element function, one element per lane. `coef` is the update-size
// control's coefficients of the row that holds [begin, end): fw::Uncontrolled without control or
// for a row whose coefficients are (1, 1), fw::Blended otherwise, never a runtime choice between
// the two (update.cuh says why). Element k's random counter is that of index k + offset of the full
// tensor (offset: a shard's first element, else 0); [begin + offset, end + offset) lies in one
// block of the random stream, whose key is `key` (philox.cuh, stream_key). The vector loops count in 32 bits (positions in a span, the
// random counter): 64-bit index lanes cost a fifth more vector operations per element.
//
// kPlain: the caller has established Rule::is_plain(sc) and grad_scale == 1 (update.cuh, "plain
// scalars"), and the loop is compiled with those values as constants: the same bits, fewer vector
// operations on the longest dependency chain (x16 bf16 AdamW: 113 -> 108 instructions per 32
// elements, one thread in L2 17% faster).
template <class Rule, class P, class S, class M = fw::Ieee, class C = fw::Uncontrolled, bool kPlain = false>
int64_t run_chunk(const typename Rule::Scalars scalars, const uint32_t key, const float scale, const C coef,
                  int64_t begin, int64_t end, const int64_t offset, typename P::storage* __restrict w,
                  const typename P::storage* __restrict g, typename P::extra_storage* __restrict ext,
                  typename S::storage* __restrict s0, typename S::storage* __restrict s1) {
  const typename Rule::Scalars sc = kPlain ? Rule::plain(scalars) : scalars;
  const float grad_scale = kPlain ? 1.0f : scale;
  constexpr int kS = Rule::kStates;
  constexpr bool kPairs = kPairLoop<Rule, P, S, M>;
  typename S::storage unused{};
  SpanCopy<P, S> saved;
  int64_t skipped = 0;
  for (int64_t span = begin; span < end; span += kScanSpan) {
    const int64_t span_end = span + kScanSpan < end ? span + kScanSpan : end;
    const int32_t span_len = static_cast<int32_t>(span_end - span);
    const typename P::storage* __restrict gs = g + span;
    typename P::magnitude_type largest = 0;
#pragma omp simd reduction(max : largest)
    for (int32_t j = 0; j < span_len; ++j) {
      const typename P::magnitude_type m = P::magnitude(gs[j]);
      largest = m > largest ? m : largest;
    }
    const bool finite = fw::scaled_grads_finite<P, M>(largest, grad_scale);
    if (!finite) {
      std::copy_n(w + span, span_len, saved.w);
      if (P::K > 0) std::copy_n(ext + span, span_len, saved.ext);
      if (kS > 0) std::copy_n(s0 + span, span_len, saved.s0);
      if (kS > 1) std::copy_n(s1 + span, span_len, saved.s1);
    }
    for (int64_t b0 = span; b0 < span_end; b0 += kPrefetchBlock) {
      const int32_t len = static_cast<int32_t>(b0 + kPrefetchBlock < span_end ? kPrefetchBlock : span_end - b0);
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
      const uint32_t counter = fw::element_counter(key, static_cast<uint64_t>(b0 + offset));
      // update_element<..., kFinite = true> reports every element updated, so this count stays 0;
      // it is kept because GCC 12 compiles the loop with a reduction into half the code, three to
      // four times faster (all rules in one file: 8 minutes without it, under 4 with it).
      int32_t block_skipped = 0;
      int32_t first = 0;  // the first element the loop one by one updates
      if constexpr (kPairs) {
        const int32_t pairs = len / 2;
#pragma omp simd reduction(+ : block_skipped)
        for (int32_t j = 0; j < pairs; ++j) {
          typename P::storage w0, w1, g0, g1;
          typename S::storage a0 = unused, a1 = unused, v0 = unused, v1 = unused;
          load_pair(wb + 2 * j, w0, w1);
          load_pair(gb + 2 * j, g0, g1);
          int32_t e0 = 0, e1 = 0;
          if constexpr (P::K > 0) load_extra_pair(eb + 2 * j, e0, e1);
          if constexpr (kS > 0) load_pair(s0b + 2 * j, a0, a1);
          if constexpr (kS > 1) load_pair(s1b + 2 * j, v0, v1);
          const uint32_t c = counter + static_cast<uint32_t>(2 * j);
          const bool ok0 = fw::update_element<Rule, P, S, M, C, true>(sc, c, w0, e0, g0, grad_scale, a0, v0, coef);
          const bool ok1 = fw::update_element<Rule, P, S, M, C, true>(sc, c + 1u, w1, e1, g1, grad_scale, a1, v1, coef);
          store_pair(wb + 2 * j, w0, w1);
          if constexpr (P::K > 0) store_pair(eb + 2 * j, static_cast<uint32_t>(e0), static_cast<uint32_t>(e1));
          if constexpr (kS > 0) store_pair(s0b + 2 * j, a0, a1);
          if constexpr (kS > 1) store_pair(s1b + 2 * j, v0, v1);
          block_skipped += (ok0 ? 0 : 1) + (ok1 ? 0 : 1);
        }
        first = 2 * pairs;  // an odd block's last element
      }
#pragma omp simd reduction(+ : block_skipped)
      for (int32_t j = first; j < len; ++j) {
        int32_t e = P::K > 0 ? static_cast<int32_t>(eb[j]) : 0;
        const bool ok = fw::update_element<Rule, P, S, M, C, true>(
            sc, counter + static_cast<uint32_t>(j), wb[j], e, gb[j], grad_scale, kS > 0 ? s0b[j] : unused,
            kS > 1 ? s1b[j] : unused, coef);
        if (P::K > 0) eb[j] = static_cast<typename P::extra_storage>(e);
        block_skipped += ok ? 0 : 1;
      }
      skipped += block_skipped;
    }
    if (!finite) {
      for (int32_t j = 0; j < span_len; ++j) {
        if (fw::is_finite(fw::scaled_grad<P, M>(gs[j], grad_scale))) continue;
        w[span + j] = saved.w[j];
        if (P::K > 0) ext[span + j] = saved.ext[j];
        if (kS > 0) s0[span + j] = saved.s0[j];
        if (kS > 1) s1[span + j] = saved.s1[j];
        ++skipped;
      }
    }
  }
  return skipped;
}

// Quantized states (update.cuh, "quantized states"): one block of len <= fw::kMaxQuantBlock
// elements from element `first` (a multiple of the block size, so a 4-bit block starts on a byte),
// whose codes are s0/s1 and scales scale0[q]/scale1[q]. Returns the number of elements whose scaled
// gradient is not finite; then nothing of the block was written. As run_chunk, everything arrives
// by value and the arrays are __restrict, so that both element loops vectorize. `coefs.at(i)` is
// element i's update-size coefficients: one value for the block (SameCoef), or per element
// (CoefArray) for a block that spans two rows.
template <class C>
struct SameCoef {
  C c;
  FW_HD const C& at(int32_t) const { return c; }
};
struct CoefArray {
  const fw::RowCoef* c;
  FW_HD fw::RowCoef at(int32_t i) const { return c[i]; }
};

template <class Rule, class P, class S, class M, class CS>
int32_t run_quantized_block(const typename Rule::Scalars sc, const uint32_t counter, const float grad_scale,
                            const CS coefs, const int64_t first, const int32_t len, typename P::storage* __restrict w,
                            const typename P::storage* __restrict g, typename P::extra_storage* __restrict ext,
                            uint8_t* __restrict s0, uint8_t* __restrict s1, float* __restrict scale0,
                            float* __restrict scale1) {
  constexpr int kS = Rule::kStates;
  constexpr bool kNibbles = S::kBits == 4;
  float p[fw::kMaxQuantBlock], f0[fw::kMaxQuantBlock], f1[fw::kMaxQuantBlock];
  uint8_t c0[fw::kMaxQuantBlock + 1], c1[fw::kMaxQuantBlock + 1];  // new codes
  uint8_t d0[fw::kMaxQuantBlock + 1], d1[fw::kMaxQuantBlock + 1];  // old 4-bit codes, one per byte
  typename P::storage* __restrict wb = w + first;
  const typename P::storage* __restrict gb = g + first;
  typename P::extra_storage* __restrict eb = P::K > 0 ? ext + first : ext;
  uint8_t* __restrict q0 = kS > 0 ? s0 + (kNibbles ? first / 2 : first) : s0;
  uint8_t* __restrict q1 = kS > 1 ? s1 + (kNibbles ? first / 2 : first) : s1;
  const float old0 = kS > 0 ? *scale0 : 0.0f;
  const float old1 = kS > 1 ? *scale1 : 0.0f;
  // The codes one per byte (4-bit codes unpacked first, so that the element loop reads them in order).
  const uint8_t* __restrict u0 = q0;
  const uint8_t* __restrict u1 = q1;
  if (kNibbles) {
    const int32_t bytes = (len + 1) / 2;
#pragma omp simd
    for (int32_t j = 0; j < bytes; ++j) {
      if (kS > 0) {
        d0[2 * j] = q0[j] & 0xFu;
        d0[2 * j + 1] = q0[j] >> 4;
      }
      if (kS > 1) {
        d1[2 * j] = q1[j] & 0xFu;
        d1[2 * j + 1] = q1[j] >> 4;
      }
    }
    u0 = d0;
    u1 = d1;
  }
  uint32_t largest0 = 0, largest1 = 0;
  int32_t bad = 0;
#pragma omp simd reduction(max : largest0, largest1) reduction(+ : bad)
  for (int32_t i = 0; i < len; ++i) {
    float a = kS > 0 ? S::Code0::decode(u0[i], old0) : 0.0f;
    float v = kS > 1 ? S::Code1::decode(u1[i], old1) : 0.0f;
    float pn;
    const bool ok = fw::quantized_values<Rule, P, M>(sc, wb[i], P::K > 0 ? static_cast<int32_t>(eb[i]) : 0, gb[i],
                                                     grad_scale, coefs.at(i), pn, a, v, largest0, largest1);
    p[i] = pn;
    f0[i] = a;
    f1[i] = v;
    bad += ok ? 0 : 1;
  }
  if (bad != 0) return bad;
  const float inv0 = S::Code0::block_inverse(largest0), inv1 = S::Code1::block_inverse(largest1);
  if (kS > 0) *scale0 = S::Code0::block_scale(largest0);
  if (kS > 1) *scale1 = S::Code1::block_scale(largest1);
#pragma omp simd
  for (int32_t i = 0; i < len; ++i) {
    int32_t e = P::K > 0 ? static_cast<int32_t>(eb[i]) : 0;
    uint32_t a, v;
    fw::store_quantized<P, S, kS>(counter + static_cast<uint32_t>(i), p[i], f0[i], f1[i], inv0, inv1, wb[i], e, a, v);
    if (P::K > 0) eb[i] = static_cast<typename P::extra_storage>(e);
    c0[i] = static_cast<uint8_t>(a);
    c1[i] = static_cast<uint8_t>(v);
  }
  if (!kNibbles) {
    if (kS > 0) std::copy_n(c0, len, q0);
    if (kS > 1) std::copy_n(c1, len, q1);
  } else {
    c0[len] = 0;  // the high nibble of an odd-length block's last byte
    c1[len] = 0;
    const int32_t bytes = (len + 1) / 2;
#pragma omp simd
    for (int32_t j = 0; j < bytes; ++j) {
      if (kS > 0) q0[j] = static_cast<uint8_t>(c0[2 * j] | (c0[2 * j + 1] << 4));
      if (kS > 1) q1[j] = static_cast<uint8_t>(c1[2 * j] | (c1[2 * j + 1] << 4));
    }
  }
  return 0;
}

}  // namespace fusedwarm
