// nvcuda::wmma for the CUDA emulator (cuda/emu/emu_runtime.h): the subset our kernels use, with the device's
// numerics (bf16 or fp16 inputs, exact products, fp32 accumulation). Every lane of a warp holds the whole
// tile and computes it. Loads and stores are warp-collective as on the device: each waits for the whole warp
// first (otherwise lane 0's store would be seen by lane 1's load of the same tile), and checks the device's
// alignment rules (256-bit pointers, ldm a multiple of 16 bytes), which real tensor-core code must meet.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <string>

#include "emu/emu_runtime.h"

namespace tfew {
namespace emu {
void wmma_alignment_fault(const void* p, unsigned ldm, size_t element_bytes);
}  // namespace emu
}  // namespace tfew

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

inline float element_to_float(float x) { return x; }
inline float element_to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
inline float element_to_float(__half x) { return __half2float(x); }

// Every load and store starts here: the warp meets, then the operand is checked.
template <typename T>
inline void check_alignment(const T* p, unsigned ldm) {
  ::tfew::emu::sync_warp();
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0 || (ldm * sizeof(T)) % 16 != 0)
    ::tfew::emu::wmma_alignment_fault(p, ldm, sizeof(T));
}

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment;

// A: M x K, B: K x N, accumulator: M x N; all stored row-major here (the device's layout is opaque).
template <int M, int N, int K, typename T, typename Layout>
struct fragment<matrix_a, M, N, K, T, Layout> {
  static constexpr int rows = M, cols = K;
  static constexpr int num_elements = M * K;
  T x[M * K];
};
template <int M, int N, int K, typename T, typename Layout>
struct fragment<matrix_b, M, N, K, T, Layout> {
  static constexpr int rows = K, cols = N;
  static constexpr int num_elements = K * N;
  T x[K * N];
};
template <int M, int N, int K, typename T>
struct fragment<accumulator, M, N, K, T, void> {
  static constexpr int rows = M, cols = N;
  static constexpr int num_elements = M * N;
  T x[M * N];
};

template <typename Use, int M, int N, int K, typename T, typename Layout>
inline void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, T value) {
  for (int i = 0; i < f.num_elements; ++i) f.x[i] = value;
}

template <typename Use, int M, int N, int K, typename T>
inline void load_matrix_sync(fragment<Use, M, N, K, T, row_major>& f, const T* p, unsigned ldm) {
  check_alignment(p, ldm);
  for (int r = 0; r < f.rows; ++r)
    for (int c = 0; c < f.cols; ++c) f.x[r * f.cols + c] = p[static_cast<size_t>(r) * ldm + c];
}
template <typename Use, int M, int N, int K, typename T>
inline void load_matrix_sync(fragment<Use, M, N, K, T, col_major>& f, const T* p, unsigned ldm) {
  check_alignment(p, ldm);
  for (int r = 0; r < f.rows; ++r)
    for (int c = 0; c < f.cols; ++c) f.x[r * f.cols + c] = p[static_cast<size_t>(c) * ldm + r];
}
template <int M, int N, int K, typename T>
inline void load_matrix_sync(fragment<accumulator, M, N, K, T, void>& f, const T* p, unsigned ldm, layout_t layout) {
  check_alignment(p, ldm);
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c)
      f.x[r * N + c] = layout == mem_row_major ? p[static_cast<size_t>(r) * ldm + c] : p[static_cast<size_t>(c) * ldm + r];
}
template <int M, int N, int K, typename T>
inline void store_matrix_sync(T* p, const fragment<accumulator, M, N, K, T, void>& f, unsigned ldm, layout_t layout) {
  check_alignment(p, ldm);
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c)
      (layout == mem_row_major ? p[static_cast<size_t>(r) * ldm + c] : p[static_cast<size_t>(c) * ldm + r]) = f.x[r * N + c];
}

// D = A B + C, products and sums in fp32.
template <int M, int N, int K, typename T, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, M, N, K, float, void>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
                     const fragment<matrix_b, M, N, K, T, LB>& b, const fragment<accumulator, M, N, K, float, void>& c) {
  float out[M * N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float acc = c.x[i * N + j];
      for (int k = 0; k < K; ++k) acc += element_to_float(a.x[i * K + k]) * element_to_float(b.x[k * N + j]);
      out[i * N + j] = acc;
    }
  for (int i = 0; i < M * N; ++i) d.x[i] = out[i];
}

}  // namespace wmma
}  // namespace nvcuda
