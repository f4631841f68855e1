// Host-side declarations of the T-Few optimizer on the device (adafactor.cu): per-adapter gradient-norm
// clipping and HF Adafactor per (IA)3 module, the same steps as cuda/model/host_training.cc (the C++ oracle)
// and lib/optim.ts. Plain C++ so the engine can include it.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace tfew {
namespace kernels {

// One (IA)3 module: `rows x cols` values at `offset` of an adapter (PEFT shape: [n,1] for k/v, [1,d_ff] for
// the FFN vector); its factored second moment lives at row_offset (rows floats) and col_offset (cols floats)
// of the adapter's state.
struct AdafactorModuleDesc {
  int64_t offset;
  int rows, cols;
  int64_t row_offset, col_offset;
};

struct AdafactorParams {
  const AdafactorModuleDesc* modules;  // device, num_modules entries
  int num_modules;
  int64_t adapter_size;                // values per adapter (IA3Layout::total)
  int64_t state_size;                  // floats of second-moment state per adapter
  float lr;                            // the scheduled lr of this step
  bool scale_parameter;
  float clip_norm;                     // <= 0: no clipping
  float weight_decay, eps1, eps2, clip_threshold, decay_rate;
};

// For each adapter a with stepped[a] != 0: clip its gradient (grads + a * adapter_size) to clip_norm by its
// global L2 norm, then one Adafactor step of params + a * adapter_size with state + a * state_size, at step
// count step_count[a] (already incremented for this step). module_sq: scratch of num_adapters * num_modules
// floats; grad_norms (device, num_adapters floats) receives each adapter's norm before clipping.
// Deterministic: fixed-order block reductions, no atomics.
void adafactor_step(const AdafactorParams& p, int num_adapters, const int32_t* stepped, const int32_t* step_count,
                    float* params, const float* grads, float* state, float* module_sq, float* grad_norms,
                    cudaStream_t stream);

}  // namespace kernels
}  // namespace tfew
