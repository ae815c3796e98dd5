// Kernel variants compiled on first use: the request to fusedwarm._build and the loading of
// shared libraries (variants.h).
#include "variants.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <dlfcn.h>

#include <mutex>
#include <unordered_map>

namespace fusedwarm {

std::string variant_file(const std::string& backend, const std::string& name) {
  const auto handle = c10::Dispatcher::singleton().findSchema({"fusedwarm_jit::variant_file", ""});
  TORCH_CHECK(handle.has_value(), "fusedwarm: the kernel variant '", name, "' (", backend,
              ") is compiled on first use by the Python package, which registers fusedwarm_jit::variant_file; "
              "load this library through 'import fusedwarm' rather than torch.ops.load_library");
  static const auto op = handle->typed<std::string(const std::string&, const std::string&)>();
  return op.call(backend, name);
}

void* library_symbol(const std::string& path, const char* symbol) {
  static std::mutex mutex;
  static std::unordered_map<std::string, void*> opened;
  const std::lock_guard<std::mutex> lock(mutex);
  void*& handle = opened[path];
  if (handle == nullptr) {
    handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    TORCH_CHECK(handle != nullptr, "fusedwarm: loading the kernel library ", path, " failed: ", dlerror(),
                " (delete it to have it rebuilt)");
  }
  void* found = dlsym(handle, symbol);
  TORCH_CHECK(found != nullptr, "fusedwarm: the kernel library ", path, " has no symbol ", symbol,
              " (delete it to have it rebuilt)");
  return found;
}

}  // namespace fusedwarm
