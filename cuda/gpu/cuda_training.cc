// Training on the CUDA engine (gpu/cuda_engine.h): loss_and_gradients() runs the forward of the CPU
// backend's training pass step for step (dropout sites included) while saving each sub-layer's input, computes
// the T-Few losses on the device from the per-token log-probs (kernels/loss.cu, the CPU backend's definition),
// and runs the backward pass to the (IA)3 vectors: only activation gradients through the frozen weights, per-token (IA)3
// contributions reduced per adapter in a fixed order (no atomics: bit-reproducible).
#include <algorithm>
#include <cmath>
#include <cstring>

#include "gpu/cuda_engine.h"

namespace tfew {
namespace gpu {

namespace {

// The dropout site `site` of (stack, layer) with the call's rate and seed.
kernels::DropoutSite at_site(const kernels::DropoutSite& d, int stack, int layer, DropSite site) {
  kernels::DropoutSite s = d;
  s.site = drop_site_id(stack, layer, site);
  return s;
}

}  // namespace

template <typename T>
LossOutput CudaEngine<T>::train_unlocked(const Batch& b, const AdapterSet& adapters, const LossOptions& options) {
  validate(b, adapters);
  const int n_adapters = static_cast<int>(adapters.vectors.size());
  upload_adapters(adapters);
  LossOutput out;
  const float* grads = train_to_device(b, n_adapters, options);
  out.gradients.assign(static_cast<size_t>(n_adapters) * layout_.total, 0.f);
  if (grads)  // else no example uses an adapter: every gradient is zero
    TFEW_CUDA_CHECK(cudaMemcpyAsync(out.gradients.data(), grads, out.gradients.size() * sizeof(float),
                                    cudaMemcpyDeviceToHost, stream_));
  read_train_results(out, true);
  return out;
}

template <typename T>
void CudaEngine<T>::read_train_results(LossOutput& out, bool with_token_logp) {
  const TrainPlan<T>& tp = train_plan_;
  float losses[4];
  if (with_token_logp) {
    const size_t Nd = static_cast<size_t>(tp.fwd.shape.rows) * tp.fwd.shape.dec_len;
    out.token_logp.resize(Nd);
    TFEW_CUDA_CHECK(cudaMemcpyAsync(out.token_logp.data(), tp.fwd.token_logp, Nd * sizeof(float),
                                    cudaMemcpyDeviceToHost, stream_));
  }
  TFEW_CUDA_CHECK(cudaMemcpyAsync(losses, tp.losses, sizeof(losses), cudaMemcpyDeviceToHost, stream_));
  TFEW_CUDA_CHECK(cudaStreamSynchronize(stream_));
  profiler_.report("train", tp.fwd.shape, probe_.device_name, precision_name(), launch_name(train_launch_));
  out.lm_loss = losses[0];
  out.ul_loss = losses[1];
  out.ln_loss = losses[2];
  out.total_loss = losses[3];
}

template <typename T>
float* CudaEngine<T>::train_to_device(const Batch& b, int n_adapters, const LossOptions& options) {
  TFEW_CHECK_ARG(b.num_rows > 0, "training needs answer choices");
  TFEW_CHECK_ARG(static_cast<int>(b.labels.size()) == b.batch_size, "labels are needed, one per example");
  for (int i = 0; i < b.batch_size; ++i) {
    const int n_choices = b.row_start[i + 1] - b.row_start[i];
    TFEW_CHECK_ARG(n_choices > 0, "every example needs at least one answer choice");
    TFEW_CHECK_ARG(b.labels[i] >= 0 && b.labels[i] < n_choices,
                   "label " + std::to_string(b.labels[i]) + " of example " + std::to_string(i) +
                       " is not one of its choices");
  }
  Shape shape;
  shape.batch = b.batch_size;
  shape.enc_len = b.enc_len;
  shape.rows = b.num_rows;
  shape.dec_len = b.dec_len;
  shape.adapters = std::any_of(b.adapter_of_example.begin(), b.adapter_of_example.end(), [](int a) { return a >= 0; });
  shape.training = true;
  shape.folded_cross = folds_cross_attention(b);
  shape.dropout = options.dropout && config_.dropout_rate > 0.f;
  const Recompute recompute = options.recompute == Recompute::Auto ? recompute_for_memory(shape, n_adapters)
                                                                   : options.recompute;
  ensure_arena(make_train_plan<T>(config_, shape, n_adapters, recompute, fused_backward_, 0).bytes, [&] {
    return make_train_plan<T>(config_, arena_shape(shape), n_adapters, recompute, fused_backward_, 0).bytes;
  });
  train_plan_ = make_train_plan<T>(config_, shape, n_adapters, recompute, fused_backward_,
                                   reinterpret_cast<uintptr_t>(arena_.get()));
  const TrainPlan<T>& tp = train_plan_;
  const Plan<T>& f = tp.fwd;
  pack_inputs(b, f, !fused_backward_, options.dropout ? options.seed : 0);
  if (!fused_backward_) pack_backward_pointers(tp, options.dropout && config_.dropout_rate > 0.f);
  const float loss_weights[3] = {options.lm_weight, options.ul_weight, options.ln_weight};
  std::memcpy(staged(f, f.loss_weights), loss_weights, sizeof(loss_weights));
  profiler_.begin_call(stream_);  // as score(): the input copy counts
  TFEW_CUDA_CHECK(cudaMemcpyAsync(arena_.get() + f.inputs_begin, staging_in_.get(), f.inputs_end - f.inputs_begin,
                                  cudaMemcpyHostToDevice, stream_));

  kernels::DropoutSite drop;
  drop.rate = options.dropout ? config_.dropout_rate : 0.f;
  drop.seed_dev = f.dropout_seed;  // read on the device: a replayed graph sees each step's seed

  // forward, losses and backward: one CUDA graph per key after the second step of a shape (the loss weights,
  // like the labels and the dropout seed, are device data: a replay sees each step's values)
  TrainGraphKey key;
  key.shape = shape;
  key.n_adapters = n_adapters;
  key.recompute = recompute;
  key.dropout = drop.rate > 0.f;
  key.adapters = adapter_source_ ? adapter_source_ : reinterpret_cast<const float*>(adapters_dev_.get());
  // Timing (TFEW_CUDA_PROFILE): the whole step; in detail mode each GEMM as "gemm" and the (IA)3 reductions.
  struct GemmTiming {
    Gemm& gemm;
    ~GemmTiming() { gemm.time_as(nullptr); }
  } timing{gemm_};
  if (profiler_.detail()) gemm_.time_as("gemm");
  const Launch launch = launch_cached(train_graphs_, key, [&] {
    enqueue_train_forward(tp, drop);
    {
      Span span(profiler_, "logprobs", stream_);
      kernels::tfew_losses(f.token_logp, f.targets, shape.rows, shape.dec_len, config_.pad_token_id, f.row_start,
                           f.row_example, f.labels, shape.batch, f.loss_weights, tp.loss_scratch, tp.losses, tp.dlogp,
                           stream_);
    }
    if (!shape.adapters) return;
    TFEW_CUDA_CHECK(cudaMemsetAsync(tp.grads, 0, static_cast<size_t>(n_adapters) * layout_.total * sizeof(float),
                                    stream_));
    enqueue_backward(tp, drop, n_adapters);
  }, /*consecutive_only=*/true);
  train_launch_ = launch;
  note_launch("train", shape, launch);
  profiler_.end_call(stream_);
  return shape.adapters ? tp.grads : nullptr;
}

// Recompute::Auto: keep everything when that fits in the device memory at hand, else recompute the least that does.

template <typename T>
void CudaEngine<T>::enqueue_train_forward(const TrainPlan<T>& t, const kernels::DropoutSite& drop) {
  const T5Config& c = config_;
  const Plan<T>& f = t.fwd;
  cudaStream_t s = stream_;
  const int d = c.d_model, inner = c.inner_dim(), H = c.num_heads, dkv = c.d_kv, V = c.vocab_size;
  const int B = f.shape.batch, Le = f.shape.enc_len, R = f.shape.rows, Ld = f.shape.dec_len;
  const int Ne = B * Le, Nd = R * Ld, Lenc = c.num_layers, Ldec = c.num_decoder_layers;
  const int kv_cols = 2 * inner * Ldec;
  const float eps = c.layer_norm_eps;
  const kernels::AdapterIndex enc_ix = adapter_index(f, false), dec_ix = adapter_index(f, true);

  // encoder
  // the fp32 residual stream in f.x_enc; each sub-layer's input saved as T (TrainPlan)
  float* x = f.x_enc;
  train_embed(weights_.enc_rel_bias, f.enc_buckets, Le, f.enc_bias, weights_.enc_embed, f.enc_ids, Ne, x,
              at_site(drop, 0, 0, kEmbed), Lenc > 0 ? t.enc_x_attn[0] : t.enc_pre_final);
  // Each sub-layer's residual add also normalises the stream for the next one (residual_add_norm): the norm
  // outputs (f.h_enc, f.h_dec) are made there, but for the first layer's.
  if (Lenc > 0) kernels::rmsnorm_forward(t.enc_x_attn[0], weights_.encoder[0].ln_attn, Ne, d, eps, 1.f, f.h_enc, s);
  for (int l = 0; l < Lenc; ++l) {
    const EncoderLayerWeights<T>& L = weights_.encoder[l];
    const IA3Layout::EncoderBlock& ia3 = layout_.encoder[l];
    gemm_.linear<T, T>(f.h_enc, d, L.qkv, d, t.enc_qkv[l], 3 * inner, Ne, 3 * inner, d, 0.f);
    // The fused kernel where the inference forward uses it (bf16): no scores or probabilities in memory. The
    // backward recomputes what it needs (encoder_attention_backward) but reads the dropout mask this writes,
    // and, when the plan keeps them (attention_saved), this output and its softmax statistics.
    T* attn_out = t.attention_saved ? t.enc_attn_out[l] : f.ctx_enc;
    bool fused = false;
    if constexpr (std::is_same<T, __nv_bfloat16>::value) {
      if (fused_attention_) {
        const kernels::KeepBits keep{t.keep_bits_saved ? t.enc_keep_bits[l] : nullptr, true};
        {
          Span span(profiler_, "encoder_attention", s);
          kernels::fused_encoder_attention(t.enc_qkv[l], inner, dkv, B, H, Le, f.enc_bias, f.enc_lengths, enc_ix,
                                           ia3.self_k, ia3.self_v, at_site(drop, 0, l, kSelfProbs), attn_out, s,
                                           t.attention_saved ? t.enc_attn_stats[l] : nullptr, keep);
        }
        fused = true;
      }
    }
    if (!fused) {
      {
        Span span(profiler_, "ia3", s);
        kernels::ia3_scaled_qkv_copy<T>(t.enc_qkv[l], f.qkv_enc, 3 * inner, inner, Ne, enc_ix, ia3.self_k, ia3.self_v,
                                        s);
      }
      gemm_.attention_scores<T>(f.qk_k, f.qk_q, f.qk_s, 3 * inner, Le, dkv, B * H);
      {
        Span span(profiler_, "softmax", s);
        kernels::encoder_softmax<T>(f.scores, f.enc_bias, f.enc_lengths, B, H, Le, at_site(drop, 0, l, kSelfProbs),
                                    f.probs, s);
      }
      gemm_.attention_context<T>(f.pv_v, f.pv_p, f.pv_c, 3 * inner, inner, Le, dkv, B * H);
    }
    gemm_.linear<T, float>(attn_out, inner, L.o, inner, t.sublayer_out, d, Ne, d, inner, 0.f);
    {
      Span span(profiler_, "rmsnorm", s);
      kernels::residual_add_norm<T>(x, t.sublayer_out, Ne, d, at_site(drop, 0, l, kSelfOut), t.enc_x_ff[l], L.ln_ff,
                                    eps, 1.f, f.h_enc, s);
    }
    const bool last = l + 1 == Lenc;  // then the next norm is the final one, into the encoder output
    train_ffn_forward(t, x, f.h_enc, t.enc_ff_pre[l], f.act_enc, L.wi, L.wo, Ne, enc_ix, ia3.ff,
                      at_site(drop, 0, l, kFfHidden), at_site(drop, 0, l, kFfOut),
                      last ? t.enc_pre_final : t.enc_x_attn[l + 1],
                      last ? weights_.enc_final_ln : weights_.encoder[l + 1].ln_attn, 1.f, last ? f.enc_out : f.h_enc);
  }
  if (Lenc == 0) kernels::rmsnorm_forward(t.enc_pre_final, weights_.enc_final_ln, Ne, d, eps, 1.f, f.enc_out, s);
  {
    Span span(profiler_, "dropout", s);
    kernels::dropout_inplace<T>(f.enc_out, static_cast<int64_t>(Ne) * d, at_site(drop, 0, 0, kFinal), s);
  }

  // decoder
  if (!f.shape.folded_cross)
    gemm_.linear<T, T>(f.enc_out, d, weights_.dec_kv_cross, d, f.kv_cross, kv_cols, Ne, kv_cols, d, 0.f);
  float* y = f.x_dec;  // (the encoder's stream is done: same bytes)
  train_embed(weights_.dec_rel_bias, f.dec_buckets, Ld, f.dec_bias, weights_.dec_embed, f.dec_ids, Nd, y,
              at_site(drop, 1, 0, kEmbed), Ldec > 0 ? t.dec_x_self[0] : t.dec_pre_final);
  const float head_scale = c.scale_decoder_outputs ? 1.f / std::sqrt(static_cast<float>(d)) : 1.f;
  if (Ldec > 0) kernels::rmsnorm_forward(t.dec_x_self[0], weights_.decoder[0].ln_self, Nd, d, eps, 1.f, f.h_dec, s);
  for (int l = 0; l < Ldec; ++l) {
    const DecoderLayerWeights<T>& L = weights_.decoder[l];
    const IA3Layout::DecoderBlock& ia3 = layout_.decoder[l];
    gemm_.linear<T, T>(f.h_dec, d, L.qkv, d, t.dec_qkv[l], 3 * inner, Nd, 3 * inner, d, 0.f);
    {
      Span span(profiler_, "decoder_attention", s);
      kernels::decoder_self_attention<T>(t.dec_qkv[l], 3 * inner, inner, dkv, H, R, Ld, f.dec_bias, f.row_example,
                                         dec_ix, ia3.self_k, ia3.self_v, at_site(drop, 1, l, kSelfProbs), f.ctx_dec,
                                         inner, s);
    }
    gemm_.linear<T, float>(f.ctx_dec, inner, L.o, inner, t.sublayer_out, d, Nd, d, inner, 0.f);
    {
      Span span(profiler_, "rmsnorm", s);
      kernels::residual_add_norm<T>(y, t.sublayer_out, Nd, d, at_site(drop, 1, l, kSelfOut), t.dec_x_cross[l],
                                    L.ln_cross, eps, 1.f, f.h_dec, s);
    }
    gemm_.linear<T, T>(f.h_dec, d, L.q_cross, d, t.dec_q_cross[l], inner, Nd, inner, d, 0.f);
    if (f.shape.folded_cross)
      train_folded_cross_forward(t, l, at_site(drop, 1, l, kCrossProbs));
    else
      {
        Span span(profiler_, "decoder_attention", s);
        kernels::cross_attention<T>(t.dec_q_cross[l], inner, f.kv_cross + static_cast<int64_t>(l) * 2 * inner, kv_cols,
                                    inner, dkv, H, R, Ld, f.row_example, f.enc_lengths, Le, dec_ix, ia3.cross_k,
                                    ia3.cross_v, at_site(drop, 1, l, kCrossProbs), f.ctx_dec, inner, s);
      }
    gemm_.linear<T, float>(f.ctx_dec, inner, L.o_cross, inner, t.sublayer_out, d, Nd, d, inner, 0.f);
    {
      Span span(profiler_, "rmsnorm", s);
      kernels::residual_add_norm<T>(y, t.sublayer_out, Nd, d, at_site(drop, 1, l, kCrossOut), t.dec_x_ff[l], L.ln_ff,
                                    eps, 1.f, f.h_dec, s);
    }
    const bool last = l + 1 == Ldec;  // then the next norm is the final one (with the tied head's rescale)
    train_ffn_forward(t, y, f.h_dec, t.dec_ff_pre[l], f.act_dec, L.wi, L.wo, Nd, dec_ix, ia3.ff,
                      at_site(drop, 1, l, kFfHidden), at_site(drop, 1, l, kFfOut),
                      last ? t.dec_pre_final : t.dec_x_self[l + 1],
                      last ? weights_.dec_final_ln : weights_.decoder[l + 1].ln_self, last ? head_scale : 1.f, f.h_dec);
  }
  if (Ldec == 0) kernels::rmsnorm_forward(t.dec_pre_final, weights_.dec_final_ln, Nd, d, eps, head_scale, f.h_dec, s);
  {
    Span span(profiler_, "dropout", s);
    kernels::dropout_inplace<T>(f.h_dec, static_cast<int64_t>(Nd) * d, at_site(drop, 1, 0, kFinal), s);
  }
  gemm_.linear<T, float>(f.h_dec, d, weights_.lm_head, d, f.logits, V, Nd, V, d, 0.f);
  {
    Span span(profiler_, "logprobs", s);
    kernels::token_logprobs(f.logits, Nd, V, f.targets, c.pad_token_id, f.token_logp, s);
  }
}

template <typename T>
void CudaEngine<T>::train_embed(const float* rel_bias, const int32_t* buckets, int L, float* bias, const T* embed,
                                const int32_t* ids, int n, float* x, const kernels::DropoutSite& embed_drop, T* saved) {
  const int d = config_.d_model;
  cudaStream_t s = stream_;
  {
    Span span(profiler_, "embedding+bias", s);
    kernels::relative_bias_table(rel_bias, buckets, 2 * L - 1, config_.num_heads, bias, s);
    kernels::embedding_forward<T>(embed, config_.vocab_size, d, ids, n, x, s);
  }
  Span span(profiler_, "dropout", s);
  kernels::dropout_inplace<float>(x, static_cast<int64_t>(n) * d, embed_drop, s);
  kernels::dropout_cast<T>(x, static_cast<int64_t>(n) * d, kNoDropout, saved, s);
}

template <typename T>
void CudaEngine<T>::train_ffn_forward(const TrainPlan<T>& t, float* x, const T* h, T* pre, T* act, const T* wi,
                                      const T* wo, int n, const kernels::AdapterIndex& ix, int64_t ff_offset,
                                      const kernels::DropoutSite& drop_hidden, const kernels::DropoutSite& drop_out,
                                      T* x_next_saved, const float* next_ln, float next_scale, T* next_h) {
  const T5Config& c = config_;
  const int d = c.d_model, ff = c.d_ff, wi_cols = c.gated_gelu ? 2 * ff : ff;
  gemm_.linear<T, T>(h, d, wi, d, pre, wi_cols, n, wi_cols, d, 0.f);
  {
    Span span(profiler_, "ffn_act", stream_);
    kernels::ffn_activation<T>(pre, n, ff, c.gated_gelu, ix, ff_offset, drop_hidden, act, stream_);
  }
  gemm_.linear<T, float>(act, ff, wo, ff, t.sublayer_out, d, n, d, ff, 0.f);
  {
    Span span(profiler_, "rmsnorm", stream_);
    kernels::residual_add_norm<T>(x, t.sublayer_out, n, d, drop_out, x_next_saved, next_ln, c.layer_norm_eps,
                                  next_scale, next_h, stream_);
  }
}

template <typename T>
void CudaEngine<T>::ffn_backward(const TrainPlan<T>& t, float* dy, const T* x_in, const float* ln, const T* wi,
                                 const T* wo, const T* pre, int n, const kernels::AdapterIndex& ix,
                                 int64_t ff_offset, bool decoder, int n_adapters,
                                 const kernels::DropoutSite& drop_hidden, const kernels::DropoutSite& next_out) {
  const T5Config& c = config_;
  const int d = c.d_model, ff = c.d_ff, wi_cols = c.gated_gelu ? 2 * ff : ff;
  // t.dout: dy through this sub-layer's output dropout, as T (written by the norm backward before this one)
  gemm_.linear_backward<T, float>(t.dout, d, wo, ff, t.dscaled, ff, n, d, ff, 1.f, 0.f);
  // the decoder's contributions per token (in place, g_ff == dscaled), the encoder's summed per chunk
  const kernels::Ia3Sums per_token{n, 1};
  float* g = decoder ? t.g_ff : t.enc_sums_ff;
  {
    Span span(profiler_, "ffn_backward", stream_);
    kernels::ffn_backward<T>(t.dscaled, pre, n, ff, c.gated_gelu, ix, ff_offset, drop_hidden, t.d_pre,
                             decoder ? per_token : t.enc_sums, g, stream_);
  }
  reduce_ia3(t, {g, ff_offset}, {}, ff, decoder, n_adapters);
  gemm_.linear_backward<T, float>(t.d_pre, wi_cols, wi, d, t.dnormed, d, n, wi_cols, d, 1.f, 0.f);
  {
    Span span(profiler_, "rmsnorm", stream_);
    kernels::rmsnorm_backward(t.dnormed, x_in, ln, n, d, c.layer_norm_eps, true, dy, stream_, t.dout, next_out);
  }
}

template <typename T>
void CudaEngine<T>::reduce_ia3(const TrainPlan<T>& t, const kernels::Ia3GradSource& first,
                               const kernels::Ia3GradSource& second, int width, bool decoder, int n_adapters) {
  const Plan<T>& f = t.fwd;
  Span span(profiler_, "ia3_reduce", stream_);
  // rows of g: the decoder's per token (row_start's rows of dec_len tokens), the encoder's per chunk
  kernels::ia3_grad_reduce(first, second, width, f.shape.batch,
                           decoder ? f.shape.dec_len : t.enc_sums.chunks_per_example(), decoder ? f.row_start : nullptr,
                           f.adapter_of_example, n_adapters, t.partial, t.grads, layout_.total, stream_);
}

template <typename T>
void CudaEngine<T>::enqueue_backward(const TrainPlan<T>& t, const kernels::DropoutSite& drop, int n_adapters) {
  const T5Config& c = config_;
  const Plan<T>& f = t.fwd;
  cudaStream_t s = stream_;
  const int d = c.d_model, inner = c.inner_dim(), H = c.num_heads, dkv = c.d_kv, V = c.vocab_size;
  const int B = f.shape.batch, Le = f.shape.enc_len, R = f.shape.rows, Ld = f.shape.dec_len;
  const int Ne = B * Le, Nd = R * Ld, Lenc = c.num_layers, Ldec = c.num_decoder_layers;
  const int kv_cols = 2 * inner * Ldec;
  const float eps = c.layer_norm_eps;
  const kernels::AdapterIndex enc_ix = adapter_index(f, false), dec_ix = adapter_index(f, true);

  // head and final decoder norm
  {
    Span span(profiler_, "logprobs", s);
    kernels::token_logprobs_backward<T>(f.logits, Nd, V, f.targets, c.pad_token_id, t.dlogp, t.dlogits, s);
  }
  const float head_scale = c.scale_decoder_outputs ? 1.f / std::sqrt(static_cast<float>(d)) : 1.f;
  gemm_.linear_backward<T, float>(t.dlogits, V, weights_.lm_head, d, t.dnormed, d, Nd, V, d, head_scale, 0.f);
  {
    Span span(profiler_, "dropout", s);
    kernels::dropout_inplace<float>(t.dnormed, static_cast<int64_t>(Nd) * d, at_site(drop, 1, 0, kFinal), s);
  }
  // Each norm backward also writes t.dout for the next sub-layer in backward order (its output dropout applied).
  {
    Span span(profiler_, "rmsnorm", s);
    kernels::rmsnorm_backward(t.dnormed, t.dec_pre_final, weights_.dec_final_ln, Nd, d, eps, false, t.dy_dec, s,
                              Ldec > 0 ? t.dout : nullptr, at_site(drop, 1, Ldec - 1, kFfOut));
  }

  kernels::AttentionGeometry self_g;
  self_g.kind = kernels::AttentionKind::DecoderSelf;
  self_g.heads = H;
  self_g.d_kv = dkv;
  self_g.n_seq = R;
  self_g.n_examples = B;
  self_g.q_len = Ld;
  self_g.k_len = Ld;
  self_g.bias_table = f.dec_bias;
  self_g.row_example = f.row_example;
  kernels::AttentionGeometry cross_g = self_g;
  cross_g.kind = kernels::AttentionKind::Cross;
  cross_g.k_len = Le;
  cross_g.bias_table = nullptr;
  cross_g.key_lengths = f.enc_lengths;
  cross_g.row_start = f.row_start;

  for (int l = Ldec - 1; l >= 0; --l) {
    const DecoderLayerWeights<T>& L = weights_.decoder[l];
    const IA3Layout::DecoderBlock& ia3 = layout_.decoder[l];
    ffn_backward(t, t.dy_dec, t.dec_x_ff[l], L.ln_ff, L.wi, L.wo, t.dec_ff_pre[l], Nd, dec_ix, ia3.ff, true,
                 n_adapters, at_site(drop, 1, l, kFfHidden), at_site(drop, 1, l, kCrossOut));

    // cross-attention: q from this layer, k|v from the encoder output (their gradient goes straight back
    // through this layer's k|v projection into the encoder output's gradient, summed over layers in dx_enc)
    gemm_.linear_backward<T, float>(t.dout, d, L.o_cross, inner, t.dctx, inner, Nd, d, inner, 1.f, 0.f);
    if (f.shape.folded_cross) {
      folded_cross_backward(t, l, at_site(drop, 1, l, kCrossProbs), l == Ldec - 1);
    } else {
      cross_g.dropout = at_site(drop, 1, l, kCrossProbs);
      const T* kv = f.kv_cross + static_cast<int64_t>(l) * 2 * inner;
      {
        Span span(profiler_, "decoder_attention_backward", s);
        kernels::attention_backward_query<T>(cross_g, t.dec_q_cross[l], inner, kv, kv + inner, kv_cols, t.dctx,
                                             dec_ix, ia3.cross_k, ia3.cross_v, t.dqkv, inner, t.g_k, t.g_v, t.stats, s);
      }
      {
        Span span(profiler_, "decoder_attention_backward", s);
        kernels::attention_backward_key<T>(cross_g, t.dec_q_cross[l], inner, kv, kv + inner, kv_cols, t.dctx,
                                           dec_ix, ia3.cross_k, ia3.cross_v, t.stats, t.dkv_cross,
                                           t.dkv_cross + inner, 2 * inner, s);
      }
      const T* w_kv = weights_.dec_kv_cross + static_cast<int64_t>(l) * 2 * inner * d;  // this layer's rows
      gemm_.linear_backward<T, float>(t.dkv_cross, 2 * inner, w_kv, d, t.dx_enc, d, Ne, 2 * inner, d, 1.f,
                                      l == Ldec - 1 ? 0.f : 1.f);
    }
    reduce_ia3(t, {t.g_k, ia3.cross_k}, {t.g_v, ia3.cross_v}, inner, true, n_adapters);
    gemm_.linear_backward<T, float>(t.dqkv, inner, L.q_cross, d, t.dnormed, d, Nd, inner, d, 1.f, 0.f);
    {
      Span span(profiler_, "rmsnorm", s);
      kernels::rmsnorm_backward(t.dnormed, t.dec_x_cross[l], L.ln_cross, Nd, d, eps, true, t.dy_dec, s, t.dout,
                                at_site(drop, 1, l, kSelfOut));
    }

    // causal self-attention
    gemm_.linear_backward<T, float>(t.dout, d, L.o, inner, t.dctx, inner, Nd, d, inner, 1.f, 0.f);
    self_g.dropout = at_site(drop, 1, l, kSelfProbs);
    const T* qkv = t.dec_qkv[l];
    {
      Span span(profiler_, "decoder_attention_backward", s);
      kernels::decoder_self_attention_backward<T>(self_g, qkv, 3 * inner, t.dctx, dec_ix, ia3.self_k, ia3.self_v,
                                                  t.dqkv, 3 * inner, t.g_k, t.g_v, t.stats, s);
    }
    reduce_ia3(t, {t.g_k, ia3.self_k}, {t.g_v, ia3.self_v}, inner, true, n_adapters);
    if (l == 0) break;  // below the first layer only the frozen embedding: no gradient through its q|k|v and norm
    gemm_.linear_backward<T, float>(t.dqkv, 3 * inner, L.qkv, d, t.dnormed, d, Nd, 3 * inner, d, 1.f, 0.f);
    {
      Span span(profiler_, "rmsnorm", s);
      kernels::rmsnorm_backward(t.dnormed, t.dec_x_self[l], L.ln_self, Nd, d, eps, true, t.dy_dec, s, t.dout,
                                at_site(drop, 1, l - 1, kFfOut));
    }
  }

  // encoder output: its gradient (summed in dx_enc by the cross-attention layers) through the final norm
  if (Ldec > 0) {
    TFEW_CUDA_CHECK(cudaMemcpyAsync(t.dnormed, t.dx_enc, sizeof(float) * Ne * d, cudaMemcpyDeviceToDevice, s));
  } else {
    TFEW_CUDA_CHECK(cudaMemsetAsync(t.dnormed, 0, sizeof(float) * Ne * d, s));
  }
  {
    Span span(profiler_, "dropout", s);
    kernels::dropout_inplace<float>(t.dnormed, static_cast<int64_t>(Ne) * d, at_site(drop, 0, 0, kFinal), s);
  }
  {
    Span span(profiler_, "rmsnorm", s);
    kernels::rmsnorm_backward(t.dnormed, t.enc_pre_final, weights_.enc_final_ln, Ne, d, eps, false, t.dx_enc, s,
                              Lenc > 0 ? t.dout : nullptr, at_site(drop, 0, Lenc - 1, kFfOut));
  }

  const int wi_cols = c.gated_gelu ? 2 * c.d_ff : c.d_ff;
  for (int l = Lenc - 1; l >= 0; --l) {
    const EncoderLayerWeights<T>& L = weights_.encoder[l];
    const IA3Layout::EncoderBlock& ia3 = layout_.encoder[l];
    if (t.recompute_ff_pre) {  // the wi projection of this layer, exactly as the forward computed it
      {
        Span span(profiler_, "rmsnorm", s);
        kernels::rmsnorm_forward(t.enc_x_ff[l], L.ln_ff, Ne, d, eps, 1.f, f.h_enc, s);
      }
      gemm_.linear<T, T>(f.h_enc, d, L.wi, d, t.enc_ff_pre[l], wi_cols, Ne, wi_cols, d, 0.f);
    }
    ffn_backward(t, t.dx_enc, t.enc_x_ff[l], L.ln_ff, L.wi, L.wo, t.enc_ff_pre[l], Ne, enc_ix, ia3.ff, false,
                 n_adapters, at_site(drop, 0, l, kFfHidden), at_site(drop, 0, l, kSelfOut));
    // dC straight as T (the attention backward's GEMM / WMMA operand; nothing reads it in fp32)
    gemm_.linear_backward<T, T>(t.dout, d, L.o, inner, t.dctx_t, inner, Ne, d, inner, 1.f, 0.f);
    if (t.recompute_qkv) {  // ... and its q|k|v projection
      {
        Span span(profiler_, "rmsnorm", s);
        kernels::rmsnorm_forward(t.enc_x_attn[l], L.ln_attn, Ne, d, eps, 1.f, f.h_enc, s);
      }
      gemm_.linear<T, T>(f.h_enc, d, L.qkv, d, t.enc_qkv[l], 3 * inner, Ne, 3 * inner, d, 0.f);
    }
    encoder_attention_backward(t, l, drop);
    reduce_ia3(t, {t.enc_sums_k, ia3.self_k}, {t.enc_sums_v, ia3.self_v}, inner, false, n_adapters);
    if (l == 0) break;  // (as in the decoder: the embedding below needs no gradient)
    gemm_.linear_backward<T, float>(t.dqkv, 3 * inner, L.qkv, d, t.dnormed, d, Ne, 3 * inner, d, 1.f, 0.f);
    {
      Span span(profiler_, "rmsnorm", s);
      kernels::rmsnorm_backward(t.dnormed, t.enc_x_attn[l], L.ln_attn, Ne, d, eps, true, t.dx_enc, s, t.dout,
                                at_site(drop, 0, l - 1, kFfOut));
    }
  }
}

// The folded cross-attention in training (folded_cross_products has the algebra): the products from
// the query scaled by l_k, saving what the backward needs, P (before dropout) and the context before l_v.
template <typename T>
void CudaEngine<T>::train_folded_cross_forward(const TrainPlan<T>& t, int layer, const kernels::DropoutSite& drop) {
  const Plan<T>& f = t.fwd;
  const int inner = config_.inner_dim(), Nd = f.shape.rows * f.shape.dec_len;
  const IA3Layout::DecoderBlock& ia3 = layout_.decoder[layer];
  const kernels::AdapterIndex ix = adapter_index(f, true);
  {
    Span span(profiler_, "ia3", stream_);
    kernels::ia3_scaled_columns_copy<T>(t.dec_q_cross[layer], inner, f.q_cross, inner, inner, Nd, ix, ia3.cross_k,
                                        stream_);
  }
  folded_cross_products(f, layer, drop, t.dec_cross_probs[layer], drop.rate > 0.f ? f.cross_probs : nullptr,
                        t.dec_cross_ctx[layer]);
  {
    Span span(profiler_, "ia3", stream_);
    kernels::ia3_scaled_columns_copy<T>(t.dec_cross_ctx[layer], inner, f.ctx_dec, inner, inner, Nd, ix, ia3.cross_v,
                                        stream_);
  }
}

// Its backward. Per example b (m = its (token, head) rows), head h, with Q~ = (l_k q) W_k,h (model space), P, P',
// E (the encoder output), X = P' E, U = X W_v,h^T and the context l_v U:
//   dU = l_v dC (g_v = U dC),  dX = dU W_v,h,  dE += P'^T dX,  dP' = dX E^T,  dS = softmax backward,
//   dE += dS^T Q~,  dQ~ = dS E,  d(l_k q) = dQ~ W_k,h^T  (dq = l_k d(l_k q), g_k = q d(l_k q)).
// Q~ is made again (one small product) instead of being kept per layer.
template <typename T>
void CudaEngine<T>::folded_cross_backward(const TrainPlan<T>& t, int layer, const kernels::DropoutSite& drop,
                                          bool first) {
  const T5Config& c = config_;
  const Plan<T>& f = t.fwd;
  cudaStream_t s = stream_;
  const int d = c.d_model, inner = c.inner_dim(), H = c.num_heads, dkv = c.d_kv;
  const int B = f.shape.batch, Le = f.shape.enc_len, Nd = f.shape.rows * f.shape.dec_len;
  const int m = Nd / B * H;
  const int ld = folded_cross_ld(Le);  // the score and probability rows' stride, as the forward's
  const int64_t m_d = static_cast<int64_t>(m) * d, m_le = static_cast<int64_t>(m) * ld,
                le_d = static_cast<int64_t>(Le) * d, dkv_d = static_cast<int64_t>(dkv) * d;
  const IA3Layout::DecoderBlock& ia3 = layout_.decoder[layer];
  const kernels::AdapterIndex ix = adapter_index(f, true);
  const kernels::Ia3Sums per_token{Nd, 1};
  const kernels::FoldedRows rows{H, f.shape.dec_len, ld};
  const T* w_k = weights_.dec_kv_cross + static_cast<int64_t>(layer) * 2 * inner * d;  // [inner, d]
  const T* w_v = w_k + static_cast<int64_t>(inner) * d;
  T* probs = t.dec_cross_probs[layer];  // P, then dS

  // l_v: dU (T, into t.dqkv) and the contributions U dC
  {
    Span span(profiler_, "ia3", s);
    kernels::ia3_kv_backward<T>(t.dec_cross_ctx[layer], inner, 0, -1, inner, Nd, ix, ia3.cross_v, 0, t.dctx, nullptr,
                                inner, t.dqkv, inner, per_token, t.g_v, nullptr, s);
  }
  gemm_.strided<T, T>(false, false, Nd, d, dkv, t.dqkv, inner, dkv, w_v, d, dkv_d, f.cross_dmodel, H * d, d, H);
  const T* probs_dropped = probs;
  if (drop.rate > 0.f) {
    {
      Span span(profiler_, "decoder_attention_backward", s);
      kernels::cross_probs_dropout<T>(probs, static_cast<int64_t>(Nd) * H, Le, drop, rows, f.cross_probs, s);
    }
    probs_dropped = f.cross_probs;
  }
  gemm_.strided<T, float>(true, false, Le, d, m, probs_dropped, ld, m_le, f.cross_dmodel, d, m_d, t.dx_enc, d, le_d, B,
                          first ? 0.f : 1.f);
  gemm_.strided<T, float>(false, true, m, Le, d, f.cross_dmodel, d, m_d, f.enc_out, d, le_d, f.cross_scores, ld, m_le,
                          B);
  {
    Span span(profiler_, "decoder_attention_backward", s);
    kernels::cross_softmax_folded_backward<T>(f.cross_scores, probs, f.enc_lengths, B, m, Le, drop, rows, s);
  }
  // Q~ again, then dE += dS^T Q~ and dQ~ = dS E (into the model-space gradient buffer, free again)
  {
    Span span(profiler_, "ia3", s);
    kernels::ia3_scaled_columns_copy<T>(t.dec_q_cross[layer], inner, f.q_cross, inner, inner, Nd, ix, ia3.cross_k, s);
  }
  gemm_.strided<T, T>(false, false, Nd, d, dkv, f.q_cross, inner, dkv, w_k, d, dkv_d, f.cross_model, H * d, d, H);
  gemm_.strided<T, float>(true, false, Le, d, m, probs, ld, m_le, f.cross_model, d, m_d, t.dx_enc, d, le_d, B, 1.f);
  gemm_.strided<T, T>(false, false, m, d, Le, probs, ld, m_le, f.enc_out, d, le_d, f.cross_dmodel, d, m_d, B);
  // d(l_k q) in fp32 (into t.dctx, read above), then l_k: dq (T, into t.dqkv) and the contributions q d(l_k q)
  gemm_.strided<T, float>(false, true, Nd, dkv, d, f.cross_dmodel, H * d, d, w_k, d, dkv_d, t.dctx, inner, dkv, H);
  {
    Span span(profiler_, "ia3", s);
    kernels::ia3_kv_backward<T>(t.dec_q_cross[layer], inner, 0, -1, inner, Nd, ix, ia3.cross_k, 0, t.dctx, nullptr,
                                inner, t.dqkv, inner, per_token, t.g_k, nullptr, s);
  }
}

// The encoder attention backward's pointer arrays, per (example, head) bh = b * H + h, into the staging copy of
// the inputs block (pack_inputs has filled the rest).
template <typename T>
void CudaEngine<T>::pack_backward_pointers(const TrainPlan<T>& t, bool dropout) {
  const Plan<T>& f = t.fwd;
  auto host_array = [&](const void* device_ptr) { return reinterpret_cast<const void**>(staged(f, device_ptr)); };
  const void** dc = host_array(f.bw_dc);
  const void** pd = host_array(f.bw_pd);
  const void** dq = host_array(f.bw_dq);
  const void** gk = host_array(f.bw_gk);
  const void** gv = host_array(f.bw_gv);
  const int B = f.shape.batch, Le = f.shape.enc_len, H = config_.num_heads;
  const int64_t inner = config_.inner_dim(), dkv = config_.d_kv, LL = static_cast<int64_t>(Le) * Le;
  const T* p_dropped = dropout ? t.probs_dropped : f.probs;  // without dropout P' is P
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h) {
      const int64_t bh = static_cast<int64_t>(b) * H + h, tok = static_cast<int64_t>(b) * Le;
      dc[bh] = t.dctx_t + tok * inner + h * dkv;
      pd[bh] = p_dropped + bh * LL;
      dq[bh] = t.dqkv + tok * 3 * inner + h * dkv;
      gk[bh] = t.g_k + tok * inner + h * dkv;
      gv[bh] = t.g_v + tok * inner + h * dkv;
    }
}

// Encoder self-attention backward of layer `layer` on tensor cores. From t.dctx_t (T, the gradient of the
// attention output) to t.dqkv (the gradient of the unscaled q|k|v, as T) and the (IA)3 contributions
// (t.enc_sums_k / _v). Nothing of the forward's attention is stored but (fused, with dropout) its mask as bits.
// Row-major, per (example, head), with K~ = l_k * K and V~ = l_v * V rounded to T as in the forward:
//   P = softmax(Q K~^T + bias), P' = dropout(P), C = P' V~          (forward)
//   dP' = dC V~^T, dS = P * (drop * dP' - D), D = rowsum(P * drop * dP') = rowsum(dC * C)
//   dQ = dS K~,  dK~ = dS^T Q,  dV~ = P'^T dC,  then dK = l_k * dK~, dV = l_v * dV~, g_k = K * dK~, g_v = V * dV~.
// bf16 (fused_backward_): flash-style kernels (kernels/attention_fused.cu) from C and the softmax statistics
// that the forward kept (Recompute::None) or a rerun of the fused forward makes; nothing [B, H, L, L] in memory,
// and their dkv kernel applies l_k, l_v and sums the (IA)3 contributions itself (no dK~, dV~ in fp32). Otherwise (fp32 mode, or where those
// kernels do not fit): the probabilities recomputed as the training forward made them (scaled copy of q|k|v,
// the scores GEMM, the softmax), then batched GEMMs per example over its heads around an elementwise softmax
// backward.
template <typename T>
void CudaEngine<T>::encoder_attention_backward(const TrainPlan<T>& t, int layer, const kernels::DropoutSite& drop) {
  const T5Config& c = config_;
  const Plan<T>& f = t.fwd;
  cudaStream_t s = stream_;
  const int inner = c.inner_dim(), H = c.num_heads, dkv = c.d_kv;
  const int B = f.shape.batch, Le = f.shape.enc_len, Ne = B * Le;
  const int ld = 3 * inner;
  const IA3Layout::EncoderBlock& ia3 = layout_.encoder[layer];
  const kernels::AdapterIndex ix = adapter_index(f, false);
  const kernels::DropoutSite probs_drop = at_site(drop, 0, layer, kSelfProbs);

  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    if (fused_backward_) {
      // the dropout mask: the forward's bits, or (q|k|v recomputed) made by this rerun into the shared buffer
      uint32_t* keep_bits = t.enc_keep_bits.empty() ? nullptr : t.enc_keep_bits[layer];
      // the forward's output and softmax statistics: kept by the forward, or made again here (the same kernel
      // on the same inputs: bit-identical)
      const __nv_bfloat16* attn_out = f.ctx_enc;
      float* stats = t.stats;
      if (t.attention_saved) {
        attn_out = t.enc_attn_out[layer];
        stats = t.enc_attn_stats[layer];
      } else {
        Span span(profiler_, "encoder_attention", s);
        kernels::fused_encoder_attention(t.enc_qkv[layer], inner, dkv, B, H, Le, f.enc_bias, f.enc_lengths, ix,
                                         ia3.self_k, ia3.self_v, probs_drop, f.ctx_enc, s, t.stats,
                                         kernels::KeepBits{keep_bits, !t.keep_bits_saved});
      }
      {
        Span span(profiler_, "encoder_attention_backward", s);
        kernels::fused_encoder_attention_backward(t.enc_qkv[layer], inner, dkv, B, H, Le, f.enc_bias, f.enc_lengths,
                                                  ix, ia3.self_k, ia3.self_v, probs_drop, keep_bits, t.dctx_t,
                                                  attn_out, stats, t.dqkv, ld, t.enc_sums, t.enc_sums_k,
                                                  t.enc_sums_v, s);
      }
      return;  // (its dkv kernel wrote dK, dV and the (IA)3 sums: ia3_kv_backward's work below)
    }
  }
  // the forward's probabilities, without (f.probs) and with (t.probs_dropped) dropout
  {
    Span span(profiler_, "ia3", s);
    kernels::ia3_scaled_qkv_copy<T>(t.enc_qkv[layer], f.qkv_enc, ld, inner, Ne, ix, ia3.self_k, ia3.self_v, s);
  }
  gemm_.attention_scores<T>(f.qk_k, f.qk_q, f.qk_s, ld, Le, dkv, B * H);
  if (probs_drop.rate > 0.f)
    {
      Span span(profiler_, "softmax", s);
      kernels::encoder_softmax_pair<T>(f.scores, f.enc_bias, f.enc_lengths, B, H, Le, probs_drop, f.probs,
                                       t.probs_dropped, s);
    }
  else  // without dropout P' is P: the pointer arrays point at f.probs
    {
      Span span(profiler_, "softmax", s);
      kernels::encoder_softmax<T>(f.scores, f.enc_bias, f.enc_lengths, B, H, Le, kNoDropout, f.probs, s);
    }
  // One batched GEMM over every (example, head) each; the pointer arrays: pack_backward_pointers.
  // dV~ = P'^T dC (before f.probs turns into dS); dP' (fp32, into the scores buffer) = dC V~^T
  gemm_.batched<T, float>(true, false, Le, dkv, Le, f.bw_pd, Le, f.bw_dc, inner, f.bw_gv, inner, B * H);
  gemm_.batched<T, float>(false, true, Le, Le, dkv, f.bw_dc, inner, f.pv_v, ld, f.qk_s, Le, B * H);
  {
    Span span(profiler_, "softmax", s);
    kernels::encoder_softmax_backward<T>(f.scores, f.probs, f.enc_lengths, B, H, Le, probs_drop, s);
  }  // f.probs: dS
  // dQ = dS K~ (Q is not scaled), dK~ = dS^T Q
  gemm_.batched<T, T>(false, false, Le, dkv, Le, f.pv_p, Le, f.qk_k, ld, f.bw_dq, ld, B * H);
  gemm_.batched<T, float>(true, false, Le, dkv, Le, f.pv_p, Le, f.qk_q, ld, f.bw_gk, inner, B * H);
  {
    Span span(profiler_, "ia3", s);
    kernels::ia3_kv_backward<T>(t.enc_qkv[layer], ld, inner, 2 * inner, inner, Ne, ix, ia3.self_k, ia3.self_v, t.g_k,
                                t.g_v, inner, t.dqkv, ld, t.enc_sums, t.enc_sums_k, t.enc_sums_v, s);
  }
}

template LossOutput CudaEngine<float>::train_unlocked(const Batch&, const AdapterSet&, const LossOptions&);
template LossOutput CudaEngine<__nv_bfloat16>::train_unlocked(const Batch&, const AdapterSet&, const LossOptions&);
// used by the device training sessions (cuda_session.cc)
template float* CudaEngine<float>::train_to_device(const Batch&, int, const LossOptions&);
template float* CudaEngine<__nv_bfloat16>::train_to_device(const Batch&, int, const LossOptions&);
template void CudaEngine<float>::read_train_results(LossOutput&, bool);
template void CudaEngine<__nv_bfloat16>::read_train_results(LossOutput&, bool);

}  // namespace gpu
}  // namespace tfew
