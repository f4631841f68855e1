// The model's weights in device memory, in one allocation, laid out for the forward pass:
//  - GEMM weights in the storage type T (bf16, or fp32 in the verification mode), PyTorch's [out, in] layout;
//    q|k|v of a self-attention stored as one [3 inner, d] matrix (one GEMM), wi_0|wi_1 as one [2 d_ff, d]
//    matrix, and the cross-attention k|v as one [2 inner, d] matrix (applied to the encoder output once per
//    example).
//  - norm weights and relative-position embeddings in fp32.
// Tensors are streamed from the memory-mapped checkpoint through pinned staging buffers and converted on the
// device, so the host never holds a converted copy of the model.
#pragma once
#include <cuda_runtime_api.h>

#include <vector>

#include "gpu/device_memory.h"
#include "model/engine.h"

namespace tfew {
namespace gpu {

template <typename T>
struct EncoderLayerWeights {
  float* ln_attn = nullptr;  // [d]
  T* qkv = nullptr;          // [3 inner, d]
  T* o = nullptr;            // [d, inner]
  float* ln_ff = nullptr;    // [d]
  T* wi = nullptr;           // [d_ff or 2 d_ff, d]
  T* wo = nullptr;           // [d, d_ff]
};

template <typename T>
struct DecoderLayerWeights {
  float* ln_self = nullptr;
  T* qkv = nullptr;       // self-attention q|k|v [3 inner, d]
  T* o = nullptr;
  float* ln_cross = nullptr;
  T* q_cross = nullptr;   // [inner, d]
  T* kv_cross = nullptr;  // [2 inner, d]: rows of ModelWeights::dec_kv_cross
  T* o_cross = nullptr;   // [d, inner]
  float* ln_ff = nullptr;
  T* wi = nullptr;
  T* wo = nullptr;
};

template <typename T>
struct ModelWeights {
  DeviceMemory storage;
  T* enc_embed = nullptr;  // encoder.embed_tokens.weight when the checkpoint has its own, else shared.weight
  T* dec_embed = nullptr;  // likewise for the decoder (the same memory when the tensors are equal)
  T* lm_head = nullptr;    // shared.weight when tied, else lm_head.weight
  float* enc_rel_bias = nullptr;  // [num_buckets, heads]
  float* dec_rel_bias = nullptr;
  float* enc_final_ln = nullptr;
  float* dec_final_ln = nullptr;
  // The cross-attention k|v of all decoder layers stacked [layers * 2 inner, d]: one GEMM computes the keys
  // and values of every layer from the encoder output.
  T* dec_kv_cross = nullptr;
  std::vector<EncoderLayerWeights<T>> encoder;
  std::vector<DecoderLayerWeights<T>> decoder;
};

// Allocates and fills `out` on the current device; blocks until the copies are done.
template <typename T>
void load_weights(const T5Config& config, const WeightSource& source, cudaStream_t stream, ModelWeights<T>& out);

}  // namespace gpu
}  // namespace tfew
