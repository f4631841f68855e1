// (IA)3 gradient reductions for training. Kernels produce per-token contributions (g[t, c] = the gradient of
// the scaled activation times the unscaled one); here they are summed per adapter without atomics, in a
// fixed order, so gradients (and the loss curve) are bit-reproducible: first over the tokens of each example
// (one thread per column walks the example's tokens), then over the examples that use each adapter.
#include "kernels/device_common.cuh"

namespace tfew {
namespace kernels {

namespace {

__global__ void ia3_example_sums_kernel(const float* __restrict__ g, int width, int tokens_per_row,
                                        const int32_t* __restrict__ row_start, float* __restrict__ partial) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  const int b = blockIdx.y;
  if (c >= width) return;
  const int64_t first = static_cast<int64_t>(row_start ? row_start[b] : b) * tokens_per_row;
  const int64_t last = static_cast<int64_t>(row_start ? row_start[b + 1] : b + 1) * tokens_per_row;
  float acc = 0.f;
  for (int64_t t = first; t < last; ++t) acc += g[t * width + c];
  partial[static_cast<int64_t>(b) * width + c] = acc;
}

__global__ void ia3_adapter_sums_kernel(const float* __restrict__ partial, int width, int batch,
                                        const int32_t* __restrict__ adapter_of_example, float* __restrict__ grads,
                                        int64_t stride, int64_t offset) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  const int a = blockIdx.y;
  if (c >= width) return;
  float acc = 0.f;
  bool used = false;
  for (int b = 0; b < batch; ++b) {
    if (adapter_of_example[b] != a) continue;
    acc += partial[static_cast<int64_t>(b) * width + c];
    used = true;
  }
  if (used) grads[a * stride + offset + c] += acc;
}

}  // namespace

void ia3_grad_reduce(const float* g, int width, int batch, int tokens_per_row, const int32_t* row_start,
                     const int32_t* adapter_of_example, int n_adapters, float* partial, float* grads, int64_t stride,
                     int64_t offset, cudaStream_t stream) {
  if (width <= 0 || batch <= 0 || n_adapters <= 0) return;
  const dim3 block(128);
  ia3_example_sums_kernel<<<dim3((width + 127) / 128, batch), block, 0, stream>>>(g, width, tokens_per_row, row_start,
                                                                                  partial);
  TFEW_CUDA_CHECK_LAUNCH("ia3_example_sums_kernel");
  ia3_adapter_sums_kernel<<<dim3((width + 127) / 128, n_adapters), block, 0, stream>>>(
      partial, width, batch, adapter_of_example, grads, stride, offset);
  TFEW_CUDA_CHECK_LAUNCH("ia3_adapter_sums_kernel");
}

}  // namespace kernels
}  // namespace tfew
