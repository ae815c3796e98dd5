// CUDA backend host adapter (layers 2-3 of DESIGN.md): turns the checked tensor lists of a call
// into TensorSlots for the torch-free kernels in step_kernels.cu, launches them on the current
// stream without synchronizing, and registers the CUDA implementations of the ops.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/step_kernels.h"
#include "ops_impl.h"

namespace fusedwarm {

struct CudaBackend {
  template <class Rule>
  static void run(const StepLists& L, const typename Rule::Hyper& h);
};

namespace {

bool vector_aligned(const void* p) { return reinterpret_cast<uintptr_t>(p) % gpu::kVectorAlign == 0; }

template <class Rule, class P, class S, class M>
void run_typed(const StepLists& L, const typename Rule::Hyper& h) {
  int64_t num_slots = 0;
  for (const at::Tensor& p : L.params) num_slots += p.numel() > 0 ? 1 : 0;
  if (num_slots == 0) return;

  const at::Device device = L.params[0].device();
  const c10::cuda::CUDAGuard guard(device);
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream(device.index());

  // The slots go through pinned memory: the non-blocking copy_ records its stream on the
  // caching host allocator, so the buffer is not reused before the copy has run (nor, when the
  // copy is captured into a CUDA graph, for the graph's lifetime). The device copy is freed to
  // the caching allocator on this same stream, so the kernel below is done with it before reuse.
  const int64_t bytes = num_slots * static_cast<int64_t>(sizeof(gpu::TensorSlot));
  at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
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
  const cudaError_t err = gpu::launch_step<Rule, P, S, M>(args, h, stream.stream());
  TORCH_CHECK(err == cudaSuccess, "fusedwarm: launching the CUDA step kernel on ", device, " failed: ",
              cudaGetErrorString(err));
}

at::Tensor schedule_factors_cuda(const at::Tensor& steps, double beta2, FW_SCHEDULE_PARAMS) {
  TORCH_CHECK(steps.scalar_type() == at::kLong, "fusedwarm.schedule_factors: steps must be int64, got ",
              steps.scalar_type());
  const fw::Schedule s = parse_schedule("schedule_factors", FW_SCHEDULE_ARGS, beta2, true);
  const c10::cuda::CUDAGuard guard(steps.device());
  const at::Tensor c = steps.contiguous();
  std::vector<int64_t> shape = c.sizes().vec();
  shape.push_back(4);
  at::Tensor out = at::empty(shape, c.options().dtype(at::kFloat));
  const cudaError_t err = gpu::launch_schedule_factors(c.const_data_ptr<int64_t>(), c.numel(), s,
                                                      out.data_ptr<float>(),
                                                      c10::cuda::getCurrentCUDAStream(steps.device().index()));
  TORCH_CHECK(err == cudaSuccess, "fusedwarm: launching the schedule kernel on ", steps.device(), " failed: ",
              cudaGetErrorString(err));
  return out;
}

}  // namespace

template <class Rule>
void CudaBackend::run(const StepLists& L, const typename Rule::Hyper& h) {
  dispatch_step(L, [&](auto p, auto s, auto m) {
    run_typed<Rule, typename decltype(p)::type, typename decltype(s)::type, typename decltype(m)::type>(L, h);
  });
}

TORCH_LIBRARY_IMPL(fusedwarm, CUDA, m) {
  m.impl("adamw_", &OpImpls<CudaBackend>::adamw_);
  m.impl("sgd_", &OpImpls<CudaBackend>::sgd_);
  m.impl("lion_", &OpImpls<CudaBackend>::lion_);
  m.impl("schedule_factors", &schedule_factors_cuda);
}

}  // namespace fusedwarm
