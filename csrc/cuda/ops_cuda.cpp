// CUDA backend host adapter (layers 2-3 of DESIGN.md): a real GPU as host.h's device policy, and
// the CUDA registrations of the ops.
//
// It needs no CUDA toolkit to build: the kernels are NVRTC-compiled cubins (fusedwarm/_build.py),
// loaded and launched through the CUDA driver (libcuda.so.1, present wherever a GPU is), whose
// few entry points are looked up at run time; torch gives the device guard, the current stream
// (c10::Stream::native_handle) and memory. The driver API's C ABI is stable, so it is declared
// here rather than included.
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <dlfcn.h>

#include <fstream>
#include <iterator>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "cuda/host.h"
#include "variants.h"

namespace fusedwarm {

namespace {

using CUresult = int;
using CUdevice = int;
using CUcontext = void*;
using CUmodule = void*;
using CUfunction = void*;
using CUstream = void*;
constexpr CUresult kCudaSuccess = 0;
constexpr int kAttrMultiprocessorCount = 16;      // CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT
constexpr int kAttrComputeCapabilityMajor = 75;   // CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
constexpr int kAttrComputeCapabilityMinor = 76;   // CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR
constexpr int kStreamCaptureStatusNone = 0;       // CU_STREAM_CAPTURE_STATUS_NONE

// The driver entry points fusedwarm uses.
struct Driver {
  CUresult (*get_error_string)(CUresult, const char**);
  CUresult (*device_get)(CUdevice*, int);
  CUresult (*primary_ctx_retain)(CUcontext*, CUdevice);
  CUresult (*ctx_get_current)(CUcontext*);
  CUresult (*ctx_set_current)(CUcontext);
  CUresult (*device_get_attribute)(int*, int, CUdevice);
  CUresult (*module_load_data)(CUmodule*, const void*);
  CUresult (*module_get_function)(CUfunction*, CUmodule, const char*);
  CUresult (*occupancy)(int*, CUfunction, int, size_t);
  CUresult (*launch)(CUfunction, unsigned int, unsigned int, unsigned int, unsigned int, unsigned int, unsigned int,
                     unsigned int, CUstream, void**, void**);
  CUresult (*stream_is_capturing)(CUstream, int*);

  std::string error(CUresult r) const {
    const char* text = nullptr;
    return get_error_string(r, &text) == kCudaSuccess && text != nullptr ? text : "CUDA error " + std::to_string(r);
  }
};

const Driver& driver() {
  static const Driver d = [] {
    void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    TORCH_CHECK(lib != nullptr, "fusedwarm: the CUDA driver (libcuda.so.1) could not be loaded: ", dlerror());
    auto get = [&](auto& fn, const char* name) {
      fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(dlsym(lib, name));
      TORCH_CHECK(fn != nullptr, "fusedwarm: the CUDA driver has no ", name, "; update the NVIDIA driver");
    };
    Driver r{};
    get(r.get_error_string, "cuGetErrorString");
    get(r.device_get, "cuDeviceGet");
    get(r.primary_ctx_retain, "cuDevicePrimaryCtxRetain");
    get(r.ctx_get_current, "cuCtxGetCurrent");
    get(r.ctx_set_current, "cuCtxSetCurrent");
    get(r.device_get_attribute, "cuDeviceGetAttribute");
    get(r.module_load_data, "cuModuleLoadData");
    get(r.module_get_function, "cuModuleGetFunction");
    get(r.occupancy, "cuOccupancyMaxActiveBlocksPerMultiprocessor");
    get(r.launch, "cuLaunchKernel");
    get(r.stream_is_capturing, "cuStreamIsCapturing");
    return r;
  }();
  return d;
}

void check(CUresult r, const char* what, const at::Device& device) {
  TORCH_CHECK(r == kCudaSuccess, "fusedwarm: ", what, " on ", device, " failed: ", driver().error(r));
}

// Makes the device's primary context (the one torch's CUDA runtime uses) current on this thread,
// for the driver calls that follow: a thread that has not made a runtime call yet (autograd's
// backward thread, running the step in backward) may have no current context.
void bind_primary_context(const at::Device& device) {
  static std::mutex mutex;
  static std::map<int, CUcontext> contexts;
  CUcontext ctx = nullptr;
  {
    const std::lock_guard<std::mutex> lock(mutex);
    CUcontext& known = contexts[device.index()];
    if (known == nullptr) {
      CUdevice dev = 0;
      check(driver().device_get(&dev, device.index()), "finding the CUDA device", device);
      check(driver().primary_ctx_retain(&known, dev), "retaining the primary CUDA context", device);
    }
    ctx = known;
  }
  CUcontext current = nullptr;
  check(driver().ctx_get_current(&current), "querying the current CUDA context", device);
  if (current != ctx) check(driver().ctx_set_current(ctx), "making the primary CUDA context current", device);
}

// The attribute of the device (CU_DEVICE_ATTRIBUTE_*).
int attribute(int which, const at::Device& device) {
  CUdevice dev = 0;
  int value = 0;
  check(driver().device_get(&dev, device.index()), "finding the CUDA device", device);
  check(driver().device_get_attribute(&value, which, dev), "querying the CUDA device", device);
  return value;
}

struct CudaDevice {
  static constexpr const char* kName = "CUDA";
  using Kernel = CUfunction;

  class Scope {
   public:
    explicit Scope(const at::Device& device)
        : guard_(device),
          stream_(c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(device).native_handle()) {
      bind_primary_context(device);
    }
    void* stream() const { return stream_; }

   private:
    c10::DeviceGuard guard_;
    void* stream_;
  };

  // The kernel from the module's cubin, NVRTC-compiled for this device's architecture on first
  // use and loaded into its primary context (current under the Scope's device guard).
  static Kernel kernel(const std::string& module, const char* name, const at::Device& device) {
    static LoadedOnce<std::tuple<int, std::string, std::string>, Kernel> kernels;
    static LoadedOnce<std::pair<int, std::string>, CUmodule> modules;
    return kernels.get({device.index(), module, name}, [&] {
      const CUmodule mod = modules.get({device.index(), module}, [&] {
        const int arch = 10 * attribute(kAttrComputeCapabilityMajor, device) + attribute(kAttrComputeCapabilityMinor,
                                                                                          device);
        const std::string path = variant_file("cuda-sm_" + std::to_string(arch), module);
        std::ifstream in(path, std::ios::binary);
        TORCH_CHECK(in, "fusedwarm: reading the kernel module ", path, " failed");
        const std::vector<char> image((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
        CUmodule loaded = nullptr;
        check(driver().module_load_data(&loaded, image.data()), ("loading " + path).c_str(), device);
        return loaded;
      });
      Kernel k = nullptr;
      check(driver().module_get_function(&k, mod, name), (std::string("finding kernel ") + name).c_str(), device);
      return k;
    });
  }

  // Multiprocessors x blocks of kThreads the kernel can keep resident on each: queried once per
  // kernel and device.
  static int64_t resident_blocks(Kernel kernel, const at::Device& device) {
    static LoadedOnce<std::pair<int, Kernel>, int64_t> known;
    return known.get({device.index(), kernel}, [&] {
      const int sms = attribute(kAttrMultiprocessorCount, device);
      int per_sm = 0;
      check(driver().occupancy(&per_sm, kernel, kThreads, 0), "the occupancy query", device);
      return static_cast<int64_t>(sms) * (per_sm > 0 ? per_sm : 1);
    });
  }


  static void launch(Kernel kernel, Dim3 grid, Dim3 block, void* stream, void** params, const char* what,
                     const at::Device& device) {
    const CUresult r =
        driver().launch(kernel, grid.x, grid.y, grid.z, block.x, block.y, block.z, 0, stream, params, nullptr);
    TORCH_CHECK(r == kCudaSuccess, "fusedwarm: launching the CUDA ", what, " kernel on ", device,
                " failed: ", driver().error(r));
  }

  static at::Tensor staging(int64_t bytes) {
    return at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  }

  // A graph replays its captured host-to-device copy from the same pinned address. torch's
  // caching host allocator keeps a block used by a capture for the graph's lifetime only in
  // recent releases; older ones (which setup.py admits) may give it to a new owner after the
  // capture, and the graph would then read someone else's bytes at replay. A staging buffer used
  // during capture is therefore kept for the life of the process (one slot table per capture).
  static void keep_until_replay(const at::Tensor& staging, void* stream) {
    int status = kStreamCaptureStatusNone;
    const CUresult r = driver().stream_is_capturing(stream, &status);
    TORCH_CHECK(r == kCudaSuccess, "fusedwarm: querying the CUDA stream's capture status failed: ", driver().error(r));
    if (status == kStreamCaptureStatusNone) return;
    static std::mutex mutex;
    static std::vector<at::Tensor> kept;
    const std::lock_guard<std::mutex> lock(mutex);
    kept.push_back(staging);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(fusedwarm, CUDA, m) { register_device_ops<CudaDevice>(m); }

}  // namespace fusedwarm
