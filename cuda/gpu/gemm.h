// The GEMMs of the forward pass through cuBLAS: bf16 (or fp32) inputs, fp32 accumulation
// (CUBLAS_COMPUTE_32F), output in bf16/fp32. Row-major tensors are passed to column-major cuBLAS as their
// transposes, so y = x W^T (PyTorch's Linear, W stored [out, in]) becomes C^T = W x^T.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <map>
#include <string>

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

// A strided batch of products (cublasGemmStridedBatchedEx; strides in elements), or one (cublasGemmEx).
struct GemmBatch {
  bool strided = false;
  int count = 1;
  long long a = 0, b = 0, c = 0;
};

// Tests on the CUDA emulator, where every cuBLASLt candidate is the same CPU product and timings are noise: makes the
// tuner keep a cuBLASLt candidate for every shape it can (so that the cuBLASLt call path is what runs). Not an API.
void set_gemm_tuning_prefers_cublaslt(bool on);

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

  // GEMM tuning (cuda.gemmTuning): the first time a shape of linear / linear_backward / strided runs outside a graph
  // capture,
  // cublasGemmEx's pick and up to 8 of cuBLASLt's heuristic candidates run on the call's own operands (an output
  // that is added into is saved and put back), and the fastest is kept for that shape (cuBLASLt's only where it
  // beats cublasGemmEx's by 3%). Calls made while a graph is captured use what is known, else cublasGemmEx. Split-K
  // candidates reduce in fp32 and never in place, as cublasGemmEx is told to. Returns whether tuning is on (it needs
  // cuBLASLt: tuning_note() says why not).
  bool enable_tuning(bool on);
  struct TuningStats {
    int shapes = 0;         // shapes timed so far
    int changed = 0;        // of which run on a cuBLASLt algorithm
    double saved_ms = 0.0;  // the sum over the changed shapes of what one call saves
  };
  TuningStats tuning_stats() const;
  const std::string& tuning_note() const { return tuning_note_; }

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
  using Batch = GemmBatch;
  // cublasGemmEx's (or, batched, cublasGemmStridedBatchedEx's) arguments (column-major), through the tuned choice
  // where tuning is on.
  cublasStatus_t gemm(cublasOperation_t op_a, cublasOperation_t op_b, int m, int n, int k, float alpha, const void* a,
                      cudaDataType ta, int lda, const void* b, int ldb, float beta, void* c, cudaDataType tc, int ldc,
                      const Batch& batch = Batch{});
  cublasStatus_t gemm_ex(cublasOperation_t op_a, cublasOperation_t op_b, int m, int n, int k, float alpha,
                         const void* a, cudaDataType ta, int lda, const void* b, int ldb, float beta, void* c,
                         cudaDataType tc, int ldc, const Batch& batch);
  struct TuneKey {
    int op_a, op_b, m, n, k, lda, ldb, ldc, ta, tc;
    bool strided;
    int count;
    long long stride_a, stride_b, stride_c;
    bool accumulate;               // beta != 0
    uint32_t align_a, align_b, align_c;  // the pointers' alignment (bytes, up to 256): which algorithms may take them
    bool operator<(const TuneKey& o) const;
  };
  struct Tuned {
    bool lt = false;  // run on `algo` (else cublasGemmEx)
    cublasLtMatmulDesc_t desc = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
    cublasLtMatmulAlgo_t algo{};
    float default_ms = 0.f, best_ms = 0.f;
  };
  Tuned tune(const TuneKey& key, const void* a, const void* b, float alpha, float beta, void* c);
  void release(Tuned& t);
  cublasHandle_t handle_ = nullptr;
  cublasLtHandle_t lt_ = nullptr;
  bool tuning_ = false;
  std::string tuning_note_;
  std::map<TuneKey, Tuned> tuned_;
  void* workspace_ = nullptr;
  size_t workspace_bytes_ = 0;
  const CublasApi* api_ = nullptr;
  cudaStream_t stream_ = nullptr;
  Profiler* profiler_ = nullptr;
  const char* family_ = nullptr;
};

}  // namespace gpu
}  // namespace tfew
