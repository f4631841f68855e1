// Dropout for training, with the CPU backend's masks (kernels/dropout.cuh). Inverted dropout: kept values are
// scaled by 1/(1 - rate). (The residual add after a dropped sub-layer output: residual_add_norm, rmsnorm.cu.)
#include "kernels/device_common.cuh"
#include "kernels/dropout.cuh"

namespace tfew {
namespace kernels {

namespace {

// Elements per thread (grid_for_per_thread): the site's key is prepared once per thread.
constexpr int kDropoutPerThread = 8;

template <typename T>
__global__ void dropout_inplace_kernel(T* __restrict__ x, int64_t n, DropoutSite site) {
  wait_for_previous_kernel();
  site = with_seed(site);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    x[i] = from_f32<T>(to_f32(x[i]) * dropout_scale(site, static_cast<uint64_t>(i)));
}

template <typename T>
__global__ void dropout_cast_kernel(const float* __restrict__ x, int64_t n, DropoutSite site, T* __restrict__ out) {
  wait_for_previous_kernel();
  site = with_seed(site);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = from_f32<T>(x[i] * dropout_scale(site, static_cast<uint64_t>(i)));
}

}  // namespace

template <typename T>
void dropout_inplace(T* x, int64_t n, const DropoutSite& site, cudaStream_t stream) {
  if (n <= 0 || site.rate <= 0.f) return;
  TFEW_LAUNCH(grid_for_per_thread(n, 256, kDropoutPerThread), 256, 0, stream, dropout_inplace_kernel<T>)(x, n, site);
  TFEW_CUDA_CHECK_LAUNCH("dropout_inplace_kernel");
}

template <typename T>
void dropout_cast(const float* x, int64_t n, const DropoutSite& site, T* out, cudaStream_t stream) {
  if (n <= 0) return;
  TFEW_LAUNCH(grid_for_per_thread(n, 256, kDropoutPerThread), 256, 0, stream, dropout_cast_kernel<T>)(x, n, site, out);
  TFEW_CUDA_CHECK_LAUNCH("dropout_cast_kernel");
}

template void dropout_inplace<float>(float*, int64_t, const DropoutSite&, cudaStream_t);
template void dropout_inplace<__nv_bfloat16>(__nv_bfloat16*, int64_t, const DropoutSite&, cudaStream_t);
template void dropout_cast<float>(const float*, int64_t, const DropoutSite&, float*, cudaStream_t);
template void dropout_cast<__nv_bfloat16>(const float*, int64_t, const DropoutSite&, __nv_bfloat16*, cudaStream_t);

}  // namespace kernels
}  // namespace tfew
