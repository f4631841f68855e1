// Attention pieces that are not GEMMs.
//
// Encoder self-attention runs as two batched cuBLAS GEMMs (Q K^T into fp32 scores, P V into the context)
// around encoder_softmax, which adds the relative-position bias, masks padded keys and normalises in fp32.
// T5 does not scale scores by 1/sqrt(d_kv) (it is folded into its initialisation), so neither do we.
//
// Decoder self-attention (a handful of positions per choice) and cross-attention (a few decoder positions
// against one example's encoder output) have too few queries for GEMMs to pay off, so one warp computes one
// (query, head) with an online softmax: lanes own keys for the scores, then dimensions for the weighted sum
// of values. Cross-attention reads the keys/values of the row's example directly (computed once per
// example, shared by all its choices: nothing is copied per choice); its forward and the first pass of its
// backward stage them in shared memory, a tile at a time, for a block of queries (cross_attention_tiled_kernel).
//
// (IA)3 on keys and values: q . (l_k * k) = (l_k * q) . k and sum_j p_j (l_v * v_j) = l_v * sum_j p_j v_j,
// so the small-query kernel scales its query by l_k and its output by l_v (the adapter of the row's
// example): no pass over K/V at all, and a mixed-task batch costs nothing extra. The unfused encoder path
// (fp32 mode) scales K/V in place with ia3_scale_kv.
#include <string>
#include <type_traits>

#include "kernels/device_common.cuh"
#include "kernels/dropout.cuh"

namespace tfew {
namespace kernels {

namespace {

// --------------------------------------------------------------------------------------------------------
// relative-position bias

__global__ void relative_bias_table_kernel(const float* __restrict__ rel_emb, const int32_t* __restrict__ buckets,
                                           int span, int num_heads, float* __restrict__ table) {
  wait_for_previous_kernel();
  const int64_t n = static_cast<int64_t>(span) * num_heads;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int h = static_cast<int>(i / span), s = static_cast<int>(i % span);
    table[i] = rel_emb[static_cast<int64_t>(buckets[s]) * num_heads + h];
  }
}

// --------------------------------------------------------------------------------------------------------
// (IA)3 k/v scaling

template <typename T>
__global__ void ia3_scale_kv_kernel(T* __restrict__ buf, int ld, int k_col, int v_col, int width, int n_tokens,
                                    AdapterIndex index, int64_t k_offset, int64_t v_offset) {
  wait_for_previous_kernel();
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= width) return;
  for (int t = blockIdx.y; t < n_tokens; t += gridDim.y) {  // grid.y strides past 65535 tokens
    const int a = adapter_of_token(index, t);
    if (a < 0) continue;
    const float* l = index.adapters + a * index.adapter_stride;
    T* row = buf + static_cast<int64_t>(t) * ld;
    row[k_col + c] = from_f32<T>(to_f32(row[k_col + c]) * l[k_offset + c]);
    if (v_col >= 0) row[v_col + c] = from_f32<T>(to_f32(row[v_col + c]) * l[v_offset + c]);
  }
}

// dst = src for the q|k|v rows of n_tokens tokens (3 inner columns, both with row stride ld), k and v scaled by
// the token's adapter on the way: one pass instead of a copy and an in-place scale.
template <typename T>
__global__ void ia3_scaled_qkv_copy_kernel(const T* __restrict__ src, T* __restrict__ dst, int ld, int inner,
                                           int n_tokens, AdapterIndex index, int64_t k_offset, int64_t v_offset) {
  wait_for_previous_kernel();
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= 3 * inner) return;
  for (int t = blockIdx.y; t < n_tokens; t += gridDim.y) {
    const int64_t i = static_cast<int64_t>(t) * ld + c;
    const int a = c >= inner ? adapter_of_token(index, t) : -1;
    if (a < 0) {
      dst[i] = src[i];
    } else {
      const float* l = index.adapters + a * index.adapter_stride;
      const float scale = c < 2 * inner ? l[k_offset + c - inner] : l[v_offset + c - 2 * inner];
      dst[i] = from_f32<T>(to_f32(src[i]) * scale);
    }
  }
}

// dst[t, c] = src[t, c] * l[offset + c] for c < width (a plain copy for tokens without an adapter).
template <typename T>
__global__ void ia3_scaled_columns_copy_kernel(const T* __restrict__ src, int src_ld, T* __restrict__ dst, int dst_ld,
                                               int width, int n_tokens, AdapterIndex index, int64_t offset) {
  wait_for_previous_kernel();
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= width) return;
  for (int t = blockIdx.y; t < n_tokens; t += gridDim.y) {
    const int a = index.adapters != nullptr && index.adapter_of_example != nullptr ? adapter_of_token(index, t) : -1;
    const T v = src[static_cast<int64_t>(t) * src_ld + c];
    dst[static_cast<int64_t>(t) * dst_ld + c] =
        a < 0 ? v : from_f32<T>(to_f32(v) * index.adapters[a * index.adapter_stride + offset + c]);
  }
}

// Where row `row` of a softmax's probabilities starts in the CPU backend's numbering of that attention's
// probabilities, which the dropout masks are indexed by: the encoder's [B, H, L, L] rows are that numbering
// already; the folded cross-attention's rows are (decoder token, head), token-major, while the CPU numbers the
// cross-attention's probabilities [R, H, dec_len, enc_len].
__device__ __forceinline__ uint64_t probs_row_base(int64_t row, int len, const FoldedRows& folded) {
  if (folded.heads <= 0) return static_cast<uint64_t>(row) * len;
  const int64_t token = row / folded.heads;
  const int64_t h = row % folded.heads, r = token / folded.dec_len, i = token % folded.dec_len;
  return ((static_cast<uint64_t>(r) * folded.heads + h) * folded.dec_len + i) * len;
}

// --------------------------------------------------------------------------------------------------------
// softmax over score rows of `len` keys: one warp per row. Rows come in groups of rows_per_example (the rows
// of one example: its keys j < lengths[example] are real). With a bias table (the encoder: rows [B, H, L, L])
// the relative-position bias of head h and query i is added; without one (the folded cross-attention), none.

// kPer > 0 (len <= 32 kPer): a lane's logits are read once, into registers, for the three passes; kPer = 0: read
// again by each pass (longer rows). The same operations in the same order either way.
template <typename T, int kPer>
__global__ void masked_softmax_kernel(const float* __restrict__ scores, const float* __restrict__ bias_table,
                                      const int32_t* __restrict__ lengths, int heads, int len,
                                      int64_t rows_per_example, int64_t n_rows, DropoutSite dropout,
                                      FoldedRows folded, T* __restrict__ probs, T* __restrict__ probs_dropped) {
  wait_for_previous_kernel();
  dropout = with_seed(dropout);
  const int lane = threadIdx.x & 31;
  const int64_t row = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) >> 5;
  if (row >= n_rows) return;  // whole warps exit together: no block-level synchronisation below
  const int b = static_cast<int>(row / rows_per_example);
  const int n_keys = min(max(lengths[b], 0), len);
  const int ld = folded.ld > 0 ? folded.ld : len;  // (the folded rows' stride; columns len .. ld - 1 get 0)
  const float* s = scores + row * ld;
  const float* brow = nullptr;  // bias for key j at brow[j]: relative position j - i, offset by len - 1
  if (bias_table) {
    const int i = static_cast<int>(row % len);
    const int h = static_cast<int>((row / len) % heads);
    brow = bias_table + static_cast<int64_t>(h) * (2 * len - 1) + (len - 1 - i);
  }
  auto logit = [&](int j) { return brow ? s[j] + brow[j] : s[j]; };
  T* p = probs + row * ld;
  const uint64_t drop_base = probs_row_base(row, len, folded);

  float x[kPer > 0 ? kPer : 1];  // kPer > 0: logit, then exp(logit - m), of keys lane + 32 u
  float m = -INFINITY;
  if constexpr (kPer > 0) {
#pragma unroll
    for (int u = 0; u < kPer; ++u) {
      const int j = lane + 32 * u;
      x[u] = j < n_keys ? logit(j) : -INFINITY;
      m = fmaxf(m, x[u]);
    }
  } else {
    for (int j = lane; j < n_keys; j += 32) m = fmaxf(m, logit(j));
  }
  m = warp_max(m);
  float sum = 0.f;
  if constexpr (kPer > 0) {
#pragma unroll
    for (int u = 0; u < kPer; ++u)
      if (lane + 32 * u < n_keys) {
        x[u] = expf(x[u] - m);
        sum += x[u];
      }
  } else {
    for (int j = lane; j < n_keys; j += 32) sum += expf(logit(j) - m);
  }
  sum = warp_sum(sum);
  const float inv = sum > 0.f ? 1.f / sum : 0.f;
  auto emit = [&](int j, float v) {
    // the folded cross-attention's backward makes P' again from the stored P: both from the same rounded value
    if (folded.heads > 0) v = to_f32(from_f32<T>(v));
    const float kept = j < len ? v * dropout_scale(dropout, drop_base + j) : 0.f;  // (ld - len padding columns: 0)
    if (probs_dropped) {  // both: P (probs) and P' (probs_dropped)
      p[j] = from_f32<T>(v);
      probs_dropped[row * ld + j] = from_f32<T>(kept);
    } else {
      p[j] = from_f32<T>(kept);
    }
  };
  if constexpr (kPer > 0) {
#pragma unroll
    for (int u = 0; u < kPer; ++u) {
      const int j = lane + 32 * u;  // (ld <= 32 kPer: len <= 32 kPer, a multiple of 8, and ld rounds len up to 8)
      if (j < ld) emit(j, j < n_keys ? x[u] * inv : 0.f);
    }
  } else {
    for (int j = lane; j < ld; j += 32) emit(j, j < n_keys ? expf(logit(j) - m) * inv : 0.f);
  }
}

// Its backward, in place: probs holds P (without dropout) on entry and dS on return, where
// dP = drop * dP' (dP' = dprobs, the gradient of the dropped probabilities), D = sum_j P_j dP_j and
// dS_j = P_j (dP_j - D): the gradient of the scores. One warp per row, as the forward.
template <typename T, int kPer>
__global__ void softmax_backward_kernel(const float* __restrict__ dprobs, T* __restrict__ probs,
                                        const int32_t* __restrict__ lengths, int len, int64_t rows_per_example,
                                        int64_t n_rows, DropoutSite dropout, FoldedRows folded) {
  wait_for_previous_kernel();
  dropout = with_seed(dropout);
  const int lane = threadIdx.x & 31;
  const int64_t row = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) >> 5;
  if (row >= n_rows) return;  // whole warps exit together
  const int b = static_cast<int>(row / rows_per_example);
  const int n_keys = min(max(lengths[b], 0), len);
  const int ld = folded.ld > 0 ? folded.ld : len;  // (as the forward's)
  const float* dp = dprobs + row * ld;
  T* p = probs + row * ld;
  const uint64_t drop_base = probs_row_base(row, len, folded);
  // kPer > 0 (len <= 32 kPer): P, the dropout scale and dP' of keys lane + 32 u held in registers between the two
  // passes (the factors, not their product: the second pass's drop dP' - D then contracts into one FMA as the
  // loop form's does, so both give the same bits on the GPU)
  float pv[kPer > 0 ? kPer : 1], sv[kPer > 0 ? kPer : 1], dpv[kPer > 0 ? kPer : 1];
  float D = 0.f;
  if constexpr (kPer > 0) {
#pragma unroll
    for (int u = 0; u < kPer; ++u) {
      const int j = lane + 32 * u;
      pv[u] = sv[u] = dpv[u] = 0.f;
      if (j < n_keys) {
        sv[u] = dropout_scale(dropout, drop_base + j);
        pv[u] = to_f32(p[j]);
        dpv[u] = dp[j];
        D += pv[u] * sv[u] * dpv[u];
      }
    }
  } else {
    for (int j = lane; j < n_keys; j += 32) D += to_f32(p[j]) * dropout_scale(dropout, drop_base + j) * dp[j];
  }
  D = warp_sum(D);
  if constexpr (kPer > 0) {
#pragma unroll
    for (int u = 0; u < kPer; ++u) {
      const int j = lane + 32 * u;
      if (j < ld) p[j] = from_f32<T>(j < n_keys ? pv[u] * (sv[u] * dpv[u] - D) : 0.f);
    }
  } else {
    for (int j = lane; j < ld; j += 32) {
      const float ds = j < n_keys ? to_f32(p[j]) * (dropout_scale(dropout, drop_base + j) * dp[j] - D) : 0.f;
      p[j] = from_f32<T>(ds);
    }
  }
}

// P' = dropout(P) from the stored P (the folded cross-attention's backward), as its forward made P'.
template <typename T>
__global__ void dropout_probs_kernel(const T* __restrict__ probs, int64_t n_rows, int len, DropoutSite dropout,
                                     FoldedRows folded, T* __restrict__ probs_dropped) {
  wait_for_previous_kernel();
  dropout = with_seed(dropout);
  const int ld = folded.ld > 0 ? folded.ld : len;  // (columns len .. ld - 1: 0, as the softmax wrote them)
  // a warp per row (grid-stride over rows): the row's mask numbering (divisions) found once per row, not per element
  const int lane = threadIdx.x & 31, warps_per_block = blockDim.x >> 5;
  const int64_t n_warps = static_cast<int64_t>(gridDim.x) * warps_per_block;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * warps_per_block + (threadIdx.x >> 5); row < n_rows;
       row += n_warps) {
    const uint64_t base = probs_row_base(row, len, folded);
    const T* p = probs + row * ld;
    T* out = probs_dropped + row * ld;
    for (int j = lane; j < ld; j += 32)
      out[j] = j < len ? from_f32<T>(to_f32(p[j]) * dropout_scale(dropout, base + j)) : from_f32<T>(0.f);
  }
}

// The (IA)3 step of the encoder attention backward: the GEMMs gave dK~ and dV~, the gradients of the scaled
// keys and values K~ = l_k * K, V~ = l_v * V. Writes dK = l_k * dK~, dV = l_v * dV~ (as T, into the q|k|v
// gradient) and the (IA)3 contributions K * dK~ and V * dV~ (0 for tokens without an adapter), per token or
// summed per chunk (Ia3Sums; one block row per row of sums, as ffn_backward_kernel), which ia3_grad_reduce
// sums per adapter. Per token, gk_out / gv_out may be g_k / g_v.
template <typename T>
__global__ void ia3_kv_backward_kernel(const T* __restrict__ qkv, int ld, int k_col, int v_col, int width,
                                       int n_tokens, AdapterIndex index, int64_t k_offset, int64_t v_offset,
                                       const float* g_k, const float* g_v, int g_ld, T* __restrict__ dqkv, int dq_ld,
                                       Ia3Sums sums, float* gk_out, float* gv_out) {
  wait_for_previous_kernel();
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= width) return;
  for (int64_t r = blockIdx.y; r < sums.rows(n_tokens); r += gridDim.y) {
    int t0, t1;
    sums.tokens_of(r, t0, t1);
    float ck = 0.f, cv = 0.f;
    for (int t = t0; t < t1; ++t) {
      const int a = index.adapters != nullptr && index.adapter_of_example != nullptr ? adapter_of_token(index, t) : -1;
      const float* l = a >= 0 ? index.adapters + a * index.adapter_stride : nullptr;
      const int64_t gi = static_cast<int64_t>(t) * g_ld + c;
      const float dk = g_k[gi];
      T* drow = dqkv + static_cast<int64_t>(t) * dq_ld;
      const T* row = qkv + static_cast<int64_t>(t) * ld;
      drow[k_col + c] = from_f32<T>(l ? l[k_offset + c] * dk : dk);
      if (l) ck += to_f32(row[k_col + c]) * dk;
      if (v_col >= 0) {
        const float dv = g_v[gi];
        drow[v_col + c] = from_f32<T>(l ? l[v_offset + c] * dv : dv);
        if (l) cv += to_f32(row[v_col + c]) * dv;
      }
    }
    gk_out[r * width + c] = ck;
    if (v_col >= 0) gv_out[r * width + c] = cv;
  }
}

// The two (IA)3 passes of the cuBLAS encoder attention backward with kVec consecutive columns per thread (8 of bf16,
// 4 of fp32; 16-byte accesses): the one-column forms move 2 bytes per access, the form in which the FFN activation
// ran at a fifth of the H200's bandwidth. Same arithmetic, same token order, same results.
template <typename T, int kVec>
__global__ void ia3_scaled_qkv_copy_vec_kernel(const T* __restrict__ src, T* __restrict__ dst, int ld, int inner,
                                               int n_tokens, AdapterIndex index, int64_t k_offset, int64_t v_offset) {
  wait_for_previous_kernel();
  const int c = kVec * (blockIdx.x * blockDim.x + threadIdx.x);
  if (c >= 3 * inner) return;  // (inner % kVec == 0: a vector lies within q, k or v)
  for (int t = blockIdx.y; t < n_tokens; t += gridDim.y) {
    const int64_t i = static_cast<int64_t>(t) * ld + c;
    float v[kVec];
    load_vec<kVec>(src + i, v);
    const int a = c >= inner ? adapter_of_token(index, t) : -1;
    if (a >= 0) {
      const float* l = index.adapters + a * index.adapter_stride + (c < 2 * inner ? k_offset + c - inner : v_offset + c - 2 * inner);
      for (int u = 0; u < kVec; ++u) v[u] *= l[u];
    }
    store_vec<kVec>(dst + i, v);
  }
}

// ia3_scale_kv_kernel with kVec columns per thread (the folded cross-attention's l_k on queries and l_v on contexts).
template <typename T, int kVec>
__global__ void ia3_scale_kv_vec_kernel(T* __restrict__ buf, int ld, int k_col, int v_col, int width, int n_tokens,
                                        AdapterIndex index, int64_t k_offset, int64_t v_offset) {
  wait_for_previous_kernel();
  const int c = kVec * (blockIdx.x * blockDim.x + threadIdx.x);
  if (c >= width) return;
  for (int t = blockIdx.y; t < n_tokens; t += gridDim.y) {
    const int a = adapter_of_token(index, t);
    if (a < 0) continue;
    const float* l = index.adapters + a * index.adapter_stride;
    T* row = buf + static_cast<int64_t>(t) * ld + c;
    auto scale = [&](int col, int64_t offset) {
      float v[kVec];
      load_vec<kVec>(row + col, v);
      for (int u = 0; u < kVec; ++u) v[u] *= l[offset + c + u];
      store_vec<kVec>(row + col, v);
    };
    scale(k_col, k_offset);
    if (v_col >= 0) scale(v_col, v_offset);
  }
}

template <typename T, int kVec>
__global__ void ia3_kv_backward_vec_kernel(const T* __restrict__ qkv, int ld, int k_col, int v_col, int width,
                                           int n_tokens, AdapterIndex index, int64_t k_offset, int64_t v_offset,
                                           const float* g_k, const float* g_v, int g_ld, T* __restrict__ dqkv,
                                           int dq_ld, Ia3Sums sums, float* gk_out, float* gv_out) {
  wait_for_previous_kernel();
  const int c = kVec * (blockIdx.x * blockDim.x + threadIdx.x);
  if (c >= width) return;
  for (int64_t r = blockIdx.y; r < sums.rows(n_tokens); r += gridDim.y) {
    int t0, t1;
    sums.tokens_of(r, t0, t1);
    float ck[kVec], cv[kVec];
    for (int u = 0; u < kVec; ++u) ck[u] = cv[u] = 0.f;
    for (int t = t0; t < t1; ++t) {
      const int a = index.adapters != nullptr && index.adapter_of_example != nullptr ? adapter_of_token(index, t) : -1;
      const float* l = a >= 0 ? index.adapters + a * index.adapter_stride : nullptr;
      const int64_t gi = static_cast<int64_t>(t) * g_ld + c;
      T* drow = dqkv + static_cast<int64_t>(t) * dq_ld;
      const T* row = qkv + static_cast<int64_t>(t) * ld;
      // one of k and v: the gradient of the unscaled columns at col and the token's contributions x * g
      auto columns = [&](int col, int64_t offset, const float* g_scaled, float (&contribution)[kVec]) {
        float g[kVec], x[kVec], d[kVec];
        load_vec<kVec>(g_scaled + gi, g);
        for (int u = 0; u < kVec; ++u) d[u] = l ? l[offset + c + u] * g[u] : g[u];
        store_vec<kVec>(drow + col + c, d);
        if (l) {
          load_vec<kVec>(row + col + c, x);
          for (int u = 0; u < kVec; ++u) contribution[u] += x[u] * g[u];
        }
      };
      columns(k_col, k_offset, g_k, ck);
      if (v_col >= 0) columns(v_col, v_offset, g_v, cv);
    }
    store_vec<kVec>(gk_out + r * width + c, ck);
    if (v_col >= 0) store_vec<kVec>(gv_out + r * width + c, cv);
  }
}

// --------------------------------------------------------------------------------------------------------
// small-query attention: one warp per (query token, head)

// The (IA)3 key and value scales of head head_col / d_kv for example `example`'s adapter (null: none).
__device__ __forceinline__ void adapter_vectors(const AdapterIndex& index, int example, int64_t head_col,
                                                int64_t k_offset, int64_t v_offset, const float** l_k,
                                                const float** l_v) {
  *l_k = nullptr;
  *l_v = nullptr;
  if (index.adapters == nullptr || index.adapter_of_example == nullptr) return;
  const int a = index.adapter_of_example[example];
  if (a < 0) return;
  const float* l = index.adapters + a * index.adapter_stride;
  *l_k = l + k_offset + head_col;
  *l_v = l + v_offset + head_col;
}


// Dot product of the query (fp32, shared memory) with one key row, read with 16-byte loads when aligned.
template <typename T>
__device__ __forceinline__ float dot_row(const float* q, const T* __restrict__ row, int d_kv) {
  float s = 0.f;
  constexpr int kVec = 16 / sizeof(T);
  if ((d_kv % kVec) == 0 && (reinterpret_cast<uintptr_t>(row) & 15) == 0) {
    const uint4* r4 = as_vector<uint4>(row);
    for (int v = 0; v < d_kv / kVec; ++v) {
      uint4 packed = __ldg(r4 + v);
      const T* e = reinterpret_cast<const T*>(&packed);
#pragma unroll
      for (int u = 0; u < kVec; ++u) s += q[v * kVec + u] * to_f32(e[u]);
    }
  } else {
    for (int d = 0; d < d_kv; ++d) s += q[d] * to_f32(row[d]);
  }
  return s;
}

constexpr int kSmallAttnWarps = 8;  // queries per block: neighbouring tokens share keys in L1

// DPL = dimensions per lane = ceil(d_kv / 32). Cross-attention (the fallback of cross_attention for operands the
// tiled kernel cannot take): keys are the encoder tokens j < enc_lengths[b] of example b. (The decoder's
// self-attention has its own kernel, decoder_self_attention_kernel.)
template <typename T, int DPL>
__global__ void small_attention_kernel(const T* __restrict__ q, int q_ld, const T* __restrict__ k,
                                       const T* __restrict__ v, int kv_ld, T* __restrict__ out, int out_ld,
                                       int n_queries, int d_kv, int dec_len, const int32_t* __restrict__ row_example,
                                       const int32_t* __restrict__ enc_lengths, int enc_len, AdapterIndex index,
                                       int64_t k_offset, int64_t v_offset, DropoutSite dropout) {
  wait_for_previous_kernel();
  dropout = with_seed(dropout);
  extern __shared__ float q_smem[];  // [kSmallAttnWarps][d_kv]
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int t = blockIdx.x * kSmallAttnWarps + warp;
  const int h = blockIdx.y;
  if (t >= n_queries) return;  // warp-uniform; only __syncwarp below

  const int r = t / dec_len, i = t % dec_len;
  const int b = row_example[r];
  const int64_t head_col = static_cast<int64_t>(h) * d_kv;
  const float *l_k, *l_v;
  adapter_vectors(index, b, head_col, k_offset, v_offset, &l_k, &l_v);

  float* qs = q_smem + warp * d_kv;
  const T* qrow = q + static_cast<int64_t>(t) * q_ld + head_col;
  for (int d = lane; d < d_kv; d += 32) qs[d] = to_f32(qrow[d]) * (l_k ? l_k[d] : 1.f);
  __syncwarp();

  const int n_keys = min(max(enc_lengths[b], 0), enc_len);
  const int64_t key_base = static_cast<int64_t>(b) * enc_len;

  // dropout index base: position of (row r, head h, query i) in the CPU's [R, H, dec_len, enc_len] probabilities
  const uint64_t drop_base = ((static_cast<uint64_t>(r) * gridDim.y + h) * dec_len + i) * enc_len;
  float m = -INFINITY, l = 0.f;
  float acc[DPL];
#pragma unroll
  for (int u = 0; u < DPL; ++u) acc[u] = 0.f;

  for (int j0 = 0; j0 < n_keys; j0 += 32) {
    const int j = j0 + lane;
    float s = -INFINITY;
    if (j < n_keys) s = dot_row(qs, k + (key_base + j) * kv_ld + head_col, d_kv);
    const float m_new = fmaxf(m, warp_max(s));  // finite: key j0 is always valid
    const float p = j < n_keys ? expf(s - m_new) : 0.f;
    const float rescale = expf(m - m_new);  // 0 on the first tile (m = -inf)
    l = l * rescale + warp_sum(p);  // the normaliser counts dropped keys too (dropout follows the softmax)
    const float pd = j < n_keys ? p * dropout_scale(dropout, drop_base + j) : 0.f;
#pragma unroll
    for (int u = 0; u < DPL; ++u) acc[u] *= rescale;
    const int tile = min(32, n_keys - j0);
    for (int jj = 0; jj < tile; ++jj) {
      const float pj = __shfl_sync(kFullMask, pd, jj);
      const T* vrow = v + (key_base + j0 + jj) * kv_ld + head_col;
#pragma unroll
      for (int u = 0; u < DPL; ++u) {
        const int d = lane + 32 * u;
        if (d < d_kv) acc[u] += pj * to_f32(vrow[d]);
      }
    }
    m = m_new;
  }

  const float inv = l > 0.f ? 1.f / l : 0.f;
  T* orow = out + static_cast<int64_t>(t) * out_ld + head_col;
#pragma unroll
  for (int u = 0; u < DPL; ++u) {
    const int d = lane + 32 * u;
    if (d < d_kv) orow[d] = from_f32<T>(acc[u] * inv * (l_v ? l_v[d] : 1.f));
  }
}

// Calls launch(std::integral_constant<int, DPL>()) with DPL = dimensions per lane = ceil(d_kv / 32) rounded up to
// a power of two: the small-query kernels' register arrays are sized at compile time.
template <typename Launch>
void with_dims_per_lane(int d_kv, Launch&& launch) {
  if (d_kv > kMaxDKv) fail(ErrorCode::InvalidModel, "d_kv " + std::to_string(d_kv) + " exceeds the CUDA backend's limit of " + std::to_string(kMaxDKv));
  if (d_kv <= 32) launch(std::integral_constant<int, 1>());
  else if (d_kv <= 64) launch(std::integral_constant<int, 2>());
  else if (d_kv <= 128) launch(std::integral_constant<int, 4>());
  else launch(std::integral_constant<int, 8>());
}

template <typename T>
void launch_small_attention(const T* q, int q_ld, const T* k, const T* v, int kv_ld, T* out, int out_ld,
                            int n_queries, int heads, int d_kv, int dec_len, const int32_t* row_example,
                            const int32_t* enc_lengths, int enc_len, const AdapterIndex& index, int64_t k_offset,
                            int64_t v_offset, const DropoutSite& dropout, cudaStream_t stream) {
  if (n_queries <= 0) return;
  const dim3 grid((n_queries + kSmallAttnWarps - 1) / kSmallAttnWarps, heads);
  const dim3 block(32 * kSmallAttnWarps);
  const size_t smem = sizeof(float) * kSmallAttnWarps * d_kv;
  with_dims_per_lane(d_kv, [&](auto dpl) {
    TFEW_LAUNCH(grid, block, smem, stream, small_attention_kernel<T, decltype(dpl)::value>)(
        q, q_ld, k, v, kv_ld, out, out_ld, n_queries, d_kv, dec_len, row_example, enc_lengths, enc_len, index,
        k_offset, v_offset, dropout);
  });
  TFEW_CUDA_CHECK_LAUNCH("small_attention_kernel");
}

// --------------------------------------------------------------------------------------------------------
// decoder self-attention (causal, a choice's few tokens): one warp per (query token, head), lanes over the head's
// dimensions (lane owns dimensions DPL lane .. DPL lane + DPL - 1). Keys go by chunks of 8: every k and v element
// of a chunk is requested before any is used and the chunk's 8 dot products are summed across the lanes together,
// so a chunk costs about one memory latency. (small_attention_kernel, lanes over keys, read a key row with a chain
// of dependent loads in each lane and then the value rows one after another: at 8 decoder positions it took
// ~33 us a layer at RANK-3B-B32 and ~12 us at TRAIN-3B on an H200, session 19's ncu, for ~2 MFLOP.)
constexpr int kSelfKeysPerChunk = 8;

template <typename T, int DPL>
__global__ void decoder_self_attention_kernel(const T* __restrict__ qkv, int ld, int inner, T* __restrict__ out,
                                              int out_ld, int n_queries, int d_kv, int dec_len,
                                              const float* __restrict__ bias_table,
                                              const int32_t* __restrict__ row_example, AdapterIndex index,
                                              int64_t k_offset, int64_t v_offset, DropoutSite dropout) {
  wait_for_previous_kernel();
  dropout = with_seed(dropout);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int t = blockIdx.x * kSmallAttnWarps + warp;
  const int h = blockIdx.y;
  if (t >= n_queries) return;  // warp-uniform; no synchronisation below but the warp's own shuffles
  const int r = t / dec_len, i = t % dec_len;
  const int64_t head_col = static_cast<int64_t>(h) * d_kv;
  const float *l_k, *l_v;
  adapter_vectors(index, row_example[r], head_col, k_offset, v_offset, &l_k, &l_v);
  // q~ = l_k * q, this lane's dimensions (0 past d_kv, which adds nothing to the dot products)
  float qv[DPL];
  const T* qrow = qkv + static_cast<int64_t>(t) * ld + head_col;
#pragma unroll
  for (int u = 0; u < DPL; ++u) {
    const int d = DPL * lane + u;
    qv[u] = d < d_kv ? to_f32(qrow[d]) * (l_k ? l_k[d] : 1.f) : 0.f;
  }
  const int n_keys = i + 1;  // causal: positions 0 .. i of the same row
  const T* k_first = qkv + static_cast<int64_t>(r) * dec_len * ld + inner + head_col;
  const T* v_first = k_first + inner;
  const float* brow = bias_table + static_cast<int64_t>(h) * (2 * dec_len - 1) + (dec_len - 1 - i);
  // dropout index base: position of (row r, head h, query i) in the CPU's [R, H, dec_len, dec_len] probabilities
  const uint64_t drop_base = ((static_cast<uint64_t>(r) * gridDim.y + h) * dec_len + i) * dec_len;

  float m = -INFINITY, l = 0.f;
  float acc[DPL];
#pragma unroll
  for (int u = 0; u < DPL; ++u) acc[u] = 0.f;
  for (int j0 = 0; j0 < n_keys; j0 += kSelfKeysPerChunk) {
    float kc[kSelfKeysPerChunk][DPL], vc[kSelfKeysPerChunk][DPL];
#pragma unroll
    for (int c = 0; c < kSelfKeysPerChunk; ++c)
#pragma unroll
      for (int u = 0; u < DPL; ++u) {
        const int j = j0 + c, d = DPL * lane + u;
        const bool real = j < n_keys && d < d_kv;
        kc[c][u] = real ? to_f32(k_first[static_cast<int64_t>(j) * ld + d]) : 0.f;
        vc[c][u] = real ? to_f32(v_first[static_cast<int64_t>(j) * ld + d]) : 0.f;
      }
    float s[kSelfKeysPerChunk];
#pragma unroll
    for (int c = 0; c < kSelfKeysPerChunk; ++c) {
      s[c] = 0.f;
#pragma unroll
      for (int u = 0; u < DPL; ++u) s[c] += qv[u] * kc[c][u];
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1)  // (butterfly: every lane ends with each total)
#pragma unroll
      for (int c = 0; c < kSelfKeysPerChunk; ++c) s[c] += __shfl_xor_sync(kFullMask, s[c], offset);
    float chunk_max = -INFINITY;
#pragma unroll
    for (int c = 0; c < kSelfKeysPerChunk; ++c) {
      s[c] = j0 + c < n_keys ? s[c] + brow[j0 + c] : -INFINITY;
      chunk_max = fmaxf(chunk_max, s[c]);
    }
    const float m_new = fmaxf(m, chunk_max);  // finite: key j0 is always real
    const float rescale = expf(m - m_new);    // 0 on the first chunk (m = -inf)
    float p_sum = 0.f, pd[kSelfKeysPerChunk];
#pragma unroll
    for (int c = 0; c < kSelfKeysPerChunk; ++c) {
      const int j = j0 + c;
      const float p = j < n_keys ? expf(s[c] - m_new) : 0.f;
      p_sum += p;  // the normaliser counts dropped keys too (dropout follows the softmax)
      pd[c] = j < n_keys ? p * dropout_scale(dropout, drop_base + j) : 0.f;
    }
    l = l * rescale + p_sum;
#pragma unroll
    for (int u = 0; u < DPL; ++u) {
      float a = acc[u] * rescale;
#pragma unroll
      for (int c = 0; c < kSelfKeysPerChunk; ++c) a += pd[c] * vc[c][u];
      acc[u] = a;
    }
    m = m_new;
  }

  const float inv = l > 0.f ? 1.f / l : 0.f;
  T* orow = out + static_cast<int64_t>(t) * out_ld + head_col;
#pragma unroll
  for (int u = 0; u < DPL; ++u) {
    const int d = DPL * lane + u;
    if (d < d_kv) orow[d] = from_f32<T>(acc[u] * inv * (l_v ? l_v[d] : 1.f));
  }
}

// --------------------------------------------------------------------------------------------------------
// attention backward (training)
//
// Notation for one query i (row of sequence `seq`) and head h: q~ = l_k * q, s_j = q~ . k_j (+ bias), p = softmax
// over the visible keys, p'_j = p_j * drop_j, o~ = sum_j p'_j v_j, output = l_v * o~. With g = dL/d output and
// g~ = l_v * g: dp_j = drop_j (g~ . v_j), D = sum_j p_j dp_j, ds_j = p_j (dp_j - D). Then
//   dq = l_k * sum_j ds_j k_j               (pass 1, query-major)       dl_k += q * (sum_j ds_j k_j)
//   dk_j = l_k * sum_i ds_ij q_i            (pass 2, key-major)         dl_v += g * o~
//   dv_j = l_v * sum_i p'_ij g_i
// which equals the CPU backend's dK/dV chain through the scaled k and v.

// Where one query's keys are, its example, and where its dropout indices start.
struct QueryView {
  int64_t key_base;  // token index of key 0
  int n_keys;
  int example;
  const float* bias_row;  // bias of key j at bias_row[j], or null
  uint64_t drop_base;
};

__device__ __forceinline__ QueryView query_view(const AttentionGeometry& g, int t, int h) {
  QueryView v;
  const int seq = t / g.q_len, i = t % g.q_len;
  switch (g.kind) {
    case AttentionKind::DecoderSelf:
      v.example = g.row_example[seq];
      v.key_base = static_cast<int64_t>(seq) * g.k_len;
      v.n_keys = i + 1;
      break;
    default:  // Cross
      v.example = g.row_example[seq];
      v.key_base = static_cast<int64_t>(v.example) * g.k_len;
      v.n_keys = min(max(g.key_lengths[v.example], 0), g.k_len);
      break;
  }
  v.bias_row = g.bias_table ? g.bias_table + static_cast<int64_t>(h) * (2 * g.q_len - 1) + (g.q_len - 1 - i) : nullptr;
  v.drop_base = ((static_cast<uint64_t>(seq) * g.heads + h) * g.q_len + i) * g.k_len;
  return v;
}

constexpr int kBackWarps = 8;

template <typename T, int DPL>
__global__ void attention_backward_query_kernel(AttentionGeometry g, const T* __restrict__ q, int q_ld,
                                                const T* __restrict__ k, const T* __restrict__ v, int kv_ld,
                                                const float* __restrict__ dout, AdapterIndex index, int64_t k_offset,
                                                int64_t v_offset, int n_queries, T* __restrict__ dq, int dq_ld,
                                                float* __restrict__ g_k, float* __restrict__ g_v,
                                                float* __restrict__ stats) {
  wait_for_previous_kernel();
  g.dropout = with_seed(g.dropout);
  extern __shared__ float smem[];  // per warp: q~ [d_kv], g~ [d_kv]
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int t = blockIdx.x * kBackWarps + warp;
  const int h = blockIdx.y;
  if (t >= n_queries) return;  // warp-uniform
  const int d_kv = g.d_kv, inner = g.heads * g.d_kv;
  const int64_t head_col = static_cast<int64_t>(h) * d_kv;
  const QueryView qv = query_view(g, t, h);
  const float *l_k, *l_v;
  adapter_vectors(index, qv.example, head_col, k_offset, v_offset, &l_k, &l_v);

  float* qs = smem + warp * 2 * d_kv;
  float* gs = qs + d_kv;
  const T* qrow = q + static_cast<int64_t>(t) * q_ld + head_col;
  const float* grow = dout + static_cast<int64_t>(t) * inner + head_col;
  for (int d = lane; d < d_kv; d += 32) {
    qs[d] = to_f32(qrow[d]) * (l_k ? l_k[d] : 1.f);
    gs[d] = grow[d] * (l_v ? l_v[d] : 1.f);
  }
  __syncwarp();

  auto score = [&](int j) {
    const T* krow = k + (qv.key_base + j) * kv_ld + head_col;
    const float s = dot_row(qs, krow, d_kv);  // q~ . k
    return qv.bias_row ? s + qv.bias_row[j] : s;
  };

  // pass a: softmax statistics. The first 32 keys' scores, and in pass b their dp, stay in registers for the later
  // passes (the same values: recomputing gives the same bits); a decoder self-attention row has no more keys than
  // the choice's tokens, and each recomputation is a dot product read from global memory
  float m = -INFINITY, l = 0.f, s_first = -INFINITY, dp_first = 0.f;
  for (int j0 = 0; j0 < qv.n_keys; j0 += 32) {
    const int j = j0 + lane;
    const float s = j < qv.n_keys ? score(j) : -INFINITY;
    if (j0 == 0) s_first = s;
    const float m_new = fmaxf(m, warp_max(s));
    l = l * expf(m - m_new) + warp_sum(j < qv.n_keys ? expf(s - m_new) : 0.f);
    m = m_new;
  }
  const float inv_l = l > 0.f ? 1.f / l : 0.f;

  // pass b: D = sum_j p_j dp_j and o~ = sum_j p'_j v_j
  float o[DPL];
#pragma unroll
  for (int u = 0; u < DPL; ++u) o[u] = 0.f;
  float dsum = 0.f;
  for (int j0 = 0; j0 < qv.n_keys; j0 += 32) {
    const int j = j0 + lane;
    float p = 0.f, pd = 0.f;
    if (j < qv.n_keys) {
      p = expf((j0 == 0 ? s_first : score(j)) - m) * inv_l;
      const float drop = dropout_scale(g.dropout, qv.drop_base + j);
      pd = p * drop;
      const float dpv = dot_row(gs, v + (qv.key_base + j) * kv_ld + head_col, d_kv);
      if (j0 == 0) dp_first = dpv;
      dsum += p * drop * dpv;
    }
    const int tile = min(32, qv.n_keys - j0);
    for (int jj = 0; jj < tile; ++jj) {
      const float pj = __shfl_sync(kFullMask, pd, jj);
      const T* vrow = v + (qv.key_base + j0 + jj) * kv_ld + head_col;
#pragma unroll
      for (int u = 0; u < DPL; ++u) {
        const int d = lane + 32 * u;
        if (d < d_kv) o[u] += pj * to_f32(vrow[d]);
      }
    }
  }
  const float D = warp_sum(dsum);

  // pass c: dq~ = sum_j ds_j k_j
  float dqt[DPL];
#pragma unroll
  for (int u = 0; u < DPL; ++u) dqt[u] = 0.f;
  for (int j0 = 0; j0 < qv.n_keys; j0 += 32) {
    const int j = j0 + lane;
    float ds = 0.f;
    if (j < qv.n_keys) {
      const float p = expf((j0 == 0 ? s_first : score(j)) - m) * inv_l;
      const float dp = dropout_scale(g.dropout, qv.drop_base + j) *
                       (j0 == 0 ? dp_first : dot_row(gs, v + (qv.key_base + j) * kv_ld + head_col, d_kv));
      ds = p * (dp - D);
    }
    const int tile = min(32, qv.n_keys - j0);
    for (int jj = 0; jj < tile; ++jj) {
      const float dsj = __shfl_sync(kFullMask, ds, jj);
      const T* krow = k + (qv.key_base + j0 + jj) * kv_ld + head_col;
#pragma unroll
      for (int u = 0; u < DPL; ++u) {
        const int d = lane + 32 * u;
        if (d < d_kv) dqt[u] += dsj * to_f32(krow[d]);
      }
    }
  }

  T* dqrow = dq + static_cast<int64_t>(t) * dq_ld + head_col;
  float* gkrow = g_k + static_cast<int64_t>(t) * inner + head_col;
  float* gvrow = g_v + static_cast<int64_t>(t) * inner + head_col;
#pragma unroll
  for (int u = 0; u < DPL; ++u) {
    const int d = lane + 32 * u;
    if (d < d_kv) {
      // dq = l_k * sum_j ds_j k_j (with prescaled keys this leaves out their rounding: linear, not amplified)
      dqrow[d] = from_f32<T>(dqt[u] * (l_k ? l_k[d] : 1.f));
      gkrow[d] = to_f32(qrow[d]) * dqt[u];
      gvrow[d] = grow[d] * o[u];
    }
  }
  if (lane == 0) {
    float* st = stats + (static_cast<int64_t>(t) * g.heads + h) * 3;
    st[0] = m;
    st[1] = inv_l;
    st[2] = D;
  }
}

template <typename T, int DPL>
__global__ void attention_backward_key_kernel(AttentionGeometry g, const T* __restrict__ q, int q_ld,
                                              const T* __restrict__ k, const T* __restrict__ v, int kv_ld,
                                              const float* __restrict__ dout, AdapterIndex index, int64_t k_offset,
                                              int64_t v_offset, const float* __restrict__ stats, int n_keys_total,
                                              T* __restrict__ dk, T* __restrict__ dv, int dkv_ld) {
  wait_for_previous_kernel();
  g.dropout = with_seed(g.dropout);
  extern __shared__ float smem[];  // per warp: l_k * k_j [d_kv], l_v * v_j [d_kv]
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int u_tok = blockIdx.x * kBackWarps + warp;
  const int h = blockIdx.y;
  if (u_tok >= n_keys_total) return;  // warp-uniform
  const int d_kv = g.d_kv, inner = g.heads * g.d_kv;
  const int64_t head_col = static_cast<int64_t>(h) * d_kv;
  const int kseq = u_tok / g.k_len, j = u_tok % g.k_len;

  // Which queries read key j: their token range is [q_first, q_first + n_q) with positions i in
  // [i_first, q_len) of each sequence (decoder self: causal, only i >= j).
  int example, seq_first, n_seq, i_first = 0;
  bool valid;
  switch (g.kind) {
    case AttentionKind::DecoderSelf:
      example = g.row_example[kseq];
      valid = true;
      seq_first = kseq;
      n_seq = 1;
      i_first = j;
      break;
    default:  // Cross: every decoder position of every row of the example
      example = kseq;
      valid = j < min(max(g.key_lengths[kseq], 0), g.k_len);
      seq_first = g.row_start[kseq];
      n_seq = g.row_start[kseq + 1] - seq_first;
      break;
  }
  T* dkrow = dk + static_cast<int64_t>(u_tok) * dkv_ld + head_col;
  T* dvrow = dv + static_cast<int64_t>(u_tok) * dkv_ld + head_col;
  if (!valid) {
    for (int d = lane; d < d_kv; d += 32) {
      dkrow[d] = from_f32<T>(0.f);
      dvrow[d] = from_f32<T>(0.f);
    }
    return;
  }
  const float *l_k, *l_v;
  adapter_vectors(index, example, head_col, k_offset, v_offset, &l_k, &l_v);
  float* ks = smem + warp * 2 * d_kv;
  float* vs = ks + d_kv;
  const T* krow = k + static_cast<int64_t>(u_tok) * kv_ld + head_col;
  const T* vrow = v + static_cast<int64_t>(u_tok) * kv_ld + head_col;
  for (int d = lane; d < d_kv; d += 32) {
    ks[d] = to_f32(krow[d]) * (l_k ? l_k[d] : 1.f);  // q . (l_k k) = q~ . k
    vs[d] = to_f32(vrow[d]) * (l_v ? l_v[d] : 1.f);  // g . (l_v v) = g~ . v
  }
  __syncwarp();

  const int per_seq = g.q_len - i_first;
  const int n_q = n_seq * per_seq;
  float ak[DPL], av[DPL];
#pragma unroll
  for (int u = 0; u < DPL; ++u) ak[u] = av[u] = 0.f;
  for (int q0 = 0; q0 < n_q; q0 += 32) {
    const int qq = q0 + lane;
    float ds = 0.f, pd = 0.f;
    int64_t tq = 0;
    if (qq < n_q) {
      const int seq = seq_first + qq / per_seq, i = i_first + qq % per_seq;
      tq = static_cast<int64_t>(seq) * g.q_len + i;
      float s = dot_row(ks, q + tq * q_ld + head_col, d_kv);
      if (g.bias_table) s += g.bias_table[static_cast<int64_t>(h) * (2 * g.q_len - 1) + (j - i + g.q_len - 1)];
      const float* st = stats + (tq * g.heads + h) * 3;
      const float p = expf(s - st[0]) * st[1];
      const float drop = dropout_scale(g.dropout, ((static_cast<uint64_t>(seq) * g.heads + h) * g.q_len + i) * g.k_len + j);
      const float dp = drop * dot_row(vs, dout + tq * inner + head_col, d_kv);
      ds = p * (dp - st[2]);
      pd = p * drop;
    }
    const int tile = min(32, n_q - q0);
    for (int jj = 0; jj < tile; ++jj) {
      const float dsj = __shfl_sync(kFullMask, ds, jj);
      const float pdj = __shfl_sync(kFullMask, pd, jj);
      const int64_t tj = __shfl_sync(kFullMask, tq, jj);
      const T* qrow = q + tj * q_ld + head_col;
      const float* grow = dout + tj * inner + head_col;
#pragma unroll
      for (int u = 0; u < DPL; ++u) {
        const int d = lane + 32 * u;
        if (d < d_kv) {
          ak[u] += dsj * to_f32(qrow[d]);
          av[u] += pdj * grow[d];
        }
      }
    }
  }
#pragma unroll
  for (int u = 0; u < DPL; ++u) {
    const int d = lane + 32 * u;
    if (d < d_kv) {
      dkrow[d] = from_f32<T>(ak[u] * (l_k ? l_k[d] : 1.f));
      dvrow[d] = from_f32<T>(av[u] * (l_v ? l_v[d] : 1.f));
    }
  }
}

// ---- cross-attention, a block per (kCrossQueries query tokens, head): forward and pass 1 of the backward
// small_attention_kernel and attention_backward_query_kernel read every key and value row from global memory
// once per query, each value row a load that the next step waits for: with few queries they are latency-bound
// (RANK-3B-B1 with precomputed keys and values, 16 tokens x 32 heads: ~0.13 ms a layer on an H200 in session 12,
// for 2 MiB of keys and values). Here a block copies a tile of its example's keys and values to shared memory
// with coalesced 16-byte loads, and each warp works on its queries against the tile: a key per lane for the
// dot products, dimensions per lane for the sums over keys. Same online softmax, dropout indices and (IA)3
// algebra as the warp-per-query kernels. A block's queries are consecutive tokens; where they belong to several
// examples, it takes each example's run in turn.
constexpr int kCrossWarps = 8;
constexpr int kCrossQueriesPerWarp = 1;  // (more warps rather than more queries per warp: latency is the cost)
constexpr int kCrossQueries = kCrossWarps * kCrossQueriesPerWarp;
constexpr int kCrossKeys = 32;  // keys per tile: one per lane for the dot products

// Shared-memory row stride of the key and value tiles, in elements: padded by 16 bytes so that the 16-byte reads
// of eight lanes (eight consecutive rows, the same column) fall in different banks.
template <typename T>
__host__ __device__ constexpr int cross_tile_stride(int d_kv) {
  return d_kv + 16 / static_cast<int>(sizeof(T));
}

// queries: the fp32 query-side vectors per query of a run (the forward's q~; the backward's q~ and g~).
template <typename T>
size_t cross_tiled_smem_bytes(int d_kv, int query_vectors) {
  return sizeof(float) * query_vectors * kCrossQueries * d_kv + sizeof(T) * 2 * kCrossKeys * cross_tile_stride<T>(d_kv);
}

// Whether the tiled kernels take a call: rows of whole 16-byte chunks, aligned, within the default shared memory.
template <typename T>
bool cross_tiled_fits(const T* k, const T* v, int kv_ld, int d_kv) {
  constexpr int kVec = 16 / sizeof(T);
  return d_kv <= kMaxDKv && d_kv % kVec == 0 && kv_ld % kVec == 0 && reinterpret_cast<uintptr_t>(k) % 16 == 0 &&
         reinterpret_cast<uintptr_t>(v) % 16 == 0 && cross_tiled_smem_bytes<T>(d_kv, 2) <= 48 * 1024;
}

// The next run of a block's queries [start, end) that read one example's keys: [start, *stop).
__device__ __forceinline__ int cross_run_example(const int32_t* __restrict__ row_example, int dec_len, int start,
                                                 int end, int* stop) {
  const int b = row_example[start / dec_len];
  int e = start + 1;
  while (e < end && row_example[e / dec_len] == b) ++e;
  *stop = e;
  return b;
}

// Keys (and with_values, values) j0 .. j0 + kCrossKeys of one head into the tiles; rows past n_keys are zeros
// (never NaN x 0). The caller synchronises around it. Each thread issues its loads (up to kLoads 16-byte chunks)
// before its first store, so they are in flight together.
template <typename T>
__device__ __forceinline__ void load_cross_tile(const T* __restrict__ k, const T* __restrict__ v, int kv_ld,
                                                int64_t key_base, int64_t head_col, int j0, int n_keys, int d_kv,
                                                bool with_values, T* ks, T* vs) {
  constexpr int kVec = 16 / sizeof(T), kLoads = 4;
  const int chunks_per_row = d_kv / kVec, stride = cross_tile_stride<T>(d_kv);
  const int per_tile = kCrossKeys * chunks_per_row, total = (with_values ? 2 : 1) * per_tile;
  for (int first = threadIdx.x; first < total; first += kLoads * blockDim.x) {
    uint4 chunk[kLoads];
#pragma unroll
    for (int u = 0; u < kLoads; ++u) {
      const int c = first + u * blockDim.x;
      const bool is_v = c >= per_tile;
      const int cc = is_v ? c - per_tile : c, row = cc / chunks_per_row, col = (cc % chunks_per_row) * kVec;
      chunk[u] = make_uint4(0u, 0u, 0u, 0u);
      if (c < total && j0 + row < n_keys)
        chunk[u] = __ldg(as_vector<uint4>((is_v ? v : k) + (key_base + j0 + row) * kv_ld + head_col + col));
    }
#pragma unroll
    for (int u = 0; u < kLoads; ++u) {
      const int c = first + u * blockDim.x;
      if (c >= total) break;
      const bool is_v = c >= per_tile;
      const int cc = is_v ? c - per_tile : c, row = cc / chunks_per_row, col = (cc % chunks_per_row) * kVec;
      *as_vector<uint4>((is_v ? vs : ks) + row * stride + col) = chunk[u];
    }
  }
}

// x . row for a row of a tile (16-byte reads; x fp32 in shared memory, 16-byte aligned, read by every lane at
// once), in two chains.
template <typename T>
__device__ __forceinline__ float dot_tile_row(const float* x, const T* row, int d_kv) {
  constexpr int kVec = 16 / sizeof(T);
  float dot[2] = {0.f, 0.f};
#pragma unroll 4
  for (int c = 0; c < d_kv; c += kVec) {
    const uint4 chunk = *as_vector<uint4>(row + c);
    const T* e = reinterpret_cast<const T*>(&chunk);
#pragma unroll
    for (int u = 0; u < kVec; u += 4) {
      const float4 xs = *as_vector<float4>(x + c + u);
      dot[0] += xs.x * to_f32(e[u]);
      dot[1] += xs.y * to_f32(e[u + 1]);
      dot[0] += xs.z * to_f32(e[u + 2]);
      dot[1] += xs.w * to_f32(e[u + 3]);
    }
  }
  return dot[0] + dot[1];
}

// acc[u] += sum_jj weight_jj * tile[jj][lane + 32 u] over the tile's rows, weight_jj held by lane jj.
template <typename T, int DPL>
__device__ __forceinline__ void accumulate_tile_rows(float weight, const T* tile, int d_kv, float (&acc)[DPL]) {
  const int lane = threadIdx.x & 31, stride = cross_tile_stride<T>(d_kv);
#pragma unroll 8
  for (int jj = 0; jj < kCrossKeys; ++jj) {  // (rows past the keys are zeros with weight 0)
    const float w = __shfl_sync(kFullMask, weight, jj);
    const T* row = tile + jj * stride;
#pragma unroll
    for (int u = 0; u < DPL; ++u) {
      const int d = lane + 32 * u;
      if (d < d_kv) acc[u] += w * to_f32(row[d]);
    }
  }
}

// The forward: out = l_v * sum_j p'_j v_j with p = softmax_j((l_k * q) . k_j), as small_attention_kernel in cross
// mode.
template <typename T, int DPL>
__global__ void __launch_bounds__(32 * kCrossWarps)
cross_attention_tiled_kernel(const T* __restrict__ q, int q_ld, const T* __restrict__ k, const T* __restrict__ v,
                             int kv_ld, T* __restrict__ out, int out_ld, int n_queries, int d_kv, int dec_len,
                             const int32_t* __restrict__ row_example, const int32_t* __restrict__ enc_lengths,
                             int enc_len, AdapterIndex index, int64_t k_offset, int64_t v_offset,
                             DropoutSite dropout) {
  wait_for_previous_kernel();
  dropout = with_seed(dropout);
  extern __shared__ float4 cross_smem[];
  float* qs = reinterpret_cast<float*>(cross_smem);  // [kCrossQueries][d_kv], l_k applied
  T* ks = reinterpret_cast<T*>(qs + kCrossQueries * d_kv);
  T* vs = ks + kCrossKeys * cross_tile_stride<T>(d_kv);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int h = blockIdx.y;
  const int64_t head_col = static_cast<int64_t>(h) * d_kv;
  const int first = blockIdx.x * kCrossQueries, end = min(first + kCrossQueries, n_queries);

  for (int start = first, stop = 0; start < end; start = stop) {  // (every thread walks the same runs)
    const int b = cross_run_example(row_example, dec_len, start, end, &stop);
    const int nq = stop - start;
    const float *l_k, *l_v;
    adapter_vectors(index, b, head_col, k_offset, v_offset, &l_k, &l_v);
    for (int e = threadIdx.x; e < nq * d_kv; e += blockDim.x) {
      const int qi = e / d_kv, d = e % d_kv;
      qs[e] = to_f32(q[static_cast<int64_t>(start + qi) * q_ld + head_col + d]) * (l_k ? l_k[d] : 1.f);
    }
    const int n_keys = min(max(enc_lengths[b], 0), enc_len);
    const int64_t key_base = static_cast<int64_t>(b) * enc_len;

    // this warp's queries: run positions warp + kCrossWarps * s
    float m[kCrossQueriesPerWarp], l[kCrossQueriesPerWarp], acc[kCrossQueriesPerWarp][DPL];
#pragma unroll
    for (int s = 0; s < kCrossQueriesPerWarp; ++s) {
      m[s] = -INFINITY;
      l[s] = 0.f;
#pragma unroll
      for (int u = 0; u < DPL; ++u) acc[s][u] = 0.f;
    }
    for (int j0 = 0; j0 < n_keys; j0 += kCrossKeys) {
      __syncthreads();  // the previous tile is consumed (and, the first time, the queries are in place)
      load_cross_tile(k, v, kv_ld, key_base, head_col, j0, n_keys, d_kv, true, ks, vs);
      __syncthreads();
      const bool key_valid = j0 + lane < n_keys;
#pragma unroll
      for (int s = 0; s < kCrossQueriesPerWarp; ++s) {
        const int qi = warp + kCrossWarps * s;
        if (qi >= nq) continue;  // warp-uniform
        const float score = key_valid ? dot_tile_row(qs + qi * d_kv, ks + lane * cross_tile_stride<T>(d_kv), d_kv)
                                      : -INFINITY;
        const float m_new = fmaxf(m[s], warp_max(score));  // finite: key j0 is always valid
        const float p = key_valid ? expf(score - m_new) : 0.f;
        const float rescale = expf(m[s] - m_new);  // 0 on the first tile (m = -inf)
        l[s] = l[s] * rescale + warp_sum(p);  // the normaliser counts dropped keys too (dropout follows the softmax)
        m[s] = m_new;
        const int t = start + qi, r = t / dec_len, i = t % dec_len;
        const uint64_t drop_base = ((static_cast<uint64_t>(r) * gridDim.y + h) * dec_len + i) * enc_len;
        const float pd = key_valid ? p * dropout_scale(dropout, drop_base + j0 + lane) : 0.f;
#pragma unroll
        for (int u = 0; u < DPL; ++u) acc[s][u] *= rescale;
        accumulate_tile_rows(pd, vs, d_kv, acc[s]);
      }
    }
#pragma unroll
    for (int s = 0; s < kCrossQueriesPerWarp; ++s) {
      const int qi = warp + kCrossWarps * s;
      if (qi >= nq) continue;
      const float inv = l[s] > 0.f ? 1.f / l[s] : 0.f;
      T* orow = out + static_cast<int64_t>(start + qi) * out_ld + head_col;
#pragma unroll
      for (int u = 0; u < DPL; ++u) {
        const int d = lane + 32 * u;
        if (d < d_kv) orow[d] = from_f32<T>(acc[s][u] * inv * (l_v ? l_v[d] : 1.f));
      }
    }
    __syncthreads();  // the next run overwrites the queries and the tiles
  }
}

// Pass 1 of the cross-attention backward, as attention_backward_query_kernel in cross mode (same outputs and
// statistics, which attention_backward_key reads): three sweeps over the key tiles, (a) the softmax statistics,
// (b) D = sum_j p_j dp_j and o~ = sum_j p'_j v_j, (c) dq~ = sum_j ds_j k_j.
template <typename T, int DPL>
__global__ void __launch_bounds__(32 * kCrossWarps)
cross_backward_query_tiled_kernel(AttentionGeometry g, const T* __restrict__ q, int q_ld, const T* __restrict__ k,
                                  const T* __restrict__ v, int kv_ld, const float* __restrict__ dout,
                                  AdapterIndex index, int64_t k_offset, int64_t v_offset, int n_queries,
                                  T* __restrict__ dq, int dq_ld, float* __restrict__ g_k, float* __restrict__ g_v,
                                  float* __restrict__ stats) {
  wait_for_previous_kernel();
  g.dropout = with_seed(g.dropout);
  const int d_kv = g.d_kv, inner = g.heads * g.d_kv, dec_len = g.q_len, enc_len = g.k_len;
  extern __shared__ float4 cross_smem[];
  float* qs = reinterpret_cast<float*>(cross_smem);  // [kCrossQueries][d_kv]: q~ = l_k q
  float* gs = qs + kCrossQueries * d_kv;             // [kCrossQueries][d_kv]: g~ = l_v dout
  T* ks = reinterpret_cast<T*>(gs + kCrossQueries * d_kv);
  const int stride = cross_tile_stride<T>(d_kv);
  T* vs = ks + kCrossKeys * stride;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int h = blockIdx.y;
  const int64_t head_col = static_cast<int64_t>(h) * d_kv;
  const int first = blockIdx.x * kCrossQueries, end = min(first + kCrossQueries, n_queries);

  for (int start = first, stop = 0; start < end; start = stop) {
    const int b = cross_run_example(g.row_example, dec_len, start, end, &stop);
    const int nq = stop - start;
    const float *l_k, *l_v;
    adapter_vectors(index, b, head_col, k_offset, v_offset, &l_k, &l_v);
    for (int e = threadIdx.x; e < nq * d_kv; e += blockDim.x) {
      const int qi = e / d_kv, d = e % d_kv;
      const int64_t t = start + qi;
      qs[e] = to_f32(q[t * q_ld + head_col + d]) * (l_k ? l_k[d] : 1.f);
      gs[e] = dout[t * inner + head_col + d] * (l_v ? l_v[d] : 1.f);
    }
    const int n_keys = min(max(g.key_lengths[b], 0), enc_len);
    const int64_t key_base = static_cast<int64_t>(b) * enc_len;
    float m[kCrossQueriesPerWarp], inv_l[kCrossQueriesPerWarp], dsum[kCrossQueriesPerWarp];
    float o[kCrossQueriesPerWarp][DPL], dqt[kCrossQueriesPerWarp][DPL];
    uint64_t drop_base[kCrossQueriesPerWarp];
#pragma unroll
    for (int s = 0; s < kCrossQueriesPerWarp; ++s) {
      m[s] = -INFINITY;
      inv_l[s] = 0.f;  // (the sum l during sweep a)
      dsum[s] = 0.f;
      const int t = start + warp + kCrossWarps * s, r = t / dec_len, i = t % dec_len;
      drop_base[s] = ((static_cast<uint64_t>(r) * g.heads + h) * dec_len + i) * enc_len;
#pragma unroll
      for (int u = 0; u < DPL; ++u) o[s][u] = dqt[s][u] = 0.f;
    }
    for (int sweep = 0; sweep < 3; ++sweep) {
      if (sweep == 1) {
#pragma unroll
        for (int s = 0; s < kCrossQueriesPerWarp; ++s) inv_l[s] = inv_l[s] > 0.f ? 1.f / inv_l[s] : 0.f;
      }
      if (sweep == 2) {
#pragma unroll
        for (int s = 0; s < kCrossQueriesPerWarp; ++s) dsum[s] = warp_sum(dsum[s]);  // D
      }
      for (int j0 = 0; j0 < n_keys; j0 += kCrossKeys) {
        __syncthreads();
        load_cross_tile(k, v, kv_ld, key_base, head_col, j0, n_keys, d_kv, sweep > 0, ks, vs);
        __syncthreads();
        const int j = j0 + lane;
        const bool key_valid = j < n_keys;
#pragma unroll
        for (int s = 0; s < kCrossQueriesPerWarp; ++s) {
          const int qi = warp + kCrossWarps * s;
          if (qi >= nq) continue;  // warp-uniform
          const float score = key_valid ? dot_tile_row(qs + qi * d_kv, ks + lane * stride, d_kv) : -INFINITY;
          if (sweep == 0) {
            const float m_new = fmaxf(m[s], warp_max(score));
            inv_l[s] = inv_l[s] * expf(m[s] - m_new) + warp_sum(key_valid ? expf(score - m_new) : 0.f);
            m[s] = m_new;
            continue;
          }
          float p = 0.f, drop = 0.f, gv = 0.f;
          if (key_valid) {
            p = expf(score - m[s]) * inv_l[s];
            drop = dropout_scale(g.dropout, drop_base[s] + j);
            gv = dot_tile_row(gs + qi * d_kv, vs + lane * stride, d_kv);  // g~ . v_j
          }
          if (sweep == 1) {
            dsum[s] += p * drop * gv;
            accumulate_tile_rows(p * drop, vs, d_kv, o[s]);
          } else {
            const float ds = key_valid ? p * (drop * gv - dsum[s]) : 0.f;
            accumulate_tile_rows(ds, ks, d_kv, dqt[s]);
          }
        }
      }
    }
#pragma unroll
    for (int s = 0; s < kCrossQueriesPerWarp; ++s) {
      const int qi = warp + kCrossWarps * s;
      if (qi >= nq) continue;
      const int64_t t = start + qi;
      const T* qrow = q + t * q_ld + head_col;
      const float* grow = dout + t * inner + head_col;
      T* dqrow = dq + t * dq_ld + head_col;
      float* gkrow = g_k + t * inner + head_col;
      float* gvrow = g_v + t * inner + head_col;
#pragma unroll
      for (int u = 0; u < DPL; ++u) {
        const int d = lane + 32 * u;
        if (d < d_kv) {
          dqrow[d] = from_f32<T>(dqt[s][u] * (l_k ? l_k[d] : 1.f));
          gkrow[d] = to_f32(qrow[d]) * dqt[s][u];
          gvrow[d] = grow[d] * o[s][u];
        }
      }
      if (lane == 0) {
        float* st = stats + (t * g.heads + h) * 3;
        st[0] = m[s];
        st[1] = inv_l[s];
        st[2] = dsum[s];
      }
    }
    __syncthreads();  // the next run overwrites the query vectors and the tiles
  }
}

}  // namespace

// ------------------------------------------------------------------------------------------------------------
// launchers

void relative_bias_table(const float* rel_emb, const int32_t* buckets, int span, int num_heads, float* table,
                         cudaStream_t stream) {
  const int64_t n = static_cast<int64_t>(span) * num_heads;
  if (n <= 0) return;
  TFEW_LAUNCH(grid_for(n, 256), 256, 0, stream, relative_bias_table_kernel)(rel_emb, buckets, span, num_heads, table);
  TFEW_CUDA_CHECK_LAUNCH("relative_bias_table_kernel");
}

template <typename T>
void ia3_scale_kv(T* buf, int ld, int k_col, int v_col, int width, int n_tokens, const AdapterIndex& index,
                  int64_t k_offset, int64_t v_offset, cudaStream_t stream) {
  if (n_tokens <= 0 || width <= 0 || !index.active()) return;
  const unsigned grid_rows = n_tokens < 65535 ? n_tokens : 65535;
  if (with_vector_width<T>(vector_width<T>({width, ld, k_col, v_col >= 0 ? v_col : 0}, {buf}, {}), [&](auto vec) {
        constexpr int kVec = decltype(vec)::value;
        const int groups = width / kVec;
        const dim3 block(groups >= 256 ? 256 : 128), grid((groups + block.x - 1) / block.x, grid_rows);
        TFEW_LAUNCH(grid, block, 0, stream, ia3_scale_kv_vec_kernel<T, kVec>)(buf, ld, k_col, v_col, width, n_tokens,
                                                                              index, k_offset, v_offset);
      })) {
    TFEW_CUDA_CHECK_LAUNCH("ia3_scale_kv_vec_kernel");
    return;
  }
  const dim3 grid((width + 255) / 256, grid_rows);
  TFEW_LAUNCH(grid, 256, 0, stream, ia3_scale_kv_kernel<T>)(buf, ld, k_col, v_col, width, n_tokens, index, k_offset,
                                                            v_offset);
  TFEW_CUDA_CHECK_LAUNCH("ia3_scale_kv_kernel");
}

template <typename T>
void ia3_scaled_qkv_copy(const T* src, T* dst, int ld, int inner, int n_tokens, const AdapterIndex& index,
                         int64_t k_offset, int64_t v_offset, cudaStream_t stream) {
  if (n_tokens <= 0 || inner <= 0) return;
  if (!index.active()) {
    TFEW_CUDA_CHECK(cudaMemcpyAsync(dst, src, sizeof(T) * static_cast<size_t>(n_tokens) * ld, cudaMemcpyDeviceToDevice,
                                    stream));
    return;
  }
  const unsigned grid_rows = n_tokens < 65535 ? n_tokens : 65535;
  if (with_vector_width<T>(vector_width<T>({inner, ld}, {src, dst}, {}), [&](auto vec) {
        constexpr int kVec = decltype(vec)::value;
        const int groups = 3 * inner / kVec;
        const dim3 block(groups >= 256 ? 256 : 128), grid((groups + block.x - 1) / block.x, grid_rows);
        TFEW_LAUNCH(grid, block, 0, stream, ia3_scaled_qkv_copy_vec_kernel<T, kVec>)(
            src, dst, ld, inner, n_tokens, index, k_offset, v_offset);
      })) {
    TFEW_CUDA_CHECK_LAUNCH("ia3_scaled_qkv_copy_vec_kernel");
    return;
  }
  const dim3 grid((3 * inner + 255) / 256, grid_rows);
  TFEW_LAUNCH(grid, 256, 0, stream, ia3_scaled_qkv_copy_kernel<T>)(src, dst, ld, inner, n_tokens, index, k_offset,
                                                                   v_offset);
  TFEW_CUDA_CHECK_LAUNCH("ia3_scaled_qkv_copy_kernel");
}

template <typename T>
void ia3_scale_columns(T* buf, int ld, int col, int width, int n_tokens, const AdapterIndex& index, int64_t offset,
                       cudaStream_t stream) {
  ia3_scale_kv<T>(buf, ld, col, -1, width, n_tokens, index, offset, 0, stream);
}

namespace {
// launch(std::integral_constant<int, kPer>()): the softmax kernels' keys per lane held in registers (rows of up to
// 256 or 512 keys), or 0 (longer rows: read again per pass).
template <typename Launch>
void with_keys_per_lane(int len, Launch&& launch) {
  if (len <= 256) launch(std::integral_constant<int, 8>());
  else if (len <= 512) launch(std::integral_constant<int, 16>());
  else launch(std::integral_constant<int, 0>());
}

// One warp per row, 8 rows per block.
template <typename T>
void launch_masked_softmax(const float* scores, const float* bias_table, const int32_t* lengths, int heads, int len,
                           int64_t rows_per_example, int64_t n_rows, const DropoutSite& dropout, T* probs,
                           T* probs_dropped, cudaStream_t stream, FoldedRows folded = {}) {
  if (n_rows <= 0) return;
  constexpr int kBlock = 256;
  const int64_t blocks = (n_rows * 32 + kBlock - 1) / kBlock;
  with_keys_per_lane(len, [&](auto per_lane) {
    TFEW_LAUNCH(static_cast<unsigned>(blocks), kBlock, 0, stream, masked_softmax_kernel<T, decltype(per_lane)::value>)(
        scores, bias_table, lengths, heads, len, rows_per_example, n_rows, dropout, folded, probs, probs_dropped);
  });
  TFEW_CUDA_CHECK_LAUNCH("masked_softmax_kernel");
}
}  // namespace

template <typename T>
void encoder_softmax(const float* scores, const float* bias_table, const int32_t* lengths, int batch, int heads,
                     int len, const DropoutSite& dropout, T* probs, cudaStream_t stream) {
  launch_masked_softmax<T>(scores, bias_table, lengths, heads, len, static_cast<int64_t>(heads) * len,
                           static_cast<int64_t>(batch) * heads * len, dropout, probs, nullptr, stream);
}

template <typename T>
void encoder_softmax_pair(const float* scores, const float* bias_table, const int32_t* lengths, int batch, int heads,
                          int len, const DropoutSite& dropout, T* probs, T* probs_dropped, cudaStream_t stream) {
  launch_masked_softmax<T>(scores, bias_table, lengths, heads, len, static_cast<int64_t>(heads) * len,
                           static_cast<int64_t>(batch) * heads * len, dropout, probs, probs_dropped, stream);
}

template <typename T>
void cross_softmax_folded(const float* scores, const int32_t* lengths, int batch, int64_t rows_per_example, int len,
                          const DropoutSite& dropout, const FoldedRows& folded, T* probs, T* probs_dropped,
                          cudaStream_t stream) {
  if (folded.heads <= 0 || folded.dec_len <= 0) fail(ErrorCode::Internal, "cross_softmax_folded: no row geometry");
  launch_masked_softmax<T>(scores, nullptr, lengths, 1, len, rows_per_example, batch * rows_per_example, dropout,
                           probs, probs_dropped, stream, folded);
}

namespace {
template <typename T>
void launch_softmax_backward(const float* dprobs, T* probs, const int32_t* lengths, int len, int64_t rows_per_example,
                             int64_t n_rows, const DropoutSite& dropout, const FoldedRows& folded,
                             cudaStream_t stream) {
  if (n_rows <= 0) return;
  constexpr int kBlock = 256;  // 8 rows per block
  const int64_t blocks = (n_rows * 32 + kBlock - 1) / kBlock;
  with_keys_per_lane(len, [&](auto per_lane) {
    TFEW_LAUNCH(static_cast<unsigned>(blocks), kBlock, 0, stream,
                softmax_backward_kernel<T, decltype(per_lane)::value>)(
        dprobs, probs, lengths, len, rows_per_example, n_rows, dropout, folded);
  });
  TFEW_CUDA_CHECK_LAUNCH("softmax_backward_kernel");
}
}  // namespace

template <typename T>
void encoder_softmax_backward(const float* dprobs, T* probs, const int32_t* lengths, int batch, int heads, int len,
                              const DropoutSite& dropout, cudaStream_t stream) {
  launch_softmax_backward<T>(dprobs, probs, lengths, len, static_cast<int64_t>(heads) * len,
                             static_cast<int64_t>(batch) * heads * len, dropout, FoldedRows{}, stream);
}

template <typename T>
void cross_softmax_folded_backward(const float* dprobs, T* probs, const int32_t* lengths, int batch,
                                   int64_t rows_per_example, int len, const DropoutSite& dropout,
                                   const FoldedRows& folded, cudaStream_t stream) {
  if (folded.heads <= 0 || folded.dec_len <= 0) fail(ErrorCode::Internal, "cross_softmax_folded: no row geometry");
  launch_softmax_backward<T>(dprobs, probs, lengths, len, rows_per_example, batch * rows_per_example, dropout, folded,
                             stream);
}

template <typename T>
void cross_probs_dropout(const T* probs, int64_t n_rows, int len, const DropoutSite& dropout, const FoldedRows& folded,
                         T* probs_dropped, cudaStream_t stream) {
  if (n_rows <= 0 || len <= 0) return;
  // 8 warps a block, 2 rows a warp
  TFEW_LAUNCH(grid_for_per_thread(n_rows, 8, 2), 256, 0, stream, dropout_probs_kernel<T>)(probs, n_rows, len, dropout, folded,
                                                                         probs_dropped);
  TFEW_CUDA_CHECK_LAUNCH("dropout_probs_kernel");
}

template <typename T>
void ia3_scaled_columns_copy(const T* src, int src_ld, T* dst, int dst_ld, int width, int n_tokens,
                             const AdapterIndex& index, int64_t offset, cudaStream_t stream) {
  if (n_tokens <= 0 || width <= 0) return;
  const dim3 grid((width + 255) / 256, n_tokens < 65535 ? n_tokens : 65535);
  TFEW_LAUNCH(grid, 256, 0, stream, ia3_scaled_columns_copy_kernel<T>)(src, src_ld, dst, dst_ld, width, n_tokens, index,
                                                                       offset);
  TFEW_CUDA_CHECK_LAUNCH("ia3_scaled_columns_copy_kernel");
}

template <typename T>
void ia3_kv_backward(const T* qkv, int ld, int k_col, int v_col, int width, int n_tokens, const AdapterIndex& index,
                     int64_t k_offset, int64_t v_offset, const float* g_k, const float* g_v, int g_ld, T* dqkv,
                     int dq_ld, const Ia3Sums& sums, float* gk_out, float* gv_out, cudaStream_t stream) {
  if (n_tokens <= 0 || width <= 0) return;
  if (sums.tokens_per_example <= 0 || n_tokens % sums.tokens_per_example != 0 || sums.chunk <= 0)
    fail(ErrorCode::Internal, "ia3_kv_backward: tokens are not whole examples");
  const int64_t rows = sums.rows(n_tokens);
  const unsigned grid_rows = static_cast<unsigned>(rows < 65535 ? rows : 65535);
  const bool v = v_col >= 0;
  const int vec = vector_width<T>({width, ld, k_col, v ? v_col : 0, g_ld, dq_ld}, {qkv, dqkv},
                                  {g_k, gk_out, v ? g_v : g_k, v ? gv_out : gk_out});
  if (with_vector_width<T>(vec, [&](auto vec_width) {
        constexpr int kVec = decltype(vec_width)::value;
        const int groups = width / kVec;
        const dim3 block(groups >= 256 ? 256 : 128), grid((groups + block.x - 1) / block.x, grid_rows);
        TFEW_LAUNCH(grid, block, 0, stream, ia3_kv_backward_vec_kernel<T, kVec>)(
            qkv, ld, k_col, v_col, width, n_tokens, index, k_offset, v_offset, g_k, g_v, g_ld, dqkv, dq_ld, sums,
            gk_out, gv_out);
      })) {
    TFEW_CUDA_CHECK_LAUNCH("ia3_kv_backward_vec_kernel");
    return;
  }
  const dim3 grid((width + 255) / 256, grid_rows);
  TFEW_LAUNCH(grid, 256, 0, stream, ia3_kv_backward_kernel<T>)(qkv, ld, k_col, v_col, width, n_tokens, index, k_offset,
                                                               v_offset, g_k, g_v, g_ld, dqkv, dq_ld, sums, gk_out,
                                                               gv_out);
  TFEW_CUDA_CHECK_LAUNCH("ia3_kv_backward_kernel");
}

template <typename T>
void decoder_self_attention(const T* qkv, int ld, int inner, int d_kv, int heads, int n_rows, int dec_len,
                            const float* bias_table, const int32_t* row_example, const AdapterIndex& index,
                            int64_t k_offset, int64_t v_offset, const DropoutSite& dropout, T* out, int out_ld,
                            cudaStream_t stream) {
  if (!bias_table) fail(ErrorCode::Internal, "decoder_self_attention needs the relative-position bias");
  const int n_queries = n_rows * dec_len;
  if (n_queries <= 0) return;
  const dim3 grid((n_queries + kSmallAttnWarps - 1) / kSmallAttnWarps, heads), block(32 * kSmallAttnWarps);
  with_dims_per_lane(d_kv, [&](auto dpl) {
    TFEW_LAUNCH(grid, block, 0, stream, decoder_self_attention_kernel<T, decltype(dpl)::value>)(
        qkv, ld, inner, out, out_ld, n_queries, d_kv, dec_len, bias_table, row_example, index, k_offset, v_offset,
        dropout);
  });
  TFEW_CUDA_CHECK_LAUNCH("decoder_self_attention_kernel");
}

template <typename T>
void cross_attention(const T* q, int q_ld, const T* kv, int kv_ld, int inner, int d_kv, int heads, int n_rows,
                     int dec_len, const int32_t* row_example, const int32_t* enc_lengths, int enc_len,
                     const AdapterIndex& index, int64_t k_offset, int64_t v_offset, const DropoutSite& dropout,
                     T* out, int out_ld, cudaStream_t stream) {
  const int n_queries = n_rows * dec_len;
  if (n_queries <= 0) return;
  const T* k = kv;
  const T* v = kv + inner;
  if (!cross_tiled_fits(k, v, kv_ld, d_kv)) {
    launch_small_attention<T>(q, q_ld, k, v, kv_ld, out, out_ld, n_queries, heads, d_kv, dec_len, row_example,
                              enc_lengths, enc_len, index, k_offset, v_offset, dropout, stream);
    return;
  }
  const dim3 grid((n_queries + kCrossQueries - 1) / kCrossQueries, heads), block(32 * kCrossWarps);
  const size_t smem = cross_tiled_smem_bytes<T>(d_kv, 1);
  with_dims_per_lane(d_kv, [&](auto dpl) {
    TFEW_LAUNCH(grid, block, smem, stream, cross_attention_tiled_kernel<T, decltype(dpl)::value>)(
        q, q_ld, k, v, kv_ld, out, out_ld, n_queries, d_kv, dec_len, row_example, enc_lengths, enc_len, index, k_offset,
        v_offset, dropout);
  });
  TFEW_CUDA_CHECK_LAUNCH("cross_attention_tiled_kernel");
}

template <typename T>
void attention_backward_query(const AttentionGeometry& g, const T* q, int q_ld, const T* k, const T* v, int kv_ld,
                              const float* dout, const AdapterIndex& index, int64_t k_offset, int64_t v_offset,
                              T* dq, int dq_ld, float* g_k, float* g_v, float* stats, cudaStream_t stream) {
  const int n_queries = g.n_seq * g.q_len;
  if (n_queries <= 0) return;
  if (g.kind == AttentionKind::Cross && cross_tiled_fits(k, v, kv_ld, g.d_kv)) {
    const dim3 grid((n_queries + kCrossQueries - 1) / kCrossQueries, g.heads), block(32 * kCrossWarps);
    const size_t smem = cross_tiled_smem_bytes<T>(g.d_kv, 2);
    with_dims_per_lane(g.d_kv, [&](auto dpl) {
      TFEW_LAUNCH(grid, block, smem, stream, cross_backward_query_tiled_kernel<T, decltype(dpl)::value>)(
          g, q, q_ld, k, v, kv_ld, dout, index, k_offset, v_offset, n_queries, dq, dq_ld, g_k, g_v, stats);
    });
    TFEW_CUDA_CHECK_LAUNCH("cross_backward_query_tiled_kernel");
    return;
  }
  const dim3 grid((n_queries + kBackWarps - 1) / kBackWarps, g.heads), block(32 * kBackWarps);
  const size_t smem = sizeof(float) * kBackWarps * 2 * g.d_kv;
  with_dims_per_lane(g.d_kv, [&](auto dpl) {
    TFEW_LAUNCH(grid, block, smem, stream, attention_backward_query_kernel<T, decltype(dpl)::value>)(
        g, q, q_ld, k, v, kv_ld, dout, index, k_offset, v_offset, n_queries, dq, dq_ld, g_k, g_v, stats);
  });
  TFEW_CUDA_CHECK_LAUNCH("attention_backward_query_kernel");
}

template <typename T>
void attention_backward_key(const AttentionGeometry& g, const T* q, int q_ld, const T* k, const T* v, int kv_ld,
                            const float* dout, const AdapterIndex& index, int64_t k_offset, int64_t v_offset,
                            const float* stats, T* dk, T* dv, int dkv_ld, cudaStream_t stream) {
  // key sequences: the examples (encoder self, cross) or the choice rows (decoder self)
  const int n_key_seq = g.kind == AttentionKind::DecoderSelf ? g.n_seq : g.n_examples;
  const int n_keys_total = n_key_seq * g.k_len;
  if (n_keys_total <= 0) return;
  const dim3 grid((n_keys_total + kBackWarps - 1) / kBackWarps, g.heads), block(32 * kBackWarps);
  const size_t smem = sizeof(float) * kBackWarps * 2 * g.d_kv;
  with_dims_per_lane(g.d_kv, [&](auto dpl) {
    TFEW_LAUNCH(grid, block, smem, stream, attention_backward_key_kernel<T, decltype(dpl)::value>)(
        g, q, q_ld, k, v, kv_ld, dout, index, k_offset, v_offset, stats, n_keys_total, dk, dv, dkv_ld);
  });
  TFEW_CUDA_CHECK_LAUNCH("attention_backward_key_kernel");
}

// ---- decoder self-attention backward, one kernel: a warp per (choice row, head) with the row's q, k, v and output
// gradient in shared memory (causal rows of at most kSelfBackwardMaxLen positions). The two-pass kernels above (a
// warp per query, then a warp per key) read every key and value row from global memory once per query, each read a
// latency the next step waits for: at TRAIN-3B's 8 decoder positions they took ~19 us each a layer on an H200
// (session 19's ncu) for a few MFLOP. Here the row is read once with independent loads; scores, dP and dS of every
// (query, key) pair are made with a lane per key (the same formulas as attention_backward_query_kernel: p from its
// own softmax statistics, D = sum_j p_j dp_j), kept in shared memory, then summed with lanes over dimensions into
// dq, dk, dv and the per-token (IA)3 contributions, each element by one lane in a fixed order (deterministic).
namespace {
constexpr int kSelfBackwardMaxLen = 32;

// Floats of shared memory for one (row, head): q, k, v and the output gradient [len][d_kv + 1] (the + 1 puts a lane
// per key's reads of column d in distinct banks), l_k and l_v [d_kv], dS and P' [len][len].
inline size_t self_backward_smem_floats(int len, int d_kv) {
  return 4 * static_cast<size_t>(len) * (d_kv + 1) + 2 * static_cast<size_t>(d_kv) + 2 * static_cast<size_t>(len) * len;
}

// a[u] = sum_n wa[n step] rows_a[n][d], b[u] = sum_n wb[n step] rows_b[n][d] over n in [first, last), for this lane's
// dimensions d = lane + 32 u (rows row_ld floats apart, in shared memory), in order of n.
template <int DPL>
__device__ __forceinline__ void weighted_row_sums(const float* wa, const float* wb, int step, int first, int last,
                                                  const float* rows_a, const float* rows_b, int row_ld, int d_kv,
                                                  float (&a)[DPL], float (&b)[DPL]) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int u = 0; u < DPL; ++u) a[u] = b[u] = 0.f;
  for (int n = first; n < last; ++n) {
    const float x = wa[n * step], y = wb[n * step];
#pragma unroll
    for (int u = 0; u < DPL; ++u) {
      const int d = lane + 32 * u;
      if (d < d_kv) {
        a[u] += x * rows_a[n * row_ld + d];
        b[u] += y * rows_b[n * row_ld + d];
      }
    }
  }
}

template <typename T, int DPL>
__global__ void __launch_bounds__(32)
decoder_self_attention_backward_kernel(AttentionGeometry g, const T* __restrict__ qkv, int ld,
                                       const float* __restrict__ dout, AdapterIndex index, int64_t k_offset,
                                       int64_t v_offset, T* __restrict__ dqkv, int dqkv_ld, float* __restrict__ g_k,
                                       float* __restrict__ g_v) {
  wait_for_previous_kernel();
  g.dropout = with_seed(g.dropout);
  extern __shared__ float smem[];
  const int lane = threadIdx.x, r = blockIdx.x, h = blockIdx.y;
  const int L = g.q_len, d_kv = g.d_kv, inner = g.heads * g.d_kv, row_ld = d_kv + 1;
  float* Qs = smem;  // unscaled q, k, v and output gradient rows of this (row, head)
  float* Ks = Qs + L * row_ld;
  float* Vs = Ks + L * row_ld;
  float* Gs = Vs + L * row_ld;
  float* lk = Gs + L * row_ld;  // l_k, l_v of the row's example (ones without an adapter)
  float* lv = lk + d_kv;
  float* dS = lv + d_kv;  // [i][j]: dS = P (drop dP' - D), 0 where j > i
  float* Pd = dS + L * L;  // [i][j]: P' = P drop
  const int64_t head_col = static_cast<int64_t>(h) * d_kv;
  const float *l_k, *l_v;
  adapter_vectors(index, g.row_example[r], head_col, k_offset, v_offset, &l_k, &l_v);
  const int64_t t0 = static_cast<int64_t>(r) * L;  // the row's first token
  for (int d = lane; d < d_kv; d += 32) {
    lk[d] = l_k ? l_k[d] : 1.f;
    lv[d] = l_v ? l_v[d] : 1.f;
  }
#pragma unroll 4
  for (int p = 0; p < L; ++p) {
    const T* row = qkv + (t0 + p) * ld + head_col;
    const float* grow = dout + (t0 + p) * inner + head_col;
    for (int d = lane; d < d_kv; d += 32) {
      Qs[p * row_ld + d] = to_f32(row[d]);
      Ks[p * row_ld + d] = to_f32(row[inner + d]);
      Vs[p * row_ld + d] = to_f32(row[2 * inner + d]);
      Gs[p * row_ld + d] = grow[d];
    }
  }
  __syncwarp();

  // per query i, lane j = key j: s = (l_k q_i) . k_j + bias, dP' = (l_v g_i) . v_j, the softmax over j <= i
  const float* bias_h = g.bias_table + static_cast<int64_t>(h) * (2 * L - 1);
  const int j = lane;
  for (int i = 0; i < L; ++i) {
    const bool visible = j <= i;
    float s = -INFINITY, dpv = 0.f;
    if (visible) {
      const float* qi = Qs + i * row_ld;
      const float* gi = Gs + i * row_ld;
      const float* kj = Ks + j * row_ld;
      const float* vj = Vs + j * row_ld;
      float acc_s = 0.f, acc_dp = 0.f;
#pragma unroll 8
      for (int d = 0; d < d_kv; ++d) {
        acc_s += (qi[d] * lk[d]) * kj[d];
        acc_dp += (gi[d] * lv[d]) * vj[d];
      }
      s = acc_s + bias_h[L - 1 - i + j];
      dpv = acc_dp;
    }
    const float m = warp_max(s);  // finite: key 0 is visible to every query
    const float e = visible ? expf(s - m) : 0.f;
    const float inv_l = 1.f / warp_sum(e);
    const float p = e * inv_l;
    const float drop = visible ? dropout_scale(g.dropout, ((static_cast<uint64_t>(r) * g.heads + h) * L + i) * L + j) : 0.f;
    const float dp = drop * dpv;
    const float D = warp_sum(p * dp);
    if (j < L) {
      dS[i * L + j] = visible ? p * (dp - D) : 0.f;
      Pd[i * L + j] = visible ? p * drop : 0.f;
    }
  }
  __syncwarp();

  // lanes over dimensions: dq~_i = sum_j dS_ij k_j, o~_i = sum_j P'_ij v_j; dq = l_k dq~ (as T), g_k = q dq~, g_v = g o~
  for (int i = 0; i < L; ++i) {
    float dq[DPL], o[DPL];
    weighted_row_sums<DPL>(dS + i * L, Pd + i * L, 1, 0, i + 1, Ks, Vs, row_ld, d_kv, dq, o);
#pragma unroll
    for (int u = 0; u < DPL; ++u) {
      const int d = lane + 32 * u;
      if (d < d_kv) {
        const int64_t t = t0 + i;
        dqkv[t * dqkv_ld + head_col + d] = from_f32<T>(dq[u] * lk[d]);
        g_k[t * inner + head_col + d] = Qs[i * row_ld + d] * dq[u];
        g_v[t * inner + head_col + d] = Gs[i * row_ld + d] * o[u];
      }
    }
  }
  // dk_j = l_k sum_i dS_ij q_i, dv_j = l_v sum_i P'_ij g_i over the queries i >= j that see key j
  for (int j_key = 0; j_key < L; ++j_key) {
    float dk[DPL], dv[DPL];
    weighted_row_sums<DPL>(dS + j_key, Pd + j_key, L, j_key, L, Qs, Gs, row_ld, d_kv, dk, dv);
#pragma unroll
    for (int u = 0; u < DPL; ++u) {
      const int d = lane + 32 * u;
      if (d < d_kv) {
        T* out = dqkv + (t0 + j_key) * dqkv_ld + head_col + d;
        out[inner] = from_f32<T>(dk[u] * lk[d]);
        out[2 * inner] = from_f32<T>(dv[u] * lv[d]);
      }
    }
  }
}
}  // namespace

template <typename T>
void decoder_self_attention_backward(const AttentionGeometry& g, const T* qkv, int ld, const float* dout,
                                     const AdapterIndex& index, int64_t k_offset, int64_t v_offset, T* dqkv,
                                     int dqkv_ld, float* g_k, float* g_v, float* stats, cudaStream_t stream) {
  if (g.kind != AttentionKind::DecoderSelf || !g.bias_table || g.k_len != g.q_len)
    fail(ErrorCode::Internal, "decoder_self_attention_backward: a causal self-attention (as many keys as queries) with its bias");
  if (g.n_seq <= 0 || g.q_len <= 0) return;
  const int inner = g.heads * g.d_kv;
  const size_t smem = sizeof(float) * self_backward_smem_floats(g.q_len, g.d_kv);
  if (g.q_len <= kSelfBackwardMaxLen && smem <= 48 * 1024) {
    with_dims_per_lane(g.d_kv, [&](auto dpl) {
      TFEW_LAUNCH(dim3(g.n_seq, g.heads), 32, smem, stream, decoder_self_attention_backward_kernel<T, decltype(dpl)::value>)(
          g, qkv, ld, dout, index, k_offset, v_offset, dqkv, dqkv_ld, g_k, g_v);
    });
    TFEW_CUDA_CHECK_LAUNCH("decoder_self_attention_backward_kernel");
    return;
  }
  // longer rows (or wide heads): the two passes
  attention_backward_query<T>(g, qkv, ld, qkv + inner, qkv + 2 * inner, ld, dout, index, k_offset, v_offset, dqkv,
                              dqkv_ld, g_k, g_v, stats, stream);
  attention_backward_key<T>(g, qkv, ld, qkv + inner, qkv + 2 * inner, ld, dout, index, k_offset, v_offset, stats,
                            dqkv + inner, dqkv + 2 * inner, dqkv_ld, stream);
}

#define TFEW_INSTANTIATE(T)                                                                                   \
  template void ia3_scale_kv<T>(T*, int, int, int, int, int, const AdapterIndex&, int64_t, int64_t,            \
                                cudaStream_t);                                                                \
  template void ia3_scale_columns<T>(T*, int, int, int, int, const AdapterIndex&, int64_t, cudaStream_t);      \
  template void ia3_scaled_qkv_copy<T>(const T*, T*, int, int, int, const AdapterIndex&, int64_t, int64_t,      \
                                       cudaStream_t);                                                         \
  template void encoder_softmax<T>(const float*, const float*, const int32_t*, int, int, int,                  \
                                   const DropoutSite&, T*, cudaStream_t);                                     \
  template void cross_softmax_folded<T>(const float*, const int32_t*, int, int64_t, int, const DropoutSite&,     \
                                        const FoldedRows&, T*, T*, cudaStream_t);                              \
  template void cross_softmax_folded_backward<T>(const float*, T*, const int32_t*, int, int64_t, int,             \
                                                 const DropoutSite&, const FoldedRows&, cudaStream_t);         \
  template void cross_probs_dropout<T>(const T*, int64_t, int, const DropoutSite&, const FoldedRows&, T*,         \
                                       cudaStream_t);                                                          \
  template void ia3_scaled_columns_copy<T>(const T*, int, T*, int, int, int, const AdapterIndex&, int64_t,        \
                                           cudaStream_t);                                                      \
  template void encoder_softmax_pair<T>(const float*, const float*, const int32_t*, int, int, int,             \
                                        const DropoutSite&, T*, T*, cudaStream_t);                            \
  template void encoder_softmax_backward<T>(const float*, T*, const int32_t*, int, int, int, const DropoutSite&, \
                                            cudaStream_t);                                                    \
  template void ia3_kv_backward<T>(const T*, int, int, int, int, int, const AdapterIndex&, int64_t, int64_t,     \
                                   const float*, const float*, int, T*, int, const Ia3Sums&, float*, float*,  \
                                   cudaStream_t);                                                             \
  template void decoder_self_attention<T>(const T*, int, int, int, int, int, int, const float*, const int32_t*, \
                                          const AdapterIndex&, int64_t, int64_t, const DropoutSite&, T*, int, \
                                          cudaStream_t);                                                      \
  template void cross_attention<T>(const T*, int, const T*, int, int, int, int, int, int, const int32_t*,       \
                                   const int32_t*, int, const AdapterIndex&, int64_t, int64_t,                \
                                   const DropoutSite&, T*, int, cudaStream_t);                                \
  template void attention_backward_query<T>(const AttentionGeometry&, const T*, int, const T*, const T*, int,    \
                                            const float*, const AdapterIndex&, int64_t, int64_t, T*, int,      \
                                            float*, float*, float*, cudaStream_t);                             \
  template void attention_backward_key<T>(const AttentionGeometry&, const T*, int, const T*, const T*, int,      \
                                          const float*, const AdapterIndex&, int64_t, int64_t, const float*,   \
                                          T*, T*, int, cudaStream_t);                                          \
  template void decoder_self_attention_backward<T>(const AttentionGeometry&, const T*, int, const float*,       \
                                                   const AdapterIndex&, int64_t, int64_t, T*, int, float*,     \
                                                   float*, float*, cudaStream_t);
TFEW_INSTANTIATE(float)
TFEW_INSTANTIATE(__nv_bfloat16)
#undef TFEW_INSTANTIATE

}  // namespace kernels
}  // namespace tfew
