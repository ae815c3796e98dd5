// Operator surface (layer 3) shared by every library that registers fusedwarm's ops: the
// schemas (with mutation annotations) and the argument checks and packing of the step ops. The
// main library registers them as namespace fusedwarm; the emulated CUDA device (csrc/emu) as
// fusedwarm_emu, so both see the same schemas and reject bad input the same way.
#include <ATen/ops/_foreach_add.h>
#include <torch/library.h>

#include <cmath>

#include "ops_impl.h"

namespace fusedwarm {

StepLists make_step_lists(at::TensorList params, at::TensorList grads, at::TensorList extras,
                          std::vector<at::TensorList> states, at::TensorList steps, at::IntArrayRef tensor_ids,
                          const std::optional<at::Tensor>& lr_tensor, double lr, int64_t extra_bits, int64_t seed,
                          const std::optional<at::Tensor>& grad_scales, const std::optional<at::Tensor>& nonfinite) {
  StepLists L;
  L.params = params;
  L.grads = grads;
  L.extras = extras;
  L.states = std::move(states);
  L.steps = steps;
  L.tensor_ids = tensor_ids.vec();
  L.lr_tensor = lr_tensor;
  L.grad_scales = grad_scales;
  L.nonfinite = nonfinite;
  L.lr = lr;
  L.extra_bits = extra_bits;
  L.seed = seed;
  return L;
}

std::string step_variant(const char* rule, const StepLists& L) {
  std::string name = std::string(rule) + ".";
  const auto pdt = L.params.at(0).scalar_type();
  if (pdt == at::kFloat) {
    name += "f32";
  } else {
    name += (pdt == at::kBFloat16 ? "bf16x" : "f16x") + std::to_string(L.extra_bits);
  }
  const bool bf16_state = !L.states.empty() && !L.states[0].empty() && L.states[0][0].scalar_type() == at::kBFloat16;
  name += L.state_bits != 0 ? ".q" + std::to_string(L.state_bits) : (bf16_state ? ".bf16" : ".f32");
  name += L.pam ? ".pam" : ".ieee";
  return name;
}

void increment_steps(const StepLists& L) {
  if (!L.increment_steps || L.steps.empty()) return;
  if (L.steps[0].device().is_cpu()) {
    for (const at::Tensor& s : L.steps) ++*s.data_ptr<int64_t>();
  } else {
    at::_foreach_add_(L.steps, 1);
  }
}

SlotTotals fill_slots(const StepLists& L, int num_states, TensorSlot* slots) {
  SlotTotals n;
  const bool control = L.control.mode != fw::kControlNone;
  const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % kVectorAlign == 0; };
  for (size_t i = 0; i < L.params.size(); ++i) {
    const int64_t numel = L.params[i].numel();
    if (numel == 0) continue;
    TensorSlot t{};
    t.param = L.params[i].data_ptr();
    t.grad = L.grads[i].const_data_ptr();
    t.extra = L.extras.empty() ? nullptr : L.extras[i].data_ptr();
    for (int j = 0; j < num_states; ++j) t.state[j] = L.states[j][i].data_ptr();
    if (L.state_bits != 0) {
      for (int j = 0; j < num_states; ++j) t.scale[j] = L.state_scales[j][i].data_ptr<float>();
      t.block_shift = static_cast<int32_t>(__builtin_ctzll(static_cast<uint64_t>(L.state_block)));
    }
    t.step = L.steps[i].const_data_ptr<int64_t>();
    t.grad_scale = L.grad_scales ? L.grad_scales->const_data_ptr<float>() + i : nullptr;
    t.nonfinite = L.nonfinite ? L.nonfinite->data_ptr<int64_t>() + i : nullptr;
    t.numel = numel;
    t.first_tile = n.tiles;
    t.tensor_id = static_cast<uint32_t>(L.tensor_ids[i]);
    t.element_offset = L.element_offsets.empty() ? 0 : L.element_offsets[i];
    bool vector = aligned(t.param) && aligned(t.grad) && aligned(t.extra);
    for (int j = 0; j < num_states; ++j) vector = vector && aligned(t.state[j]);
    t.vectorized = vector ? 1u : 0u;
    t.row_size = numel;
    if (control) {
      t.row_size = numel / L.update_rows[i];
      t.chunks_per_row = (t.row_size + fw::kNormChunk - 1) / fw::kNormChunk;
      t.first_chunk = n.chunks;
      t.first_row = n.rows;
      n.chunks += L.update_rows[i] * t.chunks_per_row;
      n.rows += L.update_rows[i];
    }
    n.tiles += tiles_of(numel);
    slots[n.slots++] = t;
  }
  return n;
}

bool parse_arithmetic(const char* op, c10::string_view arithmetic) {
  TORCH_CHECK(arithmetic == "ieee" || arithmetic == "pam", "fusedwarm.", op,
              ": arithmetic must be 'ieee' or 'pam', got '", std::string(arithmetic), "'");
  return arithmetic == "pam";
}

fw::Schedule parse_schedule(const char* op, c10::string_view warmup, int64_t warmup_steps, double warmup_start,
                            int64_t total_steps, int64_t decay_steps, c10::string_view decay_shape,
                            double final_fraction, std::optional<double> beta2, bool radam) {
  fw::Schedule s = fw::constant_schedule();
  const std::string w(warmup);
  TORCH_CHECK(w == "none" || w == "linear" || w == "untuned" || w == "untuned-exp" || w == "radam", "fusedwarm.", op,
              ": warmup must be 'none', 'linear', 'untuned', 'untuned-exp' or 'radam', got '", w, "'");
  TORCH_CHECK(beta2 || (w != "untuned" && w != "untuned-exp"), "fusedwarm.", op, ": warmup='", w,
              "' derives its length from beta2, which this rule does not have; use 'linear' or 'none'");
  TORCH_CHECK(radam || w != "radam", "fusedwarm.", op,
              ": warmup='radam' rectifies Adam's second moment, which this rule does not have");
  if (w == "linear") {
    TORCH_CHECK(warmup_steps > 0, "fusedwarm.", op, ": warmup='linear' needs warmup_steps > 0, got ", warmup_steps);
    TORCH_CHECK(warmup_start >= 0.0 && warmup_start <= 1.0, "fusedwarm.", op,
                ": warmup_start must be in [0, 1], got ", warmup_start);
    s.warmup = fw::kWarmupLinear;
    s.warmup_steps = static_cast<float>(warmup_steps);
    s.warmup_start = static_cast<float>(warmup_start);
  } else if (w == "untuned") {
    s.warmup = fw::kWarmupLinear;
    s.warmup_steps = static_cast<float>(2.0 / (1.0 - *beta2));
    s.warmup_start = 0.0f;
  } else if (w == "untuned-exp") {
    s.warmup = fw::kWarmupExp;
    s.warmup_rate = static_cast<float>(1.0 - *beta2);
  } else if (w == "radam") {
    TORCH_CHECK(*beta2 > 0.6, "fusedwarm.", op, ": warmup='radam' needs beta2 > 0.6 (rho_inf > 4), got ", *beta2);
    s.warmup = fw::kWarmupRAdam;
    s.beta2 = static_cast<float>(*beta2);
  }
  const std::string d(decay_shape);
  TORCH_CHECK(d == "none" || d == "linear" || d == "1-sqrt" || d == "cosine", "fusedwarm.", op,
              ": decay_shape must be 'none', 'linear', '1-sqrt' or 'cosine', got '", d, "'");
  TORCH_CHECK(total_steps >= 0, "fusedwarm.", op, ": total_steps must be >= 0, got ", total_steps);
  TORCH_CHECK(decay_steps >= 0 && decay_steps <= total_steps, "fusedwarm.", op,
              ": decay_steps must be in [0, total_steps=", total_steps, "], got ", decay_steps);
  TORCH_CHECK(final_fraction >= 0.0 && final_fraction <= 1.0, "fusedwarm.", op,
              ": final_fraction must be in [0, 1], got ", final_fraction);
  if (d != "none") {
    TORCH_CHECK(decay_steps > 0, "fusedwarm.", op, ": decay_shape='", d, "' needs decay_steps > 0");
    s.decay_shape = d == "linear" ? fw::kDecayLinear : (d == "1-sqrt" ? fw::kDecaySqrt : fw::kDecayCosine);
    s.total_steps = total_steps;
    s.decay_steps = decay_steps;
    s.final_fraction = static_cast<float>(final_fraction);
  }
  return s;
}

namespace {

void check_dense(const char* op, const char* list, size_t i, const at::Tensor& t, const at::Tensor& p) {
  TORCH_CHECK(t.layout() == at::kStrided, "fusedwarm.", op, ": ", list, "[", i, "] must be a dense (strided) tensor, got ",
              t.layout());
  TORCH_CHECK(t.device() == p.device(), "fusedwarm.", op, ": ", list, "[", i, "] is on ", t.device(),
              " but params[", i, "] is on ", p.device());
  TORCH_CHECK(t.is_contiguous(), "fusedwarm.", op, ": ", list, "[", i, "] must be contiguous");
}

}  // namespace

void check_step_lists(const char* op, const StepLists& L, int num_states) {
  const size_t n = L.params.size();
  TORCH_CHECK(L.extra_bits == 0 || L.extra_bits == 8 || L.extra_bits == 16, "fusedwarm.", op,
              ": extra_bits must be 0, 8 or 16, got ", L.extra_bits);
  TORCH_CHECK(L.grads.size() == n && L.steps.size() == n && L.tensor_ids.size() == n, "fusedwarm.", op,
              ": expected grads, steps and tensor_ids to have one entry per parameter (", n, "), got ",
              L.grads.size(), ", ", L.steps.size(), " and ", L.tensor_ids.size());
  TORCH_CHECK(static_cast<int>(L.states.size()) == num_states, "fusedwarm.", op, ": expected ", num_states,
              " state lists, got ", L.states.size());
  auto check_per_tensor = [&](const std::optional<at::Tensor>& t, const char* name, at::ScalarType dtype) {
    if (!t) return;
    TORCH_CHECK(t->scalar_type() == dtype && t->dim() == 1 && t->numel() == static_cast<int64_t>(n) &&
                    t->is_contiguous() && (n == 0 || t->device() == L.params[0].device()),
                "fusedwarm.", op, ": ", name, " must be a contiguous ", dtype, " tensor of shape [", n, "] on ",
                (n == 0 ? std::string("the parameters' device") : L.params[0].device().str()), ", got ",
                t->scalar_type(), t->sizes(), " on ", t->device());
  };
  check_per_tensor(L.grad_scales, "grad_scales", at::kFloat);
  check_per_tensor(L.nonfinite, "nonfinite", at::kLong);
  if (n == 0) return;
  const at::Tensor& p0 = L.params[0];
  const auto pdt = p0.scalar_type();
  TORCH_CHECK(pdt == at::kFloat || pdt == at::kBFloat16 || pdt == at::kHalf, "fusedwarm.", op,
              ": parameters must be float32, bfloat16 or float16, got ", pdt);
  const bool half = pdt != at::kFloat;
  const bool has_extra = half && L.extra_bits > 0;
  const auto edt = L.extra_bits == 16 ? at::kShort : at::kChar;
  TORCH_CHECK(L.extras.size() == (has_extra ? n : 0), "fusedwarm.", op, ": expected ", (has_extra ? n : 0),
              " extra-bits tensors for ", pdt, " parameters with extra_bits=", L.extra_bits, ", got ",
              L.extras.size());
  const bool quantized = L.state_bits != 0;
  at::ScalarType sdt = quantized ? at::kByte : at::kFloat;
  if (num_states > 0 && !L.states[0].empty()) sdt = L.states[0][0].scalar_type();
  TORCH_CHECK(quantized ? sdt == at::kByte : (sdt == at::kFloat || sdt == at::kBFloat16), "fusedwarm.", op,
              quantized ? ": quantized optimizer states must be uint8 codes, got "
                        : ": optimizer states must be float32 or bfloat16 (or uint8 codes with state_bits), got ",
              sdt);
  if (L.lr_tensor) {
    const at::Tensor& lr = *L.lr_tensor;
    TORCH_CHECK(lr.numel() == 1 && lr.scalar_type() == at::kFloat && lr.device() == p0.device(), "fusedwarm.", op,
                ": lr_tensor must be a one-element float32 tensor on ", p0.device(), ", got ", lr.scalar_type(),
                " with ", lr.numel(), " elements on ", lr.device());
  }
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = L.params[i];
    check_dense(op, "params", i, p, p0);
    TORCH_CHECK(p.scalar_type() == pdt, "fusedwarm.", op, ": params[", i, "] is ", p.scalar_type(),
                " but params[0] is ", pdt, "; one call takes one dtype");
    const at::Tensor& g = L.grads[i];
    check_dense(op, "grads", i, g, p);
    TORCH_CHECK(g.scalar_type() == pdt && g.sizes() == p.sizes(), "fusedwarm.", op, ": grads[", i, "] is ",
                g.scalar_type(), g.sizes(), " but params[", i, "] is ", pdt, p.sizes());
    const at::Tensor& s = L.steps[i];
    TORCH_CHECK(s.numel() == 1 && s.scalar_type() == at::kLong && s.device() == p.device(), "fusedwarm.", op,
                ": steps[", i, "] must be a one-element int64 tensor on ", p.device());
    TORCH_CHECK(L.tensor_ids[i] >= 0 && L.tensor_ids[i] <= 0xFFFFFFFFLL, "fusedwarm.", op, ": tensor_ids[", i,
                "] must fit in 32 bits, got ", L.tensor_ids[i]);
    if (has_extra) {
      const at::Tensor& e = L.extras[i];
      check_dense(op, "extras", i, e, p);
      TORCH_CHECK(e.scalar_type() == edt && e.numel() == p.numel(), "fusedwarm.", op, ": extras[", i,
                  "] must be ", edt, " with ", p.numel(), " elements for extra_bits=", L.extra_bits, ", got ",
                  e.scalar_type(), " with ", e.numel());
    }
    for (int j = 0; j < num_states; ++j) {
      TORCH_CHECK(L.states[j].size() == n, "fusedwarm.", op, ": state list ", j, " has ", L.states[j].size(),
                  " entries, expected ", n);
      const at::Tensor& st = L.states[j][i];
      check_dense(op, "states", i, st, p);
      const int64_t codes = L.state_bits == 4 ? (p.numel() + 1) / 2 : p.numel();
      TORCH_CHECK(st.scalar_type() == sdt && st.numel() == codes, "fusedwarm.", op, ": state ", j, " of params[", i,
                  "] must be ", sdt, " with ", codes, " elements, got ", st.scalar_type(), " with ", st.numel());
      if (quantized) {
        const at::Tensor& sc = L.state_scales[j][i];
        check_dense(op, "state_scales", j * n + i, sc, p);
        const int64_t blocks = (p.numel() + L.state_block - 1) / L.state_block;
        TORCH_CHECK(sc.scalar_type() == at::kFloat && sc.numel() == blocks, "fusedwarm.", op,
                    ": the block scales of state ", j, " of params[", i, "] must be float32 with ", blocks,
                    " elements (blocks of ", L.state_block, "), got ", sc.scalar_type(), " with ", sc.numel());
      }
    }
  }
}

void set_update_control(const char* op, StepLists& L, std::optional<double> update_norm,
                        at::OptionalIntArrayRef update_rows, bool rotational, double eq_coef) {
  TORCH_CHECK(!(rotational && update_norm), "fusedwarm.", op,
              ": rotational=True and update_norm are two update-size controls, choose one");
  TORCH_CHECK((update_norm.has_value() || rotational) == update_rows.has_value(), "fusedwarm.", op,
              ": update_rows goes with update_norm or rotational=True (both or neither)");
  if (!update_rows) return;
  if (update_norm) {
    TORCH_CHECK(std::isfinite(*update_norm) && *update_norm > 0.0, "fusedwarm.", op,
                ": update_norm must be a finite number > 0, got ", *update_norm);
  } else {
    TORCH_CHECK(std::isfinite(eq_coef) && eq_coef > 0.0, "fusedwarm.", op,
                ": rotational=True needs weight_decay > 0 (it sets the equilibrium angular update)");
  }
  const size_t n = L.params.size();
  TORCH_CHECK(update_rows->size() == n, "fusedwarm.", op, ": expected update_rows to have one entry per parameter (",
              n, "), got ", update_rows->size());
  for (size_t i = 0; i < n; ++i) {
    const int64_t rows = (*update_rows)[i];
    const int64_t numel = L.params[i].numel();
    TORCH_CHECK(rows >= 1 && (numel == 0 || numel % rows == 0), "fusedwarm.", op, ": update_rows[", i,
                "] must be >= 1 and divide params[", i, "].numel() = ", numel, ", got ", rows);
  }
  L.control = update_norm ? fw::Control{fw::kControlBound, static_cast<float>(*update_norm), 0.0f}
                          : fw::Control{fw::kControlRotational, 0.0f, static_cast<float>(eq_coef)};
  L.update_rows = update_rows->vec();
}

void set_element_offsets(const char* op, StepLists& L, at::OptionalIntArrayRef element_offsets) {
  if (!element_offsets) return;
  TORCH_CHECK(L.state_bits == 0, "fusedwarm.", op,
              ": quantized states cannot be sharded: their blocks follow the local tensor (element_offsets given)");
  TORCH_CHECK(element_offsets->size() == L.params.size(), "fusedwarm.", op, ": element_offsets has ",
              element_offsets->size(), " entries for ", L.params.size(), " params");
  for (size_t i = 0; i < element_offsets->size(); ++i) {
    TORCH_CHECK((*element_offsets)[i] >= 0, "fusedwarm.", op, ": element_offsets[", i, "] must be >= 0, got ",
                (*element_offsets)[i]);
  }
  L.element_offsets = element_offsets->vec();
}

// The schedule arguments every step op takes last (schedule.cuh; defaults: no warmup, no decay).
#define FW_SCHEDULE_SCHEMA                                                                            \
  "str warmup=\"none\", int warmup_steps=0, float warmup_start=0., int total_steps=0, int decay_steps=0, " \
  "str decay_shape=\"none\", float final_fraction=0."
// Update-size control (update.cuh): off unless update_rows is given with update_norm (bound) or
// rotational=True.
// Then the shards' element offsets in their full tensors (the random stream's element index), or None,
// and quantized states' block scales (state j of tensor i at j n + i), bits (0: not quantized) and
// block size, and whether the op increments the step counters (StepLists::increment_steps).
#define FW_CONTROL_SCHEMA                                                       \
  "float? update_norm=None, int[]? update_rows=None, bool rotational=False, " \
  "int[]? element_offsets=None, Tensor(f!)[]? state_scales=None, int state_bits=0, int state_block=0, " \
  "bool increment_steps=False"

void set_state_quantization(const char* op, StepLists& L, std::optional<at::TensorList> scales, int64_t state_bits,
                            int64_t state_block) {
  const at::TensorList state_scales = scales.value_or(at::TensorList{});
  TORCH_CHECK(state_bits == 0 || state_bits == 8 || state_bits == 4, "fusedwarm.", op,
              ": state_bits must be 0 (float32 or bfloat16 states), 8 or 4, got ", state_bits);
  const int64_t num_states = static_cast<int64_t>(L.states.size());
  if (state_bits == 0 || num_states == 0) {
    TORCH_CHECK(state_scales.empty(), "fusedwarm.", op, ": state_scales given without quantized states");
    return;
  }
  TORCH_CHECK(state_block >= fw::kMinQuantBlock && state_block <= fw::kMaxQuantBlock &&
                  (state_block & (state_block - 1)) == 0,
              "fusedwarm.", op, ": state_block must be a power of two from ", fw::kMinQuantBlock, " to ",
              fw::kMaxQuantBlock, ", got ", state_block);
  const size_t n = L.params.size();
  TORCH_CHECK(static_cast<int64_t>(state_scales.size()) == num_states * static_cast<int64_t>(n), "fusedwarm.", op, ": expected ", num_states * n,
              " state_scales (one per state and parameter), got ", state_scales.size());
  L.state_bits = state_bits;
  L.state_block = state_block;
  for (int64_t j = 0; j < num_states; ++j) {
    L.state_scales.push_back(state_scales.slice(j * n, n));
  }
}

void define_ops(torch::Library& m) {
  m.def(
      "adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] extras, Tensor(c!)[] exp_avgs, "
      "Tensor(d!)[] exp_avg_sqs, Tensor(g!)[] steps, int[] tensor_ids, Tensor? lr_tensor, float lr, int extra_bits, "
      "int seed, float beta1, float beta2, float eps, float weight_decay, bool maximize, str arithmetic=\"ieee\", "
      "Tensor? grad_scales=None, Tensor(e!)? nonfinite=None, " FW_SCHEDULE_SCHEMA ", str v_init=\"zero\", " FW_CONTROL_SCHEMA
      ") -> ()");
  m.def(
      "sgd_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] extras, Tensor(c!)[] momentum_buffers, "
      "Tensor(g!)[] steps, int[] tensor_ids, Tensor? lr_tensor, float lr, int extra_bits, int seed, float momentum, "
      "float dampening, float weight_decay, bool nesterov, bool maximize, str arithmetic=\"ieee\", "
      "Tensor? grad_scales=None, Tensor(e!)? nonfinite=None, " FW_SCHEDULE_SCHEMA ", " FW_CONTROL_SCHEMA ") -> ()");
  m.def(
      "lion_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] extras, Tensor(c!)[] exp_avgs, Tensor(g!)[] steps, "
      "int[] tensor_ids, Tensor? lr_tensor, float lr, int extra_bits, int seed, float beta1, float beta2, "
      "float weight_decay, bool maximize, str arithmetic=\"ieee\", Tensor? grad_scales=None, "
      "Tensor(e!)? nonfinite=None, " FW_SCHEDULE_SCHEMA ", " FW_CONTROL_SCHEMA ") -> ()");
  m.def("schedule_factors(Tensor steps, float beta2, " FW_SCHEDULE_SCHEMA ") -> Tensor");
  m.def("schedule_math(Tensor x, str fn) -> Tensor");
  m.def("master_weight(Tensor param, Tensor extra, int extra_bits) -> Tensor");
  m.def("master_split(Tensor master, ScalarType dtype, int extra_bits) -> (Tensor, Tensor)");
  m.def("philox4x32(Tensor counters, int key) -> Tensor");
  // Quantized states (quant.cuh): float32 values <-> uint8 codes and float32 block scales.
  m.def("quantize_states(Tensor values, Tensor words, int bits, bool is_signed, int block) -> (Tensor, Tensor)");
  m.def("dequantize_states(Tensor codes, Tensor scales, int numel, int bits, bool is_signed, int block) -> Tensor");
  // Piecewise-affine arithmetic (Kosson & Jaggi 2023; pam.cuh): float32 in, float32 out.
  m.def("pam_mul(Tensor a, Tensor b) -> Tensor");
  m.def("pam_div(Tensor a, Tensor b) -> Tensor");
  m.def("pam_sqrt(Tensor a) -> Tensor");
  m.def("pam_exp2(Tensor a) -> Tensor");
  m.def("pam_log2(Tensor a) -> Tensor");
  m.def("pam_matmul(Tensor a, Tensor b) -> Tensor");
}

}  // namespace fusedwarm
