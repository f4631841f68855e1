// (IA)3 rescaling of the k and v projections: y[t, j] = x[t, j] * l[j], where l is the vector of the adapter
// that token t's example uses (mixed-task batches: one pointer per row, null = no adapter).
#include "cpu_ops.h"

namespace tfew {
namespace cpu {

void ia3_scale_forward(const float* x, const std::vector<const float*>& scale, float* y, int64_t n, int width) {
  for (int64_t t = 0; t < n; ++t) {
    const float* l = scale[t];
    for (int j = 0; j < width; ++j) y[t * width + j] = l ? x[t * width + j] * l[j] : x[t * width + j];
  }
}

void ia3_scale_backward(const float* dy, const float* x, const std::vector<const float*>& scale,
                        const std::vector<float*>& dscale, float* dx, int64_t n, int width) {
  for (int64_t t = 0; t < n; ++t) {
    const float* l = scale[t];
    float* dl = dscale[t];
    for (int j = 0; j < width; ++j) {
      float g = dy[t * width + j];
      if (dl) dl[j] += g * x[t * width + j];
      dx[t * width + j] = l ? g * l[j] : g;
    }
  }
}

}  // namespace cpu
}  // namespace tfew
