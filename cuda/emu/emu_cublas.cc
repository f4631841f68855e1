// The cuBLAS entry points we call (cuda/gpu/cublas_loader.h), on the CPU, for the CUDA emulator. Column-major
// like cuBLAS; inputs bf16 or fp32, fp32 products and sums, the output rounded to its type. Operands are
// checked to lie inside device allocations; unsupported type combinations and values return the status
// cuBLAS returns. The work runs on the handle's stream (so graph capture records it).
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "emu/emu_runtime.h"
#include "gpu/cublas_loader.h"

namespace tfew {
namespace emu {

using namespace tfew::gpu;

}  // namespace emu
}  // namespace tfew

struct tfew::gpu::CublasContextOpaque {
  int device = 0;  // the device current at cublasCreate: its GEMMs run there, on operands in its memory
  cudaStream_t stream = nullptr;
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
  int math_mode = 0;
};

// cuBLASLt's descriptors, as the emulator keeps them
struct tfew::gpu::CublasLtContextOpaque {
  int device = 0;
};
struct tfew::gpu::CublasLtDescOpaque {
  tfew::gpu::cublasComputeType_t compute = 0;
  cudaDataType scale = CUDA_R_32F;
  tfew::gpu::cublasOperation_t transa = 0, transb = 0;
};
struct tfew::gpu::CublasLtLayoutOpaque {
  cudaDataType type = CUDA_R_32F;
  uint64_t rows = 0, cols = 0;
  int64_t ld = 0;
  int32_t batch = 1;
  int64_t stride = 0;  // elements between batch entries
};
struct tfew::gpu::CublasLtPreferenceOpaque {
  uint64_t max_workspace = 0;
};

namespace tfew {
namespace emu {

namespace {

size_t type_bytes(cudaDataType t) { return t == CUDA_R_16BF ? 2 : 4; }

float load(const void* p, cudaDataType t, size_t i) {
  return t == CUDA_R_16BF ? __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]) : static_cast<const float*>(p)[i];
}

void store(void* p, cudaDataType t, size_t i, float v) {
  if (t == CUDA_R_16BF) static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
  else static_cast<float*>(p)[i] = v;
}

// The combinations cuBLAS supports for CUBLAS_COMPUTE_32F with fp32 scale that we may use. TFEW_EMU_CUBLAS_NO_F32_OUT
// ("cublasGemmBatchedEx" or "cublasGemmStridedBatchedEx") plays a cuBLAS whose call lacks bf16-in / fp32-out.
bool supported(const char* call, cudaDataType a, cudaDataType b, cudaDataType c, cublasComputeType_t compute) {
  if (compute != CUBLAS_COMPUTE_32F || a != b) return false;
  const char* lacking = std::getenv("TFEW_EMU_CUBLAS_NO_F32_OUT");
  if (lacking && std::strcmp(lacking, call) == 0 && a == CUDA_R_16BF && c == CUDA_R_32F) return false;
  if (a == CUDA_R_16BF) return c == CUDA_R_16BF || c == CUDA_R_32F;
  if (a == CUDA_R_32F) return c == CUDA_R_32F;
  return false;
}

// Elements a column-major rows x cols operand with leading dimension ld spans.
size_t extent(int rows, int cols, int ld) { return cols == 0 || rows == 0 ? 0 : static_cast<size_t>(ld) * (cols - 1) + rows; }

bool operand_ok(const char* call, const char* name, const void* p, cudaDataType t, int rows, int cols, int ld,
                int device) {
  const size_t bytes = extent(rows, cols, ld) * type_bytes(t);
  if (bytes == 0 || device_range_ok(p, bytes, device)) return true;
  std::fprintf(stderr, "[tfew cuda emulator] %s: operand %s (%d x %d, ld %d) is not inside one allocation of device %d\n",
               call, name, rows, cols, ld, device);
  return false;
}

// One GEMM: C = alpha op(A) op(B) + beta C, C m x n, op(A) m x k, op(B) k x n (column-major).
void gemm(cublasOperation_t op_a, cublasOperation_t op_b, int m, int n, int k, float alpha, const void* A,
          cudaDataType ta, int lda, const void* B, cudaDataType tb, int ldb, float beta, void* C, cudaDataType tc,
          int ldc) {
  // op(A) as rows of k (row i = A's row i after the op), op(B) as columns of k: dot products of contiguous rows.
  std::vector<float> a_rows(static_cast<size_t>(m) * k), b_cols(static_cast<size_t>(n) * k);
  for (int i = 0; i < m; ++i)
    for (int l = 0; l < k; ++l)
      a_rows[static_cast<size_t>(i) * k + l] =
          load(A, ta, op_a == CUBLAS_OP_N ? i + static_cast<size_t>(l) * lda : l + static_cast<size_t>(i) * lda);
  for (int j = 0; j < n; ++j)
    for (int l = 0; l < k; ++l)
      b_cols[static_cast<size_t>(j) * k + l] =
          load(B, tb, op_b == CUBLAS_OP_N ? l + static_cast<size_t>(j) * ldb : j + static_cast<size_t>(l) * ldb);
  for (int j = 0; j < n; ++j) {
    const float* bc = &b_cols[static_cast<size_t>(j) * k];
    for (int i = 0; i < m; ++i) {
      const float* ar = &a_rows[static_cast<size_t>(i) * k];
      float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // eight partial sums let the compiler vectorise
      int l = 0;
      for (; l + 8 <= k; l += 8)
        for (int u = 0; u < 8; ++u) part[u] += ar[l + u] * bc[l + u];
      float acc = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
      for (; l < k; ++l) acc += ar[l] * bc[l];
      const size_t ci = i + static_cast<size_t>(j) * ldc;
      const float prior = beta == 0.f ? 0.f : beta * load(C, tc, ci);  // beta 0: C is not read (may be NaN)
      store(C, tc, ci, alpha * acc + prior);
    }
  }
}

void trace_gemm(const char* call, int m, int n, int k, int batch) {
  if (!tracing()) return;
  trace(std::string("gemm ") + call + " " + std::to_string(m) + " " + std::to_string(n) + " " + std::to_string(k) +
        " " + std::to_string(batch));
}

cublasStatus_t check_call(const char* call, cublasHandle_t h, cublasOperation_t op_a, cublasOperation_t op_b, int m,
                          int n, int k, const void* alpha, const void* beta, cudaDataType ta, cudaDataType tb,
                          cudaDataType tc, int lda, int ldb, int ldc, int batch, cublasComputeType_t compute) {
  if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (h->device != current_device()) {
    std::fprintf(stderr, "[tfew cuda emulator] %s: a cuBLAS handle of device %d used while device %d is current\n", call,
                 h->device, current_device());
    return CUBLAS_STATUS_EXECUTION_FAILED;
  }
  if (!supported(call, ta, tb, tc, compute)) {
    std::fprintf(stderr, "[tfew cuda emulator] %s: types A %d B %d C %d compute %d not supported\n", call, ta, tb, tc,
                 compute);
    return CUBLAS_STATUS_NOT_SUPPORTED;
  }
  const bool ops_ok = (op_a == CUBLAS_OP_N || op_a == CUBLAS_OP_T) && (op_b == CUBLAS_OP_N || op_b == CUBLAS_OP_T);
  const int a_rows = op_a == CUBLAS_OP_N ? m : k, b_rows = op_b == CUBLAS_OP_N ? k : n;
  if (!ops_ok || m < 0 || n < 0 || k < 0 || batch < 0 || !alpha || !beta || lda < std::max(1, a_rows) ||
      ldb < std::max(1, b_rows) || ldc < std::max(1, m)) {
    std::fprintf(stderr, "[tfew cuda emulator] %s: invalid value (m %d n %d k %d lda %d ldb %d ldc %d batch %d)\n", call,
                 m, n, k, lda, ldb, ldc, batch);
    return CUBLAS_STATUS_INVALID_VALUE;
  }
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t create(cublasHandle_t* h) {
  if (!h) return CUBLAS_STATUS_INVALID_VALUE;
  *h = new CublasContextOpaque();
  (*h)->device = current_device();
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t destroy(cublasHandle_t h) {
  delete h;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t set_stream(cublasHandle_t h, cudaStream_t s) {
  if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
  h->stream = s;
  h->workspace = nullptr;  // as cuBLAS: setting the stream resets the workspace to the default pool
  h->workspace_bytes = 0;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t set_workspace(cublasHandle_t h, void* w, size_t bytes) {
  if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (bytes > 0 && !device_range_ok(w, bytes, h->device)) return CUBLAS_STATUS_INVALID_VALUE;
  h->workspace = w;
  h->workspace_bytes = bytes;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t set_math_mode(cublasHandle_t h, cublasMath_t mode) {
  if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
  h->math_mode = mode;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t gemm_ex(cublasHandle_t h, cublasOperation_t op_a, cublasOperation_t op_b, int m, int n, int k,
                       const void* alpha, const void* A, cudaDataType ta, int lda, const void* B, cudaDataType tb,
                       int ldb, const void* beta, void* C, cudaDataType tc, int ldc, cublasComputeType_t compute,
                       cublasGemmAlgo_t) {
  const cublasStatus_t s = check_call("cublasGemmEx", h, op_a, op_b, m, n, k, alpha, beta, ta, tb, tc, lda, ldb, ldc, 1, compute);
  if (s != CUBLAS_STATUS_SUCCESS) return s;
  if (m == 0 || n == 0) return CUBLAS_STATUS_SUCCESS;
  const int ar = op_a == CUBLAS_OP_N ? m : k, ac = op_a == CUBLAS_OP_N ? k : m;
  const int br = op_b == CUBLAS_OP_N ? k : n, bc = op_b == CUBLAS_OP_N ? n : k;
  if (!operand_ok("cublasGemmEx", "A", A, ta, ar, ac, lda, h->device) || !operand_ok("cublasGemmEx", "B", B, tb, br, bc, ldb, h->device) ||
      !operand_ok("cublasGemmEx", "C", C, tc, m, n, ldc, h->device))
    return CUBLAS_STATUS_INVALID_VALUE;  // on a device: an illegal address
  const float a = *static_cast<const float*>(alpha), b = *static_cast<const float*>(beta);
  enqueue(h->stream, [=]() {
    trace_gemm("cublasGemmEx", m, n, k, 1);
    gemm(op_a, op_b, m, n, k, a, A, ta, lda, B, tb, ldb, b, C, tc, ldc);
  });
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t gemm_batched_ex(cublasHandle_t h, cublasOperation_t op_a, cublasOperation_t op_b, int m, int n, int k,
                               const void* alpha, const void* const A[], cudaDataType ta, int lda, const void* const B[],
                               cudaDataType tb, int ldb, const void* beta, void* const C[], cudaDataType tc, int ldc,
                               int batch, cublasComputeType_t compute, cublasGemmAlgo_t) {
  const cublasStatus_t s = check_call("cublasGemmBatchedEx", h, op_a, op_b, m, n, k, alpha, beta, ta, tb, tc, lda, ldb, ldc, batch, compute);
  if (s != CUBLAS_STATUS_SUCCESS) return s;
  if (m == 0 || n == 0 || batch == 0) return CUBLAS_STATUS_SUCCESS;
  const size_t array_bytes = sizeof(void*) * static_cast<size_t>(batch);
  if (!device_range_ok(A, array_bytes, h->device) || !device_range_ok(B, array_bytes, h->device) ||
      !device_range_ok(C, array_bytes, h->device)) {
    std::fprintf(stderr, "[tfew cuda emulator] cublasGemmBatchedEx: the pointer arrays must be in device memory\n");
    return CUBLAS_STATUS_INVALID_VALUE;
  }
  const float a = *static_cast<const float*>(alpha), b = *static_cast<const float*>(beta);
  const int ar = op_a == CUBLAS_OP_N ? m : k, ac = op_a == CUBLAS_OP_N ? k : m;
  const int br = op_b == CUBLAS_OP_N ? k : n, bc = op_b == CUBLAS_OP_N ? n : k;
  // The pointer arrays are device data: read them when the work runs (a graph replay sees their new values).
  enqueue(h->stream, [=]() {
    trace_gemm("cublasGemmBatchedEx", m, n, k, batch);
    for (int i = 0; i < batch; ++i) {
      if (!operand_ok("cublasGemmBatchedEx", "A[i]", A[i], ta, ar, ac, lda, h->device) ||
          !operand_ok("cublasGemmBatchedEx", "B[i]", B[i], tb, br, bc, ldb, h->device) ||
          !operand_ok("cublasGemmBatchedEx", "C[i]", C[i], tc, m, n, ldc, h->device)) {
        device_fault(cudaErrorIllegalAddress, "cublasGemmBatchedEx operand outside device memory (batch entry " +
                                                  std::to_string(i) + ")");
        return;
      }
      gemm(op_a, op_b, m, n, k, a, A[i], ta, lda, B[i], tb, ldb, b, C[i], tc, ldc);
    }
  });
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t gemm_strided_batched_ex(cublasHandle_t h, cublasOperation_t op_a, cublasOperation_t op_b, int m, int n,
                                       int k, const void* alpha, const void* A, cudaDataType ta, int lda,
                                       long long stride_a, const void* B, cudaDataType tb, int ldb, long long stride_b,
                                       const void* beta, void* C, cudaDataType tc, int ldc, long long stride_c,
                                       int batch, cublasComputeType_t compute, cublasGemmAlgo_t) {
  const char* call = "cublasGemmStridedBatchedEx";
  const cublasStatus_t s = check_call(call, h, op_a, op_b, m, n, k, alpha, beta, ta, tb, tc, lda, ldb, ldc, batch, compute);
  if (s != CUBLAS_STATUS_SUCCESS) return s;
  if (m == 0 || n == 0 || batch == 0) return CUBLAS_STATUS_SUCCESS;
  const int ar = op_a == CUBLAS_OP_N ? m : k, ac = op_a == CUBLAS_OP_N ? k : m;
  const int br = op_b == CUBLAS_OP_N ? k : n, bc = op_b == CUBLAS_OP_N ? n : k;
  auto at = [](const void* p, cudaDataType t, long long stride, int i) {
    return static_cast<const char*>(p) + static_cast<long long>(i) * stride * static_cast<long long>(type_bytes(t));
  };
  for (int i = 0; i < batch; ++i)
    if (!operand_ok(call, "A[i]", at(A, ta, stride_a, i), ta, ar, ac, lda, h->device) ||
        !operand_ok(call, "B[i]", at(B, tb, stride_b, i), tb, br, bc, ldb, h->device) ||
        !operand_ok(call, "C[i]", at(C, tc, stride_c, i), tc, m, n, ldc, h->device))
      return CUBLAS_STATUS_INVALID_VALUE;  // on a device: an illegal address
  const float a = *static_cast<const float*>(alpha), b = *static_cast<const float*>(beta);
  enqueue(h->stream, [=]() {
    trace_gemm(call, m, n, k, batch);
    for (int i = 0; i < batch; ++i)
      gemm(op_a, op_b, m, n, k, a, at(A, ta, stride_a, i), ta, lda, at(B, tb, stride_b, i), tb, ldb, b,
           const_cast<char*>(at(C, tc, stride_c, i)), tc, ldc);
  });
  return CUBLAS_STATUS_SUCCESS;
}

// ---- cuBLASLt: the descriptors the GEMM tuner builds, a heuristic offering three interchangeable "algorithms" (the
// same CPU product: the tuner's choice cannot change a result here, its bookkeeping and call mapping are what is
// checked), and cublasLtMatmul as cublasGemmEx (D = C only, as we call it).
cublasStatus_t lt_create(cublasLtHandle_t* h) {
  if (!h) return CUBLAS_STATUS_INVALID_VALUE;
  *h = new CublasLtContextOpaque();
  (*h)->device = current_device();
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t lt_destroy(cublasLtHandle_t h) {
  delete h;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t lt_desc_create(cublasLtMatmulDesc_t* d, cublasComputeType_t compute, cudaDataType scale) {
  if (!d) return CUBLAS_STATUS_INVALID_VALUE;
  *d = new CublasLtDescOpaque();
  (*d)->compute = compute;
  (*d)->scale = scale;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t lt_desc_destroy(cublasLtMatmulDesc_t d) {
  delete d;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t lt_desc_set(cublasLtMatmulDesc_t d, int attr, const void* buf, size_t bytes) {
  if (!d || !buf || bytes != sizeof(int32_t)) return CUBLAS_STATUS_INVALID_VALUE;
  const int32_t v = *static_cast<const int32_t*>(buf);
  if (attr == CUBLASLT_MATMUL_DESC_TRANSA) d->transa = v;
  else if (attr == CUBLASLT_MATMUL_DESC_TRANSB) d->transb = v;
  else return CUBLAS_STATUS_INVALID_VALUE;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t lt_layout_create(cublasLtMatrixLayout_t* l, cudaDataType type, uint64_t rows, uint64_t cols, int64_t ld) {
  if (!l || ld < static_cast<int64_t>(std::max<uint64_t>(1, rows))) return CUBLAS_STATUS_INVALID_VALUE;
  *l = new CublasLtLayoutOpaque{type, rows, cols, ld, 1, 0};
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t lt_layout_set(cublasLtMatrixLayout_t l, int attr, const void* buf, size_t bytes) {
  if (!l || !buf) return CUBLAS_STATUS_INVALID_VALUE;
  if (attr == CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT && bytes == sizeof(int32_t)) {
    l->batch = *static_cast<const int32_t*>(buf);
    return l->batch >= 1 ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_INVALID_VALUE;
  }
  if (attr == CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET && bytes == sizeof(int64_t)) {
    l->stride = *static_cast<const int64_t*>(buf);
    return CUBLAS_STATUS_SUCCESS;
  }
  return CUBLAS_STATUS_INVALID_VALUE;
}
cublasStatus_t lt_layout_destroy(cublasLtMatrixLayout_t l) {
  delete l;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t lt_pref_create(cublasLtMatmulPreference_t* p) {
  if (!p) return CUBLAS_STATUS_INVALID_VALUE;
  *p = new CublasLtPreferenceOpaque();
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t lt_pref_destroy(cublasLtMatmulPreference_t p) {
  delete p;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t lt_pref_set(cublasLtMatmulPreference_t p, int attr, const void* buf, size_t bytes) {
  if (!p || !buf) return CUBLAS_STATUS_INVALID_VALUE;
  if (attr == CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES) {
    if (bytes != sizeof(uint64_t)) return CUBLAS_STATUS_INVALID_VALUE;
    p->max_workspace = *static_cast<const uint64_t*>(buf);
    return CUBLAS_STATUS_SUCCESS;
  }
  const bool u32 = attr == CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK || (attr >= CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES &&
                                                                          attr <= CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES);
  return u32 && bytes == sizeof(uint32_t) ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_INVALID_VALUE;
}
cublasStatus_t lt_heuristic(cublasLtHandle_t h, cublasLtMatmulDesc_t d, cublasLtMatrixLayout_t a, cublasLtMatrixLayout_t b,
                            cublasLtMatrixLayout_t c, cublasLtMatrixLayout_t dl, cublasLtMatmulPreference_t p, int requested,
                            cublasLtMatmulHeuristicResult_t* results, int* returned) {
  if (!h || !d || !a || !b || !c || !dl || !p || requested <= 0 || !results || !returned) return CUBLAS_STATUS_INVALID_VALUE;
  *returned = std::min(requested, 3);
  for (int i = 0; i < *returned; ++i) {
    results[i] = cublasLtMatmulHeuristicResult_t{};
    results[i].algo.data[0] = static_cast<uint64_t>(i) + 1;
    results[i].state = CUBLAS_STATUS_SUCCESS;
    results[i].wavesCount = 1.f;
  }
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t lt_matmul(cublasLtHandle_t h, cublasLtMatmulDesc_t d, const void* alpha, const void* A, cublasLtMatrixLayout_t la,
                         const void* B, cublasLtMatrixLayout_t lb, const void* beta, const void* C, cublasLtMatrixLayout_t lc,
                         void* D, cublasLtMatrixLayout_t ld, const cublasLtMatmulAlgo_t* algo, void*, size_t, cudaStream_t stream) {
  if (!h || !d || !la || !lb || !lc || !ld || !algo || algo->data[0] == 0) return CUBLAS_STATUS_INVALID_VALUE;
  if (C != D || lc->rows != ld->rows || lc->cols != ld->cols || lc->ld != ld->ld || lc->type != ld->type ||
      lc->batch != ld->batch || lc->stride != ld->stride)
    return CUBLAS_STATUS_NOT_SUPPORTED;  // (the emulator does only what we call)
  const int batch = ld->batch;
  if (la->batch != batch || lb->batch != batch) return CUBLAS_STATUS_INVALID_VALUE;
  const int m = static_cast<int>(ld->rows), n = static_cast<int>(ld->cols);
  const int k = static_cast<int>(d->transa == CUBLAS_OP_N ? la->cols : la->rows);
  const int lda = static_cast<int>(la->ld), ldb = static_cast<int>(lb->ld), ldc = static_cast<int>(ld->ld);
  CublasContextOpaque ctx;
  ctx.device = h->device;
  const char* call = "cublasLtMatmul";
  const cublasStatus_t s = check_call(call, &ctx, d->transa, d->transb, m, n, k, alpha, beta, la->type, lb->type, ld->type,
                                      lda, ldb, ldc, 1, d->compute);
  if (s != CUBLAS_STATUS_SUCCESS) return s;
  if (static_cast<int>(lb->rows) != (d->transb == CUBLAS_OP_N ? k : n) || (d->transa == CUBLAS_OP_N ? la->rows : la->cols) != ld->rows)
    return CUBLAS_STATUS_INVALID_VALUE;
  auto at = [](const void* p, cudaDataType t, int64_t stride, int i) {
    return static_cast<const char*>(p) + static_cast<int64_t>(i) * stride * static_cast<int64_t>(type_bytes(t));
  };
  for (int i = 0; i < batch; ++i)
    if (!operand_ok(call, "A", at(A, la->type, la->stride, i), la->type, static_cast<int>(la->rows), static_cast<int>(la->cols), lda, h->device) ||
        !operand_ok(call, "B", at(B, lb->type, lb->stride, i), lb->type, static_cast<int>(lb->rows), static_cast<int>(lb->cols), ldb, h->device) ||
        !operand_ok(call, "D", at(D, ld->type, ld->stride, i), ld->type, m, n, ldc, h->device))
      return CUBLAS_STATUS_INVALID_VALUE;
  const float a = *static_cast<const float*>(alpha), b = *static_cast<const float*>(beta);
  const cublasOperation_t op_a = d->transa, op_b = d->transb;
  const cudaDataType ta = la->type, tb = lb->type, tc = ld->type;
  const int64_t sa = la->stride, sb = lb->stride, sd = ld->stride;
  enqueue(stream, [=]() {
    trace_gemm(call, m, n, k, batch);
    for (int i = 0; i < batch; ++i)
      gemm(op_a, op_b, m, n, k, a, at(A, ta, sa, i), ta, lda, at(B, tb, sb, i), tb, ldb, b,
           const_cast<char*>(at(D, tc, sd, i)), tc, ldc);
  });
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t get_property(libraryPropertyType_t type, int* value) {
  if (!value) return CUBLAS_STATUS_INVALID_VALUE;
  *value = type == CUBLAS_PROP_MAJOR_VERSION ? 13 : 0;
  return CUBLAS_STATUS_SUCCESS;
}

}  // namespace

// Fills the loader's table with the emulated entry points (called by cublas_loader.cc in the emulation build).
void fill_emulated_cublas(gpu::CublasLibrary& lib) {
  CublasApi& a = lib.api;
  a.create = create;
  a.destroy = destroy;
  a.set_stream = set_stream;
  a.set_workspace = set_workspace;
  a.set_math_mode = set_math_mode;
  a.gemm_ex = gemm_ex;
  a.gemm_batched_ex = gemm_batched_ex;
  a.gemm_strided_batched_ex = gemm_strided_batched_ex;
  a.get_property = get_property;
  CublasLtApi& lt = lib.lt;
  lt.create = lt_create;
  lt.destroy = lt_destroy;
  lt.desc_create = lt_desc_create;
  lt.desc_destroy = lt_desc_destroy;
  lt.desc_set = lt_desc_set;
  lt.layout_create = lt_layout_create;
  lt.layout_destroy = lt_layout_destroy;
  lt.layout_set = lt_layout_set;
  lt.pref_create = lt_pref_create;
  lt.pref_destroy = lt_pref_destroy;
  lt.pref_set = lt_pref_set;
  lt.heuristic = lt_heuristic;
  lt.matmul = lt_matmul;
  lib.lt_loaded = true;
  lib.path = "emulated cuBLAS (CPU, cuda/emu/emu_cublas.cc)";
  lib.version = "13.0.0";
  lib.loaded = true;
}

}  // namespace emu
}  // namespace tfew
