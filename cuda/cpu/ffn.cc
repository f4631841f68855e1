// The T5 feed-forward activation: gated-gelu  hidden = gelu_new(x W_i0^T) * (x W_i1^T)  (T0, T5 v1.1, flan)
// or relu  hidden = relu(x W_i^T)  (T5 v1.0). The (IA)3 l_ff scale and the wo projection are applied by the
// model around these (ia3_scale_*, linear_*), so l_ff's gradient is sum over tokens of dhidden * hidden.
#include <cmath>

#include "cpu_ops.h"

namespace tfew {
namespace cpu {

static constexpr float kSqrt2OverPi = 0.7978845608028654f;
static constexpr float kGeluCubic = 0.044715f;

// gelu_new = 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3). Computed as x s with s = sigmoid(2u), the same
// function (0.5 (1 + tanh(u)) = 1 / (1 + e), e = exp(-2u)): one exp instead of tanh's expm1 and division.
// The gradient's 1 - s is taken as e s, which does not cancel where s is near 1. Below x ~ -10.05, e overflows to
// infinity and s is 0: there 1 - s is 1 (e s would be inf * 0, a NaN gradient for a very negative pre-activation).
struct GeluParts {
  float s, one_minus_s, du;  // sigmoid(2u), 1 - sigmoid(2u), du/dx
};
static inline GeluParts gelu_parts(float x) {
  const float u = kSqrt2OverPi * (x + kGeluCubic * x * x * x);
  const float e = std::exp(-2.f * u);
  const float s = 1.f / (1.f + e);
  return {s, s > 0.f ? e * s : 1.f, kSqrt2OverPi * (1.f + 3.f * kGeluCubic * x * x)};
}

float gelu_new(float x) { return x * gelu_parts(x).s; }

// d/dx [x s(x)] = s + x 2 s (1 - s) du/dx
float gelu_new_grad(float x) {
  const GeluParts g = gelu_parts(x);
  return g.s + 2.f * x * g.s * g.one_minus_s * g.du;
}

// (elementwise over n x d_ff values: shared out among the threads in blocks of 16K)
void ffn_activation_forward(ThreadPool& pool, const float* h0, const float* h1, bool gated, int64_t n, int d_ff,
                            float* hidden) {
  pool.parallel_for(n * d_ff, 1 << 14, [&](int64_t begin, int64_t end) {
    if (gated) {
      for (int64_t i = begin; i < end; ++i) hidden[i] = gelu_new(h0[i]) * h1[i];
    } else {
      for (int64_t i = begin; i < end; ++i) hidden[i] = h0[i] > 0.f ? h0[i] : 0.f;
    }
  });
}

void ffn_activation_backward(ThreadPool& pool, const float* h0, const float* h1, bool gated, const float* dhidden,
                             int64_t n, int d_ff, float* dh0, float* dh1) {
  pool.parallel_for(n * d_ff, 1 << 14, [&](int64_t begin, int64_t end) {
    if (gated) {
      for (int64_t i = begin; i < end; ++i) {
        const GeluParts g = gelu_parts(h0[i]);
        dh0[i] = dhidden[i] * h1[i] * (g.s + 2.f * h0[i] * g.s * g.one_minus_s * g.du);  // (gelu_new_grad)
        dh1[i] = dhidden[i] * h0[i] * g.s;                                               // (gelu_new)
      }
    } else {
      for (int64_t i = begin; i < end; ++i) dh0[i] = h0[i] > 0.f ? dhidden[i] : 0.f;
    }
  });
}

}  // namespace cpu
}  // namespace tfew
