// Where every buffer of one call lives in the engine's activation arena (gpu/cuda_engine.h).
//
// Plan: the inference forward (score). Inputs that change per call come first, in one block, so one
// cudaMemcpyAsync uploads them; then the tensors that live across the encoder -> decoder boundary; then the
// encoder's temporaries and, on the same bytes, the decoder's (the decoder starts when the encoder is done).
// TrainPlan: loss_and_gradients on top of an inference plan: the activations the backward pass reads and
// its own buffers. Both are built twice: from base 0 to size the arena, then from the arena's base.
#pragma once
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <tuple>
#include <vector>

#include "gpu/device_memory.h"
#include "kernels/kernels.cuh"
#include "model/batch.h"
#include "model/graph_buckets.h"
#include "model/t5_config.h"

namespace tfew {
namespace gpu {

// Shape of one call; everything the launch sequence depends on besides device-resident data.
struct Shape {
  int batch = 0, enc_len = 0, rows = 0, dec_len = 0;
  bool want_hidden = false, adapters = false;
  bool training = false;  // a training plan (its inputs include the backward's pointer arrays)
  // The decoder's cross-attention folded into model space (CudaEngine::folded_cross_products): no
  // per-layer encoder keys/values. Only for the same number of choice rows in every example.
  bool folded_cross = false;
  bool dropout = false;  // training with dropout (config.dropout_rate > 0): the fused backward's mask bits
  bool operator<(const Shape& o) const {
    return std::tie(batch, enc_len, rows, dec_len, want_hidden, adapters, training, folded_cross, dropout) <
           std::tie(o.batch, o.enc_len, o.rows, o.dec_len, o.want_hidden, o.adapters, o.training, o.folded_cross,
                    o.dropout);
  }
};

// The shape the arena is sized for: lengths rounded up (encoder to 16, decoder to 8 positions, choice rows to
// 8), so that batches of similar lengths reuse it instead of growing it a little at a time. Every plan grows
// with each of these, so the rounded shape's plan covers the call's. Shapes already on the grid (the
// benchmarks') get exactly what they need; when the rounded arena does not fit, the exact one is tried.
inline Shape arena_shape(Shape s) {
  auto round_up = [](int x, int m) { return (x + m - 1) / m * m; };
  s.enc_len = round_up(s.enc_len, 16);
  s.dec_len = round_up(s.dec_len, 8);
  s.rows = round_up(s.rows, 8);
  return s;
}

// The row stride of the folded cross-attention's [rows, enc_len] buffers (scores, probabilities and their
// gradients): enc_len rounded up to a multiple of 8. They are leading dimensions of strided cuBLAS products, whose
// tensor-core kernels want 16-byte aligned rows (8 bf16): with an encoder length that is not a multiple of 8 (a
// batch padded to its longest input, a training step's) they fall back to slower ones. The probabilities' columns beyond enc_len hold 0
// (the scores' are never written or read).
inline int folded_cross_ld(int enc_len) { return (enc_len + 7) / 8 * 8; }

// Where every buffer of one call lives in the arena. Built twice: once from base 0 to size the arena, once
// from the arena's base.
template <typename T>
struct Plan {
  Shape shape;
  size_t bytes = 0;
  // per-call inputs, one contiguous block [inputs_begin, inputs_end) filled by a single copy
  size_t inputs_begin = 0, inputs_end = 0;
  const void** qk_k = nullptr;
  const void** qk_q = nullptr;
  void** qk_s = nullptr;
  const void** pv_v = nullptr;
  const void** pv_p = nullptr;
  void** pv_c = nullptr;
  // the encoder attention backward's operands (training): dC, P', dQ, dK~, dV~ of (example, head) bh
  const void** bw_dc = nullptr;
  const void** bw_pd = nullptr;
  void** bw_dq = nullptr;
  void** bw_gk = nullptr;
  void** bw_gv = nullptr;
  int32_t* enc_ids = nullptr;
  int32_t* enc_lengths = nullptr;
  int32_t* dec_ids = nullptr;
  int32_t* targets = nullptr;
  int32_t* row_example = nullptr;
  int32_t* row_start = nullptr;  // [B + 1]
  int32_t* adapter_of_example = nullptr;
  int32_t* labels = nullptr;  // [B] the gold choice of each example (training)
  uint64_t* dropout_seed = nullptr;  // [1] the training step's dropout seed
  float* loss_weights = nullptr;     // [3] the training step's LM, UL, LN weights
  int32_t* enc_buckets = nullptr;
  int32_t* dec_buckets = nullptr;
  // results and tensors that live across the encoder -> decoder boundary
  float* enc_bias = nullptr;  // [H, 2 Le - 1]
  float* dec_bias = nullptr;  // [H, 2 Ld - 1]
  T* enc_out = nullptr;       // [Ne, d]
  float* enc_hidden = nullptr;  // [Ne, d] fp32 copy of the encoder output, when asked for
  float* token_logp = nullptr;  // [Nd]
  // encoder temporaries
  float* x_enc = nullptr;
  T* h_enc = nullptr;
  T* qkv_enc = nullptr;
  float* scores = nullptr;  // [B, H, Le, Le]
  T* probs = nullptr;
  T* ctx_enc = nullptr;
  T* ff_enc = nullptr;
  T* act_enc = nullptr;
  // decoder temporaries (same bytes as the encoder's)
  float* x_dec = nullptr;
  T* h_dec = nullptr;
  T* qkv_dec = nullptr;
  T* ctx_dec = nullptr;
  T* q_cross = nullptr;
  T* kv_cross = nullptr;  // [Ne, layers * 2 inner] (not with folded_cross)
  // folded cross-attention: per (decoder token, head) a vector in model space, first the query folded
  // through W_k, then the probability-weighted sum of encoder outputs [Nd, H, d]; scores and probabilities
  // per (token, head) over the example's encoder positions [Nd, H, Le], rows folded_cross_ld(Le) apart
  T* cross_model = nullptr;
  float* cross_scores = nullptr;  // (training backward: the gradient of the dropped probabilities)
  T* cross_probs = nullptr;       // (training: the dropped probabilities P', forward and backward)
  T* cross_dmodel = nullptr;      // training backward: gradients in model space [Nd, H, d]
  T* ff_dec = nullptr;
  T* act_dec = nullptr;
  float* logits = nullptr;  // [Nd, vocab]
};

// fused_attention: the encoder attention runs as one kernel, without score/probability buffers or the
// pointer arrays of the batched GEMMs.
template <typename T>
Plan<T> make_plan(const T5Config& c, const Shape& s, bool fused_attention, uintptr_t base) {
  Plan<T> p;
  p.shape = s;
  const size_t d = c.d_model, inner = c.inner_dim(), ff = c.d_ff, H = c.num_heads, V = c.vocab_size;
  const size_t wi_cols = c.gated_gelu ? 2 * ff : ff;
  const size_t B = s.batch, Le = s.enc_len, R = s.rows, Ld = s.dec_len;
  const size_t Ne = B * Le, Nd = R * Ld, BH = fused_attention ? 0 : B * H;

  Placer pl(base);
  p.inputs_begin = 0;
  p.qk_k = pl.place<const void*>(BH);
  p.qk_q = pl.place<const void*>(BH);
  p.qk_s = pl.place<void*>(BH);
  p.pv_v = pl.place<const void*>(BH);
  p.pv_p = pl.place<const void*>(BH);
  p.pv_c = pl.place<void*>(BH);
  const size_t BHt = s.training ? BH : 0;
  p.bw_dc = pl.place<const void*>(BHt);
  p.bw_pd = pl.place<const void*>(BHt);
  p.bw_dq = pl.place<void*>(BHt);
  p.bw_gk = pl.place<void*>(BHt);
  p.bw_gv = pl.place<void*>(BHt);
  p.enc_ids = pl.place<int32_t>(Ne);
  p.enc_lengths = pl.place<int32_t>(B);
  p.dec_ids = pl.place<int32_t>(Nd);
  p.targets = pl.place<int32_t>(Nd);
  p.row_example = pl.place<int32_t>(R);
  p.row_start = pl.place<int32_t>(B + 1);
  p.adapter_of_example = pl.place<int32_t>(B);
  p.labels = pl.place<int32_t>(B);
  p.dropout_seed = pl.place<uint64_t>(1);
  p.loss_weights = pl.place<float>(s.training ? 3 : 0);
  p.enc_buckets = pl.place<int32_t>(2 * Le - 1);
  p.dec_buckets = pl.place<int32_t>(Ld > 0 ? 2 * Ld - 1 : 0);
  p.inputs_end = pl.cursor();

  p.enc_bias = pl.place<float>(H * (2 * Le - 1));
  p.dec_bias = pl.place<float>(Ld > 0 ? H * (2 * Ld - 1) : 0);
  p.enc_out = pl.place<T>(Ne * d);
  p.enc_hidden = s.want_hidden ? pl.place<float>(Ne * d) : nullptr;
  p.token_logp = pl.place<float>(Nd);

  const size_t phase_start = pl.cursor();
  p.x_enc = pl.place<float>(Ne * d);
  p.h_enc = pl.place<T>(Ne * d);
  // (a training plan keeps each layer's q|k|v itself; with the fused attention it needs no scaled copy either)
  p.qkv_enc = s.training && fused_attention ? nullptr : pl.place<T>(Ne * 3 * inner);
  p.scores = pl.place<float>(BH * Le * Le);  // BH = 0 with fused attention
  p.probs = pl.place<T>(BH * Le * Le);
  p.ctx_enc = pl.place<T>(Ne * inner);
  p.ff_enc = s.training ? nullptr : pl.place<T>(Ne * wi_cols);  // training keeps the wi outputs per layer
  p.act_enc = pl.place<T>(Ne * ff);
  const size_t encoder_end = pl.cursor();

  pl.set_cursor(phase_start);
  p.x_dec = pl.place<float>(Nd * d);
  p.h_dec = pl.place<T>(Nd * d);
  p.qkv_dec = pl.place<T>(Nd * 3 * inner);
  p.ctx_dec = pl.place<T>(Nd * inner);
  p.q_cross = pl.place<T>(Nd * inner);
  if (s.folded_cross) {
    p.cross_model = pl.place<T>(Nd * H * d);
    const size_t ld = static_cast<size_t>(folded_cross_ld(static_cast<int>(Le)));
    p.cross_scores = pl.place<float>(Nd * H * ld);
    p.cross_probs = pl.place<T>(Nd * H * ld);
    p.cross_dmodel = s.training ? pl.place<T>(Nd * H * d) : nullptr;
  } else {
    p.kv_cross = pl.place<T>(Ne * 2 * inner * c.num_decoder_layers);  // every decoder layer's cross k|v
  }
  p.ff_dec = s.training ? nullptr : pl.place<T>(Nd * wi_cols);
  p.act_dec = pl.place<T>(Nd * ff);
  p.logits = pl.place<float>(Nd * V);
  p.bytes = align_up(std::max(encoder_end, pl.cursor()), 256);
  return p;
}

// Training (loss_and_gradients) on top of an inference plan: what the backward pass needs from the forward (the
// inputs of every sub-layer and the pre-activations, nothing recomputable by a cheap kernel) and the backward's
// own buffers. `fused`: the encoder attention runs fused forward and backward (bf16: no scores, probabilities
// or pointer arrays); else the cuBLAS path's buffers.
template <typename T>
struct TrainPlan {
  Plan<T> fwd;  // inputs, the forward's temporaries (h, the scaled q|k|v copy, scores, ctx, ...), logits
  size_t bytes = 0;
  // saved forward state, per layer. The residual stream itself runs in fp32 (fwd.x_enc, fwd.x_dec); what is
  // kept of it is a copy in T, which the forward's norms read as well (so a recomputed projection is
  // bit-identical): in bf16 half the bytes of an fp32 copy, 384 MiB less at TRAIN-3B.
  std::vector<T*> enc_x_attn, enc_x_ff;  // residual stream entering each sub-layer [Ne, d]
  std::vector<T*> enc_qkv, enc_ff_pre;   // unscaled q|k|v [Ne, 3 inner], wi outputs [Ne, wi_cols]
  // fused backward with dropout: each layer's keep mask of the attention probabilities as bits
  // (kernels::KeepBits, 2 MiB per layer at TRAIN-3B), written by the forward, read by the backward. When q|k|v
  // is recomputed, one buffer that the backward's rerun of the forward fills (keep_bits_saved false).
  std::vector<uint32_t*> enc_keep_bits;
  bool keep_bits_saved = false;
  // fused backward, nothing recomputed: each layer's attention output C [Ne, inner] and softmax statistics
  // [B, H, Le, 3] as the forward wrote them, so the backward does not run the forward's attention again
  // (flash-attention's way; 8.75 MiB per layer at TRAIN-3B). Else the backward's rerun makes them in
  // fwd.ctx_enc and stats.
  std::vector<T*> enc_attn_out;
  std::vector<float*> enc_attn_stats;
  bool attention_saved = false;
  // Recomputed by the backward (Recompute::Attention / All): one buffer for all layers
  bool recompute_qkv = false, recompute_ff_pre = false;
  T* enc_pre_final = nullptr;
  std::vector<T*> dec_x_self, dec_x_cross, dec_x_ff;
  std::vector<T*> dec_qkv, dec_q_cross, dec_ff_pre;
  // folded cross-attention (Shape::folded_cross): per layer its probabilities P [Nd, H, Le] (rows folded_cross_ld(Le)
  // apart) before dropout and
  // the unscaled context W_v,h (P' E) [Nd, inner] (l_v's gradient); no keys or values
  std::vector<T*> dec_cross_probs, dec_cross_ctx;
  T* dec_pre_final = nullptr;
  float* sublayer_out = nullptr;  // a sub-layer's output before its (dropped-out) residual add [maxN, d]
  // backward
  float* dlogp = nullptr;      // [Nd] d loss / d token log-prob
  double* loss_scratch = nullptr;  // kernels::tfew_losses' per-row and per-example sums
  float* losses = nullptr;     // [4] LM, UL, LN, total
  T* dlogits = nullptr;        // [Nd, V]
  float* dnormed = nullptr;    // gradient of a norm's output [maxN, d]
  float* dy_dec = nullptr;     // gradient of the decoder residual stream [Nd, d]
  float* dx_enc = nullptr;     // ... of the encoder's [Ne, d]; during the decoder's backward it sums the
                               // gradient of the encoder output over the layers' cross k|v
  T* dout = nullptr;           // a sub-layer output's gradient as GEMM input [maxN, d]
  // The FFN sub-layer's backward buffers and the attention sub-layer's share bytes (one sub-layer at a time).
  float* dscaled = nullptr;    // FFN: [maxN, d_ff]; the kernel turns it into the per-token l_ff contributions
  float* g_ff = nullptr;       //   in place: g_ff == dscaled
  T* d_pre = nullptr;          //   [maxN, wi_cols]
  float* dctx = nullptr;       // attention (decoder): [Nd, inner]
  T* dqkv = nullptr;           //   [maxN, 3 inner]
  float* g_k = nullptr;        //   per-token l_k / l_v contributions [maxN, inner]
  float* g_v = nullptr;
  float* stats = nullptr;      //   softmax statistics per (query, head) [maxN, H, 3] (decoder and fused encoder)
  T* probs_dropped = nullptr;  //   encoder attention backward: the dropped probabilities P' [B, H, Le, Le] (cuBLAS)
  T* dctx_t = nullptr;         //   ... and the context gradient as a GEMM operand [Ne, inner]
  T* dkv_cross = nullptr;      //   gradient of one decoder layer's cross k|v [Ne, 2 inner] (not when folded)
  float* grads = nullptr;      // [num_adapters, layout.total]
  float* partial = nullptr;    // per-example sums [2, B, max(inner, d_ff)] (kernels::ia3_grad_reduce)
  // The encoder's (IA)3 contributions, summed by their producing kernels over chunks of kIa3Chunk tokens
  // (kernels::Ia3Sums): [B * enc_chunks, d_ff] for l_ff, [B * enc_chunks, inner] each for l_k, l_v
  kernels::Ia3Sums enc_sums;
  float* enc_sums_ff = nullptr;
  float* enc_sums_k = nullptr;
  float* enc_sums_v = nullptr;
};

// Encoder tokens per (IA)3 partial sum: 16 keeps TRAIN-3B's kernels at >= 1,024 blocks (8 x 256 tokens).
constexpr int kIa3Chunk = 16;

template <typename T>
TrainPlan<T> make_train_plan(const T5Config& c, const Shape& s, int n_adapters, Recompute recompute, bool fused,
                             uintptr_t base) {
  TrainPlan<T> t;
  t.recompute_qkv = recompute != Recompute::None;
  t.recompute_ff_pre = recompute == Recompute::All;
  t.fwd = make_plan<T>(c, s, fused, base);
  const size_t d = c.d_model, inner = c.inner_dim(), ff = c.d_ff, H = c.num_heads, V = c.vocab_size;
  const size_t wi_cols = c.gated_gelu ? 2 * ff : ff;
  const size_t Ne = static_cast<size_t>(s.batch) * s.enc_len, Nd = static_cast<size_t>(s.rows) * s.dec_len;
  const size_t N = std::max(Ne, Nd);
  Placer pl(base, t.fwd.bytes);
  T* shared_qkv = t.recompute_qkv ? pl.place<T>(Ne * 3 * inner) : nullptr;
  T* shared_ff_pre = t.recompute_ff_pre ? pl.place<T>(Ne * wi_cols) : nullptr;
  const bool keep_bits = fused && s.dropout && c.dropout_rate > 0.f;
  const size_t keep_words = static_cast<size_t>(s.batch) * H * s.enc_len * kernels::keep_bits_words(s.enc_len);
  t.keep_bits_saved = keep_bits && !t.recompute_qkv;
  t.attention_saved = fused && !t.recompute_qkv;
  const size_t stats_floats = static_cast<size_t>(s.batch) * H * s.enc_len * 3;
  uint32_t* shared_keep_bits = keep_bits && t.recompute_qkv ? pl.place<uint32_t>(keep_words) : nullptr;
  for (int l = 0; l < c.num_layers; ++l) {
    if (keep_bits) t.enc_keep_bits.push_back(t.keep_bits_saved ? pl.place<uint32_t>(keep_words) : shared_keep_bits);
    t.enc_x_attn.push_back(pl.place<T>(Ne * d));
    t.enc_qkv.push_back(t.recompute_qkv ? shared_qkv : pl.place<T>(Ne * 3 * inner));
    t.enc_x_ff.push_back(pl.place<T>(Ne * d));
    t.enc_ff_pre.push_back(t.recompute_ff_pre ? shared_ff_pre : pl.place<T>(Ne * wi_cols));
    if (t.attention_saved) {
      t.enc_attn_out.push_back(pl.place<T>(Ne * inner));
      t.enc_attn_stats.push_back(pl.place<float>(stats_floats));
    }
  }
  t.enc_pre_final = pl.place<T>(Ne * d);
  for (int l = 0; l < c.num_decoder_layers; ++l) {
    t.dec_x_self.push_back(pl.place<T>(Nd * d));
    t.dec_qkv.push_back(pl.place<T>(Nd * 3 * inner));
    t.dec_x_cross.push_back(pl.place<T>(Nd * d));
    t.dec_q_cross.push_back(pl.place<T>(Nd * inner));
    t.dec_x_ff.push_back(pl.place<T>(Nd * d));
    t.dec_ff_pre.push_back(pl.place<T>(Nd * wi_cols));
    if (s.folded_cross) {
      t.dec_cross_probs.push_back(pl.place<T>(Nd * H * static_cast<size_t>(folded_cross_ld(s.enc_len))));
      t.dec_cross_ctx.push_back(pl.place<T>(Nd * inner));
    }
  }
  t.dec_pre_final = pl.place<T>(Nd * d);
  t.sublayer_out = pl.place<float>(N * d);
  t.dlogp = pl.place<float>(Nd);
  t.loss_scratch = pl.place<double>(kernels::tfew_losses_scratch_doubles(s.rows, s.batch));
  t.losses = pl.place<float>(4);
  t.dlogits = pl.place<T>(Nd * V);
  t.dnormed = pl.place<float>(N * d);
  t.dy_dec = pl.place<float>(Nd * d);
  t.dx_enc = pl.place<float>(Ne * d);
  t.dout = pl.place<T>(N * d);
  const size_t sublayer_phase = pl.cursor();
  t.dscaled = pl.place<float>(N * ff);
  t.g_ff = t.dscaled;
  t.d_pre = pl.place<T>(N * wi_cols);
  const size_t ffn_end = pl.cursor();
  pl.set_cursor(sublayer_phase);
  t.dctx = pl.place<float>(Nd * inner);  // the decoder's (the encoder's dC goes to dctx_t as T)
  t.dqkv = pl.place<T>(N * 3 * inner);
  t.g_k = pl.place<float>(N * inner);
  t.g_v = pl.place<float>(N * inner);
  t.stats = pl.place<float>(N * H * 3);
  t.probs_dropped = fused ? nullptr : pl.place<T>(static_cast<size_t>(s.batch) * H * s.enc_len * s.enc_len);
  t.dctx_t = pl.place<T>(Ne * inner);
  t.dkv_cross = s.folded_cross ? nullptr : pl.place<T>(Ne * 2 * inner);
  pl.set_cursor(std::max(ffn_end, pl.cursor()));
  t.enc_sums.tokens_per_example = s.enc_len;
  t.enc_sums.chunk = kIa3Chunk;
  const size_t sum_rows = static_cast<size_t>(s.batch) * t.enc_sums.chunks_per_example();
  t.enc_sums_ff = pl.place<float>(sum_rows * ff);
  t.enc_sums_k = pl.place<float>(sum_rows * inner);
  t.enc_sums_v = pl.place<float>(sum_rows * inner);
  t.grads = pl.place<float>(static_cast<size_t>(n_adapters) * IA3Layout::make(c).total);
  t.partial = pl.place<float>(2 * static_cast<size_t>(s.batch) * std::max(inner, ff));  // k and v at once
  t.bytes = align_up(pl.cursor(), 256);
  return t;
}

// The inference shapes whose plans cover every call up to a reserved shape (CudaEngine::reserve): the largest call
// as it is (every plan grows with batch, lengths, rows and adapters), encode() (one row of one token per example,
// the encoder states back), and with buckets (`pads`) the padded calls: at every encoder bucket up to the reserved
// length's, the largest batch that runs padded there, with fillers (whose count may exceed the reserved batch) and
// with its lengths alone (whose choice bucket may exceed the reserved length). Whether a call runs padded is
// decided on its own rows, which may be fewer: not used here, so more is planned, never less. Each shape once per
// cross-attention path in `folded_paths`.
inline std::vector<Shape> reserved_call_shapes(const T5Config& c, int batch, int enc_len, int choices, int dec_len,
                                               bool adapters, bool pads, bool aligns, const std::vector<bool>& folded_paths) {
  Shape s;
  s.batch = batch;
  s.enc_len = enc_len;
  s.rows = batch * choices;
  s.dec_len = choices > 0 ? dec_len : 0;
  s.adapters = adapters;
  std::vector<Shape> calls;
  if (choices > 0) calls.push_back(s);
  if (aligns && choices > 0) {
    // a call of this shape above the bucket regime runs with its encoder length aligned (graph_bucket_call; `aligns`:
    // CudaEngine::pads_to_aligned_lengths)
    const BucketedCall runs = graph_bucket_call(c, batch, enc_len, batch * choices, dec_len);
    if (!runs.padded && runs.enc_len != enc_len) {
      Shape aligned = s;
      aligned.enc_len = runs.enc_len;
      calls.push_back(aligned);
    }
  }
  Shape encode = s;
  encode.rows = batch;
  encode.dec_len = 1;
  encode.want_hidden = true;
  calls.push_back(encode);
  if (pads && choices > 0) {
    const int top = graph_bucket_length(enc_len), dec = graph_bucket_choice_length(dec_len);
    auto largest_padded = [&](int len, bool fillers) {
      for (int b = static_cast<int>(std::min<int64_t>(batch, kGraphBucketMaxTokens / len)); b > 0; --b) {
        Shape p = s;
        p.batch = fillers ? graph_bucket_count(b) : b;
        p.enc_len = len;
        p.dec_len = dec;
        if (!graph_bucket_launch_bound(c, p.batch, len, 0, dec)) continue;
        p.rows = fillers ? graph_bucket_count(b * choices + (p.batch - b)) : b * choices;
        calls.push_back(p);
        return;
      }
    };
    for (int len = 1; len <= top; len = graph_bucket_length(len) + 1) {
      largest_padded(graph_bucket_length(len), true);
      largest_padded(graph_bucket_length(len), false);
    }
  }
  std::vector<Shape> out;
  for (Shape call : calls)
    for (const bool folded : folded_paths) {
      call.folded_cross = folded;
      out.push_back(call);
    }
  return out;
}

constexpr size_t kArenaGranule = 64u << 20;      // the arena is allocated in these steps
constexpr size_t kRecomputeReserve = 256u << 20;  // Recompute::Auto leaves this free (cuBLAS, graphs, context)

// Recompute::Auto: the first level, fastest first, whose arena fits (the call's own plan: ensure_arena falls
// back to it when the rounded shape's does not fit). `have` is the arena the engine holds, free_bytes() the
// device memory free besides it (asked only when the arena held is too small; a bigger arena replaces the
// old one).
template <typename T, typename FreeBytes>
Recompute recompute_that_fits(const T5Config& c, const Shape& s, int n_adapters, bool fused, size_t have,
                              FreeBytes free_bytes) {
  size_t free = 0;
  bool asked = false;
  for (Recompute level : {Recompute::None, Recompute::Attention, Recompute::All}) {
    const size_t need = align_up(make_train_plan<T>(c, s, n_adapters, level, fused, 0).bytes, kArenaGranule);
    if (need <= have) return level;
    if (!asked) {
      free = free_bytes();
      asked = true;
    }
    if (need + kRecomputeReserve <= free + have) return level;
  }
  return Recompute::All;  // nothing fits: the smallest, whose allocation then reports the shortfall
}

// A training shape that CudaEngine::reserve planned the arena for, with its adapter count.
struct ReservedTraining {
  Shape shape;
  int n_adapters = 0;
  bool covers(const Shape& s, int n) const {
    return s.batch <= shape.batch && s.enc_len <= shape.enc_len && s.rows <= shape.rows && s.dec_len <= shape.dec_len &&
           n <= n_adapters;
  }
};

// Recompute::Auto for one step: within a reserved training shape, the least recomputing that the arena held fits
// (one level always does, each level's plan growing with the shape), not a faster level that would grow the
// reserved arena (dropping every graph, in the middle of a run); elsewhere recompute_that_fits.
template <typename T, typename FreeBytes>
Recompute recompute_for_step(const T5Config& c, const Shape& s, int n_adapters, bool fused, size_t have,
                             const std::vector<ReservedTraining>& reserved, FreeBytes free_bytes) {
  for (const ReservedTraining& r : reserved) {
    if (!r.covers(s, n_adapters)) continue;
    for (Recompute level : {Recompute::None, Recompute::Attention, Recompute::All})
      if (make_train_plan<T>(c, s, n_adapters, level, fused, 0).bytes <= have) return level;
  }
  return recompute_that_fits<T>(c, s, n_adapters, fused, have, free_bytes);
}

}  // namespace gpu
}  // namespace tfew
