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

}  // namespace emu
}  // namespace tfew
