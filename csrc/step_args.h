// Operator-level view of one fused step: the tensor lists of a call, checked, plus the
// runtime-to-template dispatch shared by the CPU backend and the CUDA host adapter.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <optional>
#include <string>
#include <vector>

#include "step_abi.h"

namespace fusedwarm {

struct StepLists {
  std::vector<at::Tensor> params, grads, extras, steps;
  std::vector<std::vector<at::Tensor>> states;  // states[j][i]: state j of tensor i
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
};

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
// e.g. "adamw.bf16x16.bf16.ieee" (weights f32, bf16x0/8/16 or f16x0/8/16; states f32 or bf16).
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

// Calls fn(Tag<fw::Ieee>{}) or fn(Tag<fw::Pam>{}) for the call's element arithmetic.
template <class Fn>
void dispatch_arithmetic(const StepLists& L, Fn&& fn);

// Checks list lengths, devices, dtypes, sizes and contiguity; names the offending tensor.
void check_step_lists(const char* op, const StepLists& L, int num_states);

template <class T>
struct Tag {
  using type = T;
};

template <class Fn>
void dispatch_arithmetic(const StepLists& L, Fn&& fn) {
  if (L.pam) {
    fn(Tag<fw::Pam>{});
  } else {
    fn(Tag<fw::Ieee>{});
  }
}

// Calls fn(Tag<Param>{}, Tag<State>{}) with the storage kinds of the call's tensors.
template <class Fn>
void dispatch_storage(const StepLists& L, Fn&& fn) {
  if (L.params.empty()) return;
  const auto pdt = L.params[0].scalar_type();
  const bool bf16_state =
      !L.states.empty() && !L.states[0].empty() && L.states[0][0].scalar_type() == at::kBFloat16;
  auto with_param = [&](auto ptag) {
    if (bf16_state) {
      fn(ptag, Tag<fw::StateBF16>{});
    } else {
      fn(ptag, Tag<fw::StateF32>{});
    }
  };
  auto with_half = [&](auto ftag) {
    using F = typename decltype(ftag)::type;
    switch (L.extra_bits) {
      case 0: with_param(Tag<fw::ParamHalf<F, 0>>{}); break;
      case 8: with_param(Tag<fw::ParamHalf<F, 8>>{}); break;
      case 16: with_param(Tag<fw::ParamHalf<F, 16>>{}); break;
      default: TORCH_CHECK(false, "fusedwarm: extra_bits must be 0, 8 or 16, got ", L.extra_bits);
    }
  };
  switch (pdt) {
    case at::kFloat: with_param(Tag<fw::ParamF32>{}); break;
    case at::kBFloat16: with_half(Tag<fw::BF16Format>{}); break;
    case at::kHalf: with_half(Tag<fw::F16Format>{}); break;
    default: TORCH_CHECK(false, "fusedwarm: parameters must be float32, bfloat16 or float16, got ", pdt);
  }
}

// The runtime-to-template step of both backends' run: calls fn(Tag<Param>{}, Tag<State>{},
// Tag<Arithmetic>{}) with the call's parameter storage, state storage and element arithmetic.
template <class Fn>
void dispatch_step(const StepLists& L, Fn&& fn) {
  dispatch_arithmetic(L, [&](auto mtag) { dispatch_storage(L, [&](auto ptag, auto stag) { fn(ptag, stag, mtag); }); });
}

}  // namespace fusedwarm
