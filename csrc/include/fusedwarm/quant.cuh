// Block-quantized optimizer states (8 and 4 bits per element): the codes, the block scale and the
// stochastic rounding that writes them. The one source of truth for the format; the backends call
// these functions and only arrange the per-block maximum (update.cuh says how a step uses them).
//
// Format. A state of n elements is cut into blocks of B consecutive elements (B a power of two,
// kMinQuantBlock..kMaxQuantBlock; the last block may be partial). Each block stores one float32
// scale, each element one code: a byte (8 bits), or a nibble (4 bits: element k in byte k / 2, the
// low nibble for even k). Block-wise scaling after Dettmers et al. 2022 ("8-bit Optimizers via
// Block-wise Quantization"): an outlier only costs its own block's resolution.
//
// Codes are small floats relative to the block's scale (a "dynamic exponent" code: resolution
// relative to the value over a wide range, which the second moment needs), with EB exponent bits
// and MB mantissa bits and no infinities: a magnitude code c has F = c >> MB, j = c mod 2^MB and
// value (1 + j / 2^MB) 2^(F - 1 + emin) for F >= 1, j 2^(emin - MB) for F = 0, emin = 2 - 2^EB,
// so the largest value is Qmax = 2 - 2^-MB. Two kinds:
// - signed (the first state of every rule: AdamW's and Lion's m, SGD's momentum): a sign bit on
//   top of the magnitude code; 8 bits E4M3, 4 bits E2M1 (times 4, MXFP4's grid 0, 0.5, ..., 6 of
//   the OCP Microscaling formats, v1.0);
// - unsigned (AdamW's v): 8 bits E5M3 (31 binades), 4 bits E3M1. A positive value never rounds
//   to code 0 ("zero excluded", Li et al. 2023, "Memory Efficient Optimizers with 4-bit States"):
//   a v stored as 0 under a nonzero m would turn the update m / (sqrt(v) + eps) into m / eps.
// The decoded value of element k is value(c) * scale (one float32 multiply) with the code's sign.
//
// Writing a block (new float32 values f_k, one 32-bit random word r_k each):
//   a_k = |f_k| saturated at the largest float (infinity and NaN, which a finite gradient cannot
//   produce, become it); A = max(max_k a_k, 2^-126); scale = A / Qmax, inv = Qmax / A (float32
//   divisions, once per block); x_k = min(a_k inv, Qmax) is rounded stochastically onto the grid
//   with r_k: unbiased, so an EMA whose increments are below a code's spacing still moves in
//   expectation (as for bfloat16 states, Zamirai et al. 2020).
// Everything is float32 IEEE arithmetic (also under arithmetic="pam", like the extra bits'
// integer operations) and integer bit operations, so every backend writes the same bits.
#pragma once
#include "arith.cuh"

namespace fw {

constexpr int kMinQuantBlock = 32;
constexpr int kMaxQuantBlock = 2048;
constexpr uint32_t kFloatMaxBits = 0x7F7FFFFFu;  // the largest finite float32
constexpr uint32_t kQuantFloorBits = 0x00800000u;  // 2^-126: the smallest block maximum A

// |f| as float32 bits, saturated at the largest finite float (infinity and NaN included).
FW_HD uint32_t saturated_magnitude(float f) {
  const uint32_t a = float_bits(f) & 0x7FFFFFFFu;
  return a < kFloatMaxBits ? a : kFloatMaxBits;
}

template <int EB_, int MB_, bool kSigned_>
struct QuantCode {
  static constexpr int EB = EB_;
  static constexpr int MB = MB_;
  static constexpr bool kSigned = kSigned_;
  static constexpr int kMagnitudeBits = EB + MB;
  static constexpr int kEmin = 2 - (1 << EB);
  static constexpr int kDrop = 23 - MB;  // float32 mantissa bits below the code's
  // Subtracted from a rounded float32 pattern >> kDrop to give the code: normal and subnormal range.
  static constexpr uint32_t kNormalBase = static_cast<uint32_t>(127 + kEmin - 1) << MB;
  static constexpr uint32_t kSubnormalBase = static_cast<uint32_t>(127 + kEmin) << MB;

  static FW_HD float qmax() { return bits_float((127u << 23) | (((1u << MB) - 1u) << kDrop)); }
  static FW_HD float smallest_normal() { return bits_float(static_cast<uint32_t>(127 + kEmin) << 23); }

  // The value of magnitude code c (exact): the normal range's pattern is the code plus a base,
  // shifted into float32's mantissa; the subnormal range (F = 0) is read as 2^emin (1 + j / 2^MB)
  // minus 2^emin, an exact subtraction.
  static FW_HD float magnitude(uint32_t c) {
    const bool subnormal = c < (1u << MB);
    const float v = bits_float((c + (subnormal ? kSubnormalBase : kNormalBase)) << kDrop);
    return subnormal ? Ieee::sub(v, smallest_normal()) : v;
  }

  // The value of `code` in a block with scale `scale`.
  static FW_HD float decode(uint32_t code, float scale) {
    const float v = Ieee::mul(magnitude(code & ((1u << kMagnitudeBits) - 1u)), scale);
    const uint32_t sign = kSigned ? ((code >> kMagnitudeBits) & 1u) << 31 : 0u;
    return bits_float(float_bits(v) | sign);
  }

  // The code of f in a block whose inverse scale is `inv` (block_inverse), rounded stochastically
  // with the random word r (its top kDrop bits are used).
  static FW_HD uint32_t encode(float f, float inv, uint32_t r) {
    const uint32_t a = saturated_magnitude(f);
    const float scaled = Ieee::mul(bits_float(a), inv);
    const float x = scaled < qmax() ? scaled : qmax();
    // Below 2^emin the grid is uniform: x + 2^emin has it as its mantissa (float32's rounding of
    // the sum drops nothing the code keeps).
    const bool subnormal = x < smallest_normal();
    const float y = subnormal ? Ieee::add(x, smallest_normal()) : x;
    const uint32_t q = (float_bits(y) + (r >> (32 - kDrop))) >> kDrop;
    uint32_t c = q - (subnormal ? kSubnormalBase : kNormalBase);
    if (!kSigned) c = (c == 0u && a != 0u) ? 1u : c;
    return kSigned ? c | ((float_bits(f) >> 31) << kMagnitudeBits) : c;
  }

  // A block's scale and inverse scale from the largest saturated_magnitude of its new values.
  static FW_HD float block_scale(uint32_t largest) {
    return Ieee::div(bits_float(largest > kQuantFloorBits ? largest : kQuantFloorBits), qmax());
  }
  static FW_HD float block_inverse(uint32_t largest) {
    return Ieee::div(qmax(), bits_float(largest > kQuantFloorBits ? largest : kQuantFloorBits));
  }
};

// A if C else B (NVRTC has no <type_traits>).
template <bool C, class A, class B>
struct QuantChoose {
  using type = A;
};
template <class A, class B>
struct QuantChoose<false, A, B> {
  using type = B;
};

// Optimizer states quantized to kBits (8 or 4) per element: storage is the code bytes.
template <int kBits_>
struct StateQuant {
  static_assert(kBits_ == 8 || kBits_ == 4, "quantized states have 8 or 4 bits");
  using storage = uint8_t;
  static constexpr int kBits = kBits_;
  static constexpr bool kQuantized = true;
  static constexpr bool kLossy = true;
  static constexpr int kRandomBits = 16;  // each state rounds with 16 bits of the states' word
  using Code0 = QuantCode<kBits == 8 ? 4 : 2, kBits == 8 ? 3 : 1, true>;   // m, momentum
  using Code1 = QuantCode<kBits == 8 ? 5 : 3, kBits == 8 ? 3 : 1, false>;  // v
  template <int kState>
  using Code = typename QuantChoose<kState == 0, Code0, Code1>::type;

  // The code of element k of a code array.
  static FW_HD uint32_t code_at(const uint8_t* codes, int64_t k) {
    if (kBits == 8) return codes[k];
    return (static_cast<uint32_t>(codes[k >> 1]) >> ((k & 1) * 4)) & 0xFu;
  }

  // Writes code c of element k into a code array whose 4-bit bytes start at 0 (each is written as
  // two nibbles, the even element's first).
  static FW_HD void put_code(uint8_t* codes, int64_t k, uint32_t c) {
    if (kBits == 8) {
      codes[k] = static_cast<uint8_t>(c);
    } else {
      codes[k >> 1] = static_cast<uint8_t>(codes[k >> 1] | (c << ((k & 1) * 4)));
    }
  }
};

}  // namespace fw
