// The T-Few losses on the device (training): LM, UL and LN from the per-token log-probs, and d total / d
// log-prob for the backward, so that a training step needs no host round trip. The same definition as the
// CPU backend's cpu::tfew_losses (cpu/loss.cc), also in double:
//   LM = mean over the gold choices' real tokens of -log p
//   UL = - sum over the wrong choices' real tokens of log(1 - p + 0.01), divided by their count
//   LN = mean over examples of the cross-entropy of softmax(scores of its choices) against the gold choice,
//        score = summed log p / number of real tokens (eos counted)
// A few hundred rows at most: one block. Row sums run in parallel; the totals are summed by one thread in row
// order, so the result does not depend on the launch (bit-reproducible).
#include "kernels/device_common.cuh"
#include "model/losses.h"

namespace tfew {
namespace kernels {

namespace {

// Per-row scratch columns.
enum RowStat { kLength = 0, kSumLogp, kUnlikely, kGold, kDScore, kRowStats };

__global__ void tfew_losses_kernel(const float* __restrict__ logp, const int32_t* __restrict__ targets, int rows,
                                   int len, int pad_id, const int32_t* __restrict__ row_start,
                                   const int32_t* __restrict__ row_example, const int32_t* __restrict__ labels,
                                   int batch, const float* __restrict__ weights, double* __restrict__ scratch,
                                   float* __restrict__ losses, float* __restrict__ dlogp) {
  wait_for_previous_kernel();
  const float lm_weight = weights[0], ul_weight = weights[1], ln_weight = weights[2];
  double* row_stat = scratch;                            // [rows, kRowStats]
  double* example_ln = scratch + static_cast<int64_t>(rows) * kRowStats;  // [batch]
  __shared__ double totals[5];  // gold tokens, wrong tokens, LM, UL, LN (as losses)

  // 1. per choice row: real tokens, summed log-prob, its unlikelihood sum, whether it is the gold choice
  for (int r = threadIdx.x; r < rows; r += blockDim.x) {
    const int b = row_example[r];
    const bool gold = r == row_start[b] + labels[b];
    double length = 0, sum = 0, ul = 0;
    for (int t = 0; t < len; ++t) {
      const int64_t i = static_cast<int64_t>(r) * len + t;
      if (targets[i] == pad_id) continue;
      const double lp = logp[i];
      length += 1;
      sum += lp;
      if (!gold) ul -= log(1.0 - exp(lp) + kUnlikelihoodEps);
    }
    double* st = row_stat + static_cast<int64_t>(r) * kRowStats;
    st[kLength] = length;
    st[kSumLogp] = sum;
    st[kUnlikely] = ul;
    st[kGold] = gold ? 1.0 : 0.0;
  }
  __syncthreads();

  // 2. per example: LN (softmax over its choices' length-normalised scores) and d LN / d score
  for (int b = threadIdx.x; b < batch; b += blockDim.x) {
    const int r0 = row_start[b], r1 = row_start[b + 1];
    auto score = [&](int r) {
      const double* st = row_stat + static_cast<int64_t>(r) * kRowStats;
      return st[kLength] > 0 ? st[kSumLogp] / st[kLength] : 0.0;
    };
    double mx = -INFINITY;
    for (int r = r0; r < r1; ++r) mx = fmax(mx, score(r));
    double z = 0;
    for (int r = r0; r < r1; ++r) z += exp(score(r) - mx);
    const double log_z = mx + log(z);
    example_ln[b] = log_z - score(r0 + labels[b]);
    for (int r = r0; r < r1; ++r)
      row_stat[static_cast<int64_t>(r) * kRowStats + kDScore] =
          (exp(score(r) - log_z) - (r - r0 == labels[b] ? 1.0 : 0.0)) / batch;
  }
  __syncthreads();

  // 3. totals, in row and example order
  if (threadIdx.x == 0) {
    double gold_tokens = 0, wrong_tokens = 0, lm = 0, ul = 0, ln = 0;
    for (int r = 0; r < rows; ++r) {
      const double* st = row_stat + static_cast<int64_t>(r) * kRowStats;
      if (st[kGold] != 0) {
        gold_tokens += st[kLength];
        lm -= st[kSumLogp];
      } else {
        wrong_tokens += st[kLength];
        ul += st[kUnlikely];
      }
    }
    for (int b = 0; b < batch; ++b) ln += example_ln[b];
    totals[0] = gold_tokens;
    totals[1] = wrong_tokens;
    totals[2] = gold_tokens > 0 ? lm / gold_tokens : 0.0;
    totals[3] = wrong_tokens > 0 ? ul / wrong_tokens : 0.0;
    totals[4] = batch > 0 ? ln / batch : 0.0;
    losses[0] = static_cast<float>(totals[2]);
    losses[1] = static_cast<float>(totals[3]);
    losses[2] = static_cast<float>(totals[4]);
    losses[3] = static_cast<float>(lm_weight * totals[2] + ul_weight * totals[3] + ln_weight * totals[4]);
  }
  __syncthreads();

  // 4. d total / d token log-prob
  const double gold_tokens = totals[0], wrong_tokens = totals[1];
  for (int64_t i = threadIdx.x; i < static_cast<int64_t>(rows) * len; i += blockDim.x) {
    if (targets[i] == pad_id) {
      dlogp[i] = 0.f;
      continue;
    }
    const double* st = row_stat + (i / len) * kRowStats;
    double g = 0;
    if (st[kGold] != 0) {
      if (gold_tokens > 0) g -= lm_weight / gold_tokens;
    } else if (wrong_tokens > 0) {
      const double p = exp(static_cast<double>(logp[i]));
      g += ul_weight * (p / (1.0 - p + kUnlikelihoodEps)) / wrong_tokens;
    }
    if (st[kLength] > 0) g += ln_weight * st[kDScore] / st[kLength];
    dlogp[i] = static_cast<float>(g);
  }
}

}  // namespace

size_t tfew_losses_scratch_doubles(int rows, int batch) {
  return static_cast<size_t>(rows) * kRowStats + static_cast<size_t>(batch);
}

void tfew_losses(const float* token_logp, const int32_t* targets, int rows, int len, int pad_id,
                 const int32_t* row_start, const int32_t* row_example, const int32_t* labels, int batch,
                 const float* weights, double* scratch, float* losses, float* dlogp, cudaStream_t stream) {
  if (rows <= 0 || batch <= 0) return;
  TFEW_LAUNCH(1, 256, 0, stream, tfew_losses_kernel)(token_logp, targets, rows, len, pad_id, row_start, row_example,
                                                     labels, batch, weights, scratch, losses, dlogp);
  TFEW_CUDA_CHECK_LAUNCH("tfew_losses_kernel");
}

}  // namespace kernels
}  // namespace tfew
