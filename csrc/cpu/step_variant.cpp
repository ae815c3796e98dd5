// CPU backend (layer 2 of DESIGN.md): one step variant, the translation unit fusedwarm/_build.py
// compiles into a small shared library the first time a step needs it, with the variant's types
// given as macros (FW_RULE, FW_PARAM, FW_STATE, FW_ARITH: see cuda/step_variant.cu). It loops over
// the call's tensors and, in parallel, over their elements; all math is in
// include/fusedwarm/update.cuh. Torch-free (step_abi.h is its whole interface), so a variant
// compiles in seconds and links against nothing.
#include <algorithm>
#include <atomic>
#include <type_traits>
#include <vector>

#include "cpu/chunk.h"
#include "step_abi.h"

#if !defined(FW_RULE) || !defined(FW_PARAM) || !defined(FW_STATE) || !defined(FW_ARITH)
#error "cpu/step_variant.cpp needs FW_RULE, FW_PARAM, FW_STATE and FW_ARITH (see fusedwarm/_build.py)"
#endif

namespace fusedwarm {

namespace {

// A step's elements are shared among torch's threads in pieces of 2^14 to 2^17 elements (at least
// eight pieces from 128K elements up), which the threads take in turn from a counter until none is
// left; a step under 2^14 elements runs on the calling thread. Not a fixed share per thread: the
// threads are not always equally fast (on a 2-vCPU VM the same loop on one thread in cache ran at
// 0.61 or 0.79 ns per element from one second to the next), and with halves the faster thread
// waited at the end of each step (16M parameters: 15% of the samples in OpenMP's barrier, steps
// 0-12% slower than with pieces).
constexpr int64_t kMinPiece = int64_t{1} << 14;
constexpr int64_t kMaxPiece = int64_t{1} << 17;

int64_t piece_length(int64_t total) {
  return std::max(kMinPiece, std::min(kMaxPiece, total / 8)) / kScanSpan * kScanSpan;
}

// The torch-facing library's at::parallel_for, with a lambda as the body.
template <class F>
void parallel_for(const CpuStepCall& call, int64_t begin, int64_t end, int64_t grain, F&& f) {
  using Body = std::remove_reference_t<F>;
  call.parallel_for(begin, end, grain, [](void* c, int64_t b, int64_t e) { (*static_cast<Body*>(c))(b, e); },
                    static_cast<void*>(&f));
}

// body(begin, end) over [0, total) in pieces of `piece`, taken in turn by torch's threads (see
// kMaxPiece). One piece runs on the calling thread alone.
template <class F>
void parallel_pieces(const CpuStepCall& call, int64_t total, int64_t piece, F&& body) {
  const int64_t pieces = (total + piece - 1) / piece;
  std::atomic<int64_t> next{0};
  parallel_for(call, 0, pieces, 1, [&](int64_t, int64_t) {
    for (int64_t p = next.fetch_add(1, std::memory_order_relaxed); p < pieces;
         p = next.fetch_add(1, std::memory_order_relaxed)) {
      body(p * piece, std::min(total, (p + 1) * piece));
    }
  });
}

// The update-size control's coefficients of each row (update.cuh, row_coefficients), with the
// sums in the order fixed there: chunk sums in parallel, then each row adds its chunks in order.
template <class Rule, class P, class S, class M>
std::vector<fw::RowCoef> row_coefficients(const CpuStepCall& call, const typename Rule::Scalars& sc, const fw::Control& control, float lr,
                                          float grad_scale, int64_t n, int64_t row_size,
                                          const typename P::storage* w, const typename P::storage* g,
                                          const typename P::extra_storage* ext, const typename S::storage* s0,
                                          const typename S::storage* s1, const float* scale0, const float* scale1,
                                          int block_shift) {
  const int64_t rows = n / row_size;
  const int64_t per_row = (row_size + fw::kNormChunk - 1) / fw::kNormChunk;
  std::vector<fw::NormSums> partial(static_cast<size_t>(rows * per_row));
  parallel_for(call, 0, rows * per_row, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t row = c / per_row;
      const int64_t first = row * row_size + (c % per_row) * fw::kNormChunk;
      const int64_t last = std::min(first + fw::kNormChunk, (row + 1) * row_size);
      fw::NormSums sums{0.0f, 0.0f, 0.0f};
      for (int64_t k = first; k < last; ++k) {
        float p0, u;
        fw::element_delta<Rule, P, M>(sc, w[k], P::K > 0 ? static_cast<int32_t>(ext[k]) : 0, g[k], grad_scale,
                                      Rule::kStates > 0 ? fw::load_state<S, 0>(s0, scale0, block_shift, k) : 0.0f,
                                      Rule::kStates > 1 ? fw::load_state<S, 1>(s1, scale1, block_shift, k) : 0.0f,
                                      p0, u);
        fw::norm_accumulate(sums, p0, u);
      }
      partial[c] = sums;
    }
  });
  std::vector<fw::RowCoef> coefs(static_cast<size_t>(rows));
  for (int64_t row = 0; row < rows; ++row) {
    fw::NormSums sums{0.0f, 0.0f, 0.0f};
    for (int64_t j = 0; j < per_row; ++j) fw::norm_accumulate_chunk(sums, partial[row * per_row + j]);
    coefs[row] = fw::row_coefficients(control, lr, sums);
  }
  return coefs;
}

// One tensor of a call, as the element loop needs it.
template <class Rule, class P, class S>
struct TensorWork {
  int64_t* nonfinite;  // TensorSlot::nonfinite
  typename Rule::Scalars sc;
  uint64_t step;
  uint32_t tensor_id;
  int64_t offset;  // the index of element 0 in the full tensor (TensorSlot::element_offset)
  float grad_scale;
  bool plain;  // Rule::is_plain(sc) and grad_scale 1: run_chunk's kPlain loop
  int64_t row_size;
  typename P::storage* w;
  const typename P::storage* g;
  typename P::extra_storage* ext;
  typename S::storage* s0;
  typename S::storage* s1;
  float* scale0;  // quantized states: block scales (TensorSlot::scale)
  float* scale1;
  int block_shift;
  std::vector<fw::RowCoef> coefs;  // one per row
};

// The per-tensor part of a call, shared by the element loop and the quantized block loop.
template <class Rule, class P, class S, class M>
TensorWork<Rule, P, S> tensor_work(const CpuStepCall& call, const TensorSlot& slot) {
  const typename Rule::Hyper& h = *static_cast<const typename Rule::Hyper*>(call.hyper);
  constexpr int kS = Rule::kStates;
  const int64_t step = *slot.step;
  TensorWork<Rule, P, S> t;
  t.nonfinite = slot.nonfinite;
  t.sc = Rule::template scalars<fw::Ieee>(h, call.lr, step);
  t.step = static_cast<uint64_t>(step);
  t.tensor_id = slot.tensor_id;
  t.offset = slot.element_offset;
  t.grad_scale = slot.grad_scale != nullptr ? *slot.grad_scale : 1.0f;
  t.plain = t.grad_scale == 1.0f && Rule::is_plain(t.sc);
  t.row_size = slot.row_size;
  t.w = static_cast<typename P::storage*>(slot.param);
  t.g = static_cast<const typename P::storage*>(slot.grad);
  t.ext = P::K > 0 ? static_cast<typename P::extra_storage*>(slot.extra) : nullptr;
  t.s0 = kS > 0 ? static_cast<typename S::storage*>(slot.state[0]) : nullptr;
  t.s1 = kS > 1 ? static_cast<typename S::storage*>(slot.state[1]) : nullptr;
  t.scale0 = kS > 0 ? slot.scale[0] : nullptr;
  t.scale1 = kS > 1 ? slot.scale[1] : nullptr;
  t.block_shift = slot.block_shift;
  t.coefs = call.control.mode != fw::kControlNone
                ? row_coefficients<Rule, P, S, M>(call, t.sc, call.control, fw::effective_lr(h.schedule, call.lr, step),
                                                  t.grad_scale, slot.numel, t.row_size, t.w, t.g, t.ext, t.s0, t.s1,
                                                  t.scale0, t.scale1, t.block_shift)
                : std::vector<fw::RowCoef>{fw::RowCoef{1.0f, 1.0f}};
  return t;
}

// All tensors of a call run in one parallel loop over their concatenated elements, so that
// threads start and join once per call, not once per tensor, and small tensors (biases, norms)
// share the threads with large ones instead of running alone.
template <class Rule, class P, class S, class M>
void run_typed(const CpuStepCall& call) {
  const uint64_t seed = call.seed;
  std::vector<TensorWork<Rule, P, S>> work;
  std::vector<int64_t> start{0};  // work[j] holds elements [start[j], start[j + 1]) of the concatenation
  for (int64_t i = 0; i < call.num_slots; ++i) {
    work.push_back(tensor_work<Rule, P, S, M>(call, call.slots[i]));
    start.push_back(start.back() + call.slots[i].numel);
  }
  if (work.empty()) return;
  std::vector<std::atomic<int64_t>> skipped(work.size());
  auto body = [&](int64_t begin, int64_t end) {
    size_t j = static_cast<size_t>(std::upper_bound(start.begin(), start.end(), begin) - start.begin()) - 1;
    for (; j < work.size() && start[j] < end; ++j) {
      const TensorWork<Rule, P, S>& t = work[j];
      const int64_t first = std::max(begin, start[j]) - start[j];
      const int64_t last = std::min(end, start[j + 1]) - start[j];
      int64_t k = 0;
      uint32_t block = fw::random_block(static_cast<uint64_t>(first + t.offset));
      uint32_t key = fw::stream_key(seed, t.tensor_id, t.step, block);
      // Each piece lies in one row, taking its coefficients, and its elements' indices in the full
      // tensor lie in one block of the random stream.
      for (int64_t b = first; b < last;) {
        const uint32_t piece_block = fw::random_block(static_cast<uint64_t>(b + t.offset));
        if (piece_block != block) {
          block = piece_block;
          key = fw::stream_key(seed, t.tensor_id, t.step, block);
        }
        const int64_t row = b / t.row_size;
        const int64_t block_end = ((int64_t{block} + 1) << fw::kRandomBlockBits) - t.offset;
        const int64_t e = std::min({last, (row + 1) * t.row_size, block_end});
        const fw::RowCoef c = t.coefs[row];
        auto run = [&](auto coef, auto plain) {
          return run_chunk<Rule, P, S, M, decltype(coef), decltype(plain)::value>(
              t.sc, key, t.grad_scale, coef, b, e, t.offset, t.w, t.g, t.ext, t.s0, t.s1);
        };
        k += !c.unit() ? run(fw::Blended{c.alpha, c.beta}, std::false_type{})
             : t.plain ? run(fw::Uncontrolled{}, std::true_type{})
                       : run(fw::Uncontrolled{}, std::false_type{});
        b = e;
      }
      if (k != 0) skipped[j].fetch_add(k, std::memory_order_relaxed);
    }
  };
  parallel_pieces(call, start.back(), piece_length(start.back()), body);
  for (size_t j = 0; j < work.size(); ++j) {
    if (work[j].nonfinite != nullptr) *work[j].nonfinite += skipped[j].load();
  }
}

// Quantized states (quant.cuh; update.cuh, "quantized states"): one parallel loop over the
// concatenated blocks of B = 2^block_shift elements of all tensors, each block updated by
// run_quantized_block (cpu/chunk.h). Quantized states are never sharded (element_offset 0), and B
// divides the random stream's blocks, so one key serves a whole block.
template <class Rule, class P, class S, class M>
void run_quantized(const CpuStepCall& call) {
  constexpr int kS = Rule::kStates;
  const uint64_t seed = call.seed;
  std::vector<TensorWork<Rule, P, S>> work;
  std::vector<int64_t> numel;
  std::vector<int64_t> start{0};  // work[j] holds blocks [start[j], start[j + 1]) of the concatenation
  for (int64_t i = 0; i < call.num_slots; ++i) {
    const TensorSlot& slot = call.slots[i];
    work.push_back(tensor_work<Rule, P, S, M>(call, slot));
    numel.push_back(slot.numel);
    start.push_back(start.back() + ((slot.numel - 1) >> slot.block_shift) + 1);
  }
  if (work.empty()) return;
  std::vector<std::atomic<int64_t>> skipped(work.size());
  const int shift = work[0].block_shift;
  parallel_pieces(call, start.back(), std::max<int64_t>(1, piece_length(start.back() << shift) >> shift),
                  [&](int64_t begin, int64_t end) {
    fw::RowCoef row_coefs[fw::kMaxQuantBlock];
    size_t j = static_cast<size_t>(std::upper_bound(start.begin(), start.end(), begin) - start.begin()) - 1;
    for (int64_t b = begin; b < end; ++b) {
      while (b >= start[j + 1]) ++j;
      const TensorWork<Rule, P, S>& t = work[j];
      const int64_t q = b - start[j];
      const int64_t first = q << t.block_shift;
      const int32_t len = static_cast<int32_t>(std::min<int64_t>(int64_t{1} << t.block_shift, numel[j] - first));
      const uint32_t key = fw::stream_key(seed, t.tensor_id, t.step, fw::random_block(static_cast<uint64_t>(first)));
      const uint32_t counter = fw::element_counter(key, static_cast<uint64_t>(first));
      const int64_t row = first / t.row_size;
      int32_t bad;
      auto run = [&](auto coefs) {
        return run_quantized_block<Rule, P, S, M>(t.sc, counter, t.grad_scale, coefs, first, len, t.w, t.g, t.ext,
                                                  t.s0, t.s1, kS > 0 ? t.scale0 + q : nullptr,
                                                  kS > 1 ? t.scale1 + q : nullptr);
      };
      if ((first + len - 1) / t.row_size != row) {  // a block across rows: coefficients per element
        for (int32_t i = 0; i < len; ++i) row_coefs[i] = t.coefs[(first + i) / t.row_size];
        bad = run(CoefArray{row_coefs});
      } else if (t.coefs[row].unit()) {
        bad = run(SameCoef<fw::Uncontrolled>{});
      } else {
        bad = run(SameCoef<fw::Blended>{fw::Blended{t.coefs[row].alpha, t.coefs[row].beta}});
      }
      if (bad != 0) skipped[j].fetch_add(bad, std::memory_order_relaxed);  // the block was not written
    }
  });
  for (size_t j = 0; j < work.size(); ++j) {
    if (work[j].nonfinite != nullptr) *work[j].nonfinite += skipped[j].load();
  }
}

template <class Rule, class P, class S, class M>
void run_variant(const CpuStepCall& call) {
  if constexpr (S::kQuantized) {
    run_quantized<Rule, P, S, M>(call);
  } else {
    run_typed<Rule, P, S, M>(call);
  }
}

}  // namespace

}  // namespace fusedwarm

extern "C" void fusedwarm_cpu_step(const fusedwarm::CpuStepCall* call) {
  fusedwarm::run_variant<FW_RULE, FW_PARAM, FW_STATE, FW_ARITH>(*call);
}
