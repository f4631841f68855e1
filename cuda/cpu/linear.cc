// Linear layers: y = x W^T, and the input gradient dx = dy W (T5 has no biases). The forward is a register-
// blocked kernel: 4 rows of x against 2 rows of W at a time, 4-float vector accumulators (GCC/Clang vector
// extensions: SSE on x86-64, NEON on arm64, no -march needed), so each loaded value is used several times.
#include <algorithm>
#include <cstring>

#include "cpu_ops.h"

namespace tfew {
namespace cpu {

typedef float v4 __attribute__((vector_size(16)));

static inline v4 load4(const float* p) {
  v4 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
static inline float hsum(v4 v) { return (v[0] + v[1]) + (v[2] + v[3]); }

// y[r, o] for r in [r0, r0 + nr), o in [o0, o0 + no), nr <= 4, no <= 2.
static void block(const float* x, const float* w, float* y, int64_t r0, int nr, int o0, int no, int in, int out) {
  v4 acc[4][2] = {};
  const float* xr[4];
  const float* wo[2];
  for (int a = 0; a < 4; ++a) xr[a] = x + (r0 + std::min(a, nr - 1)) * in;
  for (int b = 0; b < 2; ++b) wo[b] = w + static_cast<int64_t>(o0 + std::min(b, no - 1)) * in;
  int i = 0;
  for (; i + 4 <= in; i += 4) {
    v4 w0 = load4(wo[0] + i), w1 = load4(wo[1] + i);
    for (int a = 0; a < 4; ++a) {
      v4 xv = load4(xr[a] + i);
      acc[a][0] += xv * w0;
      acc[a][1] += xv * w1;
    }
  }
  for (int a = 0; a < nr; ++a)
    for (int b = 0; b < no; ++b) {
      float s = hsum(acc[a][b]);
      for (int k = i; k < in; ++k) s += xr[a][k] * wo[b][k];
      y[(r0 + a) * out + o0 + b] = s;
    }
}

void linear_forward(ThreadPool& pool, const float* x, const float* w, float* y, int64_t n, int in, int out) {
  // Jobs are panels of 4 rows x 64 outputs: W's panel (64 rows of `in`) stays in cache across the 4 rows.
  constexpr int kRows = 4, kCols = 64;
  int64_t row_blocks = (n + kRows - 1) / kRows, col_blocks = (out + kCols - 1) / kCols;
  pool.parallel_for(row_blocks * col_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t job = begin; job < end; ++job) {
      int64_t rb = job % row_blocks, cb = job / row_blocks;
      int64_t r0 = rb * kRows;
      int nr = static_cast<int>(std::min<int64_t>(kRows, n - r0));
      int c_end = static_cast<int>(std::min<int64_t>(out, (cb + 1) * kCols));
      for (int o = static_cast<int>(cb * kCols); o < c_end; o += 2) block(x, w, y, r0, nr, o, std::min(2, c_end - o), in, out);
    }
  });
}

void linear_backward_input(ThreadPool& pool, const float* dy, const float* w, float* dx, int64_t n, int in, int out,
                           bool accumulate) {
  // Blocks of 4 rows: each row of W is read once per block and updates 4 rows of dx (vectorised axpy).
  constexpr int kRows = 4;
  int64_t row_blocks = (n + kRows - 1) / kRows;
  pool.parallel_for(row_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t rb = begin; rb < end; ++rb) {
      int64_t r0 = rb * kRows;
      int nr = static_cast<int>(std::min<int64_t>(kRows, n - r0));
      if (!accumulate) std::memset(dx + r0 * in, 0, sizeof(float) * in * nr);
      for (int o = 0; o < out; ++o) {
        const float* wo = w + static_cast<int64_t>(o) * in;
        float g[kRows] = {0.f, 0.f, 0.f, 0.f};
        bool any = false;
        for (int a = 0; a < nr; ++a) {
          g[a] = dy[(r0 + a) * out + o];
          any = any || g[a] != 0.f;
        }
        if (!any) continue;
        if (nr == kRows) {
          float* __restrict__ d0 = dx + r0 * in;
          float* __restrict__ d1 = d0 + in;
          float* __restrict__ d2 = d1 + in;
          float* __restrict__ d3 = d2 + in;
          const float* __restrict__ wr = wo;
          for (int i = 0; i < in; ++i) {
            float wv = wr[i];
            d0[i] += g[0] * wv;
            d1[i] += g[1] * wv;
            d2[i] += g[2] * wv;
            d3[i] += g[3] * wv;
          }
        } else {
          for (int a = 0; a < nr; ++a) {
            float* d = dx + (r0 + a) * in;
            for (int i = 0; i < in; ++i) d[i] += g[a] * wo[i];
          }
        }
      }
    }
  });
}

}  // namespace cpu
}  // namespace tfew
