// The GEMMs of the forward pass through cuBLAS: bf16 (or fp32) inputs, fp32 accumulation
// (CUBLAS_COMPUTE_32F), output in bf16/fp32. Row-major tensors are passed to column-major cuBLAS as their
// transposes, so y = x W^T (PyTorch's Linear, W stored [out, in]) becomes C^T = W x^T.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "gpu/cublas_loader.h"
#include "gpu/cuda_check.h"
#include "gpu/profiler.h"

namespace tfew {
namespace gpu {

template <typename T>
constexpr cudaDataType cuda_data_type();
template <>
constexpr cudaDataType cuda_data_type<float>() { return CUDA_R_32F; }
template <>
constexpr cudaDataType cuda_data_type<__nv_bfloat16>() { return CUDA_R_16BF; }

// Whether this cuBLAS runs the bf16-in / fp32-out batched products (Gemm::probe_bf16_f32).
struct GemmSupport {
  bool batched_bf16_f32 = false;  // pointer arrays: the cuBLAS encoder attention and its backward
  bool strided_bf16_f32 = false;  // fixed strides: the folded cross-attention's scores
};

class Gemm {
 public:
  Gemm() = default;
  ~Gemm() { destroy(); }
  Gemm(const Gemm&) = delete;
  Gemm& operator=(const Gemm&) = delete;

  // Creates the handle on the current device, bound to `stream`, with our own workspace (so that graph
  // capture never makes cuBLAS allocate) and fp32 reductions. `profiler` times calls when asked (time_as).
  void init(cudaStream_t stream, void* workspace, size_t workspace_bytes, Profiler* profiler);
  // From now on every call is a span of `family` in the detail profile (nullptr: none). The training step
  // uses it for its GEMM share; the inference forward brackets its GEMMs by name itself.
  void time_as(const char* family) { family_ = family; }
  bool timed() const { return family_ != nullptr; }
  void destroy();  // never throws

  // Tries both batched bf16-in / fp32-out calls once on tiny operands, synchronously. NVIDIA's tables list
  // them (CUBLAS_COMPUTE_32F), but a cuBLAS that answers NOT_SUPPORTED should cost a fallback, not a failed call.
  GemmSupport probe_bf16_f32(cudaStream_t stream);

  // y[M, N] (ld ldy) = x[M, K] (ld ldx) * W[N, K]^T (ld ldw) + beta * y.  beta = 1 adds into y: the residual.
  template <typename TIn, typename TOut>
  void linear(const TIn* x, int ldx, const TIn* w, int ldw, TOut* y, int ldy, int M, int N, int K, float beta);

  // The input gradient of a linear layer (training): dx[M, K] = alpha * dy[M, N] * W[N, K] + beta * dx.
  template <typename TIn, typename TOut>
  void linear_backward(const TIn* dy, int ldy, const TIn* w, int ldw, TOut* dx, int ldx, int M, int N, int K,
                       float alpha, float beta);

  // Encoder attention, batched over (example, head) with device arrays of pointers (the heads of one
  // example are interleaved in a row, so no single stride describes the batch).
  // scores[bh] (L x L, row-major, query rows) = Q[bh] K[bh]^T; Q/K rows have stride ld_qk.
  template <typename T>
  void attention_scores(const void* const* k_ptrs, const void* const* q_ptrs, void* const* s_ptrs, int ld_qk,
                        int len, int d_kv, int batch);
  // ctx[bh] (L x d_kv, row stride ld_ctx) = P[bh] (L x L) V[bh] (rows with stride ld_v).
  template <typename T>
  void attention_context(const void* const* v_ptrs, const void* const* p_ptrs, void* const* c_ptrs, int ld_v,
                         int ld_ctx, int len, int d_kv, int batch);

  // Row-major products batched over device arrays of pointers (the (example, head) pairs of the encoder
  // attention backward): C[i] (M x N, ld ldc) = op(A[i]) (M x K) * op(B[i]) (K x N), op(X) = X^T where trans_*.
  // A and B hold TIn, C holds TOut.
  template <typename TIn, typename TOut>
  void batched(bool trans_a, bool trans_b, int M, int N, int K, const void* const* a, int lda, const void* const* b,
               int ldb, void* const* c, int ldc, int batch);

  // The same with a fixed stride (elements) between the operands of consecutive batch entries: the folded
  // cross-attention's per-head and per-example products. beta = 1 adds into C (the training backward's sums).
  template <typename TIn, typename TOut>
  void strided(bool trans_a, bool trans_b, int M, int N, int K, const TIn* a, int lda, int64_t stride_a, const TIn* b,
               int ldb, int64_t stride_b, TOut* c, int ldc, int64_t stride_c, int batch, float beta = 0.f);

 private:
  // Brackets one call for the detail profile: in the family time_as asked for (a null family: none), and by its
  // call site and shape, "op MxNxK[xbatch]" with M x N the row-major product and K the inner dimension.
  struct Timing {
    Span family;
    KeyedSpan shape;
  };
  Timing timing(const char* op, int m, int n, int k, int batch = 1) const;
  cublasHandle_t handle_ = nullptr;
  const CublasApi* api_ = nullptr;
  cudaStream_t stream_ = nullptr;
  Profiler* profiler_ = nullptr;
  const char* family_ = nullptr;
};

}  // namespace gpu
}  // namespace tfew
