// CUDA backend (layer 2 of DESIGN.md): the multi-tensor step kernels' bodies, as templates over
// (Rule, weight format, state format, arithmetic). cuda/step_variant.cu instantiates one variant
// as extern "C" kernels; NVRTC compiles it at run time for the user's GPU, g++ for the emulated
// device (csrc/emu), nvcc where a toolkit is installed. Device code only: grid sizing and the
// launch are the host's (cuda/host.h).
//
// It only moves data. Every value it writes comes from fw::update_element, the function the CPU
// backend calls, with the per-tensor scalars computed by the same Rule::scalars from the same lr
// and step, and random bits keyed by (seed, tensor, step, element) only; so the two backends
// agree bit for bit whatever the grid, block or vector layout.
#pragma once
#if !defined(__CUDACC_RTC__)
#include <cuda_runtime.h>
#endif

#include "step_abi.h"

namespace fusedwarm {
namespace gpu {
namespace {

// One 128-bit access, or one 64-bit access for the kPack int8 extra bits (no <type_traits>:
// NVRTC has none).
template <bool Wide>
struct WordFor {
  using type = uint4;
};
template <>
struct WordFor<false> {
  using type = uint2;
};
template <class T>
using WordOf = typename WordFor<(sizeof(T) * kPack >= 16)>::type;

// kPack consecutive elements, viewed as the words that load and store them.
template <class T>
union Pack {
  T v[kPack];
  WordOf<T> w[sizeof(T) * kPack / sizeof(WordOf<T>)];
};

template <class T>
__device__ __forceinline__ void load_pack(Pack<T>& r, const T* p) {
  const auto* src = reinterpret_cast<const WordOf<T>*>(p);
#pragma unroll
  for (int i = 0; i < static_cast<int>(sizeof(r.w) / sizeof(r.w[0])); ++i) r.w[i] = src[i];
}

template <class T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T>& r) {
  auto* dst = reinterpret_cast<WordOf<T>*>(p);
#pragma unroll
  for (int i = 0; i < static_cast<int>(sizeof(r.w) / sizeof(r.w[0])); ++i) dst[i] = r.w[i];
}

// One tensor of the launch as seen by one thread: typed pointers plus the step's scalars.
template <class Rule, class P, class S, class M>
struct SlotUpdate {
  using W = typename P::storage;
  using St = typename S::storage;
  using Ext = typename P::extra_storage;
  static constexpr int kStates = Rule::kStates;
  static constexpr bool kExtra = P::K > 0;

  W* param;
  const W* grad;
  Ext* extra;
  St* state0;
  St* state1;
  int64_t numel;
  uint64_t seed;
  uint32_t tensor_id;
  int64_t step;
  uint64_t offset;  // the index of element 0 in the full tensor (TensorSlot::element_offset)
  uint32_t block0;  // the random-stream block of element 0, which holds every element of most tensors
  uint32_t key0;    // its key
  float grad_scale;
  const fw::RowCoef* row_coef;
  int64_t row_size;
  float* scale0;  // quantized states: block scales, one per 2^block_shift elements
  float* scale1;
  int block_shift;
  typename Rule::Scalars scalars;

  // Exactly the CPU backend's per-tensor values: scalars from the signed step, the random keys
  // from the step's bits.
  __device__ SlotUpdate(const TensorSlot& t, const typename Rule::Hyper& hyper, float lr, uint64_t seed_)
      : param(static_cast<W*>(t.param)),
        grad(static_cast<const W*>(t.grad)),
        extra(static_cast<Ext*>(t.extra)),
        state0(static_cast<St*>(t.state[0])),
        state1(static_cast<St*>(t.state[1])),
        numel(t.numel),
        seed(seed_),
        tensor_id(t.tensor_id),
        step(*t.step),
        offset(static_cast<uint64_t>(t.element_offset)),
        grad_scale(t.grad_scale != nullptr ? *t.grad_scale : 1.0f),
        row_coef(t.row_coef),
        row_size(t.row_size),
        scale0(t.scale[0]),
        scale1(t.scale[1]),
        block_shift(t.block_shift) {
    block0 = fw::random_block(offset);
    key0 = fw::stream_key(seed, tensor_id, static_cast<uint64_t>(step), block0);
    scalars = Rule::template scalars<fw::Ieee>(hyper, lr, step);
  }

  // Element k's update-size coefficients (1, 1 without control).
  __device__ __forceinline__ fw::RowCoef coef(int64_t k) const {
    return row_coef != nullptr ? row_coef[k / row_size] : fw::RowCoef{1.0f, 1.0f};
  }

  // Element k's random counter: its index in the full tensor, in the key of the stream block that
  // holds that index (a shard's tile may straddle two blocks, so each element looks up its own).
  __device__ __forceinline__ uint32_t counter_of(int64_t k) const {
    const uint64_t index = static_cast<uint64_t>(k) + offset;
    const uint32_t block = fw::random_block(index);
    const uint32_t key = block == block0 ? key0 : fw::stream_key(seed, tensor_id, static_cast<uint64_t>(step), block);
    return fw::element_counter(key, index);
  }

  // Each of these returns the number of elements it skipped for a non-finite gradient.
  __device__ __forceinline__ int one(int64_t k) const {
    int32_t e = 0;
    if constexpr (kExtra) e = extra[k];
    St s0{}, s1{};
    if constexpr (kStates > 0) s0 = state0[k];
    if constexpr (kStates > 1) s1 = state1[k];
    const fw::RowCoef c = coef(k);
    const bool ok =
        fw::update_element<Rule, P, S, M>(scalars, counter_of(k), param[k], e, grad[k], grad_scale, s0, s1, c);
    if constexpr (kExtra) extra[k] = static_cast<Ext>(e);
    if constexpr (kStates > 0) state0[k] = s0;
    if constexpr (kStates > 1) state1[k] = s1;
    return ok ? 0 : 1;
  }

  // Elements k0 .. k0 + kPack - 1, all in range, every pointer 16-byte aligned. Elements whose
  // gradient is not finite are written back unchanged.
  __device__ __forceinline__ int pack(int64_t k0) const {
    Pack<W> w, g;
    Pack<Ext> x;
    Pack<St> s0, s1;
    load_pack(w, param + k0);
    load_pack(g, grad + k0);
    if constexpr (kExtra) load_pack(x, extra + k0);
    if constexpr (kStates > 0) load_pack(s0, state0 + k0);
    if constexpr (kStates > 1) load_pack(s1, state1 + k0);
    int skipped = 0;
#pragma unroll
    for (int i = 0; i < kPack; ++i) {
      int32_t e = 0;
      if constexpr (kExtra) e = x.v[i];
      const fw::RowCoef c = coef(k0 + i);
      const bool ok = fw::update_element<Rule, P, S, M>(scalars, counter_of(k0 + i), w.v[i], e, g.v[i], grad_scale,
                                                     s0.v[i], s1.v[i], c);
      if constexpr (kExtra) x.v[i] = static_cast<Ext>(e);
      skipped += ok ? 0 : 1;
    }
    store_pack(param + k0, w);
    if constexpr (kExtra) store_pack(extra + k0, x);
    if constexpr (kStates > 0) store_pack(state0 + k0, s0);
    if constexpr (kStates > 1) store_pack(state1 + k0, s1);
    return skipped;
  }

  // A thread's kPack codes of one quantized state: kPack bytes (8-bit codes) or kPack / 2 (4-bit),
  // one aligned word (a state tensor starts 16-byte aligned and k0 is a multiple of kPack).
  union Codes {
    uint8_t b[kPack];
    uint2 w8;
    unsigned int w4;
  };

  __device__ __forceinline__ static void load_codes(Codes& c, const St* s, int64_t k0, int64_t count, bool full) {
    if (full) {
      if (S::kBits == 8) {
        c.w8 = *reinterpret_cast<const uint2*>(s + k0);
      } else {
        c.w4 = *reinterpret_cast<const unsigned int*>(s + k0 / 2);
      }
      return;
    }
    const int64_t bytes = S::kBits == 8 ? count : (count + 1) / 2;
#pragma unroll
    for (int i = 0; i < kPack; ++i) c.b[i] = i < bytes ? s[(S::kBits == 8 ? k0 : k0 / 2) + i] : 0;
  }

  __device__ __forceinline__ static void store_codes(St* s, const uint32_t* code, int64_t k0, int64_t count,
                                                     bool full) {
    Codes c;
#pragma unroll
    for (int i = 0; i < kPack; ++i) c.b[i] = 0;
#pragma unroll
    for (int i = 0; i < kPack; ++i) S::put_code(c.b, i, code[i]);
    if (full) {
      if (S::kBits == 8) {
        *reinterpret_cast<uint2*>(s + k0) = c.w8;
      } else {
        *reinterpret_cast<unsigned int*>(s + k0 / 2) = c.w4;
      }
      return;
    }
    const int64_t bytes = S::kBits == 8 ? count : (count + 1) / 2;
    for (int64_t i = 0; i < bytes; ++i) s[(S::kBits == 8 ? k0 : k0 / 2) + i] = c.b[i];
  }

  // Quantized states (update.cuh, "quantized states"): thread t takes the kPack elements from
  // base + kPack t (128-bit loads and stores where the slot is vectorized and the pack is whole),
  // and the B / kPack consecutive threads that hold one block of B elements find the block's
  // largest state magnitudes and whether every gradient is finite through shared memory (a
  // maximum and a sum: the same in any order, so the same bits as the CPU's loop). Every thread of
  // the block calls this for every tile (it has barriers).
  __device__ __forceinline__ int tile_quantized(int64_t base, bool vectorized) const {
    __shared__ uint32_t largest[2][kThreads];
    __shared__ int bad_in[kThreads];
    const int64_t k0 = base + static_cast<int64_t>(threadIdx.x) * kPack;
    const int64_t count = k0 < numel ? (numel - k0 < kPack ? numel - k0 : kPack) : 0;
    const bool full = vectorized && count == kPack;
    Pack<W> w, g;
    Pack<Ext> x;
    Codes s0{}, s1{};
    if (full) {
      load_pack(w, param + k0);
      load_pack(g, grad + k0);
      if constexpr (kExtra) load_pack(x, extra + k0);
    } else {
      for (int64_t i = 0; i < count; ++i) {
        w.v[i] = param[k0 + i];
        g.v[i] = grad[k0 + i];
        if constexpr (kExtra) x.v[i] = extra[k0 + i];
      }
    }
    if (kStates > 0 && count > 0) load_codes(s0, state0, k0, count, full);
    if (kStates > 1 && count > 0) load_codes(s1, state1, k0, count, full);
    const int64_t q = k0 >> block_shift;  // the block of the states that holds this thread's elements
    const float old0 = kStates > 0 && count > 0 ? scale0[q] : 0.0f;
    const float old1 = kStates > 1 && count > 0 ? scale1[q] : 0.0f;
    float p[kPack], f0[kPack], f1[kPack];
    uint32_t m0 = 0, m1 = 0;
    int bad = 0;
#pragma unroll
    for (int i = 0; i < kPack; ++i) {
      if (i < count) {
        float a = kStates > 0 ? S::Code0::decode(S::code_at(s0.b, i), old0) : 0.0f;
        float v = kStates > 1 ? S::Code1::decode(S::code_at(s1.b, i), old1) : 0.0f;
        const bool ok = fw::quantized_values<Rule, P, M>(scalars, w.v[i], kExtra ? static_cast<int32_t>(x.v[i]) : 0,
                                                         g.v[i], grad_scale, coef(k0 + i), p[i], a, v, m0, m1);
        f0[i] = a;
        f1[i] = v;
        bad += ok ? 0 : 1;
      }
    }
    largest[0][threadIdx.x] = m0;
    largest[1][threadIdx.x] = m1;
    bad_in[threadIdx.x] = bad;
    __syncthreads();
    const int group = (1 << block_shift) / kPack;  // threads per block of the states
    const int leader = static_cast<int>(threadIdx.x) & ~(group - 1);
    int block_bad = 0;
    for (int j = leader; j < leader + group; ++j) {
      m0 = largest[0][j] > m0 ? largest[0][j] : m0;
      m1 = largest[1][j] > m1 ? largest[1][j] : m1;
      block_bad += bad_in[j];
    }
    __syncthreads();  // the next tile reuses the shared arrays
    if (block_bad != 0 || count == 0) return bad;  // the block is the unit of a skip
    const float inv0 = S::Code0::block_inverse(m0), inv1 = S::Code1::block_inverse(m1);
    if (static_cast<int>(threadIdx.x) == leader) {
      if (kStates > 0) scale0[q] = S::Code0::block_scale(m0);
      if (kStates > 1) scale1[q] = S::Code1::block_scale(m1);
    }
    uint32_t c0[kPack], c1[kPack];
#pragma unroll
    for (int i = 0; i < kPack; ++i) {
      c0[i] = 0u;
      c1[i] = 0u;
      if (i < count) {
        int32_t e = kExtra ? static_cast<int32_t>(x.v[i]) : 0;
        fw::store_quantized<P, S, kStates>(counter_of(k0 + i), p[i], f0[i], f1[i], inv0, inv1, w.v[i], e, c0[i],
                                           c1[i]);
        if constexpr (kExtra) x.v[i] = static_cast<Ext>(e);
      }
    }
    if (full) {
      store_pack(param + k0, w);
      if constexpr (kExtra) store_pack(extra + k0, x);
    } else {
      for (int64_t i = 0; i < count; ++i) {
        param[k0 + i] = w.v[i];
        if constexpr (kExtra) extra[k0 + i] = x.v[i];
      }
    }
    if (kStates > 0) store_codes(state0, c0, k0, count, full);
    if (kStates > 1) store_codes(state1, c1, k0, count, full);
    return bad;
  }

  // The kTile elements from `base`. Vectorized: thread t takes the pack at base + kPack t (the
  // one pack that crosses the end of the tensor goes element by element). Otherwise thread t
  // takes base + t + kThreads j, so that the scalar accesses of a warp stay coalesced.
  __device__ __forceinline__ int tile(int64_t base, bool vectorized) const {
    if constexpr (S::kQuantized) {
      return tile_quantized(base, vectorized);
    } else {
      int skipped = 0;
      if (vectorized) {
        const int64_t k0 = base + static_cast<int64_t>(threadIdx.x) * kPack;
        if (k0 + kPack <= numel) {
          skipped = pack(k0);
        } else {
          for (int64_t k = k0; k < numel; ++k) skipped += one(k);
        }
      } else {
        for (int j = 0; j < kPack; ++j) {
          const int64_t k = base + static_cast<int64_t>(j) * kThreads + threadIdx.x;
          if (k < numel) skipped += one(k);
        }
      }
      return skipped;
    }
  }
};

// The slot that holds global tile (or chunk, or row) `index`: the last one whose First field is
// <= index (slot 0 starts at 0 and no slot is empty).
template <int64_t TensorSlot::*First = &TensorSlot::first_tile>
__device__ __forceinline__ int64_t find_slot(const TensorSlot* slots, int64_t count, int64_t index) {
  int64_t lo = 0, hi = count - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (slots[mid].*First <= index) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// Block b takes the b-th of gridDim.x near-equal contiguous ranges of tiles (the grid never has
// more blocks than tiles), so the one binary search per block is followed by a forward walk
// through the slots it spans.
template <class Rule, class P, class S, class M>
__device__ __forceinline__ void step_body(const LaunchArgs& a, const typename Rule::Hyper& hyper) {
  const int64_t blocks = gridDim.x;
  const int64_t b = blockIdx.x;
  const int64_t per_block = a.num_tiles / blocks;
  const int64_t rest = a.num_tiles % blocks;
  int64_t tile = b * per_block + (b < rest ? b : rest);
  const int64_t end = tile + per_block + (b < rest ? 1 : 0);
  const float lr = a.lr != nullptr ? *a.lr : a.lr_value;
  for (int64_t s = find_slot(a.slots, a.num_slots, tile); tile < end; ++s) {
    const TensorSlot t = a.slots[s];
    const SlotUpdate<Rule, P, S, M> u(t, hyper, lr, a.seed);
    const int64_t slot_end = t.first_tile + tiles_of(t.numel);
    const int64_t stop = slot_end < end ? slot_end : end;
    int skipped = 0;
    for (; tile < stop; ++tile) skipped += u.tile((tile - t.first_tile) * kTile, t.vectorized != 0);
    // Non-finite gradients are rare: an atomic only from a thread that skipped something.
    if (skipped != 0 && t.nonfinite != nullptr) {
      atomicAdd(reinterpret_cast<unsigned long long*>(t.nonfinite), static_cast<unsigned long long>(skipped));
    }
  }
}

// Update-size control, first pass: thread g sums global chunk g in index order
// (fw::norm_accumulate) into partials[g]. Nothing is written to the tensors.
template <class Rule, class P, class S, class M>
__device__ __forceinline__ void norm_chunks_body(const LaunchArgs& a, const typename Rule::Hyper& hyper) {
  const int64_t g = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (g >= a.num_chunks) return;
  const TensorSlot t = a.slots[find_slot<&TensorSlot::first_chunk>(a.slots, a.num_slots, g)];
  const int64_t c = g - t.first_chunk;
  const int64_t row = c / t.chunks_per_row;
  const int64_t first = row * t.row_size + (c % t.chunks_per_row) * fw::kNormChunk;
  const int64_t row_end = (row + 1) * t.row_size;
  const int64_t last = first + fw::kNormChunk < row_end ? first + fw::kNormChunk : row_end;
  const float lr = a.lr != nullptr ? *a.lr : a.lr_value;
  const SlotUpdate<Rule, P, S, M> u(t, hyper, lr, a.seed);
  fw::NormSums sums{0.0f, 0.0f, 0.0f};
  for (int64_t k = first; k < last; ++k) {
    float p0, d;
    fw::element_delta<Rule, P, M>(u.scalars, u.param[k], P::K > 0 ? static_cast<int32_t>(u.extra[k]) : 0,
                                  u.grad[k], u.grad_scale,
                                  Rule::kStates > 0 ? fw::load_state<S, 0>(u.state0, u.scale0, u.block_shift, k) : 0.0f,
                                  Rule::kStates > 1 ? fw::load_state<S, 1>(u.state1, u.scale1, u.block_shift, k) : 0.0f,
                                  p0, d);
    fw::norm_accumulate(sums, p0, d);
  }
  a.partials[g] = sums;
}

// Update-size control, second pass: thread r adds global row r's chunk sums in chunk order
// (fw::norm_accumulate_chunk) and writes the row's coefficients (fw::row_coefficients).
template <class Rule>
__device__ __forceinline__ void row_coefficients_body(const LaunchArgs& a, const typename Rule::Hyper& hyper) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (r >= a.num_rows) return;
  const TensorSlot t = a.slots[find_slot<&TensorSlot::first_row>(a.slots, a.num_slots, r)];
  const int64_t row = r - t.first_row;
  const fw::NormSums* p = a.partials + t.first_chunk + row * t.chunks_per_row;
  fw::NormSums sums{0.0f, 0.0f, 0.0f};
  for (int64_t j = 0; j < t.chunks_per_row; ++j) fw::norm_accumulate_chunk(sums, p[j]);
  const float lr = a.lr != nullptr ? *a.lr : a.lr_value;
  t.row_coef[row] = fw::row_coefficients(a.control, fw::effective_lr(hyper.schedule, lr, *t.step), sums);
}

}  // namespace

}  // namespace gpu
}  // namespace fusedwarm
