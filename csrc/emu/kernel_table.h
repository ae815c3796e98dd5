// The emulated device's view of a kernel file: after the file (which lists its extern "C" kernels
// as FW_KERNELS), the one entry point the host path looks up in the compiled library,
//   extern "C" fusedwarm::emu::BoxedLaunch fusedwarm_emu_kernel(const char* name);
// the boxed launch of kernel `name`, or nullptr if the file has no such kernel.
#pragma once
#include <cstring>

#define FW_EMU_TABLE_ENTRY(kernel) {#kernel, &fusedwarm::emu::launch_boxed<kernel>},

extern "C" fusedwarm::emu::BoxedLaunch fusedwarm_emu_kernel(const char* name) {
  static const struct {
    const char* name;
    fusedwarm::emu::BoxedLaunch launch;
  } table[] = {FW_KERNELS(FW_EMU_TABLE_ENTRY)};
  for (const auto& entry : table) {
    if (std::strcmp(entry.name, name) == 0) return entry.launch;
  }
  return nullptr;
}
