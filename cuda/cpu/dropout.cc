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

void dropout_forward(ThreadPool& pool, float* x, int64_t n, float rate, uint64_t seed, uint64_t site) {
  if (rate <= 0.f) return;
  const DropoutMask mask(rate, seed, site);
  pool.parallel_for(n, 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) x[i] = mask.kept(i) ? x[i] * mask.keep_scale : 0.f;  // (a dropped inf is 0 too)
  });
}

void dropout_backward(ThreadPool& pool, float* dx, int64_t n, float rate, uint64_t seed, uint64_t site) {
  dropout_forward(pool, dx, n, rate, seed, site);  // the same mask and scale
}

}  // namespace cpu
}  // namespace tfew
