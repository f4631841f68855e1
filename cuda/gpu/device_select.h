// Which GPU the backend uses: $TFEW_CUDA_DEVICE (an index among the visible devices), else 0.
#pragma once
#include <cstdlib>
#include <string>

namespace tfew {
namespace gpu {

// Returns the device index, or -1 with *error set when $TFEW_CUDA_DEVICE is not a visible device.
inline int selected_device(int device_count, std::string* error) {
  const char* env = std::getenv("TFEW_CUDA_DEVICE");
  if (!env || !env[0]) return 0;
  char* end = nullptr;
  long v = std::strtol(env, &end, 10);
  if (*end != '\0' || v < 0 || v >= device_count) {
    if (error)
      *error = std::string("TFEW_CUDA_DEVICE=\"") + env + "\" is not one of the " +
               std::to_string(device_count) + " visible GPU(s)";
    return -1;
  }
  return static_cast<int>(v);
}

}  // namespace gpu
}  // namespace tfew
