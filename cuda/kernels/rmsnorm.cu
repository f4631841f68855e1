// T5's LayerNorm is an RMSNorm: no mean subtraction, no bias, variance = mean(x^2) in fp32 (as Hugging Face
// computes it even for bf16 models). Reads the fp32 residual stream, writes the GEMM input type.
// out_scale folds in the d_model^-0.5 rescale before a tied head, so it costs no extra pass.
// Backward (the weight is frozen): with r = 1/rms and u = w * dy, dx = r u - x r^3 mean(u x); r is
// recomputed from x instead of being stored.
#include "kernels/device_common.cuh"

namespace tfew {
namespace kernels {

namespace {

template <typename TOut>
__global__ void rmsnorm_forward_kernel(const float* __restrict__ x, const float* __restrict__ weight, int d,
                                       float eps, float out_scale, TOut* __restrict__ out) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const float* xr = x + row * d;
  float ss = 0.f;
  for (int c = threadIdx.x; c < d; c += blockDim.x) {
    const float v = xr[c];
    ss += v * v;
  }
  ss = block_sum(ss, scratch);
  const float inv_rms = rsqrtf(ss / static_cast<float>(d) + eps);
  TOut* orow = out + row * d;
  for (int c = threadIdx.x; c < d; c += blockDim.x) {
    orow[c] = from_f32<TOut>(weight[c] * (xr[c] * inv_rms) * out_scale);
  }
}

__global__ void rmsnorm_backward_kernel(const float* __restrict__ dy, const float* __restrict__ x,
                                        const float* __restrict__ weight, int d, float eps, bool accumulate,
                                        float* __restrict__ dx) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const float* xr = x + row * d;
  const float* dyr = dy + row * d;
  float ss = 0.f, ux = 0.f;
  for (int c = threadIdx.x; c < d; c += blockDim.x) {
    const float v = xr[c];
    ss += v * v;
    ux += weight[c] * dyr[c] * v;
  }
  ss = block_sum(ss, scratch);
  ux = block_sum(ux, scratch);
  const float r = rsqrtf(ss / static_cast<float>(d) + eps);
  const float coef = ux / static_cast<float>(d) * r * r * r;
  float* dxr = dx + row * d;
  for (int c = threadIdx.x; c < d; c += blockDim.x) {
    const float g = r * weight[c] * dyr[c] - xr[c] * coef;
    dxr[c] = accumulate ? dxr[c] + g : g;
  }
}

}  // namespace

void rmsnorm_backward(const float* dy, const float* x, const float* weight, int n_rows, int d, float eps,
                      bool accumulate, float* dx, cudaStream_t stream) {
  if (n_rows <= 0) return;
  const int block = d >= 1024 ? 512 : (d >= 256 ? 256 : 128);
  rmsnorm_backward_kernel<<<n_rows, block, 0, stream>>>(dy, x, weight, d, eps, accumulate, dx);
  TFEW_CUDA_CHECK_LAUNCH("rmsnorm_backward_kernel");
}

template <typename TOut>
void rmsnorm_forward(const float* x, const float* weight, int n_rows, int d, float eps, float out_scale,
                     TOut* out, cudaStream_t stream) {
  if (n_rows <= 0) return;
  const int block = d >= 1024 ? 512 : (d >= 256 ? 256 : 128);
  rmsnorm_forward_kernel<TOut><<<n_rows, block, 0, stream>>>(x, weight, d, eps, out_scale, out);
  TFEW_CUDA_CHECK_LAUNCH("rmsnorm_forward_kernel");
}

template void rmsnorm_forward<float>(const float*, const float*, int, int, float, float, float*, cudaStream_t);
template void rmsnorm_forward<__nv_bfloat16>(const float*, const float*, int, int, float, float,
                                             __nv_bfloat16*, cudaStream_t);

}  // namespace kernels
}  // namespace tfew
