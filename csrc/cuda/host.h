// CUDA backend host path (layers 2-3 of DESIGN.md), generic over the device it drives: the real
// GPU (ops_cuda.cpp) or the emulated one (emu/ops_emu.cpp), so that the emulated device runs the
// very code a GPU run does, and only memory placement, copies and the final launch differ.
//
// It turns the checked tensor lists of a call into TensorSlots for the torch-free kernels
// (step_kernels.h, pam_kernels.h), launches them on the current stream without synchronizing,
// and registers the ops. A device policy Dev provides:
//   struct Scope { explicit Scope(const at::Device&); cudaStream_t stream() const; };
//       the device guard and the current stream of a call
//   static at::Tensor staging(int64_t bytes);   host memory the slot table is written into
//   static void keep_until_replay(const at::Tensor& staging, cudaStream_t stream);
//       keeps the staging buffer alive while a CUDA graph that captured its copy may replay it
//   static constexpr const char* kName;         the device, for error messages
// Device memory is allocated with the tensors' own device (torch's caching allocator).
#pragma once
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cuda/pam_kernels.h"
#include "cuda/step_kernels.h"
#include "ops_impl.h"
#include "pam_impl.h"

namespace fusedwarm {

template <class Dev>
struct DeviceStep {
  template <class Rule>
  static void run(const StepLists& L, const typename Rule::Hyper& h) {
    dispatch_step(L, [&](auto p, auto s, auto m) {
      run_typed<Rule, typename decltype(p)::type, typename decltype(s)::type, typename decltype(m)::type>(L, h);
    });
  }

  static bool vector_aligned(const void* p) { return reinterpret_cast<uintptr_t>(p) % gpu::kVectorAlign == 0; }

  template <class Rule, class P, class S, class M>
  static void run_typed(const StepLists& L, const typename Rule::Hyper& h) {
    int64_t num_slots = 0;
    for (const at::Tensor& p : L.params) num_slots += p.numel() > 0 ? 1 : 0;
    if (num_slots == 0) return;

    const at::Device device = L.params[0].device();
    const typename Dev::Scope scope(device);

    // The slots go through host staging memory: the non-blocking copy_ records its stream on the
    // caching host allocator, so the buffer is not reused before the copy has run (nor, when the
    // copy is captured into a CUDA graph, before the graph can no longer replay it: see
    // Dev::keep_until_replay). The device copy is freed to the caching allocator on this same
    // stream, so the kernel below is done with it before reuse.
    const int64_t bytes = num_slots * static_cast<int64_t>(sizeof(gpu::TensorSlot));
    at::Tensor host = Dev::staging(bytes);
    auto* slots = static_cast<gpu::TensorSlot*>(host.data_ptr());
    int64_t num_tiles = 0, num_chunks = 0, num_rows = 0;
    int64_t s = 0;
    const bool control = L.control.mode != fw::kControlNone;
    for (size_t i = 0; i < L.params.size(); ++i) {
      const int64_t numel = L.params[i].numel();
      if (numel == 0) continue;
      gpu::TensorSlot t{};
      t.param = L.params[i].data_ptr();
      t.grad = L.grads[i].const_data_ptr();
      t.extra = P::K > 0 ? L.extras[i].data_ptr() : nullptr;
      for (int j = 0; j < Rule::kStates; ++j) t.state[j] = L.states[j][i].data_ptr();
      t.step = L.steps[i].const_data_ptr<int64_t>();
      t.grad_scale = L.grad_scales ? L.grad_scales->const_data_ptr<float>() + i : nullptr;
      t.nonfinite = L.nonfinite ? L.nonfinite->data_ptr<int64_t>() + i : nullptr;
      t.numel = numel;
      t.first_tile = num_tiles;
      t.tensor_id = static_cast<uint32_t>(L.tensor_ids[i]);
      t.element_offset = L.element_offsets.empty() ? 0 : L.element_offsets[i];
      bool aligned = vector_aligned(t.param) && vector_aligned(t.grad) && vector_aligned(t.extra);
      for (int j = 0; j < Rule::kStates; ++j) aligned = aligned && vector_aligned(t.state[j]);
      t.vectorized = aligned ? 1u : 0u;
      if (control) {
        t.row_size = numel / L.update_rows[i];
        t.chunks_per_row = (t.row_size + fw::kNormChunk - 1) / fw::kNormChunk;
        t.first_chunk = num_chunks;
        t.first_row = num_rows;
        num_chunks += L.update_rows[i] * t.chunks_per_row;
        num_rows += L.update_rows[i];
      }
      num_tiles += gpu::tiles_of(numel);
      slots[s++] = t;
    }
    // Update-size control's device scratch: the chunk sums, then the rows' coefficients (float32
    // words). It is freed to the caching allocator on this stream, after the kernels that use it.
    static_assert(sizeof(fw::NormSums) == 3 * sizeof(float) && sizeof(fw::RowCoef) == 2 * sizeof(float),
                  "scratch layout");
    at::Tensor scratch;
    if (control) {
      scratch = at::empty({3 * num_chunks + 2 * num_rows}, at::TensorOptions().dtype(at::kFloat).device(device));
      auto* coefs = reinterpret_cast<fw::RowCoef*>(scratch.data_ptr<float>() + 3 * num_chunks);
      for (int64_t j = 0; j < num_slots; ++j) slots[j].row_coef = coefs + slots[j].first_row;
    }
    at::Tensor dev = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).device(device));
    dev.copy_(host, /*non_blocking=*/true);
    Dev::keep_until_replay(host, scope.stream());

    gpu::LaunchArgs args;
    args.slots = static_cast<const gpu::TensorSlot*>(dev.const_data_ptr());
    args.num_slots = num_slots;
    args.num_tiles = num_tiles;
    args.lr = L.lr_tensor ? L.lr_tensor->const_data_ptr<float>() : nullptr;
    args.lr_value = static_cast<float>(L.lr);
    args.seed = static_cast<uint64_t>(L.seed);
    args.num_rows = num_rows;
    args.num_chunks = num_chunks;
    args.partials = control ? reinterpret_cast<fw::NormSums*>(scratch.data_ptr<float>()) : nullptr;
    args.control = L.control;
    const cudaError_t err = gpu::launch_step<Rule, P, S, M>(args, h, scope.stream());
    TORCH_CHECK(err == cudaSuccess, "fusedwarm: launching the ", Dev::kName, " step kernel on ", device,
                " failed: ", cudaGetErrorString(err));
  }

  static at::Tensor schedule_factors(const at::Tensor& steps, double beta2, FW_SCHEDULE_PARAMS) {
    TORCH_CHECK(steps.scalar_type() == at::kLong, "fusedwarm.schedule_factors: steps must be int64, got ",
                steps.scalar_type());
    const fw::Schedule s = parse_schedule("schedule_factors", FW_SCHEDULE_ARGS, beta2, true);
    const typename Dev::Scope scope(steps.device());
    const at::Tensor c = steps.contiguous();
    std::vector<int64_t> shape = c.sizes().vec();
    shape.push_back(4);
    at::Tensor out = at::empty(shape, c.options().dtype(at::kFloat));
    const cudaError_t err =
        gpu::launch_schedule_factors(c.const_data_ptr<int64_t>(), c.numel(), s, out.data_ptr<float>(), scope.stream());
    TORCH_CHECK(err == cudaSuccess, "fusedwarm: launching the ", Dev::kName, " schedule kernel on ", steps.device(),
                " failed: ", cudaGetErrorString(err));
    return out;
  }
};

// fusedwarm.pam on the device: raw pointers and the current stream for pam_kernels.cu.
template <class Dev>
struct DevicePam {
  static void elementwise(fw::PamOp op, const at::Tensor& a, const at::Tensor& b, at::Tensor& out) {
    const typename Dev::Scope scope(a.device());
    const cudaError_t err =
        gpu::launch_pam_elementwise(op, a.const_data_ptr<float>(), b.defined() ? b.const_data_ptr<float>() : nullptr,
                                    out.data_ptr<float>(), a.numel(), scope.stream());
    TORCH_CHECK(err == cudaSuccess, "fusedwarm.pam: launching the ", Dev::kName, " element-wise kernel on ",
                a.device(), " failed: ", cudaGetErrorString(err));
  }

  static void matmul(const at::Tensor& a, const at::Tensor& b, at::Tensor& out) {
    const typename Dev::Scope scope(a.device());
    const cudaError_t err =
        gpu::launch_pam_matmul(a.const_data_ptr<float>(), b.const_data_ptr<float>(), out.data_ptr<float>(),
                               a.size(0), a.size(1), b.size(1), scope.stream());
    TORCH_CHECK(err == cudaSuccess, "fusedwarm.pam_matmul: launching the ", Dev::kName, " kernel on ", a.device(),
                " for shapes ", a.sizes(), " and ", b.sizes(), " failed: ", cudaGetErrorString(err));
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
