#include "gpu/weights.h"

#include <cuda_bf16.h>

#include <cstring>
#include <string>
#include <type_traits>

#include "kernels/kernels.cuh"
#include "io/mapped_file.h"

namespace tfew {
namespace gpu {

namespace {

size_t dtype_bytes(DType d) {
  switch (d) {
    case DType::F64: return 8;
    case DType::F32: return 4;
    case DType::F16:
    case DType::BF16: return 2;
  }
  return 4;
}

template <typename D>
bool same_representation(DType d) {
  return (std::is_same<D, float>::value && d == DType::F32) ||
         (std::is_same<D, __nv_bfloat16>::value && d == DType::BF16);
}

// Streams tensors to the device through two pinned buffers, so reading chunk k+1 from the mapped file
// overlaps with the copy (and conversion) of chunk k.
class Uploader {
 public:
  explicit Uploader(cudaStream_t stream) : stream_(stream) {
    for (int i = 0; i < 2; ++i) {
      host_[i].allocate(kChunkBytes);
      device_[i].allocate(kChunkBytes, "weight staging");
      TFEW_CUDA_CHECK(cudaEventCreateWithFlags(&done_[i], cudaEventDisableTiming));
    }
  }
  ~Uploader() {
    cudaStreamSynchronize(stream_);  // no copy may still read the pinned buffers we are about to free
    for (int i = 0; i < 2; ++i)
      if (done_[i]) cudaEventDestroy(done_[i]);
  }

  template <typename D>
  void upload(const TensorView& t, D* dst) {
    const size_t esize = dtype_bytes(t.dtype);
    const int64_t n = t.numel();
    const int64_t chunk = static_cast<int64_t>(kChunkBytes / esize);
    const char* src = static_cast<const char*>(t.data);
    for (int64_t off = 0; off < n; off += chunk) {
      const int64_t count = n - off < chunk ? n - off : chunk;
      const int slot = next_++ & 1;
      TFEW_CUDA_CHECK(cudaEventSynchronize(done_[slot]));  // the slot's previous copy has finished
      void* staging = host_[slot].get();
      read_mapped(t.name, [&] { std::memcpy(staging, src + off * esize, count * esize); });
      if (same_representation<D>(t.dtype)) {
        TFEW_CUDA_CHECK(cudaMemcpyAsync(dst + off, host_[slot].get(), count * esize, cudaMemcpyHostToDevice, stream_));
      } else {
        TFEW_CUDA_CHECK(cudaMemcpyAsync(device_[slot].get(), host_[slot].get(), count * esize,
                                        cudaMemcpyHostToDevice, stream_));
        kernels::convert_weights<D>(device_[slot].get(), t.dtype, count, dst + off, stream_);
      }
      TFEW_CUDA_CHECK(cudaEventRecord(done_[slot], stream_));
    }
  }

 private:
  static constexpr size_t kChunkBytes = 32u << 20;
  cudaStream_t stream_;
  PinnedMemory host_[2];
  DeviceMemory device_[2];
  cudaEvent_t done_[2] = {nullptr, nullptr};
  unsigned next_ = 0;
};

// Walks the tensors in a fixed order. First with base 0 to measure the allocation, then with the real base
// to set the pointers and upload.
template <typename T>
class WeightWalker {
 public:
  WeightWalker(const T5Config& c, const WeightSource& source, uintptr_t base, Uploader* uploader)
      : c_(c), source_(source), placer_(base), uploader_(uploader) {}

  size_t walk(ModelWeights<T>& w) {
    const int64_t d = c_.d_model, inner = c_.inner_dim(), vocab = c_.vocab_size;
    const int64_t buckets = c_.num_buckets, heads = c_.num_heads;

    // Untied checkpoints may carry encoder/decoder embeddings that differ from shared.weight (the T0-layout
    // fixture does); Hugging Face uses them, so do we. Equal tensors share one device copy.
    T* shared = placer_.place<T>(vocab * d);
    load("shared.weight", {vocab, d}, shared);
    w.enc_embed = distinct_embedding("encoder.embed_tokens.weight") ? placer_.place<T>(vocab * d) : shared;
    if (w.enc_embed != shared) load("encoder.embed_tokens.weight", {vocab, d}, w.enc_embed);
    const std::string dec_name = "decoder.embed_tokens.weight";
    if (!distinct_embedding(dec_name)) {
      w.dec_embed = shared;
    } else if (w.enc_embed != shared && same_tensor(dec_name, "encoder.embed_tokens.weight")) {
      w.dec_embed = w.enc_embed;
    } else {
      w.dec_embed = placer_.place<T>(vocab * d);
      load(dec_name, {vocab, d}, w.dec_embed);
    }
    if (c_.tied_head) {
      w.lm_head = shared;
    } else {
      w.lm_head = placer_.place<T>(vocab * d);
      load("lm_head.weight", {vocab, d}, w.lm_head);
    }
    w.enc_rel_bias = placer_.place<float>(buckets * heads);
    load("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", {buckets, heads}, w.enc_rel_bias);
    w.dec_rel_bias = placer_.place<float>(buckets * heads);
    load("decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", {buckets, heads}, w.dec_rel_bias);

    w.encoder.resize(c_.num_layers);
    for (int i = 0; i < c_.num_layers; ++i) {
      const std::string p = "encoder.block." + std::to_string(i) + ".";
      EncoderLayerWeights<T>& L = w.encoder[i];
      load_self_attention(p, L.ln_attn, L.qkv, L.o);
      load_ffn(p + "layer.1.", L.ln_ff, L.wi, L.wo);
    }
    w.enc_final_ln = placer_.place<float>(d);
    load("encoder.final_layer_norm.weight", {d}, w.enc_final_ln);

    w.decoder.resize(c_.num_decoder_layers);
    w.dec_kv_cross = placer_.place<T>(static_cast<int64_t>(c_.num_decoder_layers) * 2 * inner * d);
    for (int i = 0; i < c_.num_decoder_layers; ++i) {
      const std::string p = "decoder.block." + std::to_string(i) + ".";
      DecoderLayerWeights<T>& L = w.decoder[i];
      load_self_attention(p, L.ln_self, L.qkv, L.o);
      L.ln_cross = placer_.place<float>(d);
      load(p + "layer.1.layer_norm.weight", {d}, L.ln_cross);
      L.q_cross = placer_.place<T>(inner * d);
      load(p + "layer.1.EncDecAttention.q.weight", {inner, d}, L.q_cross);
      L.kv_cross = w.dec_kv_cross + static_cast<int64_t>(i) * 2 * inner * d;
      load(p + "layer.1.EncDecAttention.k.weight", {inner, d}, L.kv_cross);
      load(p + "layer.1.EncDecAttention.v.weight", {inner, d}, L.kv_cross + inner * d);
      L.o_cross = placer_.place<T>(d * inner);
      load(p + "layer.1.EncDecAttention.o.weight", {d, inner}, L.o_cross);
      load_ffn(p + "layer.2.", L.ln_ff, L.wi, L.wo);
    }
    w.dec_final_ln = placer_.place<float>(d);
    load("decoder.final_layer_norm.weight", {d}, w.dec_final_ln);
    return placer_.cursor();
  }

 private:
  // Block `p`'s layer.0: its norm, the self-attention q|k|v packed into one [3 inner, d] matrix, and o.
  void load_self_attention(const std::string& p, float*& ln, T*& qkv, T*& o) {
    const int64_t d = c_.d_model, inner = c_.inner_dim();
    ln = placer_.place<float>(d);
    load(p + "layer.0.layer_norm.weight", {d}, ln);
    qkv = placer_.place<T>(3 * inner * d);
    load(p + "layer.0.SelfAttention.q.weight", {inner, d}, qkv);
    load(p + "layer.0.SelfAttention.k.weight", {inner, d}, qkv + inner * d);
    load(p + "layer.0.SelfAttention.v.weight", {inner, d}, qkv + 2 * inner * d);
    o = placer_.place<T>(d * inner);
    load(p + "layer.0.SelfAttention.o.weight", {d, inner}, o);
  }

  template <typename D>
  void load(const std::string& name, const std::vector<int64_t>& shape, D* dst) {
    if (!uploader_) return;  // measuring pass
    const TensorView t = source_.get(name, shape);  // throws InvalidModel naming a missing/misshaped tensor
    uploader_->upload(t, dst);
  }

  // True when `name` exists and holds other values than shared.weight.
  bool distinct_embedding(const std::string& name) const {
    return source_.has(name) && !same_tensor(name, "shared.weight");
  }

  // Same dtype and bytes (the same mapping, or an identical copy).
  bool same_tensor(const std::string& a, const std::string& b) const {
    const std::vector<int64_t> shape = {c_.vocab_size, c_.d_model};
    const TensorView ta = source_.get(a, shape), tb = source_.get(b, shape);
    if (ta.data == tb.data) return true;
    if (ta.dtype != tb.dtype) return false;
    bool equal = false;
    read_mapped(a + " / " + b, [&] { equal = std::memcmp(ta.data, tb.data, ta.numel() * dtype_bytes(ta.dtype)) == 0; });
    return equal;
  }

  // A block's feed-forward sub-layer `layer` (e.g. "encoder.block.3.layer.1."): its norm, wi (wi_0 | wi_1 when
  // gated) and wo.
  void load_ffn(const std::string& layer, float*& ln, T*& wi, T*& wo) {
    const int64_t d = c_.d_model, ff = c_.d_ff;
    ln = placer_.place<float>(d);
    load(layer + "layer_norm.weight", {d}, ln);
    wi = placer_.place<T>((c_.gated_gelu ? 2 : 1) * ff * d);
    wo = placer_.place<T>(d * ff);
    const std::string p = layer + "DenseReluDense.";
    if (c_.gated_gelu) {
      load(p + "wi_0.weight", {ff, d}, wi);
      load(p + "wi_1.weight", {ff, d}, wi + ff * d);
    } else {
      load(p + "wi.weight", {ff, d}, wi);
    }
    load(p + "wo.weight", {d, ff}, wo);
  }

  const T5Config& c_;
  const WeightSource& source_;
  Placer placer_;
  Uploader* uploader_;
};

}  // namespace

template <typename T>
void load_weights(const T5Config& config, const WeightSource& source, cudaStream_t stream, ModelWeights<T>& out) {
  ModelWeights<T> scratch;
  const size_t bytes = WeightWalker<T>(config, source, 0, nullptr).walk(scratch);
  out.storage.allocate(bytes, "the model weights");
  Uploader uploader(stream);
  WeightWalker<T>(config, source, reinterpret_cast<uintptr_t>(out.storage.get()), &uploader).walk(out);
  TFEW_CUDA_CHECK(cudaStreamSynchronize(stream));
}

template void load_weights<float>(const T5Config&, const WeightSource&, cudaStream_t, ModelWeights<float>&);
template void load_weights<__nv_bfloat16>(const T5Config&, const WeightSource&, cudaStream_t,
                                          ModelWeights<__nv_bfloat16>&);

}  // namespace gpu
}  // namespace tfew
