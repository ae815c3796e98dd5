// Kernel variants compiled on first use (DESIGN.md, layer 4 builds them; this finds them).
//
// A step needs one variant of the kernels (step_abi.h). The first call that needs it asks
// fusedwarm._build for its file through the op fusedwarm_jit::variant_file, which the Python
// package registers before it loads this library; _build compiles the variant into its cache if
// it is not there yet (file-locked, so parallel processes compile it once) and returns the path.
#pragma once
#include <map>
#include <mutex>
#include <string>

namespace fusedwarm {

// The compiled file of kernel module `name` for `backend`: "cpu" (shared library of a CPU step
// variant), "emu" (shared library of the emulated device's kernels) or "cuda-sm_<major><minor>"
// (cubin). `name` is a step variant (step_variant) or "misc" (cuda/misc_kernels.cu).
std::string variant_file(const std::string& backend, const std::string& name);

// dlopen(path) (once per path; never closed) and dlsym(symbol); errors name both.
void* library_symbol(const std::string& path, const char* symbol);

// Loaded kernels (or entry points, or facts about them) by key, made by the first call that needs
// one. The lookup of a ready one takes a lock; making one (which may compile a variant, for
// seconds) runs outside it, so other threads' calls of ready kernels do not wait for a compile
// (two threads that miss at once may both make it: the first one stored is the one used).
template <class Key, class Value>
class LoadedOnce {
 public:
  template <class Make>
  Value get(const Key& key, Make&& make) {
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      const auto it = loaded_.find(key);
      if (it != loaded_.end()) return it->second;
    }
    const Value value = make();
    const std::lock_guard<std::mutex> lock(mutex_);
    return loaded_.emplace(key, value).first->second;
  }

 private:
  std::mutex mutex_;
  std::map<Key, Value> loaded_;
};

}  // namespace fusedwarm
