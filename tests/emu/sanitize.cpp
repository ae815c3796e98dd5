// Sanitizer driver for the emulated CUDA device (csrc/emu), built and run by scripts/emu_sanitize.sh
// with -fsanitize=address,undefined: the real kernel sources (cuda/step_kernels.cuh and
// cuda/misc_kernels.cu, compiled by g++ against the CUDA shim in sanitize_kernels.cpp) run on buffers
// allocated to exactly their size, so AddressSanitizer reports any access past a tensor's end and
// UndefinedBehaviorSanitizer any misaligned vector access, and every output bit is compared with a
// plain host loop over the elements that calls the layer-1 functions the kernels call (here in
// their host branches, as the CPU backend compiles them: this file does not include the shim's
// cuda_runtime.h, see sanitize.h).
//
// Torch-free on purpose: it links only csrc/emu/runtime.cpp and sanitize_kernels.cpp's units.
// Prints one line per group of cases; on the first mismatch it prints the case and the element
// ("MISMATCH ...") and exits 1.
#include <chrono>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "emu/runtime.h"
#include "sanitize.h"

#if defined(__CUDA_ARCH__)
#error "the expected values need the layer-1 functions' host branches: no CUDA shim (cuda_runtime.h) here"
#endif

namespace {

using fusedwarm::LaunchArgs;
using fusedwarm::TensorSlot;
namespace emu = fusedwarm::emu;
namespace sanitize = fusedwarm::sanitize;

// ---- inputs -------------------------------------------------------------------------------------

// splitmix64: fresh, reproducible inputs for every case.
struct Rng {
  uint64_t s;
  uint64_t next() {
    uint64_t z = (s += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
  }
  uint32_t u32() { return static_cast<uint32_t>(next() >> 32); }
  int below(int n) { return static_cast<int>(next() % static_cast<uint64_t>(n)); }
  float unit() { return static_cast<float>(next() >> 40) * 0x1p-24f; }  // [0, 1)
  // A nonzero value of random sign with a binary exponent in [emin, emax].
  float value(int emin, int emax) {
    const float m = std::ldexp(1.0f + unit(), emin + below(emax - emin + 1));
    return (next() & 1) ? -m : m;
  }
};

// Buffers allocated to exactly their size (16-byte aligned start), so that the sanitizers see the
// end of every tensor; all freed together.
class Arena {
 public:
  Arena() = default;
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;
  ~Arena() {
    for (void* p : blocks_) std::free(p);
  }
  // n elements of T; with `offset`, they start one element into an allocation of n + 1, so their
  // address is not 16-byte aligned (for sizeof(T) < 16) while every access in range stays in bounds.
  template <class T>
  T* array(int64_t n, bool offset = false) {
    return static_cast<T*>(allocate(static_cast<size_t>(n + (offset ? 1 : 0)) * sizeof(T))) + (offset ? 1 : 0);
  }

 private:
  void* allocate(size_t bytes) {
    void* p = nullptr;
    if (posix_memalign(&p, 16, bytes) != 0) {
      std::printf("FAILED: out of memory\n");
      std::exit(1);
    }
    blocks_.push_back(p);
    return p;
  }

  std::vector<void*> blocks_;
};

// The bits of one element: one integer, or for a struct of 32-bit fields, each field.
std::string bits_of(const void* p, size_t size) {
  const size_t word = size > 4 && size % 4 == 0 ? 4 : size;
  std::string r;
  for (size_t at = 0; at < size; at += word) {
    uint64_t b = 0;
    std::memcpy(&b, static_cast<const char*>(p) + at, word);
    char s[32];
    std::snprintf(s, sizeof(s), "%s0x%0*" PRIx64, at == 0 ? "" : ":", static_cast<int>(2 * word), b);
    r += s;
  }
  return r;
}

[[noreturn]] void mismatch(const std::string& what) {
  std::printf("MISMATCH %s\n", what.c_str());
  std::fflush(stdout);
  std::exit(1);
}

// Where a check runs: the case, and for a step launch the tensor. Spelled out only on a mismatch.
struct Where {
  std::string what;
  int tensor = -1;
  int64_t numel = 0, first_index = 0;
  bool misaligned = false;

  std::string str() const {
    if (tensor < 0) return what;
    return what + ", tensor " + std::to_string(tensor) + " (numel " + std::to_string(numel) +
           (misaligned ? ", misaligned" : ", aligned") + ", element_offset " + std::to_string(first_index) + ")";
  }
};

[[noreturn]] void mismatch(const Where& where, const std::string& what) { mismatch(where.str() + ": " + what); }

[[noreturn]] void report_difference(const Where& where, const char* what, int64_t k, const void* got,
                                    const void* want, size_t size) {
  mismatch(where, std::string(what) + "[" + std::to_string(k) + "] = " + bits_of(got, size) + ", expected " +
                      bits_of(want, size));
}

void check_status(const Where& where, cudaError_t err) {
  if (err != cudaSuccess) mismatch(where, std::string("the launch returned ") + cudaGetErrorString(err));
}

// Whether two structs of float fields are equal field by field, bit for bit or both NaN.
template <class T>
bool same_up_to_nan(const T& a, const T& b) {
  static_assert(sizeof(T) % sizeof(float) == 0, "a struct of floats");
  for (size_t i = 0; i < sizeof(T) / sizeof(float); ++i) {
    float x, y;
    std::memcpy(&x, reinterpret_cast<const char*>(&a) + i * sizeof(float), sizeof(float));
    std::memcpy(&y, reinterpret_cast<const char*>(&b) + i * sizeof(float), sizeof(float));
    if (fw::float_bits(x) != fw::float_bits(y) && !(x != x && y != y)) return false;
  }
  return true;
}

// Compares n elements bit for bit (kAnyNaN: any NaN equals any NaN); reports the first difference.
template <class T, bool kAnyNaN = false>
void check(const Where& where, const char* what, const T* got, const T* want, int64_t n) {
  for (int64_t k = 0; k < n; ++k) {
    bool same;
    if constexpr (kAnyNaN) {
      same = same_up_to_nan(got[k], want[k]);
    } else {
      same = std::memcmp(got + k, want + k, sizeof(T)) == 0;
    }
    if (!same) report_difference(where, what, k, got + k, want + k, sizeof(T));
  }
}

// ---- device configurations ----------------------------------------------------------------------

struct Device {
  const char* name;
  emu::Config config;
};

emu::Config make_config(int sms, int per_sm, emu::Order order, uint64_t seed) {
  emu::Config c;
  c.sms = sms;
  c.blocks_per_sm = per_sm;
  c.order = order;
  c.seed = seed;
  return c;
}

// (a) exactly one resident block, forward and shuffled; (b) several resident blocks (fewer than the
// tiles of a launch, so blocks walk ranges that span tensors), shuffled and reversed; (c) more
// resident blocks than tiles (one tile per block).
const Device kDevices[] = {
    {"1x1 forward", make_config(1, 1, emu::Order::kForward, 0)},
    {"1x1 shuffle", make_config(1, 1, emu::Order::kShuffle, 11)},
    {"3x2 shuffle", make_config(3, 2, emu::Order::kShuffle, 12)},
    {"2x2 reverse", make_config(2, 2, emu::Order::kReverse, 0)},
    {"64x2 shuffle", make_config(64, 2, emu::Order::kShuffle, 13)},
};

// ---- names --------------------------------------------------------------------------------------

template <class T>
struct Name;
#define FW_NAME(s, ...)                     \
  template <>                               \
  struct Name<__VA_ARGS__> {                \
    static constexpr const char* value = s; \
  };
FW_NAME("AdamW", fw::AdamW)
FW_NAME("SGD", fw::SGD)
FW_NAME("SGDMomentum", fw::SGDMomentum)
FW_NAME("Lion", fw::Lion)
FW_NAME("f32", fw::ParamF32)
FW_NAME("bf16+0", fw::ParamHalf<fw::BF16Format, 0>)
FW_NAME("bf16+8", fw::ParamHalf<fw::BF16Format, 8>)
FW_NAME("bf16+16", fw::ParamHalf<fw::BF16Format, 16>)
FW_NAME("f16+16", fw::ParamHalf<fw::F16Format, 16>)
FW_NAME("f32 states", fw::StateF32)
FW_NAME("bf16 states", fw::StateBF16)
FW_NAME("ieee", fw::Ieee)
FW_NAME("pam", fw::Pam)
#undef FW_NAME

// ---- step kernels -------------------------------------------------------------------------------

// The tensors of every step launch: odd sizes around the pack (8) and the tile (2048), and row
// counts for update-size control that give rows of one element, rows shorter than a norm chunk
// (1024 elements), rows of several chunks, and chunks cut by a tile boundary.
constexpr int kTensors = 8;
constexpr int64_t kSizes[kTensors] = {1, 7, 8, 1023, 1025, 2049, 4099, 2050};
constexpr int64_t kRows[kTensors] = {1, 7, 2, 3, 1, 3, 1, 2};
// Shard offsets (TensorSlot::element_offset, rotated per case): none, 100 elements before the end of
// the random stream's first 2^30-element block (the tensor straddles two blocks, inside one tile),
// inside block 5, and 2047 elements before the end of block 1.
constexpr int64_t kShardOffsets[4] = {0, (int64_t{1} << 30) - 100, 5 * (int64_t{1} << 30) + 12345,
                                      (int64_t{2} << 30) - 2047};
// Step counters (rotated per case): first steps (SGD's buffer init, GI-Adam), late steps, and one
// past 2^32 (its high word enters the random key).
constexpr int64_t kSteps[kTensors] = {1, 2, 5, 1000, int64_t{0x200000005}, 3, 1, 40};

// Warmup and decay kinds, by case.
fw::Schedule make_schedule(int c, float beta2) {
  fw::Schedule s = fw::constant_schedule();
  switch (c % 4) {
    case 1:
      s.warmup = fw::kWarmupLinear;
      s.warmup_steps = 10.0f;
      s.warmup_start = 0.1f;
      s.decay_shape = fw::kDecayCosine;
      s.total_steps = 100;
      s.decay_steps = 60;
      s.final_fraction = 0.1f;
      break;
    case 2:
      s.warmup = fw::kWarmupExp;
      s.warmup_rate = 0.01f;
      s.decay_shape = fw::kDecaySqrt;
      s.total_steps = 50;
      s.decay_steps = 20;
      break;
    case 3:
      if (beta2 > 0.0f) {
        s.warmup = fw::kWarmupRAdam;
        s.beta2 = beta2;
      } else {
        s.warmup = fw::kWarmupLinear;
        s.warmup_steps = 4.0f;
      }
      s.decay_shape = fw::kDecayLinear;
      s.total_steps = 2000;
      s.decay_steps = 1500;
      s.final_fraction = 0.25f;
      break;
    default:
      break;
  }
  return s;
}

template <class Rule>
struct RuleInputs;

template <>
struct RuleInputs<fw::AdamW> {
  static constexpr float kLr = 1e-2f;
  static fw::AdamW::Hyper hyper(int c) {
    fw::AdamW::Hyper h{};
    h.beta1 = 0.9f;
    h.beta2 = 0.999f;
    h.one_minus_beta1 = static_cast<float>(1.0 - 0.9);
    h.one_minus_beta2 = static_cast<float>(1.0 - 0.999);
    h.eps = 1e-8f;
    h.weight_decay = 0.01f;
    h.maximize = (c & 1) != 0;
    h.v_init_grad = (c & 2) != 0;
    h.schedule = make_schedule(c, h.beta2);
    return h;
  }
  // m signed, v positive.
  static float state(Rng& r, int j) { return j == 0 ? r.value(-14, -2) : std::fabs(r.value(-26, -6)); }
};

struct SGDInputs {
  static constexpr float kLr = 5e-2f;
  static fw::SGD::Hyper hyper(int c) {
    fw::SGD::Hyper h{};
    h.momentum = 0.9f;
    h.one_minus_dampening = (c & 4) ? static_cast<float>(1.0 - 0.1) : 1.0f;
    h.weight_decay = 1e-4f;
    h.nesterov = (c & 1) != 0;
    h.maximize = (c & 2) != 0;
    h.schedule = make_schedule(c, 0.0f);
    return h;
  }
  static float state(Rng& r, int) { return r.value(-14, 0); }
};
template <>
struct RuleInputs<fw::SGD> : SGDInputs {};
template <>
struct RuleInputs<fw::SGDMomentum> : SGDInputs {};

template <>
struct RuleInputs<fw::Lion> {
  static constexpr float kLr = 1e-3f;
  static fw::Lion::Hyper hyper(int c) {
    fw::Lion::Hyper h{};
    h.beta1 = 0.9f;
    h.beta2 = 0.99f;
    h.one_minus_beta1 = static_cast<float>(1.0 - 0.9);
    h.one_minus_beta2 = static_cast<float>(1.0 - 0.99);
    h.weight_decay = 0.1f;
    h.maximize = (c & 1) != 0;
    h.schedule = make_schedule(c, 0.0f);
    return h;
  }
  static float state(Rng& r, int) { return r.value(-14, -2); }
};

// Gradient encodings: a float as the weight's storage, and non-finite patterns (both infinities,
// NaNs of both signs with payloads).
template <class P>
struct GradIo;
template <>
struct GradIo<fw::ParamF32> {
  static float encode(float g, uint32_t) { return g; }
  static float special(int i) {
    const uint32_t b[4] = {0x7F800000u, 0xFF800000u, 0x7FC00000u, 0xFFC12345u};
    return fw::bits_float(b[i & 3]);
  }
};
template <class F, int K>
struct GradIo<fw::ParamHalf<F, K>> {
  static uint16_t encode(float g, uint32_t rnd) { return fw::half_bits_from_float_sr<F>(g, rnd); }
  static uint16_t special(int i) {
    const uint16_t bf16[4] = {0x7F80u, 0xFF80u, 0x7FC0u, 0xFFC1u};
    const uint16_t f16[4] = {0x7C00u, 0xFC00u, 0x7E00u, 0xFE01u};
    return F::EB == 8 ? bf16[i & 3] : f16[i & 3];
  }
};

std::string case_name(const char* rule, const char* param, const char* states, const char* arith, int c, int layout,
                      int32_t control) {
  const char* const controls[] = {"off", "bound", "rotational"};
  return std::string(rule) + " " + param + " " + states + " " + arith + " case " + std::to_string(c) +
         (layout == 0 ? " aligned" : " mixed-alignment") + " control " + controls[control];
}

// The step launch ran the expected kernels with the expected grids (one resident block: one block).
void check_grid(const Where& where, int64_t launches, int64_t blocks, const emu::Counters& before,
                const emu::Counters& after) {
  if (after.launches - before.launches != launches || after.blocks - before.blocks != blocks) {
    mismatch(where, "expected " + std::to_string(launches) + " launches of " + std::to_string(blocks) +
                        " blocks in all, the device ran " + std::to_string(after.launches - before.launches) +
                        " of " + std::to_string(after.blocks - before.blocks));
  }
}

// The layer-1 calls of the expected values, each in a function of its own (per rule for the
// scalars): the math is always inlined, and small functions keep this file's sanitized build,
// which grows faster than the functions' sizes, to about a minute.
template <class Rule>
[[gnu::noinline]] typename Rule::Scalars scalars_of(const typename Rule::Hyper& h, float lr, int64_t step) {
  return Rule::template scalars<fw::Ieee>(h, lr, step);
}

[[gnu::noinline]] fw::RowCoef coefficients_of(const fw::Control& c, const fw::Schedule& schedule, float lr,
                                              int64_t step, const fw::NormSums& sums) {
  return fw::row_coefficients(c, fw::effective_lr(schedule, lr, step), sums);
}

template <class P>
[[gnu::noinline]] void store_master(float v, uint32_t rnd, typename P::storage& w, int32_t& e) {
  P::store(v, rnd, w, e);
}

template <class S>
[[gnu::noinline]] typename S::storage store_state(float v, uint32_t rnd) {
  return S::store(v, rnd);
}

template <class Rule, class P, class S, class M>
[[gnu::noinline]] void delta_of(const typename Rule::Scalars& sc, typename P::storage w, int32_t e,
                                typename P::storage g, float grad_scale, typename S::storage s0, typename S::storage s1,
                                float& p0, float& u) {
  fw::element_delta<Rule, P, M>(sc, w, e, g, grad_scale, Rule::kStates > 0 ? S::load(s0) : 0.0f,
                                Rule::kStates > 1 ? S::load(s1) : 0.0f, p0, u);
}

template <class Rule, class P, class S, class M>
[[gnu::noinline]] bool update_of(const typename Rule::Scalars& sc, uint32_t counter, typename P::storage& w, int32_t& e,
                                 typename P::storage g, float grad_scale, typename S::storage& s0,
                                 typename S::storage& s1, const fw::RowCoef& coef) {
  return fw::update_element<Rule, P, S, M>(sc, counter, w, e, g, grad_scale, s0, s1, coef);
}

// One launch's inputs, its expected outputs, and its exact-size device buffers, run on every
// emulated device configuration. layout 0: every tensor 16-byte aligned (the vectorized path, and
// each buffer ends where the tensor does); layout 1: the odd-numbered tensors start one element
// into their allocation (the scalar path; the n + 1 allocation ends where the tensor does).
// Every launch has eight tensors with different step counters, gradient scales (or none),
// non-finite counters (or none) and shard offsets; about one gradient in 40 is not finite.
template <class Rule, class P, class S, class M>
class StepCase {
 public:
  using W = typename P::storage;
  using Ext = typename P::extra_storage;
  using St = typename S::storage;
  static constexpr bool kExtra = P::K > 0;
  static constexpr int kStates = Rule::kStates;

  StepCase(uint64_t seed, int c, int layout, int32_t control)
      : rng_{seed}, c_(c), layout_(layout), hyper_(RuleInputs<Rule>::hyper(c)) {
    control_ = fw::Control{control, 1e-3f, 0.05f};
    name_ = case_name(Name<Rule>::value, Name<P>::value, Name<S>::value, Name<M>::value, c, layout, control);
    lr_ = RuleInputs<Rule>::kLr;
    seed_ = rng_.next();
    make_inputs();
    expect();
    make_launch();
  }

  int64_t elements() const { return num_elements_; }

  // Runs the launch on `device` from fresh copies of the inputs and checks every output.
  [[gnu::noinline]] void run(const Device& device) {
    for (int i = 0; i < kTensors; ++i) {
      Tensor& t = t_[i];
      copy(t.dw, t.w);
      copy(t.dg, t.g);
      if (kExtra) copy(t.dx, t.x);
      for (int j = 0; j < kStates; ++j) copy(t.ds[j], t.s[j]);
      *t.dstep = t.step;
      counters_[i] = t.counter0;
      scales_[i] = t.scale;
    }
    if (control_.mode != fw::kControlNone) {
      std::memset(static_cast<void*>(partials_), 0xFF, sizeof(fw::NormSums) * args_.num_chunks);
      std::memset(static_cast<void*>(coefs_), 0xFF, sizeof(fw::RowCoef) * args_.num_rows);
    }
    *lr_device_ = lr_;

    emu::configure(device.config);
    const emu::Counters before = emu::read_counters();
    const cudaError_t err = sanitize::launch_step<Rule, P, S, M>(args_, hyper_);
    const emu::Counters after = emu::read_counters();
    Where where{name_ + " on " + device.name};
    check_status(where, err);

    const int64_t resident = int64_t{device.config.sms} * device.config.blocks_per_sm;
    int64_t blocks = args_.num_tiles < resident ? args_.num_tiles : resident, launches = 1;
    if (control_.mode != fw::kControlNone) {
      blocks += (args_.num_chunks + fusedwarm::kThreads - 1) / fusedwarm::kThreads;
      blocks += (args_.num_rows + fusedwarm::kThreads - 1) / fusedwarm::kThreads;
      launches = 3;
    }
    check_grid(where, launches, blocks, before, after);

    for (int i = 0; i < kTensors; ++i) {
      const Tensor& t = t_[i];
      where.tensor = i;
      where.numel = t.numel;
      where.misaligned = t.misaligned;
      where.first_index = t.first_index;
      check(where, "param", t.dw, t.want_w.data(), t.numel);
      check(where, "grad (input)", t.dg, t.g.data(), t.numel);
      if (kExtra) check(where, "extra", t.dx, t.want_x.data(), t.numel);
      for (int j = 0; j < kStates; ++j) {
        check(where, j == 0 ? "state0" : "state1", t.ds[j], t.want_s[j].data(), t.numel);
      }
      check(where, "step (input)", t.dstep, &t.step, 1);
      if (slots_[i].nonfinite != nullptr) {
        const int64_t want = t.counter0 + t.skipped;
        check(where, "nonfinite", &counters_[i], &want, 1);
      }
      if (control_.mode != fw::kControlNone) {
        // Scratch, not stored tensor values: its NaNs keep the arithmetic's bits (the GPU's
        // 0x7FFFFFFF, x86's 0xFFC00000), which only reach a tensor through canonical_nan.
        check<fw::RowCoef, true>(where, "row_coef", coefs_ + slots_[i].first_row, t.want_coef.data(), t.rows);
        check<fw::NormSums, true>(where, "partials", partials_ + slots_[i].first_chunk, t.want_partials.data(),
                                  static_cast<int64_t>(t.want_partials.size()));
      }
    }
  }

 private:
  struct Tensor {
    int64_t numel, rows, step;
    uint32_t id;
    bool misaligned;      // its buffers start one element into their allocation
    int64_t first_index;  // TensorSlot::element_offset: the shard's offset in the full tensor
    float scale;  // the grad_scale entry (used when the slot points at it)
    int64_t counter0, skipped;
    std::vector<W> w, g, want_w;
    std::vector<Ext> x, want_x;
    std::vector<St> s[2], want_s[2];
    std::vector<fw::RowCoef> want_coef;
    std::vector<fw::NormSums> want_partials;
    W* dw;
    W* dg;
    Ext* dx;
    St* ds[2];
    int64_t* dstep;
  };

  template <class T>
  static void copy(T* dst, const std::vector<T>& src) {
    std::memcpy(static_cast<void*>(dst), src.data(), src.size() * sizeof(T));
  }


  bool scaled(int i) const { return (i + c_) % 3 != 0; }
  bool counted(int i) const { return (i + c_) % 4 != 3; }

  [[gnu::noinline]] void make_inputs() {
    num_elements_ = 0;
    for (int i = 0; i < kTensors; ++i) {
      Tensor& t = t_[i];
      t.numel = kSizes[i];
      t.rows = kRows[i];
      t.step = kSteps[(i + c_) % kTensors];
      t.id = rng_.u32();
      t.misaligned = layout_ == 1 && i % 2 == 1;
      t.first_index = kShardOffsets[(i + c_) % 4];
      // Tensor 5's scale overflows its largest gradients (skipped as non-finite).
      t.scale = i == 5 ? 0x1p124f : (i % 2 ? 0.5f : 3.0f);
      t.counter0 = rng_.below(1000);
      t.w.resize(t.numel);
      t.g.resize(t.numel);
      if (kExtra) t.x.resize(t.numel);
      for (int j = 0; j < kStates; ++j) t.s[j].resize(t.numel);
      for (int64_t k = 0; k < t.numel; ++k) {
        int32_t e = 0;
        store_master<P>(rng_.value(-20, 2), rng_.u32(), t.w[k], e);
        if (kExtra) t.x[k] = static_cast<Ext>(e);
        t.g[k] = rng_.below(40) == 0 ? GradIo<P>::special(rng_.below(4))
                                     : GradIo<P>::encode(rng_.value(-16, 4), rng_.u32());
        for (int j = 0; j < kStates; ++j) t.s[j][k] = store_state<S>(RuleInputs<Rule>::state(rng_, j), rng_.u32());
      }
      num_elements_ += t.numel;
    }
  }

  // The expected outputs: update.cuh's element loop, and with update-size control its chunk, row
  // and coefficient order (update.cuh, "update-size control").
  [[gnu::noinline]] void expect() {
    const bool control = control_.mode != fw::kControlNone;
    int moved = 0;
    int64_t skipped = 0;
    for (int i = 0; i < kTensors; ++i) {
      Tensor& t = t_[i];
      const typename Rule::Scalars sc = scalars_of<Rule>(hyper_, lr_, t.step);
      const float gs = scaled(i) ? t.scale : 1.0f;
      const int64_t row_size = t.numel / t.rows;
      auto extra = [&](int64_t k) { return kExtra ? static_cast<int32_t>(t.x[k]) : 0; };
      auto state = [&](int j, int64_t k) { return j < kStates ? t.s[j][k] : St{}; };
      if (control) {
        for (int64_t r = 0; r < t.rows; ++r) {
          fw::NormSums row{0.0f, 0.0f, 0.0f};
          const int64_t row_end = (r + 1) * row_size;
          for (int64_t c0 = r * row_size; c0 < row_end; c0 += fw::kNormChunk) {
            const int64_t c1 = c0 + fw::kNormChunk < row_end ? c0 + fw::kNormChunk : row_end;
            fw::NormSums chunk{0.0f, 0.0f, 0.0f};
            for (int64_t k = c0; k < c1; ++k) {
              float p0, u;
              delta_of<Rule, P, S, M>(sc, t.w[k], extra(k), t.g[k], gs, state(0, k), state(1, k), p0, u);
              fw::norm_accumulate(chunk, p0, u);
            }
            t.want_partials.push_back(chunk);
            fw::norm_accumulate_chunk(row, chunk);
          }
          t.want_coef.push_back(coefficients_of(control_, hyper_.schedule, lr_, t.step, row));
        }
      }
      t.want_w = t.w;
      t.want_x = t.x;
      for (int j = 0; j < kStates; ++j) t.want_s[j] = t.s[j];
      t.skipped = 0;
      for (int64_t k = 0; k < t.numel; ++k) {
        int32_t e = extra(k);
        St s0 = state(0, k), s1 = state(1, k);
        // The random stream keys an element by its index in the full tensor.
        const uint64_t index = static_cast<uint64_t>(k) + static_cast<uint64_t>(t.first_index);
        const uint32_t key = fw::stream_key(seed_, t.id, static_cast<uint64_t>(t.step), fw::random_block(index));
        const fw::RowCoef coef = control ? t.want_coef[k / row_size] : fw::RowCoef{1.0f, 1.0f};
        const bool ok =
            update_of<Rule, P, S, M>(sc, fw::element_counter(key, index), t.want_w[k], e, t.g[k], gs, s0, s1, coef);
        if (kExtra) t.want_x[k] = static_cast<Ext>(e);
        if (kStates > 0) t.want_s[0][k] = s0;
        if (kStates > 1) t.want_s[1][k] = s1;
        t.skipped += ok ? 0 : 1;
      }
      moved += std::memcmp(t.want_w.data(), t.w.data(), t.w.size() * sizeof(W)) != 0 ? 1 : 0;
      skipped += t.skipped;
    }
    // A case whose weights do not move, or that skips no element, would check less than it says.
    if (moved < kTensors / 2 || skipped == 0) {
      mismatch(name_ + ": the inputs are too weak (" + std::to_string(moved) + " tensors move, " +
               std::to_string(skipped) + " elements skipped)");
    }
  }

  static bool aligned(const void* p) { return reinterpret_cast<uintptr_t>(p) % fusedwarm::kVectorAlign == 0; }

  // The slot table and LaunchArgs as cuda/host.h (DeviceStep::run, with fill_slots of ops_common.cpp)
  // build them, over exact-size buffers.
  [[gnu::noinline]] void make_launch() {
    const bool control = control_.mode != fw::kControlNone;
    slots_ = arena_.array<TensorSlot>(kTensors);
    counters_ = arena_.array<int64_t>(kTensors);
    scales_ = arena_.array<float>(kTensors);
    lr_device_ = arena_.array<float>(1);
    int64_t num_tiles = 0, num_chunks = 0, num_rows = 0;
    for (int i = 0; i < kTensors; ++i) {
      Tensor& t = t_[i];
      t.dw = arena_.array<W>(t.numel, t.misaligned);
      t.dg = arena_.array<W>(t.numel, t.misaligned);
      t.dx = kExtra ? arena_.array<Ext>(t.numel, t.misaligned) : nullptr;
      t.ds[0] = t.ds[1] = nullptr;
      for (int j = 0; j < kStates; ++j) t.ds[j] = arena_.array<St>(t.numel, t.misaligned);
      t.dstep = arena_.array<int64_t>(1);
      TensorSlot s{};
      s.param = t.dw;
      s.grad = t.dg;
      s.extra = t.dx;
      s.state[0] = t.ds[0];
      s.state[1] = t.ds[1];
      s.step = t.dstep;
      s.grad_scale = scaled(i) ? scales_ + i : nullptr;
      s.nonfinite = counted(i) ? counters_ + i : nullptr;
      s.numel = t.numel;
      s.first_tile = num_tiles;
      s.tensor_id = t.id;
      s.element_offset = t.first_index;
      bool vec = aligned(s.param) && aligned(s.grad) && aligned(s.extra);
      for (int j = 0; j < kStates; ++j) vec = vec && aligned(s.state[j]);
      if (vec == t.misaligned) mismatch(name_ + ": the driver's buffers are not laid out as intended");
      s.vectorized = vec ? 1u : 0u;
      s.row_size = t.numel;
      if (control) {
        s.row_size = t.numel / t.rows;
        s.chunks_per_row = (s.row_size + fw::kNormChunk - 1) / fw::kNormChunk;
        s.first_chunk = num_chunks;
        s.first_row = num_rows;
        num_chunks += t.rows * s.chunks_per_row;
        num_rows += t.rows;
      }
      num_tiles += fusedwarm::tiles_of(t.numel);
      slots_[i] = s;
    }
    partials_ = control ? arena_.array<fw::NormSums>(num_chunks) : nullptr;
    coefs_ = control ? arena_.array<fw::RowCoef>(num_rows) : nullptr;
    for (int i = 0; control && i < kTensors; ++i) slots_[i].row_coef = coefs_ + slots_[i].first_row;
    args_ = LaunchArgs{};
    args_.slots = slots_;
    args_.num_slots = kTensors;
    args_.num_tiles = num_tiles;
    args_.lr = (c_ & 4) ? lr_device_ : nullptr;
    args_.lr_value = lr_;
    args_.seed = seed_;
    args_.num_rows = num_rows;
    args_.num_chunks = num_chunks;
    args_.partials = partials_;
    args_.control = control_;
  }

  Rng rng_;
  int c_, layout_;
  std::string name_;
  typename Rule::Hyper hyper_;
  fw::Control control_;
  float lr_;
  uint64_t seed_;
  int64_t num_elements_ = 0;
  Tensor t_[kTensors];
  Arena arena_;
  TensorSlot* slots_ = nullptr;
  int64_t* counters_ = nullptr;
  float* scales_ = nullptr;
  float* lr_device_ = nullptr;
  fw::NormSums* partials_ = nullptr;
  fw::RowCoef* coefs_ = nullptr;
  LaunchArgs args_{};
};

struct Tally {
  int64_t cases = 0, launches = 0, elements = 0;
};

// Every state type and arithmetic of one rule and weight format: aligned and mixed layouts, each
// without and with update-size control (bound or rotational, alternating), on every device.
template <class Rule, class P>
void step_group(uint64_t& seed, int& c) {
  const auto start = std::chrono::steady_clock::now();
  Tally tally;
  auto variant = [&](auto s_tag, auto m_tag) {
    using S = typename decltype(s_tag)::type;
    using M = typename decltype(m_tag)::type;
    for (int layout = 0; layout < 2; ++layout) {
      for (int control_on = 0; control_on < 2; ++control_on) {
        const int32_t kind = (c + layout) % 2 ? fw::kControlBound : fw::kControlRotational;
        const int32_t control = control_on == 0 ? fw::kControlNone : kind;
        StepCase<Rule, P, S, M> step(seed++, c++, layout, control);
        for (const Device& d : kDevices) {
          step.run(d);
          ++tally.launches;
          tally.elements += step.elements();
        }
        ++tally.cases;
      }
    }
  };
  variant(std::common_type<fw::StateF32>{}, std::common_type<fw::Ieee>{});
  variant(std::common_type<fw::StateF32>{}, std::common_type<fw::Pam>{});
  variant(std::common_type<fw::StateBF16>{}, std::common_type<fw::Ieee>{});
  variant(std::common_type<fw::StateBF16>{}, std::common_type<fw::Pam>{});
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("ok  step %-11s %-7s: %3" PRId64 " cases, %3" PRId64 " launches, %8" PRId64 " elements (%.1f s)\n",
              Name<Rule>::value, Name<P>::value, tally.cases, tally.launches, tally.elements, s);
  std::fflush(stdout);
}

// Every weight format that sanitize_kernels.cpp instantiates (sanitize.h).
template <class Rule>
void step_rule(uint64_t& seed, int& c) {
#define FW_STEP_GROUP(P) step_group<Rule, P>(seed, c);
  FW_SANITIZE_PARAMS(FW_STEP_GROUP)
#undef FW_STEP_GROUP
}

// ---- piecewise-affine kernels -------------------------------------------------------------------

// Devices for the kernels whose grid does not depend on the occupancy: thread and block orders.
const Device kOrders[] = {
    {"forward", make_config(1, 1, emu::Order::kForward, 0)},
    {"reverse", make_config(1, 1, emu::Order::kReverse, 0)},
    {"shuffle", make_config(1, 1, emu::Order::kShuffle, 21)},
};

// Random operands: wide exponents (subnormal results and overflow), small values around exp2's
// range, and special values.
float pam_operand(Rng& r) {
  static const uint32_t kSpecial[] = {0x00000000u, 0x80000000u, 0x7F800000u, 0xFF800000u, 0x7FC00000u,
                                      0xFFC00001u, 0x00000001u, 0x807FFFFFu, 0x3F800000u, 0xBF800000u,
                                      0x7F7FFFFFu, 0x00800000u};
  switch (r.below(8)) {
    case 0: return fw::bits_float(kSpecial[r.below(12)]);
    case 1:
    case 2: return (r.unit() - 0.5f) * 400.0f;
    default: return r.value(-140, 127);
  }
}

float pam_host(fw::PamOp op, float a, float b) {
  switch (op) {
    case fw::PamOp::kMul: return fw::pam_apply<fw::PamOp::kMul>(a, b);
    case fw::PamOp::kDiv: return fw::pam_apply<fw::PamOp::kDiv>(a, b);
    case fw::PamOp::kSqrt: return fw::pam_apply<fw::PamOp::kSqrt>(a, b);
    case fw::PamOp::kExp2: return fw::pam_apply<fw::PamOp::kExp2>(a, b);
    case fw::PamOp::kLog2: return fw::pam_apply<fw::PamOp::kLog2>(a, b);
  }
  return 0.0f;
}

void pam_elementwise(uint64_t& seed) {
  const char* const names[] = {"mul", "div", "sqrt", "exp2", "log2"};
  const fw::PamOp ops[] = {fw::PamOp::kMul, fw::PamOp::kDiv, fw::PamOp::kSqrt, fw::PamOp::kExp2, fw::PamOp::kLog2};
  const int64_t sizes[] = {1, 7, 255, 257, 1025, 4099};
  for (int o = 0; o < 5; ++o) {
    const bool binary = o < 2;
    int64_t launches = 0, elements = 0;
    for (int64_t n : sizes) {
      Rng rng{seed++};
      Arena arena;
      float* a = arena.array<float>(n);
      float* b = binary ? arena.array<float>(n) : nullptr;
      float* out = arena.array<float>(n);
      std::vector<float> want(n);
      for (int64_t k = 0; k < n; ++k) {
        a[k] = pam_operand(rng);
        if (binary) b[k] = pam_operand(rng);
        want[k] = pam_host(ops[o], a[k], binary ? b[k] : 0.0f);
      }
      for (const Device& d : kOrders) {
        std::memset(static_cast<void*>(out), 0xA5, sizeof(float) * n);
        emu::configure(d.config);
        const std::string where = std::string("pam ") + names[o] + " n=" + std::to_string(n) + " on " + d.name;
        const cudaError_t err = sanitize::launch_pam_elementwise(ops[o], a, b, out, n);
        check_status(Where{where}, err);
        check(Where{where}, "out", out, want.data(), n);
        ++launches;
        elements += n;
      }
    }
    std::printf("ok  pam %-4s elementwise: %2" PRId64 " launches, %8" PRId64 " elements\n", names[o], launches,
                elements);
  }
  std::fflush(stdout);
}

void pam_matmul(uint64_t& seed) {
  struct Shape {
    int64_t m, k, n;
  };
  const Shape shapes[] = {{1, 1, 1}, {17, 33, 5}, {40, 7, 70}, {3, 100, 2}, {16, 16, 16}, {5, 0, 3}, {33, 17, 1}};
  int64_t launches = 0, outputs = 0;
  for (const Shape& s : shapes) {
    Rng rng{seed++};
    Arena arena;
    float* a = arena.array<float>(s.m * s.k);
    float* b = arena.array<float>(s.k * s.n);
    float* c = arena.array<float>(s.m * s.n);
    for (int64_t i = 0; i < s.m * s.k; ++i) a[i] = rng.value(-6, 3);
    for (int64_t i = 0; i < s.k * s.n; ++i) b[i] = rng.value(-6, 3);
    // Non-finite sums (inf - inf is NaN, stored as the canonical NaN) in the larger shapes.
    if (s.m * s.k > 100) {
      a[rng.below(static_cast<int>(s.m * s.k))] = fw::bits_float(0x7F800000u);
      a[rng.below(static_cast<int>(s.m * s.k))] = fw::bits_float(0xFF800000u);
      a[rng.below(static_cast<int>(s.m * s.k))] = fw::bits_float(0xFFC00001u);
    }
    std::vector<float> want(s.m * s.n);
    for (int64_t i = 0; i < s.m; ++i) {
      for (int64_t j = 0; j < s.n; ++j) {
        float acc = 0.0f;
        for (int64_t kk = 0; kk < s.k; ++kk) acc = fw::Ieee::add(acc, fw::pam_mul(a[i * s.k + kk], b[kk * s.n + j]));
        want[i * s.n + j] = fw::canonical_nan(acc);
      }
    }
    for (const Device& d : kOrders) {
      std::memset(static_cast<void*>(c), 0xA5, sizeof(float) * s.m * s.n);
      emu::configure(d.config);
      const std::string where = "pam matmul " + std::to_string(s.m) + "x" + std::to_string(s.k) + "x" +
                                std::to_string(s.n) + " on " + d.name;
      const cudaError_t err = sanitize::launch_pam_matmul(a, b, c, s.m, s.k, s.n);
      check_status(Where{where}, err);
      check(Where{where}, "C", c, want.data(), s.m * s.n);
      ++launches;
      outputs += s.m * s.n;
    }
  }
  std::printf("ok  pam matmul: %2" PRId64 " launches, %8" PRId64 " outputs\n", launches, outputs);
  std::fflush(stdout);
}

// ---- schedule factors ---------------------------------------------------------------------------

void schedule_factors(uint64_t& seed) {
  Rng rng{seed++};
  const int64_t n = 300;
  Arena arena;
  int64_t* steps = arena.array<int64_t>(n);
  float* out = arena.array<float>(4 * n);
  for (int64_t i = 0; i < n; ++i) steps[i] = i < 100 ? i - 2 : static_cast<int64_t>(rng.next() % 5000);
  int64_t launches = 0;
  for (int kind = 0; kind < 4; ++kind) {
    const fw::Schedule sched = make_schedule(kind, 0.999f);
    std::vector<float> want(4 * n);
    for (int64_t i = 0; i < n; ++i) {
      const fw::Factors f = fw::factors(sched, steps[i]);
      want[4 * i] = f.warmup;
      want[4 * i + 1] = f.schedule;
      want[4 * i + 2] = f.lr;
      want[4 * i + 3] = f.adaptive;
    }
    for (const Device& d : kOrders) {
      emu::configure(d.config);
      const std::string where = "schedule_factors kind " + std::to_string(kind) + " on " + d.name;
      const cudaError_t err = sanitize::launch_schedule_factors(steps, n, sched, out);
      check_status(Where{where}, err);
      check(Where{where}, "out", out, want.data(), 4 * n);
      ++launches;
    }
  }
  std::printf("ok  schedule factors: %2" PRId64 " launches\n", launches);
  std::fflush(stdout);
}

}  // namespace

int main() {
  const auto start = std::chrono::steady_clock::now();
  uint64_t seed = 0x5A417A5EEDULL;
  int c = 0;
  step_rule<fw::AdamW>(seed, c);
  step_rule<fw::SGD>(seed, c);
  step_rule<fw::SGDMomentum>(seed, c);
  step_rule<fw::Lion>(seed, c);
  pam_elementwise(seed);
  pam_matmul(seed);
  schedule_factors(seed);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("PASSED: every check of the emulated kernels (%.1f s)\n", s);
  return 0;
}
