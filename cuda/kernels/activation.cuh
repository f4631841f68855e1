// The FFN's activation functions, shared by the activation kernels (ffn.cu) and the few-row decoder linears that
// apply them in their epilogue (linear_few_rows.cu): one definition, the same bits in both.
#pragma once
#include <cuda_runtime.h>

#include <cmath>

namespace tfew {
namespace kernels {

// gelu_new, the tanh approximation Hugging Face uses for "gated-gelu".
__device__ __forceinline__ float gelu_new(float x) {
  const float kSqrt2OverPi = 0.7978845608028654f;
  return 0.5f * x * (1.f + tanhf(kSqrt2OverPi * (x + 0.044715f * x * x * x)));
}

}  // namespace kernels
}  // namespace tfew
