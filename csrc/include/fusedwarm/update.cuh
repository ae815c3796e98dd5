// The per-element update rules: the one source of truth for what a fusedwarm step computes.
//
// A backend loads one element's raw storage (weight bits, extra bits, gradient, states), calls
// update_element, and stores the results; it never re-derives a formula.
#pragma once
#include "arith.cuh"
#include "bits.cuh"
#include "pam.cuh"
#include "philox.cuh"
#include "quant.cuh"
#include "schedule.cuh"

namespace fw {

// ---- storage kinds -------------------------------------------------------------------------

// Storage of the extra bits: int16 for 16, int8 for 8 (and a placeholder for none).
template <int K>
struct ExtraStorage {
  using type = int8_t;
};
template <>
struct ExtraStorage<16> {
  using type = int16_t;
};

// A float32 weight: it is its own master, no extra bits.
struct ParamF32 {
  using storage = float;
  using extra_storage = ExtraStorage<0>::type;
  using magnitude_type = uint32_t;
  static constexpr int K = 0;
  static constexpr bool kLossy = false;
  template <class M>
  static FW_HD float grad(float g) {
    return g;
  }
  // |g| as an unsigned integer, ordered as the value (infinity and NaNs above every finite value).
  static FW_HD uint32_t magnitude(float g) { return float_bits(g) & 0x7FFFFFFFu; }
  static FW_HD float from_magnitude(uint32_t m) { return bits_float(m); }
  template <class M>
  static FW_HD float load(float w, int32_t) {
    return w;
  }
  static FW_HD void store(float v, uint32_t, float& w, int32_t&) { w = canonical_nan(v); }
};

// A bfloat16 / float16 weight with K in {0, 8, 16} extra bits (see bits.cuh).
template <class F, int K_>
struct ParamHalf {
  using storage = uint16_t;
  using extra_storage = typename ExtraStorage<K_>::type;
  using magnitude_type = uint16_t;
  using Codec = MasterCodec<F, K_>;
  static constexpr int K = K_;
  static constexpr bool kLossy = Codec::kLossy;
  // M decides how float16 values are rebiased (bits.cuh, decode_magnitude): exactly either way.
  template <class M>
  static FW_HD float grad(uint16_t g) {
    return half_bits_to_float<F, M>(g);
  }
  static FW_HD uint16_t magnitude(uint16_t g) { return static_cast<uint16_t>(g & 0x7FFFu); }
  static FW_HD uint16_t from_magnitude(uint16_t m) { return m; }
  template <class M>
  static FW_HD float load(uint16_t w, int32_t e) {
    return Codec::template decode<M>(w, e);
  }
  static FW_HD void store(float v, uint32_t rnd, uint16_t& w, int32_t& e) { Codec::encode(v, rnd, w, e); }
};

struct StateF32 {
  using storage = float;
  static constexpr bool kQuantized = false;
  static constexpr bool kLossy = false;
  static constexpr int kRandomBits = 0;
  static FW_HD float load(float s) { return s; }
  static FW_HD float store(float v, uint32_t) { return canonical_nan(v); }
};

// bfloat16 optimizer state, written with stochastic rounding so that EMAs with small (1 - beta)
// keep moving in expectation (Zamirai et al. 2020).
struct StateBF16 {
  using storage = uint16_t;
  static constexpr bool kQuantized = false;
  static constexpr bool kLossy = true;
  static constexpr int kRandomBits = 16;  // store() uses the top 16 bits of its random word
  static FW_HD float load(uint16_t s) { return half_bits_to_float<BF16Format>(s); }
  static FW_HD uint16_t store(float v, uint32_t rnd) { return half_bits_from_float_sr<BF16Format>(v, rnd); }
};

// ---- update rules ---------------------------------------------------------------------------

FW_HD uint32_t sign_flip(bool negate) { return negate ? 0x80000000u : 0u; }
FW_HD float xor_sign(float x, uint32_t flip) { return bits_float(float_bits(x) ^ flip); }

// ---- rules ----------------------------------------------------------------------------

// AdamW (Loshchilov & Hutter 2019) with torch.optim.AdamW's semantics: decoupled decay, then
//   m = b1 m + (1-b1) g,  v = b2 v + (1-b2) g^2,
//   p = p - (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps).
// The last line is evaluated in the equivalent one-division form of Kingma & Ba (2015, Sec. 2):
//   p = p - a_t * m / (sqrt(v) + eps_t),  a_t = lr sqrt(1 - b2^t) / (1 - b1^t),
//   eps_t = eps sqrt(1 - b2^t),
// with a_t and eps_t computed once per tensor: one division per element instead of two. lr is
// the group's lr times the schedule's factor (schedule.cuh), in the decay and in a_t.
//
// Two options change the early steps through per-tensor coefficients only, so that the element
// code stays branch-free (it is p - a_t m / (c sqrt(v) + eps_t) with c = 1 otherwise):
// - v_init_grad (GI-Adam, Kalra & Barkeshli 2024): v_0 = g_1^2, i.e. v = g^2 on the first step
//   (b2 -> 0, 1 - b2 -> 1). The weights of v then sum to 1, so v needs no bias correction.
// - RAdam's fallback (warmup "radam", schedule.cuh): while the rectification is undefined the
//   step is momentum SGD, p - lr m / (1 - b1^t): c = 0 and eps_t = 1.
struct AdamW {
  static constexpr int kStates = 2;
  // 1 - beta comes from the host, computed in double and rounded once, as torch.optim does:
  // 1.0f - 0.99f is not the float nearest 0.01, and Lion's sign() turns such a difference into
  // a full step where b1 m + (1-b1) g is near zero.
  struct Hyper {
    float beta1, beta2, one_minus_beta1, one_minus_beta2, eps, weight_decay;
    bool maximize;
    bool v_init_grad;
    Schedule schedule;
  };
  struct Scalars {
    float decay, beta1, one_minus_beta1, beta2, one_minus_beta2, step_size, adaptive, eps;
    uint32_t flip;  // sign bit to xor into the gradient (maximize)
  };
  template <class M>
  static FW_HD Scalars scalars(const Hyper& h, float lr, int64_t step) {
    const Factors f = factors(h.schedule, step);
    lr = M::mul(lr, f.lr);
    const bool first_v = h.v_init_grad && step <= 1;
    Scalars s;
    s.decay = M::sub(1.0f, M::mul(lr, h.weight_decay));
    s.beta1 = h.beta1;
    s.one_minus_beta1 = h.one_minus_beta1;
    s.beta2 = first_v ? 0.0f : h.beta2;
    s.one_minus_beta2 = first_v ? 1.0f : h.one_minus_beta2;
    const bool correct_v = !h.v_init_grad && f.adaptive != 0.0f;
    const float bc2_sqrt = correct_v ? M::sqrt(M::sub(1.0f, powi<M>(h.beta2, step))) : 1.0f;
    s.step_size = M::div(M::mul(lr, bc2_sqrt), M::sub(1.0f, powi<M>(h.beta1, step)));
    s.adaptive = f.adaptive;
    s.eps = f.adaptive != 0.0f ? M::mul(h.eps, bc2_sqrt) : 1.0f;
    s.flip = sign_flip(h.maximize);
    return s;
  }
  // The common case's values of the fields that are usually constant: no maximize, the adaptive
  // step (no RAdam fallback). See "plain scalars" below.
  static FW_HD bool is_plain(const Scalars& s) { return s.flip == 0u && s.adaptive == 1.0f; }
  static FW_HD Scalars plain(Scalars s) {
    s.flip = 0u;
    s.adaptive = 1.0f;
    return s;
  }
  template <class M>
  static FW_HD void apply(const Scalars& s, float& p, float g, float& m, float& v) {
    g = xor_sign(g, s.flip);
    p = M::mul(p, s.decay);
    m = M::add(M::mul(s.beta1, m), M::mul(s.one_minus_beta1, g));
    v = M::add(M::mul(s.beta2, v), M::mul(s.one_minus_beta2, M::mul(g, g)));
    p = M::sub(p, M::mul(s.step_size, M::div(m, M::add(M::mul(s.adaptive, M::sqrt(v)), s.eps))));
  }
};

// SGD without momentum, as torch.optim.SGD: g += wd p; p -= lr g.
struct SGD {
  static constexpr int kStates = 0;
  struct Hyper {
    float momentum, one_minus_dampening, weight_decay;  // 1 - dampening from the host, as in AdamW
    bool nesterov, maximize;
    Schedule schedule;  // lr is the group's lr times its factor (schedule.cuh)
  };
  // The uniform choices (first step, Nesterov) are folded into coefficients that are exactly
  // 0 or 1, so the element code has no data-independent branches: buf = cb buf + cg g and
  // d = ng g + nb buf.
  struct Scalars {
    float lr, weight_decay, momentum, buf_coef, grad_coef, nesterov_grad, nesterov_buf;
    uint32_t flip;
  };
  template <class M>
  static FW_HD Scalars scalars(const Hyper& h, float lr, int64_t step) {
    Scalars s;
    const bool first = step <= 1;
    s.lr = M::mul(lr, factors(h.schedule, step).lr);
    s.weight_decay = h.weight_decay;
    s.momentum = h.momentum;
    s.buf_coef = first ? 0.0f : h.momentum;
    s.grad_coef = first ? 1.0f : h.one_minus_dampening;
    s.nesterov_grad = h.nesterov ? 1.0f : 0.0f;
    s.nesterov_buf = h.nesterov ? h.momentum : 1.0f;
    s.flip = sign_flip(h.maximize);
    return s;
  }
  // No maximize; with momentum, no dampening and no Nesterov (see "plain scalars" below).
  static FW_HD bool is_plain(const Scalars& s) {
    return s.flip == 0u && s.grad_coef == 1.0f && s.nesterov_buf == 1.0f;
  }
  static FW_HD Scalars plain(Scalars s) {
    s.flip = 0u;
    s.grad_coef = 1.0f;
    s.nesterov_buf = 1.0f;
    return s;
  }
  template <class M>
  static FW_HD float direction(const Scalars& s, float p, float g) {
    return M::add(xor_sign(g, s.flip), M::mul(s.weight_decay, p));
  }
  template <class M>
  static FW_HD void apply(const Scalars& s, float& p, float g, float&, float&) {
    p = M::sub(p, M::mul(s.lr, direction<M>(s, p, g)));
  }
};

// SGD with momentum, as torch.optim.SGD: the buffer starts as the first gradient, then
//   buf = momentum buf + (1 - dampening) g;  d = nesterov ? g + momentum buf : buf;  p -= lr d.
struct SGDMomentum {
  static constexpr int kStates = 1;
  using Hyper = SGD::Hyper;
  using Scalars = SGD::Scalars;
  template <class M>
  static FW_HD Scalars scalars(const Hyper& h, float lr, int64_t step) {
    return SGD::scalars<M>(h, lr, step);
  }
  static FW_HD bool is_plain(const Scalars& s) { return SGD::is_plain(s); }
  static FW_HD Scalars plain(const Scalars& s) { return SGD::plain(s); }
  template <class M>
  static FW_HD void apply(const Scalars& s, float& p, float g, float& buf, float&) {
    g = SGD::direction<M>(s, p, g);
    buf = M::add(M::mul(s.buf_coef, buf), M::mul(s.grad_coef, g));
    const float d = M::add(M::mul(s.nesterov_grad, g), M::mul(s.nesterov_buf, buf));
    p = M::sub(p, M::mul(s.lr, d));
  }
};

// Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"):
//   c = b1 m + (1-b1) g;  p = p (1 - lr wd) - lr sign(c);  m = b2 m + (1-b2) g.
struct Lion {
  static constexpr int kStates = 1;
  struct Hyper {
    float beta1, beta2, one_minus_beta1, one_minus_beta2, weight_decay;  // 1 - beta from the host
    bool maximize;
    Schedule schedule;  // lr is the group's lr times its factor (schedule.cuh)
  };
  struct Scalars {
    float lr, decay, beta1, one_minus_beta1, beta2, one_minus_beta2;
    uint32_t flip;
  };
  template <class M>
  static FW_HD Scalars scalars(const Hyper& h, float lr, int64_t step) {
    lr = M::mul(lr, factors(h.schedule, step).lr);
    Scalars s;
    s.lr = lr;
    s.decay = M::sub(1.0f, M::mul(lr, h.weight_decay));
    s.beta1 = h.beta1;
    s.one_minus_beta1 = h.one_minus_beta1;
    s.beta2 = h.beta2;
    s.one_minus_beta2 = h.one_minus_beta2;
    s.flip = sign_flip(h.maximize);
    return s;
  }
  // No maximize (see "plain scalars" below).
  static FW_HD bool is_plain(const Scalars& s) { return s.flip == 0u; }
  static FW_HD Scalars plain(Scalars s) {
    s.flip = 0u;
    return s;
  }
  template <class M>
  static FW_HD void apply(const Scalars& s, float& p, float g, float& m, float&) {
    g = xor_sign(g, s.flip);
    const float c = M::add(M::mul(s.beta1, m), M::mul(s.one_minus_beta1, g));
    const float sign = c > 0.0f ? 1.0f : (c < 0.0f ? -1.0f : 0.0f);
    p = M::sub(M::mul(p, s.decay), M::mul(s.lr, sign));
    m = M::add(M::mul(s.beta2, m), M::mul(s.one_minus_beta2, g));
  }
};

// ---- plain scalars ---------------------------------------------------------------------------
//
// Some fields of a rule's scalars hold the same value in nearly every run: the sign flip is 0
// without maximize, AdamW's adaptive factor is 1 outside RAdam's first steps, SGD's gradient and
// Nesterov-buffer coefficients are 1 without dampening or Nesterov. Rule::is_plain(s) says whether
// s holds those values, and Rule::plain(s) returns s with them written as literals. The two are
// equal, so an update with plain(s) computes the same bits; what changes is that a backend which
// compiles its element loop for plain(s) lets the compiler fold the xor with 0 and the multiplies
// by 1 away (exact: x * 1 is x; a NaN's payload is canonicalized on store either way). The CPU
// backend compiles such a loop for the common case (cpu/chunk.h, run_chunk's kPlain).

// ---- one element -----------------------------------------------------------------------------

// The update-size control's coefficients (alpha, beta) of a row, applied to the rule's step
// p0 -> p1 (see "update-size control" below): p1 when alpha = beta = 1, else
// alpha p0 + beta (p1 - p0). Three kinds give these same values and differ only in what is known
// at compile time, which the CPU vectorizer needs (a select on loop-invariant coefficients lets
// GCC unswitch the element loop and leave the common alpha = beta = 1 copy scalar):
// - Uncontrolled: known to be (1, 1);
// - Blended: known not to be (1, 1);
// - RowCoef: either, decided per element (the CUDA backend, where a uniform select is free).
struct Uncontrolled {
  template <class M>
  FW_HD float blend(float, float p1) const {
    return p1;
  }
};

template <class M>
FW_HD float blend_affine(float alpha, float beta, float p0, float p1) {
  return M::add(M::mul(alpha, p0), M::mul(beta, M::sub(p1, p0)));
}

struct Blended {
  float alpha, beta;
  template <class M>
  FW_HD float blend(float p0, float p1) const {
    return blend_affine<M>(alpha, beta, p0, p1);
  }
};

struct RowCoef {
  float alpha, beta;
  FW_HD bool unit() const { return alpha == 1.0f && beta == 1.0f; }
  template <class M>
  FW_HD float blend(float p0, float p1) const {
    return unit() ? p1 : blend_affine<M>(alpha, beta, p0, p1);
  }
};

// The gradient as the update sees it: its stored value times `grad_scale`.
template <class P, class M>
FW_HD float scaled_grad(typename P::storage g, float grad_scale) {
  return M::mul(P::template grad<M>(g), grad_scale);
}

// Whether every gradient whose magnitude (P::magnitude) is at most `max_magnitude` stays finite
// once scaled: the scaled magnitude never decreases as the magnitude grows (IEEE and PAM products
// are monotone in each operand and symmetric in sign), and the magnitudes above the largest
// finite value are infinity and the NaNs. One test for a span of gradients lets the CPU backend
// run update_element<..., kFinite = true> on the whole span.
template <class P, class M>
FW_HD bool scaled_grads_finite(typename P::magnitude_type max_magnitude, float grad_scale) {
  const float scale_magnitude = bits_float(float_bits(grad_scale) & 0x7FFFFFFFu);
  return is_finite(scaled_grad<P, M>(P::from_magnitude(max_magnitude), scale_magnitude));
}

// The random words of one element (counter: element_counter): the weight's first (if its format
// is lossy), then one for the states (if lossy), of which the first state rounds with the top 16
// bits and the second with the low 16 bits (moved to the top).
struct ElementWords {
  uint32_t weight, state0, state1;
};
template <class P, class S, int kStates>
FW_HD ElementWords element_words(uint32_t counter) {
  static_assert(!S::kLossy || S::kRandomBits == 16, "lossy states share one 32-bit random word");
  constexpr int kWeightWords = P::kLossy ? 1 : 0;
  constexpr int kWords = kWeightWords + (S::kLossy && kStates > 0 ? 1 : 0);
  U32x4 r{0u, 0u, 0u, 0u};
  if (kWords > 0) r = element_random<kWords>(counter);
  const uint32_t state_word = kWeightWords > 0 ? r.y : r.x;
  return ElementWords{r.x, state_word & 0xFFFF0000u, state_word << 16};
}

// One element's new values, writing nothing: the weight p (after the update-size control's blend)
// from its stored value p0, and the rule's states f0, f1 (in: the old values, out: the new). The
// return value is whether the scaled gradient is finite; when it is not, the values are those of
// a zero gradient and must not be stored (with kFinite the caller has established it is finite).
template <class Rule, class P, class M, class C, bool kFinite>
FW_HD bool element_values(const typename Rule::Scalars& sc, typename P::storage w, int32_t e, typename P::storage g,
                          float grad_scale, float& p0, float& p, float& f0, float& f1, const C& coef) {
  const float gf = scaled_grad<P, M>(g, grad_scale);
  const bool ok = kFinite || is_finite(gf);
  p0 = P::template load<M>(w, e);
  p = p0;
  Rule::template apply<M>(sc, p, ok ? gf : 0.0f, f0, f1);
  p = coef.template blend<M>(p0, p);
  return ok;
}

// Updates one element in place. `e` is the extra-bits value (ignored for ParamF32 and K = 0),
// `s0`, `s1` the rule's raw states (those past Rule::kStates are ignored; at most 2). The
// gradient is multiplied by `grad_scale` first (1 when the caller scales nothing; a loss scale's
// inverse, a clipping coefficient). An element whose scaled gradient is not finite is left
// untouched (weight, extra bits and states), so a single overflow never corrupts a weight; the
// return value is true when the element was updated, for the backends to count skips. With
// kFinite the caller has established that the scaled gradient is finite (scaled_grads_finite)
// and the element is always written (a backend that is wrong about it must restore the element
// itself). `counter` is the element's random counter, element_counter(stream_key(seed, tensor,
// step, random_block(index)), index) (philox.cuh); the element's random words round the master
// (if lossy) and then the states (see below).
// Everything is computed unconditionally and selected at the end (no early return, no arrays),
// so that the CPU loop vectorizes.
//
// `coef` carries the update-size control's coefficients of the element's row (see RowCoef
// below): the new master is alpha p0 + beta (p1 - p0) for the rule's p0 -> p1, and exactly p1
// when both are 1 (no control).
template <class Rule, class P, class S, class M = Ieee, class C = Uncontrolled, bool kFinite = false>
FW_HD bool update_element(const typename Rule::Scalars& sc, uint32_t counter, typename P::storage& w,
                          int32_t& e, typename P::storage g, float grad_scale, typename S::storage& s0,
                          typename S::storage& s1, const C& coef = C{}) {
  static_assert(Rule::kStates <= 2, "update_element carries at most two states");
  static_assert(!S::kQuantized, "quantized states are written a block at a time (quantized_values, store_quantized)");
  float f0 = Rule::kStates > 0 ? S::load(s0) : 0.0f;
  float f1 = Rule::kStates > 1 ? S::load(s1) : 0.0f;
  float p0, p;
  const bool ok = element_values<Rule, P, M, C, kFinite>(sc, w, e, g, grad_scale, p0, p, f0, f1, coef);
  const ElementWords r = element_words<P, S, Rule::kStates>(counter);
  typename P::storage w_new;
  int32_t e_new = e;  // a float32 weight keeps no extra bits: its store leaves e_new as it is
  P::store(p, r.weight, w_new, e_new);
  w = ok ? w_new : w;
  e = ok ? e_new : e;
  if (Rule::kStates > 0) s0 = ok ? S::store(f0, r.state0) : s0;
  if (Rule::kStates > 1) s1 = ok ? S::store(f1, r.state1) : s1;
  return ok;
}

// ---- quantized states (quant.cuh) ------------------------------------------------------------

// The value of state kState (0 or 1) of element k, from its storage `s` (and for quantized states
// the block scales, one per 2^block_shift elements).
template <class S, int kState>
FW_HD float load_state(const typename S::storage* s, const float* scales, int block_shift, int64_t k) {
  if constexpr (S::kQuantized) {
    return S::template Code<kState>::decode(S::code_at(s, k), scales[k >> block_shift]);
  } else {
    return S::load(s[k]);
  }
}

// With quantized states a step updates a block of the states' B elements at once, in three parts
// that the backends arrange (a loop on the CPU, the threads of a CUDA block):
// 1. every element: quantized_values from the decoded states (load_state), keeping the new weight
//    p and states f0, f1, and the block's largest saturated_magnitude of each state;
// 2. the block: if any element's scaled gradient is not finite, nothing of the block is written
//    (weights, extra bits, codes, scale: the block is the unit of a skip); otherwise each state's
//    scale is Code::block_scale of its largest magnitude;
// 3. every element: store_quantized below.
// The random words are update_element's (element_words): a state's code rounds with the same 16
// bits its bfloat16 value would.

// Part 1 for one element: element_values from the decoded states f0, f1 (replaced by the new ones),
// the new weight in p, and the block's largest magnitudes so far raised to the new states'.
template <class Rule, class P, class M, class C>
FW_HD bool quantized_values(const typename Rule::Scalars& sc, typename P::storage w, int32_t e, typename P::storage g,
                            float grad_scale, const C& coef, float& p, float& f0, float& f1, uint32_t& largest0,
                            uint32_t& largest1) {
  float p0;
  const bool ok = element_values<Rule, P, M, C, false>(sc, w, e, g, grad_scale, p0, p, f0, f1, coef);
  const uint32_t m0 = saturated_magnitude(f0), m1 = saturated_magnitude(f1);
  largest0 = m0 > largest0 ? m0 : largest0;
  largest1 = m1 > largest1 ? m1 : largest1;
  return ok;
}

// Part 3 for one element: its weight and extra bits, and its codes c0, c1 with the block's inverse
// scales (Code::block_inverse).
template <class P, class S, int kStates>
FW_HD void store_quantized(uint32_t counter, float p, float f0, float f1, float inv0, float inv1,
                           typename P::storage& w, int32_t& e, uint32_t& c0, uint32_t& c1) {
  const ElementWords r = element_words<P, S, kStates>(counter);
  P::store(p, r.weight, w, e);
  c0 = kStates > 0 ? S::Code0::encode(f0, inv0, r.state0) : 0u;
  c1 = kStates > 1 ? S::Code1::encode(f1, inv1, r.state1) : 0u;
}

// ---- update-size control ---------------------------------------------------------------------

// Update-size control after Kosson et al. 2024 ("Analyzing & Reducing the Need for Learning Rate
// Warmup in GPT Training"; "Rotational Equilibrium: How Weight Decay Balances Learning Across
// Neural Networks", ICML 2024). Each row (a whole tensor, or one output row of a weight) gets
// coefficients alpha, beta from three float32 sums over the row, uu = u.u, ww = w.w, uw = u.w of
// the rule's update u = p1 - p0 and the weight w = p0, and its elements become alpha p0 + beta u:
// - kControlBound: ||u|| <= update_norm ||w||, by alpha = 1, beta = min(1, update_norm ||w|| / ||u||)
//   (beta = 1 where ||w|| = 0: a zero row has no scale to be relative to).
// - kControlRotational: the rule runs without weight decay; the radial part of u is projected out,
//   u_perp = u - (uw / ww) w, u_perp is scaled to eta ||w|| with the rule's equilibrium angular
//   update eta (Rule::equilibrium_coef: eta^2 = lr eq_coef, lr including warmup and schedule), and
//   the result is divided by sqrt(1 + eta^2), the norm ||w + u_perp|| / ||w|| of the orthogonal
//   step, so that ||w|| stays as it was (up to rounding). Weight decay acts only through eta.
//   A row with ||w|| = 0 or u_perp = 0 is left as it is.
// The states move as without control; only the weight's step changes.
//
// The sums are float32 and follow one fixed order on every backend, so that the coefficients,
// and with them every bit of the step, are the same on CPU and CUDA: a row is cut into
// kNormChunk-element chunks from its start; each chunk sums its elements in index order
// (norm_accumulate), then the chunk sums are added in chunk order (norm_accumulate_chunk).
constexpr int64_t kNormChunk = 1024;
constexpr int32_t kControlNone = 0;
constexpr int32_t kControlBound = 1;
constexpr int32_t kControlRotational = 2;

struct Control {
  int32_t mode;       // kControl*
  float update_norm;  // kControlBound: the largest ||u|| / ||w||
  float eq_coef;      // kControlRotational: eta^2 / lr
};

struct NormSums {
  float uu, ww, uw;
};

// The weight p0 and update u of one element as update_element would compute them from its
// states' values f0, f1 (load_state), writing nothing. An element skipped for a non-finite
// gradient has u = 0.
template <class Rule, class P, class M = Ieee>
FW_HD void element_delta(const typename Rule::Scalars& sc, typename P::storage w, int32_t e, typename P::storage g,
                         float grad_scale, float f0, float f1, float& p0, float& u) {
  float p;
  const bool ok = element_values<Rule, P, M, Uncontrolled, false>(sc, w, e, g, grad_scale, p0, p, f0, f1, Uncontrolled{});
  u = ok ? Ieee::sub(p, p0) : 0.0f;
}

// Adds one element to a chunk's sums (IEEE, never contracted).
FW_HD void norm_accumulate(NormSums& s, float p0, float u) {
  s.uu = Ieee::add(s.uu, Ieee::mul(u, u));
  s.ww = Ieee::add(s.ww, Ieee::mul(p0, p0));
  s.uw = Ieee::add(s.uw, Ieee::mul(u, p0));
}

// Adds one chunk's sums to its row's.
FW_HD void norm_accumulate_chunk(NormSums& s, const NormSums& chunk) {
  s.uu = Ieee::add(s.uu, chunk.uu);
  s.ww = Ieee::add(s.ww, chunk.ww);
  s.uw = Ieee::add(s.uw, chunk.uw);
}

// The group's lr times the schedule's factor at `step`, as every Rule::scalars computes it.
FW_HD float effective_lr(const Schedule& schedule, float lr, int64_t step) {
  return Ieee::mul(lr, factors(schedule, step).lr);
}

// A row's coefficients from its sums; `lr` is the effective lr (effective_lr).
FW_HD RowCoef row_coefficients(const Control& c, float lr, const NormSums& s) {
  using I = Ieee;
  if (c.mode == kControlBound) {
    const float limit = I::mul(I::mul(c.update_norm, c.update_norm), s.ww);
    if (!(s.ww > 0.0f) || !(s.uu > limit)) return RowCoef{1.0f, 1.0f};
    return RowCoef{1.0f, I::div(I::mul(c.update_norm, I::sqrt(s.ww)), I::sqrt(s.uu))};
  }
  if (!(s.ww > 0.0f)) return RowCoef{1.0f, 1.0f};
  const float radial = I::div(s.uw, s.ww);
  const float perp = I::sub(s.uu, I::mul(radial, s.uw));
  if (!(perp > 0.0f)) return RowCoef{1.0f, 0.0f};
  const float eta2 = I::mul(lr, c.eq_coef);
  const float k = I::div(I::sqrt(I::mul(eta2, s.ww)), I::sqrt(perp));
  const float r = I::div(1.0f, I::sqrt(I::add(1.0f, eta2)));
  return RowCoef{I::mul(I::sub(1.0f, I::mul(k, radial)), r), I::mul(k, r)};
}

}  // namespace fw
