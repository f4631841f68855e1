// Per-token log-probabilities and the three T-Few losses (tfew-spec.md §1 "Losses"), with their gradient
// with respect to the token log-probs and from there to the logits.
//
//   LM = mean over the gold choices' real tokens of -log p
//   UL = - sum over the wrong choices' real tokens of log(1 - p + 0.01), divided by their count
//   LN = mean over examples of the cross-entropy of softmax(scores of its choices) against the gold choice,
//        score = summed log p / number of real tokens (eos counted)
//   total = w_lm LM + w_ul UL + w_ln LN
#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_ops.h"
#include "model/losses.h"

namespace tfew {
namespace cpu {

void log_softmax_gather(ThreadPool& pool, const float* logits, const int32_t* targets, int64_t n, int vocab, int pad_id,
                        float* token_logp) {
  pool.parallel_for(n, 4, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (targets[i] == pad_id) {
        token_logp[i] = 0.f;
        continue;
      }
      const float* row = logits + i * vocab;
      float mx = row[0];
      for (int v = 1; v < vocab; ++v) mx = std::max(mx, row[v]);
      double sum = 0;
      for (int v = 0; v < vocab; ++v) sum += std::exp(static_cast<double>(row[v] - mx));
      token_logp[i] = static_cast<float>(row[targets[i]] - mx - std::log(sum));
    }
  });
}

void log_softmax_gather_backward(ThreadPool& pool, const float* logits, const int32_t* targets,
                                 const float* dtoken_logp, int64_t n, int vocab, int pad_id, float* dlogits) {
  pool.parallel_for(n, 4, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float* drow = dlogits + i * vocab;
      float g = dtoken_logp[i];
      if (targets[i] == pad_id || g == 0.f) {
        for (int v = 0; v < vocab; ++v) drow[v] = 0.f;
        continue;
      }
      const float* row = logits + i * vocab;
      float mx = row[0];
      for (int v = 1; v < vocab; ++v) mx = std::max(mx, row[v]);
      double sum = 0;
      for (int v = 0; v < vocab; ++v) sum += std::exp(static_cast<double>(row[v] - mx));
      float inv = static_cast<float>(1.0 / sum);
      for (int v = 0; v < vocab; ++v) drow[v] = -g * std::exp(row[v] - mx) * inv;
      drow[targets[i]] += g;
    }
  });
}

TFewLossOutput tfew_losses(const TFewLossInput& in) {
  TFewLossOutput out;
  out.dtoken_logp.assign(static_cast<size_t>(in.rows) * in.len, 0.f);
  auto real = [&](int r, int t) { return in.targets[static_cast<int64_t>(r) * in.len + t] != in.pad_id; };
  auto logp = [&](int r, int t) { return static_cast<double>(in.token_logp[static_cast<int64_t>(r) * in.len + t]); };

  // Which rows are gold, and token counts.
  std::vector<char> gold(in.rows, 0);
  for (int b = 0; b < in.batch; ++b) gold[in.row_start[b] + in.labels[b]] = 1;
  std::vector<int> length(in.rows, 0);
  int64_t gold_tokens = 0, wrong_tokens = 0;
  for (int r = 0; r < in.rows; ++r) {
    for (int t = 0; t < in.len; ++t) length[r] += real(r, t) ? 1 : 0;
    (gold[r] ? gold_tokens : wrong_tokens) += length[r];
  }

  // LM
  double lm = 0;
  for (int r = 0; r < in.rows; ++r)
    if (gold[r])
      for (int t = 0; t < in.len; ++t)
        if (real(r, t)) lm -= logp(r, t);
  out.lm = gold_tokens > 0 ? lm / gold_tokens : 0.0;

  // UL
  double ul = 0;
  for (int r = 0; r < in.rows; ++r)
    if (!gold[r])
      for (int t = 0; t < in.len; ++t)
        if (real(r, t)) ul -= std::log(1.0 - std::exp(logp(r, t)) + kUnlikelihoodEps);
  out.ul = wrong_tokens > 0 ? ul / wrong_tokens : 0.0;

  // LN
  double ln = 0;
  std::vector<double> dscore(in.rows, 0.0);
  for (int b = 0; b < in.batch; ++b) {
    int r0 = in.row_start[b], r1 = in.row_start[b + 1];
    std::vector<double> score(r1 - r0);
    double mx = -INFINITY;
    for (int r = r0; r < r1; ++r) {
      double s = 0;
      for (int t = 0; t < in.len; ++t) s += logp(r, t);
      score[r - r0] = length[r] > 0 ? s / length[r] : 0.0;
      mx = std::max(mx, score[r - r0]);
    }
    double z = 0;
    for (double s : score) z += std::exp(s - mx);
    double log_z = mx + std::log(z);
    ln += log_z - score[in.labels[b]];
    for (int r = r0; r < r1; ++r)
      dscore[r] = (std::exp(score[r - r0] - log_z) - (r - r0 == in.labels[b] ? 1.0 : 0.0)) / in.batch;
  }
  out.ln = in.batch > 0 ? ln / in.batch : 0.0;
  out.total = in.lm_weight * out.lm + in.ul_weight * out.ul + in.ln_weight * out.ln;

  // d total / d token_logp
  for (int r = 0; r < in.rows; ++r)
    for (int t = 0; t < in.len; ++t) {
      if (!real(r, t)) continue;
      double g = 0;
      if (gold[r]) {
        if (gold_tokens > 0) g += -in.lm_weight / static_cast<double>(gold_tokens);
      } else if (wrong_tokens > 0) {
        double p = std::exp(logp(r, t));
        g += in.ul_weight * (p / (1.0 - p + kUnlikelihoodEps)) / static_cast<double>(wrong_tokens);
      }
      if (length[r] > 0) g += in.ln_weight * dscore[r] / length[r];
      out.dtoken_logp[static_cast<int64_t>(r) * in.len + t] = static_cast<float>(g);
    }
  return out;
}

}  // namespace cpu
}  // namespace tfew
