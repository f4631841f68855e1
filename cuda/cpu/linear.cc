// Linear layers: y = x W^T, and the input gradient dx = dy W (T5 has no biases). Both are register-blocked
// kernels with vector accumulators (GCC/Clang vector extensions), so each loaded value is used several times, as
// outer products of 6 rows (4 with 4-float vectors) by 2 vectors: the forward's of x by outputs (W's panel first
// packed transposed, so that each step loads consecutive outputs), the backward's of dx by columns (down W's rows,
// which hold consecutive columns already). On x86-64 the same kernels are compiled twice: 4-float vectors for
// any x86-64 (SSE, the build's baseline, no -march needed) and 8-float vectors for CPUs with AVX2 and FMA (chosen
// at run time: __builtin_cpu_supports). TFEW_CPU_SIMD=baseline keeps the baseline kernels (for comparisons). The
// two differ only in summation order. arm64: 4-float NEON vectors.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cpu_ops.h"

namespace tfew {
namespace cpu {

typedef float v4 __attribute__((vector_size(16)));
typedef float v8 __attribute__((vector_size(32)));

#define TFEW_INLINE inline __attribute__((always_inline))

// Row strides of the three matrices of a product (row-major): the left operand (x, or dy), W, the result (y, or dx).
// The layers' products are dense (linear_*); the attention's read one head's columns out of [tokens, heads x d_kv].
struct Lds {
  int64_t left, w, result;
};

// y[r, o0 .. o0 + ncols) for the MR rows from r0 (nr of them valid): outer products of each x row's element k with
// the packed panel's row k (2 vectors V of W outputs; `packed` is [in][2W], zero beyond the panel's outputs). The
// 2 MR accumulators stay in registers for the whole walk over k: 2 vector loads and MR broadcasts per 2 MR
// multiply-adds. Vector values stay inside this body, so inlining it into a wider-ISA caller is ABI-neutral.
template <typename V, int W, int MR>
TFEW_INLINE void forward_tile(const float* x, const float* packed, float* y, int64_t r0, int nr, int o0, int ncols,
                              int in, const Lds& ld) {
  V acc[MR][2] = {};
  const float* xr[MR];
  for (int a = 0; a < MR; ++a) xr[a] = x + (r0 + std::min(a, nr - 1)) * ld.left;
  for (int k = 0; k < in; ++k) {
    V b0, b1;
    std::memcpy(&b0, packed + k * 2 * W, sizeof(V));
    std::memcpy(&b1, packed + k * 2 * W + W, sizeof(V));
    for (int a = 0; a < MR; ++a) {
      const float s = xr[a][k];
      acc[a][0] += s * b0;
      acc[a][1] += s * b1;
    }
  }
  for (int a = 0; a < nr; ++a) {
    float lanes[2 * W];
    std::memcpy(lanes, &acc[a][0], sizeof(V));
    std::memcpy(lanes + W, &acc[a][1], sizeof(V));
    std::memcpy(y + (r0 + a) * ld.result + o0, lanes, sizeof(float) * ncols);
  }
}

// One job of the forward: rows [r_begin, r_end) of y by a panel of up to 64 outputs. The panel of W (64 rows of
// `in`) is first copied transposed into `packed` ([64 / 2W][in][2W], zero-padded), so that the tiles read it
// consecutively; the copy is paid once for all the job's rows.
template <typename V, int W, int MR>
TFEW_INLINE void forward_job(const float* x, const float* w, float* y, int in, int out, int64_t r_begin, int64_t r_end,
                             int o_begin, float* packed, const Lds& ld) {
  constexpr int kCols = 64, kSub = 2 * W;
  const int nout = std::min(kCols, out - o_begin);
  for (int sub = 0; sub * kSub < nout; ++sub)
    for (int k = 0; k < in; ++k)
      for (int j = 0; j < kSub; ++j) {
        const int o = sub * kSub + j;
        packed[(static_cast<int64_t>(sub) * in + k) * kSub + j] = o < nout ? w[(o_begin + o) * ld.w + k] : 0.f;
      }
  for (int64_t r0 = r_begin; r0 < r_end; r0 += MR) {
    const int nr = static_cast<int>(std::min<int64_t>(MR, r_end - r0));
    for (int sub = 0; sub * kSub < nout; ++sub)
      forward_tile<V, W, MR>(x, packed + static_cast<int64_t>(sub) * in * kSub, y, r0, nr, o_begin + sub * kSub,
                             std::min(kSub, nout - sub * kSub), in, ld);
  }
}

// dx[r, i] for r in [r0, r0 + nr), i in [i0, i0 + ni): the sum over outputs o in [o0, o1) of dy[r, o] W[o, i]. A
// tile of MR rows by 2 vectors of columns keeps its 2 MR accumulators in registers while it walks down W's rows
// (each contributes 2 vector loads and MR broadcasts of dy for 2 MR multiply-adds); fewer rows repeat the last one (so that a
// row's sums do not depend on how many rows share its tile: padding changes nothing), narrower edges take the
// scalar loop.
template <typename V, int W, int MR>
TFEW_INLINE void backward_tile(const float* dy, const float* w, float* dx, int64_t r0, int nr, int i0, int ni, int o0,
                               int o1, bool accumulate, const Lds& ld) {
  if (ni == 2 * W) {
    V acc[MR][2] = {};
    const float* dyr[MR];
    for (int a = 0; a < MR; ++a) dyr[a] = dy + (r0 + std::min(a, nr - 1)) * ld.left;
    for (int o = o0; o < o1; ++o) {
      const float* wr = w + o * ld.w + i0;
      V w0, w1;
      std::memcpy(&w0, wr, sizeof(V));
      std::memcpy(&w1, wr + W, sizeof(V));
      for (int a = 0; a < MR; ++a) {
        const float g = dyr[a][o];
        acc[a][0] += g * w0;
        acc[a][1] += g * w1;
      }
    }
    for (int a = 0; a < nr; ++a)
      for (int c = 0; c < 2; ++c) {
        float* d = dx + (r0 + a) * ld.result + i0 + c * W;
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
      for (int o = o0; o < o1; ++o) s += dy[(r0 + a) * ld.left + o] * w[o * ld.w + i];
      float* d = dx + (r0 + a) * ld.result + i;
      *d = accumulate ? *d + s : s;
    }
}

// One job of the input gradient: up to 64 rows of dx by a panel of up to 64 columns. W's rows are walked in chunks
// of 1024 (256 KiB of the panel, which stays in cache while every tile of MR rows of the job uses it): a layer with
// many outputs (the head's 32,128) then reads W from memory once per 64 rows, not once per tile.
template <typename V, int W, int MR>
TFEW_INLINE void backward_job(const float* dy, const float* w, float* dx, int64_t n, int in, int out, bool accumulate,
                              int64_t job, int64_t row_blocks, const Lds& ld) {
  constexpr int kRows = 64, kCols = 64, kChunk = 1024;
  int64_t rb = job % row_blocks, cb = job / row_blocks;
  int64_t r_end = std::min<int64_t>(n, (rb + 1) * kRows);
  int c_end = static_cast<int>(std::min<int64_t>(in, (cb + 1) * kCols));
  if (out == 0 && !accumulate) {  // (an empty sum: zeros)
    for (int64_t r = rb * kRows; r < r_end; ++r)
      std::fill(dx + r * ld.result + cb * kCols, dx + r * ld.result + c_end, 0.f);
    return;
  }
  for (int o0 = 0; o0 < out; o0 += kChunk) {
    const int o1 = std::min(out, o0 + kChunk);
    for (int64_t r0 = rb * kRows; r0 < r_end; r0 += MR) {
      const int nr = static_cast<int>(std::min<int64_t>(MR, r_end - r0));
      for (int i = static_cast<int>(cb * kCols); i < c_end; i += 2 * W)
        backward_tile<V, W, MR>(dy, w, dx, r0, nr, i, std::min(2 * W, c_end - i), o0, o1, accumulate || o0 > 0, ld);
    }
  }
}

// Forward jobs: (row block, 64-output panel) pairs, numbered row block first.
struct ForwardJobs {
  int64_t n, rows_per_job, row_blocks;
  int64_t r_begin(int64_t job) const { return (job % row_blocks) * rows_per_job; }
  int64_t r_end(int64_t job) const { return std::min(n, r_begin(job) + rows_per_job); }
  int o_begin(int64_t job) const { return static_cast<int>(job / row_blocks) * 64; }
};

// (the packed panel of the thread's current job: 64 x in floats)
static float* packed_panel(int in) {
  thread_local std::vector<float> panel;
  if (panel.size() < static_cast<size_t>(64) * in) panel.resize(static_cast<size_t>(64) * in);
  return panel.data();
}

static void forward_jobs_baseline(const float* x, const float* w, float* y, int in, int out, int64_t begin,
                                  int64_t end, const ForwardJobs& jobs, const Lds& ld) {
  float* packed = packed_panel(in);
  for (int64_t job = begin; job < end; ++job)
    forward_job<v4, 4, 4>(x, w, y, in, out, jobs.r_begin(job), jobs.r_end(job), jobs.o_begin(job), packed, ld);
}
static void backward_jobs_baseline(const float* dy, const float* w, float* dx, int64_t n, int in, int out,
                                   bool accumulate, int64_t begin, int64_t end, int64_t row_blocks, const Lds& ld) {
  for (int64_t job = begin; job < end; ++job) backward_job<v4, 4, 4>(dy, w, dx, n, in, out, accumulate, job, row_blocks, ld);
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
__attribute__((target("avx2,fma"))) static void forward_jobs_avx2(const float* x, const float* w, float* y, int in,
                                                                   int out, int64_t begin, int64_t end,
                                                                   const ForwardJobs& jobs, const Lds& ld) {
  float* packed = packed_panel(in);
  for (int64_t job = begin; job < end; ++job)
    forward_job<v8, 8, 6>(x, w, y, in, out, jobs.r_begin(job), jobs.r_end(job), jobs.o_begin(job), packed, ld);
}
__attribute__((target("avx2,fma"))) static void backward_jobs_avx2(const float* dy, const float* w, float* dx,
                                                                   int64_t n, int in, int out, bool accumulate,
                                                                   int64_t begin, int64_t end, int64_t row_blocks,
                                                                   const Lds& ld) {
  for (int64_t job = begin; job < end; ++job)
    backward_job<v8, 8, 6>(dy, w, dx, n, in, out, accumulate, job, row_blocks, ld);
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
static void forward_jobs_avx2(const float* x, const float* w, float* y, int in, int out, int64_t begin, int64_t end,
                              const ForwardJobs& jobs, const Lds& ld) {
  forward_jobs_baseline(x, w, y, in, out, begin, end, jobs, ld);
}
static void backward_jobs_avx2(const float* dy, const float* w, float* dx, int64_t n, int in, int out,
                               bool accumulate, int64_t begin, int64_t end, int64_t row_blocks, const Lds& ld) {
  backward_jobs_baseline(dy, w, dx, n, in, out, accumulate, begin, end, row_blocks, ld);
}
#endif

const char* linear_simd() { return use_avx2() ? "avx2+fma" : "baseline"; }

void linear_forward(ThreadPool& pool, const float* x, const float* w, float* y, int64_t n, int in, int out) {
  // Jobs are up to 192 rows x 64 outputs (each packs its panel of W once for all its rows), fewer rows when that
  // leaves too few jobs to keep every thread busy (the decoder's few rows).
  const int64_t col_blocks = (out + 63) / 64;
  const int64_t wanted_jobs = 4 * static_cast<int64_t>(pool.size());
  int64_t rows_per_job = std::min<int64_t>(192, (n * col_blocks + wanted_jobs - 1) / wanted_jobs);
  rows_per_job = std::max<int64_t>(12, (rows_per_job + 11) / 12 * 12);  // (whole tiles of 4 or 6 rows)
  const ForwardJobs jobs{n, rows_per_job, (n + rows_per_job - 1) / rows_per_job};
  const Lds ld{in, in, out};
  const bool avx2 = use_avx2();
  pool.parallel_for(jobs.row_blocks * col_blocks, 1, [&](int64_t begin, int64_t end) {
    if (avx2) forward_jobs_avx2(x, w, y, in, out, begin, end, jobs, ld);
    else forward_jobs_baseline(x, w, y, in, out, begin, end, jobs, ld);
  });
}

void linear_backward_input(ThreadPool& pool, const float* dy, const float* w, float* dx, int64_t n, int in, int out,
                           bool accumulate) {
  // Jobs are 64 rows x 64 columns of dx (each walks a 64-column panel of W down its rows, in chunks).
  const int64_t row_blocks = (n + 63) / 64, col_blocks = (in + 63) / 64;
  const Lds ld{out, in, in};
  const bool avx2 = use_avx2();
  pool.parallel_for(row_blocks * col_blocks, 1, [&](int64_t begin, int64_t end) {
    if (avx2) backward_jobs_avx2(dy, w, dx, n, in, out, accumulate, begin, end, row_blocks, ld);
    else backward_jobs_baseline(dy, w, dx, n, in, out, accumulate, begin, end, row_blocks, ld);
  });
}

void matmul_xwt(const float* x, int64_t ldx, const float* w, int64_t ldw, float* y, int64_t ldy, int64_t n, int in,
                int out) {
  const ForwardJobs jobs{n, n, 1};  // (one job per 64-output panel, all rows)
  const int64_t col_blocks = (out + 63) / 64;
  const Lds ld{ldx, ldw, ldy};
  if (use_avx2()) forward_jobs_avx2(x, w, y, in, out, 0, col_blocks, jobs, ld);
  else forward_jobs_baseline(x, w, y, in, out, 0, col_blocks, jobs, ld);
}

void matmul_ab(const float* a, int64_t lda, const float* b, int64_t ldb, float* y, int64_t ldy, int64_t n, int inner,
               int out, bool accumulate) {
  // (the input gradient's kernels: dx = dy W with dy = a [n, inner], W = b [inner, out], dx = y [n, out])
  const int64_t row_blocks = (n + 63) / 64, col_blocks = (out + 63) / 64;
  const Lds ld{lda, ldb, ldy};
  if (use_avx2()) backward_jobs_avx2(a, b, y, n, out, inner, accumulate, 0, row_blocks * col_blocks, row_blocks, ld);
  else backward_jobs_baseline(a, b, y, n, out, inner, accumulate, 0, row_blocks * col_blocks, row_blocks, ld);
}

}  // namespace cpu
}  // namespace tfew
