// The FFN activation between the wi and wo GEMMs, with the (IA)3 feed-forward scale fused in.
// Gated (T5 v1.1 / T0): wi_0 and wi_1 run as one GEMM into [wi_0 x | wi_1 x]; here
// h = gelu_new(wi_0 x) * (wi_1 x) * l_ff. PEFT scales the input of wo by l_ff; T-Few scales the output of
// wi_1; the product is the same. relu (T5 v1.0): h = relu(wi x) * l_ff. Math in fp32, one rounding.
#include "kernels/device_common.cuh"

namespace tfew {
namespace kernels {

namespace {

// gelu_new, the tanh approximation Hugging Face uses for "gated-gelu".
__device__ __forceinline__ float gelu_new(float x) {
  const float kSqrt2OverPi = 0.7978845608028654f;
  return 0.5f * x * (1.f + tanhf(kSqrt2OverPi * (x + 0.044715f * x * x * x)));
}

template <typename T, bool kGated>
__global__ void ffn_activation_kernel(const T* __restrict__ in, int64_t n, int d_ff, AdapterIndex index,
                                      bool scaled, int64_t ff_offset, T* __restrict__ out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = i / d_ff;
    const int c = static_cast<int>(i % d_ff);
    float h;
    if (kGated) {
      const T* row = in + t * (2 * static_cast<int64_t>(d_ff));
      h = gelu_new(to_f32(row[c])) * to_f32(row[d_ff + c]);
    } else {
      h = fmaxf(to_f32(in[i]), 0.f);
    }
    if (scaled) {
      const int a = adapter_of_token(index, t);
      if (a >= 0) h *= index.adapters[a * index.adapter_stride + ff_offset + c];
    }
    out[i] = from_f32<T>(h);
  }
}

}  // namespace

template <typename T>
void ffn_activation(const T* in, int n_tokens, int d_ff, bool gated, const AdapterIndex& index, int64_t ff_offset,
                    T* out, cudaStream_t stream) {
  const int64_t n = static_cast<int64_t>(n_tokens) * d_ff;
  if (n <= 0) return;
  const bool scaled = index.active();
  if (gated)
    ffn_activation_kernel<T, true><<<grid_for(n, 256), 256, 0, stream>>>(in, n, d_ff, index, scaled, ff_offset, out);
  else
    ffn_activation_kernel<T, false><<<grid_for(n, 256), 256, 0, stream>>>(in, n, d_ff, index, scaled, ff_offset, out);
  TFEW_CUDA_CHECK_LAUNCH("ffn_activation_kernel");
}

template void ffn_activation<float>(const float*, int, int, bool, const AdapterIndex&, int64_t, float*,
                                    cudaStream_t);
template void ffn_activation<__nv_bfloat16>(const __nv_bfloat16*, int, int, bool, const AdapterIndex&, int64_t,
                                            __nv_bfloat16*, cudaStream_t);

}  // namespace kernels
}  // namespace tfew
