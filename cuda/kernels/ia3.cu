// (IA)3 gradient reductions for training. Kernels produce per-token contributions (g[t, c] = the gradient of
// the scaled activation times the unscaled one); here they are summed per adapter without atomics, in a
// fixed order, so gradients (and the loss curve) are bit-reproducible: first over the tokens of each example
// (one thread per column and example walks the example's tokens), then over the examples that use each adapter.
#include "kernels/device_common.cuh"

namespace tfew {
namespace kernels {

namespace {

constexpr int kReduceColumns = 32;   // columns per block (one warp wide: coalesced rows)
constexpr int kReduceExamples = 8;   // examples summed side by side in a block

// One launch for one or two vectors (blockIdx.y): per-example sums over tokens (threads y over examples) into
// partial, then (after the barrier) per-adapter sums over examples in example order (threads y over adapters).
// The same additions in the same order as two separate passes, with one launch instead of four for a layer's k
// and v.
__global__ void ia3_grad_reduce_kernel(Ia3GradSource first, Ia3GradSource second, int width, int batch,
                                       int tokens_per_row, const int32_t* __restrict__ row_start,
                                       const int32_t* __restrict__ adapter_of_example, int n_adapters,
                                       float* __restrict__ partial, float* __restrict__ grads, int64_t stride) {
  wait_for_previous_kernel();
  const Ia3GradSource src = blockIdx.y == 0 ? first : second;
  const int c = blockIdx.x * kReduceColumns + threadIdx.x;
  float* part = partial + static_cast<int64_t>(blockIdx.y) * batch * width;
  if (c < width) {
    for (int b = threadIdx.y; b < batch; b += kReduceExamples) {
      const int64_t t0 = static_cast<int64_t>(row_start ? row_start[b] : b) * tokens_per_row;
      const int64_t t1 = static_cast<int64_t>(row_start ? row_start[b + 1] : b + 1) * tokens_per_row;
      float acc = 0.f;
#pragma unroll 4
      for (int64_t t = t0; t < t1; ++t) acc += src.g[t * width + c];  // (unrolled: the loads in flight together)
      part[static_cast<int64_t>(b) * width + c] = acc;
    }
  }
  __syncthreads();  // this block's columns of partial are written (global memory, visible within the block)
  if (c >= width) return;
  for (int a = threadIdx.y; a < n_adapters; a += kReduceExamples) {
    float acc = 0.f;
    bool used = false;
    for (int b = 0; b < batch; ++b) {
      if (adapter_of_example[b] != a) continue;
      acc += part[static_cast<int64_t>(b) * width + c];
      used = true;
    }
    if (used) grads[a * stride + src.offset + c] += acc;
  }
}

}  // namespace

void ia3_grad_reduce(const Ia3GradSource& first, const Ia3GradSource& second, int width, int batch,
                     int tokens_per_row, const int32_t* row_start, const int32_t* adapter_of_example, int n_adapters,
                     float* partial, float* grads, int64_t stride, cudaStream_t stream) {
  if (width <= 0 || batch <= 0 || n_adapters <= 0 || first.g == nullptr) return;
  const dim3 grid((width + kReduceColumns - 1) / kReduceColumns, second.g ? 2 : 1);
  TFEW_LAUNCH(grid, dim3(kReduceColumns, kReduceExamples), 0, stream, ia3_grad_reduce_kernel)(
      first, second, width, batch, tokens_per_row, row_start, adapter_of_example, n_adapters, partial, grads, stride);
  TFEW_CUDA_CHECK_LAUNCH("ia3_grad_reduce_kernel");
}

}  // namespace kernels
}  // namespace tfew
