// CUDA graph shape buckets: the lengths a small rank-classification call is padded to, and which calls are small
// enough. Used by the CUDA engine (gpu/cuda_engine.cc) and, through the addon, by lib/model.ts (warm-up lengths),
// so the rules live here once; nothing here needs CUDA.
#pragma once
#include <cstdint>

#include "t5_config.h"

namespace tfew {

// CUDA graph buckets (CudaEngine::score, cuda.graphBuckets): a graph replays only for the exact shape it was
// captured with, and a service's single-example calls rarely repeat a length. Small rank-classification calls
// therefore run padded up to these lengths (padding is masked: the results equal the exact shape's within
// rounding, cuBLAS being free to pick other kernels for other sizes):
//   encoder lengths: multiples of 8 up to 64, then 8 steps per doubling (72, 80, .., 128, 144, .., 256, 288, ..:
//   at most 12.5% more positions above 64);
//   choice lengths: as they are up to 4 (one-word answers), then multiples of 4;
//   examples and choice rows: see graph_bucket_count (filler examples of one token and one row; rows beyond those
//   go to the last example, whose extra rows are scored and dropped).
// Only calls where launches rather than FLOPs bound the time: at most kGraphBucketMaxTokens padded encoder
// tokens, kGraphBucketMaxChoiceTokens padded decoder tokens, and kGraphBucketMaxFlops of encoder GEMMs (about
// 3 ms of an H100's tensor cores: ~1,000 tokens of T0-3B, a few single examples; a call's ~500 launches take
// the CPU ~2 ms); larger ones run at their exact shape.
constexpr int64_t kGraphBucketMaxTokens = 4096;
// Larger rank-classification calls run at their exact shape but for the encoder length, padded (masked) to a
// multiple of this: the folded cross-attention's strided cuBLAS GEMMs have it as a dimension, and ran ~4.5x slower
// at 249 tokens than at 256 (RANK-3B-B32-LEN249: 49.4 ms against 43.7 at 256, H200, session 19).
constexpr int kEncoderLengthAlignment = 8;
inline int aligned_encoder_length(int len) {
  return (len + kEncoderLengthAlignment - 1) / kEncoderLengthAlignment * kEncoderLengthAlignment;
}
// Input (and choice) positions one engine call may have: GEMM row counts and kernel grids are 32-bit (the engines'
// validate; lib/batch.ts keeps a training batch's exact length where rounding it up would pass this).
constexpr int64_t kMaxCallTokens = int64_t{1} << 24;
constexpr int64_t kGraphBucketMaxChoiceTokens = 512;
constexpr double kGraphBucketMaxFlops = 2.5e12;
// GEMM FLOPs of one encoder token (q, k, v, o and the feed-forward, every layer).
inline double encoder_flops_per_token(const T5Config& c) {
  const double d = c.d_model, inner = c.inner_dim(), ff = c.d_ff;
  return 2.0 * c.num_layers * (4 * d * inner + (c.gated_gelu ? 3 : 2) * d * ff);
}
inline int graph_bucket_length(int len) {
  if (len <= 64) return (len + 7) / 8 * 8;
  int octave = 64;  // octave < len <= 2 octave
  while (octave * 2 < len) octave *= 2;
  const int step = octave / 8;
  return (len + step - 1) / step * step;
}
inline int graph_bucket_choice_length(int len) { return len <= 4 ? len : (len + 3) / 4 * 4; }
// Examples per call and choice rows (a service's batches of concurrent requests vary in both): as they are up to 4,
// then two steps per doubling (6, 8, 12, 16, 24, 32, ..: at most 50% more, in calls whose time launches bound).
inline int graph_bucket_count(int n) {
  if (n <= 4) return n;
  int p = 4;  // p < n <= 2p
  while (p * 2 < n) p *= 2;
  return n <= p + p / 2 ? p + p / 2 : 2 * p;
}
// Whether a call of this shape, its lengths padded to their buckets, is small enough to run padded (see above).
inline bool graph_bucket_launch_bound(const T5Config& c, int64_t batch, int enc_len, int64_t rows, int dec_len) {
  const int64_t enc_tokens = batch * enc_len;
  return enc_tokens <= kGraphBucketMaxTokens && rows * dec_len <= kGraphBucketMaxChoiceTokens &&
         enc_tokens * encoder_flops_per_token(c) <= kGraphBucketMaxFlops;
}

// The shape a rank-classification call of `batch` examples, `rows` choice rows and lengths enc_len, dec_len runs at
// when graph buckets are on (CudaEngine::score_unlocked): a small call padded to its bucket (with filler examples
// and rows, or, where those would take it past the bounds, its lengths alone; padded), a larger one as it is but
// for its encoder length, aligned (aligned_encoder_length; not `padded`: no graph bucket).
struct BucketedCall {
  int batch = 0, enc_len = 0, rows = 0, dec_len = 0;
  bool padded = false;
};
inline BucketedCall graph_bucket_call(const T5Config& c, int batch, int enc_len, int rows, int dec_len) {
  BucketedCall p{graph_bucket_count(batch), graph_bucket_length(enc_len), 0, graph_bucket_choice_length(dec_len), true};
  p.rows = graph_bucket_count(rows + (p.batch - batch));  // (a row per filler example)
  if (!graph_bucket_launch_bound(c, p.batch, p.enc_len, p.rows, p.dec_len)) {
    p.batch = batch;
    p.rows = rows;
    p.padded = graph_bucket_launch_bound(c, p.batch, p.enc_len, p.rows, p.dec_len);
  }
  if (!p.padded) {
    const int aligned = aligned_encoder_length(enc_len);
    p = BucketedCall{batch, static_cast<int64_t>(batch) * aligned <= kMaxCallTokens ? aligned : enc_len, rows, dec_len, false};
  }
  return p;
}

}  // namespace tfew
