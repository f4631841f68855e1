// The CUDA emulator's self-test (emu_selftest.cc), exported by the emulation addon as _emulatorSelfTest(name).
#pragma once
#include <string>

namespace tfew {
namespace emu {

struct SelfTestResult {
  std::string error;    // the CUDA error name the scenario ended with, e.g. "cudaErrorIllegalAddress"
  std::string message;  // the emulator's words, and what the scenario observed
};
SelfTestResult run_self_test(const std::string& name);

// Clears the emulated context's sticky device fault and this thread's last error (self-test only: a real
// context cannot recover from a fault).
void reset_device_faults();

// The device memory each executable graph holds from now on (-1: the default, 1 KiB per node). A test fills the
// device with it to see what the engine does when a graph cannot be instantiated.
void set_graph_exec_bytes(long long bytes);

// The SM count the emulated device reports from now on (default 132; count <= 0 restores it): kernels that size their
// grid to the GPU then run more work per block.
void set_multiprocessors(int count);

// Kernel launches so far (graph replays not counted), ordinary and programmatic (kernels/launch.cuh); reset: from 0
// again after this call.
struct LaunchCounts {
  long long ordinary = 0;
  long long programmatic = 0;
};
LaunchCounts launch_counts(bool reset);

// The next `count` cudaGraphLaunch calls fail with cudaErrorMemoryAllocation (not sticky), as a launch can when the
// graph's upload finds the device full.
void fail_graph_launches(int count);

// Another process takes `bytes` of the current device's memory (replacing what it held before; 0 gives it all
// back). False, and nothing changed, when that does not fit.
bool hold_device_memory(size_t bytes);

}  // namespace emu
}  // namespace tfew
