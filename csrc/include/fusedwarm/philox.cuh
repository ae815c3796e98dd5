// Counter-based random numbers: Philox4x32-10 (Salmon et al. 2011, "Parallel random numbers:
// as easy as 1, 2, 3"). The output is a pure function of (key, counter), so the bits an element
// gets depend on (seed, step, tensor, element) only, never on thread or block layout.
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
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
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

// The random words of one element of one tensor at one optimizer step.
FW_HD U32x4 element_random(uint64_t seed, uint32_t tensor_id, uint64_t step, uint64_t index) {
  return philox4x32_10(U32x4{static_cast<uint32_t>(index), static_cast<uint32_t>(index >> 32), tensor_id,
                             static_cast<uint32_t>(step)},
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

}  // namespace fw
