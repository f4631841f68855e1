// Inverted dropout (keep with probability 1 - rate, scale kept values by 1/(1 - rate)). The mask bit of
// element `index` at dropout site `site` is a hash of (seed, site, index): no mask is stored, the backward
// pass regenerates it, and results do not depend on threading.
#include "cpu_ops.h"

namespace tfew {
namespace cpu {

static inline uint64_t splitmix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

bool dropout_keep(uint64_t seed, uint64_t site, uint64_t index, float rate) {
  uint64_t h = splitmix64(seed ^ splitmix64(site * 0x100000001b3ull ^ splitmix64(index)));
  double u = static_cast<double>(h >> 11) * (1.0 / 9007199254740992.0);  // [0, 1)
  return u >= rate;
}

void dropout_forward(float* x, int64_t n, float rate, uint64_t seed, uint64_t site) {
  if (rate <= 0.f) return;
  float keep_scale = 1.f / (1.f - rate);
  for (int64_t i = 0; i < n; ++i) x[i] = dropout_keep(seed, site, i, rate) ? x[i] * keep_scale : 0.f;
}

void dropout_backward(float* dx, int64_t n, float rate, uint64_t seed, uint64_t site) {
  dropout_forward(dx, n, rate, seed, site);  // the same mask and scale
}

}  // namespace cpu
}  // namespace tfew
