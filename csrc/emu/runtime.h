// The emulated CUDA device's configuration and counters (runtime.cpp), for its host side
// (ops_emu.cpp) and the sanitizer driver (tests/emu/sanitize.cpp).
#pragma once
#include <cstdint>

#include "cuda_runtime_api.h"

namespace fusedwarm {
namespace emu {

// The order in which a launch runs its blocks, and each block its threads between barriers.
enum class Order { kForward, kReverse, kShuffle };

struct Config {
  int sms = 4;            // multiprocessors (cudaDevAttrMultiProcessorCount)
  int blocks_per_sm = 2;  // resident blocks per multiprocessor, for every kernel
  Order order = Order::kForward;
  uint64_t seed = 0;      // of the shuffled orders
};

// What the device has executed since the library was loaded.
struct Counters {
  int64_t launches = 0;
  int64_t blocks = 0;
  int64_t threads = 0;
};

void configure(const Config& config);
Counters read_counters();

}  // namespace emu
}  // namespace fusedwarm
