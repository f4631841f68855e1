// The T5 hyper-parameters the engine needs, already resolved by lib/config.ts from config.json
// (T5 v1.0 / v1.1 / T0 / flan-t5). Both backends read only this struct.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace tfew {

struct T5Config {
  int vocab_size = 0;
  int d_model = 0;
  int d_ff = 0;
  int d_kv = 0;
  int num_heads = 0;
  int num_layers = 0;          // encoder blocks
  int num_decoder_layers = 0;  // decoder blocks
  int num_buckets = 32;
  int max_distance = 128;
  float layer_norm_eps = 1e-6f;
  bool gated_gelu = false;     // true: wo(gelu_new(wi_0 x) * wi_1 x); false: wo(relu(wi x))
  bool tied_head = true;       // lm_head = shared.weight
  bool scale_decoder_outputs = true;  // multiply the decoder output by d_model^-0.5 before the head
  float dropout_rate = 0.1f;
  int pad_token_id = 0;
  int eos_token_id = 1;
  int decoder_start_token_id = 0;

  int inner_dim() const { return num_heads * d_kv; }
};

// Where each (IA)3 vector lives inside one flat float array (an "adapter"). The order is fixed and shared
// with lib/adapter.ts: encoder blocks first (self k, self v, ff), then decoder blocks (self k, self v,
// cross k, cross v, ff). k/v vectors have inner_dim values; ff vectors d_ff values (they scale the input
// of wo, i.e. the FFN hidden activation).
struct IA3Layout {
  struct EncoderBlock { int64_t self_k, self_v, ff; };
  struct DecoderBlock { int64_t self_k, self_v, cross_k, cross_v, ff; };
  std::vector<EncoderBlock> encoder;
  std::vector<DecoderBlock> decoder;
  int64_t total = 0;

  static IA3Layout make(const T5Config& c) {
    IA3Layout l;
    int64_t off = 0;
    const int64_t inner = c.inner_dim(), ff = c.d_ff;
    for (int i = 0; i < c.num_layers; ++i) {
      EncoderBlock b;
      b.self_k = off; off += inner;
      b.self_v = off; off += inner;
      b.ff = off; off += ff;
      l.encoder.push_back(b);
    }
    for (int i = 0; i < c.num_decoder_layers; ++i) {
      DecoderBlock b;
      b.self_k = off; off += inner;
      b.self_v = off; off += inner;
      b.cross_k = off; off += inner;
      b.cross_v = off; off += inner;
      b.ff = off; off += ff;
      l.decoder.push_back(b);
    }
    l.total = off;
    return l;
  }
};

}  // namespace tfew
