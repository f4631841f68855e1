// cuBLAS opened at run time with dlopen, so the addon builds where no cuBLAS exists (no cublas_v2.h here
// or in CI) and loads on machines without CUDA libraries. We declare only the handful of types, enum values
// and entry points we call; the values are those of the public cuBLAS API (cublas_api.h / cuBLAS docs).
#pragma once
#include <cuda_runtime_api.h>
#include <library_types.h>  // cudaDataType (CUDA_R_16BF = 14, CUDA_R_32F = 0): part of the CUDA runtime headers

#include <cstddef>
#include <cstdint>
#include <string>

namespace tfew {
namespace gpu {

struct CublasContextOpaque;
typedef CublasContextOpaque* cublasHandle_t;

typedef int cublasStatus_t;  // CUBLAS_STATUS_*
enum : int {
  CUBLAS_STATUS_SUCCESS = 0,
  CUBLAS_STATUS_NOT_INITIALIZED = 1,
  CUBLAS_STATUS_ALLOC_FAILED = 3,
  CUBLAS_STATUS_INVALID_VALUE = 7,
  CUBLAS_STATUS_ARCH_MISMATCH = 8,
  CUBLAS_STATUS_MAPPING_ERROR = 11,
  CUBLAS_STATUS_EXECUTION_FAILED = 13,
  CUBLAS_STATUS_INTERNAL_ERROR = 14,
  CUBLAS_STATUS_NOT_SUPPORTED = 15,
  CUBLAS_STATUS_LICENSE_ERROR = 16,
};

typedef int cublasOperation_t;
enum : int { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1 };

typedef int cublasComputeType_t;
enum : int { CUBLAS_COMPUTE_32F = 68 };  // fp32 accumulation; we never use CUBLAS_COMPUTE_16F (64)

typedef int cublasGemmAlgo_t;
enum : int { CUBLAS_GEMM_DEFAULT = -1 };

typedef int cublasMath_t;
enum : int {
  CUBLAS_DEFAULT_MATH = 0,  // no TF32 for fp32 inputs
  // reductions inside a GEMM (split-K) use the compute type (fp32), not the bf16 output type
  CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION = 16,
};

typedef int libraryPropertyType_t;
enum : int { CUBLAS_PROP_MAJOR_VERSION = 0, CUBLAS_PROP_MINOR_VERSION = 1, CUBLAS_PROP_PATCH_LEVEL = 2 };

// The entry points we resolve. All required except get_property and get_status_string.
struct CublasApi {
  cublasStatus_t (*create)(cublasHandle_t*) = nullptr;                      // cublasCreate_v2
  cublasStatus_t (*destroy)(cublasHandle_t) = nullptr;                      // cublasDestroy_v2
  cublasStatus_t (*set_stream)(cublasHandle_t, cudaStream_t) = nullptr;     // cublasSetStream_v2
  cublasStatus_t (*set_workspace)(cublasHandle_t, void*, size_t) = nullptr; // cublasSetWorkspace_v2
  cublasStatus_t (*set_math_mode)(cublasHandle_t, cublasMath_t) = nullptr;  // cublasSetMathMode
  cublasStatus_t (*gemm_ex)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int, int,
                            const void* alpha, const void* A, cudaDataType Atype, int lda, const void* B,
                            cudaDataType Btype, int ldb, const void* beta, void* C, cudaDataType Ctype,
                            int ldc, cublasComputeType_t, cublasGemmAlgo_t) = nullptr;  // cublasGemmEx
  cublasStatus_t (*gemm_batched_ex)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int, int,
                                    const void* alpha, const void* const A[], cudaDataType Atype, int lda,
                                    const void* const B[], cudaDataType Btype, int ldb, const void* beta,
                                    void* const C[], cudaDataType Ctype, int ldc, int batch_count,
                                    cublasComputeType_t, cublasGemmAlgo_t) = nullptr;  // cublasGemmBatchedEx
  cublasStatus_t (*gemm_strided_batched_ex)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int, int,
                                            const void* alpha, const void* A, cudaDataType Atype, int lda,
                                            long long stride_a, const void* B, cudaDataType Btype, int ldb,
                                            long long stride_b, const void* beta, void* C, cudaDataType Ctype, int ldc,
                                            long long stride_c, int batch_count, cublasComputeType_t,
                                            cublasGemmAlgo_t) = nullptr;  // cublasGemmStridedBatchedEx
  cublasStatus_t (*get_property)(libraryPropertyType_t, int*) = nullptr;  // cublasGetProperty (optional)
  const char* (*get_status_string)(cublasStatus_t) = nullptr;             // cublasGetStatusString (optional)
};

// ---- cuBLASLt (libcublasLt, beside cuBLAS): only what the GEMM tuner (Gemm::enable_tuning) calls. Values and
// layouts as in cublasLt.h.
struct CublasLtContextOpaque;
typedef CublasLtContextOpaque* cublasLtHandle_t;
struct CublasLtDescOpaque;
typedef CublasLtDescOpaque* cublasLtMatmulDesc_t;
struct CublasLtLayoutOpaque;
typedef CublasLtLayoutOpaque* cublasLtMatrixLayout_t;
struct CublasLtPreferenceOpaque;
typedef CublasLtPreferenceOpaque* cublasLtMatmulPreference_t;
struct cublasLtMatmulAlgo_t {
  uint64_t data[8];
};
struct cublasLtMatmulHeuristicResult_t {
  cublasLtMatmulAlgo_t algo;
  size_t workspaceSize;
  cublasStatus_t state;
  float wavesCount;
  int reserved[4];
};
enum : int {
  CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT = 5,           // int32_t
  CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET = 6,  // int64_t (elements)
  CUBLASLT_MATMUL_DESC_TRANSA = 3,  // int32_t (cublasOperation_t)
  CUBLASLT_MATMUL_DESC_TRANSB = 4,
  CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES = 1,    // uint64_t
  CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK = 3,  // uint32_t
  CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES = 5,  // uint32_t each (default 256)
  CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES = 6,
  CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES = 7,
  CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES = 8,
  // split-K partial sums kept in the compute type (fp32), as CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION asks
  // of cublasGemmEx; not in place (that form adds into the output in its own type)
  CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE = 2,
};

struct CublasLtApi {
  cublasStatus_t (*create)(cublasLtHandle_t*) = nullptr;                                   // cublasLtCreate
  cublasStatus_t (*destroy)(cublasLtHandle_t) = nullptr;                                   // cublasLtDestroy
  cublasStatus_t (*desc_create)(cublasLtMatmulDesc_t*, cublasComputeType_t, cudaDataType) = nullptr;
  cublasStatus_t (*desc_destroy)(cublasLtMatmulDesc_t) = nullptr;
  cublasStatus_t (*desc_set)(cublasLtMatmulDesc_t, int, const void*, size_t) = nullptr;   // ...DescSetAttribute
  cublasStatus_t (*layout_create)(cublasLtMatrixLayout_t*, cudaDataType, uint64_t rows, uint64_t cols,
                                  int64_t ld) = nullptr;
  cublasStatus_t (*layout_destroy)(cublasLtMatrixLayout_t) = nullptr;
  cublasStatus_t (*layout_set)(cublasLtMatrixLayout_t, int, const void*, size_t) = nullptr;  // ...LayoutSetAttribute
  cublasStatus_t (*pref_create)(cublasLtMatmulPreference_t*) = nullptr;
  cublasStatus_t (*pref_destroy)(cublasLtMatmulPreference_t) = nullptr;
  cublasStatus_t (*pref_set)(cublasLtMatmulPreference_t, int, const void*, size_t) = nullptr;
  cublasStatus_t (*heuristic)(cublasLtHandle_t, cublasLtMatmulDesc_t, cublasLtMatrixLayout_t, cublasLtMatrixLayout_t,
                              cublasLtMatrixLayout_t, cublasLtMatrixLayout_t, cublasLtMatmulPreference_t, int requested,
                              cublasLtMatmulHeuristicResult_t* results, int* returned) = nullptr;  // ...AlgoGetHeuristic
  cublasStatus_t (*matmul)(cublasLtHandle_t, cublasLtMatmulDesc_t, const void* alpha, const void* A,
                           cublasLtMatrixLayout_t, const void* B, cublasLtMatrixLayout_t, const void* beta, const void* C,
                           cublasLtMatrixLayout_t, void* D, cublasLtMatrixLayout_t, const cublasLtMatmulAlgo_t*,
                           void* workspace, size_t workspace_bytes, cudaStream_t) = nullptr;  // cublasLtMatmul
};

struct CublasLibrary {
  bool loaded = false;
  std::string error;    // why loading failed (names tried and dlerror)
  std::string path;     // the file that was opened, e.g. /usr/local/cuda/lib64/libcublas.so.13
  std::string version;  // "13.0.0" when cublasGetProperty exists
  CublasApi api;
  // cuBLASLt: optional (the GEMM tuner needs it; everything else runs without it)
  bool lt_loaded = false;
  std::string lt_error;  // why not
  CublasLtApi lt;
};

// Opens cuBLAS once per process (thread-safe) and returns the result; never throws. Tries $TFEW_CUBLAS_PATH,
// then libcublas.so.13, then libcublas.so.12 (the soname follows the CUDA major version).
const CublasLibrary& cublas_library();

// A readable name for a status, e.g. "CUBLAS_STATUS_NOT_SUPPORTED".
std::string cublas_status_name(cublasStatus_t s);

}  // namespace gpu
}  // namespace tfew
