// The streams whose kernel launches may overlap the kernel before them (kernels/launch.cuh).
#include <algorithm>
#include <mutex>
#include <vector>

#include "kernels/launch.cuh"

namespace tfew {
namespace kernels {

namespace {
std::mutex g_streams_mutex;
std::vector<cudaStream_t> g_streams;  // one per engine that asked: a few at most
}  // namespace

void set_programmatic_launch(cudaStream_t stream, bool on) {
  std::lock_guard<std::mutex> lock(g_streams_mutex);
  const auto it = std::find(g_streams.begin(), g_streams.end(), stream);
  if (on && it == g_streams.end()) g_streams.push_back(stream);
  if (!on && it != g_streams.end()) g_streams.erase(it);
}

bool programmatic_launch(cudaStream_t stream) {
  std::lock_guard<std::mutex> lock(g_streams_mutex);
  return std::find(g_streams.begin(), g_streams.end(), stream) != g_streams.end();
}

}  // namespace kernels
}  // namespace tfew
