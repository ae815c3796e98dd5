// The binary interface between the torch-facing library and the kernel variants (layers 2-3 of
// DESIGN.md).
//
// Each kernel variant (rule x weight format x extra bits x state dtype x arithmetic) is compiled
// on its own, the first time a step needs it (fusedwarm/_build.py): for the CPU into a small
// shared library by the C++ compiler, for CUDA into a cubin by NVRTC, for the emulated device
// into a shared library by g++ against the CUDA shim. This header is all they share with the
// torch-facing library, so it includes no torch, no CUDA runtime and no standard library header
// NVRTC lacks: g++, nvcc and NVRTC compile it unchanged, and its structs have the same layout in
// all three (static_asserts below).
//
// One launch (or one CPU call) updates every tensor of a call. On CUDA the tensors' elements are
// cut into tiles of kTile (each thread of a block takes one pack of kPack consecutive elements);
// tiles are numbered across the tensors in slot order, and block b of the grid updates one
// contiguous range of tiles, so metadata grows with the number of tensors, not with their size.
#pragma once
#include "fusedwarm/update.cuh"

namespace fusedwarm {

constexpr int kThreads = 256;                         // CUDA threads per block
constexpr int kPack = 8;                              // consecutive elements per thread and tile
constexpr int64_t kTile = int64_t{kThreads} * kPack;  // elements per tile (one block's pass)
constexpr uint64_t kVectorAlign = 16;                 // bytes, for the 128-bit loads and stores

// One tensor of a call, as raw pointers (device pointers for CUDA, host pointers for the CPU).
// The host fills it; the variant only reads it.
struct TensorSlot {
  void* param;
  const void* grad;
  void* extra;              // extra bits (int8 for K = 8, int16 for K = 16), nullptr for K = 0
  void* state[2];           // the rule's states in order; entries past Rule::kStates are nullptr
  const int64_t* step;      // the tensor's step counter (already incremented for this step)
  const float* grad_scale;  // the gradient's multiplier, or nullptr for 1
  int64_t* nonfinite;       // += elements skipped for a non-finite gradient, or nullptr
  int64_t numel;            // > 0: empty tensors get no slot
  int64_t first_tile;       // CUDA: number of tiles in all earlier slots of the launch
  uint32_t tensor_id;
  uint32_t vectorized;      // CUDA: 1 when every pointer above is kVectorAlign-aligned
  // Update-size control (update.cuh), used when the call has control: the tensor is cut into
  // numel / row_size rows of row_size elements, each of chunks_per_row kNormChunk-element chunks.
  fw::RowCoef* row_coef;    // CUDA: the rows' coefficients (written by the launch before the step)
  int64_t row_size;         // numel without control
  int64_t chunks_per_row;
  int64_t first_chunk;      // number of chunks in all earlier slots
  int64_t first_row;        // number of rows in all earlier slots
  // The index of element 0 in the full tensor (a shard's offset; 0 for an unsharded tensor): the
  // random stream keys element k by k + element_offset, so sharding changes no bit.
  int64_t element_offset;
  // Quantized states (fw::StateQuant, quant.cuh): each state's block scales, one float per block of
  // 2^block_shift elements (nullptr and 0 for unquantized states).
  float* scale[2];
  int32_t block_shift;
  uint32_t unused;
};
static_assert(sizeof(TensorSlot) == 160 && alignof(TensorSlot) == 8, "TensorSlot layout is shared by every compiler");

FW_HD int64_t tiles_of(int64_t numel) { return (numel + kTile - 1) / kTile; }

// The blocks of the "misc" module's kernels (cuda/misc_kernels.cu), which the host sizes grids by.
constexpr int kPamElementThreads = 256;  // fw_pam_<op>: threads per block
constexpr int kPamTileDim = 16;          // fw_pam_matmul: square tile, one output per thread

// The CUDA step kernels' first parameter (the second is the rule's Hyper, by value).
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
static_assert(sizeof(LaunchArgs) == 88 && alignof(LaunchArgs) == 8, "LaunchArgs layout is shared by every compiler");

// The CPU variants' one entry point, `extern "C" void fusedwarm_cpu_step(const CpuStepCall*)`:
// one step of the variant's rule over every slot, in parallel over the concatenated elements
// through `parallel_for` (the torch-facing library's at::parallel_for, so the variant uses torch's
// threads and links against nothing).
struct CpuStepCall {
  const TensorSlot* slots;  // num_slots entries, host memory
  int64_t num_slots;
  const void* hyper;        // the rule's Hyper
  float lr;
  uint64_t seed;
  fw::Control control;      // mode kControlNone: no update-size control
  void (*parallel_for)(int64_t begin, int64_t end, int64_t grain, void (*body)(void*, int64_t, int64_t),
                       void* context);
};
using CpuStepFn = void (*)(const CpuStepCall*);
constexpr const char* kCpuStepSymbol = "fusedwarm_cpu_step";

// The CUDA kernels of a step variant (cuda/step_variant.cu), by their extern "C" names:
//   fw_step(LaunchArgs, Hyper)                 grid <= resident blocks, kThreads threads
//   fw_norm_chunks(LaunchArgs, Hyper)          update-size control, one thread per chunk
//   fw_row_coefficients(LaunchArgs, Hyper)     update-size control, one thread per row
// and of the module "misc" (cuda/misc_kernels.cu): fw_schedule_factors, fw_pam_<op>, fw_pam_matmul.

}  // namespace fusedwarm
