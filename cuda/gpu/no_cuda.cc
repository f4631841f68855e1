// Linked instead of the CUDA backend when the addon is built without nvcc (TFEW_CUDA=OFF, or node-gyp).
#include "model/engine.h"
#include "core/errors.h"

namespace tfew {

CudaProbe probe_cuda(int) {
  CudaProbe p;
  p.compiled = false;
  p.usable = false;
  p.reason = "this build of the addon has no CUDA backend (built without nvcc, or by node-gyp; the CUDA backend needs cmake and nvcc: TFEW_CUDA=on npm rebuild @tfew/cuda)";
  return p;
}

CudaMemoryInfo cuda_memory_info(int) { return CudaMemoryInfo(); }

std::unique_ptr<Engine> make_cuda_engine(const T5Config&, const WeightSource&, const CudaEngineOptions&) {
  fail(ErrorCode::DeviceUnavailable, probe_cuda().reason);
}

int64_t cuda_arena_bytes(const T5Config&, const CudaArenaShape&) { fail(ErrorCode::DeviceUnavailable, probe_cuda().reason); }
int64_t cuda_reserve_bytes(const T5Config&, const ReserveShape&) { fail(ErrorCode::DeviceUnavailable, probe_cuda().reason); }

Recompute cuda_recompute_choice(const T5Config&, const CudaArenaShape&, int64_t, int64_t, const std::vector<CudaArenaShape>&) {
  fail(ErrorCode::DeviceUnavailable, probe_cuda().reason);
}

}  // namespace tfew
