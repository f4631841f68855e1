// One batch as the engine sees it, built and validated by lib/batch.ts.
//
// Examples b = 0..B-1 have encoder inputs input_ids[b*enc_len .. +enc_len) (right-padded with the pad token,
// eos included by the caller) with enc_lengths[b] real tokens. Every answer choice is one "row"
// r = 0..R-1; rows of example b are row_start[b] .. row_start[b+1]-1 (examples may have different numbers
// of choices). choice_ids[r*dec_len ..) is the choice's target tokens (eos included), right-padded with
// config.pad_token_id (targets equal to it are masked, so every choice needs another token);
// the decoder input is [decoder_start, choice[:-1]]. adapter_of_example[b] picks the (IA)3 adapter of
// example b (-1 = none): mixed-task batches need no extra pass. labels[b] is the gold choice index within
// example b's rows (only read by the losses).
#pragma once
#include <cstdint>
#include <vector>

namespace tfew {

struct Batch {
  int batch_size = 0;  // B
  int enc_len = 0;     // padded encoder length
  std::vector<int32_t> input_ids;    // [B * enc_len]
  std::vector<int32_t> enc_lengths;  // [B]
  int num_rows = 0;    // R
  int dec_len = 0;     // padded choice length
  std::vector<int32_t> choice_ids;   // [R * dec_len]
  std::vector<int32_t> row_start;    // [B + 1]
  std::vector<int32_t> adapter_of_example;  // [B], -1 = no adapter
  std::vector<int32_t> labels;       // [B], may be empty when no loss is asked for

  // The example that row r belongs to (r must be in [0, num_rows); a validated batch is assumed).
  int example_of_row(int r) const {
    int b = 0;
    while (b + 1 < batch_size && row_start[b + 1] <= r) ++b;  // bounded even for an r past the end
    return b;
  }
};

// The adapters a call may use: pointers to flat arrays laid out by IA3Layout, owned by the caller.
struct AdapterSet {
  std::vector<const float*> vectors;
  // Optional, per vector: a nonzero key names one immutable content (equal keys, equal values; the N-API layer
  // gives each adapter snapshot its own), so an engine can tell that a vector it holds is unchanged without
  // reading it. 0 or absent: unknown, compare the values.
  std::vector<uint64_t> content_keys;
};

// CUDA: what the backward recomputes from the saved layer inputs instead of keeping it from the forward.
// None keeps everything (fastest); Attention recomputes the encoder's q|k|v projections (one GEMM more per
// encoder layer; with the fused attention backward also the attention's output, its forward kernel again); All also its feed-forward wi projections (two). Same results at every level. Auto (the
// default): the first of None, Attention, All whose activations fit in the device memory at hand.
enum class Recompute { None, Attention, All, Auto };

struct LossOptions {
  float lm_weight = 1.f, ul_weight = 1.f, ln_weight = 1.f;
  bool dropout = false;    // training-mode dropout at config.dropout_rate
  uint64_t seed = 0;       // dropout masks are a pure function of (seed, site, position)
  Recompute recompute = Recompute::Auto;
};

struct ScoreOutput {
  std::vector<float> token_logp;      // [R * dec_len], 0 at pad positions
  std::vector<float> logits;          // [R * dec_len * vocab] when asked for
  std::vector<float> encoder_hidden;  // [B * enc_len * d_model] when asked for (after the final norm)
};

struct LossOutput {
  double lm_loss = 0, ul_loss = 0, ln_loss = 0, total_loss = 0;
  std::vector<float> token_logp;  // [R * dec_len]
  std::vector<float> gradients;   // [num_adapters * layout.total]: d total / d adapter vectors
};

}  // namespace tfew
