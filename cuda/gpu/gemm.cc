#include "gpu/gemm.h"

#include <string>

#include "gpu/device_memory.h"

namespace tfew {
namespace gpu {

void Gemm::init(cudaStream_t stream, void* workspace, size_t workspace_bytes, Profiler* profiler) {
  if (!profiler) fail(ErrorCode::Internal, "Gemm::init needs the engine's profiler");
  stream_ = stream;
  profiler_ = profiler;
  const CublasLibrary& lib = cublas_library();
  if (!lib.loaded) fail(ErrorCode::DeviceUnavailable, lib.error);
  api_ = &lib.api;
  TFEW_CUBLAS_CHECK(api_->create(&handle_));
  TFEW_CUBLAS_CHECK(api_->set_stream(handle_, stream));
  // set_stream resets the workspace to cuBLAS's own pool, so the workspace comes after it.
  TFEW_CUBLAS_CHECK(api_->set_workspace(handle_, workspace, workspace_bytes));
  TFEW_CUBLAS_CHECK(api_->set_math_mode(handle_, CUBLAS_DEFAULT_MATH | CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION));
}

void Gemm::destroy() {
  if (handle_ && api_) api_->destroy(handle_);
  handle_ = nullptr;
}

GemmSupport Gemm::probe_bf16_f32(cudaStream_t stream) {
  constexpr int n = 16;  // two 16 x 16 x 16 products
  DeviceMemory buf;
  buf.allocate(2 * (2 * n * n * sizeof(__nv_bfloat16) + n * n * sizeof(float)) + 6 * sizeof(void*), "a cuBLAS probe");
  TFEW_CUDA_CHECK(cudaMemsetAsync(buf.get(), 0, buf.size(), stream));
  char* base = buf.get();
  const auto* a = reinterpret_cast<const __nv_bfloat16*>(base);
  const __nv_bfloat16* b = a + 2 * n * n;
  float* c = reinterpret_cast<float*>(base + 4 * n * n * sizeof(__nv_bfloat16));
  void** ptrs = reinterpret_cast<void**>(base + 4 * n * n * sizeof(__nv_bfloat16) + 2 * n * n * sizeof(float));
  const void* host_ptrs[6] = {a, a + n * n, b, b + n * n, c, c + n * n};
  TFEW_CUDA_CHECK(cudaMemcpyAsync(ptrs, host_ptrs, sizeof(host_ptrs), cudaMemcpyHostToDevice, stream));
  const float alpha = 1.f, beta = 0.f;
  GemmSupport s;
  s.strided_bf16_f32 =
      api_->gemm_strided_batched_ex(handle_, CUBLAS_OP_T, CUBLAS_OP_N, n, n, n, &alpha, a, CUDA_R_16BF, n, n * n, b,
                                    CUDA_R_16BF, n, n * n, &beta, c, CUDA_R_32F, n, n * n, 2, CUBLAS_COMPUTE_32F,
                                    CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_SUCCESS;
  s.batched_bf16_f32 =
      api_->gemm_batched_ex(handle_, CUBLAS_OP_T, CUBLAS_OP_N, n, n, n, &alpha, reinterpret_cast<const void* const*>(ptrs),
                            CUDA_R_16BF, n, reinterpret_cast<const void* const*>(ptrs + 2), CUDA_R_16BF, n, &beta,
                            ptrs + 4, CUDA_R_32F, n, 2, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_SUCCESS;
  TFEW_CUDA_CHECK(cudaStreamSynchronize(stream));  // before the buffer is freed (and host_ptrs goes away)
  return s;
}

namespace {
std::string shape_text(const char* op, int m, int n, int k) {
  return std::string(op) + " m=" + std::to_string(m) + " n=" + std::to_string(n) + " k=" + std::to_string(k);
}
}  // namespace

Gemm::Timing Gemm::timing(const char* op, int m, int n, int k, int batch) const {
  std::string key;
  if (profiler_->detail()) {  // the string only where it is used
    key = std::string(op) + " " + std::to_string(m) + "x" + std::to_string(n) + "x" + std::to_string(k);
    if (batch > 1) key += "x" + std::to_string(batch);
  }
  return Timing{Span(*profiler_, family_, stream_), KeyedSpan(*profiler_, std::move(key), stream_)};
}

template <typename TIn, typename TOut>
void Gemm::linear(const TIn* x, int ldx, const TIn* w, int ldw, TOut* y, int ldy, int M, int N, int K, float beta) {
  if (M <= 0 || N <= 0) return;
  const Timing timed = timing("linear", M, N, K);
  const float alpha = 1.f;
  // Column-major view: C (N x M, ld ldy) = op(W) (N x K) * x^T (K x M): A = W transposed, B = x as is.
  const cublasStatus_t s =
      api_->gemm_ex(handle_, CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, &alpha, w, cuda_data_type<TIn>(), ldw, x,
                    cuda_data_type<TIn>(), ldx, &beta, y, cuda_data_type<TOut>(), ldy, CUBLAS_COMPUTE_32F,
                    CUBLAS_GEMM_DEFAULT);
  if (s != CUBLAS_STATUS_SUCCESS)
    check_cublas(s, ("cublasGemmEx " + shape_text("linear", N, M, K)).c_str(), __FILE__, __LINE__);
}

template <typename TIn, typename TOut>
void Gemm::linear_backward(const TIn* dy, int ldy, const TIn* w, int ldw, TOut* dx, int ldx, int M, int N, int K,
                           float alpha, float beta) {
  if (M <= 0 || K <= 0) return;
  const Timing timed = timing("linear_backward", M, K, N);
  // Column-major view: C (K x M, ld ldx) = W^T stored as (K x N, ld ldw) * dy^T (N x M, ld ldy), both as is.
  const cublasStatus_t s =
      api_->gemm_ex(handle_, CUBLAS_OP_N, CUBLAS_OP_N, K, M, N, &alpha, w, cuda_data_type<TIn>(), ldw, dy,
                    cuda_data_type<TIn>(), ldy, &beta, dx, cuda_data_type<TOut>(), ldx, CUBLAS_COMPUTE_32F,
                    CUBLAS_GEMM_DEFAULT);
  if (s != CUBLAS_STATUS_SUCCESS)
    check_cublas(s, ("cublasGemmEx " + shape_text("linear backward", K, M, N)).c_str(), __FILE__, __LINE__);
}

template <typename T>
void Gemm::attention_scores(const void* const* k_ptrs, const void* const* q_ptrs, void* const* s_ptrs, int ld_qk,
                            int len, int d_kv, int batch) {
  if (batch <= 0) return;
  const Timing timed = timing("attention_scores", len, len, d_kv, batch);
  const float alpha = 1.f, beta = 0.f;
  // Column-major C (keys x queries, ld len) = K (keys x d_kv, stored transposed) * Q^T: row-major scores[i][j].
  const cublasStatus_t s = api_->gemm_batched_ex(
      handle_, CUBLAS_OP_T, CUBLAS_OP_N, len, len, d_kv, &alpha, k_ptrs, cuda_data_type<T>(), ld_qk, q_ptrs,
      cuda_data_type<T>(), ld_qk, &beta, s_ptrs, CUDA_R_32F, len, batch, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
  if (s != CUBLAS_STATUS_SUCCESS)
    check_cublas(s, ("cublasGemmBatchedEx " + shape_text("attention scores", len, len, d_kv)).c_str(), __FILE__,
                 __LINE__);
}

template <typename T>
void Gemm::attention_context(const void* const* v_ptrs, const void* const* p_ptrs, void* const* c_ptrs, int ld_v,
                             int ld_ctx, int len, int d_kv, int batch) {
  if (batch <= 0) return;
  const Timing timed = timing("attention_context", len, d_kv, len, batch);
  const float alpha = 1.f, beta = 0.f;
  // Column-major C (d_kv x queries, ld ld_ctx) = V^T (d_kv x keys) * P^T (keys x queries).
  const cublasStatus_t s = api_->gemm_batched_ex(
      handle_, CUBLAS_OP_N, CUBLAS_OP_N, d_kv, len, len, &alpha, v_ptrs, cuda_data_type<T>(), ld_v, p_ptrs,
      cuda_data_type<T>(), len, &beta, c_ptrs, cuda_data_type<T>(), ld_ctx, batch, CUBLAS_COMPUTE_32F,
      CUBLAS_GEMM_DEFAULT);
  if (s != CUBLAS_STATUS_SUCCESS)
    check_cublas(s, ("cublasGemmBatchedEx " + shape_text("attention context", d_kv, len, len)).c_str(), __FILE__,
                 __LINE__);
}

template <typename TIn, typename TOut>
void Gemm::batched(bool trans_a, bool trans_b, int M, int N, int K, const void* const* a, int lda, const void* const* b,
                   int ldb, void* const* c, int ldc, int batch) {
  if (M <= 0 || N <= 0 || batch <= 0) return;
  const Timing timed = timing("batched", M, N, K, batch);
  const float alpha = 1.f, beta = 0.f;
  // Column-major view of row-major C = op(A) op(B): C^T (N x M) = op(B)^T (N x K) * op(A)^T (K x M), where a
  // row-major X read column-major is X^T; so B comes first, transposed exactly when op(B) is.
  const cublasStatus_t s = api_->gemm_batched_ex(
      handle_, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, N, M, K, &alpha, b,
      cuda_data_type<TIn>(), ldb, a, cuda_data_type<TIn>(), lda, &beta, c, cuda_data_type<TOut>(), ldc, batch,
      CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
  if (s != CUBLAS_STATUS_SUCCESS)
    check_cublas(s, ("cublasGemmBatchedEx " + shape_text("batched", N, M, K)).c_str(), __FILE__, __LINE__);
}

template <typename TIn, typename TOut>
void Gemm::strided(bool trans_a, bool trans_b, int M, int N, int K, const TIn* a, int lda, int64_t stride_a,
                   const TIn* b, int ldb, int64_t stride_b, TOut* c, int ldc, int64_t stride_c, int batch,
                   float beta) {
  if (M <= 0 || N <= 0 || batch <= 0) return;
  const Timing timed = timing("strided", M, N, K, batch);
  const float alpha = 1.f;
  // the column-major view of Gemm::batched
  const cublasStatus_t s = api_->gemm_strided_batched_ex(
      handle_, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, N, M, K, &alpha, b,
      cuda_data_type<TIn>(), ldb, stride_b, a, cuda_data_type<TIn>(), lda, stride_a, &beta, c, cuda_data_type<TOut>(),
      ldc, stride_c, batch, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
  if (s != CUBLAS_STATUS_SUCCESS)
    check_cublas(s, ("cublasGemmStridedBatchedEx " + shape_text("strided", N, M, K)).c_str(), __FILE__, __LINE__);
}

template void Gemm::linear<float, float>(const float*, int, const float*, int, float*, int, int, int, int, float);
template void Gemm::linear<__nv_bfloat16, __nv_bfloat16>(const __nv_bfloat16*, int, const __nv_bfloat16*, int,
                                                         __nv_bfloat16*, int, int, int, int, float);
template void Gemm::linear<__nv_bfloat16, float>(const __nv_bfloat16*, int, const __nv_bfloat16*, int, float*, int,
                                                 int, int, int, float);
template void Gemm::linear_backward<float, float>(const float*, int, const float*, int, float*, int, int, int, int,
                                                  float, float);
template void Gemm::linear_backward<__nv_bfloat16, float>(const __nv_bfloat16*, int, const __nv_bfloat16*, int,
                                                          float*, int, int, int, int, float, float);
template void Gemm::linear_backward<__nv_bfloat16, __nv_bfloat16>(const __nv_bfloat16*, int, const __nv_bfloat16*,
                                                                  int, __nv_bfloat16*, int, int, int, int, float,
                                                                  float);
template void Gemm::batched<float, float>(bool, bool, int, int, int, const void* const*, int, const void* const*, int,
                                         void* const*, int, int);
template void Gemm::batched<__nv_bfloat16, __nv_bfloat16>(bool, bool, int, int, int, const void* const*, int,
                                                         const void* const*, int, void* const*, int, int);
template void Gemm::batched<__nv_bfloat16, float>(bool, bool, int, int, int, const void* const*, int,
                                                 const void* const*, int, void* const*, int, int);
template void Gemm::strided<float, float>(bool, bool, int, int, int, const float*, int, int64_t, const float*, int,
                                         int64_t, float*, int, int64_t, int, float);
template void Gemm::strided<__nv_bfloat16, __nv_bfloat16>(bool, bool, int, int, int, const __nv_bfloat16*, int,
                                                         int64_t, const __nv_bfloat16*, int, int64_t, __nv_bfloat16*,
                                                         int, int64_t, int, float);
template void Gemm::strided<__nv_bfloat16, float>(bool, bool, int, int, int, const __nv_bfloat16*, int, int64_t,
                                                 const __nv_bfloat16*, int, int64_t, float*, int, int64_t, int, float);
template void Gemm::attention_scores<float>(const void* const*, const void* const*, void* const*, int, int, int, int);
template void Gemm::attention_scores<__nv_bfloat16>(const void* const*, const void* const*, void* const*, int, int,
                                                    int, int);
template void Gemm::attention_context<float>(const void* const*, const void* const*, void* const*, int, int, int,
                                             int, int);
template void Gemm::attention_context<__nv_bfloat16>(const void* const*, const void* const*, void* const*, int, int,
                                                     int, int, int);

}  // namespace gpu
}  // namespace tfew
