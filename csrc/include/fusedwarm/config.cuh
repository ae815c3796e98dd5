// Layer 1 of fusedwarm (see DESIGN.md): portable definitions shared by the math headers.
// Everything under include/fusedwarm compiles unchanged with g++, nvcc and NVRTC: no torch,
// no CUDA runtime, no libm transcendental functions.
#pragma once

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define FW_HD __host__ __device__ __forceinline__
#else
#define FW_HD inline __attribute__((always_inline))
#endif

// Fully unrolled fixed-trip loops: branch-free element code is what lets the CPU loop vectorize.
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define FW_UNROLL _Pragma("unroll")
#else
#define FW_UNROLL _Pragma("GCC unroll 16")
#endif

#if defined(__CUDACC_RTC__)
typedef unsigned char uint8_t;
typedef signed char int8_t;
typedef unsigned short uint16_t;
typedef short int16_t;
typedef unsigned int uint32_t;
typedef int int32_t;
typedef unsigned long long uint64_t;
typedef long long int64_t;
#else
#include <cstdint>
#endif

namespace fw {

// Bit casts that work on host and device without memcpy.
FW_HD uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  return __builtin_bit_cast(uint32_t, x);
#endif
}

FW_HD float bits_float(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  return __builtin_bit_cast(float, b);
#endif
}

FW_HD bool is_finite(float x) { return (float_bits(x) & 0x7F800000u) != 0x7F800000u; }

// The one NaN every backend stores: the positive quiet NaN. Arithmetic that yields NaN differs in
// the bits between processors (a GPU writes 0x7FFFFFFF, x86 0xFFC00000 for inf - inf or 0 * inf,
// and passes an input NaN's payload through), so every store of a computed value goes through
// canonical_nan, and the backends agree bit for bit on NaN too.
constexpr uint32_t kCanonicalNaN = 0x7FC00000u;

FW_HD float canonical_nan(float x) { return x != x ? bits_float(kCanonicalNaN) : x; }

}  // namespace fw
