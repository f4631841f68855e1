// Inverted dropout (keep with probability 1 - rate, scale kept values by 1/(1 - rate)). The mask bit of
// element `index` at dropout site `site` is a hash of (seed, site, index) (core/dropout_mask.h, shared with the
// CUDA kernels): no mask is stored, the backward pass regenerates it, and results do not depend on threading.
#include "core/dropout_mask.h"
#include "cpu_ops.h"

namespace tfew {
namespace cpu {

bool dropout_keep(uint64_t seed, uint64_t site, uint64_t index, float rate) {
  return dropout_kept(dropout_stream_key(seed, site), dropout_threshold(rate), index);
}

void dropout_forward(float* x, int64_t n, float rate, uint64_t seed, uint64_t site) {
  if (rate <= 0.f) return;
  const float keep_scale = 1.f / (1.f - rate);
  const uint64_t key = dropout_stream_key(seed, site);
  const uint32_t threshold = dropout_threshold(rate);
  for (int64_t i = 0; i < n; ++i) x[i] = dropout_kept(key, threshold, i) ? x[i] * keep_scale : 0.f;
}

void dropout_backward(float* dx, int64_t n, float rate, uint64_t seed, uint64_t site) {
  dropout_forward(dx, n, rate, seed, site);  // the same mask and scale
}

}  // namespace cpu
}  // namespace tfew
