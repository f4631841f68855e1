// Embedding gather: token ids -> rows of the (bf16 or fp32) embedding table, widened to the fp32 residual
// stream. T5 does not scale embeddings.
#include "kernels/device_common.cuh"

namespace tfew {
namespace kernels {

namespace {

template <typename T>
__global__ void embedding_forward_kernel(const T* __restrict__ table, int vocab, int d_model,
                                         const int32_t* __restrict__ ids, float* __restrict__ out) {
  wait_for_previous_kernel();
  const int64_t t = blockIdx.x;
  const int id = ids[t];
  float* dst = out + t * d_model;
  if (id < 0 || id >= vocab) {  // the host validates ids; this only keeps a bad id from reading out of bounds
    for (int c = threadIdx.x; c < d_model; c += blockDim.x) dst[c] = 0.f;
    return;
  }
  const T* src = table + static_cast<int64_t>(id) * d_model;
  for (int c = threadIdx.x; c < d_model; c += blockDim.x) dst[c] = to_f32(src[c]);
}

}  // namespace

template <typename T>
void embedding_forward(const T* table, int vocab, int d_model, const int32_t* ids, int n_tokens, float* out,
                       cudaStream_t stream) {
  if (n_tokens <= 0) return;
  TFEW_LAUNCH(n_tokens, 256, 0, stream, embedding_forward_kernel<T>)(table, vocab, d_model, ids, out);
  TFEW_CUDA_CHECK_LAUNCH("embedding_forward_kernel");
}

template void embedding_forward<float>(const float*, int, int, const int32_t*, int, float*, cudaStream_t);
template void embedding_forward<__nv_bfloat16>(const __nv_bfloat16*, int, int, const int32_t*, int, float*,
                                               cudaStream_t);

}  // namespace kernels
}  // namespace tfew
