// Counter-based random numbers. The bits an element gets are a pure function of
// (seed, step, tensor, element), never of thread or block layout: Philox4x32-10 (Salmon et al.
// 2011, "Parallel random numbers: as easy as 1, 2, 3") turns (seed, tensor, step) into a stream
// key once per tensor, and SplitMix64, cheap enough to vectorize on the CPU, turns
// (stream key, element) into the element's words.
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

// The random stream of one tensor at one optimizer step: a 64-bit key derived once per
// (seed, tensor, step) with Philox, so distinct tensors and steps get unrelated streams.
FW_HD uint64_t stream_key(uint64_t seed, uint32_t tensor_id, uint64_t step) {
  const U32x4 r = philox4x32_10(U32x4{tensor_id, static_cast<uint32_t>(step), static_cast<uint32_t>(step >> 32), 0u},
                                static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  return (static_cast<uint64_t>(r.y) << 32) | r.x;
}

// SplitMix64 (Steele, Lea & Flood 2014, "Fast splittable pseudorandom number generators"):
// output number `position` of the SplitMix64 sequence that starts at `key`. It passes BigCrush,
// costs two multiplies, and being a pure function of (key, position) it is counter-based too.
FW_HD uint64_t splitmix64(uint64_t key, uint64_t position) {
  uint64_t z = key + (position + 1u) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// The random words of one element: words 0 and 1 are SplitMix64 output 2*index of the tensor's
// stream, words 2 and 3 output 2*index+1 (computed only when `kWords` > 2 asks for them).
template <int kWords>
FW_HD U32x4 element_random(uint64_t stream, uint64_t index) {
  const uint64_t a = splitmix64(stream, 2u * index);
  const uint64_t b = kWords > 2 ? splitmix64(stream, 2u * index + 1u) : 0u;
  return U32x4{static_cast<uint32_t>(a), static_cast<uint32_t>(a >> 32), static_cast<uint32_t>(b),
               static_cast<uint32_t>(b >> 32)};
}

}  // namespace fw
