// The T-Few optimizer on the device: per-adapter global-norm clipping (torch clip_grad_norm_) and HF
// Adafactor (relative_step = warmup_init = false, no first moment, factored second moment for the 2-D PEFT
// shapes) per (IA)3 module. One block per (module, adapter); all reductions are fixed-order block sums.
// Mirrors cuda/model/host_training.cc adafactor_step line by line (state in fp32 here, fp64 there).
#include "kernels/adafactor.cuh"
#include "kernels/device_common.cuh"

namespace tfew {
namespace kernels {

namespace {

constexpr int kThreads = 256;

// module_sq[a * num_modules + m] = sum of the squared gradient of module m of adapter a.
__global__ void module_sq_kernel(AdafactorParams p, const float* grads, float* module_sq) {
  wait_for_previous_kernel();
  __shared__ float scratch[32];
  const int m = blockIdx.x, a = blockIdx.y;
  const AdafactorModuleDesc d = p.modules[m];
  const float* g = grads + a * p.adapter_size + d.offset;
  const int64_t n = static_cast<int64_t>(d.rows) * d.cols;
  float s = 0.f;
  for (int64_t e = threadIdx.x; e < n; e += blockDim.x) s += g[e] * g[e];
  s = block_sum(s, scratch);
  if (threadIdx.x == 0) module_sq[a * p.num_modules + m] = s;
}

__global__ void adafactor_kernel(AdafactorParams p, const int32_t* stepped, const int32_t* step_count, float* params,
                                 const float* grads, float* state, const float* module_sq, float* grad_norms) {
  wait_for_previous_kernel();
  __shared__ float scratch[32];
  const int m = blockIdx.x, a = blockIdx.y;
  if (!stepped[a]) return;  // no gradient for this adapter in the batch: no step
  // global norm of the adapter's gradient, summed in module order by every block alike
  float sq = 0.f;
  for (int k = threadIdx.x; k < p.num_modules; k += blockDim.x) sq += module_sq[a * p.num_modules + k];
  const float norm = sqrtf(block_sum(sq, scratch));
  if (m == 0 && threadIdx.x == 0) grad_norms[a] = norm;
  const float coef = p.clip_norm > 0.f ? fminf(1.f, p.clip_norm / (norm + 1e-6f)) : 1.f;

  const AdafactorModuleDesc d = p.modules[m];
  const int64_t n = static_cast<int64_t>(d.rows) * d.cols;
  float* w = params + a * p.adapter_size + d.offset;
  const float* g = grads + a * p.adapter_size + d.offset;
  float* row_sq = state + a * p.state_size + d.row_offset;
  float* col_sq = state + a * p.state_size + d.col_offset;
  const float step = static_cast<float>(step_count[a]);

  // _get_lr: lr * max(eps2, RMS(p)); beta2 = 1 - step^decay_rate
  float psq = 0.f;
  for (int64_t e = threadIdx.x; e < n; e += blockDim.x) psq += w[e] * w[e];
  const float rms_p = sqrtf(block_sum(psq, scratch) / n);
  const float lr_t = p.lr * (p.scale_parameter ? fmaxf(p.eps2, rms_p) : 1.f);
  const float beta2 = 1.f - powf(step, p.decay_rate);

  // running means of g^2 + eps1 along rows and columns (g already clipped). The (IA)3 shapes are [n,1] and
  // [1,n]: one side is elementwise, the other one full-module reduction.
  auto gsq = [&](int64_t e) { const float x = g[e] * coef; return x * x + p.eps1; };
  if (d.cols == 1) {
    for (int i = threadIdx.x; i < d.rows; i += blockDim.x) row_sq[i] = beta2 * row_sq[i] + (1.f - beta2) * gsq(i);
  } else if (d.rows == 1) {
    float s = 0.f;
    for (int64_t e = threadIdx.x; e < n; e += blockDim.x) s += gsq(e);
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) row_sq[0] = beta2 * row_sq[0] + (1.f - beta2) * (s / d.cols);
  } else {  // general 2-D (not an (IA)3 shape): one thread per row
    for (int i = threadIdx.x; i < d.rows; i += blockDim.x) {
      float s = 0.f;
      for (int j = 0; j < d.cols; ++j) s += gsq(static_cast<int64_t>(i) * d.cols + j);
      row_sq[i] = beta2 * row_sq[i] + (1.f - beta2) * (s / d.cols);
    }
  }
  if (d.rows == 1) {
    for (int j = threadIdx.x; j < d.cols; j += blockDim.x) col_sq[j] = beta2 * col_sq[j] + (1.f - beta2) * gsq(j);
  } else if (d.cols == 1) {
    float s = 0.f;
    for (int64_t e = threadIdx.x; e < n; e += blockDim.x) s += gsq(e);
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) col_sq[0] = beta2 * col_sq[0] + (1.f - beta2) * (s / d.rows);
  } else {
    for (int j = threadIdx.x; j < d.cols; j += blockDim.x) {
      float s = 0.f;
      for (int i = 0; i < d.rows; ++i) s += gsq(static_cast<int64_t>(i) * d.cols + j);
      col_sq[j] = beta2 * col_sq[j] + (1.f - beta2) * (s / d.rows);
    }
  }
  __syncthreads();

  // _approx_sq_grad: update = g / sqrt(row_sq[i] / mean(row_sq) * col_sq[j]); its RMS is clipped to
  // clip_threshold, then it is scaled by lr_t (weight decay first).
  float rs = 0.f;
  for (int i = threadIdx.x; i < d.rows; i += blockDim.x) rs += row_sq[i];
  const float row_mean = block_sum(rs, scratch) / d.rows;
  auto update = [&](int64_t e) {
    const int64_t i = e / d.cols, j = e % d.cols;
    return g[e] * coef * rsqrtf(row_sq[i] / row_mean) * rsqrtf(col_sq[j]);
  };
  float usq = 0.f;
  for (int64_t e = threadIdx.x; e < n; e += blockDim.x) {
    const float u = update(e);
    usq += u * u;
  }
  const float scale = lr_t / fmaxf(1.f, sqrtf(block_sum(usq, scratch) / n) / p.clip_threshold);
  const float keep = p.weight_decay != 0.f ? 1.f - p.weight_decay * lr_t : 1.f;
  for (int64_t e = threadIdx.x; e < n; e += blockDim.x) w[e] = w[e] * keep - update(e) * scale;
}

}  // namespace

void adafactor_step(const AdafactorParams& p, int num_adapters, const int32_t* stepped, const int32_t* step_count,
                    float* params, const float* grads, float* state, float* module_sq, float* grad_norms,
                    cudaStream_t stream) {
  if (num_adapters <= 0 || p.num_modules <= 0) return;
  const dim3 grid(p.num_modules, num_adapters);
  TFEW_LAUNCH(grid, kThreads, 0, stream, module_sq_kernel)(p, grads, module_sq);
  TFEW_CUDA_CHECK_LAUNCH("module_sq_kernel");
  TFEW_LAUNCH(grid, kThreads, 0, stream, adafactor_kernel)(p, stepped, step_count, params, grads, state, module_sq,
                                                           grad_norms);
  TFEW_CUDA_CHECK_LAUNCH("adafactor_kernel");
}

}  // namespace kernels
}  // namespace tfew
