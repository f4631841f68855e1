// Linear layers: y = x W^T, and the input gradient dx = dy W (T5 has no biases). Both are register-blocked
// kernels with vector accumulators (GCC/Clang vector extensions), so each loaded value is used several times: the
// forward takes 4 rows of x against 2 rows of W (dot products along W's rows), the backward 4 rows of dx by 2
// vectors of columns (outer products down W's rows). On x86-64 the same kernels are compiled twice: 4-float vectors for
// any x86-64 (SSE, the build's baseline, no -march needed) and 8-float vectors for CPUs with AVX2 and FMA (chosen
// at run time: __builtin_cpu_supports). TFEW_CPU_SIMD=baseline keeps the baseline kernels (for comparisons). The
// two differ only in summation order. arm64: 4-float NEON vectors.
#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "cpu_ops.h"

namespace tfew {
namespace cpu {

typedef float v4 __attribute__((vector_size(16)));
typedef float v8 __attribute__((vector_size(32)));

#define TFEW_INLINE inline __attribute__((always_inline))

// y[r, o] for r in [r0, r0 + nr), o in [o0, o0 + no), nr <= 4, no <= 2, with vectors V of W floats. Vector values
// stay inside this body (no vector arguments or results), so inlining it into a wider-ISA caller is ABI-neutral.
template <typename V, int W>
TFEW_INLINE void block(const float* x, const float* w, float* y, int64_t r0, int nr, int o0, int no, int in, int out) {
  V acc[4][2] = {};
  const float* xr[4];
  const float* wo[2];
  for (int a = 0; a < 4; ++a) xr[a] = x + (r0 + std::min(a, nr - 1)) * in;
  for (int b = 0; b < 2; ++b) wo[b] = w + static_cast<int64_t>(o0 + std::min(b, no - 1)) * in;
  int i = 0;
  for (; i + W <= in; i += W) {
    V w0, w1;
    std::memcpy(&w0, wo[0] + i, sizeof(V));
    std::memcpy(&w1, wo[1] + i, sizeof(V));
    for (int a = 0; a < 4; ++a) {
      V xv;
      std::memcpy(&xv, xr[a] + i, sizeof(V));
      acc[a][0] += xv * w0;
      acc[a][1] += xv * w1;
    }
  }
  for (int a = 0; a < nr; ++a)
    for (int b = 0; b < no; ++b) {
      float lanes[W];
      std::memcpy(lanes, &acc[a][b], sizeof(V));
      for (int h = W / 2; h >= 1; h /= 2)  // pairwise: (0+2)+(1+3) for 4 lanes
        for (int l = 0; l < h; ++l) lanes[l] += lanes[l + h];
      float s = lanes[0];
      for (int k = i; k < in; ++k) s += xr[a][k] * wo[b][k];
      y[(r0 + a) * out + o0 + b] = s;
    }
}

// One job of the forward: 4 rows of x against a panel of up to 64 rows of W (which stays in cache).
template <typename V, int W>
TFEW_INLINE void forward_job(const float* x, const float* w, float* y, int64_t n, int in, int out, int64_t job,
                             int64_t row_blocks) {
  constexpr int kRows = 4, kCols = 64;
  int64_t rb = job % row_blocks, cb = job / row_blocks;
  int64_t r0 = rb * kRows;
  int nr = static_cast<int>(std::min<int64_t>(kRows, n - r0));
  int c_end = static_cast<int>(std::min<int64_t>(out, (cb + 1) * kCols));
  for (int o = static_cast<int>(cb * kCols); o < c_end; o += 2)
    block<V, W>(x, w, y, r0, nr, o, std::min(2, c_end - o), in, out);
}

// dx[r, i] for r in [r0, r0 + nr), i in [i0, i0 + ni): the sum over outputs o of dy[r, o] W[o, i]. A full tile
// (4 rows x 2 vectors of columns) keeps its 8 accumulators in registers while it walks down W's rows (each
// contributes 2 vector loads and 4 broadcasts of dy for 8 multiply-adds); edges take the scalar loop.
template <typename V, int W>
TFEW_INLINE void backward_tile(const float* dy, const float* w, float* dx, int64_t r0, int nr, int i0, int ni, int in,
                               int out, bool accumulate) {
  if (nr == 4 && ni == 2 * W) {
    V acc[4][2] = {};
    for (int o = 0; o < out; ++o) {
      const float* wr = w + static_cast<int64_t>(o) * in + i0;
      V w0, w1;
      std::memcpy(&w0, wr, sizeof(V));
      std::memcpy(&w1, wr + W, sizeof(V));
      for (int a = 0; a < 4; ++a) {
        const float g = dy[(r0 + a) * out + o];
        acc[a][0] += g * w0;
        acc[a][1] += g * w1;
      }
    }
    for (int a = 0; a < 4; ++a)
      for (int c = 0; c < 2; ++c) {
        float* d = dx + (r0 + a) * in + i0 + c * W;
        if (accumulate) {
          V prior;
          std::memcpy(&prior, d, sizeof(V));
          acc[a][c] += prior;
        }
        std::memcpy(d, &acc[a][c], sizeof(V));
      }
    return;
  }
  for (int a = 0; a < nr; ++a)
    for (int i = i0; i < i0 + ni; ++i) {
      float s = 0.f;
      for (int o = 0; o < out; ++o) s += dy[(r0 + a) * out + o] * w[static_cast<int64_t>(o) * in + i];
      float* d = dx + (r0 + a) * in + i;
      *d = accumulate ? *d + s : s;
    }
}

// One job of the input gradient: 4 rows of dx by a panel of up to 64 columns.
template <typename V, int W>
TFEW_INLINE void backward_job(const float* dy, const float* w, float* dx, int64_t n, int in, int out, bool accumulate,
                              int64_t job, int64_t row_blocks) {
  constexpr int kRows = 4, kCols = 64;
  int64_t rb = job % row_blocks, cb = job / row_blocks;
  int64_t r0 = rb * kRows;
  int nr = static_cast<int>(std::min<int64_t>(kRows, n - r0));
  int c_end = static_cast<int>(std::min<int64_t>(in, (cb + 1) * kCols));
  for (int i = static_cast<int>(cb * kCols); i < c_end; i += 2 * W)
    backward_tile<V, W>(dy, w, dx, r0, nr, i, std::min(2 * W, c_end - i), in, out, accumulate);
}

static void forward_jobs_baseline(const float* x, const float* w, float* y, int64_t n, int in, int out, int64_t begin,
                                  int64_t end, int64_t row_blocks) {
  for (int64_t job = begin; job < end; ++job) forward_job<v4, 4>(x, w, y, n, in, out, job, row_blocks);
}
static void backward_jobs_baseline(const float* dy, const float* w, float* dx, int64_t n, int in, int out,
                                   bool accumulate, int64_t begin, int64_t end, int64_t row_blocks) {
  for (int64_t job = begin; job < end; ++job) backward_job<v4, 4>(dy, w, dx, n, in, out, accumulate, job, row_blocks);
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
__attribute__((target("avx2,fma"))) static void forward_jobs_avx2(const float* x, const float* w, float* y, int64_t n,
                                                                   int in, int out, int64_t begin, int64_t end,
                                                                   int64_t row_blocks) {
  for (int64_t job = begin; job < end; ++job) forward_job<v8, 8>(x, w, y, n, in, out, job, row_blocks);
}
__attribute__((target("avx2,fma"))) static void backward_jobs_avx2(const float* dy, const float* w, float* dx,
                                                                   int64_t n, int in, int out, bool accumulate,
                                                                   int64_t begin, int64_t end, int64_t row_blocks) {
  for (int64_t job = begin; job < end; ++job) backward_job<v8, 8>(dy, w, dx, n, in, out, accumulate, job, row_blocks);
}
static bool use_avx2() {
  static const bool yes = [] {
    const char* env = std::getenv("TFEW_CPU_SIMD");
    if (env && std::strcmp(env, "baseline") == 0) return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return yes;
}
#else
static bool use_avx2() { return false; }
static void forward_jobs_avx2(const float* x, const float* w, float* y, int64_t n, int in, int out, int64_t begin,
                              int64_t end, int64_t row_blocks) {
  forward_jobs_baseline(x, w, y, n, in, out, begin, end, row_blocks);
}
static void backward_jobs_avx2(const float* dy, const float* w, float* dx, int64_t n, int in, int out,
                               bool accumulate, int64_t begin, int64_t end, int64_t row_blocks) {
  backward_jobs_baseline(dy, w, dx, n, in, out, accumulate, begin, end, row_blocks);
}
#endif

const char* linear_simd() { return use_avx2() ? "avx2+fma" : "baseline"; }

void linear_forward(ThreadPool& pool, const float* x, const float* w, float* y, int64_t n, int in, int out) {
  // Jobs are panels of 4 rows x 64 outputs: W's panel (64 rows of `in`) stays in cache across the 4 rows.
  const int64_t row_blocks = (n + 3) / 4, col_blocks = (out + 63) / 64;
  const bool avx2 = use_avx2();
  pool.parallel_for(row_blocks * col_blocks, 1, [&](int64_t begin, int64_t end) {
    if (avx2) forward_jobs_avx2(x, w, y, n, in, out, begin, end, row_blocks);
    else forward_jobs_baseline(x, w, y, n, in, out, begin, end, row_blocks);
  });
}

void linear_backward_input(ThreadPool& pool, const float* dy, const float* w, float* dx, int64_t n, int in, int out,
                           bool accumulate) {
  // Jobs are 4 rows x 64 columns of dx, as the forward's (each walks a 64-column panel of W down its rows).
  const int64_t row_blocks = (n + 3) / 4, col_blocks = (in + 63) / 64;
  const bool avx2 = use_avx2();
  pool.parallel_for(row_blocks * col_blocks, 1, [&](int64_t begin, int64_t end) {
    if (avx2) backward_jobs_avx2(dy, w, dx, n, in, out, accumulate, begin, end, row_blocks);
    else backward_jobs_baseline(dy, w, dx, n, in, out, accumulate, begin, end, row_blocks);
  });
}

}  // namespace cpu
}  // namespace tfew
