// Operator surface (layer 3): the CPU registrations and the CPU-only ops. Schemas and argument
// checks are ops_common.cpp's; the CUDA registrations live in cuda/ops_cuda.cpp; fake kernels are
// in fusedwarm/_ops.py.
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <type_traits>

#include "cpu/pam_cpu.h"
#include "cpu/step_cpu.h"
#include "ops_impl.h"

namespace fusedwarm {

at::Tensor master_weight_cpu(const at::Tensor& param, const at::Tensor& extra, int64_t extra_bits) {
  TORCH_CHECK(extra_bits == 0 || extra_bits == 8 || extra_bits == 16,
              "fusedwarm.master_weight: extra_bits must be 0, 8 or 16, got ", extra_bits);
  const auto pdt = param.scalar_type();
  if (pdt == at::kFloat) return param.clone();
  TORCH_CHECK(pdt == at::kBFloat16 || pdt == at::kHalf,
              "fusedwarm.master_weight: param must be float32, bfloat16 or float16, got ", pdt);
  const at::Tensor p = param.contiguous();
  at::Tensor e;
  if (extra_bits > 0) {
    e = extra.contiguous();
    TORCH_CHECK(e.scalar_type() == (extra_bits == 16 ? at::kShort : at::kChar) && e.numel() == p.numel() &&
                    e.device() == p.device(),
                "fusedwarm.master_weight: extra must be ", (extra_bits == 16 ? "int16" : "int8"), " with ",
                p.numel(), " elements on ", p.device());
  }
  at::Tensor out = at::empty(p.sizes(), p.options().dtype(at::kFloat));
  const uint16_t* w = static_cast<const uint16_t*>(p.data_ptr());
  float* o = out.data_ptr<float>();
  const int64_t n = p.numel();
  auto decode = [&](auto codec_tag, const auto* ext) {
    using Codec = typename decltype(codec_tag)::type;
    for (int64_t k = 0; k < n; ++k) o[k] = Codec::decode(w[k], ext ? static_cast<int32_t>(ext[k]) : 0);
  };
  auto with_format = [&](auto ftag) {
    using F = typename decltype(ftag)::type;
    if (extra_bits == 16) decode(Tag<fw::MasterCodec<F, 16>>{}, e.data_ptr<int16_t>());
    else if (extra_bits == 8) decode(Tag<fw::MasterCodec<F, 8>>{}, e.data_ptr<int8_t>());
    else decode(Tag<fw::MasterCodec<F, 0>>{}, static_cast<const int8_t*>(nullptr));
  };
  if (pdt == at::kBFloat16) with_format(Tag<fw::BF16Format>{});
  else with_format(Tag<fw::F16Format>{});
  return out;
}

// The inverse of master_weight: a float32 master written as a `dtype` weight plus `extra_bits`
// extra bits (MasterCodec::encode), rounding to nearest (ties away from zero) where the master has
// fewer bits than float32. Used when a checkpoint or float32 weights are loaded, not in the step.
std::tuple<at::Tensor, at::Tensor> master_split_cpu(const at::Tensor& master, at::ScalarType dtype,
                                                    int64_t extra_bits) {
  TORCH_CHECK(extra_bits == 0 || extra_bits == 8 || extra_bits == 16,
              "fusedwarm.master_split: extra_bits must be 0, 8 or 16, got ", extra_bits);
  TORCH_CHECK(master.scalar_type() == at::kFloat, "fusedwarm.master_split: master must be float32, got ",
              master.scalar_type());
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kHalf,
              "fusedwarm.master_split: dtype must be bfloat16 or float16, got ", dtype);
  const at::Tensor m = master.contiguous();
  at::Tensor w = at::empty(m.sizes(), m.options().dtype(dtype));
  at::Tensor e = extra_bits > 0 ? at::empty(m.sizes(), m.options().dtype(extra_bits == 16 ? at::kShort : at::kChar))
                                : at::empty({0}, m.options().dtype(at::kChar));
  const float* src = m.const_data_ptr<float>();
  uint16_t* out = static_cast<uint16_t*>(w.data_ptr());
  const int64_t n = m.numel();
  constexpr uint32_t kNearest = 0x80000000u;  // half of the 32-bit random range: round half up
  auto encode = [&](auto codec_tag, auto* ext) {
    using Codec = typename decltype(codec_tag)::type;
    for (int64_t k = 0; k < n; ++k) {
      int32_t bits = 0;
      Codec::encode(src[k], kNearest, out[k], bits);
      if (ext) ext[k] = static_cast<std::remove_pointer_t<decltype(ext)>>(bits);
    }
  };
  auto with_format = [&](auto ftag) {
    using F = typename decltype(ftag)::type;
    if (extra_bits == 16) encode(Tag<fw::MasterCodec<F, 16>>{}, e.data_ptr<int16_t>());
    else if (extra_bits == 8) encode(Tag<fw::MasterCodec<F, 8>>{}, e.data_ptr<int8_t>());
    else encode(Tag<fw::MasterCodec<F, 0>>{}, static_cast<int8_t*>(nullptr));
  };
  if (dtype == at::kBFloat16) with_format(Tag<fw::BF16Format>{});
  else with_format(Tag<fw::F16Format>{});
  return {w, e};
}

namespace {

at::Tensor master_weight_any(const at::Tensor& param, const at::Tensor& extra, int64_t extra_bits) {
  if (param.device().is_cpu()) return master_weight_cpu(param, extra, extra_bits);
  // Inspection only: decode on the CPU with the same header, then move back.
  return master_weight_cpu(param.cpu(), extra_bits > 0 ? extra.cpu() : extra, extra_bits).to(param.device());
}

std::tuple<at::Tensor, at::Tensor> master_split_any(const at::Tensor& master, at::ScalarType dtype,
                                                    int64_t extra_bits) {
  if (master.device().is_cpu()) return master_split_cpu(master, dtype, extra_bits);
  // Loading only (never in the step): encode on the CPU with the same header, then move back.
  auto [w, e] = master_split_cpu(master.cpu(), dtype, extra_bits);
  return {w.to(master.device()), e.to(master.device())};
}

// The factors of fw::factors (schedule.cuh) for a tensor of step counters: float32 [..., 4]
// holding warmup, schedule, their product (lr's multiplier) and the adaptive flag (0 during
// RAdam's fallback). `beta2` is ignored where the warmup does not use it.
at::Tensor schedule_factors_cpu(const at::Tensor& steps, double beta2, FW_SCHEDULE_PARAMS) {
  TORCH_CHECK(steps.scalar_type() == at::kLong, "fusedwarm.schedule_factors: steps must be int64, got ",
              steps.scalar_type());
  const fw::Schedule s = parse_schedule("schedule_factors", FW_SCHEDULE_ARGS, beta2, true);
  const at::Tensor c = steps.contiguous();
  std::vector<int64_t> shape = c.sizes().vec();
  shape.push_back(4);
  at::Tensor out = at::empty(shape, c.options().dtype(at::kFloat));
  const int64_t* in = c.const_data_ptr<int64_t>();
  float* o = out.data_ptr<float>();
  for (int64_t i = 0; i < c.numel(); ++i) {
    const fw::Factors f = fw::factors(s, in[i]);
    o[4 * i] = f.warmup;
    o[4 * i + 1] = f.schedule;
    o[4 * i + 2] = f.lr;
    o[4 * i + 3] = f.adaptive;
  }
  return out;
}

// The layer-1 transcendental helpers, elementwise on float32, for tests against libm:
// fn = "exp_neg" (e^x, x <= 0) or "cospi" (cos(pi u), u in [0, 1]).
at::Tensor schedule_math_cpu(const at::Tensor& x, c10::string_view fn) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, "fusedwarm.schedule_math: x must be float32, got ", x.scalar_type());
  TORCH_CHECK(fn == "exp_neg" || fn == "cospi", "fusedwarm.schedule_math: fn must be 'exp_neg' or 'cospi', got '",
              std::string(fn), "'");
  const at::Tensor c = x.contiguous();
  at::Tensor out = at::empty_like(c);
  const float* in = c.const_data_ptr<float>();
  float* o = out.data_ptr<float>();
  const bool is_exp = fn == "exp_neg";
  for (int64_t i = 0; i < c.numel(); ++i) o[i] = is_exp ? fw::exp_neg(in[i]) : fw::cospi(in[i]);
  return out;
}

// Philox4x32-10 of counters [N, 4] (int64 holding uint32 words) with a 64-bit key: the
// generator of update.cuh, exposed so tests can check it against published answers.
at::Tensor philox4x32_cpu(const at::Tensor& counters, int64_t key) {
  TORCH_CHECK(counters.dim() == 2 && counters.size(1) == 4 && counters.scalar_type() == at::kLong,
              "fusedwarm.philox4x32: counters must be an int64 tensor of shape [N, 4], got ", counters.scalar_type(),
              counters.sizes());
  const at::Tensor c = counters.contiguous();
  at::Tensor out = at::empty_like(c);
  const int64_t* in = c.data_ptr<int64_t>();
  int64_t* o = out.data_ptr<int64_t>();
  for (int64_t i = 0; i < c.size(0); ++i) {
    const fw::U32x4 r = fw::philox4x32_10(
        fw::U32x4{static_cast<uint32_t>(in[4 * i]), static_cast<uint32_t>(in[4 * i + 1]),
                  static_cast<uint32_t>(in[4 * i + 2]), static_cast<uint32_t>(in[4 * i + 3])},
        static_cast<uint32_t>(key), static_cast<uint32_t>(static_cast<uint64_t>(key) >> 32));
    o[4 * i] = r.x;
    o[4 * i + 1] = r.y;
    o[4 * i + 2] = r.z;
    o[4 * i + 3] = r.w;
  }
  return out;
}

// Quantized states' codes (quant.cuh) of float32 `values`, block by block, each element rounded
// with its random word (int32 holding the uint32 word; 0x80000000 everywhere rounds to nearest,
// ties up): the step's encoder, exposed for checkpoint conversion and for tests against the
// reference. `is_signed` selects the first state's code (m), else the second's (v).
template <class S, class Code>
std::tuple<at::Tensor, at::Tensor> quantize_with(const at::Tensor& values, const at::Tensor& words, int64_t block) {
  const int64_t n = values.numel();
  const at::Tensor v = values.contiguous();
  const at::Tensor r = words.contiguous();
  at::Tensor codes = at::zeros({S::kBits == 8 ? n : (n + 1) / 2}, v.options().dtype(at::kByte));
  at::Tensor scales = at::empty({(n + block - 1) / block}, v.options());
  const float* x = v.const_data_ptr<float>();
  const uint32_t* rnd = reinterpret_cast<const uint32_t*>(r.const_data_ptr<int32_t>());
  uint8_t* out = codes.data_ptr<uint8_t>();
  float* sc = scales.data_ptr<float>();
  for (int64_t first = 0; first < n; first += block) {
    const int64_t last = std::min(n, first + block);
    uint32_t largest = 0;
    for (int64_t k = first; k < last; ++k) largest = std::max(largest, fw::saturated_magnitude(x[k]));
    sc[first / block] = Code::block_scale(largest);
    const float inv = Code::block_inverse(largest);
    for (int64_t k = first; k < last; ++k) S::put_code(out, k, Code::encode(x[k], inv, rnd[k]));
  }
  return {codes, scales};
}

void check_quantization(const char* op, int64_t bits, int64_t block) {
  TORCH_CHECK(bits == 8 || bits == 4, "fusedwarm.", op, ": bits must be 8 or 4, got ", bits);
  TORCH_CHECK(block >= fw::kMinQuantBlock && block <= fw::kMaxQuantBlock && (block & (block - 1)) == 0,
              "fusedwarm.", op, ": block must be a power of two from ", fw::kMinQuantBlock, " to ", fw::kMaxQuantBlock,
              ", got ", block);
}

std::tuple<at::Tensor, at::Tensor> quantize_states_cpu(const at::Tensor& values, const at::Tensor& words, int64_t bits,
                                                       bool is_signed, int64_t block) {
  check_quantization("quantize_states", bits, block);
  TORCH_CHECK(values.scalar_type() == at::kFloat && words.scalar_type() == at::kInt &&
                  words.numel() == values.numel(),
              "fusedwarm.quantize_states: values must be float32 and words int32 with as many elements, got ",
              values.scalar_type(), " with ", values.numel(), " and ", words.scalar_type(), " with ", words.numel());
  using Q8 = fw::StateQuant<8>;
  using Q4 = fw::StateQuant<4>;
  if (bits == 8) {
    return is_signed ? quantize_with<Q8, Q8::Code0>(values, words, block)
                     : quantize_with<Q8, Q8::Code1>(values, words, block);
  }
  return is_signed ? quantize_with<Q4, Q4::Code0>(values, words, block)
                   : quantize_with<Q4, Q4::Code1>(values, words, block);
}

// The float32 values of quantized states: the inverse of quantize_states (up to its rounding).
at::Tensor dequantize_states_cpu(const at::Tensor& codes, const at::Tensor& scales, int64_t numel, int64_t bits,
                                 bool is_signed, int64_t block) {
  check_quantization("dequantize_states", bits, block);
  const int64_t expected_codes = bits == 8 ? numel : (numel + 1) / 2;
  const int64_t blocks = (numel + block - 1) / block;
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.numel() == expected_codes &&
                  scales.scalar_type() == at::kFloat && scales.numel() == blocks,
              "fusedwarm.dequantize_states: ", numel, " elements need ", expected_codes, " uint8 codes and ", blocks,
              " float32 scales, got ", codes.scalar_type(), " with ", codes.numel(), " and ", scales.scalar_type(),
              " with ", scales.numel());
  const at::Tensor c = codes.contiguous();
  const at::Tensor s = scales.contiguous();
  at::Tensor out = at::empty({numel}, s.options());
  const uint8_t* in = c.const_data_ptr<uint8_t>();
  const float* sc = s.const_data_ptr<float>();
  float* o = out.data_ptr<float>();
  const int shift = __builtin_ctzll(static_cast<uint64_t>(block));
  auto decode = [&](auto state_tag, auto code_tag) {
    using S = typename decltype(state_tag)::type;
    using Code = typename decltype(code_tag)::type;
    for (int64_t k = 0; k < numel; ++k) o[k] = Code::decode(S::code_at(in, k), sc[k >> shift]);
  };
  using Q8 = fw::StateQuant<8>;
  using Q4 = fw::StateQuant<4>;
  if (bits == 8) {
    is_signed ? decode(Tag<Q8>{}, Tag<Q8::Code0>{}) : decode(Tag<Q8>{}, Tag<Q8::Code1>{});
  } else {
    is_signed ? decode(Tag<Q4>{}, Tag<Q4::Code0>{}) : decode(Tag<Q4>{}, Tag<Q4::Code1>{});
  }
  return out;
}

// Checkpoint conversion and tests only (never in the step): on the CPU, then moved back.
std::tuple<at::Tensor, at::Tensor> quantize_states_any(const at::Tensor& values, const at::Tensor& words, int64_t bits,
                                                       bool is_signed, int64_t block) {
  auto [codes, scales] = quantize_states_cpu(values.cpu(), words.cpu(), bits, is_signed, block);
  return {codes.to(values.device()), scales.to(values.device())};
}

at::Tensor dequantize_states_any(const at::Tensor& codes, const at::Tensor& scales, int64_t numel, int64_t bits,
                                 bool is_signed, int64_t block) {
  return dequantize_states_cpu(codes.cpu(), scales.cpu(), numel, bits, is_signed, block).to(codes.device());
}

}  // namespace

TORCH_LIBRARY(fusedwarm, m) { define_ops(m); }

TORCH_LIBRARY_IMPL(fusedwarm, CPU, m) {
  m.impl("adamw_", &OpImpls<CpuBackend>::adamw_);
  m.impl("sgd_", &OpImpls<CpuBackend>::sgd_);
  m.impl("lion_", &OpImpls<CpuBackend>::lion_);
  m.impl("philox4x32", &philox4x32_cpu);
  m.impl("schedule_factors", &schedule_factors_cpu);
  m.impl("schedule_math", &schedule_math_cpu);
  m.impl("pam_mul", &PamImpls<PamCpu>::mul);
  m.impl("pam_div", &PamImpls<PamCpu>::div);
  m.impl("pam_sqrt", &PamImpls<PamCpu>::sqrt);
  m.impl("pam_exp2", &PamImpls<PamCpu>::exp2);
  m.impl("pam_log2", &PamImpls<PamCpu>::log2);
  m.impl("pam_matmul", &PamImpls<PamCpu>::matmul);
}

TORCH_LIBRARY_IMPL(fusedwarm, CompositeExplicitAutograd, m) {
  m.impl("master_weight", &master_weight_any);
  m.impl("master_split", &master_split_any);
  m.impl("quantize_states", &quantize_states_any);
  m.impl("dequantize_states", &dequantize_states_any);
}

}  // namespace fusedwarm
