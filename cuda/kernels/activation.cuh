// The FFN's activation functions, shared by the activation kernels (ffn.cu) and the few-row decoder linears that
// apply them in their epilogue (linear_few_rows.cu): one definition, the same bits in both.
#pragma once
#include <cuda_runtime.h>

#include <cmath>

namespace tfew {
namespace kernels {

// gelu_new, the tanh approximation Hugging Face uses for "gated-gelu": 0.5 x (1 + tanh(u)) with
// u = sqrt(2/pi) (x + 0.044715 x^3), computed as the CPU backend does (cuda/cpu/ffn.cc): x s with s = sigmoid(2u) =
// 1 / (1 + e), e = exp(-2u), the same function. One MUFU exponential and a fast division instead of tanhf's ~20
// instructions, which kept the activation kernel compute-bound (H200, session 19: SMs 77% busy at 60% of DRAM
// bandwidth, RANK-3B-B32). __expf's error (~1e-5 relative at the largest |u| that matters) is far below bf16's, and
// within the fp32 verification mode's 1e-4 against the CPU backend.
struct GeluParts {
  float s, one_minus_s, du;  // sigmoid(2u); 1 - s as e s (no cancellation where s is near 1); du/dx
};
__device__ __forceinline__ GeluParts gelu_parts(float x) {
  const float kSqrt2OverPi = 0.7978845608028654f;
  const float u = kSqrt2OverPi * (x + 0.044715f * x * x * x);
  const float e = __expf(-2.f * u);
  const float s = __fdividef(1.f, 1.f + e);  // 0 where e overflows (x below ~ -10): there 1 - s is 1, not inf * 0
  return {s, s > 0.f ? e * s : 1.f, kSqrt2OverPi * (1.f + 3.f * 0.044715f * x * x)};
}
__device__ __forceinline__ float gelu_new(float x) { return x * gelu_parts(x).s; }
// gelu_new and its derivative d/dx [x s(x)] = s + 2 x s (1 - s) du/dx from one exponential (the backward
// recomputes both from the saved wi outputs).
__device__ __forceinline__ void gelu_new_and_grad(float x, float& value, float& grad) {
  const GeluParts g = gelu_parts(x);
  value = x * g.s;
  grad = g.s + 2.f * x * g.s * g.one_minus_s * g.du;
}

}  // namespace kernels
}  // namespace tfew
