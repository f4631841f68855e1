// probe_cuda(device): can the CUDA backend run here, on that GPU, and if not, why (in words a user can act on).
// Never throws. Computed once per process and GPU: drivers and GPUs do not appear at run time.
#include <cuda_runtime_api.h>
#include <dlfcn.h>

#include <cstdlib>
#include <map>
#include <mutex>
#include <string>

#include "gpu/cublas_loader.h"
#include "gpu/device_select.h"
#include "model/engine.h"

namespace tfew {

namespace {

std::string cuda_version_text(int v) {
  return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
}

bool driver_library_present() {
#if defined(TFEW_CUDA_EMULATION)
  return true;  // (the emulator has no libcuda; its TFEW_EMU_PROBE faults stand for the driver's absence or age)
#else
  void* lib = dlopen("libcuda.so.1", RTLD_LAZY | RTLD_LOCAL);
  if (!lib) return false;
  dlclose(lib);
  return true;
#endif
}

// What holds for every GPU: the driver, the runtime, at least one device, cuBLAS. On success the probe's reason is
// empty and device_count says how many GPUs are visible.
CudaProbe probe_system() {
  CudaProbe p;
  p.compiled = true;
  p.usable = false;

  int device_count = 0;
  cudaError_t err = cudaGetDeviceCount(&device_count);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the runtime's error state so later calls report their own errors
    if (err == cudaErrorInsufficientDriver) {
      // The static runtime reports a missing driver and an old driver alike; tell them apart.
      int driver_version = 0;
      cudaDriverGetVersion(&driver_version);
      if (!driver_library_present() || driver_version == 0) {
        p.reason = "no NVIDIA driver found (libcuda.so.1 is not installed or not on the loader path): "
                   "the CUDA backend needs an NVIDIA GPU with its driver";
      } else {
        p.reason = "the NVIDIA driver supports CUDA " + cuda_version_text(driver_version) +
                   " but this build of the addon uses the CUDA " + cuda_version_text(CUDART_VERSION) +
                   " runtime: update the NVIDIA driver";
      }
    } else if (err == cudaErrorNoDevice) {
      const char* visible = std::getenv("CUDA_VISIBLE_DEVICES");
      p.reason = std::string("no CUDA-capable GPU is visible") +
                 (visible ? std::string(" (CUDA_VISIBLE_DEVICES=\"") + visible + "\")" : std::string());
    } else {
      p.reason = std::string("CUDA could not be initialised: ") + cudaGetErrorName(err) + " (" +
                 cudaGetErrorString(err) + ")";
    }
    return p;
  }
  if (device_count <= 0) {
    p.reason = "no CUDA-capable GPU is visible";
    return p;
  }
  p.device_count = device_count;
  const gpu::CublasLibrary& cublas = gpu::cublas_library();
  if (!cublas.loaded) {
    p.reason = cublas.error;
    return p;
  }
  p.cublas_library = cublas.path + (cublas.version.empty() ? "" : " (" + cublas.version + ")");
  return p;
}

// One GPU, after probe_system passed: its properties, compute capability 8.0 or newer, a context.
CudaProbe probe_device(CudaProbe p, int device) {
  p.device_index = device;
  cudaDeviceProp prop;
  cudaError_t err = cudaGetDeviceProperties(&prop, device);
  if (err != cudaSuccess) {
    cudaGetLastError();
    p.reason = std::string("cudaGetDeviceProperties failed: ") + cudaGetErrorString(err);
    return p;
  }
  p.device_name = prop.name;
  p.compute_capability = prop.major * 10 + prop.minor;
  p.total_memory = static_cast<int64_t>(prop.totalGlobalMem);
  if (prop.major < 8) {
    p.reason = "GPU " + std::to_string(device) + " (" + p.device_name + ") has compute capability " +
               std::to_string(prop.major) + "." + std::to_string(prop.minor) +
               "; the CUDA backend needs 8.0 or newer (bf16 tensor cores: A100, H100, RTX 30xx and later)";
    return p;
  }
  // Creating the context catches GPUs that exist but cannot be used (exclusive-process mode, no memory).
  err = cudaSetDevice(device);
  if (err == cudaSuccess) err = cudaFree(nullptr);
  if (err != cudaSuccess) {
    cudaGetLastError();
    p.reason = "GPU " + std::to_string(device) + " (" + p.device_name + ") cannot be used: " + cudaGetErrorName(err) +
               " (" + cudaGetErrorString(err) + ")";
    return p;
  }
  p.usable = true;
  p.reason = "";
  return p;
}

}  // namespace

CudaProbe probe_cuda(int device) {
  // The system part once per process (drivers and GPUs do not appear at run time), each GPU's once.
  static CudaProbe system;
  static std::once_flag once;
  std::call_once(once, [] {
    try {
      system = probe_system();
    } catch (const std::exception& e) {
      system = CudaProbe();
      system.compiled = true;
      system.reason = std::string("CUDA probe failed: ") + e.what();
    }
  });
  if (!system.reason.empty()) return system;
  CudaProbe p = system;
  const int count = system.device_count;
  std::string error;
  const int index = device < 0 ? gpu::selected_device(count, &error) : device;
  if (index < 0 || index >= count) {
    p.device_index = index < 0 ? -1 : index;
    p.reason = index < 0 ? error : "cuda.device " + std::to_string(index) + " is not one of the " +
                                       std::to_string(count) + " visible GPU(s) (0 to " + std::to_string(count - 1) + ")";
    return p;
  }
  // Kept: a usable GPU, or one too old. A GPU that could not be used now (busy in exclusive-process mode, out of
  // memory for a context) is probed again next time.
  static std::mutex mutex;
  static std::map<int, CudaProbe> devices;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = devices.find(index);
  if (it != devices.end()) return it->second;
  CudaProbe d;
  try {
    d = probe_device(p, index);
  } catch (const std::exception& e) {
    d = p;
    d.reason = std::string("CUDA probe failed: ") + e.what();
  }
  if (d.usable || (d.compute_capability > 0 && d.compute_capability < 80)) devices.emplace(index, d);
  return d;
}

CudaMemoryInfo cuda_memory_info(int device) {
  CudaMemoryInfo info;
  const CudaProbe p = probe_cuda(device);
  if (!p.usable || cudaSetDevice(p.device_index) != cudaSuccess) return info;
  size_t free_bytes = 0, total_bytes = 0;
  if (cudaMemGetInfo(&free_bytes, &total_bytes) != cudaSuccess) return info;
  info.ok = true;
  info.free_bytes = static_cast<int64_t>(free_bytes);
  info.total_bytes = static_cast<int64_t>(total_bytes);
  return info;
}

}  // namespace tfew
