// T5 attention: relative position buckets and bias, scores = q.k (no 1/sqrt(d_kv)) + bias, padding and
// causal masks, softmax, dropout on the probabilities, and the backward pass to q, k and v.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "core/dropout_mask.h"
#include "cpu_ops.h"
#include "model/relative_position.h"
#include "scratch.h"

namespace tfew {
namespace cpu {

void position_bias(const float* table, int heads, int q_len, int k_len, bool bidirectional, int num_buckets,
                   int max_distance, float* bias) {
  for (int i = 0; i < q_len; ++i)
    for (int j = 0; j < k_len; ++j) {
      int b = relative_position_bucket(j - i, bidirectional, num_buckets, max_distance);
      for (int h = 0; h < heads; ++h) bias[(static_cast<int64_t>(h) * q_len + i) * k_len + j] = table[b * heads + h];
    }
}

static inline int64_t keys_visible(const AttentionShape& s, int key_len, int i) {
  int64_t n = key_len;
  if (s.causal && i + 1 < n) n = i + 1;
  return n;
}

void attention_forward(ThreadPool& pool, const AttentionShape& s, const float* q, const float* k, const float* v,
                       const int32_t* kv_of, const int32_t* key_len, const float* bias, float dropout_rate,
                       uint64_t seed, uint64_t site, float* probs, float* out) {
  const int inner = s.heads * s.d_kv;
  const int64_t q_len = s.q_len, k_len = s.k_len;
  const DropoutMask mask(dropout_rate, seed, site);
  // One job per (sequence, head); a head's q, k, v and output are its d_kv columns of the [tokens, inner] matrices.
  pool.parallel_for(static_cast<int64_t>(s.batch) * s.heads, 1, [&](int64_t begin, int64_t end) {
    FloatBuffer dropped(dropout_rate > 0.f ? q_len * k_len : 0);
    for (int64_t job = begin; job < end; ++job) {
      int seq = static_cast<int>(job / s.heads), h = static_cast<int>(job % s.heads);
      int kv = kv_of ? kv_of[seq] : seq;
      const float* qh = q + static_cast<int64_t>(seq) * q_len * inner + h * s.d_kv;
      const float* kh = k + static_cast<int64_t>(kv) * k_len * inner + h * s.d_kv;
      const float* vh = v + static_cast<int64_t>(kv) * k_len * inner + h * s.d_kv;
      float* p = probs + (static_cast<int64_t>(seq) * s.heads + h) * q_len * k_len;
      // scores = q k^T over the keys before the padding (the causally masked ones get probability 0 below); padded
      // keys take no part in any product, whatever their rows hold
      const int kmax = static_cast<int>(std::min<int64_t>(k_len, key_len[seq]));
      matmul_xwt(qh, inner, kh, inner, p, k_len, q_len, s.d_kv, kmax);
      for (int i = 0; i < s.q_len; ++i) {
        float* pi = p + i * k_len;
        int64_t nk = keys_visible(s, key_len[seq], i);
        // + bias, softmax over the visible keys
        float mx = -INFINITY;
        for (int64_t j = 0; j < nk; ++j) {
          if (bias) pi[j] += bias[(static_cast<int64_t>(h) * s.q_len + i) * s.k_len + j];
          mx = std::max(mx, pi[j]);
        }
        double sum = 0;
        for (int64_t j = 0; j < nk; ++j) {
          pi[j] = std::exp(pi[j] - mx);
          sum += pi[j];
        }
        float inv = static_cast<float>(1.0 / sum);
        for (int64_t j = 0; j < nk; ++j) pi[j] *= inv;
        for (int64_t j = nk; j < s.k_len; ++j) pi[j] = 0.f;  // masked keys: probability exactly 0
        // dropout on the probabilities (training only); probs keeps them before dropout for the backward
        if (dropout_rate > 0.f) {
          uint64_t row_index = ((static_cast<uint64_t>(seq) * s.heads + h) * s.q_len + i) * s.k_len;
          for (int64_t j = 0; j < k_len; ++j) dropped[i * k_len + j] = j < nk ? pi[j] * mask.scale(row_index + j) : 0.f;
        }
      }
      // out = P' v
      matmul_ab(dropout_rate > 0.f ? dropped.data() : p, k_len, vh, inner, out + static_cast<int64_t>(seq) * q_len * inner + h * s.d_kv,
                inner, q_len, kmax, s.d_kv, /*accumulate=*/false);
    }
  });
}

// m [rows, cols] transposed into t [cols, rows].
static void transpose(const float* m, int64_t rows, int64_t cols, float* t) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) t[c * rows + r] = m[r * cols + c];
}

void attention_backward(ThreadPool& pool, const AttentionShape& s, const float* q, const float* k, const float* v,
                        const int32_t* kv_of, const int32_t* key_len, const float* probs, float dropout_rate,
                        uint64_t seed, uint64_t site, const float* dout, float* dq, float* dk, float* dv) {
  const int inner = s.heads * s.d_kv;
  const int64_t q_len = s.q_len, k_len = s.k_len;
  const DropoutMask mask(dropout_rate, seed, site);
  // One job per head: heads own disjoint columns of dq/dk/dv, so sequences that share a K/V accumulate
  // into it without races and in a fixed order.
  pool.parallel_for(s.heads, 1, [&](int64_t begin, int64_t end) {
    FloatBuffer dropped(q_len * k_len), dp(q_len * k_len), transposed(q_len * k_len);
    for (int64_t h = begin; h < end; ++h) {
      for (int seq = 0; seq < s.batch; ++seq) {
        int kv = kv_of ? kv_of[seq] : seq;
        const int64_t qo = static_cast<int64_t>(seq) * q_len * inner + h * s.d_kv, ko = static_cast<int64_t>(kv) * k_len * inner + h * s.d_kv;
        const float* p = probs + (static_cast<int64_t>(seq) * s.heads + h) * q_len * k_len;
        const int kmax = static_cast<int>(std::min<int64_t>(k_len, key_len[seq]));  // (keys before the padding)
        // P' = dropout(P) as the forward used it, and the keep scale of each element (hidden keys: P is 0 and so is
        // their dS below, so their scale does not matter and is not hashed)
        for (int i = 0; i < s.q_len; ++i) {
          uint64_t row_index = ((static_cast<uint64_t>(seq) * s.heads + h) * s.q_len + i) * s.k_len;
          int64_t nk = keys_visible(s, key_len[seq], i);
          for (int64_t j = 0; j < k_len; ++j) {
            float scale = j < nk ? mask.scale(row_index + j) : 0.f;
            dropped[i * k_len + j] = p[i * k_len + j] * scale;
            transposed[i * k_len + j] = scale;  // (for now: the scales)
          }
        }
        // dP' = dO v^T; dv += P'^T dO
        matmul_xwt(dout + qo, inner, v + ko, inner, dp.data(), k_len, q_len, s.d_kv, kmax);
        for (int64_t e = 0; e < q_len * k_len; ++e) dp[e] *= transposed[e];  // dP = dP' * scale (through dropout)
        transpose(dropped.data(), q_len, k_len, transposed.data());
        matmul_ab(transposed.data(), q_len, dout + qo, inner, dv + ko, inner, kmax, static_cast<int>(q_len), s.d_kv, true);
        // dS = P (dP - sum_j P dP) over the visible keys (dropped: reused for dS)
        float* ds = dropped.data();
        for (int i = 0; i < s.q_len; ++i) {
          const float* pi = p + i * k_len;
          float* dpi = dp.data() + i * k_len;
          int64_t nk = keys_visible(s, key_len[seq], i);
          double pdp = 0;
          for (int64_t j = 0; j < nk; ++j) pdp += static_cast<double>(pi[j]) * dpi[j];
          for (int64_t j = 0; j < k_len; ++j) ds[i * k_len + j] = j < nk ? pi[j] * (dpi[j] - static_cast<float>(pdp)) : 0.f;
        }
        // dq = dS k; dk += dS^T q
        matmul_ab(ds, k_len, k + ko, inner, dq + qo, inner, q_len, kmax, s.d_kv, false);
        transpose(ds, q_len, k_len, transposed.data());
        matmul_ab(transposed.data(), q_len, q + qo, inner, dk + ko, inner, kmax, static_cast<int>(q_len), s.d_kv, true);
      }
    }
  });
}

}  // namespace cpu
}  // namespace tfew
