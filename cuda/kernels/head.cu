// The end of the rank-classification forward: per-token log-probabilities of the target tokens, read from
// fp32 logits without writing softmax rows (two reductions per row: max, then sum of exponentials).
// Backward: d logits = g (onehot(target) - softmax), written directly in the GEMM input type.
#include "kernels/device_common.cuh"

namespace tfew {
namespace kernels {

namespace {

// The max of a logits row and the sum of exp(x - max) over it, reduced over the block (every thread gets both).
struct RowSoftmax {
  float max, sum;
};
__device__ __forceinline__ RowSoftmax row_softmax(const float* __restrict__ row, int vocab, float* scratch) {
  float m = -INFINITY;
  for (int c = threadIdx.x; c < vocab; c += blockDim.x) m = fmaxf(m, row[c]);
  m = block_max(m, scratch);
  float sum = 0.f;
  for (int c = threadIdx.x; c < vocab; c += blockDim.x) sum += expf(row[c] - m);
  return {m, block_sum(sum, scratch)};
}

__global__ void token_logprobs_kernel(const float* __restrict__ logits, int vocab,
                                      const int32_t* __restrict__ targets, int pad_id, float* __restrict__ out) {
  wait_for_previous_kernel();
  __shared__ float scratch[32];
  const int64_t t = blockIdx.x;
  const int target = targets[t];
  if (target == pad_id || target < 0 || target >= vocab) {  // block-uniform exit
    if (threadIdx.x == 0) out[t] = 0.f;
    return;
  }
  const float* row = logits + t * vocab;
  const RowSoftmax r = row_softmax(row, vocab, scratch);
  if (threadIdx.x == 0) out[t] = row[target] - r.max - logf(r.sum);
}

template <typename T>
__global__ void token_logprobs_backward_kernel(const float* __restrict__ logits, int vocab,
                                               const int32_t* __restrict__ targets, int pad_id,
                                               const float* __restrict__ g, T* __restrict__ dlogits) {
  wait_for_previous_kernel();
  __shared__ float scratch[32];
  const int64_t t = blockIdx.x;
  const int target = targets[t];
  const float gt = g[t];
  T* drow = dlogits + t * vocab;
  if (target == pad_id || target < 0 || target >= vocab || gt == 0.f) {  // block-uniform
    for (int c = threadIdx.x; c < vocab; c += blockDim.x) drow[c] = from_f32<T>(0.f);
    return;
  }
  const float* row = logits + t * vocab;
  const RowSoftmax r = row_softmax(row, vocab, scratch);
  const float inv = 1.f / r.sum;
  for (int c = threadIdx.x; c < vocab; c += blockDim.x) {
    const float p = expf(row[c] - r.max) * inv;
    drow[c] = from_f32<T>(gt * ((c == target ? 1.f : 0.f) - p));
  }
}

}  // namespace

template <typename T>
void token_logprobs_backward(const float* logits, int n_tokens, int vocab, const int32_t* targets, int pad_id,
                             const float* g, T* dlogits, cudaStream_t stream) {
  if (n_tokens <= 0) return;
  TFEW_LAUNCH(n_tokens, 512, 0, stream, token_logprobs_backward_kernel<T>)(logits, vocab, targets, pad_id, g, dlogits);
  TFEW_CUDA_CHECK_LAUNCH("token_logprobs_backward_kernel");
}

template void token_logprobs_backward<float>(const float*, int, int, const int32_t*, int, const float*, float*,
                                             cudaStream_t);
template void token_logprobs_backward<__nv_bfloat16>(const float*, int, int, const int32_t*, int, const float*,
                                                     __nv_bfloat16*, cudaStream_t);

void token_logprobs(const float* logits, int n_tokens, int vocab, const int32_t* targets, int pad_id, float* out,
                    cudaStream_t stream) {
  if (n_tokens <= 0) return;
  TFEW_LAUNCH(n_tokens, 512, 0, stream, token_logprobs_kernel)(logits, vocab, targets, pad_id, out);
  TFEW_CUDA_CHECK_LAUNCH("token_logprobs_kernel");
}

}  // namespace kernels
}  // namespace tfew
