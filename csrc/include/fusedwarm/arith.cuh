// Arithmetic policies for the update rules.
//
// Every per-element update in update.cuh is written against a policy, so that the same rule
// runs with piecewise-affine arithmetic (Kosson & Jaggi 2023; the Pam policy in pam.cuh) by
// swapping the policy. The per-tensor scalars (Rule::scalars) always use Ieee.
//
// Ieee: single IEEE-754 binary32 operations, each rounded to nearest even. On the device the
// explicit _rn intrinsics forbid FMA contraction whatever nvcc's --fmad setting is; the host
// side is compiled with -ffp-contract=off. Together this makes the CPU and CUDA backends agree
// bit for bit (DESIGN.md, "Backends agree bit for bit").
#pragma once
#include "config.cuh"

namespace fw {

struct Ieee {
  static FW_HD float add(float a, float b) {
#if defined(__CUDA_ARCH__)
    return __fadd_rn(a, b);
#else
    return a + b;
#endif
  }
  static FW_HD float sub(float a, float b) {
#if defined(__CUDA_ARCH__)
    return __fsub_rn(a, b);
#else
    return a - b;
#endif
  }
  static FW_HD float mul(float a, float b) {
#if defined(__CUDA_ARCH__)
    return __fmul_rn(a, b);
#else
    return a * b;
#endif
  }
  static FW_HD float div(float a, float b) {
#if defined(__CUDA_ARCH__)
    return __fdiv_rn(a, b);
#else
    return a / b;
#endif
  }
  static FW_HD float sqrt(float a) {
#if defined(__CUDA_ARCH__)
    return __fsqrt_rn(a);
#else
    return __builtin_sqrtf(a);
#endif
  }
  // x * pow2 for a power of two pow2 where the product is exact (float16 rebiasing in bits.cuh).
  static FW_HD float scale_pow2(float x, float pow2) { return mul(x, pow2); }
};

// b**n for an integer n >= 0 by repeated squaring, with the policy's multiply: the bias
// corrections 1 - beta**t of Adam need a power, and libm's powf differs between host and device.
template <class M>
FW_HD float powi(float b, int64_t n) {
  float r = 1.0f;
  while (n > 0) {
    if (n & 1) r = M::mul(r, b);
    b = M::mul(b, b);
    n >>= 1;
  }
  return r;
}

}  // namespace fw
