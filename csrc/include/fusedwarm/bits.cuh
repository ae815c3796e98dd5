// Floating-point formats, rounding, and the split master weight.
//
// Split master weights (Lewandowski & Kosson 2023, "Memory Efficient Mixed-Precision
// Optimizers", arXiv 2309.12381): a half-precision weight w plus a small signed integer e
// ("extra bits") together hold a higher-precision master weight. All work is done on the
// *magnitude bit pattern* of a float, which is monotone in the value and, within a binade,
// linear in it; so appending K bits below a format's mantissa gives the same format with K
// more mantissa bits.
//
// For a weight format with EB exponent bits and MB mantissa bits and K extra bits, the master
// is the float with EB exponent bits and N = min(MB + K, 23) mantissa bits:
//   * bfloat16 (EB=8, MB=7):  K=16 gives N=23, exactly IEEE float32 (every fp32 value,
//     subnormals included); K=8 gives a float with 15 mantissa bits ("24-bit master").
//   * float16  (EB=5, MB=10): K=16 gives N=23 (13 of the 16 bits carry information; the cap
//     keeps every master exactly representable in fp32), i.e. fp32 precision inside fp16's
//     exponent range; K=8 gives N=18.
// With X the master's magnitude pattern and D = N - MB, the visible weight is
//   top = (X + 2^(D-1)) >> D        (round to nearest, ties away from zero)
//   e   = X - (top << D)            (in [-2^(D-1), 2^(D-1)): fits int8 / int16)
// so the model always sees the round-to-nearest of the master, and X = (top << D) + e
// recovers it exactly. Ties go away from zero (not to even) because that is what makes the
// split invertible: with ties-to-even, a remainder of exactly half an ulp could not be told
// apart from its twin. The sign of the master is the sign bit of the visible weight.
//
// Writing a fp32 value into a narrower format (a master with N < 23, the master of an fp16
// weight outside fp16's normal range, or a bfloat16 optimizer state) uses stochastic rounding
// (Zamirai et al. 2020, "Revisiting BFloat16 Training"): round up with probability equal to the
// dropped fraction, so the expected stored value equals the exact one.
#pragma once
#include "arith.cuh"

namespace fw {

// A float format on 16 bits or fewer, described by its exponent and mantissa widths.
template <int EB_, int MB_>
struct HalfFormat {
  static constexpr int EB = EB_;
  static constexpr int MB = MB_;
  static constexpr int kBias = (1 << (EB - 1)) - 1;
};
using BF16Format = HalfFormat<8, 7>;
using F16Format = HalfFormat<5, 10>;

// Stochastic rounding in fp32's own exponent range (encode_magnitude with EB == 8), on a whole
// fp32 pattern b, sign included: b with its 23 - N low mantissa bits dropped (subnormals
// included), sign at bit 31 - (23 - N), NaN as the canonical NaN (config.cuh). A finite input
// rounds at most to the infinity pattern (the added bits are below 2^(23 - N)) and infinity stays
// itself, so only NaN needs a select; and below NaN nothing carries from the magnitude (at most
// 0x7F800000) into the sign, so for a signed b this is sign | encode_magnitude<8, N>(|b|) in
// fewer vector operations (bfloat16 states and masters).
template <int N>
FW_HD uint32_t round_pattern_sr(uint32_t b, uint32_t rnd) {
  constexpr int kDrop = 23 - N;
  const float f = bits_float(b);  // NaN tested as a float: one vector compare
  const uint32_t c = f != f ? kCanonicalNaN : b;
  return kDrop == 0 ? c : (c + (rnd >> ((32 - kDrop) & 31))) >> kDrop;
}

// Magnitude pattern of |x| in a format with EB exponent bits and N <= 23 mantissa bits,
// rounded stochastically with the 32 random bits `rnd` (exact when nothing is dropped).
// Results past the largest finite value become the infinity pattern; NaN stays NaN.
// Written without branches (selects only) so that the CPU loop vectorizes.
template <int EB, int N>
FW_HD uint32_t encode_magnitude(uint32_t abs_bits, uint32_t rnd) {
  static_assert(N <= 23, "mantissa wider than fp32");
  constexpr int kBias = (1 << (EB - 1)) - 1;
  constexpr int kEmin = 1 - kBias;
  constexpr uint32_t kInf = ((1u << EB) - 1u) << N;
  constexpr uint32_t kNaN = kInf | (1u << (N - 1));
  // fp32's own exponent range: the pattern is fp32's with 23 - N bits dropped, subnormals
  // included (round_pattern_sr on the sign-free pattern).
  if (EB == 8) return round_pattern_sr<N>(abs_bits, rnd);
  const int E = static_cast<int>(abs_bits >> 23);
  const uint32_t f = abs_bits & 0x7FFFFFu;
  const uint32_t q = E ? (f | 0x800000u) : f;  // significand: value = q * 2^(e - 23)
  const int e = E ? E - 127 : -126;
  const int below = kEmin - e > 0 ? kEmin - e : 0;  // binades below the target's normal range
  const int s = 23 - N + below;                     // low bits of q to drop
  // (exponent field - 1) << N: adding q's implicit bit carries into the exponent field.
  const uint32_t base = below > 0 ? 0u : static_cast<uint32_t>(e + kBias - 1);
  // floor(q / 2^s + rnd / 2^32): unbiased with 32-bit resolution. For s >= 32 the result is 0
  // or 1, with probability q / 2^s.
  const int sa = s < 31 ? s : 31;
  const uint64_t wide = (static_cast<uint64_t>(q) << 32) + (static_cast<uint64_t>(rnd) << sa);
  const uint32_t r_near = static_cast<uint32_t>(wide >> (sa + 32));
  const int sb = s - 32 < 31 ? (s - 32 > 0 ? s - 32 : 0) : 31;
  const uint32_t r_far = (s - 32 < 24 && rnd < (q >> sb)) ? 1u : 0u;
  const uint32_t r = s <= 31 ? r_near : r_far;
  const uint64_t x = (static_cast<uint64_t>(base) << N) + r;
  const uint32_t finite = x >= kInf ? kInf : static_cast<uint32_t>(x);
  const uint32_t nonfinite = abs_bits == 0x7F800000u ? kInf : kNaN;
  return abs_bits >= 0x7F800000u ? nonfinite : finite;
}

// Value of a magnitude pattern with EB exponent bits and N <= 23 mantissa bits, as fp32 (exact).
// The pattern shifted into fp32's bit positions is the value scaled by 2^(bias - 127) (for a
// zero exponent field, an fp32 subnormal with the same scaling), so one multiply by a power of
// two, exact for these operands, rebiases it; only infinity and NaN need a select. The multiply
// is the arithmetic policy's scale_pow2: an IEEE multiply for Ieee, an integer exponent add for
// Pam (pam.cuh), both exact, so the two policies decode identically.
template <int EB, int N, class M = Ieee>
FW_HD float decode_magnitude(uint32_t x) {
  constexpr int kBias = (1 << (EB - 1)) - 1;
  constexpr uint32_t kExpMax = (1u << EB) - 1u;
  const float shifted = bits_float(x << (23 - N));
  if (EB == 8) return shifted;
  const float scale = bits_float(static_cast<uint32_t>(127 + 127 - kBias) << 23);
  const float value = M::scale_pow2(shifted, scale);
  const float special = bits_float((x & ((1u << N) - 1u)) ? 0x7FC00000u : 0x7F800000u);
  return (x >> N) == kExpMax ? special : value;
}

// fp32 -> half format F with stochastic rounding (optimizer states in bfloat16; bfloat16 is
// fp32's top half, rounded by round_pattern_sr).
template <class F>
FW_HD uint16_t half_bits_from_float_sr(float x, uint32_t rnd) {
  const uint32_t b = float_bits(canonical_nan(x));
  if (F::EB == 8 && F::MB == 7) return static_cast<uint16_t>(round_pattern_sr<F::MB>(b, rnd));
  return static_cast<uint16_t>(((b >> 16) & 0x8000u) | encode_magnitude<F::EB, F::MB>(b & 0x7FFFFFFFu, rnd));
}

// Puts the sign bit of a 16-bit pattern onto a non-negative fp32 magnitude.
FW_HD float with_half_sign(float mag, uint32_t h) { return bits_float(float_bits(mag) | ((h & 0x8000u) << 16)); }

template <class F, class M = Ieee>
FW_HD float half_bits_to_float(uint16_t h) {
  if (F::EB == 8 && F::MB == 7) return bits_float(static_cast<uint32_t>(h) << 16);  // bfloat16: fp32's top half
  return with_half_sign(decode_magnitude<F::EB, F::MB, M>(h & 0x7FFFu), h);
}

// Master weight codec for a half-precision weight format F with K extra bits.
template <class F, int K>
struct MasterCodec {
  static constexpr int N = (F::MB + K) < 23 ? (F::MB + K) : 23;
  static constexpr int D = N - F::MB;
  // True when writing a fp32 value into the master can drop bits (so random bits are needed).
  static constexpr bool kLossy = !(F::EB == 8 && N == 23);

  // bfloat16 masters (fp32's exponent) have a shortcut that works on whole fp32 patterns, sign
  // included, with the same results as the general path in fewer vector operations: the
  // magnitude pattern X = (top << D) + e is never negative (top = 0 implies e = X >= 0) and stays
  // below 2^31, so adding or splitting it never carries into or borrows from the sign bit.
  static constexpr bool kBF16 = F::EB == 8 && F::MB == 7;

  template <class M = Ieee>
  static FW_HD float decode(uint16_t w, int32_t e) {
    if (kBF16) return bits_float((static_cast<uint32_t>(w) << 16) + (static_cast<uint32_t>(e) << (23 - N)));
    const uint32_t x = (static_cast<uint32_t>(w & 0x7FFFu) << D) + static_cast<uint32_t>(e);
    return with_half_sign(decode_magnitude<F::EB, N, M>(x), w);
  }

  // Splits a master pattern x (a magnitude; signed in the bfloat16 shortcut) into its visible top
  // bits, returned, and the extra bits e.
  static FW_HD uint32_t split(uint32_t x, int32_t& e) {
    const uint32_t top = D > 0 ? (x + (1u << (D > 0 ? D - 1 : 0))) >> D : x;
    e = static_cast<int32_t>(x - (top << D));
    return top;
  }

  // Writes the master `v` as visible weight w and extra bits e (NaN as the canonical NaN).
  static FW_HD void encode(float v, uint32_t rnd, uint16_t& w, int32_t& e) {
    const uint32_t b = float_bits(canonical_nan(v));
    if (kBF16) {
      w = static_cast<uint16_t>(split(round_pattern_sr<N>(b, rnd), e));
      return;
    }
    const uint32_t top = split(encode_magnitude<F::EB, N>(b & 0x7FFFFFFFu, rnd), e);
    w = static_cast<uint16_t>(((b >> 16) & 0x8000u) | top);
  }
};

}  // namespace fw
