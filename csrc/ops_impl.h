// The operator implementations, generic over a backend (CPU or CUDA). A backend provides
//   template <class Rule> static void run(const StepLists&, const typename Rule::Hyper&);
// Everything else (argument packing, checks, hyperparameter conversion) is shared here so both
// dispatch keys behave identically.
#pragma once
#include "step_args.h"

namespace torch {
class Library;
}

namespace fusedwarm {

// Defines the schemas of every fusedwarm op in `m` (ops_common.cpp).
void define_ops(torch::Library& m);

StepLists make_step_lists(at::TensorList params, at::TensorList grads, at::TensorList extras,
                          std::vector<at::TensorList> states, at::TensorList steps, at::IntArrayRef tensor_ids,
                          const std::optional<at::Tensor>& lr_tensor, double lr, int64_t extra_bits, int64_t seed,
                          const std::optional<at::Tensor>& grad_scales, const std::optional<at::Tensor>& nonfinite);

// The schedule arguments of an op (appended to every step op's schema), checked, as the layer-1
// fw::Schedule. `beta2` is the rule's second-moment (AdamW) or momentum (Lion) EMA coefficient,
// which "untuned" and "untuned-exp" derive their length from, or nullopt when the rule has none
// (SGD); `radam` says whether the rule has the second moment that "radam" rectifies.
fw::Schedule parse_schedule(const char* op, c10::string_view warmup, int64_t warmup_steps, double warmup_start,
                            int64_t total_steps, int64_t decay_steps, c10::string_view decay_shape,
                            double final_fraction, std::optional<double> beta2, bool radam);

// Schedule arguments in schema order, as each op receives them.
#define FW_SCHEDULE_PARAMS                                                                               \
  c10::string_view warmup, int64_t warmup_steps, double warmup_start, int64_t total_steps, int64_t decay_steps, \
      c10::string_view decay_shape, double final_fraction
#define FW_SCHEDULE_ARGS warmup, warmup_steps, warmup_start, total_steps, decay_steps, decay_shape, final_fraction

// Update-size control arguments (appended after the schedule's and the rule's own).
#define FW_CONTROL_PARAMS \
  std::optional<double> update_norm, at::OptionalIntArrayRef update_rows, bool rotational
#define FW_CONTROL_ARGS update_norm, update_rows, rotational
// The shards' element offsets (see StepLists::element_offsets), then the states' quantization
// (StepLists::state_bits) and whether the op increments the step counters (StepLists::increment_steps):
// the last arguments of every step op.
#define FW_SHARD_PARAMS \
  at::OptionalIntArrayRef element_offsets, std::optional<at::TensorList> state_scales, int64_t state_bits, \
      int64_t state_block, bool increment_steps

// Checks the update-size control arguments against the call's tensors and stores them in L.
// `eq_coef` is the rule's equilibrium coefficient (eta^2 / lr, used when rotational).
void set_update_control(const char* op, StepLists& L, std::optional<double> update_norm,
                        at::OptionalIntArrayRef update_rows, bool rotational, double eq_coef);

// Checks the shards' element offsets (one per tensor, >= 0) and stores them in L.
void set_element_offsets(const char* op, StepLists& L, at::OptionalIntArrayRef element_offsets);

// Stores the states' quantization in L (before check_step_lists, which checks the state tensors
// against it): `state_scales` holds the block scales of state j of tensor i at j * n + i.
void set_state_quantization(const char* op, StepLists& L, std::optional<at::TensorList> state_scales,
                            int64_t state_bits, int64_t state_block);

// The equilibrium angular updates of Kosson et al. 2024 (Rotational Equilibrium, Table 1), as
// eta^2 / lr: AdamW sqrt(2 lr wd (1 - b1) / (1 + b1)), SGD sqrt(2 lr wd / (1 + momentum)), Lion
// sqrt(pi / 2) sqrt(2 lr wd) sqrt((1 - b1)^2 + b1^2 (1 - b2) / (1 + b2)).
inline double adamw_eq_coef(double beta1, double wd) { return 2.0 * wd * (1.0 - beta1) / (1.0 + beta1); }
inline double sgd_eq_coef(double momentum, double wd) { return 2.0 * wd / (1.0 + momentum); }
inline double lion_eq_coef(double beta1, double beta2, double wd) {
  const double pi = 3.14159265358979323846;
  return pi * wd * ((1.0 - beta1) * (1.0 - beta1) + beta1 * beta1 * (1.0 - beta2) / (1.0 + beta2));
}

template <class Backend>
struct OpImpls {
  static void adamw_(at::TensorList params, at::TensorList grads, at::TensorList extras, at::TensorList exp_avgs,
                     at::TensorList exp_avg_sqs, at::TensorList steps, at::IntArrayRef tensor_ids,
                     const std::optional<at::Tensor>& lr_tensor, double lr, int64_t extra_bits, int64_t seed,
                     double beta1, double beta2, double eps, double weight_decay, bool maximize,
                     c10::string_view arithmetic, const std::optional<at::Tensor>& grad_scales,
                     const std::optional<at::Tensor>& nonfinite, FW_SCHEDULE_PARAMS, c10::string_view v_init,
                     FW_CONTROL_PARAMS, FW_SHARD_PARAMS) {
    TORCH_CHECK(v_init == "zero" || v_init == "grad", "fusedwarm.adamw_: v_init must be 'zero' or 'grad', got '",
                std::string(v_init), "'");
    TORCH_CHECK(!(v_init == "grad" && warmup == "radam"), "fusedwarm.adamw_: v_init='grad' and warmup='radam' ",
                "cannot be combined: both correct the zero-initialized second moment, choose one");
    StepLists L = make_step_lists(params, grads, extras, {exp_avgs, exp_avg_sqs}, steps, tensor_ids, lr_tensor,
                                  lr, extra_bits, seed, grad_scales, nonfinite);
    L.increment_steps = increment_steps;
    L.pam = parse_arithmetic("adamw_", arithmetic);
    set_state_quantization("adamw_", L, state_scales, state_bits, state_block);
    check_step_lists("adamw_", L, fw::AdamW::kStates);
    set_update_control("adamw_", L, FW_CONTROL_ARGS, adamw_eq_coef(beta1, weight_decay));
    set_element_offsets("adamw_", L, element_offsets);
    const fw::AdamW::Hyper h{static_cast<float>(beta1),       static_cast<float>(beta2),
                             static_cast<float>(1.0 - beta1), static_cast<float>(1.0 - beta2),
                             static_cast<float>(eps),         static_cast<float>(rotational ? 0.0 : weight_decay),
                             maximize,
                             v_init == "grad",
                             parse_schedule("adamw_", FW_SCHEDULE_ARGS, beta2, true)};
    Backend::template run<fw::AdamW>(L, h);
  }

  static void sgd_(at::TensorList params, at::TensorList grads, at::TensorList extras,
                   at::TensorList momentum_buffers, at::TensorList steps, at::IntArrayRef tensor_ids,
                   const std::optional<at::Tensor>& lr_tensor, double lr, int64_t extra_bits, int64_t seed,
                   double momentum, double dampening, double weight_decay, bool nesterov, bool maximize,
                   c10::string_view arithmetic, const std::optional<at::Tensor>& grad_scales,
                   const std::optional<at::Tensor>& nonfinite, FW_SCHEDULE_PARAMS, FW_CONTROL_PARAMS,
                   FW_SHARD_PARAMS) {
    const bool pam = parse_arithmetic("sgd_", arithmetic);
    const fw::SGD::Hyper h{static_cast<float>(momentum), static_cast<float>(1.0 - dampening),
                           static_cast<float>(rotational ? 0.0 : weight_decay), nesterov, maximize,
                           parse_schedule("sgd_", FW_SCHEDULE_ARGS, std::nullopt, false)};
    if (momentum == 0.0) {
      StepLists L = make_step_lists(params, grads, extras, {}, steps, tensor_ids, lr_tensor, lr, extra_bits, seed,
                                    grad_scales, nonfinite);
      L.increment_steps = increment_steps;
      L.pam = pam;
      set_state_quantization("sgd_", L, std::nullopt, state_bits, state_block);
      check_step_lists("sgd_", L, fw::SGD::kStates);
      set_update_control("sgd_", L, FW_CONTROL_ARGS, sgd_eq_coef(momentum, weight_decay));
      set_element_offsets("sgd_", L, element_offsets);
      Backend::template run<fw::SGD>(L, h);
    } else {
      StepLists L = make_step_lists(params, grads, extras, {momentum_buffers}, steps, tensor_ids, lr_tensor, lr,
                                    extra_bits, seed, grad_scales, nonfinite);
      L.increment_steps = increment_steps;
      L.pam = pam;
      set_state_quantization("sgd_", L, state_scales, state_bits, state_block);
      check_step_lists("sgd_", L, fw::SGDMomentum::kStates);
      set_update_control("sgd_", L, FW_CONTROL_ARGS, sgd_eq_coef(momentum, weight_decay));
      set_element_offsets("sgd_", L, element_offsets);
      Backend::template run<fw::SGDMomentum>(L, h);
    }
  }

  static void lion_(at::TensorList params, at::TensorList grads, at::TensorList extras, at::TensorList exp_avgs,
                    at::TensorList steps, at::IntArrayRef tensor_ids, const std::optional<at::Tensor>& lr_tensor,
                    double lr, int64_t extra_bits, int64_t seed, double beta1, double beta2, double weight_decay,
                    bool maximize, c10::string_view arithmetic, const std::optional<at::Tensor>& grad_scales,
                    const std::optional<at::Tensor>& nonfinite, FW_SCHEDULE_PARAMS, FW_CONTROL_PARAMS,
                   FW_SHARD_PARAMS) {
    StepLists L = make_step_lists(params, grads, extras, {exp_avgs}, steps, tensor_ids, lr_tensor, lr, extra_bits,
                                  seed, grad_scales, nonfinite);
    L.increment_steps = increment_steps;
    L.pam = parse_arithmetic("lion_", arithmetic);
    set_state_quantization("lion_", L, state_scales, state_bits, state_block);
    check_step_lists("lion_", L, fw::Lion::kStates);
    set_update_control("lion_", L, FW_CONTROL_ARGS, lion_eq_coef(beta1, beta2, weight_decay));
    set_element_offsets("lion_", L, element_offsets);
    const fw::Lion::Hyper h{static_cast<float>(beta1),       static_cast<float>(beta2),
                            static_cast<float>(1.0 - beta1), static_cast<float>(1.0 - beta2),
                            static_cast<float>(rotational ? 0.0 : weight_decay), maximize,
                            parse_schedule("lion_", FW_SCHEDULE_ARGS, beta2, false)};
    Backend::template run<fw::Lion>(L, h);
  }
};

}  // namespace fusedwarm
