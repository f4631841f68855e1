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

// Compiled as every kernel here is: its attributes say from which virtual architecture the loaded code came.
__global__ void programmatic_probe_kernel() { wait_for_previous_kernel(); }
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
  cudaFuncAttributes attributes;
  if (cudaFuncGetAttributes(&attributes, programmatic_probe_kernel) != cudaSuccess) {
    cudaGetLastError();
    return "off (the kernels' attributes could not be read)";
  }
  if (attributes.ptxVersion < 90) return "off (the kernels for this GPU were built without compute_90)";
  return "";
#endif
#endif
}

}  // namespace kernels
}  // namespace tfew
