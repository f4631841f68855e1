// The T5 feed-forward activation: gated-gelu  hidden = gelu_new(x W_i0^T) * (x W_i1^T)  (T0, T5 v1.1, flan)
// or relu  hidden = relu(x W_i^T)  (T5 v1.0). The (IA)3 l_ff scale and the wo projection are applied by the
// model around these (ia3_scale_*, linear_*), so l_ff's gradient is sum over tokens of dhidden * hidden.
#include <cmath>

#include "cpu_ops.h"

namespace tfew {
namespace cpu {

static constexpr float kSqrt2OverPi = 0.7978845608028654f;
static constexpr float kGeluCubic = 0.044715f;

// gelu_new = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
float gelu_new(float x) {
  float inner = kSqrt2OverPi * (x + kGeluCubic * x * x * x);
  return 0.5f * x * (1.f + std::tanh(inner));
}

float gelu_new_grad(float x) {
  float inner = kSqrt2OverPi * (x + kGeluCubic * x * x * x);
  float t = std::tanh(inner);
  float dinner = kSqrt2OverPi * (1.f + 3.f * kGeluCubic * x * x);
  return 0.5f * (1.f + t) + 0.5f * x * (1.f - t * t) * dinner;
}

void ffn_activation_forward(const float* h0, const float* h1, bool gated, int64_t n, int d_ff, float* hidden) {
  int64_t total = n * d_ff;
  if (gated) {
    for (int64_t i = 0; i < total; ++i) hidden[i] = gelu_new(h0[i]) * h1[i];
  } else {
    for (int64_t i = 0; i < total; ++i) hidden[i] = h0[i] > 0.f ? h0[i] : 0.f;
  }
}

void ffn_activation_backward(const float* h0, const float* h1, bool gated, const float* dhidden, int64_t n, int d_ff,
                             float* dh0, float* dh1) {
  int64_t total = n * d_ff;
  if (gated) {
    for (int64_t i = 0; i < total; ++i) {
      dh0[i] = dhidden[i] * h1[i] * gelu_new_grad(h0[i]);
      dh1[i] = dhidden[i] * gelu_new(h0[i]);
    }
  } else {
    for (int64_t i = 0; i < total; ++i) dh0[i] = h0[i] > 0.f ? dhidden[i] : 0.f;
  }
}

}  // namespace cpu
}  // namespace tfew
