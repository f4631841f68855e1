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
// example, shared by all its choices: nothing is copied per choice).
//
// (IA)3 on keys and values: q . (l_k * k) = (l_k * q) . k and sum_j p_j (l_v * v_j) = l_v * sum_j p_j v_j,
// so the small-query kernel scales its query by l_k and its output by l_v (the adapter of the row's
// example): no pass over K/V at all, and a mixed-task batch costs nothing extra. The unfused encoder path
// (fp32 mode) scales K/V in place with ia3_scale_kv.
#include "kernels/device_common.cuh"

namespace tfew {
namespace kernels {

namespace {

// --------------------------------------------------------------------------------------------------------
// relative-position bias

__global__ void relative_bias_table_kernel(const float* __restrict__ rel_emb, const int32_t* __restrict__ buckets,
                                           int span, int num_heads, float* __restrict__ table) {
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
__global__ void ia3_scale_kv_kernel(T* __restrict__ buf, int ld, int k_col, int v_col, int width, int64_t n,
                                    AdapterIndex index, int64_t k_offset, int64_t v_offset) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = i / width;
    const int c = static_cast<int>(i % width);
    const int a = adapter_of_token(index, t);
    if (a < 0) continue;
    const float* l = index.adapters + a * index.adapter_stride;
    T* row = buf + t * ld;
    row[k_col + c] = from_f32<T>(to_f32(row[k_col + c]) * l[k_offset + c]);
    row[v_col + c] = from_f32<T>(to_f32(row[v_col + c]) * l[v_offset + c]);
  }
}

// --------------------------------------------------------------------------------------------------------
// encoder softmax: one warp per score row

template <typename T>
__global__ void encoder_softmax_kernel(const float* __restrict__ scores, const float* __restrict__ bias_table,
                                       const int32_t* __restrict__ lengths, int heads, int len, int64_t n_rows,
                                       T* __restrict__ probs) {
  const int lane = threadIdx.x & 31;
  const int64_t row = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) >> 5;
  if (row >= n_rows) return;  // whole warps exit together: no block-level synchronisation below
  const int i = static_cast<int>(row % len);
  const int h = static_cast<int>((row / len) % heads);
  const int b = static_cast<int>(row / (static_cast<int64_t>(len) * heads));
  const int n_keys = min(max(lengths[b], 0), len);
  const float* s = scores + row * len;
  // bias for key j sits at brow[j]: relative position j - i, offset by len - 1
  const float* brow = bias_table + static_cast<int64_t>(h) * (2 * len - 1) + (len - 1 - i);
  T* p = probs + row * len;

  float m = -INFINITY;
  for (int j = lane; j < n_keys; j += 32) m = fmaxf(m, s[j] + brow[j]);
  m = warp_max(m);
  float sum = 0.f;
  for (int j = lane; j < n_keys; j += 32) sum += expf(s[j] + brow[j] - m);
  sum = warp_sum(sum);
  const float inv = sum > 0.f ? 1.f / sum : 0.f;
  for (int j = lane; j < len; j += 32) {
    const float v = j < n_keys ? expf(s[j] + brow[j] - m) * inv : 0.f;
    p[j] = from_f32<T>(v);
  }
}

// --------------------------------------------------------------------------------------------------------
// small-query attention: one warp per (query token, head)

// Dot product of the query (fp32, shared memory) with one key row, read with 16-byte loads when aligned.
template <typename T>
__device__ __forceinline__ float dot_row(const float* q, const T* __restrict__ row, int d_kv) {
  float s = 0.f;
  constexpr int kVec = 16 / sizeof(T);
  if ((d_kv % kVec) == 0 && (reinterpret_cast<uintptr_t>(row) & 15) == 0) {
    const uint4* r4 = reinterpret_cast<const uint4*>(row);
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

// DPL = dimensions per lane = ceil(d_kv / 32). Self mode (bias_table != nullptr): keys are positions
// 0..i of the same row. Cross mode: keys are the encoder tokens j < enc_lengths[b] of example b.
template <typename T, int DPL>
__global__ void small_attention_kernel(const T* __restrict__ q, int q_ld, const T* __restrict__ k,
                                       const T* __restrict__ v, int kv_ld, T* __restrict__ out, int out_ld,
                                       int n_queries, int d_kv, int dec_len, const float* __restrict__ bias_table,
                                       const int32_t* __restrict__ row_example,
                                       const int32_t* __restrict__ enc_lengths, int enc_len, AdapterIndex index,
                                       int64_t k_offset, int64_t v_offset) {
  extern __shared__ float q_smem[];  // [kSmallAttnWarps][d_kv]
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int t = blockIdx.x * kSmallAttnWarps + warp;
  const int h = blockIdx.y;
  if (t >= n_queries) return;  // warp-uniform; only __syncwarp below

  const int r = t / dec_len, i = t % dec_len;
  const int b = row_example[r];
  const int64_t head_col = static_cast<int64_t>(h) * d_kv;
  const float* l_k = nullptr;
  const float* l_v = nullptr;
  if (index.adapters != nullptr && index.adapter_of_example != nullptr) {
    const int a = index.adapter_of_example[b];
    if (a >= 0) {
      const float* l = index.adapters + a * index.adapter_stride;
      l_k = l + k_offset + head_col;
      l_v = l + v_offset + head_col;
    }
  }

  float* qs = q_smem + warp * d_kv;
  const T* qrow = q + static_cast<int64_t>(t) * q_ld + head_col;
  for (int d = lane; d < d_kv; d += 32) qs[d] = to_f32(qrow[d]) * (l_k ? l_k[d] : 1.f);
  __syncwarp();

  int n_keys;
  int64_t key_base;
  const float* brow = nullptr;
  if (bias_table) {
    n_keys = i + 1;  // causal
    key_base = static_cast<int64_t>(r) * dec_len;
    brow = bias_table + static_cast<int64_t>(h) * (2 * dec_len - 1) + (dec_len - 1 - i);
  } else {
    n_keys = min(max(enc_lengths[b], 0), enc_len);
    key_base = static_cast<int64_t>(b) * enc_len;
  }

  float m = -INFINITY, l = 0.f;
  float acc[DPL];
#pragma unroll
  for (int u = 0; u < DPL; ++u) acc[u] = 0.f;

  for (int j0 = 0; j0 < n_keys; j0 += 32) {
    const int j = j0 + lane;
    float s = -INFINITY;
    if (j < n_keys) {
      s = dot_row(qs, k + (key_base + j) * kv_ld + head_col, d_kv);
      if (brow) s += brow[j];
    }
    const float m_new = fmaxf(m, warp_max(s));  // finite: key j0 is always valid
    const float p = j < n_keys ? expf(s - m_new) : 0.f;
    const float rescale = expf(m - m_new);  // 0 on the first tile (m = -inf)
    l = l * rescale + warp_sum(p);
#pragma unroll
    for (int u = 0; u < DPL; ++u) acc[u] *= rescale;
    const int tile = min(32, n_keys - j0);
    for (int jj = 0; jj < tile; ++jj) {
      const float pj = __shfl_sync(kFullMask, p, jj);
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

template <typename T>
void launch_small_attention(const T* q, int q_ld, const T* k, const T* v, int kv_ld, T* out, int out_ld,
                            int n_queries, int heads, int d_kv, int dec_len, const float* bias_table,
                            const int32_t* row_example, const int32_t* enc_lengths, int enc_len,
                            const AdapterIndex& index, int64_t k_offset, int64_t v_offset, cudaStream_t stream) {
  if (n_queries <= 0) return;
  if (d_kv > kMaxDKv) fail(ErrorCode::InvalidModel, "d_kv " + std::to_string(d_kv) + " exceeds the CUDA backend's limit of " + std::to_string(kMaxDKv));
  const dim3 grid((n_queries + kSmallAttnWarps - 1) / kSmallAttnWarps, heads);
  const dim3 block(32 * kSmallAttnWarps);
  const size_t smem = sizeof(float) * kSmallAttnWarps * d_kv;
#define TFEW_SMALL_ATTN(DPL)                                                                            \
  small_attention_kernel<T, DPL><<<grid, block, smem, stream>>>(q, q_ld, k, v, kv_ld, out, out_ld,       \
                                                                n_queries, d_kv, dec_len, bias_table,    \
                                                                row_example, enc_lengths, enc_len, index, \
                                                                k_offset, v_offset)
  if (d_kv <= 32) TFEW_SMALL_ATTN(1);
  else if (d_kv <= 64) TFEW_SMALL_ATTN(2);
  else if (d_kv <= 128) TFEW_SMALL_ATTN(4);
  else TFEW_SMALL_ATTN(8);
#undef TFEW_SMALL_ATTN
  TFEW_CUDA_CHECK_LAUNCH("small_attention_kernel");
}

}  // namespace

// ------------------------------------------------------------------------------------------------------------
// launchers

void relative_bias_table(const float* rel_emb, const int32_t* buckets, int span, int num_heads, float* table,
                         cudaStream_t stream) {
  const int64_t n = static_cast<int64_t>(span) * num_heads;
  if (n <= 0) return;
  relative_bias_table_kernel<<<grid_for(n, 256), 256, 0, stream>>>(rel_emb, buckets, span, num_heads, table);
  TFEW_CUDA_CHECK_LAUNCH("relative_bias_table_kernel");
}

template <typename T>
void ia3_scale_kv(T* buf, int ld, int k_col, int v_col, int width, int n_tokens, const AdapterIndex& index,
                  int64_t k_offset, int64_t v_offset, cudaStream_t stream) {
  const int64_t n = static_cast<int64_t>(n_tokens) * width;
  if (n <= 0 || !index.active()) return;
  ia3_scale_kv_kernel<T><<<grid_for(n, 256), 256, 0, stream>>>(buf, ld, k_col, v_col, width, n, index,
                                                               k_offset, v_offset);
  TFEW_CUDA_CHECK_LAUNCH("ia3_scale_kv_kernel");
}

template <typename T>
void encoder_softmax(const float* scores, const float* bias_table, const int32_t* lengths, int batch, int heads,
                     int len, T* probs, cudaStream_t stream) {
  const int64_t n_rows = static_cast<int64_t>(batch) * heads * len;
  if (n_rows <= 0) return;
  constexpr int kBlock = 256;  // 8 rows per block
  const int64_t blocks = (n_rows * 32 + kBlock - 1) / kBlock;
  encoder_softmax_kernel<T><<<static_cast<unsigned>(blocks), kBlock, 0, stream>>>(scores, bias_table, lengths,
                                                                                  heads, len, n_rows, probs);
  TFEW_CUDA_CHECK_LAUNCH("encoder_softmax_kernel");
}

template <typename T>
void decoder_self_attention(const T* qkv, int ld, int inner, int d_kv, int heads, int n_rows, int dec_len,
                            const float* bias_table, const int32_t* row_example, const AdapterIndex& index,
                            int64_t k_offset, int64_t v_offset, T* out, int out_ld, cudaStream_t stream) {
  if (!bias_table) fail(ErrorCode::Internal, "decoder_self_attention needs the relative-position bias");
  launch_small_attention<T>(qkv, ld, qkv + inner, qkv + 2 * inner, ld, out, out_ld, n_rows * dec_len, heads,
                            d_kv, dec_len, bias_table, row_example, nullptr, 0, index, k_offset, v_offset, stream);
}

template <typename T>
void cross_attention(const T* q, int q_ld, const T* kv, int kv_ld, int inner, int d_kv, int heads, int n_rows,
                     int dec_len, const int32_t* row_example, const int32_t* enc_lengths, int enc_len,
                     const AdapterIndex& index, int64_t k_offset, int64_t v_offset, T* out, int out_ld,
                     cudaStream_t stream) {
  launch_small_attention<T>(q, q_ld, kv, kv + inner, kv_ld, out, out_ld, n_rows * dec_len, heads, d_kv, dec_len,
                            nullptr, row_example, enc_lengths, enc_len, index, k_offset, v_offset, stream);
}

#define TFEW_INSTANTIATE(T)                                                                                   \
  template void ia3_scale_kv<T>(T*, int, int, int, int, int, const AdapterIndex&, int64_t, int64_t,            \
                                cudaStream_t);                                                                \
  template void encoder_softmax<T>(const float*, const float*, const int32_t*, int, int, int, T*, cudaStream_t); \
  template void decoder_self_attention<T>(const T*, int, int, int, int, int, int, const float*, const int32_t*, \
                                          const AdapterIndex&, int64_t, int64_t, T*, int, cudaStream_t);      \
  template void cross_attention<T>(const T*, int, const T*, int, int, int, int, int, int, const int32_t*,       \
                                   const int32_t*, int, const AdapterIndex&, int64_t, int64_t, T*, int,       \
                                   cudaStream_t);
TFEW_INSTANTIATE(float)
TFEW_INSTANTIATE(__nv_bfloat16)
#undef TFEW_INSTANTIATE

}  // namespace kernels
}  // namespace tfew
