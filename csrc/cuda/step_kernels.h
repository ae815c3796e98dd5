// CUDA backend (layer 2 of DESIGN.md): the multi-tensor step kernel's host-side ABI.
//
// Torch-free on purpose, so that nvcc compiles the kernels on any machine; the thin adapter in
// ops_cuda.cpp turns at::Tensor lists into TensorSlots, copies them to the device and launches.
//
// One launch updates every tensor of a call. The tensors' elements are cut into tiles of kTile
// (each thread of a block takes one pack of kPack consecutive elements); tiles are numbered
// across the tensors in slot order, and block b of the grid updates one contiguous range of
// tiles, so metadata grows with the number of tensors, not with their size.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "fusedwarm/update.cuh"

namespace fusedwarm {
namespace gpu {

constexpr int kThreads = 256;                         // threads per block
constexpr int kPack = 8;                              // consecutive elements per thread and tile
constexpr int64_t kTile = int64_t{kThreads} * kPack;  // elements per tile (one block's pass)
constexpr uintptr_t kVectorAlign = 16;                // bytes, for the 128-bit loads and stores

// One tensor of a launch, as raw device pointers. The host fills it; the kernel only reads it.
struct TensorSlot {
  void* param;
  const void* grad;
  void* extra;           // extra bits (int8 for K = 8, int16 for K = 16), nullptr for K = 0
  void* state[2];        // the rule's states in order; entries past Rule::kStates are nullptr
  const int64_t* step;   // the tensor's step counter (already incremented for this step)
  const float* grad_scale;  // the gradient's multiplier, or nullptr for 1
  int64_t* nonfinite;    // += elements skipped for a non-finite gradient, or nullptr
  int64_t numel;         // > 0: empty tensors get no slot
  int64_t first_tile;    // number of tiles in all earlier slots of the launch
  uint32_t tensor_id;
  uint32_t vectorized;   // 1 when every pointer above is kVectorAlign-aligned
  // Update-size control (update.cuh), used when LaunchArgs::num_rows > 0: the tensor is cut into
  // numel / row_size rows of row_size elements, each of chunks_per_row kNormChunk-element chunks.
  fw::RowCoef* row_coef;  // the rows' coefficients (written by the launch before the step)
  int64_t row_size;
  int64_t chunks_per_row;
  int64_t first_chunk;   // number of chunks in all earlier slots
  int64_t first_row;     // number of rows in all earlier slots
  // The index of element 0 in the full tensor (a shard's offset; 0 for an unsharded tensor): the
  // random stream keys element k by k + element_offset, so sharding changes no bit.
  int64_t element_offset;
};
static_assert(sizeof(TensorSlot) == 136 && alignof(TensorSlot) == 8, "TensorSlot layout is shared by g++ and nvcc");

FW_HD int64_t tiles_of(int64_t numel) { return (numel + kTile - 1) / kTile; }

struct LaunchArgs {
  const TensorSlot* slots;  // device memory, num_slots entries with increasing first_tile
  int64_t num_slots;
  int64_t num_tiles;        // sum of tiles_of(numel) over the slots
  const float* lr;          // device pointer to the learning rate, or nullptr to use lr_value
  float lr_value;
  uint64_t seed;
  // Update-size control: off when num_rows == 0. Otherwise partials holds num_chunks entries of
  // scratch (each chunk's sums) and every slot's row_coef points into device memory.
  int64_t num_rows;
  int64_t num_chunks;
  fw::NormSums* partials;
  fw::Control control;
};

// Enqueues one step of Rule on `stream` for every slot and returns the launch status. Nothing
// is synchronized: lr and the steps are read on the device when the kernel runs. With update-size
// control, two kernels first compute every row's coefficients in update.cuh's summation order (one
// thread per chunk, then one thread per row), so they equal the CPU backend's bit for bit. Instantiated
// for every Rule, every ParamF32 / ParamHalf<BF16Format|F16Format, 0|8|16>, and StateF32 /
// StateBF16, and both arithmetic policies M (fw::Ieee, fw::Pam).
template <class Rule, class P, class S, class M>
cudaError_t launch_step(const LaunchArgs& args, const typename Rule::Hyper& hyper, cudaStream_t stream);

// Enqueues fw::factors(schedule, steps[i]) for i < n into out[4 i .. 4 i + 3] (warmup, schedule,
// product, adaptive flag): the factors the step kernel uses, read for logging without a sync.
cudaError_t launch_schedule_factors(const int64_t* steps, int64_t n, const fw::Schedule& schedule, float* out,
                                    cudaStream_t stream);

}  // namespace gpu
}  // namespace fusedwarm
