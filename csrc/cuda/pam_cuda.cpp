// CUDA host adapter of fusedwarm.pam (layers 2-3 of DESIGN.md): raw pointers and the current
// stream for the torch-free kernels in pam_kernels.cu, and the CUDA registrations of the ops.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/pam_kernels.h"
#include "pam_impl.h"

namespace fusedwarm {

namespace {

struct PamCuda {
  static void elementwise(fw::PamOp op, const at::Tensor& a, const at::Tensor& b, at::Tensor& out) {
    const c10::cuda::CUDAGuard guard(a.device());
    const cudaError_t err =
        gpu::launch_pam_elementwise(op, a.const_data_ptr<float>(), b.defined() ? b.const_data_ptr<float>() : nullptr,
                                    out.data_ptr<float>(), a.numel(), c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(err == cudaSuccess, "fusedwarm.pam: launching the element-wise kernel on ", a.device(),
                " failed: ", cudaGetErrorString(err));
  }

  static void matmul(const at::Tensor& a, const at::Tensor& b, at::Tensor& out) {
    const c10::cuda::CUDAGuard guard(a.device());
    const cudaError_t err =
        gpu::launch_pam_matmul(a.const_data_ptr<float>(), b.const_data_ptr<float>(), out.data_ptr<float>(),
                               a.size(0), a.size(1), b.size(1), c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(err == cudaSuccess, "fusedwarm.pam_matmul: launching the kernel on ", a.device(), " for shapes ",
                a.sizes(), " and ", b.sizes(), " failed: ", cudaGetErrorString(err));
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(fusedwarm, CUDA, m) {
  m.impl("pam_mul", &PamImpls<PamCuda>::mul);
  m.impl("pam_div", &PamImpls<PamCuda>::div);
  m.impl("pam_sqrt", &PamImpls<PamCuda>::sqrt);
  m.impl("pam_exp2", &PamImpls<PamCuda>::exp2);
  m.impl("pam_log2", &PamImpls<PamCuda>::log2);
  m.impl("pam_matmul", &PamImpls<PamCuda>::matmul);
}

}  // namespace fusedwarm
