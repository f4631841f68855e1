// T5 attention: relative position buckets and bias, scores = q.k (no 1/sqrt(d_kv)) + bias, padding and
// causal masks, softmax, dropout on the probabilities, and the backward pass to q, k and v.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu_ops.h"
#include "model/relative_position.h"

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
  pool.parallel_for(static_cast<int64_t>(s.batch) * s.heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> p_drop(s.k_len);
    for (int64_t job = begin; job < end; ++job) {
      int seq = static_cast<int>(job / s.heads), h = static_cast<int>(job % s.heads);
      int kv = kv_of ? kv_of[seq] : seq;
      const float* kb = k + static_cast<int64_t>(kv) * s.k_len * inner + h * s.d_kv;
      const float* vb = v + static_cast<int64_t>(kv) * s.k_len * inner + h * s.d_kv;
      for (int i = 0; i < s.q_len; ++i) {
        const float* qi = q + (static_cast<int64_t>(seq) * s.q_len + i) * inner + h * s.d_kv;
        float* p = probs + ((static_cast<int64_t>(seq) * s.heads + h) * s.q_len + i) * s.k_len;
        int64_t nk = keys_visible(s, key_len[seq], i);
        float mx = -INFINITY;
        for (int64_t j = 0; j < nk; ++j) {
          float acc = dot(qi, kb + j * inner, s.d_kv);
          if (bias) acc += bias[(static_cast<int64_t>(h) * s.q_len + i) * s.k_len + j];
          p[j] = acc;
          mx = std::max(mx, acc);
        }
        double sum = 0;
        for (int64_t j = 0; j < nk; ++j) {
          p[j] = std::exp(p[j] - mx);
          sum += p[j];
        }
        float inv = static_cast<float>(1.0 / sum);
        for (int64_t j = 0; j < nk; ++j) p[j] *= inv;
        for (int64_t j = nk; j < s.k_len; ++j) p[j] = 0.f;  // masked keys: probability exactly 0
        // dropout on the probabilities (training only)
        uint64_t row_index = ((static_cast<uint64_t>(seq) * s.heads + h) * s.q_len + i) * s.k_len;
        for (int64_t j = 0; j < nk; ++j)
          p_drop[j] = dropout_rate > 0.f ? (dropout_keep(seed, site, row_index + j, dropout_rate) ? p[j] / (1.f - dropout_rate) : 0.f) : p[j];
        float* oi = out + (static_cast<int64_t>(seq) * s.q_len + i) * inner + h * s.d_kv;
        for (int d = 0; d < s.d_kv; ++d) oi[d] = 0.f;
        for (int64_t j = 0; j < nk; ++j) {
          float pj = p_drop[j];
          if (pj == 0.f) continue;
          const float* vj = vb + j * inner;
          for (int d = 0; d < s.d_kv; ++d) oi[d] += pj * vj[d];
        }
      }
    }
  });
}

void attention_backward(ThreadPool& pool, const AttentionShape& s, const float* q, const float* k, const float* v,
                        const int32_t* kv_of, const int32_t* key_len, const float* probs, float dropout_rate,
                        uint64_t seed, uint64_t site, const float* dout, float* dq, float* dk, float* dv) {
  const int inner = s.heads * s.d_kv;
  // One job per head: heads own disjoint columns of dq/dk/dv, so sequences that share a K/V accumulate
  // into it without races and in a fixed order.
  pool.parallel_for(s.heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> dp(s.k_len);
    for (int64_t h = begin; h < end; ++h) {
      for (int seq = 0; seq < s.batch; ++seq) {
        int kv = kv_of ? kv_of[seq] : seq;
        const float* kb = k + static_cast<int64_t>(kv) * s.k_len * inner + h * s.d_kv;
        const float* vb = v + static_cast<int64_t>(kv) * s.k_len * inner + h * s.d_kv;
        float* dkb = dk + static_cast<int64_t>(kv) * s.k_len * inner + h * s.d_kv;
        float* dvb = dv + static_cast<int64_t>(kv) * s.k_len * inner + h * s.d_kv;
        for (int i = 0; i < s.q_len; ++i) {
          const float* qi = q + (static_cast<int64_t>(seq) * s.q_len + i) * inner + h * s.d_kv;
          const float* doi = dout + (static_cast<int64_t>(seq) * s.q_len + i) * inner + h * s.d_kv;
          float* dqi = dq + (static_cast<int64_t>(seq) * s.q_len + i) * inner + h * s.d_kv;
          const float* p = probs + ((static_cast<int64_t>(seq) * s.heads + h) * s.q_len + i) * s.k_len;
          int64_t nk = keys_visible(s, key_len[seq], i);
          uint64_t row_index = ((static_cast<uint64_t>(seq) * s.heads + h) * s.q_len + i) * s.k_len;
          double pdp = 0;
          for (int64_t j = 0; j < nk; ++j) {
            float scale = 1.f;
            if (dropout_rate > 0.f)
              scale = dropout_keep(seed, site, row_index + j, dropout_rate) ? 1.f / (1.f - dropout_rate) : 0.f;
            const float* vj = vb + j * inner;
            float* dvj = dvb + j * inner;
            float pd = p[j] * scale;  // the dropped-out probability used in the forward
            for (int d = 0; d < s.d_kv; ++d) dvj[d] += pd * doi[d];
            dp[j] = dot(doi, vj, s.d_kv) * scale;
            pdp += static_cast<double>(p[j]) * dp[j];
          }
          for (int d = 0; d < s.d_kv; ++d) dqi[d] = 0.f;
          for (int64_t j = 0; j < nk; ++j) {
            float ds = p[j] * (dp[j] - static_cast<float>(pdp));
            if (ds == 0.f) continue;
            const float* kj = kb + j * inner;
            float* dkj = dkb + j * inner;
            for (int d = 0; d < s.d_kv; ++d) {
              dqi[d] += ds * kj[d];
              dkj[d] += ds * qi[d];
            }
          }
        }
      }
    }
  });
}

}  // namespace cpu
}  // namespace tfew
