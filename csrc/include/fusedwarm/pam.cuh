// Piecewise-affine arithmetic (Kosson & Jaggi 2023, "Multiplication-Free Transformer Training via
// Piecewise Affine Operations", after Mogami 2020): a float multiply becomes one integer add of
// the two fp32 bit patterns.
//
// With a = 2^Ea (1 + Ma) and b = 2^Eb (1 + Mb) (0 <= M < 1), and A, B their magnitude bit
// patterns read as integers, everything is an integer operation on A and B:
//   PAM(a, b)  = A + B - 0x3F800000: 2^(Ea+Eb) (1 + Ma + Mb) if Ma + Mb < 1, else
//                2^(Ea+Eb+1) (Ma + Mb); the sign is the XOR of the signs. Relative error in
//                [-1/9, 0]; exact when either operand is a power of two.
//   PAD(a, b)  = A - B + 0x3F800000 (division): 2^(Ea-Eb) (1 + Ma - Mb) if Ma >= Mb, else
//                2^(Ea-Eb-1) (2 + Ma - Mb). Relative error in [0, 1/8].
//   PA-sqrt(a) = (A + 0x3F800000) >> 1: the offset from 1.0 halved (rounded down).
//   PA-exp2(x) = bits 0x3F800000 + x 2^23 (x 2^23 truncated toward zero, found by shifting the
//                significand): 2^floor(x) (1 + frac(x)).
//   PA-log2(a) = (A - 0x3F800000) 2^-23: Ea + Ma; the integer is converted to fp32 (rounded to
//                nearest even, exact when |A - 0x3F800000| < 2^24) and 2^-23 applied by
//                subtracting 23 from its exponent field.
// Special cases are decided by integer comparisons of the bit patterns, never by a float
// multiply: subnormal inputs count as zero (of their sign); a zero operand gives a zero with the
// XOR sign; results below the smallest normal flush to a signed zero and results past the
// largest finite value become a signed infinity; inf x 0, 0 / 0, inf / inf, sqrt and log2 of a
// negative (nonzero) number are NaN; any NaN in gives NaN out. Every NaN result is the canonical
// quiet NaN 0x7FC00000.
//
// All functions are branch-free chains of selects, each on a single comparison (GCC's vectorizer
// does not handle combined boolean masks of mixed origin), so that CPU loops vectorize.
#pragma once
#include "arith.cuh"

namespace fw {

constexpr uint32_t kPamOne = 0x3F800000u;      // bit pattern of 1.0f
constexpr uint32_t kPamMinNormal = 0x00800000u;
constexpr uint32_t kPamInf = 0x7F800000u;
constexpr uint32_t kPamNaN = 0x7FC00000u;
constexpr uint32_t kPamSign = 0x80000000u;

// Magnitude classes of a bit pattern.
FW_HD bool pam_is_nan(uint32_t mag) { return mag > kPamInf; }
FW_HD bool pam_is_inf(uint32_t mag) { return mag == kPamInf; }
FW_HD bool pam_is_zero(uint32_t mag) { return mag < kPamMinNormal; }  // zeros and subnormals
// A pattern with the sign bit set and a magnitude of at least the smallest normal (-inf and
// negative NaNs included): one unsigned comparison.
FW_HD bool pam_is_negative_nonzero(uint32_t bits) { return bits >= (kPamSign | kPamMinNormal); }

FW_HD float pam_mul(float a, float b) {
  const uint32_t A = float_bits(a), B = float_bits(b);
  const uint32_t sign = (A ^ B) & kPamSign;
  const uint32_t ma = A & ~kPamSign, mb = B & ~kPamSign;
  // For two finite normals s <= 2 * 0x7F7FFFFF fits in 32 bits; other cases are selected away.
  const uint32_t s = ma + mb;
  uint32_t r = sign | (s - kPamOne);
  r = s < kPamOne + kPamMinNormal ? sign : r;
  r = s >= kPamOne + kPamInf ? (sign | kPamInf) : r;
  r = pam_is_zero(ma) ? sign : r;
  r = pam_is_zero(mb) ? sign : r;
  r = pam_is_inf(ma) ? (pam_is_zero(mb) ? kPamNaN : (sign | kPamInf)) : r;
  r = pam_is_inf(mb) ? (pam_is_zero(ma) ? kPamNaN : (sign | kPamInf)) : r;
  r = pam_is_nan(ma) ? kPamNaN : r;
  r = pam_is_nan(mb) ? kPamNaN : r;
  return bits_float(r);
}

FW_HD float pam_div(float a, float b) {
  const uint32_t A = float_bits(a), B = float_bits(b);
  const uint32_t sign = (A ^ B) & kPamSign;
  const uint32_t ma = A & ~kPamSign, mb = B & ~kPamSign;
  // For finite normals num <= 0xBEFFFFFF and mb + kPamInf <= 0xFEFFFFFF: no wrap-around.
  const uint32_t num = ma + kPamOne;
  uint32_t r = sign | (num - mb);
  r = num < mb + kPamMinNormal ? sign : r;
  r = num >= mb + kPamInf ? (sign | kPamInf) : r;
  r = pam_is_zero(ma) ? sign : r;
  r = pam_is_inf(mb) ? sign : r;
  r = pam_is_zero(mb) ? (pam_is_zero(ma) ? kPamNaN : (sign | kPamInf)) : r;
  r = pam_is_inf(ma) ? (pam_is_inf(mb) ? kPamNaN : (sign | kPamInf)) : r;
  r = pam_is_nan(ma) ? kPamNaN : r;
  r = pam_is_nan(mb) ? kPamNaN : r;
  return bits_float(r);
}

FW_HD float pam_sqrt(float a) {
  const uint32_t A = float_bits(a);
  const uint32_t ma = A & ~kPamSign;
  uint32_t r = (ma + kPamOne) >> 1;           // <= 0x5F7FFFFF: always a normal number
  r = pam_is_zero(ma) ? (A & kPamSign) : r;  // sqrt(-0) = -0, as IEEE
  r = pam_is_inf(ma) ? kPamInf : r;
  r = pam_is_negative_nonzero(A) ? kPamNaN : r;
  r = pam_is_nan(ma) ? kPamNaN : r;
  return bits_float(r);
}

FW_HD float pam_exp2(float x) {
  const uint32_t X = float_bits(x);
  const uint32_t mx = X & ~kPamSign;
  const bool neg = (X & kPamSign) != 0u;
  const int e = static_cast<int>(mx >> 23);  // biased exponent
  const uint32_t q = (mx & 0x7FFFFFu) | 0x800000u;
  // |x| 2^23 truncated: the significand shifted by the exponent. Subnormal x (e = 0) shifts out
  // entirely, giving exp2(0) = 1. For |x| < 128 the fixed-point value is below 2^30.
  const int left = e - 127 > 0 ? e - 127 : 0;
  const int right = 127 - e > 0 ? (127 - e < 31 ? 127 - e : 31) : 0;
  const uint32_t fixed = e >= 127 ? (q << (left < 6 ? left : 6)) : (q >> right);
  const int32_t r = static_cast<int32_t>(neg ? kPamOne - fixed : kPamOne + fixed);
  uint32_t out = r < static_cast<int32_t>(kPamMinNormal) ? 0u : static_cast<uint32_t>(r);
  out = e >= 127 + 7 ? (neg ? 0u : kPamInf) : out;  // |x| >= 128, infinities included
  return bits_float(pam_is_nan(mx) ? kPamNaN : out);
}

FW_HD float pam_log2(float a) {
  const uint32_t A = float_bits(a);
  const uint32_t ma = A & ~kPamSign;
  const int32_t d = static_cast<int32_t>(ma) - static_cast<int32_t>(kPamOne);
#if defined(__CUDA_ARCH__)
  const float df = __int2float_rn(d);
#else
  const float df = static_cast<float>(d);
#endif
  // d != 0 has |df| >= 1 (exponent field >= 127), so removing 23 from the field stays normal.
  uint32_t r = d == 0 ? 0u : float_bits(df) - (23u << 23);
  r = pam_is_zero(ma) ? (kPamSign | kPamInf) : r;
  r = pam_is_inf(ma) ? kPamInf : r;
  r = pam_is_negative_nonzero(A) ? kPamNaN : r;
  r = pam_is_nan(ma) ? kPamNaN : r;
  return bits_float(r);
}

// x * 2^k for x >= 0 finite (subnormals included, unlike PAM) and pow2 = 2^k with a normal
// result: the exponent is added as an integer. A subnormal x = f 2^-149 is first made the normal
// float f (exactly: the pattern 0x4B000000 | f is 2^23 + f, and subtracting 2^23 is exact). Used
// to rebias float16 values in bits.cuh without a multiply.
FW_HD float pam_scale_pow2(float x, float pow2) {
  const uint32_t X = float_bits(x);
  const uint32_t offset = float_bits(pow2) - kPamOne;
  const float f = Ieee::sub(bits_float(0x4B000000u | X), 8388608.0f);
  const uint32_t sub = X == 0u ? 0u : float_bits(f) + offset - (149u << 23);
  return bits_float(X >= kPamMinNormal ? X + offset : sub);
}

// The element-wise operators of fusedwarm.pam, selected at compile time by the backends.
enum class PamOp : int { kMul = 0, kDiv = 1, kSqrt = 2, kExp2 = 3, kLog2 = 4 };

template <PamOp Op>
FW_HD float pam_apply(float a, float b) {
  if (Op == PamOp::kMul) return pam_mul(a, b);
  if (Op == PamOp::kDiv) return pam_div(a, b);
  if (Op == PamOp::kSqrt) return pam_sqrt(a);
  if (Op == PamOp::kExp2) return pam_exp2(a);
  return pam_log2(a);
}

// The piecewise-affine arithmetic policy for update.cuh: multiply, divide and sqrt are the PA
// operations above; additions and subtractions stay IEEE fp32 (as in Kosson & Jaggi 2023).
struct Pam {
  static FW_HD float add(float a, float b) { return Ieee::add(a, b); }
  static FW_HD float sub(float a, float b) { return Ieee::sub(a, b); }
  static FW_HD float mul(float a, float b) { return pam_mul(a, b); }
  static FW_HD float div(float a, float b) { return pam_div(a, b); }
  static FW_HD float sqrt(float a) { return pam_sqrt(a); }
  static FW_HD float scale_pow2(float x, float pow2) { return pam_scale_pow2(x, pow2); }
};

}  // namespace fw
