// Operator-level view of one fused step: the tensor lists of a call, checked, and what the CPU
// backend and the CUDA host adapter derive from them (the kernel variant's name, the slot table).
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <optional>
#include <string>
#include <vector>

#include "step_abi.h"

namespace fusedwarm {

// The tensor lists are views of the op's arguments (alive for the call): copying each at::Tensor
// costs a reference count update on its Python object, under the GIL, about a microsecond per
// tensor of a step's host time.
struct StepLists {
  at::TensorList params, grads, extras, steps;
  std::vector<at::TensorList> states;  // states[j][i]: state j of tensor i
  std::vector<int64_t> tensor_ids;
  std::optional<at::Tensor> lr_tensor;
  std::optional<at::Tensor> grad_scales;  // float32 [n]: tensor i's gradient multiplier, or none (1)
  std::optional<at::Tensor> nonfinite;    // int64 [n]: += elements of tensor i skipped, or none
  double lr;
  int64_t extra_bits;
  int64_t seed;
  // Element arithmetic: IEEE fp32, or piecewise-affine (pam.cuh) for multiply, divide and sqrt.
  // The per-tensor scalars (Rule::scalars: bias corrections, decay factor) are IEEE either way.
  bool pam = false;
  // Update-size control (update.cuh, row_coefficients); with a mode other than kControlNone,
  // update_rows[i] is the number of rows tensor i is cut into (1: the whole tensor).
  fw::Control control{fw::kControlNone, 0.0f, 0.0f};
  std::vector<int64_t> update_rows;
  // element_offsets[i]: the index in the full tensor of tensor i's element 0 (a shard's offset),
  // which the random stream keys elements by; empty when no tensor is a shard (all 0).
  std::vector<int64_t> element_offsets;
  // Quantized states (quant.cuh): state_bits 8 or 4 per element in blocks of state_block elements,
  // state_scales[j][i] the block scales of state j of tensor i; state_bits 0 for float32 or
  // bfloat16 states.
  int64_t state_bits = 0;
  int64_t state_block = 0;
  std::vector<at::TensorList> state_scales;
  // Whether the op adds 1 to every step counter itself (increment_steps), once the kernel variant
  // is loaded and just before the update, so that a failure before it leaves the counters as they were.
  bool increment_steps = false;
};

// Adds 1 to every step counter of L if L.increment_steps (see there): written directly on the CPU
// (the per-tensor dispatch of a foreach add costs about a microsecond per tensor), one foreach add
// on the current stream otherwise.
void increment_steps(const StepLists& L);

// The rules' names in variant names (fusedwarm/_build.py maps them back to the types).
template <class Rule>
constexpr const char* kRuleName = nullptr;
template <>
inline constexpr const char* kRuleName<fw::AdamW> = "adamw";
template <>
inline constexpr const char* kRuleName<fw::SGD> = "sgd";
template <>
inline constexpr const char* kRuleName<fw::SGDMomentum> = "sgdm";
template <>
inline constexpr const char* kRuleName<fw::Lion> = "lion";

// The name of the kernel variant a call of `rule` needs, "<rule>.<weights>.<states>.<arithmetic>",
// e.g. "adamw.bf16x16.bf16.ieee" (weights f32, bf16x0/8/16 or f16x0/8/16; states f32, bf16, or
// quantized q8 or q4).
std::string step_variant(const char* rule, const StepLists& L);

// Totals of a call's slot table (fill_slots).
struct SlotTotals {
  int64_t slots = 0;   // non-empty tensors
  int64_t tiles = 0;   // CUDA tiles (tiles_of) over the slots
  int64_t chunks = 0;  // update-size control's chunks and rows over the slots (0 without control)
  int64_t rows = 0;
};

// Writes one TensorSlot per non-empty tensor of L (whose lists are checked, with `num_states`
// state lists) into `slots`, which has room for L.params.size(): the tensors' pointers, and the
// tile, chunk and row numbering of a CUDA launch. row_coef is left null.
SlotTotals fill_slots(const StepLists& L, int num_states, TensorSlot* slots);

// "ieee" -> false, "pam" -> true; anything else is an error naming the op.
bool parse_arithmetic(const char* op, c10::string_view arithmetic);

// Checks list lengths, devices, dtypes, sizes and contiguity; names the offending tensor.
void check_step_lists(const char* op, const StepLists& L, int num_states);

// A type as a value, for generic lambdas (ops.cpp's master-weight codecs).
template <class T>
struct Tag {
  using type = T;
};

}  // namespace fusedwarm
