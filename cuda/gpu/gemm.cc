#include "gpu/gemm.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <string>
#include <tuple>

#include "gpu/device_memory.h"
#include "kernels/kernels.cuh"

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
  workspace_ = workspace;
  workspace_bytes_ = workspace_bytes;
  TFEW_CUBLAS_CHECK(api_->set_math_mode(handle_, CUBLAS_DEFAULT_MATH | CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION));
}

void Gemm::destroy() {
  for (auto& [key, t] : tuned_) release(t);
  tuned_.clear();
  const CublasLibrary& lib = cublas_library();
  if (lt_ && lib.lt_loaded) lib.lt.destroy(lt_);
  lt_ = nullptr;
  if (handle_ && api_) api_->destroy(handle_);
  handle_ = nullptr;
}

// ---- GEMM tuning

namespace {
std::atomic<bool> prefer_cublaslt{false};
}  // namespace
void set_gemm_tuning_prefers_cublaslt(bool on) { prefer_cublaslt = on; }

bool Gemm::enable_tuning(bool on) {
  tuning_ = false;
  if (!on) return false;
  const CublasLibrary& lib = cublas_library();
  if (!lib.lt_loaded) {
    tuning_note_ = "unavailable: " + lib.lt_error;
    return false;
  }
  if (!lt_ && lib.lt.create(&lt_) != CUBLAS_STATUS_SUCCESS) {
    lt_ = nullptr;
    tuning_note_ = "unavailable: cublasLtCreate failed";
    return false;
  }
  tuning_ = true;
  return true;
}

Gemm::TuningStats Gemm::tuning_stats() const {
  TuningStats s;
  for (const auto& [key, t] : tuned_) {
    ++s.shapes;
    if (t.lt) {
      ++s.changed;
      if (std::isfinite(t.default_ms)) s.saved_ms += t.default_ms - t.best_ms;  // (infinite: cublasGemmEx refused)
    }
  }
  return s;
}

bool Gemm::TuneKey::operator<(const TuneKey& o) const {
  auto tie = [](const TuneKey& x) {
    return std::make_tuple(x.op_a, x.op_b, x.m, x.n, x.k, x.lda, x.ldb, x.ldc, x.ta, x.tc, x.strided, x.count,
                           x.stride_a, x.stride_b, x.stride_c, x.accumulate, x.align_a, x.align_b, x.align_c);
  };
  return tie(*this) < tie(o);
}

void Gemm::release(Tuned& t) {
  const CublasLtApi& lt = cublas_library().lt;
  if (t.desc) lt.desc_destroy(t.desc);
  for (cublasLtMatrixLayout_t l : {t.a, t.b, t.c})
    if (l) lt.layout_destroy(l);
  t.desc = nullptr;
  t.a = t.b = t.c = nullptr;
  t.lt = false;
}

namespace {
uint32_t alignment_of(const void* p) {
  const uintptr_t address = reinterpret_cast<uintptr_t>(p);
  uint32_t a = 256;
  while (a > 1 && address % a != 0) a >>= 1;
  return a;
}

bool capturing(cudaStream_t s) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(s, &status) != cudaSuccess) {
    cudaGetLastError();
    return true;  // (in doubt, do nothing that cannot be captured)
  }
  return status != cudaStreamCaptureStatusNone;
}

size_t element_bytes(int type) { return type == CUDA_R_16BF ? 2 : 4; }
}  // namespace

cublasStatus_t Gemm::gemm_ex(cublasOperation_t op_a, cublasOperation_t op_b, int m, int n, int k, float alpha,
                             const void* a, cudaDataType ta, int lda, const void* b, int ldb, float beta, void* c,
                             cudaDataType tc, int ldc, const Batch& batch) {
  if (batch.strided)
    return api_->gemm_strided_batched_ex(handle_, op_a, op_b, m, n, k, &alpha, a, ta, lda, batch.a, b, ta, ldb,
                                         batch.b, &beta, c, tc, ldc, batch.c, batch.count, CUBLAS_COMPUTE_32F,
                                         CUBLAS_GEMM_DEFAULT);
  return api_->gemm_ex(handle_, op_a, op_b, m, n, k, &alpha, a, ta, lda, b, ta, ldb, &beta, c, tc, ldc,
                       CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
}

cublasStatus_t Gemm::gemm(cublasOperation_t op_a, cublasOperation_t op_b, int m, int n, int k, float alpha,
                          const void* a, cudaDataType ta, int lda, const void* b, int ldb, float beta, void* c,
                          cudaDataType tc, int ldc, const Batch& batch) {
  if (!tuning_ || k <= 0) return gemm_ex(op_a, op_b, m, n, k, alpha, a, ta, lda, b, ldb, beta, c, tc, ldc, batch);
  // a batch entry's operands are aligned to what both the first's and the strides allow
  auto align = [&](const void* p, long long stride, int type) {
    uint32_t al = alignment_of(p);
    if (batch.strided && batch.count > 1)
      al = std::min(al, alignment_of(reinterpret_cast<const void*>(static_cast<uintptr_t>(stride) * element_bytes(type))));
    return al;
  };
  const TuneKey key{op_a, op_b, m, n, k, lda, ldb, ldc, ta, tc, batch.strided, batch.count, batch.a, batch.b, batch.c,
                    beta != 0.f, align(a, batch.a, ta), align(b, batch.b, ta), align(c, batch.c, tc)};
  auto it = tuned_.find(key);
  if (it == tuned_.end()) {
    if (capturing(stream_)) return gemm_ex(op_a, op_b, m, n, k, alpha, a, ta, lda, b, ldb, beta, c, tc, ldc, batch);
    it = tuned_.emplace(key, tune(key, a, b, alpha, beta, c)).first;
  }
  Tuned& t = it->second;
  if (!t.lt) return gemm_ex(op_a, op_b, m, n, k, alpha, a, ta, lda, b, ldb, beta, c, tc, ldc, batch);
  const cublasStatus_t s = cublas_library().lt.matmul(lt_, t.desc, &alpha, a, t.a, b, t.b, &beta, c, t.c, c, t.c,
                                                      &t.algo, workspace_, workspace_bytes_, stream_);
  if (s == CUBLAS_STATUS_SUCCESS) return s;
  release(t);  // (an algorithm that refused: cuBLAS's own choice from now on)
  return gemm_ex(op_a, op_b, m, n, k, alpha, a, ta, lda, b, ldb, beta, c, tc, ldc, batch);
}

// Times cublasGemmEx and cuBLASLt's candidates for one shape on the call's operands; c is left as it was.
Gemm::Tuned Gemm::tune(const TuneKey& key, const void* a, const void* b, float alpha, float beta, void* c) {
  const CublasLtApi& lt = cublas_library().lt;
  Tuned t;
  // (a CUDA error below throws: the descriptors go with it; the successful end disarms this)
  struct ReleaseOnExit {
    Gemm* gemm;
    Tuned* tuned;
    bool armed = true;
    ~ReleaseOnExit() {
      if (armed) gemm->release(*tuned);
    }
  } guard{this, &t};
  const auto op_a = static_cast<cublasOperation_t>(key.op_a), op_b = static_cast<cublasOperation_t>(key.op_b);
  const auto ta = static_cast<cudaDataType>(key.ta), tc = static_cast<cudaDataType>(key.tc);
  const int m = key.m, n = key.n, k = key.k;
  bool ok = lt.desc_create(&t.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F) == CUBLAS_STATUS_SUCCESS;
  const int32_t trans_a = op_a, trans_b = op_b;
  ok = ok && lt.desc_set(t.desc, CUBLASLT_MATMUL_DESC_TRANSA, &trans_a, sizeof(trans_a)) == CUBLAS_STATUS_SUCCESS &&
       lt.desc_set(t.desc, CUBLASLT_MATMUL_DESC_TRANSB, &trans_b, sizeof(trans_b)) == CUBLAS_STATUS_SUCCESS;
  ok = ok && lt.layout_create(&t.a, ta, op_a == CUBLAS_OP_N ? m : k, op_a == CUBLAS_OP_N ? k : m, key.lda) == CUBLAS_STATUS_SUCCESS;
  ok = ok && lt.layout_create(&t.b, ta, op_b == CUBLAS_OP_N ? k : n, op_b == CUBLAS_OP_N ? n : k, key.ldb) == CUBLAS_STATUS_SUCCESS;
  ok = ok && lt.layout_create(&t.c, tc, m, n, key.ldc) == CUBLAS_STATUS_SUCCESS;
  if (key.strided) {  // the batch: its count and each operand's stride, on the layouts
    const int32_t count = key.count;
    const int64_t strides[3] = {key.stride_a, key.stride_b, key.stride_c};
    cublasLtMatrixLayout_t layouts[3] = {t.a, t.b, t.c};
    for (int i = 0; i < 3 && ok; ++i)
      ok = lt.layout_set(layouts[i], CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count, sizeof(count)) == CUBLAS_STATUS_SUCCESS &&
           lt.layout_set(layouts[i], CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &strides[i], sizeof(int64_t)) ==
               CUBLAS_STATUS_SUCCESS;
  }
  cublasLtMatmulPreference_t pref = nullptr;
  constexpr int kCandidates = 8;
  cublasLtMatmulHeuristicResult_t results[kCandidates] = {};
  int returned = 0;
  if (ok && lt.pref_create(&pref) == CUBLAS_STATUS_SUCCESS) {
    const uint64_t workspace = workspace_bytes_;
    const uint32_t reduction = CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;
    ok = lt.pref_set(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace, sizeof(workspace)) == CUBLAS_STATUS_SUCCESS &&
         lt.pref_set(pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, &reduction, sizeof(reduction)) == CUBLAS_STATUS_SUCCESS;
    const uint32_t align[4] = {key.align_a, key.align_b, key.align_c, key.align_c};
    for (int i = 0; i < 4 && ok; ++i)
      ok = lt.pref_set(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES + i, &align[i], sizeof(uint32_t)) == CUBLAS_STATUS_SUCCESS;
    ok = ok && lt.heuristic(lt_, t.desc, t.a, t.b, t.c, t.c, pref, kCandidates, results, &returned) == CUBLAS_STATUS_SUCCESS;
    lt.pref_destroy(pref);
  } else {
    ok = false;
  }
  if (!ok || returned <= 0) {
    release(t);
    return t;
  }
  // an output that is added into is saved first and put back after the trials
  DeviceMemory saved;
  const size_t c_bytes = (static_cast<size_t>(key.strided ? key.count - 1 : 0) * key.stride_c +
                          static_cast<size_t>(n - 1) * key.ldc + m) * element_bytes(key.tc);
  if (key.accumulate) {
    try {
      saved.allocate(c_bytes, "GEMM tuning's copy of an output");
    } catch (const TfewError&) {
      release(t);  // no room to try: cublasGemmEx for this shape
      return t;
    }
    TFEW_CUDA_CHECK(cudaMemcpyAsync(saved.get(), c, c_bytes, cudaMemcpyDeviceToDevice, stream_));
  }
  // Timing. Each run alone between its own events, after the cuBLAS workspace is overwritten (32 MiB: most of a
  // 40-50 MB L2, so that a small-M GEMM's weights come from DRAM as in a forward pass, not from L2), and the whole
  // series queued behind a wait on the device, so that the events see the GPU's time and not the host's launch rate
  // (a decoder GEMM takes a few microseconds). The median of kRuns, after a warm-up; infinity for a candidate that
  // refuses.
  constexpr int kRuns = 7;
  struct Events {
    cudaEvent_t e[2 * kRuns] = {};
    ~Events() {
      for (cudaEvent_t x : e)
        if (x) cudaEventDestroy(x);
    }
  } events;
  for (cudaEvent_t& x : events.e) TFEW_CUDA_CHECK(cudaEventCreate(&x));
  auto time = [&](auto&& run) -> float {
    if (run() != CUBLAS_STATUS_SUCCESS) {
      cudaGetLastError();  // (a refused launch must not be blamed on a later kernel)
      return INFINITY;
    }
    kernels::device_delay(200, stream_);
    for (int r = 0; r < kRuns; ++r) {
      TFEW_CUDA_CHECK(cudaMemsetAsync(workspace_, r, workspace_bytes_, stream_));
      TFEW_CUDA_CHECK(cudaEventRecord(events.e[2 * r], stream_));
      if (run() != CUBLAS_STATUS_SUCCESS) {
        cudaGetLastError();
        TFEW_CUDA_CHECK(cudaStreamSynchronize(stream_));
        return INFINITY;
      }
      TFEW_CUDA_CHECK(cudaEventRecord(events.e[2 * r + 1], stream_));
    }
    TFEW_CUDA_CHECK(cudaStreamSynchronize(stream_));
    float ms[kRuns];
    for (int r = 0; r < kRuns; ++r)
      if (cudaEventElapsedTime(&ms[r], events.e[2 * r], events.e[2 * r + 1]) != cudaSuccess) {
        cudaGetLastError();
        return INFINITY;
      }
    std::sort(ms, ms + kRuns);
    return ms[kRuns / 2];
  };
  const Batch batch{key.strided, key.count, key.stride_a, key.stride_b, key.stride_c};
  t.default_ms =
      time([&] { return gemm_ex(op_a, op_b, m, n, k, alpha, a, ta, key.lda, b, key.ldb, beta, c, tc, key.ldc, batch); });
  int best = -1;
  t.best_ms = t.default_ms;
  for (int i = 0; i < returned; ++i) {
    if (results[i].state != CUBLAS_STATUS_SUCCESS || results[i].workspaceSize > workspace_bytes_) continue;
    const float ms = time([&] {
      return lt.matmul(lt_, t.desc, &alpha, a, t.a, b, t.b, &beta, c, t.c, c, t.c, &results[i].algo, workspace_,
                       workspace_bytes_, stream_);
    });
    if (ms < t.best_ms) {
      t.best_ms = ms;
      best = i;
    }
  }
  if (key.accumulate) TFEW_CUDA_CHECK(cudaMemcpyAsync(c, saved.get(), c_bytes, cudaMemcpyDeviceToDevice, stream_));
  TFEW_CUDA_CHECK(cudaStreamSynchronize(stream_));  // (saved is freed on return)
  if (prefer_cublaslt && best < 0) {  // (tests on the emulator: the first candidate that ran)
    for (int i = 0; i < returned && best < 0; ++i)
      if (results[i].state == CUBLAS_STATUS_SUCCESS && results[i].workspaceSize <= workspace_bytes_) best = i;
    t.best_ms = 0.f;
  }
  if (best >= 0 && (t.best_ms < 0.97f * t.default_ms || prefer_cublaslt)) {
    t.algo = results[best].algo;
    t.lt = true;
    guard.armed = false;
  } else {
    release(t);
    t.best_ms = t.default_ms;
  }
  return t;
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
  // Column-major view: C (N x M, ld ldy) = op(W) (N x K) * x^T (K x M): A = W transposed, B = x as is.
  const cublasStatus_t s = gemm(CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, 1.f, w, cuda_data_type<TIn>(), ldw, x, ldx, beta, y,
                                cuda_data_type<TOut>(), ldy);
  if (s != CUBLAS_STATUS_SUCCESS)
    check_cublas(s, ("cublasGemmEx " + shape_text("linear", N, M, K)).c_str(), __FILE__, __LINE__);
}

template <typename TIn, typename TOut>
void Gemm::linear_backward(const TIn* dy, int ldy, const TIn* w, int ldw, TOut* dx, int ldx, int M, int N, int K,
                           float alpha, float beta) {
  if (M <= 0 || K <= 0) return;
  const Timing timed = timing("linear_backward", M, K, N);
  // Column-major view: C (K x M, ld ldx) = W^T stored as (K x N, ld ldw) * dy^T (N x M, ld ldy), both as is.
  const cublasStatus_t s = gemm(CUBLAS_OP_N, CUBLAS_OP_N, K, M, N, alpha, w, cuda_data_type<TIn>(), ldw, dy, ldy, beta,
                                dx, cuda_data_type<TOut>(), ldx);
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
  const cublasStatus_t s = gemm(trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, N, M, K, alpha,
                                b, cuda_data_type<TIn>(), ldb, a, lda, beta, c, cuda_data_type<TOut>(), ldc,
                                Batch{true, batch, stride_b, stride_a, stride_c});
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
