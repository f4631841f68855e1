#include "gpu/cublas_loader.h"

#include <dlfcn.h>
#include <link.h>

#include <cstdlib>
#include <mutex>
#include <vector>

namespace tfew {
#ifdef TFEW_CUDA_EMULATION
namespace emu {
void fill_emulated_cublas(gpu::CublasLibrary& lib);  // cuda/emu/emu_cublas.cc
bool machine_lacks_cublas();                          // cuda/emu/emu_runtime.cc
}  // namespace emu
#endif
namespace gpu {

namespace {

template <typename Fn>
bool resolve(void* lib, const char* name, Fn& out, std::string& missing) {
  void* sym = dlsym(lib, name);
  if (!sym) {
    if (!missing.empty()) missing += ", ";
    missing += name;
    return false;
  }
  out = reinterpret_cast<Fn>(sym);
  return true;
}

std::string loaded_path(void* lib, const std::string& fallback) {
  struct link_map* map = nullptr;
  if (dlinfo(lib, RTLD_DI_LINKMAP, &map) == 0 && map && map->l_name && map->l_name[0]) return map->l_name;
  return fallback;
}

// The first of `names` that dlopen opens (RTLD_LOCAL: our symbols stay private even if another addon in the process
// loaded another cuBLAS), with the path it was found at; else nullptr, and `tried` says what each name gave.
void* open_first(const std::vector<std::string>& names, std::string& path, std::string& tried) {
  for (const auto& name : names) {
    dlerror();
    if (void* lib = dlopen(name.c_str(), RTLD_NOW | RTLD_LOCAL)) {
      path = loaded_path(lib, name);
      return lib;
    }
    const char* err = dlerror();
    if (!tried.empty()) tried += "; ";
    tried += name + ": " + (err ? err : "not found");
  }
  return nullptr;
}

// cuBLASLt, from cuBLAS's directory first (the same release), then by soname. Optional: only the GEMM tuner uses it.
void load_lt(CublasLibrary& out) {
  std::vector<std::string> names;
  const size_t slash = out.path.rfind('/');
  const std::string dir = slash == std::string::npos ? "" : out.path.substr(0, slash + 1);
  for (const char* so : {"libcublasLt.so.13", "libcublasLt.so.12"}) {
    if (!dir.empty()) names.push_back(dir + so);
    names.push_back(so);
  }
  std::string path, tried;
  void* lib = open_first(names, path, tried);
  if (!lib) {
    out.lt_error = "cuBLASLt could not be loaded (" + tried + ")";
    return;
  }
  CublasLtApi& a = out.lt;
  std::string missing;
  bool ok = true;
  ok &= resolve(lib, "cublasLtCreate", a.create, missing);
  ok &= resolve(lib, "cublasLtDestroy", a.destroy, missing);
  ok &= resolve(lib, "cublasLtMatmulDescCreate", a.desc_create, missing);
  ok &= resolve(lib, "cublasLtMatmulDescDestroy", a.desc_destroy, missing);
  ok &= resolve(lib, "cublasLtMatmulDescSetAttribute", a.desc_set, missing);
  ok &= resolve(lib, "cublasLtMatrixLayoutCreate", a.layout_create, missing);
  ok &= resolve(lib, "cublasLtMatrixLayoutDestroy", a.layout_destroy, missing);
  ok &= resolve(lib, "cublasLtMatrixLayoutSetAttribute", a.layout_set, missing);
  ok &= resolve(lib, "cublasLtMatmulPreferenceCreate", a.pref_create, missing);
  ok &= resolve(lib, "cublasLtMatmulPreferenceDestroy", a.pref_destroy, missing);
  ok &= resolve(lib, "cublasLtMatmulPreferenceSetAttribute", a.pref_set, missing);
  ok &= resolve(lib, "cublasLtMatmulAlgoGetHeuristic", a.heuristic, missing);
  ok &= resolve(lib, "cublasLtMatmul", a.matmul, missing);
  if (!ok) {
    out.lt_error = "cuBLASLt lacks " + missing;
    out.lt = CublasLtApi{};
    return;
  }
  out.lt_loaded = true;
}

void load(CublasLibrary& out) {
  std::vector<std::string> names;
  if (const char* override_path = std::getenv("TFEW_CUBLAS_PATH")) {
    if (override_path[0]) names.push_back(override_path);
  }
#ifdef TFEW_CUDA_EMULATION
  // The emulation build (TFEW_CUDA=EMU) emulates cuBLAS, unless the emulated machine has none (TFEW_EMU_PROBE=no-cublas,
  // for the tests of this search and its messages): then TFEW_CUBLAS_PATH alone is searched, never a real cuBLAS,
  // whose kernels could not read the emulated device's memory.
  if (!emu::machine_lacks_cublas()) {
    emu::fill_emulated_cublas(out);
    return;
  }
  if (names.empty()) names.push_back("libcublas.so.13-absent-from-this-emulated-machine");
#else
  names.push_back("libcublas.so.13");
  names.push_back("libcublas.so.12");
#endif

  std::string tried;
  void* lib = open_first(names, out.path, tried);
  if (!lib) {
    out.error = "cuBLAS could not be loaded (" + tried +
                "); install the CUDA toolkit's cuBLAS or put its lib64 directory on LD_LIBRARY_PATH";
    return;
  }

  std::string missing;
  CublasApi& a = out.api;
  bool ok = true;
  ok &= resolve(lib, "cublasCreate_v2", a.create, missing);
  ok &= resolve(lib, "cublasDestroy_v2", a.destroy, missing);
  ok &= resolve(lib, "cublasSetStream_v2", a.set_stream, missing);
  ok &= resolve(lib, "cublasSetWorkspace_v2", a.set_workspace, missing);
  ok &= resolve(lib, "cublasSetMathMode", a.set_math_mode, missing);
  ok &= resolve(lib, "cublasGemmEx", a.gemm_ex, missing);
  ok &= resolve(lib, "cublasGemmBatchedEx", a.gemm_batched_ex, missing);
  ok &= resolve(lib, "cublasGemmStridedBatchedEx", a.gemm_strided_batched_ex, missing);
  if (!ok) {
    out.error = out.path + " lacks required entry points (" + missing + "): cuBLAS 12 or newer is needed";
    dlclose(lib);
    return;
  }
  std::string optional_missing;
  resolve(lib, "cublasGetProperty", a.get_property, optional_missing);
  resolve(lib, "cublasGetStatusString", a.get_status_string, optional_missing);
  if (a.get_property) {
    int major = 0, minor = 0, patch = 0;
    if (a.get_property(CUBLAS_PROP_MAJOR_VERSION, &major) == CUBLAS_STATUS_SUCCESS &&
        a.get_property(CUBLAS_PROP_MINOR_VERSION, &minor) == CUBLAS_STATUS_SUCCESS &&
        a.get_property(CUBLAS_PROP_PATCH_LEVEL, &patch) == CUBLAS_STATUS_SUCCESS) {
      out.version = std::to_string(major) + "." + std::to_string(minor) + "." + std::to_string(patch);
    }
  }
  // The library is never closed: handles created from it may live until process exit.
  out.loaded = true;
  load_lt(out);
}

}  // namespace

const CublasLibrary& cublas_library() {
  static CublasLibrary lib;
  static std::once_flag once;
  std::call_once(once, [] { load(lib); });
  return lib;
}

std::string cublas_status_name(cublasStatus_t s) {
  switch (s) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_MAPPING_ERROR: return "CUBLAS_STATUS_MAPPING_ERROR";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    case CUBLAS_STATUS_LICENSE_ERROR: return "CUBLAS_STATUS_LICENSE_ERROR";
    default: break;
  }
  const CublasLibrary& lib = cublas_library();
  if (lib.loaded && lib.api.get_status_string) {
    const char* text = lib.api.get_status_string(s);
    if (text) return text;
  }
  return "cuBLAS status " + std::to_string(s);
}

}  // namespace gpu
}  // namespace tfew
