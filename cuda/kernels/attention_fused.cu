// Fused encoder self-attention for bf16 (the fast path): scores, relative-position bias, padding mask,
// softmax and the weighted sum of values in one kernel, with tensor cores (WMMA, bf16 in, fp32 accumulate).
// The unfused path (two batched cuBLAS GEMMs around encoder_softmax) writes and reads B*H*L*L fp32 scores
// and bf16 probabilities: ~0.8 GB of memory traffic per layer for 32 examples of 256 tokens. Here the
// scores of a 64x64 tile live in shared memory only.
//
// One block = one (example, head, 64-query tile), 4 warps of 16 query rows. For each 64-key tile of the
// example's real keys (tiles past its length are skipped): S = Q K^T (WMMA) -> shared memory; each warp runs
// the online softmax over its rows in fp32 (running max m, running sum l; the output rows are rescaled by
// exp(m_old - m_new)); P (bf16) V is accumulated (WMMA) into fp32 output rows kept in shared memory. The
// (IA)3 key/value scales of the example's adapter are applied while K and V tiles are loaded, so the
// encoder needs no separate (IA)3 pass. Training-mode dropout drops probabilities in the P V product only
// (the row sums, which normalise, count every key), element (b, h, i, j) as encoder_softmax numbers it.
// T5: no 1/sqrt(d_kv) scaling.
#include <mma.h>

#include <mutex>
#include <set>

#include "kernels/device_common.cuh"
#include "kernels/dropout.cuh"

namespace tfew {
namespace kernels {

namespace {

namespace wmma = nvcuda::wmma;

constexpr int kTile = 64;           // queries per block and keys per step
constexpr int kWarps = kTile / 16;  // one warp per 16 query rows
constexpr int kThreads = 32 * kWarps;

template <int DK>
struct FusedSmem {
  static constexpr int kLdQ = DK + 8;      // bf16 rows, padded against bank conflicts (multiple of 8)
  static constexpr int kLdS = kTile + 4;   // fp32 score rows (multiple of 4)
  static constexpr int kLdP = kTile + 8;   // bf16 probability rows
  static constexpr int kLdO = DK + 4;      // fp32 output rows
  static constexpr size_t kQ = 0;
  static constexpr size_t kK = kQ + sizeof(__nv_bfloat16) * kTile * kLdQ;
  static constexpr size_t kV = kK + sizeof(__nv_bfloat16) * kTile * kLdQ;
  static constexpr size_t kS = kV + sizeof(__nv_bfloat16) * kTile * kLdQ;
  static constexpr size_t kP = kS + sizeof(float) * kTile * kLdS;
  static constexpr size_t kO = kP + sizeof(__nv_bfloat16) * kTile * kLdP;
  static constexpr size_t kM = kO + sizeof(float) * kTile * kLdO;
  static constexpr size_t kL = kM + sizeof(float) * kTile;
  static constexpr size_t kBytes = kL + sizeof(float) * kTile;
};

// Loads rows [row0, row0 + 64) of one head's DK columns into shared memory (zeros past `rows`), optionally
// multiplying column c by scale[c] (the (IA)3 vector of this head's slice).
template <int DK>
__device__ __forceinline__ void load_tile(const __nv_bfloat16* __restrict__ src, int64_t ld, int row0, int rows,
                                          const float* __restrict__ scale, __nv_bfloat16* dst, int ld_dst) {
  constexpr int kVecPerRow = DK / 8;  // 8 bf16 per 16-byte vector
  for (int v = threadIdx.x; v < kTile * kVecPerRow; v += kThreads) {
    const int r = v / kVecPerRow, c = (v % kVecPerRow) * 8;
    uint4 packed = make_uint4(0, 0, 0, 0);
    if (row0 + r < rows) packed = *reinterpret_cast<const uint4*>(src + (row0 + r) * ld + c);
    __nv_bfloat16* e = reinterpret_cast<__nv_bfloat16*>(&packed);
    if (scale) {
#pragma unroll
      for (int u = 0; u < 8; ++u) e[u] = __float2bfloat16_rn(__bfloat162float(e[u]) * scale[c + u]);
    }
    *reinterpret_cast<uint4*>(dst + r * ld_dst + c) = packed;
  }
}

template <int DK>
__global__ void __launch_bounds__(kThreads)
fused_encoder_attention_kernel(const __nv_bfloat16* __restrict__ qkv, int inner, int len,
                               const float* __restrict__ bias_table, const int32_t* __restrict__ lengths,
                               AdapterIndex index, int64_t k_offset, int64_t v_offset, DropoutSite dropout,
                               __nv_bfloat16* __restrict__ out) {
  dropout = with_seed(dropout);
  using S = FusedSmem<DK>;
  extern __shared__ __align__(128) unsigned char smem[];  // WMMA needs 32-byte aligned tiles
  __nv_bfloat16* Qs = reinterpret_cast<__nv_bfloat16*>(smem + S::kQ);
  __nv_bfloat16* Ks = reinterpret_cast<__nv_bfloat16*>(smem + S::kK);
  __nv_bfloat16* Vs = reinterpret_cast<__nv_bfloat16*>(smem + S::kV);
  float* Ss = reinterpret_cast<float*>(smem + S::kS);
  __nv_bfloat16* Ps = reinterpret_cast<__nv_bfloat16*>(smem + S::kP);
  float* Os = reinterpret_cast<float*>(smem + S::kO);
  float* row_max = reinterpret_cast<float*>(smem + S::kM);
  float* row_sum = reinterpret_cast<float*>(smem + S::kL);

  const int q0 = blockIdx.x * kTile, h = blockIdx.y, b = blockIdx.z;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t ld = 3 * static_cast<int64_t>(inner);
  const __nv_bfloat16* base = qkv + static_cast<int64_t>(b) * len * ld + static_cast<int64_t>(h) * DK;
  const int n_keys = min(max(lengths[b], 0), len);

  const float* k_scale = nullptr;
  const float* v_scale = nullptr;
  if (index.adapters != nullptr && index.adapter_of_example != nullptr) {
    const int a = index.adapter_of_example[b];
    if (a >= 0) {
      const float* l = index.adapters + a * index.adapter_stride;
      k_scale = l + k_offset + static_cast<int64_t>(h) * DK;
      v_scale = l + v_offset + static_cast<int64_t>(h) * DK;
    }
  }

  load_tile<DK>(base, ld, q0, len, nullptr, Qs, S::kLdQ);
  for (int i = threadIdx.x; i < kTile * S::kLdO; i += kThreads) Os[i] = 0.f;
  for (int i = threadIdx.x; i < kTile; i += kThreads) {
    row_max[i] = -INFINITY;
    row_sum[i] = 0.f;
  }

  const int wr = warp * 16;  // this warp's first query row in the tile
  for (int k0 = 0; k0 < n_keys; k0 += kTile) {
    __syncthreads();  // the previous tile's K/V/P are no longer read
    load_tile<DK>(base + inner, ld, k0, len, k_scale, Ks, S::kLdQ);
    load_tile<DK>(base + 2 * inner, ld, k0, len, v_scale, Vs, S::kLdQ);
    __syncthreads();

    // S[wr .. wr+16, 0 .. 64) = Q K^T
#pragma unroll
    for (int nt = 0; nt < kTile / 16; ++nt) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.f);
#pragma unroll
      for (int kt = 0; kt < DK / 16; ++kt) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> bk;
        wmma::load_matrix_sync(a, Qs + wr * S::kLdQ + kt * 16, S::kLdQ);
        wmma::load_matrix_sync(bk, Ks + nt * 16 * S::kLdQ + kt * 16, S::kLdQ);  // K rows = columns of K^T
        wmma::mma_sync(acc, a, bk, acc);
      }
      wmma::store_matrix_sync(Ss + wr * S::kLdS + nt * 16, acc, S::kLdS, wmma::mem_row_major);
    }
    __syncwarp();

    // Online softmax of this warp's 16 rows; lanes own key columns lane and lane + 32.
    for (int r = wr; r < wr + 16; ++r) {
      const int i = q0 + r;
      const float* brow = bias_table + static_cast<int64_t>(h) * (2 * len - 1) + (len - 1 - min(i, len - 1));
      float s[2];
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        const int j = k0 + lane + 32 * u;
        s[u] = j < n_keys ? Ss[r * S::kLdS + lane + 32 * u] + brow[j] : -INFINITY;
      }
      // dropout index of (b, h, i, k0 + lane): the position in the [B, H, L, L] probabilities
      const uint64_t drop_row = ((static_cast<uint64_t>(b) * gridDim.y + h) * len + i) * len + k0 + lane;
      const float m_old = row_max[r];
      const float m_new = fmaxf(m_old, warp_max(fmaxf(s[0], s[1])));
      const bool any = m_new != -INFINITY;  // false only if no key seen yet (cannot happen: k0 < n_keys)
      float p_sum = 0.f;
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        const float p = any ? expf(s[u] - m_new) : 0.f;
        p_sum += p;
        const float kept = dropout.rate > 0.f && p > 0.f ? p * dropout_scale(dropout, drop_row + 32 * u) : p;
        Ps[r * S::kLdP + lane + 32 * u] = __float2bfloat16_rn(kept);
      }
      p_sum = warp_sum(p_sum);
      const float alpha = (any && m_old != -INFINITY) ? expf(m_old - m_new) : (any ? 0.f : 1.f);
      for (int c = lane; c < DK; c += 32) Os[r * S::kLdO + c] *= alpha;
      __syncwarp();
      if (lane == 0) {
        row_max[r] = m_new;
        row_sum[r] = row_sum[r] * alpha + p_sum;
      }
    }
    __syncwarp();

    // O[wr .. wr+16, :] += P V
#pragma unroll
    for (int dt = 0; dt < DK / 16; ++dt) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::load_matrix_sync(acc, Os + wr * S::kLdO + dt * 16, S::kLdO, wmma::mem_row_major);
#pragma unroll
      for (int kt = 0; kt < kTile / 16; ++kt) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> bv;
        wmma::load_matrix_sync(a, Ps + wr * S::kLdP + kt * 16, S::kLdP);
        wmma::load_matrix_sync(bv, Vs + kt * 16 * S::kLdQ + dt * 16, S::kLdQ);
        wmma::mma_sync(acc, a, bv, acc);
      }
      wmma::store_matrix_sync(Os + wr * S::kLdO + dt * 16, acc, S::kLdO, wmma::mem_row_major);
    }
  }
  __syncthreads();

  // out[b, i, h*DK + c] = O[i, c] / l[i] for the tile's real query rows
  __nv_bfloat16* obase = out + static_cast<int64_t>(b) * len * inner + static_cast<int64_t>(h) * DK;
  for (int v = threadIdx.x; v < kTile * DK; v += kThreads) {
    const int r = v / DK, c = v % DK;
    if (q0 + r >= len) continue;
    const float l = row_sum[r];
    obase[static_cast<int64_t>(q0 + r) * inner + c] = __float2bfloat16_rn(l > 0.f ? Os[r * S::kLdO + c] / l : 0.f);
  }
}

template <int DK>
void launch_fused(const __nv_bfloat16* qkv, int inner, int batch, int heads, int len, const float* bias_table,
                  const int32_t* lengths, const AdapterIndex& index, int64_t k_offset, int64_t v_offset,
                  const DropoutSite& dropout, __nv_bfloat16* out, cudaStream_t stream) {
  constexpr size_t smem = FusedSmem<DK>::kBytes;
  // More than the default 48 KiB of dynamic shared memory must be opted into, once per kernel and device (the
  // attribute belongs to the current device; engines on several GPUs, or threads, may launch it).
  static std::mutex mu;
  static std::set<int> configured;
  int device = 0;
  TFEW_CUDA_CHECK(cudaGetDevice(&device));
  {
    std::lock_guard<std::mutex> lock(mu);
    if (!configured.count(device)) {
      TFEW_CUDA_CHECK(cudaFuncSetAttribute(fused_encoder_attention_kernel<DK>,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
      configured.insert(device);
    }
  }
  const dim3 grid((len + kTile - 1) / kTile, heads, batch);
  fused_encoder_attention_kernel<DK><<<grid, kThreads, smem, stream>>>(qkv, inner, len, bias_table, lengths, index,
                                                                       k_offset, v_offset, dropout, out);
  TFEW_CUDA_CHECK_LAUNCH("fused_encoder_attention_kernel");
}

}  // namespace

bool fused_encoder_attention_supported(int d_kv) {
  size_t needed = 0;
  switch (d_kv) {
    case 16: needed = FusedSmem<16>::kBytes; break;
    case 32: needed = FusedSmem<32>::kBytes; break;
    case 64: needed = FusedSmem<64>::kBytes; break;
    case 128: needed = FusedSmem<128>::kBytes; break;
    default: return false;
  }
  // The opt-in shared memory per block differs by GPU: 163 KiB on A100, 227 KiB on H100, but 99 KiB on
  // compute capability 8.6 / 8.9 cards, where d_kv 128 (110 KiB) does not fit: use the cuBLAS path there.
  int device = 0, optin = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return needed <= static_cast<size_t>(optin);
}

void fused_encoder_attention(const __nv_bfloat16* qkv, int inner, int d_kv, int batch, int heads, int len,
                             const float* bias_table, const int32_t* lengths, const AdapterIndex& index,
                             int64_t k_offset, int64_t v_offset, const DropoutSite& dropout, __nv_bfloat16* out,
                             cudaStream_t stream) {
  if (batch <= 0 || len <= 0) return;
  switch (d_kv) {
    case 16: launch_fused<16>(qkv, inner, batch, heads, len, bias_table, lengths, index, k_offset, v_offset, dropout, out, stream); break;
    case 32: launch_fused<32>(qkv, inner, batch, heads, len, bias_table, lengths, index, k_offset, v_offset, dropout, out, stream); break;
    case 64: launch_fused<64>(qkv, inner, batch, heads, len, bias_table, lengths, index, k_offset, v_offset, dropout, out, stream); break;
    case 128: launch_fused<128>(qkv, inner, batch, heads, len, bias_table, lengths, index, k_offset, v_offset, dropout, out, stream); break;
    default: fail(ErrorCode::Internal, "fused encoder attention: unsupported d_kv " + std::to_string(d_kv));
  }
}

}  // namespace kernels
}  // namespace tfew
