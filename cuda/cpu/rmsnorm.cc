// T5's LayerNorm is an RMSNorm: y = w * x * r with r = 1/sqrt(mean(x^2) + eps); no mean subtraction, no bias.
#include <cmath>

#include "cpu_ops.h"

namespace tfew {
namespace cpu {

void rmsnorm_forward(const float* x, const float* w, float* y, float* inv_rms, int64_t n, int d, float eps) {
  for (int64_t r = 0; r < n; ++r) {
    const float* xr = x + r * d;
    double ss = 0;
    for (int i = 0; i < d; ++i) ss += static_cast<double>(xr[i]) * xr[i];
    float inv = static_cast<float>(1.0 / std::sqrt(ss / d + eps));
    if (inv_rms) inv_rms[r] = inv;
    for (int i = 0; i < d; ++i) y[r * d + i] = w[i] * (xr[i] * inv);
  }
}

// With u = w * dy:  dx = r * u - x * r^3 * mean(u * x).
void rmsnorm_backward(const float* dy, const float* x, const float* w, const float* inv_rms, float* dx, int64_t n,
                      int d, bool accumulate) {
  for (int64_t r = 0; r < n; ++r) {
    const float* xr = x + r * d;
    const float* dyr = dy + r * d;
    float inv = inv_rms[r];
    double dot = 0;
    for (int i = 0; i < d; ++i) dot += static_cast<double>(w[i] * dyr[i]) * xr[i];
    float c = static_cast<float>(dot / d) * inv * inv * inv;
    for (int i = 0; i < d; ++i) {
      float g = inv * w[i] * dyr[i] - xr[i] * c;
      if (accumulate) dx[r * d + i] += g; else dx[r * d + i] = g;
    }
  }
}

}  // namespace cpu
}  // namespace tfew
