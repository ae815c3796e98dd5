// The emulated CUDA device's operators (DESIGN.md, layer 3): the CUDA backend's host path
// (cuda/host.h) with CPU memory standing in for device memory and the kernels run by the
// emulator (runtime.cpp), registered as namespace fusedwarm_emu on CPU tensors. Its schemas are
// the main library's (define_ops), so fusedwarm.emulator can send any call of a fusedwarm op
// that the CUDA backend implements here instead, through the same Python code.
#include <torch/library.h>

#include <string>
#include <utility>

#include "cuda/host.h"
#include "emu/runtime.h"
#include "variants.h"

namespace fusedwarm {

namespace {

struct EmuDevice {
  static constexpr const char* kName = "emulated CUDA";
  using Kernel = emu::BoxedLaunch;

  class Scope {
   public:
    explicit Scope(const at::Device& device) {
      TORCH_CHECK(device.is_cpu(), "fusedwarm_emu: the emulated CUDA device works on CPU tensors, got ", device);
    }
    void* stream() const { return nullptr; }
  };

  // The kernel from the module's library, compiled by g++ on first use (variants.h).
  static Kernel kernel(const std::string& module, const char* name, const at::Device&) {
    static LoadedOnce<std::pair<std::string, std::string>, Kernel> kernels;
    return kernels.get({module, name}, [&] {
      using Table = Kernel (*)(const char*);
      const auto table = reinterpret_cast<Table>(library_symbol(variant_file("emu", module), "fusedwarm_emu_kernel"));
      const Kernel k = table(name);
      TORCH_CHECK(k != nullptr, "fusedwarm_emu: the kernel library of ", module, " has no kernel ", name);
      return k;
    });
  }

  // What a GPU's occupancy query returns, as configured (emu::Config).
  static int64_t resident_blocks(Kernel, const at::Device&) {
    int sms = 0;
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
    return static_cast<int64_t>(sms) * emu::blocks_per_multiprocessor();
  }

  static void launch(Kernel kernel, Dim3 grid, Dim3 block, void*, void** params, const char* what,
                     const at::Device& device) {
    const cudaError_t err = kernel(dim3(grid.x, grid.y, grid.z), dim3(block.x, block.y, block.z), params);
    TORCH_CHECK(err == cudaSuccess, "fusedwarm: launching the ", kName, " ", what, " kernel on ", device,
                " failed: ", cudaGetErrorString(err));
  }

  static at::Tensor staging(int64_t bytes) { return at::empty({bytes}, at::TensorOptions().dtype(at::kByte)); }

  static void keep_until_replay(const at::Tensor&, void*) {}
};

void configure(int64_t sms, int64_t blocks_per_sm, c10::string_view order, int64_t seed) {
  TORCH_CHECK(sms >= 1 && sms <= 1024, "fusedwarm_emu.configure: sms must be in [1, 1024], got ", sms);
  TORCH_CHECK(blocks_per_sm >= 1 && blocks_per_sm <= 64,
              "fusedwarm_emu.configure: blocks_per_sm must be in [1, 64], got ", blocks_per_sm);
  emu::Config c;
  c.sms = static_cast<int>(sms);
  c.blocks_per_sm = static_cast<int>(blocks_per_sm);
  if (order == "forward") {
    c.order = emu::Order::kForward;
  } else if (order == "reverse") {
    c.order = emu::Order::kReverse;
  } else if (order == "shuffle") {
    c.order = emu::Order::kShuffle;
  } else {
    TORCH_CHECK(false, "fusedwarm_emu.configure: order must be 'forward', 'reverse' or 'shuffle', got '", order, "'");
  }
  c.seed = static_cast<uint64_t>(seed);
  emu::configure(c);
}

std::vector<int64_t> counters() {
  const emu::Counters c = emu::read_counters();
  return {c.launches, c.blocks, c.threads};
}

}  // namespace

TORCH_LIBRARY(fusedwarm_emu, m) {
  define_ops(m);
  m.def("configure(int sms, int blocks_per_sm, str order, int seed) -> ()", &configure);
  m.def("counters() -> int[]", &counters);
}

TORCH_LIBRARY_IMPL(fusedwarm_emu, CPU, m) { register_device_ops<EmuDevice>(m); }

}  // namespace fusedwarm
