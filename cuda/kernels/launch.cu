// The streams whose kernel launches may overlap the kernel before them (kernels/launch.cuh), and whether the loaded
// kernels can; the streams whose fused encoder attention runs its higher-occupancy instances.
#include <algorithm>
#include <atomic>
#include <mutex>
#include <vector>

#include "kernels/launch.cuh"

namespace tfew {
namespace kernels {

namespace {
// The streams with a setting switched on: one per engine that asked, a few at most. Lookups skip the lock while
// the set is empty (every launch asks).
class StreamSet {
 public:
  void set(cudaStream_t stream, bool on) {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto it = std::find(streams_.begin(), streams_.end(), stream);
    if (on && it == streams_.end()) streams_.push_back(stream);
    if (!on && it != streams_.end()) streams_.erase(it);
    count_.store(static_cast<int>(streams_.size()));
  }
  bool has(cudaStream_t stream) {
    if (count_.load(std::memory_order_relaxed) == 0) return false;
    std::lock_guard<std::mutex> lock(mutex_);
    return std::find(streams_.begin(), streams_.end(), stream) != streams_.end();
  }

 private:
  std::mutex mutex_;
  std::vector<cudaStream_t> streams_;
  std::atomic<int> count_{0};
};
StreamSet g_programmatic_streams;
StreamSet g_attention_occupancy_streams;

// Compiled as every kernel here is: it says for which architecture the code this GPU runs was compiled (the wait
// is there from 900 on).
__global__ void programmatic_probe_kernel(int* arch) {
  wait_for_previous_kernel();
#if defined(__CUDA_ARCH__)
  *arch = __CUDA_ARCH__;
#endif
}
}  // namespace

void set_programmatic_launch(cudaStream_t stream, bool on) { g_programmatic_streams.set(stream, on); }
bool programmatic_launch(cudaStream_t stream) { return g_programmatic_streams.has(stream); }
void set_attention_occupancy(cudaStream_t stream, bool on) { g_attention_occupancy_streams.set(stream, on); }
bool attention_occupancy(cudaStream_t stream) { return g_attention_occupancy_streams.has(stream); }

const char* programmatic_launch_unsupported() {
#if defined(TFEW_CUDA_EMULATION)
  return "";  // (the emulator runs the kernels' waits as they are written)
#else
#if CUDART_VERSION < 12030
  return "off (this build's CUDA runtime is older than 12.3)";
#else
  int driver = 0;
  if (cudaDriverGetVersion(&driver) != cudaSuccess || driver < 12030) {
    cudaGetLastError();
    return "off (the driver is older than CUDA 12.3)";
  }
  // (once per call: at an engine's load, outside any capture)
  int* arch_dev = nullptr;
  int arch = 0;
  bool ran = cudaMalloc(&arch_dev, sizeof(int)) == cudaSuccess;
  if (ran) {
    TFEW_LAUNCH(1, 1, 0, nullptr, programmatic_probe_kernel)(arch_dev);  // (the legacy stream: an ordinary launch)
    ran = cudaGetLastError() == cudaSuccess &&
          cudaMemcpy(&arch, arch_dev, sizeof(int), cudaMemcpyDeviceToHost) == cudaSuccess;
    cudaFree(arch_dev);
  }
  cudaGetLastError();
  if (!ran) return "off (the probe kernel did not run)";
  if (arch < 900) return "off (the kernels this GPU runs were built for an architecture before compute_90)";
  return "";
#endif
#endif
}

}  // namespace kernels
}  // namespace tfew
