// The inference forward of the CUDA engine (gpu/cuda_engine.h): encoder, decoder over every choice row,
// head and per-token log-probs, enqueued on the engine's stream (and captured into CUDA graphs by
// launch_forward). The same launch sequence in fp32 mode is the verification path.
#include <algorithm>
#include <cmath>

#include "gpu/cuda_engine.h"

namespace tfew {
namespace gpu {

template <typename T>
kernels::AdapterIndex CudaEngine<T>::adapter_index(const Plan<T>& p, bool decoder_rows) const {
  kernels::AdapterIndex ix;
  if (!p.shape.adapters) return ix;
  ix.adapters = adapter_source_ ? adapter_source_ : reinterpret_cast<const float*>(adapters_dev_.get());
  ix.adapter_stride = layout_.total;
  ix.adapter_of_example = p.adapter_of_example;
  ix.row_example = decoder_rows ? p.row_example : nullptr;
  ix.tokens_per_row = decoder_rows ? p.shape.dec_len : p.shape.enc_len;
  return ix;
}

// One feed-forward sub-layer of n tokens: x += wo(act(wi(rmsnorm(x)))) with the (IA)3 l_ff of each token's
// adapter; h, pre and act are scratch. few_rows: the decoder's few-row kernels where they apply (few_row_linears).
template <typename T>
void CudaEngine<T>::enqueue_ffn(float* x, T* h, T* pre, T* act, const float* ln, const T* wi, const T* wo, int n,
                                const kernels::AdapterIndex& ix, int64_t ff_offset, bool few_rows) {
  const T5Config& c = config_;
  cudaStream_t s = stream_;
  const int d = c.d_model, ff = c.d_ff, wi_cols = c.gated_gelu ? 2 * ff : ff;
  Profiler& prof = profiler_;
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    if (few_rows) {
      Span span(prof, "few_rows_linear", s);
      if (kernels::few_rows_norm_ffn_in(x, d, ln, c.layer_norm_eps, wi, d, ff, c.gated_gelu, n, ix, ff_offset, act, s)) {
        if (!kernels::few_rows_linear_residual(act, ff, wo, d, ff, n, ix, -1, x, d, s))
          gemm_.linear<T, float>(act, ff, wo, ff, x, d, n, d, ff, 1.f);
        return;
      }
    }
  }
  { Span span(prof, "rmsnorm", s); kernels::rmsnorm_forward(x, ln, n, d, c.layer_norm_eps, 1.f, h, s); }
  { Span span(prof, "gemm", s); gemm_.linear<T, T>(h, d, wi, d, pre, wi_cols, n, wi_cols, d, 0.f); }
  {
    Span span(prof, "ffn_act", s);
    kernels::ffn_activation<T>(pre, n, ff, c.gated_gelu, ix, ff_offset, kNoDropout, act, s);
  }
  { Span span(prof, "gemm", s); gemm_.linear<T, float>(act, ff, wo, ff, x, d, n, d, ff, 1.f); }
}

template <typename T>
void CudaEngine<T>::enqueue_forward(const Plan<T>& p) {
  const T5Config& c = config_;
  cudaStream_t s = stream_;
  const int d = c.d_model, inner = c.inner_dim(), H = c.num_heads, dkv = c.d_kv, V = c.vocab_size;
  const int B = p.shape.batch, Le = p.shape.enc_len, R = p.shape.rows, Ld = p.shape.dec_len;
  const int Ne = B * Le, Nd = R * Ld;
  const float eps = c.layer_norm_eps;
  const kernels::AdapterIndex enc_ix = adapter_index(p, false), dec_ix = adapter_index(p, true);
  Profiler& prof = profiler_;

  // ---- encoder
  {
    Span span(prof, "embedding+bias", s);
    kernels::relative_bias_table(weights_.enc_rel_bias, p.enc_buckets, 2 * Le - 1, H, p.enc_bias, s);
    kernels::embedding_forward<T>(weights_.enc_embed, V, d, p.enc_ids, Ne, p.x_enc, s);
  }
  // One encoder layer over examples [b0, b0 + nb). With the fused attention the encoder may run chunk by chunk
  // (encoder_chunk_examples, cuda.encoderChunkRows): each chunk's q|k|v, context, FFN pre-activation and activation
  // use the start of their buffers, so they are read back from L2 (and overwritten there by the next layer or
  // chunk) instead of going to DRAM and back; only the residual stream rows are the chunk's own.
  auto encoder_layer = [&](int l, int b0, int nb) {
    const EncoderLayerWeights<T>& L = weights_.encoder[l];
    const IA3Layout::EncoderBlock& ia3 = layout_.encoder[l];
    const int rows = nb * Le;
    float* x = p.x_enc + static_cast<int64_t>(b0) * Le * d;
    kernels::AdapterIndex ix = enc_ix;
    if (ix.adapter_of_example) ix.adapter_of_example += b0;
    { Span span(prof, "rmsnorm", s); kernels::rmsnorm_forward(x, L.ln_attn, rows, d, eps, 1.f, p.h_enc, s); }
    { Span span(prof, "gemm", s); gemm_.linear<T, T>(p.h_enc, d, L.qkv, d, p.qkv_enc, 3 * inner, rows, 3 * inner, d, 0.f); }
    if (fused_attention_) {
      Span span(prof, "encoder_attention", s);
      if constexpr (std::is_same<T, __nv_bfloat16>::value)
        kernels::fused_encoder_attention(p.qkv_enc, inner, dkv, nb, H, Le, p.enc_bias, p.enc_lengths + b0, ix,
                                         ia3.self_k, ia3.self_v, kNoDropout, p.ctx_enc, s);
    } else {  // (never chunked: the batched GEMMs' pointer arrays cover the whole batch)
      {
        Span span(prof, "ia3", s);
        kernels::ia3_scale_kv<T>(p.qkv_enc, 3 * inner, inner, 2 * inner, inner, Ne, enc_ix, ia3.self_k, ia3.self_v, s);
      }
      { Span span(prof, "gemm_attention", s); gemm_.attention_scores<T>(p.qk_k, p.qk_q, p.qk_s, 3 * inner, Le, dkv, B * H); }
      {
        Span span(prof, "softmax", s);
        kernels::encoder_softmax<T>(p.scores, p.enc_bias, p.enc_lengths, B, H, Le, kNoDropout, p.probs, s);
      }
      {
        Span span(prof, "gemm_attention", s);
        gemm_.attention_context<T>(p.pv_v, p.pv_p, p.pv_c, 3 * inner, inner, Le, dkv, B * H);
      }
    }
    { Span span(prof, "gemm", s); gemm_.linear<T, float>(p.ctx_enc, inner, L.o, inner, x, d, rows, d, inner, 1.f); }
    enqueue_ffn(x, p.h_enc, p.ff_enc, p.act_enc, L.ln_ff, L.wi, L.wo, rows, ix, ia3.ff, false);
  };
  // (a chunk through every layer before the next chunk: the weights are read once per chunk and layer either way,
  // and so the chunk's residual rows stay in L2 too)
  const int chunk = encoder_chunk_examples(B, Le);  // (the batch where the attention is not fused: the engine's rule)
  for (int b0 = 0; b0 < B; b0 += chunk)
    for (int l = 0; l < c.num_layers; ++l) encoder_layer(l, b0, std::min(chunk, B - b0));
  {
    Span span(prof, "rmsnorm", s);
    kernels::rmsnorm_forward(p.x_enc, weights_.enc_final_ln, Ne, d, eps, 1.f, p.enc_out, s);
    if (p.enc_hidden) kernels::rmsnorm_forward(p.x_enc, weights_.enc_final_ln, Ne, d, eps, 1.f, p.enc_hidden, s);
  }
  if (Nd == 0) return;

  // ---- decoder: all choice rows of the batch together
  {
    Span span(prof, "embedding+bias", s);
    kernels::relative_bias_table(weights_.dec_rel_bias, p.dec_buckets, 2 * Ld - 1, H, p.dec_bias, s);
    kernels::embedding_forward<T>(weights_.dec_embed, V, d, p.dec_ids, Nd, p.x_dec, s);
  }
  // Cross-attention keys/values of every layer, once per example (its choice rows share them): one GEMM.
  const int kv_cols = 2 * inner * c.num_decoder_layers;
  if (!p.shape.folded_cross) {
    Span span(prof, "gemm", s);
    gemm_.linear<T, T>(p.enc_out, d, weights_.dec_kv_cross, d, p.kv_cross, kv_cols, Ne, kv_cols, d, 0.f);
  }
  // At a few rows (one example's choices) each linear layer takes its norm, activation or (IA)3 scale along in one
  // kernel (kernels/linear_few_rows.cu; cuda.fewRowLinears); each falls back to the passes below where it does not
  // apply. The (IA)3 scales are applied here, not by the attention: the folded path's l_k on the query and l_v on
  // the context, the precomputed path's kernel scales its keys and values itself.
  const bool few = uses_few_row_linears(Nd);
  const bool folded = p.shape.folded_cross;
  // y = rmsnorm(x_dec) W^T (n columns), then l_k where scale_offset >= 0
  auto norm_linear = [&](const float* ln, const T* w, int n, T* y, int64_t scale_offset) {
    if constexpr (std::is_same<T, __nv_bfloat16>::value) {
      if (few) {
        Span span(prof, "few_rows_linear", s);
        if (kernels::few_rows_norm_linear(p.x_dec, d, ln, eps, w, n, d, Nd, y, n, dec_ix, scale_offset, s)) return;
      }
    }
    { Span span(prof, "rmsnorm", s); kernels::rmsnorm_forward(p.x_dec, ln, Nd, d, eps, 1.f, p.h_dec, s); }
    { Span span(prof, "gemm", s); gemm_.linear<T, T>(p.h_dec, d, w, d, y, n, Nd, n, d, 0.f); }
    if (scale_offset >= 0) {
      Span span(prof, "ia3", s);
      kernels::ia3_scale_columns<T>(y, n, 0, n, Nd, dec_ix, scale_offset, s);
    }
  };
  // x_dec += (ctx_dec, times l_v where scale_offset >= 0) W^T
  auto context_out = [&](const T* w, int64_t scale_offset) {
    if constexpr (std::is_same<T, __nv_bfloat16>::value) {
      if (few) {
        Span span(prof, "few_rows_linear", s);
        if (kernels::few_rows_linear_residual(p.ctx_dec, inner, w, d, inner, Nd, dec_ix, scale_offset, p.x_dec, d, s))
          return;
      }
    }
    if (scale_offset >= 0) {
      Span span(prof, "ia3", s);
      kernels::ia3_scale_columns<T>(p.ctx_dec, inner, 0, inner, Nd, dec_ix, scale_offset, s);
    }
    { Span span(prof, "gemm", s); gemm_.linear<T, float>(p.ctx_dec, inner, w, inner, p.x_dec, d, Nd, d, inner, 1.f); }
  };
  for (int l = 0; l < c.num_decoder_layers; ++l) {
    const DecoderLayerWeights<T>& L = weights_.decoder[l];
    const IA3Layout::DecoderBlock& ia3 = layout_.decoder[l];
    // causal self-attention
    norm_linear(L.ln_self, L.qkv, 3 * inner, p.qkv_dec, -1);
    {
      Span span(prof, "decoder_attention", s);
      kernels::decoder_self_attention<T>(p.qkv_dec, 3 * inner, inner, dkv, H, R, Ld, p.dec_bias, p.row_example,
                                         dec_ix, ia3.self_k, ia3.self_v, kNoDropout, p.ctx_dec, inner, s);
    }
    context_out(L.o, -1);
    // cross-attention: this layer's slice of the shared keys/values, or folded (then l_k and l_v are ours to apply)
    const int64_t l_k = folded && p.shape.adapters ? ia3.cross_k : -1, l_v = folded && p.shape.adapters ? ia3.cross_v : -1;
    norm_linear(L.ln_cross, L.q_cross, inner, p.q_cross, l_k);
    if (folded) {
      folded_cross_products(p, l, kNoDropout, p.cross_probs, nullptr, p.ctx_dec);
    } else {
      Span span(prof, "decoder_attention", s);
      kernels::cross_attention<T>(p.q_cross, inner, p.kv_cross + static_cast<int64_t>(l) * 2 * inner, kv_cols, inner,
                                  dkv, H, R, Ld, p.row_example, p.enc_lengths, Le, dec_ix, ia3.cross_k, ia3.cross_v,
                                  kNoDropout, p.ctx_dec, inner, s);
    }
    context_out(L.o_cross, l_v);
    enqueue_ffn(p.x_dec, p.h_dec, p.ff_dec, p.act_dec, L.ln_ff, L.wi, L.wo, Nd, dec_ix, ia3.ff, few);
  }
  // head: final norm (with the tied-head rescale folded in), logits in fp32, target log-probs
  const float head_scale = c.scale_decoder_outputs ? 1.f / std::sqrt(static_cast<float>(d)) : 1.f;
  {
    Span span(prof, "rmsnorm", s);
    kernels::rmsnorm_forward(p.x_dec, weights_.dec_final_ln, Nd, d, eps, head_scale, p.h_dec, s);
  }
  { Span span(prof, "gemm_head", s); gemm_.linear<T, float>(p.h_dec, d, weights_.lm_head, d, p.logits, V, Nd, V, d, 0.f); }
  {
    Span span(prof, "logprobs", s);
    kernels::token_logprobs(p.logits, Nd, V, p.targets, c.pad_token_id, p.token_logp, s);
  }
}

// The cross-attention of decoder layer `layer` without keys or values (Shape::folded_cross). Per head h, with
// K = E W_k,h^T and V = E W_v,h^T (E: the example's encoder output, W_k,h / W_v,h: the head's d_kv rows of the
// layer's k / v projections) and the (IA)3 vectors l_k, l_v:
//   q . (l_k * k_j) = (W_k,h^T (l_k * q)) . e_j        sum_j p_j (l_v * v_j) = l_v * W_v,h (sum_j p_j e_j)
// so each (token, head) gets a query in model space, scores against the encoder outputs, a softmax, and the
// probability-weighted sum of encoder outputs, projected by W_v,h: four products, all strided batches (over
// heads or over examples), instead of the keys/values of every encoder position. Here the products, from the query
// scaled by l_k in p.q_cross to the context before l_v (`context`, [Nd, inner], as the precomputed path's kernel
// writes it but for l_v); the caller applies l_k and l_v (enqueue_forward; training: train_folded_cross_forward).
// probs gets the probabilities P and, with dropout (training), probs_dropped the P' the context is made of.
template <typename T>
void CudaEngine<T>::folded_cross_products(const Plan<T>& p, int layer, const kernels::DropoutSite& drop, T* probs,
                                          T* probs_dropped, T* context) {
  const T5Config& c = config_;
  cudaStream_t s = stream_;
  const int d = c.d_model, inner = c.inner_dim(), H = c.num_heads, dkv = c.d_kv;
  const int B = p.shape.batch, Le = p.shape.enc_len, Nd = p.shape.rows * p.shape.dec_len;
  const int ld = folded_cross_ld(Le);  // the score and probability rows' stride (16-byte rows for cuBLAS)
  const int64_t m = static_cast<int64_t>(Nd / B) * H;  // (token, head) rows of one example
  const T* w_k = weights_.dec_kv_cross + static_cast<int64_t>(layer) * 2 * inner * d;  // [inner, d]
  const T* w_v = w_k + static_cast<int64_t>(inner) * d;
  const int64_t enc_stride = static_cast<int64_t>(Le) * d;
  Profiler& prof = profiler_;
  const char* gemm_family = gemm_.timed() ? nullptr : "gemm_cross";  // (training: each GEMM times itself)
  {
    Span span(prof, gemm_family, s);
    // cross_model[:, h, :] (Nd x d, row stride H d) = q[:, h] (Nd x d_kv) W_k,h (d_kv x d)
    gemm_.strided<T, T>(false, false, Nd, d, dkv, p.q_cross, inner, dkv, w_k, d, static_cast<int64_t>(dkv) * d,
                        p.cross_model, H * d, d, H);
    // per example: scores (m x Le) = its cross_model rows (m x d) times its encoder output transposed
    gemm_.strided<T, float>(false, true, static_cast<int>(m), Le, d, p.cross_model, d, m * d, p.enc_out, d,
                            enc_stride, p.cross_scores, ld, m * ld, B);
  }
  {
    Span span(prof, "softmax", s);
    kernels::cross_softmax_folded<T>(p.cross_scores, p.enc_lengths, B, m, Le, drop,
                                     kernels::FoldedRows{H, p.shape.dec_len, ld}, probs, probs_dropped, s);
  }
  {
    Span span(prof, gemm_family, s);
    // per example: cross_model rows (m x d) = probabilities (m x Le) times its encoder output (Le x d)
    gemm_.strided<T, T>(false, false, static_cast<int>(m), d, Le, probs_dropped ? probs_dropped : probs, ld, m * ld,
                        p.enc_out, d, enc_stride, p.cross_model, d, m * d, B);
    // context[:, h] (Nd x d_kv, ld inner) = cross_model[:, h, :] (Nd x d) W_v,h^T (d x d_kv)
    gemm_.strided<T, T>(false, true, Nd, dkv, d, p.cross_model, H * d, d, w_v, d, static_cast<int64_t>(dkv) * d,
                        context, inner, dkv, H);
  }
}

template kernels::AdapterIndex CudaEngine<float>::adapter_index(const Plan<float>&, bool) const;
template kernels::AdapterIndex CudaEngine<__nv_bfloat16>::adapter_index(const Plan<__nv_bfloat16>&, bool) const;
template void CudaEngine<float>::enqueue_forward(const Plan<float>&);
template void CudaEngine<__nv_bfloat16>::enqueue_forward(const Plan<__nv_bfloat16>&);

}  // namespace gpu
}  // namespace tfew
