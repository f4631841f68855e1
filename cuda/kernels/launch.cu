// The streams whose kernel launches may overlap the kernel before them (kernels/launch.cuh), and whether the loaded
// kernels can.
#include <algorithm>
#include <atomic>
#include <mutex>
#include <vector>

#include "kernels/launch.cuh"

namespace tfew {
namespace kernels {

namespace {
std::mutex g_streams_mutex;
std::vector<cudaStream_t> g_streams;  // one per engine that asked: a few at most
std::atomic<int> g_stream_count{0};   // (launches skip the lock while no stream is registered)

// Compiled as every kernel here is: it says for which architecture the code this GPU runs was compiled (the wait
// is there from 900 on).
__global__ void programmatic_probe_kernel(int* arch) {
  wait_for_previous_kernel();
#if defined(__CUDA_ARCH__)
  *arch = __CUDA_ARCH__;
#endif
}
}  // namespace

void set_programmatic_launch(cudaStream_t stream, bool on) {
  std::lock_guard<std::mutex> lock(g_streams_mutex);
  const auto it = std::find(g_streams.begin(), g_streams.end(), stream);
  if (on && it == g_streams.end()) g_streams.push_back(stream);
  if (!on && it != g_streams.end()) g_streams.erase(it);
  g_stream_count.store(static_cast<int>(g_streams.size()));
}

bool programmatic_launch(cudaStream_t stream) {
  if (g_stream_count.load(std::memory_order_relaxed) == 0) return false;
  std::lock_guard<std::mutex> lock(g_streams_mutex);
  return std::find(g_streams.begin(), g_streams.end(), stream) != g_streams.end();
}

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
