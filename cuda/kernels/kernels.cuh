// Host-side declarations of the CUDA kernel launchers (one .cu per layer family, forward and backward side
// by side). This header is plain C++ (no device code), so the engine (compiled by the host compiler) can
// include it.
//
// Element type T of weights and of activations that feed GEMMs: __nv_bfloat16 (the fast path) or float (a
// verification mode). The residual stream, norm weights, relative-position biases, (IA)3 vectors and their
// gradients are always fp32; every reduction and softmax runs in fp32. Each launcher checks its launch and
// throws tfew::TfewError (ErrorCode::Cuda) on failure.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "model/engine.h"  // DType

namespace tfew {
namespace kernels {

// Which (IA)3 adapter applies to token t: example(t) = row_example ? row_example[t / tokens_per_row]
// : t / tokens_per_row, adapter = adapter_of_example[example] (-1 = none). Encoder tokens use
// tokens_per_row = enc_len and no row_example; decoder tokens tokens_per_row = dec_len with row_example.
struct AdapterIndex {
  const float* adapters = nullptr;          // [num_adapters, adapter_stride] on the device
  int64_t adapter_stride = 0;               // IA3Layout::total
  const int32_t* adapter_of_example = nullptr;
  const int32_t* row_example = nullptr;     // nullable
  int tokens_per_row = 1;
  bool active() const { return adapters != nullptr && adapter_of_example != nullptr; }
};

// A dropout site (training only): element `index` of the site's tensor is kept iff a hash of
// (seed, site, index) clears `rate` — the CPU backend's masks exactly (kernels/dropout.cuh). rate 0: none.
struct DropoutSite {
  float rate = 0.f;
  uint64_t seed = 0;
  uint64_t site = 0;
  // When set, the seed is read from device memory instead (training: a CUDA graph of the step replays with
  // each step's seed).
  const uint64_t* seed_dev = nullptr;
  // Filled on the device by with_seed() (kernels/dropout.cuh), once per thread: the mask's stream key,
  // threshold and the kept elements' scale.
  bool prepared = false;
  uint64_t threshold = 0;
  float keep_scale = 1.f;
  uint64_t key = 0;
};

// Programmatic dependent launch (kernels/launch.cuh): whether our kernels launched on `stream` may begin while the
// kernel before them is finishing. The engine switches it on for its stream (cuda.programmaticLaunch, cc 9.0+) and
// off before destroying the stream; off for every stream not named.
void set_programmatic_launch(cudaStream_t stream, bool on);
bool programmatic_launch(cudaStream_t stream);
// Whether the fused encoder attention kernels launched on `stream` are the instances compiled for one more block per
// SM (kernels/attention_fused.cu, kOccupancyBlocks: fewer registers, a few spilled): the engine switches it on for its
// stream (cuda.attentionOccupancy), off before destroying the stream.
void set_attention_occupancy(cudaStream_t stream, bool on);
bool attention_occupancy(cudaStream_t stream);
// Whether the kernels the current device runs wait for their predecessor: compiled for compute_90 or later (the wait
// compiles to nothing below that: a build for sm_80 only, run on an H100 from its PTX, must not overlap its launches;
// a probe kernel reports its __CUDA_ARCH__), and CUDA graphs can keep programmatic edges (runtime and driver 12.3 or
// later). "" if so, else why not. Runs a kernel and synchronises: at load only.
const char* programmatic_launch_unsupported();

// The keep mask of the encoder self-attention's dropout ([B, H, L, L] probabilities) as bits, so that the
// training backward reads it instead of hashing every element again (the fused forward is run twice and the two
// backward kernels read each element once more: four hashes per element otherwise, ~1.6 G per TRAIN-3B step).
// Row (b, h, i) takes keep_bits_words(L) words; key j is bit j % 32 of its word j / 32 (32 keys: one warp's
// ballot). Only bits of real (query, key) pairs are defined.
struct KeepBits {
  uint32_t* words = nullptr;  // null: each element hashed (kernels/dropout.cuh)
  bool fill = false;          // the forward writes the mask (else reads it)
};
// Words per query row: whole 64-key tiles, two words each.
constexpr int64_t keep_bits_words(int len) { return 2 * ((static_cast<int64_t>(len) + 63) / 64); }

// Where a kernel puts its per-token (IA)3 gradient contributions: one row per token (chunk 1), or one row per
// chunk of up to `chunk` consecutive tokens of one example (tokens_per_example each; chunks never cross
// examples), summed in token order: the first stage of ia3_grad_reduce done by the producing kernel, so the
// per-token rows are never written and read back. Rows: (n_tokens / tokens_per_example) * chunks_per_example().
struct Ia3Sums {
  int tokens_per_example = 1;
  int chunk = 1;
  __host__ __device__ int chunks_per_example() const { return (tokens_per_example + chunk - 1) / chunk; }
  __host__ __device__ int64_t rows(int n_tokens) const {
    return static_cast<int64_t>(n_tokens / tokens_per_example) * chunks_per_example();
  }
  // The tokens [first, last) that row r sums.
  __host__ __device__ void tokens_of(int64_t r, int& first, int& last) const {
    const int per_example = chunks_per_example();
    const int b = static_cast<int>(r / per_example), k = static_cast<int>(r % per_example);
    first = b * tokens_per_example + k * chunk;
    const int end = (b + 1) * tokens_per_example;
    last = first + chunk < end ? first + chunk : end;
  }
};

// ---- embedding.cu
// out[t, :] = table[ids[t], :] as fp32 (the residual stream).
template <typename T>
void embedding_forward(const T* table, int vocab, int d_model, const int32_t* ids, int n_tokens, float* out,
                       cudaStream_t stream);

// ---- rmsnorm.cu
// out[r, :] = weight * x[r, :] * rsqrt(mean(x[r, :]^2) + eps) * out_scale   (T5 LayerNorm: no mean, no bias)
// x: the fp32 residual stream, or (training) its saved copy in the storage type. Instantiated for
// <float, float>, <float, bf16> and <bf16, bf16>.
template <typename TIn, typename TOut>
void rmsnorm_forward(const TIn* x, const float* weight, int n_rows, int d, float eps, float out_scale,
                     TOut* out, cudaStream_t stream);
// Training forward: x[i] += scale(i) * y[i] (a sub-layer's dropped output added to the fp32 residual stream),
// saved[i] = (T)x[i] (the copy the backward reads; in bf16 half the bytes), and the next sub-layer's norm of
// that copy, rmsnorm_forward(saved, weight, n_rows, d, eps, out_scale, out), in one pass per row.
template <typename T>
void residual_add_norm(float* x, const float* y, int n_rows, int d, const DropoutSite& site, T* saved,
                       const float* weight, float eps, float out_scale, T* out, cudaStream_t stream);
// dx (+)= the input gradient given dy (the weight is frozen); 1/rms is recomputed from x (float or bf16).
// cast_out (training; nullable): also the result as dropout_cast(dx, n_rows * d, cast_site, cast_out) writes it,
// the next sub-layer's GEMM input, in the same pass.
template <typename TX>
void rmsnorm_backward(const float* dy, const TX* x, const float* weight, int n_rows, int d, float eps,
                      bool accumulate, float* dx, cudaStream_t stream, TX* cast_out = nullptr,
                      const DropoutSite& cast_site = {});

// ---- dropout.cu (training)
// x[i] *= scale(i) in place (also the backward of a dropout: the same mask and scale).
template <typename T>
void dropout_inplace(T* x, int64_t n, const DropoutSite& site, cudaStream_t stream);
// out[i] = (T)(x[i] * scale(i)): the gradient through a dropped sub-layer output, cast for the next GEMM.
template <typename T>
void dropout_cast(const float* x, int64_t n, const DropoutSite& site, T* out, cudaStream_t stream);

// ---- attention.cu
// table[h, s] = rel_emb[buckets[s], h] for s < span: the relative-position bias of every relative distance
// (bucket indices come from the host, computed exactly as Hugging Face does, see model/relative_position.h).
void relative_bias_table(const float* rel_emb, const int32_t* buckets, int span, int num_heads, float* table,
                         cudaStream_t stream);

// The (IA)3 key/value scaling: buf[t, k_col + c] *= l_k[c], buf[t, v_col + c] *= l_v[c] for c < width,
// with the vectors of token t's adapter (tokens without an adapter are left alone).
template <typename T>
void ia3_scale_kv(T* buf, int ld, int k_col, int v_col, int width, int n_tokens, const AdapterIndex& index,
                  int64_t k_offset, int64_t v_offset, cudaStream_t stream);
// dst = src over n_tokens q|k|v rows (3 inner columns, row stride ld), k (columns inner..) and v (2 inner..)
// scaled by the token's adapter vectors at k_offset / v_offset: the scaled copy the attention GEMMs read.
template <typename T>
void ia3_scaled_qkv_copy(const T* src, T* dst, int ld, int inner, int n_tokens, const AdapterIndex& index,
                         int64_t k_offset, int64_t v_offset, cudaStream_t stream);
// dst[t, c] = src[t, c] * l[c] for c < width with the vector at `offset` of token t's adapter (copied unscaled
// for tokens without one).
template <typename T>
void ia3_scaled_columns_copy(const T* src, int src_ld, T* dst, int dst_ld, int width, int n_tokens,
                             const AdapterIndex& index, int64_t offset, cudaStream_t stream);
// One range only: buf[t, col + c] *= l[c] with the vector at `offset` of token t's adapter.
template <typename T>
void ia3_scale_columns(T* buf, int ld, int col, int width, int n_tokens, const AdapterIndex& index, int64_t offset,
                       cudaStream_t stream);

// Encoder self-attention softmax: probs[b, h, i, :] = softmax_j(scores[b, h, i, j] + bias[h, j - i]) over the
// example's real keys j < lengths[b] (padded keys get probability 0), then dropout (training). scores fp32
// [B, H, L, L]; bias_table [H, 2L-1] indexed by j - i + L - 1. T5 has no 1/sqrt(d_kv) scaling.
template <typename T>
void encoder_softmax(const float* scores, const float* bias_table, const int32_t* lengths, int batch,
                     int heads, int len, const DropoutSite& dropout, T* probs, cudaStream_t stream);

// Its backward (training), in place: probs holds the probabilities P without dropout on entry and the
// gradient of the scores dS = P * (drop * dprobs - D) (D = sum_j P_j drop_j dprobs_j) on return; dprobs fp32
// [B, H, L, L] is the gradient of the dropped probabilities. Dropout indices as in encoder_softmax.
template <typename T>
void encoder_softmax_backward(const float* dprobs, T* probs, const int32_t* lengths, int batch, int heads, int len,
                              const DropoutSite& dropout, cudaStream_t stream);

// encoder_softmax written twice in one pass (training backward): probs without dropout, probs_dropped with.
template <typename T>
void encoder_softmax_pair(const float* scores, const float* bias_table, const int32_t* lengths, int batch, int heads,
                          int len, const DropoutSite& dropout, T* probs, T* probs_dropped, cudaStream_t stream);

// The folded cross-attention's rows (CudaEngine::folded_cross_products): one per (decoder token, head),
// token-major, dec_len tokens per choice row. Dropout masks follow the CPU backend's numbering of the
// cross-attention probabilities [R, H, dec_len, enc_len]. ld: the rows' stride in elements (>= enc_len; 0: enc_len):
// the engine rounds it up to a multiple of 8 (gpu::folded_cross_ld) so that the cuBLAS products over these rows
// get 16-byte aligned rows whatever the encoder length; the probabilities' columns from enc_len to ld hold 0.
struct FoldedRows {
  int heads = 0, dec_len = 0, ld = 0;
};
// The folded cross-attention's softmax: rows of `len` encoder keys, in groups of rows_per_example per example
// (its real keys j < lengths[example]; the others get probability 0), no bias. probs gets P (rounded to T)
// and, when probs_dropped is given (training), probs_dropped gets P' = dropout(P) of that rounded P, as
// cross_probs_dropout remakes it; without probs_dropped, probs gets P'.
template <typename T>
void cross_softmax_folded(const float* scores, const int32_t* lengths, int batch, int64_t rows_per_example, int len,
                          const DropoutSite& dropout, const FoldedRows& folded, T* probs, T* probs_dropped,
                          cudaStream_t stream);
// Its backward, in place, as encoder_softmax_backward: P on entry, dS on return; dprobs fp32 = dL/dP'.
template <typename T>
void cross_softmax_folded_backward(const float* dprobs, T* probs, const int32_t* lengths, int batch,
                                   int64_t rows_per_example, int len, const DropoutSite& dropout,
                                   const FoldedRows& folded, cudaStream_t stream);
// probs_dropped = dropout(probs) over n_rows folded rows of len (the backward's P', from the stored P).
template <typename T>
void cross_probs_dropout(const T* probs, int64_t n_rows, int len, const DropoutSite& dropout, const FoldedRows& folded,
                         T* probs_dropped, cudaStream_t stream);

// The (IA)3 step of an attention backward that ran on the scaled keys and values K~ = l_k * K, V~ = l_v * V:
// g_k, g_v (fp32 [n_tokens, g_ld], columns < width) hold dK~, dV~; the contributions K * dK~, V * dV~ (0 for
// tokens without an adapter) go to gk_out, gv_out ([rows of `sums`, width]; per token they may be g_k, g_v
// themselves); dK = l_k * dK~ and dV = l_v * dV~ are written as T into dqkv's columns k_col, v_col. K and V
// (unscaled) are qkv's columns k_col, v_col. v_col < 0: the k range only (g_v and gv_out are not used).
template <typename T>
void ia3_kv_backward(const T* qkv, int ld, int k_col, int v_col, int width, int n_tokens, const AdapterIndex& index,
                     int64_t k_offset, int64_t v_offset, const float* g_k, const float* g_v, int g_ld, T* dqkv,
                     int dq_ld, const Ia3Sums& sums, float* gk_out, float* gv_out, cudaStream_t stream);

// Decoder causal self-attention over the positions of each choice row (dec_len tokens per row; no padding
// mask: the decoder mask is causal only). q, k, v are the column blocks [0, inner), [inner, 2 inner),
// [2 inner, 3 inner) of qkv [n_rows * dec_len, ld]; bias_table [H, 2 dec_len - 1]; out [.., out_ld].
// The (IA)3 k/v vectors (layout offsets k_offset, v_offset) of the adapter of each row's example
// (index.adapter_of_example[row_example[r]]) are applied inside: no separate pass.
template <typename T>
void decoder_self_attention(const T* qkv, int ld, int inner, int d_kv, int heads, int n_rows, int dec_len,
                            const float* bias_table, const int32_t* row_example, const AdapterIndex& index,
                            int64_t k_offset, int64_t v_offset, const DropoutSite& dropout, T* out, int out_ld,
                            cudaStream_t stream);

// Cross-attention: every decoder token of row r attends to the encoder tokens of its example
// b = row_example[r], keys j < enc_lengths[b], no bias. k and v are the column blocks [0, inner) and
// [inner, 2 inner) of kv [B * enc_len, kv_ld], computed once per example and shared by all its rows.
// (IA)3 as in decoder_self_attention.
template <typename T>
void cross_attention(const T* q, int q_ld, const T* kv, int kv_ld, int inner, int d_kv, int heads, int n_rows,
                     int dec_len, const int32_t* row_example, const int32_t* enc_lengths, int enc_len,
                     const AdapterIndex& index, int64_t k_offset, int64_t v_offset, const DropoutSite& dropout,
                     T* out, int out_ld, cudaStream_t stream);

// Fused encoder self-attention for bf16 (attention_fused.cu): the same result as the two batched GEMMs
// around encoder_softmax, without writing scores to memory, with the (IA)3 k/v scales (k_offset/v_offset
// into token adapters; the encoder then needs no ia3_scale_kv pass) applied as K and V are read, and the
// dropout of the probabilities (training forward; the same elements as encoder_softmax drops).
// qkv [B * len, 3 inner] as produced by the fused q|k|v projection; out [B * len, inner].
// d_kv in {16, 32, 64, 128} and the kernel's shared memory fits the current device's opt-in limit.
// stats (training): [B, H, len, 3], each query row's softmax max and sum in slots 0 and 1 (the backward's).
// keep (training with dropout): the probabilities' keep mask as bits, written here (keep.fill) or read instead
// of hashing each element.
bool fused_encoder_attention_supported(int d_kv);
// Whether the fused forward is the first, WMMA kernel (TFEW_CUDA_ATTENTION_KERNEL=wmma) rather than the mma.sync one.
bool attention_kernel_wmma();
void fused_encoder_attention(const __nv_bfloat16* qkv, int inner, int d_kv, int batch, int heads, int len,
                             const float* bias_table, const int32_t* lengths, const AdapterIndex& index,
                             int64_t k_offset, int64_t v_offset, const DropoutSite& dropout, __nv_bfloat16* out,
                             cudaStream_t stream, float* stats = nullptr, const KeepBits& keep = {});
// Its backward (training, flash-style: two kernels, no [B, H, L, L] tensor), after a forward with the same
// arguments wrote ctx (its output C) and stats: from dctx (bf16 [B * len, inner], the gradient of C) to the
// gradient of the unscaled q|k|v (bf16 [B * len, 3 inner], row stride dqkv_ld: dQ, dK = l_k dK~, dV = l_v dV~ with
// K~ = l_k K, V~ = l_v V) and the (IA)3 contributions K dK~, V dV~ summed per chunk of 16 tokens (`sums`, whose
// chunk must be 16, as ia3_kv_backward writes them; 0 for examples without an adapter) into sums_k / sums_v.
// stats slot 2 receives D = rowsum(dC * C). With dropout, keep_bits is the forward's keep mask (KeepBits: the
// mask is read, never hashed again). Deterministic. Supported where its shared memory fits.
bool fused_encoder_attention_backward_supported(int d_kv);
void fused_encoder_attention_backward(const __nv_bfloat16* qkv, int inner, int d_kv, int batch, int heads, int len,
                                      const float* bias_table, const int32_t* lengths, const AdapterIndex& index,
                                      int64_t k_offset, int64_t v_offset, const DropoutSite& dropout,
                                      const uint32_t* keep_bits, const __nv_bfloat16* dctx,
                                      const __nv_bfloat16* ctx, float* stats, __nv_bfloat16* dqkv, int dqkv_ld,
                                      const Ia3Sums& sums, float* sums_k, float* sums_v, cudaStream_t stream);

// The largest d_kv the attention kernels support.
constexpr int kMaxDKv = 256;

// Attention backward (training) of the decoder's two attention kinds, whose few queries per sequence do not
// pay for GEMMs (the encoder's runs on batched GEMMs: CudaEngine::encoder_attention_backward). Recomputes the
// probabilities from q and k (nothing of the forward is stored but its inputs), with the (IA)3 vectors applied
// as in the forward: scores = (l_k * q) . k, output = l_v * sum_j p_j v_j.
enum class AttentionKind { DecoderSelf, Cross };
struct AttentionGeometry {
  AttentionKind kind = AttentionKind::DecoderSelf;
  int heads = 0, d_kv = 0;
  int n_seq = 0;    // query sequences: choice rows
  int n_examples = 0;  // examples: the key sequences of cross-attention
  int q_len = 0;    // queries per sequence: dec_len
  int k_len = 0;    // padded keys per key sequence: enc_len (cross) or dec_len (self)
  const float* bias_table = nullptr;        // [H, 2 q_len - 1] for self-attention, null for cross
  const int32_t* key_lengths = nullptr;     // enc_lengths [B] (cross)
  const int32_t* row_example = nullptr;     // [R]
  const int32_t* row_start = nullptr;       // [B + 1] (cross: the rows reading an example's keys)
  DropoutSite dropout;                      // on the probabilities, indexed like the CPU's probs array
};
// Pass 1, one warp per (query, head) (cross-attention: per block of queries, keys and values tiled in shared
// memory): d q (w.r.t. the unscaled q, written as T into dq [.., dq_ld]), the
// per-token (IA)3 contributions g_k = q * dq~ and g_v = dout * o~ (fp32 [Nq, inner]; reduced per adapter by
// ia3_grad_reduce), and the softmax statistics (max, sum, D = sum_j p_j dp_j) that pass 2 needs.
// dout fp32 [Nq, inner] is the gradient of the attention output (before the o projection).
template <typename T>
void attention_backward_query(const AttentionGeometry& g, const T* q, int q_ld, const T* k, const T* v, int kv_ld,
                              const float* dout, const AdapterIndex& index, int64_t k_offset, int64_t v_offset,
                              T* dq, int dq_ld, float* g_k, float* g_v, float* stats, cudaStream_t stream);
// Pass 2, one warp per (key, head): d k and d v (w.r.t. the unscaled k, v) summed over every query that reads
// the key, in a fixed order (deterministic, no atomics). Written as T into dk/dv [.., dkv_ld].
template <typename T>
void attention_backward_key(const AttentionGeometry& g, const T* q, int q_ld, const T* k, const T* v, int kv_ld,
                            const float* dout, const AdapterIndex& index, int64_t k_offset, int64_t v_offset,
                            const float* stats, T* dk, T* dv, int dkv_ld, cudaStream_t stream);

// The decoder's causal self-attention backward, both passes' outputs (dq, dk, dv into dqkv [.., dqkv_ld] at column
// offsets 0, inner, 2 inner; g_k, g_v): one kernel, a warp per (choice row, head) in shared memory, for rows of up to
// 32 positions (whose q, k, v and output gradient fit in 48 KiB); longer rows take the two passes above (stats:
// their scratch).
template <typename T>
void decoder_self_attention_backward(const AttentionGeometry& g, const T* qkv, int ld, const float* dout,
                                     const AdapterIndex& index, int64_t k_offset, int64_t v_offset, T* dqkv,
                                     int dqkv_ld, float* g_k, float* g_v, float* stats, cudaStream_t stream);

// ---- delay.cu: a kernel that waits `microseconds` on the device (timing: the work queued behind it runs back to back)
void device_delay(int microseconds, cudaStream_t stream);

// ---- linear_few_rows.cu: the inference decoder's linear layers at a few rows (bf16), each with the pass beside
// it folded in. Each returns false, launching nothing, where its kernel does not apply (too many rows, a width
// without an instance, misaligned operands): the caller then takes the unfused path. W is [n, k], rows contiguous.
constexpr int kFewRowsMax = 32;
// Whether the norm forms have an instance for this d_model (512, 1024, 2048).
bool few_rows_norm_supported(int d_model);
// out[r, :] = rmsnorm(x[r, :]) W^T in bf16 (x: the fp32 residual stream, k = d_model), then times the row's
// adapter's vector at out_scale_offset (-1: none; the cross-attention's l_k).
bool few_rows_norm_linear(const float* x, int ldx, const float* norm_weight, float eps, const __nv_bfloat16* w, int n,
                          int k, int rows, __nv_bfloat16* out, int ldo, const AdapterIndex& index,
                          int64_t out_scale_offset, cudaStream_t stream);
// act[r, :] = ffn_activation of rmsnorm(x[r, :]) wi^T (wi: [2 d_ff, d_model] gated (wi_0 | wi_1), else
// [d_ff, d_model]), l_ff of the row's adapter at ff_offset, no dropout.
bool few_rows_norm_ffn_in(const float* x, int ldx, const float* norm_weight, float eps, const __nv_bfloat16* wi,
                          int d_model, int d_ff, bool gated, int rows, const AdapterIndex& index, int64_t ff_offset,
                          __nv_bfloat16* act, cudaStream_t stream);
// x[r, :] += a'[r, :] W^T in fp32, a' = a times the row's adapter's vector at in_scale_offset (-1: a itself; the
// cross-attention context's l_v).
bool few_rows_linear_residual(const __nv_bfloat16* a, int lda, const __nv_bfloat16* w, int n, int k, int rows,
                              const AdapterIndex& index, int64_t in_scale_offset, float* x, int ldx,
                              cudaStream_t stream);

// ---- ffn.cu
// gated: out[t, c] = gelu_new(in[t, c]) * in[t, d_ff + c] * l_ff[c]; relu: out[t, c] = relu(in[t, c]) * l_ff[c]
// (l_ff of token t's adapter; 1 without), then dropout (training). in is [n_tokens, 2 d_ff] (gated:
// wi_0 | wi_1) or [n_tokens, d_ff].
template <typename T>
void ffn_activation(const T* in, int n_tokens, int d_ff, bool gated, const AdapterIndex& index,
                    int64_t ff_offset, const DropoutSite& dropout, T* out, cudaStream_t stream);
// Backward from dscaled (fp32 [n, d_ff], the gradient of the activation's output): d_pre (T [n, 2 d_ff] or
// [n, d_ff], the gradient of the wi projections) and g_ff = dropout-masked dscaled * unscaled hidden
// (fp32 [rows of `sums`, d_ff], the contributions to l_ff's gradient; per token it may be dscaled itself,
// computed in place).
template <typename T>
void ffn_backward(const float* dscaled, const T* pre, int n_tokens, int d_ff, bool gated, const AdapterIndex& index,
                  int64_t ff_offset, const DropoutSite& dropout, T* d_pre, const Ia3Sums& sums, float* g_ff,
                  cudaStream_t stream);

// ---- ia3.cu (training)
// Per-token (IA)3 gradient contributions g [tokens, width] of the vector at `offset` of the adapter layout.
struct Ia3GradSource {
  const float* g = nullptr;
  int64_t offset = 0;
};
// For each source (second: optional, e.g. a layer's v beside its k; the same width):
// grads[a * stride + offset + c] += sum of g[t, c] over the tokens t of the examples whose adapter is a.
// Deterministic: per-example sums (partial [2, batch, width] scratch), then per adapter in example order; one
// launch. Tokens of example b: [b * tokens_per_row, (b+1) * tokens_per_row) when row_start is null (encoder),
// else [row_start[b] * tokens_per_row, row_start[b+1] * tokens_per_row) (decoder rows).
void ia3_grad_reduce(const Ia3GradSource& first, const Ia3GradSource& second, int width, int batch,
                     int tokens_per_row, const int32_t* row_start, const int32_t* adapter_of_example, int n_adapters,
                     float* partial, float* grads, int64_t stride, cudaStream_t stream);

// ---- loss.cu (training)
// The T-Few losses from the per-token log-probs (token_logp, targets [rows, len]; pad targets do not count),
// as the CPU backend's cpu::tfew_losses: losses[0..3] = LM, UL, LN, total (w_lm LM + w_ul UL + w_ln LN) and
// dlogp [rows, len] = d total / d token_logp. row_start [batch + 1], row_example [rows], labels [batch] (the
// gold choice within the example's rows), weights [3] = w_lm, w_ul, w_ln (device data: a captured step
// replays with each step's weights). scratch: tfew_losses_scratch_doubles(rows, batch) doubles.
size_t tfew_losses_scratch_doubles(int rows, int batch);
void tfew_losses(const float* token_logp, const int32_t* targets, int rows, int len, int pad_id,
                 const int32_t* row_start, const int32_t* row_example, const int32_t* labels, int batch,
                 const float* weights, double* scratch, float* losses, float* dlogp, cudaStream_t stream);

// ---- head.cu
// out[t] = log_softmax(logits[t, :])[targets[t]], or 0 where targets[t] == pad_id. No probability rows are
// written: one pass for the max, one for the sum of exponentials, per row.
void token_logprobs(const float* logits, int n_tokens, int vocab, const int32_t* targets, int pad_id,
                    float* out, cudaStream_t stream);
// dlogits[t, :] = g[t] * (onehot(targets[t]) - softmax(logits[t, :])) as T (zero rows where the target is
// pad or g[t] == 0).
template <typename T>
void token_logprobs_backward(const float* logits, int n_tokens, int vocab, const int32_t* targets, int pad_id,
                             const float* g, T* dlogits, cudaStream_t stream);

// ---- convert.cu
// dst[i] = (T) src[i] for n elements of a checkpoint tensor in dtype (raw little-endian bytes on the device).
template <typename T>
void convert_weights(const void* src, DType dtype, int64_t n, T* dst, cudaStream_t stream);
// w[r, c] *= l[r] (rows of a [rows, cols] matrix: output features), or w[r, c] *= l[c] (input features).
template <typename T>
void scale_rows(T* w, int64_t rows, int64_t cols, const float* l, cudaStream_t stream);
template <typename T>
void scale_cols(T* w, int64_t rows, int64_t cols, const float* l, cudaStream_t stream);

}  // namespace kernels
}  // namespace tfew
