// The emulated CUDA device's runtime (DESIGN.md, layer 2): grids, blocks, and the threads of a
// block as fibers (ucontext), for the kernels compiled against cuda_runtime.h.
//
// A launch validates its configuration as a GPU does, then runs the blocks one at a time in the
// configured order. The threads of a block run in phases: each thread runs until it reaches
// __syncthreads or returns, in the configured thread order; once every thread has, the next
// phase resumes the ones waiting at the barrier. A block whose threads reach different barriers
// (some returned while others wait) fails the launch. Launches are serialized by one mutex, so
// the coordinates and __shared__ variables are plain globals.
#include <ucontext.h>

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <numeric>
#include <vector>

#include "cuda_runtime.h"
#include "emu/runtime.h"

uint3 threadIdx;
uint3 blockIdx;
dim3 blockDim;
dim3 gridDim;

namespace fusedwarm {
namespace emu {
namespace {

constexpr size_t kStackBytes = size_t{256} << 10;  // per thread; kernels use a few KiB

Config config;
Counters counters;
std::mutex launch_mutex;
cudaError_t last_error = cudaSuccess;

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  uint3 index;
  bool done = false;
};

struct Block {
  ucontext_t scheduler;
  std::vector<Fiber> fibers;  // grows to the largest block launched; stacks are reused
  Fiber* current = nullptr;
  void (*thread)(void*) = nullptr;
  void* context = nullptr;
} block;

void fiber_main() {
  block.thread(block.context);
  block.current->done = true;  // returning resumes the scheduler (uc_link)
}

// xorshift64*: the shuffled orders' permutations, reproducible from Config::seed.
uint64_t next_random(uint64_t& s) {
  s ^= s >> 12;
  s ^= s << 25;
  s ^= s >> 27;
  return s * 0x2545F4914F6CDD1DULL;
}

void arrange(std::vector<uint32_t>& order, uint64_t salt) {
  std::iota(order.begin(), order.end(), 0u);
  if (config.order == Order::kReverse) {
    std::reverse(order.begin(), order.end());
  } else if (config.order == Order::kShuffle) {
    uint64_t s = (config.seed ^ (salt * 0x9E3779B97F4A7C15ULL)) | 1u;
    for (size_t i = order.size(); i > 1; --i) std::swap(order[i - 1], order[next_random(s) % i]);
  }
}

// Runs one block; false when its threads reached different barriers.
bool run_block(uint32_t threads, uint64_t salt) {
  if (block.fibers.size() < threads) block.fibers.resize(threads);
  for (uint32_t t = 0; t < threads; ++t) {
    Fiber& f = block.fibers[t];
    if (!f.stack) f.stack.reset(new char[kStackBytes]);
    f.index = uint3{t % blockDim.x, (t / blockDim.x) % blockDim.y, t / (blockDim.x * blockDim.y)};
    f.done = false;
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.get();
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = &block.scheduler;
    makecontext(&f.context, fiber_main, 0);
  }
  std::vector<uint32_t> order(threads);
  for (uint64_t phase = 0;; ++phase) {
    arrange(order, salt * 1000003u + phase);
    uint32_t waiting = 0, done = 0;
    for (uint32_t t : order) {
      Fiber& f = block.fibers[t];
      if (f.done) {
        ++done;
        continue;
      }
      threadIdx = f.index;
      block.current = &f;
      swapcontext(&block.scheduler, &f.context);
      block.current = nullptr;
      if (f.done) {
        ++done;
      } else {
        ++waiting;
      }
    }
    if (waiting == 0) return true;
    if (done > 0) return false;  // the waiting fibers are abandoned; their stacks are reused
  }
}

}  // namespace

int blocks_per_multiprocessor() { return config.blocks_per_sm; }

void configure(const Config& c) {
  const std::lock_guard<std::mutex> lock(launch_mutex);
  config = c;
}

Counters read_counters() {
  const std::lock_guard<std::mutex> lock(launch_mutex);
  return counters;
}

cudaError_t run_grid(dim3 grid, dim3 b, void (*thread)(void*), void* context) {
  const std::lock_guard<std::mutex> lock(launch_mutex);
  const uint64_t threads = uint64_t{b.x} * b.y * b.z;
  const bool valid = grid.x >= 1 && grid.y >= 1 && grid.z >= 1 && grid.x <= 0x7FFFFFFFu && grid.y <= 65535 &&
                     grid.z <= 65535 && b.x >= 1 && b.y >= 1 && b.z >= 1 && b.x <= 1024 && b.y <= 1024 &&
                     b.z <= 64 && threads <= 1024;
  if (!valid) return last_error = cudaErrorInvalidConfiguration;
  gridDim = grid;
  blockDim = b;
  block.thread = thread;
  block.context = context;
  const uint64_t blocks = uint64_t{grid.x} * grid.y * grid.z;
  std::vector<uint32_t> order(blocks);
  arrange(order, 0x5EEDu);
  ++counters.launches;
  for (uint32_t i : order) {
    blockIdx = uint3{i % grid.x, (i / grid.x) % grid.y, static_cast<unsigned int>(i / (uint64_t{grid.x} * grid.y))};
    if (!run_block(static_cast<uint32_t>(threads), i + 1)) return last_error = cudaErrorLaunchFailure;
    ++counters.blocks;
    counters.threads += threads;
  }
  return cudaSuccess;
}

}  // namespace emu
}  // namespace fusedwarm

void __syncthreads() {
  fusedwarm::emu::Fiber* f = fusedwarm::emu::block.current;
  if (f == nullptr) std::abort();  // a barrier outside a kernel: a bug in the emulator's caller
  swapcontext(&f->context, &fusedwarm::emu::block.scheduler);
}

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure:
      return "unspecified launch failure (emulated device: the threads of a block reached different __syncthreads)";
  }
  return "unknown error";
}

cudaError_t cudaGetLastError() {
  const std::lock_guard<std::mutex> lock(fusedwarm::emu::launch_mutex);
  const cudaError_t e = fusedwarm::emu::last_error;
  fusedwarm::emu::last_error = cudaSuccess;
  return e;
}

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  if (attr != cudaDevAttrMultiProcessorCount) return cudaErrorInvalidValue;
  *value = fusedwarm::emu::config.sms;
  return cudaSuccess;
}
