// Every CUDA runtime and cuBLAS call goes through these checks: a failure becomes a tfew::TfewError with a
// stable code (never an abort), naming the call, the CUDA error and where it happened.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdlib>
#include <cstring>
#include <string>

#include "core/errors.h"
#include "gpu/cublas_loader.h"

namespace tfew {
namespace gpu {

inline ErrorCode code_for_cuda_error(cudaError_t e) {
  switch (e) {
    case cudaErrorMemoryAllocation: return ErrorCode::OutOfMemory;
    case cudaErrorInsufficientDriver:
    case cudaErrorNoDevice:
    case cudaErrorInvalidDevice:
    case cudaErrorDevicesUnavailable:
    case cudaErrorNoKernelImageForDevice:
    case cudaErrorUnsupportedPtxVersion:
    case cudaErrorSystemDriverMismatch:
    case cudaErrorCompatNotSupportedOnDevice:
      return ErrorCode::DeviceUnavailable;
    default: return ErrorCode::Cuda;
  }
}

// Errors after which the CUDA context cannot be used any more: every later CUDA call in this process fails
// (the process must be restarted; recreating the engine does not help).
inline bool is_sticky_cuda_error(cudaError_t e) {
  switch (e) {
    case cudaErrorIllegalAddress:
    case cudaErrorLaunchFailure:
    case cudaErrorIllegalInstruction:
    case cudaErrorMisalignedAddress:
    case cudaErrorInvalidAddressSpace:
    case cudaErrorInvalidPc:
    case cudaErrorHardwareStackError:
    case cudaErrorAssert:
    case cudaErrorECCUncorrectable:
    case cudaErrorLaunchTimeout:
    case cudaErrorContextIsDestroyed:
      return true;
    default: return false;
  }
}

[[noreturn]] inline void throw_cuda_error(cudaError_t e, const char* what, const char* file, int line) {
  std::string msg = std::string(what) + " failed: " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) +
                    ") at " + file + ":" + std::to_string(line);
  if (e == cudaErrorMemoryAllocation) msg = "out of GPU memory: " + msg;
  // A sticky error poisons the process's CUDA context for good (every later call fails the same way), so
  // reloading the model in this process cannot help.
  if (is_sticky_cuda_error(e)) msg += "; the CUDA context of this process is no longer usable: restart the process";
  fail(code_for_cuda_error(e), msg);
}

inline void check_cuda(cudaError_t e, const char* what, const char* file, int line) {
  if (e != cudaSuccess) throw_cuda_error(e, what, file, line);
}

inline void check_cublas(cublasStatus_t s, const char* what, const char* file, int line) {
  if (s == CUBLAS_STATUS_SUCCESS) return;
  std::string msg = std::string(what) + " failed: " + cublas_status_name(s) + " at " + file + ":" +
                    std::to_string(line);
  fail(s == CUBLAS_STATUS_ALLOC_FAILED ? ErrorCode::OutOfMemory : ErrorCode::Cuda, msg);
}

// An on/off environment switch: unset or empty gives `fallback`; "0", "false" and "off" are off.
inline bool env_flag(const char* name, bool fallback) {
  const char* v = std::getenv(name);
  if (!v || !v[0]) return fallback;
  return !(std::strcmp(v, "0") == 0 || std::strcmp(v, "false") == 0 || std::strcmp(v, "off") == 0);
}

// An integer environment setting in [lo, hi]: unset or empty gives `fallback`; anything else is an InvalidArgument.
inline int env_int(const char* name, int lo, int hi, int fallback) {
  const char* v = std::getenv(name);
  if (!v || !v[0]) return fallback;
  char* end = nullptr;
  const long value = std::strtol(v, &end, 10);
  if (*end || value < lo || value > hi)
    fail(ErrorCode::InvalidArgument, std::string(name) + " must be an integer from " + std::to_string(lo) + " to " +
                                         std::to_string(hi) + ", got '" + v + "'");
  return static_cast<int>(value);
}

// TFEW_CUDA_DEBUG_SYNC=1: synchronise after every kernel launch, so an asynchronous fault (an illegal
// address, say) is reported by the launch that caused it, by name. Slow; turns CUDA graphs off.
inline bool debug_sync() {
  static const bool on = [] {
    const char* v = std::getenv("TFEW_CUDA_DEBUG_SYNC");
    return v && v[0] && v[0] != '0';
  }();
  return on;
}

inline void check_launch(const char* kernel, const char* file, int line) {
  check_cuda(cudaGetLastError(), kernel, file, line);
  if (debug_sync()) check_cuda(cudaDeviceSynchronize(), kernel, file, line);
}

}  // namespace gpu
}  // namespace tfew

#define TFEW_CUDA_CHECK(expr) ::tfew::gpu::check_cuda((expr), #expr, __FILE__, __LINE__)
#define TFEW_CUBLAS_CHECK(expr) ::tfew::gpu::check_cublas((expr), #expr, __FILE__, __LINE__)
// After a kernel launch: catches bad launch configurations (and earlier asynchronous faults).
#define TFEW_CUDA_CHECK_LAUNCH(name) ::tfew::gpu::check_launch(name, __FILE__, __LINE__)
