// CUDA backend host path (layers 2-3 of DESIGN.md), generic over the device it drives: a real
// GPU through the CUDA driver with NVRTC-compiled kernels (ops_cuda.cpp), or the emulated one
// (emu/ops_emu.cpp), so that the emulated device runs the very code a GPU run does, and only
// memory placement, copies, module loading and the final launch differ.
//
// It turns the checked tensor lists of a call into TensorSlots (fill_slots), copies them to the
// device, finds the call's kernel variant (compiled on first use: variants.h) and launches it on
// the current stream without synchronizing. A device policy Dev provides:
//   using Kernel = ...;                          a loaded kernel
//   struct Scope { explicit Scope(const at::Device&); void* stream() const; };
//       the device guard and the current stream of a call
//   static Kernel kernel(const std::string& module, const char* name, const at::Device&);
//       kernel `name` of module `module` (a step variant or "misc"), loaded on first use
//   static int64_t resident_blocks(Kernel, const at::Device&);  blocks of kThreads that fit at once
//   static void launch(Kernel, Dim3 grid, Dim3 block, void* stream, void** params, const char* what,
//                      const at::Device&);     enqueues the kernel; a failure is an error naming `what`
//   static at::Tensor staging(int64_t bytes);   host memory the slot table is written into
//   static void keep_until_replay(const at::Tensor& staging, void* stream);
//       keeps the staging buffer alive while a CUDA graph that captured its copy may replay it
// Device memory is allocated with the tensors' own device (torch's caching allocator).
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "ops_impl.h"
#include "pam_impl.h"

namespace fusedwarm {

// A launch's grid or block (CUDA's dim3, which the host side does not include).
struct Dim3 {
  unsigned int x = 1, y = 1, z = 1;
};

inline unsigned int blocks_for(int64_t threads, int per_block) {
  return static_cast<unsigned int>((threads + per_block - 1) / per_block);
}

template <class Dev>
struct DeviceStep {
  template <class Rule>
  static void run(const StepLists& L, typename Rule::Hyper h) {
    if (L.params.empty()) return;
    const at::Device device = L.params[0].device();
    const typename Dev::Scope scope(device);
    // The slots go through host staging memory: the non-blocking copy_ records its stream on the
    // caching host allocator, so the buffer is not reused before the copy has run (nor, when the
    // copy is captured into a CUDA graph, before the graph can no longer replay it: see
    // Dev::keep_until_replay). The device copy is freed to the caching allocator on this same
    // stream, so the kernel below is done with it before reuse.
    const int64_t bytes = static_cast<int64_t>(L.params.size() * sizeof(TensorSlot));
    at::Tensor host = Dev::staging(bytes);
    auto* slots = static_cast<TensorSlot*>(host.data_ptr());
    const SlotTotals n = fill_slots(L, Rule::kStates, slots);
    if (n.slots == 0) {
      increment_steps(L);
      return;
    }
    const std::string variant = step_variant(kRuleName<Rule>, L);
    const auto step_kernel = Dev::kernel(variant, "fw_step", device);
    // The counters are incremented once the variant is loaded (a failed compile leaves them as they
    // were), on this stream before the kernels that read them.
    increment_steps(L);

    // Update-size control's device scratch: the chunk sums, then the rows' coefficients (float32
    // words). It is freed to the caching allocator on this stream, after the kernels that use it.
    static_assert(sizeof(fw::NormSums) == 3 * sizeof(float) && sizeof(fw::RowCoef) == 2 * sizeof(float),
                  "scratch layout");
    const bool control = L.control.mode != fw::kControlNone;
    at::Tensor scratch;
    if (control) {
      scratch = at::empty({3 * n.chunks + 2 * n.rows}, at::TensorOptions().dtype(at::kFloat).device(device));
      auto* coefs = reinterpret_cast<fw::RowCoef*>(scratch.data_ptr<float>() + 3 * n.chunks);
      for (int64_t j = 0; j < n.slots; ++j) slots[j].row_coef = coefs + slots[j].first_row;
    }
    const int64_t used = n.slots * static_cast<int64_t>(sizeof(TensorSlot));
    at::Tensor dev = at::empty({used}, at::TensorOptions().dtype(at::kByte).device(device));
    dev.copy_(host.narrow(0, 0, used), /*non_blocking=*/true);
    Dev::keep_until_replay(host, scope.stream());

    LaunchArgs args{};
    args.slots = static_cast<const TensorSlot*>(dev.const_data_ptr());
    args.num_slots = n.slots;
    args.num_tiles = n.tiles;
    args.lr = L.lr_tensor ? L.lr_tensor->const_data_ptr<float>() : nullptr;
    args.lr_value = static_cast<float>(L.lr);
    args.seed = static_cast<uint64_t>(L.seed);
    args.num_rows = control ? n.rows : 0;
    args.num_chunks = control ? n.chunks : 0;
    args.partials = control ? reinterpret_cast<fw::NormSums*>(scratch.data_ptr<float>()) : nullptr;
    args.control = L.control;
    void* params[] = {&args, &h};
    Dim3 block;
    block.x = kThreads;
    if (control) {
      // Two kernels first compute every row's coefficients in update.cuh's summation order (one
      // thread per chunk, then one thread per row), so they equal the CPU backend's bit for bit.
      Dim3 grid;
      grid.x = blocks_for(n.chunks, kThreads);
      Dev::launch(Dev::kernel(variant, "fw_norm_chunks", device), grid, block, scope.stream(), params,
                  "update-size control (chunk sums)", device);
      grid.x = blocks_for(n.rows, kThreads);
      Dev::launch(Dev::kernel(variant, "fw_row_coefficients", device), grid, block, scope.stream(), params,
                  "update-size control (row coefficients)", device);
    }
    // As many blocks as can be resident at once: each then walks its range of tiles in a single
    // wave, and the grid stays far below gridDim.x's limit whatever the number of elements.
    const int64_t resident = Dev::resident_blocks(step_kernel, device);
    Dim3 grid;
    grid.x = static_cast<unsigned int>(n.tiles < resident ? n.tiles : resident);
    Dev::launch(step_kernel, grid, block, scope.stream(), params, "step", device);
  }

  static at::Tensor schedule_factors(const at::Tensor& steps, double beta2, FW_SCHEDULE_PARAMS) {
    TORCH_CHECK(steps.scalar_type() == at::kLong, "fusedwarm.schedule_factors: steps must be int64, got ",
                steps.scalar_type());
    fw::Schedule s = parse_schedule("schedule_factors", FW_SCHEDULE_ARGS, beta2, true);
    const typename Dev::Scope scope(steps.device());
    const at::Tensor c = steps.contiguous();
    std::vector<int64_t> shape = c.sizes().vec();
    shape.push_back(4);
    at::Tensor out = at::empty(shape, c.options().dtype(at::kFloat));
    int64_t count = c.numel();
    if (count == 0) return out;
    const void* in = c.const_data_ptr();
    void* o = out.data_ptr();
    void* params[] = {&in, &count, &s, &o};
    Dim3 grid, block;
    grid.x = blocks_for(count, kThreads);
    block.x = kThreads;
    Dev::launch(Dev::kernel("misc", "fw_schedule_factors", steps.device()), grid, block, scope.stream(), params,
                "schedule factors", steps.device());
    return out;
  }
};

// fusedwarm.pam on the device: raw pointers and the current stream for cuda/misc_kernels.cu.
template <class Dev>
struct DevicePam {
  static void elementwise(fw::PamOp op, const at::Tensor& a, const at::Tensor& b, at::Tensor& out) {
    static const char* const names[] = {"fw_pam_mul", "fw_pam_div", "fw_pam_sqrt", "fw_pam_exp2", "fw_pam_log2"};
    const typename Dev::Scope scope(a.device());
    const void* pa = a.const_data_ptr();
    const void* pb = b.defined() ? b.const_data_ptr() : nullptr;
    void* po = out.data_ptr();
    int64_t count = a.numel();
    void* params[] = {&pa, &pb, &po, &count};
    const int64_t needed = blocks_for(count, kPamElementThreads);
    Dim3 grid, block;
    grid.x = static_cast<unsigned int>(needed < 65535 ? needed : 65535);
    block.x = kPamElementThreads;
    Dev::launch(Dev::kernel("misc", names[static_cast<int>(op)], a.device()), grid, block, scope.stream(), params,
                "fusedwarm.pam element-wise", a.device());
  }

  static void matmul(const at::Tensor& a, const at::Tensor& b, at::Tensor& out) {
    const typename Dev::Scope scope(a.device());
    int64_t m = a.size(0), k = a.size(1), n = b.size(1);
    if (m == 0 || n == 0) return;
    const void* pa = a.const_data_ptr();
    const void* pb = b.const_data_ptr();
    void* po = out.data_ptr();
    void* params[] = {&pa, &pb, &po, &m, &k, &n};
    const int64_t col_tiles = (n + kPamTileDim - 1) / kPamTileDim;
    Dim3 grid, block;
    grid.x = blocks_for(m, kPamTileDim);
    grid.y = static_cast<unsigned int>(col_tiles < 65535 ? col_tiles : 65535);
    block.x = kPamTileDim;
    block.y = kPamTileDim;
    Dev::launch(Dev::kernel("misc", "fw_pam_matmul", a.device()), grid, block, scope.stream(), params,
                "fusedwarm.pam_matmul", a.device());
  }
};

// Registers the device's implementations of the ops the CUDA backend provides.
template <class Dev>
void register_device_ops(torch::Library& m) {
  m.impl("adamw_", &OpImpls<DeviceStep<Dev>>::adamw_);
  m.impl("sgd_", &OpImpls<DeviceStep<Dev>>::sgd_);
  m.impl("lion_", &OpImpls<DeviceStep<Dev>>::lion_);
  m.impl("schedule_factors", &DeviceStep<Dev>::schedule_factors);
  m.impl("pam_mul", &PamImpls<DevicePam<Dev>>::mul);
  m.impl("pam_div", &PamImpls<DevicePam<Dev>>::div);
  m.impl("pam_sqrt", &PamImpls<DevicePam<Dev>>::sqrt);
  m.impl("pam_exp2", &PamImpls<DevicePam<Dev>>::exp2);
  m.impl("pam_log2", &PamImpls<DevicePam<Dev>>::log2);
  m.impl("pam_matmul", &PamImpls<DevicePam<Dev>>::matmul);
}

}  // namespace fusedwarm
