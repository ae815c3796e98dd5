// Counter-based random numbers. The bits an element gets are a pure function of
// (seed, step, tensor, element), never of thread or block layout: Philox4x32-10 (Salmon et al.
// 2011, "Parallel random numbers: as easy as 1, 2, 3") turns (seed, tensor, step, block of 2^30
// elements) into a 32-bit key once per tensor and block, and a 32-bit integer hash, cheap enough
// to vectorize on the CPU in 32-bit lanes, turns (key, element offset, word) into the element's
// words.
#pragma once
#include "config.cuh"

namespace fw {

struct U32x4 {
  uint32_t x, y, z, w;
};

FW_HD uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t& hi) {
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
}

FW_HD U32x4 philox4x32_10(U32x4 c, uint32_t k0, uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
FW_UNROLL
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo32(kM0, c.x, hi0);
    const uint32_t lo1 = mulhilo32(kM1, c.z, hi1);
    c = U32x4{hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0};
    k0 += kW0;
    k1 += kW1;
  }
  return c;
}

// Elements are keyed in blocks of 2^kRandomBlockBits: element k of a tensor lies in block
// k >> kRandomBlockBits at offset k & (2^kRandomBlockBits - 1). A block holds 2^30 elements so
// that the counters of element_random (below) fit 32 bits.
constexpr int kRandomBlockBits = 30;

FW_HD uint32_t random_block(uint64_t index) { return static_cast<uint32_t>(index >> kRandomBlockBits); }

// The random key of one tensor at one optimizer step for one block of its elements: Philox of
// (tensor, step, block) under the 64-bit seed, so distinct tensors, steps and blocks get
// unrelated keys.
FW_HD uint32_t stream_key(uint64_t seed, uint32_t tensor_id, uint64_t step, uint32_t block) {
  const U32x4 r = philox4x32_10(U32x4{tensor_id, static_cast<uint32_t>(step), static_cast<uint32_t>(step >> 32), block},
                                static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  return r.x;
}

// "lowbias32" from C. Wellons' hash-prospector (2018, public domain): a bijection of 32-bit
// integers with two multiplies and good avalanche (bias 0.17 in its author's measure, against
// 0.0 for an ideal hash); as an output function over a counter it is a counter-based generator,
// like SplitMix's mixer over its Weyl sequence.
FW_HD uint32_t lowbias32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// The random counter of element `index` of a tensor: the key of its block plus its offset in the
// block (modulo 2^32). Consecutive elements of a block have consecutive counters, so a loop over a
// block adds its position to the counter of its first element.
FW_HD uint32_t element_counter(uint32_t key, uint64_t index) {
  return key + (static_cast<uint32_t>(index) & ((1u << kRandomBlockBits) - 1u));
}

// The random words of the element with counter `c` (element_counter): word j (j < kWords <= 4)
// is lowbias32(c + j 2^30), so every word of every element of a block hashes a distinct value.
// Words past kWords are 0 and cost nothing. Only 32-bit arithmetic: 16 lanes per 512-bit vector
// on the CPU.
template <int kWords>
FW_HD U32x4 element_random(uint32_t c) {
  static_assert(kWords <= 4, "at most four words per element");
  return U32x4{kWords > 0 ? lowbias32(c) : 0u, kWords > 1 ? lowbias32(c + (1u << kRandomBlockBits)) : 0u,
               kWords > 2 ? lowbias32(c + (2u << kRandomBlockBits)) : 0u,
               kWords > 3 ? lowbias32(c + (3u << kRandomBlockBits)) : 0u};
}

}  // namespace fw
