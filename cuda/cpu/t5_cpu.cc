// The CPU reference engine: the whole T5 encoder-decoder forward with (IA)3, rank-classification scoring, the
// T-Few losses, and the backward pass to the (IA)3 vectors, in fp32. It follows HF transformers' T5 and
// T-Few's EncoderDecoder step by step (tfew-spec.md §1, §3) and is the oracle for the CUDA backend.
//
// Data flow for one batch (see model/batch.h):
//   encoder: every example once -> enc_out [B, Le, d]
//   decoder: every choice row r reads its example's encoder output (cross-attention K/V computed once per
//            example and shared by its rows) -> logits [R, Ld, V] -> log p of each target token
//   losses:  LM over gold rows, UL over wrong rows, LN over length-normalised row scores of each example
//   backward: the same path in reverse, accumulating d loss / d (IA)3 vector per adapter.
#include <cmath>
#include <cstring>
#include <sstream>

#include "core/errors.h"
#include "io/mapped_file.h"
#include "cpu_ops.h"
#include "model/engine.h"
#include "scratch.h"

namespace tfew {
namespace {

using cpu::AttentionShape;
using Vec = cpu::FloatBuffer;  // (large blocks reused between calls: scratch.h)

struct AttentionWeights {
  Vec q, k, v, o;  // [inner, d] x3, [d, inner]
};
struct FfnWeights {
  Vec wi0, wi1, wo;  // wi0 = wi for relu; wi1 unused then
};
struct EncoderBlock {
  Vec ln_self, ln_ff;
  AttentionWeights self;
  FfnWeights ff;
};
struct DecoderBlock {
  Vec ln_self, ln_cross, ln_ff;
  AttentionWeights self, cross;
  FfnWeights ff;
};

// What the backward pass needs from each sub-layer's forward.
struct AttentionCache {
  Vec x_in, inv_rms, q, k_raw, v_raw, k, v, probs;
};
struct FfnCache {
  Vec x_in, inv_rms, h0, h1, hidden;  // hidden: activation before the (IA)3 scale
};
// Cross-attention keys and values of one decoder layer: computed from the encoder output once per example
// (not per choice row) and read by all of the example's rows.
struct CrossKV {
  Vec k_raw, v_raw, k, v;  // [B, Le, inner]
};

// Dropout sites: a distinct id per place dropout happens, so masks never repeat between places.
enum Site : uint64_t {
  kEmbed = 1, kSelfProbs, kSelfOut, kCrossProbs, kCrossOut, kFfHidden, kFfOut, kFinal
};
uint64_t site_id(int stack, int layer, Site s) { return (static_cast<uint64_t>(stack) * 4096 + layer) * 16 + s; }

class CpuEngine : public Engine {
 public:
  CpuEngine(const T5Config& c, const WeightSource& ws, int threads)
      : cfg_(c), layout_(IA3Layout::make(c)), pool_(threads > 0 ? threads : 1) {
    load_weights(ws);
  }

  const char* device() const override { return "cpu"; }
  const char* precision() const override { return "fp32"; }
  const T5Config& config() const override { return cfg_; }
  std::string describe() const override {
    std::ostringstream o;
    o << "cpu (fp32 reference backend, " << pool_.size() << " threads, " << cpu::linear_simd() << " kernels)";
    return o.str();
  }

  ScoreOutput score(const Batch& batch, const AdapterSet& adapters, bool want_logits, bool want_encoder) override {
    check_alive();
    validate(batch, adapters, false);
    cpu::scratch_new_call();
    Pass pass(batch, adapters, /*train=*/false, 0);
    forward(pass);
    ScoreOutput out;
    out.token_logp.assign(pass.token_logp.begin(), pass.token_logp.end());
    if (want_logits) out.logits.assign(pass.logits.begin(), pass.logits.end());
    if (want_encoder) out.encoder_hidden.assign(pass.enc_out.begin(), pass.enc_out.end());
    return out;
  }

  LossOutput loss_and_gradients(const Batch& batch, const AdapterSet& adapters, const LossOptions& opt) override {
    check_alive();
    validate(batch, adapters, true);
    cpu::scratch_new_call();
    Pass pass(batch, adapters, /*train=*/true, opt.dropout ? opt.seed : 0);
    pass.dropout = opt.dropout ? cfg_.dropout_rate : 0.f;
    forward(pass);
    cpu::TFewLossInput li{pass.token_logp.data(), pass.targets.data(), batch.num_rows, batch.dec_len,
                          cfg_.pad_token_id, batch.row_start.data(), batch.labels.data(), batch.batch_size,
                          opt.lm_weight, opt.ul_weight, opt.ln_weight};
    cpu::TFewLossOutput lo = cpu::tfew_losses(li);
    LossOutput out;
    out.lm_loss = lo.lm;
    out.ul_loss = lo.ul;
    out.ln_loss = lo.ln;
    out.total_loss = lo.total;
    Vec gradients(adapters.vectors.size() * layout_.total, 0.f);
    backward(pass, lo.dtoken_logp, gradients);
    out.gradients.assign(gradients.begin(), gradients.end());
    out.token_logp.assign(pass.token_logp.begin(), pass.token_logp.end());
    return out;
  }

  void merge_adapter(const float* l) override {
    check_alive();
    auto scale_rows = [](Vec& w, const float* s, int rows, int cols) {
      for (int r = 0; r < rows; ++r)
        for (int c = 0; c < cols; ++c) w[static_cast<int64_t>(r) * cols + c] *= s[r];
    };
    auto scale_cols = [](Vec& w, const float* s, int rows, int cols) {
      for (int r = 0; r < rows; ++r)
        for (int c = 0; c < cols; ++c) w[static_cast<int64_t>(r) * cols + c] *= s[c];
    };
    const int d = cfg_.d_model, inner = cfg_.inner_dim(), ff = cfg_.d_ff;
    for (int i = 0; i < cfg_.num_layers; ++i) {
      auto& b = enc_[i];
      const auto& o = layout_.encoder[i];
      scale_rows(b.self.k, l + o.self_k, inner, d);
      scale_rows(b.self.v, l + o.self_v, inner, d);
      scale_cols(b.ff.wo, l + o.ff, d, ff);
    }
    for (int i = 0; i < cfg_.num_decoder_layers; ++i) {
      auto& b = dec_[i];
      const auto& o = layout_.decoder[i];
      scale_rows(b.self.k, l + o.self_k, inner, d);
      scale_rows(b.self.v, l + o.self_v, inner, d);
      scale_rows(b.cross.k, l + o.cross_k, inner, d);
      scale_rows(b.cross.v, l + o.cross_v, inner, d);
      scale_cols(b.ff.wo, l + o.ff, d, ff);
    }
  }

  void release() override {
    released_ = true;
    enc_.clear();
    dec_.clear();
    enc_.shrink_to_fit();
    dec_.shrink_to_fit();
    Vec().swap(enc_embed_);
    Vec().swap(dec_embed_);
    Vec().swap(head_);
    cpu::scratch_trim();  // (the weights' blocks too: dispose() gives the memory back)
  }

 private:
  // Everything one forward (and its backward) produces, for one batch.
  struct Pass {
    const Batch& batch;
    const AdapterSet& adapters;
    bool train;
    uint64_t seed;
    float dropout = 0.f;
    std::vector<int32_t> dec_in, targets, row_example, dec_len_all;
    Vec enc_bias, dec_bias;
    std::vector<AttentionCache> enc_attn, dec_self, dec_cross;
    std::vector<FfnCache> enc_ff, dec_ff;
    std::vector<CrossKV> cross_kv;
    Vec enc_pre_final, enc_final_inv, enc_out;
    Vec dec_pre_final, dec_final_inv, dec_out, logits, token_logp;
    Pass(const Batch& b, const AdapterSet& a, bool t, uint64_t s) : batch(b), adapters(a), train(t), seed(s) {}
  };

  void check_alive() const {
    if (released_) fail(ErrorCode::Disposed, "the model has been disposed");
  }

  Vec load(const WeightSource& ws, const std::string& name, std::vector<int64_t> shape) {
    TensorView t = ws.get(name, shape);
    Vec v(static_cast<size_t>(t.numel()));
    read_mapped(t.name, [&] { convert_to_f32(t, 0, t.numel(), v.data()); });
    return v;
  }

  void load_attention(const WeightSource& ws, const std::string& p, AttentionWeights& a) {
    const int64_t d = cfg_.d_model, inner = cfg_.inner_dim();
    a.q = load(ws, p + ".q.weight", {inner, d});
    a.k = load(ws, p + ".k.weight", {inner, d});
    a.v = load(ws, p + ".v.weight", {inner, d});
    a.o = load(ws, p + ".o.weight", {d, inner});
  }

  void load_ffn(const WeightSource& ws, const std::string& p, FfnWeights& f) {
    const int64_t d = cfg_.d_model, ff = cfg_.d_ff;
    if (cfg_.gated_gelu) {
      f.wi0 = load(ws, p + ".wi_0.weight", {ff, d});
      f.wi1 = load(ws, p + ".wi_1.weight", {ff, d});
    } else {
      f.wi0 = load(ws, p + ".wi.weight", {ff, d});
    }
    f.wo = load(ws, p + ".wo.weight", {d, ff});
  }

  void load_weights(const WeightSource& ws) {
    const int64_t d = cfg_.d_model, V = cfg_.vocab_size;
    // The encoder and decoder embeddings are usually the same tensor as shared.weight, but an untied
    // checkpoint may carry its own encoder/decoder.embed_tokens (the T0-layout fixture does).
    auto embed_name = [&](const char* name) { return ws.has(name) ? std::string(name) : std::string("shared.weight"); };
    std::string enc_name = embed_name("encoder.embed_tokens.weight"), dec_name = embed_name("decoder.embed_tokens.weight");
    enc_embed_ = load(ws, enc_name, {V, d});
    if (ws.get(dec_name, {V, d}).data == ws.get(enc_name, {V, d}).data) dec_embed_shared_ = true;
    else dec_embed_ = load(ws, dec_name, {V, d});
    head_ = cfg_.tied_head ? load(ws, "shared.weight", {V, d}) : load(ws, "lm_head.weight", {V, d});
    enc_bias_table_ = load(ws, "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                           {cfg_.num_buckets, cfg_.num_heads});
    dec_bias_table_ = load(ws, "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                           {cfg_.num_buckets, cfg_.num_heads});
    enc_.resize(cfg_.num_layers);
    for (int i = 0; i < cfg_.num_layers; ++i) {
      std::string p = "encoder.block." + std::to_string(i) + ".layer.";
      enc_[i].ln_self = load(ws, p + "0.layer_norm.weight", {d});
      load_attention(ws, p + "0.SelfAttention", enc_[i].self);
      enc_[i].ln_ff = load(ws, p + "1.layer_norm.weight", {d});
      load_ffn(ws, p + "1.DenseReluDense", enc_[i].ff);
    }
    dec_.resize(cfg_.num_decoder_layers);
    for (int i = 0; i < cfg_.num_decoder_layers; ++i) {
      std::string p = "decoder.block." + std::to_string(i) + ".layer.";
      dec_[i].ln_self = load(ws, p + "0.layer_norm.weight", {d});
      load_attention(ws, p + "0.SelfAttention", dec_[i].self);
      dec_[i].ln_cross = load(ws, p + "1.layer_norm.weight", {d});
      load_attention(ws, p + "1.EncDecAttention", dec_[i].cross);
      dec_[i].ln_ff = load(ws, p + "2.layer_norm.weight", {d});
      load_ffn(ws, p + "2.DenseReluDense", dec_[i].ff);
    }
    enc_final_ln_ = load(ws, "encoder.final_layer_norm.weight", {d});
    dec_final_ln_ = load(ws, "decoder.final_layer_norm.weight", {d});
  }

  void validate(const Batch& b, const AdapterSet& a, bool need_labels) const {
    TFEW_CHECK_ARG(b.batch_size > 0 && b.enc_len > 0 && b.num_rows > 0 && b.dec_len > 0, "empty batch");
    TFEW_CHECK_ARG(b.input_ids.size() == static_cast<size_t>(b.batch_size) * b.enc_len, "input_ids has the wrong size");
    TFEW_CHECK_ARG(b.enc_lengths.size() == static_cast<size_t>(b.batch_size), "enc_lengths has the wrong size");
    TFEW_CHECK_ARG(b.choice_ids.size() == static_cast<size_t>(b.num_rows) * b.dec_len, "choice_ids has the wrong size");
    TFEW_CHECK_ARG(b.row_start.size() == static_cast<size_t>(b.batch_size) + 1 && b.row_start[0] == 0 &&
                       b.row_start[b.batch_size] == b.num_rows,
                   "row_start must run from 0 to the number of choice rows");
    TFEW_CHECK_ARG(b.adapter_of_example.size() == static_cast<size_t>(b.batch_size), "adapter_of_example has the wrong size");
    for (int i = 0; i < b.batch_size; ++i) {
      TFEW_CHECK_ARG(b.row_start[i + 1] > b.row_start[i], "every example needs at least one answer choice");
      TFEW_CHECK_ARG(b.enc_lengths[i] >= 1 && b.enc_lengths[i] <= b.enc_len, "every input needs at least one token");
      int ad = b.adapter_of_example[i];
      TFEW_CHECK_ARG(ad >= -1 && ad < static_cast<int>(a.vectors.size()), "adapter index out of range");
    }
    for (int32_t id : b.input_ids)
      TFEW_CHECK_ARG(id >= 0 && id < cfg_.vocab_size, "token id " + std::to_string(id) + " is outside the vocabulary (size " + std::to_string(cfg_.vocab_size) + ")");
    for (int32_t id : b.choice_ids)
      TFEW_CHECK_ARG(id >= 0 && id < cfg_.vocab_size, "token id " + std::to_string(id) + " is outside the vocabulary (size " + std::to_string(cfg_.vocab_size) + ")");
    if (need_labels) {
      TFEW_CHECK_ARG(b.labels.size() == static_cast<size_t>(b.batch_size), "labels are needed, one per example");
      for (int i = 0; i < b.batch_size; ++i)
        TFEW_CHECK_ARG(b.labels[i] >= 0 && b.labels[i] < b.row_start[i + 1] - b.row_start[i],
                       "label " + std::to_string(b.labels[i]) + " of example " + std::to_string(i) + " is not one of its choices");
    }
  }

  // Per-token pointers into the adapters (null: no adapter) for the vector at layout offset `off`.
  std::vector<const float*> token_scale(const Pass& p, int64_t off, bool decoder_rows, int len) const {
    int n_seq = decoder_rows ? p.batch.num_rows : p.batch.batch_size;
    std::vector<const float*> s(static_cast<size_t>(n_seq) * len, nullptr);
    for (int q = 0; q < n_seq; ++q) {
      int ex = decoder_rows ? p.row_example[q] : q;
      int a = p.batch.adapter_of_example[ex];
      if (a < 0) continue;
      for (int t = 0; t < len; ++t) s[static_cast<size_t>(q) * len + t] = p.adapters.vectors[a] + off;
    }
    return s;
  }
  std::vector<float*> token_grad(const Pass& p, Vec& grads, int64_t off, bool decoder_rows, int len) const {
    int n_seq = decoder_rows ? p.batch.num_rows : p.batch.batch_size;
    std::vector<float*> s(static_cast<size_t>(n_seq) * len, nullptr);
    for (int q = 0; q < n_seq; ++q) {
      int ex = decoder_rows ? p.row_example[q] : q;
      int a = p.batch.adapter_of_example[ex];
      if (a < 0) continue;
      for (int t = 0; t < len; ++t) s[static_cast<size_t>(q) * len + t] = grads.data() + a * layout_.total + off;
    }
    return s;
  }

  void drop(Pass& p, float* x, int64_t n, uint64_t site) {
    if (p.train && p.dropout > 0.f) cpu::dropout_forward(pool_, x, n, p.dropout, p.seed, site);
  }
  void drop_back(Pass& p, float* dx, int64_t n, uint64_t site) {
    if (p.train && p.dropout > 0.f) cpu::dropout_backward(pool_, dx, n, p.dropout, p.seed, site);
  }

  // ---------------- forward ----------------

  // Self-attention sub-layer: x += drop(o(attn(norm(x)))). Saves what backward needs in c.
  void self_attention_forward(Pass& p, Vec& x, const Vec& ln, const AttentionWeights& w, AttentionCache& c,
                              int n_seq, int len, const int32_t* key_len, const float* bias, bool causal,
                              int64_t off_k, int64_t off_v, bool decoder_rows, int stack, int layer) {
    const int d = cfg_.d_model, inner = cfg_.inner_dim();
    const int64_t n = static_cast<int64_t>(n_seq) * len;
    c.x_in = x;
    c.inv_rms.resize(n);
    Vec normed(n * d);
    cpu::rmsnorm_forward(x.data(), ln.data(), normed.data(), c.inv_rms.data(), n, d, cfg_.layer_norm_eps);
    c.q.resize(n * inner);
    c.k_raw.resize(n * inner);
    c.v_raw.resize(n * inner);
    c.k.resize(n * inner);
    c.v.resize(n * inner);
    cpu::linear_forward(pool_, normed.data(), w.q.data(), c.q.data(), n, d, inner);
    cpu::linear_forward(pool_, normed.data(), w.k.data(), c.k_raw.data(), n, d, inner);
    cpu::linear_forward(pool_, normed.data(), w.v.data(), c.v_raw.data(), n, d, inner);
    cpu::ia3_scale_forward(c.k_raw.data(), token_scale(p, off_k, decoder_rows, len), c.k.data(), n, inner);
    cpu::ia3_scale_forward(c.v_raw.data(), token_scale(p, off_v, decoder_rows, len), c.v.data(), n, inner);
    AttentionShape s{n_seq, cfg_.num_heads, cfg_.d_kv, len, len, causal};
    c.probs.resize(static_cast<size_t>(n_seq) * cfg_.num_heads * len * len);
    Vec attn(n * inner), out(n * d);
    cpu::attention_forward(pool_, s, c.q.data(), c.k.data(), c.v.data(), nullptr, key_len, bias,
                           p.train ? p.dropout : 0.f, p.seed, site_id(stack, layer, kSelfProbs), c.probs.data(),
                           attn.data());
    cpu::linear_forward(pool_, attn.data(), w.o.data(), out.data(), n, inner, d);
    drop(p, out.data(), n * d, site_id(stack, layer, kSelfOut));
    for (int64_t i = 0; i < n * d; ++i) x[i] += out[i];
  }

  void ffn_forward(Pass& p, Vec& x, const Vec& ln, const FfnWeights& w, FfnCache& c, int64_t n, int64_t off_ff,
                   bool decoder_rows, int len, int stack, int layer) {
    const int d = cfg_.d_model, ff = cfg_.d_ff;
    c.x_in = x;
    c.inv_rms.resize(n);
    Vec normed(n * d);
    cpu::rmsnorm_forward(x.data(), ln.data(), normed.data(), c.inv_rms.data(), n, d, cfg_.layer_norm_eps);
    c.h0.resize(n * ff);
    cpu::linear_forward(pool_, normed.data(), w.wi0.data(), c.h0.data(), n, d, ff);
    if (cfg_.gated_gelu) {
      c.h1.resize(n * ff);
      cpu::linear_forward(pool_, normed.data(), w.wi1.data(), c.h1.data(), n, d, ff);
    }
    c.hidden.resize(n * ff);
    cpu::ffn_activation_forward(pool_, c.h0.data(), c.h1.data(), cfg_.gated_gelu, n, ff, c.hidden.data());
    Vec scaled(n * ff), out(n * d);
    cpu::ia3_scale_forward(c.hidden.data(), token_scale(p, off_ff, decoder_rows, len), scaled.data(), n, ff);
    drop(p, scaled.data(), n * ff, site_id(stack, layer, kFfHidden));
    cpu::linear_forward(pool_, scaled.data(), w.wo.data(), out.data(), n, ff, d);
    drop(p, out.data(), n * d, site_id(stack, layer, kFfOut));
    for (int64_t i = 0; i < n * d; ++i) x[i] += out[i];
  }

  void forward(Pass& p) {
    const Batch& b = p.batch;
    const int d = cfg_.d_model, inner = cfg_.inner_dim(), B = b.batch_size, Le = b.enc_len, R = b.num_rows,
              Ld = b.dec_len, H = cfg_.num_heads;
    const int64_t Ne = static_cast<int64_t>(B) * Le, Nd = static_cast<int64_t>(R) * Ld;
    const int layers_kept_enc = p.train ? cfg_.num_layers : 1, layers_kept_dec = p.train ? cfg_.num_decoder_layers : 1;

    // ---- encoder ----
    p.enc_bias.resize(static_cast<size_t>(H) * Le * Le);
    cpu::position_bias(enc_bias_table_.data(), H, Le, Le, true, cfg_.num_buckets, cfg_.max_distance, p.enc_bias.data());
    Vec x(Ne * d);
    cpu::embedding_forward(b.input_ids.data(), enc_embed_.data(), x.data(), Ne, d);
    drop(p, x.data(), Ne * d, site_id(0, 0, kEmbed));
    p.enc_attn.resize(layers_kept_enc);
    p.enc_ff.resize(layers_kept_enc);
    for (int i = 0; i < cfg_.num_layers; ++i) {
      int slot = p.train ? i : 0;
      self_attention_forward(p, x, enc_[i].ln_self, enc_[i].self, p.enc_attn[slot], B, Le, b.enc_lengths.data(),
                             p.enc_bias.data(), false, layout_.encoder[i].self_k, layout_.encoder[i].self_v, false, 0, i);
      ffn_forward(p, x, enc_[i].ln_ff, enc_[i].ff, p.enc_ff[slot], Ne, layout_.encoder[i].ff, false, Le, 0, i);
    }
    p.enc_pre_final = x;
    p.enc_final_inv.resize(Ne);
    p.enc_out.resize(Ne * d);
    cpu::rmsnorm_forward(x.data(), enc_final_ln_.data(), p.enc_out.data(), p.enc_final_inv.data(), Ne, d,
                         cfg_.layer_norm_eps);
    drop(p, p.enc_out.data(), Ne * d, site_id(0, 0, kFinal));

    // ---- decoder over all choice rows ----
    p.row_example.resize(R);
    for (int bi = 0; bi < B; ++bi)
      for (int r = b.row_start[bi]; r < b.row_start[bi + 1]; ++r) p.row_example[r] = bi;
    p.targets = b.choice_ids;
    p.dec_in.resize(Nd);
    for (int r = 0; r < R; ++r) {
      p.dec_in[static_cast<int64_t>(r) * Ld] = cfg_.decoder_start_token_id;
      for (int t = 1; t < Ld; ++t) p.dec_in[static_cast<int64_t>(r) * Ld + t] = b.choice_ids[static_cast<int64_t>(r) * Ld + t - 1];
    }
    std::vector<int32_t> dec_key_len(R, Ld), enc_key_len(R);
    for (int r = 0; r < R; ++r) enc_key_len[r] = b.enc_lengths[p.row_example[r]];
    p.dec_bias.resize(static_cast<size_t>(H) * Ld * Ld);
    cpu::position_bias(dec_bias_table_.data(), H, Ld, Ld, false, cfg_.num_buckets, cfg_.max_distance, p.dec_bias.data());

    Vec y(Nd * d);
    cpu::embedding_forward(p.dec_in.data(), dec_embed_shared_ ? enc_embed_.data() : dec_embed_.data(), y.data(), Nd, d);
    drop(p, y.data(), Nd * d, site_id(1, 0, kEmbed));
    p.dec_self.resize(layers_kept_dec);
    p.dec_cross.resize(layers_kept_dec);
    p.dec_ff.resize(layers_kept_dec);
    p.cross_kv.resize(layers_kept_dec);
    for (int i = 0; i < cfg_.num_decoder_layers; ++i) {
      int slot = p.train ? i : 0;
      const auto& off = layout_.decoder[i];
      self_attention_forward(p, y, dec_[i].ln_self, dec_[i].self, p.dec_self[slot], R, Ld, dec_key_len.data(),
                             p.dec_bias.data(), true, off.self_k, off.self_v, true, 1, i);
      // cross-attention: K/V from the encoder output, once per example, shared by its rows
      {
        AttentionCache& c = p.dec_cross[slot];
        CrossKV& kv = p.cross_kv[slot];
        c.x_in = y;
        c.inv_rms.resize(Nd);
        Vec normed(Nd * d);
        cpu::rmsnorm_forward(y.data(), dec_[i].ln_cross.data(), normed.data(), c.inv_rms.data(), Nd, d, cfg_.layer_norm_eps);
        c.q.resize(Nd * inner);
        cpu::linear_forward(pool_, normed.data(), dec_[i].cross.q.data(), c.q.data(), Nd, d, inner);
        kv.k_raw.resize(Ne * inner);
        kv.v_raw.resize(Ne * inner);
        kv.k.resize(Ne * inner);
        kv.v.resize(Ne * inner);
        cpu::linear_forward(pool_, p.enc_out.data(), dec_[i].cross.k.data(), kv.k_raw.data(), Ne, d, inner);
        cpu::linear_forward(pool_, p.enc_out.data(), dec_[i].cross.v.data(), kv.v_raw.data(), Ne, d, inner);
        cpu::ia3_scale_forward(kv.k_raw.data(), token_scale(p, off.cross_k, false, Le), kv.k.data(), Ne, inner);
        cpu::ia3_scale_forward(kv.v_raw.data(), token_scale(p, off.cross_v, false, Le), kv.v.data(), Ne, inner);
        AttentionShape s{R, H, cfg_.d_kv, Ld, Le, false};
        c.probs.resize(static_cast<size_t>(R) * H * Ld * Le);
        Vec attn(Nd * inner), out(Nd * d);
        cpu::attention_forward(pool_, s, c.q.data(), kv.k.data(), kv.v.data(), p.row_example.data(), enc_key_len.data(),
                               nullptr, p.train ? p.dropout : 0.f, p.seed, site_id(1, i, kCrossProbs), c.probs.data(),
                               attn.data());
        cpu::linear_forward(pool_, attn.data(), dec_[i].cross.o.data(), out.data(), Nd, inner, d);
        drop(p, out.data(), Nd * d, site_id(1, i, kCrossOut));
        for (int64_t j = 0; j < Nd * d; ++j) y[j] += out[j];
      }
      ffn_forward(p, y, dec_[i].ln_ff, dec_[i].ff, p.dec_ff[slot], Nd, off.ff, true, Ld, 1, i);
    }
    p.dec_pre_final = y;
    p.dec_final_inv.resize(Nd);
    p.dec_out.resize(Nd * d);
    cpu::rmsnorm_forward(y.data(), dec_final_ln_.data(), p.dec_out.data(), p.dec_final_inv.data(), Nd, d,
                         cfg_.layer_norm_eps);
    drop(p, p.dec_out.data(), Nd * d, site_id(1, 0, kFinal));

    // ---- head and per-token log-probs ----
    const float head_scale = cfg_.scale_decoder_outputs ? 1.f / std::sqrt(static_cast<float>(d)) : 1.f;
    Vec head_in(p.dec_out);
    if (head_scale != 1.f)
      for (auto& v : head_in) v *= head_scale;
    const Vec& head = head_;
    p.logits.resize(Nd * cfg_.vocab_size);
    cpu::linear_forward(pool_, head_in.data(), head.data(), p.logits.data(), Nd, d, cfg_.vocab_size);
    p.token_logp.resize(Nd);
    cpu::log_softmax_gather(pool_, p.logits.data(), p.targets.data(), Nd, cfg_.vocab_size, cfg_.pad_token_id,
                            p.token_logp.data());
  }

  // ---------------- backward ----------------

  // dx holds d loss / d (output of the sub-layer's residual add); on return d loss / d (its input), unless
  // to_input is false (the first layer: below it only the frozen embedding, so only the (IA)3 gradients are made).
  void self_attention_backward(Pass& p, Vec& dx, const Vec& ln, const AttentionWeights& w, const AttentionCache& c,
                               int n_seq, int len, const int32_t* key_len, bool causal, int64_t off_k, int64_t off_v,
                               bool decoder_rows, int stack, int layer, Vec& grads, bool to_input) {
    const int d = cfg_.d_model, inner = cfg_.inner_dim();
    const int64_t n = static_cast<int64_t>(n_seq) * len;
    Vec dout(dx);
    drop_back(p, dout.data(), n * d, site_id(stack, layer, kSelfOut));
    Vec dattn(n * inner);
    cpu::linear_backward_input(pool_, dout.data(), w.o.data(), dattn.data(), n, inner, d, false);
    Vec dq(n * inner), dk(n * inner, 0.f), dv(n * inner, 0.f);
    AttentionShape s{n_seq, cfg_.num_heads, cfg_.d_kv, len, len, causal};
    cpu::attention_backward(pool_, s, c.q.data(), c.k.data(), c.v.data(), nullptr, key_len, c.probs.data(),
                            p.train ? p.dropout : 0.f, p.seed, site_id(stack, layer, kSelfProbs), dattn.data(),
                            dq.data(), dk.data(), dv.data());
    cpu::ia3_scale_backward(dk.data(), c.k_raw.data(), token_scale(p, off_k, decoder_rows, len),
                            token_grad(p, grads, off_k, decoder_rows, len), dk.data(), n, inner);
    cpu::ia3_scale_backward(dv.data(), c.v_raw.data(), token_scale(p, off_v, decoder_rows, len),
                            token_grad(p, grads, off_v, decoder_rows, len), dv.data(), n, inner);
    if (!to_input) return;
    Vec dnormed(n * d);
    cpu::linear_backward_input(pool_, dq.data(), w.q.data(), dnormed.data(), n, d, inner, false);
    cpu::linear_backward_input(pool_, dk.data(), w.k.data(), dnormed.data(), n, d, inner, true);
    cpu::linear_backward_input(pool_, dv.data(), w.v.data(), dnormed.data(), n, d, inner, true);
    cpu::rmsnorm_backward(dnormed.data(), c.x_in.data(), ln.data(), c.inv_rms.data(), dx.data(), n, d, true);
  }

  void ffn_backward(Pass& p, Vec& dx, const Vec& ln, const FfnWeights& w, const FfnCache& c, int64_t n, int64_t off_ff,
                    bool decoder_rows, int len, int stack, int layer, Vec& grads) {
    const int d = cfg_.d_model, ff = cfg_.d_ff;
    Vec dout(dx);
    drop_back(p, dout.data(), n * d, site_id(stack, layer, kFfOut));
    Vec dscaled(n * ff);
    cpu::linear_backward_input(pool_, dout.data(), w.wo.data(), dscaled.data(), n, ff, d, false);
    drop_back(p, dscaled.data(), n * ff, site_id(stack, layer, kFfHidden));
    Vec dhidden(n * ff);
    cpu::ia3_scale_backward(dscaled.data(), c.hidden.data(), token_scale(p, off_ff, decoder_rows, len),
                            token_grad(p, grads, off_ff, decoder_rows, len), dhidden.data(), n, ff);
    Vec dh0(n * ff), dh1(cfg_.gated_gelu ? n * ff : 0);
    cpu::ffn_activation_backward(pool_, c.h0.data(), c.h1.data(), cfg_.gated_gelu, dhidden.data(), n, ff, dh0.data(), dh1.data());
    Vec dnormed(n * d);
    cpu::linear_backward_input(pool_, dh0.data(), w.wi0.data(), dnormed.data(), n, d, ff, false);
    if (cfg_.gated_gelu) cpu::linear_backward_input(pool_, dh1.data(), w.wi1.data(), dnormed.data(), n, d, ff, true);
    cpu::rmsnorm_backward(dnormed.data(), c.x_in.data(), ln.data(), c.inv_rms.data(), dx.data(), n, d, true);
  }

  void backward(Pass& p, const std::vector<float>& dtoken_logp, Vec& grads) {
    const Batch& b = p.batch;
    const int d = cfg_.d_model, inner = cfg_.inner_dim(), B = b.batch_size, Le = b.enc_len, R = b.num_rows,
              Ld = b.dec_len, H = cfg_.num_heads;
    const int64_t Ne = static_cast<int64_t>(B) * Le, Nd = static_cast<int64_t>(R) * Ld;

    // head
    Vec dlogits(Nd * cfg_.vocab_size);
    cpu::log_softmax_gather_backward(pool_, p.logits.data(), p.targets.data(), dtoken_logp.data(), Nd, cfg_.vocab_size,
                                     cfg_.pad_token_id, dlogits.data());
    const Vec& head = head_;
    Vec ddec_out(Nd * d);
    cpu::linear_backward_input(pool_, dlogits.data(), head.data(), ddec_out.data(), Nd, d, cfg_.vocab_size, false);
    if (cfg_.scale_decoder_outputs) {
      const float s = 1.f / std::sqrt(static_cast<float>(d));
      for (auto& v : ddec_out) v *= s;
    }
    drop_back(p, ddec_out.data(), Nd * d, site_id(1, 0, kFinal));
    Vec dy(Nd * d);
    cpu::rmsnorm_backward(ddec_out.data(), p.dec_pre_final.data(), dec_final_ln_.data(), p.dec_final_inv.data(),
                          dy.data(), Nd, d, false);

    std::vector<int32_t> dec_key_len(R, Ld), enc_key_len(R);
    for (int r = 0; r < R; ++r) enc_key_len[r] = b.enc_lengths[p.row_example[r]];
    Vec denc_out(Ne * d, 0.f);  // gradient reaching the encoder output through every cross-attention

    for (int i = cfg_.num_decoder_layers - 1; i >= 0; --i) {
      const auto& off = layout_.decoder[i];
      ffn_backward(p, dy, dec_[i].ln_ff, dec_[i].ff, p.dec_ff[i], Nd, off.ff, true, Ld, 1, i, grads);
      {  // cross-attention
        const AttentionCache& c = p.dec_cross[i];
        const CrossKV& kv = p.cross_kv[i];
        Vec dout(dy);
        drop_back(p, dout.data(), Nd * d, site_id(1, i, kCrossOut));
        Vec dattn(Nd * inner);
        cpu::linear_backward_input(pool_, dout.data(), dec_[i].cross.o.data(), dattn.data(), Nd, inner, d, false);
        Vec dq(Nd * inner), dk(Ne * inner, 0.f), dv(Ne * inner, 0.f);
        AttentionShape s{R, H, cfg_.d_kv, Ld, Le, false};
        cpu::attention_backward(pool_, s, c.q.data(), kv.k.data(), kv.v.data(), p.row_example.data(),
                                enc_key_len.data(), c.probs.data(), p.train ? p.dropout : 0.f, p.seed,
                                site_id(1, i, kCrossProbs), dattn.data(), dq.data(), dk.data(), dv.data());
        cpu::ia3_scale_backward(dk.data(), kv.k_raw.data(), token_scale(p, off.cross_k, false, Le),
                                token_grad(p, grads, off.cross_k, false, Le), dk.data(), Ne, inner);
        cpu::ia3_scale_backward(dv.data(), kv.v_raw.data(), token_scale(p, off.cross_v, false, Le),
                                token_grad(p, grads, off.cross_v, false, Le), dv.data(), Ne, inner);
        cpu::linear_backward_input(pool_, dk.data(), dec_[i].cross.k.data(), denc_out.data(), Ne, d, inner, true);
        cpu::linear_backward_input(pool_, dv.data(), dec_[i].cross.v.data(), denc_out.data(), Ne, d, inner, true);
        Vec dnormed(Nd * d);
        cpu::linear_backward_input(pool_, dq.data(), dec_[i].cross.q.data(), dnormed.data(), Nd, d, inner, false);
        cpu::rmsnorm_backward(dnormed.data(), c.x_in.data(), dec_[i].ln_cross.data(), c.inv_rms.data(), dy.data(), Nd,
                              d, true);
      }
      self_attention_backward(p, dy, dec_[i].ln_self, dec_[i].self, p.dec_self[i], R, Ld, dec_key_len.data(), true,
                              off.self_k, off.self_v, true, 1, i, grads, i > 0);
    }
    // (the decoder embedding is frozen: dy stops at the first layer)

    // encoder
    drop_back(p, denc_out.data(), Ne * d, site_id(0, 0, kFinal));
    Vec dx(Ne * d);
    cpu::rmsnorm_backward(denc_out.data(), p.enc_pre_final.data(), enc_final_ln_.data(), p.enc_final_inv.data(),
                          dx.data(), Ne, d, false);
    for (int i = cfg_.num_layers - 1; i >= 0; --i) {
      const auto& off = layout_.encoder[i];
      ffn_backward(p, dx, enc_[i].ln_ff, enc_[i].ff, p.enc_ff[i], Ne, off.ff, false, Le, 0, i, grads);
      self_attention_backward(p, dx, enc_[i].ln_self, enc_[i].self, p.enc_attn[i], B, Le, b.enc_lengths.data(), false,
                              off.self_k, off.self_v, false, 0, i, grads, i > 0);
    }
  }

  cpu::ScratchUser scratch_user_;  // (first: destroyed after every buffer below)
  T5Config cfg_;
  IA3Layout layout_;
  ThreadPool pool_;
  bool released_ = false;
  bool dec_embed_shared_ = false;  // decoder embedding is the encoder's (one copy)
  Vec enc_embed_, dec_embed_, head_, enc_bias_table_, dec_bias_table_, enc_final_ln_, dec_final_ln_;
  std::vector<EncoderBlock> enc_;
  std::vector<DecoderBlock> dec_;
};

}  // namespace

std::unique_ptr<Engine> make_cpu_engine(const T5Config& config, const WeightSource& weights, int threads) {
  return std::make_unique<CpuEngine>(config, weights, threads);
}

}  // namespace tfew
