// Warmup and learning-rate schedules as closed forms of the step counter (layer 1).
//
// The update kernels evaluate factors(schedule, step) once per tensor inside Rule::scalars, from
// the step counter they read on the device: a schedule costs nothing per element, needs no host
// sync, survives checkpoints (the step is saved), works when the update runs inside backward and
// can be captured in a CUDA graph. The learning rate a step uses is lr * warmup(t) * schedule(t),
// t = 1, 2, ... the number of the update (the step counter after its increment).
//
// Only IEEE-rounded +, -, *, /, sqrt (the Ieee policy) and integer operations are used; exp and
// cos are written here from them (range reduction plus a polynomial), so that the CPU and CUDA
// backends compute the same bits (DESIGN.md, "Backends agree bit for bit"). They are accurate to
// a few ulp, which tests/test_schedules.py checks against libm.
#pragma once
#include "arith.cuh"
#include "bits.cuh"

namespace fw {

// ---- transcendental helpers -------------------------------------------------------------------

// e^x for x <= 0 (the only arguments the warmups need). Cody-Waite reduction x = k ln2 + r,
// |r| <= ln2 / 2, then a degree-8 Taylor polynomial (truncation error < 4e-9 relative, below
// float's half ulp) and an exact scaling by 2^k through the exponent bits. Results below the
// smallest normal float (x < -87.3) flush to 0.
FW_HD float exp_neg(float x) {
  using M = Ieee;
  const bool tiny = x < -87.0f;
  x = tiny ? 0.0f : x;
  const float kInvLn2 = 1.44269504f;
  const float kLn2Hi = 0.693145752f;      // ln 2 with its last 12 mantissa bits cleared: k * hi is exact
  const float kLn2Lo = 1.42860677e-06f;   // ln 2 - kLn2Hi
  const int32_t k = static_cast<int32_t>(M::sub(M::mul(x, kInvLn2), 0.5f));  // round half down; x <= 0
  const float kf = static_cast<float>(k);
  const float r = M::sub(M::sub(x, M::mul(kf, kLn2Hi)), M::mul(kf, kLn2Lo));
  float p = 1.0f / 40320.0f;
  p = M::add(M::mul(p, r), 1.0f / 5040.0f);
  p = M::add(M::mul(p, r), 1.0f / 720.0f);
  p = M::add(M::mul(p, r), 1.0f / 120.0f);
  p = M::add(M::mul(p, r), 1.0f / 24.0f);
  p = M::add(M::mul(p, r), 1.0f / 6.0f);
  p = M::add(M::mul(p, r), 0.5f);
  p = M::add(M::mul(p, r), 1.0f);
  p = M::add(M::mul(p, r), 1.0f);
  const float scale = bits_float(static_cast<uint32_t>(k + 127) << 23);  // k >= -126 here
  return tiny ? 0.0f : M::mul(p, scale);
}

// cos(pi u) for u in [0, 1]. Symmetries bring the argument to [0, 1/4], where pi v <= pi/4 and a
// Taylor polynomial of cos (degree 10) or of sin (degree 11) is accurate to float precision; the
// reflections 1 - u and 1/2 - v are exact in float (Sterbenz).
FW_HD float cospi(float u) {
  using M = Ieee;
  const float kPi = 3.14159265f;
  const bool upper = u > 0.5f;
  const float v = upper ? M::sub(1.0f, u) : u;  // cos(pi u) = -cos(pi (1 - u))
  const bool use_sin = v > 0.25f;                // cos(pi v) = sin(pi (1/2 - v))
  const float x = M::mul(kPi, use_sin ? M::sub(0.5f, v) : v);
  const float x2 = M::mul(x, x);
  float c = -1.0f / 3628800.0f;
  c = M::add(M::mul(c, x2), 1.0f / 40320.0f);
  c = M::add(M::mul(c, x2), -1.0f / 720.0f);
  c = M::add(M::mul(c, x2), 1.0f / 24.0f);
  c = M::add(M::mul(c, x2), -0.5f);
  c = M::add(M::mul(c, x2), 1.0f);
  float s = 1.0f / 362880.0f;
  s = M::add(M::mul(s, x2), -1.0f / 5040.0f);
  s = M::add(M::mul(s, x2), 1.0f / 120.0f);
  s = M::add(M::mul(s, x2), -1.0f / 6.0f);
  s = M::add(M::mul(M::mul(s, x2), x), x);
  const float r = use_sin ? s : c;
  return upper ? -r : r;
}

// ---- the schedule -----------------------------------------------------------------------------

enum WarmupKind : int32_t {
  kWarmupNone = 0,
  kWarmupLinear = 1,  // start + (1 - start) min(t, W) / W; "untuned" is W = 2 / (1 - beta2), start 0
  kWarmupExp = 2,     // 1 - exp(-rate t); "untuned-exp" is rate = 1 - beta2 (Ma & Yarats 2021)
  kWarmupRAdam = 3,   // the rectification r_t of RAdam (Liu et al. 2019), see factors()
};

enum DecayShape : int32_t {
  kDecayNone = 0,  // constant
  kDecayLinear = 1,
  kDecaySqrt = 2,    // "1-sqrt" (Hägele et al. 2024)
  kDecayCosine = 3,
};

// A warmup and a decay, converted and checked by the host (csrc/ops.cpp, parse_schedule).
// The decay is warmup-stable-decay (Hägele et al. 2024): 1 up to step total - decay_steps, then a
// cooldown of decay_steps steps of the given shape from 1 to final_fraction, then final_fraction.
// A cosine schedule over the whole run is the special case decay_steps = total_steps.
struct Schedule {
  int32_t warmup;        // WarmupKind
  float warmup_steps;    // W of kWarmupLinear
  float warmup_start;    // start of kWarmupLinear
  float warmup_rate;     // rate of kWarmupExp
  float beta2;           // beta2 of kWarmupRAdam
  int32_t decay_shape;   // DecayShape
  int64_t total_steps;
  int64_t decay_steps;   // > 0 unless decay_shape is kDecayNone
  float final_fraction;
};

FW_HD Schedule constant_schedule() {
  return Schedule{kWarmupNone, 1.0f, 0.0f, 0.0f, 0.0f, kDecayNone, 0, 0, 1.0f};
}

struct Factors {
  float warmup;    // the warmup's multiplier of lr at this step
  float schedule;  // the decay's multiplier of lr at this step
  float lr;        // warmup * schedule: what the update multiplies the group's lr by
  float adaptive;  // 1, or 0 for RAdam's first steps: momentum SGD without the adaptive denominator
};

// RAdam (Liu et al. 2019, Alg. 2): rho_inf = 2 / (1 - beta2) - 1,
// rho_t = rho_inf - 2 t beta2^t / (1 - beta2^t). While rho_t <= 5 the variance of the adaptive
// learning rate is intractable and the step is un-adapted momentum SGD (the paper's fallback; 5
// is torch.optim.RAdam's threshold); afterwards the adaptive step is multiplied by
// r_t = sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_t)).
//
// In float32 the textbook form cancels catastrophically (rho_t ~ 5 is the difference of two
// numbers ~ 2 / (1 - beta2)). With G = sum_{j<t} beta2^j = (1 - beta2^t) / (1 - beta2) and
// K = sum_{j<t} (j + 1) beta2^j one has G - t beta2^t = (1 - beta2) K, hence exactly
//   rho_t = 2 K / G - 1,
// and G, K are sums of positive terms, built by doubling in O(log t) (see geometric_sums).
struct GeometricSums {
  float power;  // beta^n
  float g;      // sum_{j<n} beta^j
  float k;      // sum_{j<n} (j + 1) beta^j
};

// The sums for n terms, by binary decomposition of n: a block of a terms followed by one of b
// terms has power P_a P_b, G_a + P_a G_b and K_a + P_a (K_b + a G_b).
FW_HD GeometricSums geometric_sums(float beta, int64_t n) {
  using M = Ieee;
  GeometricSums acc{1.0f, 0.0f, 0.0f}, block{beta, 1.0f, 1.0f};
  float acc_n = 0.0f, block_n = 1.0f;
  while (n > 0) {
    if (n & 1) {
      acc.k = M::add(acc.k, M::mul(acc.power, M::add(block.k, M::mul(acc_n, block.g))));
      acc.g = M::add(acc.g, M::mul(acc.power, block.g));
      acc.power = M::mul(acc.power, block.power);
      acc_n = M::add(acc_n, block_n);
    }
    block.k = M::add(block.k, M::mul(block.power, M::add(block.k, M::mul(block_n, block.g))));
    block.g = M::add(block.g, M::mul(block.power, block.g));
    block.power = M::mul(block.power, block.power);
    block_n = M::add(block_n, block_n);
    n >>= 1;
  }
  return acc;
}

// rho_inf is the limit of 2 K / G - 1 for the float beta2 itself (1 - beta2 is exact in float for
// beta2 >= 1/2), so that r_t -> 1; r_t <= 1 holds exactly and is enforced against rounding.
FW_HD void radam_factor(float beta2, int64_t step, float& r, float& adaptive) {
  using M = Ieee;
  const float rho_inf = M::sub(M::div(2.0f, M::sub(1.0f, beta2)), 1.0f);
  const GeometricSums s = geometric_sums(beta2, step);
  const float rho_t = M::sub(M::div(M::mul(2.0f, s.k), s.g), 1.0f);
  const bool tractable = rho_t > 5.0f;
  const float num = M::mul(M::mul(M::sub(rho_t, 4.0f), M::sub(rho_t, 2.0f)), rho_inf);
  const float den = M::mul(M::mul(M::sub(rho_inf, 4.0f), M::sub(rho_inf, 2.0f)), rho_t);
  const float rect = M::sqrt(M::div(num, den));
  r = tractable ? (rect < 1.0f ? rect : 1.0f) : 1.0f;
  adaptive = tractable ? 1.0f : 0.0f;
}

// The factors at step t >= 1 (t <= 0, a step counter before the first update, counts as 1).
FW_HD Factors factors(const Schedule& s, int64_t step) {
  using M = Ieee;
  const int64_t t = step < 1 ? 1 : step;
  const float tf = static_cast<float>(t);
  Factors f;
  f.adaptive = 1.0f;
  switch (s.warmup) {
    case kWarmupLinear: {
      const float u = M::div(tf < s.warmup_steps ? tf : s.warmup_steps, s.warmup_steps);
      f.warmup = M::add(s.warmup_start, M::mul(M::sub(1.0f, s.warmup_start), u));
      break;
    }
    case kWarmupExp:
      f.warmup = M::sub(1.0f, exp_neg(-M::mul(s.warmup_rate, tf)));
      break;
    case kWarmupRAdam:
      radam_factor(s.beta2, t, f.warmup, f.adaptive);
      break;
    default:
      f.warmup = 1.0f;
  }
  f.schedule = 1.0f;
  if (s.decay_shape != kDecayNone) {
    const int64_t start = s.total_steps - s.decay_steps;
    const int64_t into = t <= start ? 0 : (t >= s.total_steps ? s.decay_steps : t - start);
    const float u = M::div(static_cast<float>(into), static_cast<float>(s.decay_steps));
    float shape;
    switch (s.decay_shape) {
      case kDecaySqrt: shape = M::sub(1.0f, M::sqrt(u)); break;
      case kDecayCosine: shape = M::mul(0.5f, M::add(1.0f, cospi(u))); break;
      default: shape = M::sub(1.0f, u);
    }
    f.schedule = M::add(s.final_fraction, M::mul(M::sub(1.0f, s.final_fraction), shape));
  }
  f.lr = M::mul(f.warmup, f.schedule);
  return f;
}

}  // namespace fw
