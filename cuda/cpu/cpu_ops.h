// The CPU reference backend's layer functions, fp32, row-major. One .cc per layer family with its forward
// and backward side by side (llm.c style). Only activation gradients are computed: the frozen T5 weights
// get none; the (IA)3 vectors get theirs through the ia3_* and ffn functions.
//
// Shapes: a "token matrix" is [n, width] with one row per token. Linear weights are HF's [out, in].
#pragma once
#include <cstdint>
#include <vector>

#include "core/thread_pool.h"

namespace tfew {
namespace cpu {

// a . b over n floats, in 8 independent partial sums: the compiler vectorises it, where one running sum (which it
// may not reorder) would wait for each addition in turn.
inline float dot(const float* a, const float* b, int n) {
  float part[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int i = 0;
  for (; i + 8 <= n; i += 8)
    for (int u = 0; u < 8; ++u) part[u] += a[i + u] * b[i + u];
  float s = ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7]));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}


// ---- linear.cc: y = x W^T (no bias anywhere in T5) ----
// The vector kernels linear_forward / linear_backward_input use here: "avx2+fma" or "baseline".
const char* linear_simd();
void linear_forward(ThreadPool& pool, const float* x, const float* w, float* y, int64_t n, int in, int out);
// dx (+)= dy W. accumulate=false overwrites dx.
void linear_backward_input(ThreadPool& pool, const float* dy, const float* w, float* dx, int64_t n, int in, int out,
                           bool accumulate);

// Single-thread products, for callers that share the work out themselves (the attention: a job per sequence and
// head), on row-major matrices with row strides (ld*: one head's columns of a [tokens, heads x d_kv] matrix):
// y[r, o] = sum_k x[r, k] w[o, k]            (x W^T: r < n, o < out, k < in)
void matmul_xwt(const float* x, int64_t ldx, const float* w, int64_t ldw, float* y, int64_t ldy, int64_t n, int in,
                int out);
// y[r, o] (+)= sum_k a[r, k] b[k, o]         (A B: r < n, k < inner, o < out; accumulate=false overwrites y)
void matmul_ab(const float* a, int64_t lda, const float* b, int64_t ldb, float* y, int64_t ldy, int64_t n, int inner,
               int out, bool accumulate);

// ---- rmsnorm.cc: y = w * x / sqrt(mean(x^2) + eps) (T5 LayerNorm: no mean, no bias) ----
void rmsnorm_forward(const float* x, const float* w, float* y, float* inv_rms, int64_t n, int d, float eps);
// dx (+)= d/dx given dy; the weight is frozen.
void rmsnorm_backward(const float* dy, const float* x, const float* w, const float* inv_rms, float* dx, int64_t n,
                      int d, bool accumulate);

// ---- embedding.cc ----
void embedding_forward(const int32_t* ids, const float* table, float* out, int64_t n, int d);

// ---- ia3.cc: per-token-row rescaling by the (IA)3 vector of the row's adapter ----
// scale[row] points at the row's vector (width values) or is null (no adapter: identity).
void ia3_scale_forward(const float* x, const std::vector<const float*>& scale, float* y, int64_t n, int width);
// dx = dy * l (may alias dy); dl[adapter] += sum over rows of dy * x  (x = the unscaled input).
void ia3_scale_backward(const float* dy, const float* x, const std::vector<const float*>& scale,
                        const std::vector<float*>& dscale, float* dx, int64_t n, int width);

// ---- dropout.cc: inverted dropout with masks that are a pure function of (seed, site, index), so the
// backward pass (and any backend) regenerates the same mask without storing it ----
bool dropout_keep(uint64_t seed, uint64_t site, uint64_t index, float rate);
void dropout_forward(ThreadPool& pool, float* x, int64_t n, float rate, uint64_t seed, uint64_t site);  // in place
void dropout_backward(ThreadPool& pool, float* dx, int64_t n, float rate, uint64_t seed, uint64_t site);  // in place (same mask)

// ---- attention.cc ----
// bias[h][i][j] = table[bucket(j - i)][h], table = relative_attention_bias.weight [num_buckets, heads].
void position_bias(const float* table, int heads, int q_len, int k_len, bool bidirectional, int num_buckets,
                   int max_distance, float* bias);

struct AttentionShape {
  int batch;       // number of query sequences
  int heads, d_kv;
  int q_len, k_len;
  bool causal;     // decoder self-attention
};
// q: [batch, q_len, heads*d_kv]; k, v: [kv_batch, k_len, heads*d_kv], query sequence s reads key/value
// sequence kv_of[s] (cross-attention shares one encoder's K/V among all choices of an example).
// key_len[s]: valid keys of sequence s (padding mask); bias: [heads, q_len, k_len] or null.
// probs (saved for backward): [batch, heads, q_len, k_len], after softmax and before dropout.
// Scores are q.k without 1/sqrt(d_kv) (T5 folds it into the initialisation).
void attention_forward(ThreadPool& pool, const AttentionShape& s, const float* q, const float* k, const float* v,
                       const int32_t* kv_of, const int32_t* key_len, const float* bias, float dropout_rate,
                       uint64_t seed, uint64_t site, float* probs, float* out);
// dq overwritten; dk, dv accumulated (several query sequences may share one K/V).
void attention_backward(ThreadPool& pool, const AttentionShape& s, const float* q, const float* k, const float* v,
                        const int32_t* kv_of, const int32_t* key_len, const float* probs, float dropout_rate,
                        uint64_t seed, uint64_t site, const float* dout, float* dq, float* dk, float* dv);

// ---- ffn.cc: hidden = act(x W_i0^T) [* (x W_i1^T)] * l_ff, then wo. ----
// gelu_new (HF's tanh form, computed as x sigmoid(2u)) for gated-gelu, relu otherwise. h0/h1: pre-activation projections saved for backward;
// hidden_unscaled: act(h0)*h1 before the (IA)3 scale (its product with dhidden is l_ff's gradient).
float gelu_new(float x);
float gelu_new_grad(float x);
void ffn_activation_forward(ThreadPool& pool, const float* h0, const float* h1, bool gated, int64_t n, int d_ff,
                            float* hidden_unscaled);
// dh0, dh1 from dhidden_unscaled.
void ffn_activation_backward(ThreadPool& pool, const float* h0, const float* h1, bool gated,
                             const float* dhidden_unscaled, int64_t n, int d_ff, float* dh0, float* dh1);

// ---- loss.cc: per-token log-probs and the T-Few losses ----
// logp of the target token at every position (0 where target == pad); logits [rows*len, vocab].
void log_softmax_gather(ThreadPool& pool, const float* logits, const int32_t* targets, int64_t n, int vocab, int pad_id,
                        float* token_logp);

struct TFewLossInput {
  const float* token_logp;    // [R, len]
  const int32_t* targets;     // [R, len]
  int rows, len, pad_id;
  const int32_t* row_start;   // [B+1]
  const int32_t* labels;      // [B]
  int batch;
  float lm_weight, ul_weight, ln_weight;
};
struct TFewLossOutput {
  double lm = 0, ul = 0, ln = 0, total = 0;
  std::vector<float> dtoken_logp;  // [R, len]: d total / d token_logp
};
TFewLossOutput tfew_losses(const TFewLossInput& in);
// dlogits[i, :] = g_i * (onehot(target_i) - softmax(logits_i)), g_i = dtoken_logp[i].
void log_softmax_gather_backward(ThreadPool& pool, const float* logits, const int32_t* targets,
                                 const float* dtoken_logp, int64_t n, int vocab, int pad_id, float* dlogits);

}  // namespace cpu
}  // namespace tfew
