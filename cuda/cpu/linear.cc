// Linear layers: y = x W^T, and the input gradient dx = dy W. Rows of x split over the thread pool; the inner
// loops run over contiguous memory so the compiler vectorises them.
#include <algorithm>
#include <cstring>

#include "cpu_ops.h"

namespace tfew {
namespace cpu {

void linear_forward(ThreadPool& pool, const float* x, const float* w, float* y, int64_t n, int in, int out) {
  constexpr int kRowBlock = 4;  // rows of x sharing one pass over W
  int64_t row_blocks = (n + kRowBlock - 1) / kRowBlock;
  pool.parallel_for(row_blocks * out, 256, [&](int64_t begin, int64_t end) {
    for (int64_t job = begin; job < end; ++job) {
      int64_t rb = job / out;
      int o = static_cast<int>(job % out);
      const float* wo = w + static_cast<int64_t>(o) * in;
      int64_t r0 = rb * kRowBlock, r1 = std::min<int64_t>(n, r0 + kRowBlock);
      for (int64_t r = r0; r < r1; ++r) {
        const float* xr = x + r * in;
        float acc = 0.f;
        for (int i = 0; i < in; ++i) acc += xr[i] * wo[i];
        y[r * out + o] = acc;
      }
    }
  });
}

void linear_backward_input(ThreadPool& pool, const float* dy, const float* w, float* dx, int64_t n, int in, int out,
                           bool accumulate) {
  pool.parallel_for(n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* dxr = dx + r * in;
      if (!accumulate) std::memset(dxr, 0, sizeof(float) * in);
      const float* dyr = dy + r * out;
      for (int o = 0; o < out; ++o) {
        float g = dyr[o];
        if (g == 0.f) continue;
        const float* wo = w + static_cast<int64_t>(o) * in;
        for (int i = 0; i < in; ++i) dxr[i] += g * wo[i];
      }
    }
  });
}

}  // namespace cpu
}  // namespace tfew
