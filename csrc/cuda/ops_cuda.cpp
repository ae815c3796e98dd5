// CUDA backend host adapter (layers 2-3 of DESIGN.md): the real GPU as host.h's device policy,
// and the CUDA registrations of the ops.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <mutex>
#include <vector>

#include "cuda/host.h"

namespace fusedwarm {

namespace {

struct CudaDevice {
  static constexpr const char* kName = "CUDA";

  class Scope {
   public:
    explicit Scope(const at::Device& device)
        : guard_(device), stream_(c10::cuda::getCurrentCUDAStream(device.index()).stream()) {}
    cudaStream_t stream() const { return stream_; }

   private:
    c10::cuda::CUDAGuard guard_;
    cudaStream_t stream_;
  };

  static at::Tensor staging(int64_t bytes) {
    return at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  }

  // A graph replays its captured host-to-device copy from the same pinned address. torch's
  // caching host allocator keeps a block used by a capture for the graph's lifetime only in
  // recent releases; older ones (which setup.py admits) may give it to a new owner after the
  // capture, and the graph would then read someone else's bytes at replay. A staging buffer used
  // during capture is therefore kept for the life of the process (one slot table per capture).
  static void keep_until_replay(const at::Tensor& staging, cudaStream_t stream) {
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    const cudaError_t err = cudaStreamIsCapturing(stream, &status);
    TORCH_CHECK(err == cudaSuccess, "fusedwarm: querying the CUDA stream's capture status failed: ",
                cudaGetErrorString(err));
    if (status == cudaStreamCaptureStatusNone) return;
    static std::mutex mutex;
    static std::vector<at::Tensor> kept;
    const std::lock_guard<std::mutex> lock(mutex);
    kept.push_back(staging);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(fusedwarm, CUDA, m) { register_device_ops<CudaDevice>(m); }

}  // namespace fusedwarm
