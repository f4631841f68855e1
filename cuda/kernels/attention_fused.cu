// Fused encoder self-attention for bf16 (the fast path): scores, relative-position bias, padding mask,
// softmax and the weighted sum of values in one kernel, on tensor cores (bf16 in, fp32 accumulate).
// The unfused path (two batched cuBLAS GEMMs around encoder_softmax) writes and reads B*H*L*L fp32 scores
// and bf16 probabilities: ~0.8 GB of memory traffic per layer for 32 examples of 256 tokens. Here the
// scores of a 64x64 tile never leave the chip.
//
// One block = one (example, head, 64-query tile), 4 warps of 16 query rows. For each 64-key tile of the
// example's real keys (tiles past its length are skipped): S = Q K^T, the online softmax over the rows in fp32
// (running max m, running sum l; the output rows are rescaled by exp(m_old - m_new)), O += P (bf16) V. The
// (IA)3 key/value scales of the example's adapter are applied inside the kernel, so the encoder needs no
// separate (IA)3 pass. Training-mode dropout drops probabilities in the P V product only (the row sums, which
// normalise, count every key), element (b, h, i, j) as encoder_softmax numbers it. In training the forward also
// writes that mask as bits (KeepBits, 32 keys a word), which the rerun and the two backward kernels read: each
// element is hashed once per step, not four times. T5: no 1/sqrt(d_kv) scaling.
// K and V are scaled as K~ = K diag l_k and V~ = V diag l_v rounded to bf16, as PEFT and the cuBLAS path round them.
// Two forward kernels: fused_encoder_attention_mma_kernel (the default: mma.sync, everything in registers,
// cp.async-pipelined tiles) and fused_encoder_attention_kernel (the first one: WMMA through shared memory;
// TFEW_CUDA_ATTENTION_KERNEL=wmma).
//
// The backward (training, flash-style: no [B, H, L, L] tensor in memory) is two mma.sync kernels after a rerun of
// the forward that also writes each query row's softmax statistics (max m, sum l) and the output C; the scores are
// made as the forward makes them (the dq kernel sums them in the forward's order: bit for bit its statistics):
//   dq kernel,  one block per (example, head, 64-query tile): D = rowsum(dC * C), then per key tile
//               S = Q K~^T, P = exp(S + bias - m) / l, dP' = dC V~^T, dS = P (drop dP' - D), dQ += dS K~;
//   dkv kernel, one block per (example, head, 64-key tile): per query tile S^T = K~ Q^T, P^T, dP'^T = V~ dC^T,
//               dV~ += P'^T dC, dK~ += dS^T Q.
// Each output element is summed by one block in a fixed order (in registers): deterministic, no atomics. Query
// tiles past an example's length are skipped: padded positions are masked as keys everywhere, so nothing reads
// them and their output gradient dC is exactly zero.
#include <mma.h>

#include <cstdlib>
#include <string>
#include <utility>

#include "kernels/device_common.cuh"
#include "kernels/dropout.cuh"

namespace tfew {
namespace kernels {

namespace {

namespace wmma = nvcuda::wmma;

constexpr int kTile = 64;           // queries per block and keys per step
constexpr int kWarps = kTile / 16;  // one warp per 16 query rows
constexpr int kThreads = 32 * kWarps;
constexpr float kLog2e = 1.4426950408889634f;  // exp(x) = 2^(x log2 e): the mma kernels' ex2
// __launch_bounds__'s minimum of resident blocks for a kernel instance compiled for kMinBlocks (OccupancyBlocks): none
// (0) for the default instances. An explicit 1 is not the same as none: ptxas (CUDA 13.0, sm_90) then gives the
// backward kernels ~20-40 more registers a thread (dq 211 against 190), one block fewer per SM.
template <int kMinBlocks>
constexpr int kMinBlocksBound = kMinBlocks == 1 ? 0 : kMinBlocks;

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
// multiplying column c by scale[c] (the (IA)3 vector of this head's slice). kTransposed: stored as [DK][64]
// (column c of the tile is row c of dst).
template <int DK, bool kTransposed = false>
__device__ __forceinline__ void load_tile(const __nv_bfloat16* __restrict__ src, int64_t ld, int row0, int rows,
                                          const float* __restrict__ scale, __nv_bfloat16* dst, int ld_dst) {
  constexpr int kVecPerRow = DK / 8;  // 8 bf16 per 16-byte vector
  static_assert(kVecPerRow % 2 == 0 && kTile == 64, "the transposed mapping pairs vectors in 4 x 16 rows");
  for (int v = threadIdx.x; v < kTile * kVecPerRow; v += kThreads) {
    int r, c;
    if (kTransposed) {
      // A warp's 32 vectors are 16 rows x 2 neighbouring vectors (whole 32-byte sectors): its transposed 16-bit
      // stores then meet at most 2 per bank, where a row's 8 vectors per warp met 8 times in one bank (rows of
      // dst are 36 words apart, columns 8 apart).
      const int lane = v & 31, group = v >> 5;
      r = (lane & 15) + 16 * (group & 3);
      c = ((lane >> 4) + 2 * (group >> 2)) * 8;
    } else {
      r = v / kVecPerRow;
      c = (v % kVecPerRow) * 8;
    }
    uint4 packed = make_uint4(0, 0, 0, 0);
    if (row0 + r < rows) packed = *as_vector<uint4>(src + (row0 + r) * ld + c);
    __nv_bfloat16* e = reinterpret_cast<__nv_bfloat16*>(&packed);
    if (scale) {
#pragma unroll
      for (int u = 0; u < 8; ++u) e[u] = __float2bfloat16_rn(__bfloat162float(e[u]) * scale[c + u]);
    }
    if (kTransposed) {
#pragma unroll
      for (int u = 0; u < 8; ++u) dst[(c + u) * ld_dst + r] = e[u];
    } else {
      *as_vector<uint4>(dst + r * ld_dst + c) = packed;
    }
  }
}

// The (IA)3 scales of head h for example b's adapter (null: none).
__device__ __forceinline__ void head_scales(const AdapterIndex& index, int b, int h, int dk, int64_t k_offset,
                                            int64_t v_offset, const float*& k_scale, const float*& v_scale) {
  k_scale = v_scale = nullptr;
  if (index.adapters == nullptr || index.adapter_of_example == nullptr) return;
  const int a = index.adapter_of_example[b];
  if (a < 0) return;
  const float* l = index.adapters + a * index.adapter_stride;
  k_scale = l + k_offset + static_cast<int64_t>(h) * dk;
  v_scale = l + v_offset + static_cast<int64_t>(h) * dk;
}

// A forward block's (example b, head h, 64-query tile from q0): its q|k|v row stride and the first q column of
// the head in the example's rows, its real keys, the keep-mask words per query row, its adapter's (IA)3 scales.
struct ForwardTile {
  int q0, h, b, n_keys;
  int64_t ld, keep_ld;
  const __nv_bfloat16* base;
  const float* k_scale;
  const float* v_scale;
};
template <int DK>
__device__ __forceinline__ ForwardTile forward_tile(const __nv_bfloat16* qkv, int inner, int len,
                                                    const int32_t* lengths, const AdapterIndex& index,
                                                    int64_t k_offset, int64_t v_offset) {
  ForwardTile f;
  f.q0 = blockIdx.x * kTile;
  f.h = blockIdx.y;
  f.b = blockIdx.z;
  f.n_keys = min(max(lengths[f.b], 0), len);
  f.ld = 3 * static_cast<int64_t>(inner);
  f.keep_ld = keep_bits_words(len);
  f.base = qkv + static_cast<int64_t>(f.b) * len * f.ld + static_cast<int64_t>(f.h) * DK;
  head_scales(index, f.b, f.h, DK, k_offset, v_offset, f.k_scale, f.v_scale);
  return f;
}

using Accumulator = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

// One warp's 16 rows of a tile product on tensor cores: acc[n] += A[16 x 16 KT] (bf16, row-major, lda) times
// B's 16-column block n (n < NT), whose 16 x 16 block (k, n) starts at b + n * n_step + k * k_step in layout
// LayoutB. Each A fragment is loaded once; every output block sums over k in order.
template <int NT, int KT, typename LayoutB>
__device__ __forceinline__ void warp_mma(const __nv_bfloat16* a, int lda, const __nv_bfloat16* b, int ldb,
                                         int n_step, int k_step, Accumulator (&acc)[NT]) {
#pragma unroll
  for (int kt = 0; kt < KT; ++kt) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa;
    wmma::load_matrix_sync(fa, a + kt * 16, lda);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, LayoutB> fb;
      wmma::load_matrix_sync(fb, b + nt * n_step + kt * k_step, ldb);
      wmma::mma_sync(acc[nt], fa, fb, acc[nt]);
    }
  }
}

// C[16 x 64] (fp32, ldc) = A[16 x DK] B^T with B[64 x DK] row-major (rows of b): scores-like products
// (Q K^T, dC V^T, ...).
template <int DK>
__device__ __forceinline__ void warp_abt(const __nv_bfloat16* a, int lda, const __nv_bfloat16* b, int ldb, float* c,
                                         int ldc) {
  Accumulator acc[kTile / 16];
#pragma unroll
  for (int nt = 0; nt < kTile / 16; ++nt) wmma::fill_fragment(acc[nt], 0.f);
  warp_mma<kTile / 16, DK / 16, wmma::col_major>(a, lda, b, ldb, 16 * ldb, 16, acc);
#pragma unroll
  for (int nt = 0; nt < kTile / 16; ++nt) wmma::store_matrix_sync(c + nt * 16, acc[nt], ldc, wmma::mem_row_major);
}

// acc[16 x DK] += A[16 x 64] B with B[64 x DK] row-major: probability-weighted sums (P V, dS K, ...) into
// accumulators kept in registers.
template <int DK>
__device__ __forceinline__ void warp_ab_acc(const __nv_bfloat16* a, int lda, const __nv_bfloat16* b, int ldb,
                                            Accumulator (&acc)[DK / 16]) {
  warp_mma<DK / 16, kTile / 16, wmma::row_major>(a, lda, b, ldb, 16, 16 * ldb, acc);
}

// The same into fp32 rows in shared memory (the forward, which rescales its output rows between tiles).
template <int DK>
__device__ __forceinline__ void warp_ab_acc(const __nv_bfloat16* a, int lda, const __nv_bfloat16* b, int ldb,
                                            float* c, int ldc) {
  Accumulator acc[DK / 16];
#pragma unroll
  for (int dt = 0; dt < DK / 16; ++dt) wmma::load_matrix_sync(acc[dt], c + dt * 16, ldc, wmma::mem_row_major);
  warp_ab_acc<DK>(a, lda, b, ldb, acc);
#pragma unroll
  for (int dt = 0; dt < DK / 16; ++dt) wmma::store_matrix_sync(c + dt * 16, acc[dt], ldc, wmma::mem_row_major);
}

template <int DK>
__global__ void __launch_bounds__(kThreads)
fused_encoder_attention_kernel(const __nv_bfloat16* __restrict__ qkv, int inner, int len,
                               const float* __restrict__ bias_table, const int32_t* __restrict__ lengths,
                               AdapterIndex index, int64_t k_offset, int64_t v_offset, DropoutSite dropout,
                               __nv_bfloat16* __restrict__ out, float* __restrict__ stats, KeepBits keep) {
  wait_for_previous_kernel();
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

  const auto [q0, h, b, n_keys, ld, keep_ld, base, k_scale, v_scale] =
      forward_tile<DK>(qkv, inner, len, lengths, index, k_offset, v_offset);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const bool fill_keep = keep.fill && keep.words;  // this run writes the mask (else reads it, or hashes)

  load_tile<DK>(base, ld, q0, len, nullptr, Qs, S::kLdQ);
  for (int i = threadIdx.x; i < kTile * S::kLdO; i += kThreads) Os[i] = 0.f;
  for (int i = threadIdx.x; i < kTile; i += kThreads) {
    row_max[i] = -INFINITY;
    row_sum[i] = 0.f;
  }

  const int wr = warp * 16;  // this warp's first query row in the tile
  for (int k0 = 0; k0 < n_keys; k0 += kTile) {
    __syncthreads();  // the previous tile's K/V/P are no longer read
    // keys past the example's length are zeros (masked below; a zero V row keeps 0 x V exact whatever padding holds)
    load_tile<DK>(base + inner, ld, k0, n_keys, k_scale, Ks, S::kLdQ);
    load_tile<DK>(base + 2 * inner, ld, k0, n_keys, v_scale, Vs, S::kLdQ);
    __syncthreads();

    // S[wr .. wr+16, 0 .. 64) = Q K^T
    warp_abt<DK>(Qs + wr * S::kLdQ, S::kLdQ, Ks, S::kLdQ, Ss + wr * S::kLdS, S::kLdS);
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
      // dropout index of (b, h, i, k0 + lane): the position in the [B, H, L, L] probabilities; the row's
      // first keep word of this key tile
      const uint64_t drop_row = ((static_cast<uint64_t>(b) * gridDim.y + h) * len + i) * len + k0 + lane;
      const int64_t keep_row = (static_cast<int64_t>(b) * gridDim.y + h) * len + i;
      uint32_t* keep_words = keep.words && i < len ? keep.words + keep_row * keep_ld + k0 / 32 : nullptr;
      const float m_old = row_max[r];
      const float m_new = fmaxf(m_old, warp_max(fmaxf(s[0], s[1])));
      const bool any = m_new != -INFINITY;  // false only if no key seen yet (cannot happen: k0 < n_keys)
      float p_sum = 0.f;
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        const float p = any ? expf(s[u] - m_new) : 0.f;
        p_sum += p;
        float kept = p;
        if (dropout.rate > 0.f) {
          bool keeps;
          if (fill_keep || !keep_words) {  // hash (every lane when filling: a word must be whole)
            keeps = (fill_keep || p > 0.f) && dropout_keeps(dropout, drop_row + 32 * u);
            if (fill_keep) {
              const uint32_t word = __ballot_sync(kFullMask, keeps);
              if (lane == 0 && keep_words) keep_words[u] = word;
            }
          } else {
            keeps = (keep_words[u] >> lane) & 1u;
          }
          kept = keeps ? p * dropout.keep_scale : 0.f;
        }
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
    warp_ab_acc<DK>(Ps + wr * S::kLdP, S::kLdP, Vs, S::kLdQ, Os + wr * S::kLdO, S::kLdO);
  }
  __syncthreads();

  // the softmax statistics of each query row, for the backward: [B, H, L, 3] = m, l (D: the dq kernel)
  if (stats) {
    for (int r = threadIdx.x; r < kTile; r += kThreads) {
      if (q0 + r >= len) continue;
      float* st = stats + ((static_cast<int64_t>(b) * gridDim.y + h) * len + q0 + r) * 3;
      st[0] = row_max[r];
      st[1] = row_sum[r];
    }
  }
  // out[b, i, h*DK + c] = O[i, c] / l[i] for the tile's real query rows
  __nv_bfloat16* obase = out + static_cast<int64_t>(b) * len * inner + static_cast<int64_t>(h) * DK;
  for (int v = threadIdx.x; v < kTile * DK; v += kThreads) {
    const int r = v / DK, c = v % DK;
    if (q0 + r >= len) continue;
    const float l = row_sum[r];
    obase[static_cast<int64_t>(q0 + r) * inner + c] = __float2bfloat16_rn(l > 0.f ? Os[r * S::kLdO + c] / l : 0.f);
  }
}

// ---- the forward on mma.sync, FlashAttention-2 style (the default; TFEW_CUDA_ATTENTION_KERNEL=wmma: the kernel above)
// The same blocks and per-element arithmetic as fused_encoder_attention_kernel, which passes its scores,
// probabilities and output rows through shared memory between WMMA calls and walks each warp's 16 rows one by
// one for the softmax (~27 TFLOP/s on RANK-3B-B32's encoder attention, H200, session 12). Here each warp keeps
// its 16 x 64 scores, its softmax state (m, l of rows g and g + 8) and its 16 x DK output in registers, in
// mma.sync's fragment layout (device_common.cuh); a row's max and sum need two shuffles within its quad of lanes,
// and the score fragments, packed to bf16 pairs, are directly the A operand of P V. Beyond that (the version of
// session 12 ran at ~57 TFLOP/s with most of its instructions spent outside the tensor cores):
// - K and V tiles are copied by cp.async into two stages, so tile t + 1 is in flight while tile t is computed;
//   each thread multiplies the vectors it copied by the (IA)3 scales once they land (K~ = K diag l_k and
//   V~ = V diag l_v rounded to bf16, as PEFT and the cuBLAS path round them: scaling Q and the output instead
//   saved that pass but doubled the tiny relu checkpoint's UL-gradient error against its bf16 floor,
//   cuda-bf16-floor);
// - B fragments come from ldmatrix: K~ as stored, V~ through .trans (no transposed copy in shared memory);
// - each exponential is one ex2 of a fused multiply-add (log2 e folded in).
template <int DK>
struct MmaSmem {
  static constexpr int kLd = DK + 8;  // bf16 rows: 16-byte aligned, and the 8 rows of an ldmatrix matrix meet distinct banks
  static constexpr int kStage = kTile * kLd;  // elements of one K or V tile
  static constexpr size_t kQ = 0;
  static constexpr size_t kK = kQ + sizeof(__nv_bfloat16) * kStage;   // two stages
  static constexpr size_t kV = kK + sizeof(__nv_bfloat16) * 2 * kStage;  // two stages
  static constexpr size_t kBytes = kV + sizeof(__nv_bfloat16) * 2 * kStage;
};

// Fragments of tiles in shared memory (rows of MmaSmem<DK>::kLd bf16) for mma.sync, and products of them.
// The A fragment (16 x 16, rows row0 .. row0 + 15, columns 16 kk ..) of a bf16 tile in shared memory: ldmatrix's
// matrix m is rows 8 (m & 1), columns 8 (m >> 1) of the block, which is the order of a0 .. a3.
template <int DK>
__device__ __forceinline__ void a_fragment(uint32_t (&a)[4], const __nv_bfloat16* tile, int row0, int kk) {
  const int lane = threadIdx.x & 31;
  ldmatrix_x4(a, tile + (row0 + 8 * ((lane >> 3) & 1) + (lane & 7)) * MmaSmem<DK>::kLd + 16 * kk + 8 * (lane >> 4));
}
// B fragments of two 8-row blocks 16 np, 16 np + 8 of a tile stored [n][k] (columns 16 kk ..): b[0, 1] and b[2, 3].
template <int DK>
__device__ __forceinline__ void b_fragments_nk(uint32_t (&b)[4], const __nv_bfloat16* tile, int np, int kk) {
  const int lane = threadIdx.x & 31;
  ldmatrix_x4(b, tile + (16 * np + 8 * (lane >> 4) + (lane & 7)) * MmaSmem<DK>::kLd + 16 * kk + 8 * ((lane >> 3) & 1));
}
// B fragments of a tile stored [k][n] (rows 16 kp .. 16 kp + 15 are k) for the two 8-column blocks 16 dp, 16 dp + 8:
// b[0, 1] and b[2, 3] (ldmatrix .trans; matrix m is rows 8 (m & 1), columns 8 (m >> 1)).
template <int DK>
__device__ __forceinline__ void b_fragments_kn(uint32_t (&b)[4], const __nv_bfloat16* tile, int kp, int dp) {
  const int lane = threadIdx.x & 31;
  ldmatrix_x4_trans(b, tile + (16 * kp + 8 * ((lane >> 3) & 1) + (lane & 7)) * MmaSmem<DK>::kLd + 16 * dp +
                           8 * (lane >> 4));
}
// Two 8-column blocks of accumulator values (C layout: rows g, g + 8) as the A fragment of one 16-wide k block
// (bf16): the score-like products feed the next product without leaving the registers.
__device__ __forceinline__ void pack_a_fragment(const float (&c)[2][4], uint32_t (&a)[4]) {
  a[0] = pack_bf16x2(c[0][0], c[0][1]);
  a[1] = pack_bf16x2(c[0][2], c[0][3]);
  a[2] = pack_bf16x2(c[1][0], c[1][1]);
  a[3] = pack_bf16x2(c[1][2], c[1][3]);
}
__device__ __forceinline__ void mma_pair(float (&d0)[4], float (&d1)[4], const uint32_t (&a)[4], const uint32_t (&b)[4]) {
  const uint32_t lo[2] = {b[0], b[1]}, hi[2] = {b[2], b[3]};
  mma_bf16_16816(d0, a, lo);
  mma_bf16_16816(d1, a, hi);
}

// acc (16 rows x DK, C layout) += A (16 x 16, a fragment) times rows 16 kp .. 16 kp + 15 of a tile stored [k][n].
template <int DK>
__device__ __forceinline__ void accumulate_product(float (&acc)[DK / 8][4], const uint32_t (&a)[4],
                                                   const __nv_bfloat16* tile, int kp) {
#pragma unroll
  for (int dp = 0; dp < DK / 16; ++dp) {
    uint32_t b[4];
    b_fragments_kn<DK>(b, tile, kp, dp);
    mma_pair(acc[2 * dp], acc[2 * dp + 1], a, b);
  }
}

// A thread copies the same 8 columns (one 16-byte vector) of every 128 / (DK / 8)-th row of a tile.
template <int DK>
struct TileVectors {
  static constexpr int kPerRow = DK / 8;
  static constexpr int kRowStep = kThreads / kPerRow;
  static_assert(kThreads % kPerRow == 0, "every thread copies whole vectors of the same columns");
  __device__ static int first_row() { return threadIdx.x / kPerRow; }
  __device__ static int column() { return (threadIdx.x % kPerRow) * 8; }
};

// Starts copying rows [row0, row0 + 64) of one head's DK columns (of q, k, v or dC) into a tile (zeros past `rows`).
template <int DK>
__device__ __forceinline__ void copy_tile_async(const __nv_bfloat16* __restrict__ src, int64_t ld, int row0, int rows,
                                                __nv_bfloat16* dst) {
  using V = TileVectors<DK>;
  const int c = V::column();
  for (int r = V::first_row(); r < kTile; r += V::kRowStep) {
    const bool real = row0 + r < rows;
    cp_async_16(dst + r * MmaSmem<DK>::kLd + c, src + (real ? (row0 + r) * ld + c : 0), real);
  }
}

// This thread's 8 columns of an (IA)3 scale vector (null: none).
template <int DK>
struct ColumnScales {
  bool on = false;
  float s[8];
  __device__ explicit ColumnScales(const float* scale) {
    if (scale == nullptr) return;
    on = true;
#pragma unroll
    for (int u = 0; u < 8; ++u) s[u] = scale[TileVectors<DK>::column() + u];
  }
};

// Multiplies the vectors this thread copied into a tile by their scales, rounding to bf16 as load_tile does. Between
// the thread's cp_async_wait and the block's barrier: only its own landed copies are touched.
template <int DK>
__device__ __forceinline__ void scale_copied_vectors(__nv_bfloat16* tile, const ColumnScales<DK>& scale) {
  using V = TileVectors<DK>;
  if (!scale.on) return;
  const int c = V::column();
  for (int r = V::first_row(); r < kTile; r += V::kRowStep) {
    uint4* p = as_vector<uint4>(tile + r * MmaSmem<DK>::kLd + c);
    uint4 packed = *p;
    __nv_bfloat16* e = reinterpret_cast<__nv_bfloat16*>(&packed);
#pragma unroll
    for (int u = 0; u < 8; ++u) e[u] = __float2bfloat16_rn(__bfloat162float(e[u]) * scale.s[u]);
    *p = packed;
  }
}

// K~ and V~ of an example's 64-key tiles through two cp.async stages (the forward and the dq kernel): tile it + 1
// is copied while tile it is computed.
template <int DK>
struct KeyValueStages {
  __nv_bfloat16* k;  // [2][64][kLd]
  __nv_bfloat16* v;
  const __nv_bfloat16* k_src;  // the head's first k (v) column of the example's first row
  const __nv_bfloat16* v_src;
  int64_t ld;
  int n_keys, n_tiles;
  ColumnScales<DK> k_cols, v_cols;
  __device__ KeyValueStages(__nv_bfloat16* k_stages, __nv_bfloat16* v_stages, const __nv_bfloat16* k_first,
                            const __nv_bfloat16* v_first, int64_t row_stride, int keys, const float* k_scale,
                            const float* v_scale)
      : k(k_stages), v(v_stages), k_src(k_first), v_src(v_first), ld(row_stride), n_keys(keys),
        n_tiles((keys + kTile - 1) / kTile), k_cols(k_scale), v_cols(v_scale) {}
  __device__ void copy(int tile) {
    const int stage = (tile & 1) * MmaSmem<DK>::kStage;
    copy_tile_async<DK>(k_src, ld, tile * kTile, n_keys, k + stage);
    copy_tile_async<DK>(v_src, ld, tile * kTile, n_keys, v + stage);
    cp_async_commit();
  }
  // Starts tile 0.
  __device__ void start() {
    if (n_tiles > 0) copy(0);
  }
  // Makes tile `it` ready for the block (this thread's copies landed and scaled, then the barrier: every thread is
  // also done with tile it - 1, whose stage tile it + 1 takes) and starts copying tile it + 1.
  __device__ void ready(int it) {
    cp_async_wait<0>();
    scale_copied_vectors<DK>(k_tile(it), k_cols);
    scale_copied_vectors<DK>(v_tile(it), v_cols);
    __syncthreads();
    if (it + 1 < n_tiles) copy(it + 1);
  }
  __device__ __nv_bfloat16* k_tile(int it) const { return k + (it & 1) * MmaSmem<DK>::kStage; }
  __device__ __nv_bfloat16* v_tile(int it) const { return v + (it & 1) * MmaSmem<DK>::kStage; }
};

template <int DK, int kMinBlocks = 1>
__global__ void __launch_bounds__(kThreads, kMinBlocksBound<kMinBlocks>)
fused_encoder_attention_mma_kernel(const __nv_bfloat16* __restrict__ qkv, int inner, int len,
                                   const float* __restrict__ bias_table, const int32_t* __restrict__ lengths,
                                   AdapterIndex index, int64_t k_offset, int64_t v_offset, DropoutSite dropout,
                                   __nv_bfloat16* __restrict__ out, float* __restrict__ stats, KeepBits keep) {
  wait_for_previous_kernel();
  dropout = with_seed(dropout);
  using S = MmaSmem<DK>;
  extern __shared__ __align__(128) unsigned char smem[];
  __nv_bfloat16* Qs = reinterpret_cast<__nv_bfloat16*>(smem + S::kQ);
  __nv_bfloat16* Ks = reinterpret_cast<__nv_bfloat16*>(smem + S::kK);
  __nv_bfloat16* Vs = reinterpret_cast<__nv_bfloat16*>(smem + S::kV);

  const auto [q0, h, b, n_keys, ld, keep_ld, base, k_scale, v_scale] =
      forward_tile<DK>(qkv, inner, len, lengths, index, k_offset, v_offset);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const bool fill_keep = keep.fill && keep.words;  // this run writes the mask (else reads it, or hashes)
  // tile 0 of K and V is on its way while Q goes through the registers
  KeyValueStages<DK> kv(Ks, Vs, base + inner, base + 2 * inner, ld, n_keys, k_scale, v_scale);
  kv.start();
  load_tile<DK>(base, ld, q0, len, nullptr, Qs, S::kLd);
  __syncthreads();
  // this warp's query rows: [0] = row g of its 16, [1] = row g + 8
  const int wr = warp * 16;
  int row[2];
  const float* brow[2];
  uint32_t* keep_words[2];
#pragma unroll
  for (int u = 0; u < 2; ++u) {
    row[u] = q0 + wr + g + 8 * u;
    brow[u] = bias_table + static_cast<int64_t>(h) * (2 * len - 1) + (len - 1 - min(row[u], len - 1));
    const int64_t keep_row = (static_cast<int64_t>(b) * gridDim.y + h) * len + row[u];
    keep_words[u] = keep.words && row[u] < len ? keep.words + keep_row * keep_ld : nullptr;
  }
  uint32_t qf[DK / 16][4];  // Q's A fragments, loaded once
#pragma unroll
  for (int kk = 0; kk < DK / 16; ++kk) a_fragment<DK>(qf[kk], Qs, wr, kk);
  float o[DK / 8][4];
#pragma unroll
  for (int dt = 0; dt < DK / 8; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};

  for (int it = 0; it < kv.n_tiles; ++it) {
    const int k0 = it * kTile;
    kv.ready(it);
    const __nv_bfloat16* Kt = kv.k_tile(it);
    const __nv_bfloat16* Vt = kv.v_tile(it);

    // S = Q K~^T: 8 blocks of 8 keys; B[k = d][n = key] = K~[key][d], two key blocks a fragment load
    float sc[kTile / 8][4];
#pragma unroll
    for (int nt = 0; nt < kTile / 8; ++nt) sc[nt][0] = sc[nt][1] = sc[nt][2] = sc[nt][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < DK / 16; ++kk)
#pragma unroll
      for (int np = 0; np < kTile / 16; ++np) {
        uint32_t bf[4];
        b_fragments_nk<DK>(bf, Kt, np, kk);
        mma_pair(sc[2 * np], sc[2 * np + 1], qf[kk], bf);
      }
    // bias and key mask; the rows' running max (a row's 64 keys are spread over its quad: lanes 4g .. 4g + 3)
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < kTile / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int u = e >> 1, j = k0 + nt * 8 + 2 * t + (e & 1);
        sc[nt][e] = j < n_keys ? sc[nt][e] + brow[u][j] : -INFINITY;
        mx[u] = fmaxf(mx[u], sc[nt][e]);
      }
    float m_new[2], alpha[2], m_log2[2];
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      mx[u] = fmaxf(mx[u], __shfl_xor_sync(kFullMask, mx[u], 1));
      mx[u] = fmaxf(mx[u], __shfl_xor_sync(kFullMask, mx[u], 2));
      m_new[u] = fmaxf(m[u], mx[u]);  // finite: key k0 < n_keys is real
      alpha[u] = m[u] == -INFINITY ? 0.f : ex2_approx((m[u] - m_new[u]) * kLog2e);
      m_log2[u] = m_new[u] * kLog2e;
    }
    // probabilities (the row sums count every key), dropout on what multiplies V, P as bf16 A fragments
    float p_sum[2] = {0.f, 0.f};
    uint32_t pf[kTile / 16][4];
    uint32_t fill_bits[2][2] = {{0u, 0u}, {0u, 0u}};  // [row][keep word of this tile], this lane's keys
#pragma unroll
    for (int nt = 0; nt < kTile / 8; ++nt) {
      float kept[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float p = ex2_approx(fmaf(sc[nt][e], kLog2e, -m_log2[e >> 1]));  // exp(s - m); 0 for masked keys
        p_sum[e >> 1] += p;
        kept[e] = p;
      }
      if (dropout.rate > 0.f) {
        // elements 2 u, 2 u + 1: keys j, j + 1 of row u (j even), one hash for the pair where its index is even
        const int jj = nt * 8 + 2 * t, j = k0 + jj;
#pragma unroll
        for (int u = 0; u < 2; ++u) {
          bool keeps[2] = {false, false};
          if (fill_keep || !keep_words[u]) {  // hash (every key when filling: a word must be whole)
            if (fill_keep || kept[2 * u] > 0.f || kept[2 * u + 1] > 0.f) {
              const uint64_t element = ((static_cast<uint64_t>(b) * gridDim.y + h) * len + row[u]) * len + j;
              if ((element & 1) == 0) {
                dropout_kept_pair(dropout.key, dropout.threshold, element, keeps[0], keeps[1]);
              } else {  // (an odd length)
                keeps[0] = dropout_keeps(dropout, element);
                keeps[1] = dropout_keeps(dropout, element + 1);
              }
            }
            if (fill_keep) fill_bits[u][jj >> 5] |= (keeps[0] ? 1u : 0u) << (jj & 31) | (keeps[1] ? 2u : 0u) << (jj & 31);
          } else {
            const uint32_t word = keep_words[u][k0 / 32 + (jj >> 5)] >> (jj & 31);
            keeps[0] = word & 1u;
            keeps[1] = (word >> 1) & 1u;
          }
          // (a masked key's p is 0 whatever its bit)
          kept[2 * u] = keeps[0] ? kept[2 * u] * dropout.keep_scale : 0.f;
          kept[2 * u + 1] = keeps[1] ? kept[2 * u + 1] * dropout.keep_scale : 0.f;
        }
      }
      // block nt of 8 keys is half of P's A fragment kk = nt / 2 (keys 16 kk .. 16 kk + 15)
      pf[nt >> 1][(nt & 1) * 2 + 0] = pack_bf16x2(kept[0], kept[1]);
      pf[nt >> 1][(nt & 1) * 2 + 1] = pack_bf16x2(kept[2], kept[3]);
    }
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      p_sum[u] += __shfl_xor_sync(kFullMask, p_sum[u], 1);
      p_sum[u] += __shfl_xor_sync(kFullMask, p_sum[u], 2);
      l[u] = l[u] * alpha[u] + p_sum[u];
      m[u] = m_new[u];
    }
    if (fill_keep && dropout.rate > 0.f) {
#pragma unroll
      for (int u = 0; u < 2; ++u)
#pragma unroll
        for (int w = 0; w < 2; ++w) {
          uint32_t word = fill_bits[u][w];
          word |= __shfl_xor_sync(kFullMask, word, 1);
          word |= __shfl_xor_sync(kFullMask, word, 2);
          if (t == 0 && keep_words[u]) keep_words[u][k0 / 32 + w] = word;
        }
    }
    // O = alpha O + P V~; B[k = key][n = d] = V~[key][d] (ldmatrix .trans), 16 keys at a time
#pragma unroll
    for (int dt = 0; dt < DK / 8; ++dt) {
      o[dt][0] *= alpha[0];
      o[dt][1] *= alpha[0];
      o[dt][2] *= alpha[1];
      o[dt][3] *= alpha[1];
    }
#pragma unroll
    for (int kk = 0; kk < kTile / 16; ++kk) accumulate_product<DK>(o, pf[kk], Vt, kk);
  }

  // the softmax statistics of each query row, for the backward: [B, H, L, 3] = m, l (D: the dq kernel)
#pragma unroll
  for (int u = 0; u < 2; ++u) {
    if (row[u] >= len) continue;
    if (stats && t == 0) {
      float* st = stats + ((static_cast<int64_t>(b) * gridDim.y + h) * len + row[u]) * 3;
      st[0] = m[u];
      st[1] = l[u];
    }
    // out[b, i, h*DK + c] = O[i, c] / l[i]
    const float lu = l[u];
    __nv_bfloat16* orow = out + (static_cast<int64_t>(b) * len + row[u]) * inner + static_cast<int64_t>(h) * DK + 2 * t;
#pragma unroll
    for (int dt = 0; dt < DK / 8; ++dt)
      *as_vector<uint32_t>(orow + dt * 8) =
          pack_bf16x2(lu > 0.f ? o[dt][2 * u] / lu : 0.f, lu > 0.f ? o[dt][2 * u + 1] / lu : 0.f);
  }
}

// ---- backward, on mma.sync in the forward's fragment layout

template <int DK>
struct BackwardSmem {
  static constexpr int kLd = MmaSmem<DK>::kLd;  // bf16 rows, as the forward's (copy_tile_async, the fragments)
  static constexpr int kStage = MmaSmem<DK>::kStage;  // elements of one bf16 tile
  static constexpr size_t kTileBytes = sizeof(__nv_bfloat16) * kStage;
  static constexpr size_t kRows = sizeof(float) * 3 * kTile;  // m log2(e), 1 / l, D of 64 query rows
  // dq kernel: Q and dC (once), K~ and V~ in two stages | rows
  static constexpr size_t kDqBytes = 6 * kTileBytes + kRows;
  // dkv kernel: K~ and V~ (once), Q and dC in two stages | rows | the keep words of the query tile's rows for the
  // block's 64 keys ([64][2])
  static constexpr size_t kDkvBytes = 6 * kTileBytes + kRows + sizeof(uint32_t) * 2 * kTile;
};

struct AttentionBackwardArgs {
  const __nv_bfloat16* qkv;  // [B * len, 3 inner] unscaled q|k|v
  int inner, len;
  const float* bias_table;
  const int32_t* lengths;
  AdapterIndex index;
  int64_t k_offset, v_offset;
  DropoutSite dropout;
  const uint32_t* keep_bits;  // the forward's keep mask (KeepBits layout) when dropout.rate > 0
  const __nv_bfloat16* dctx;  // dC [B * len, inner]
  const __nv_bfloat16* ctx;   // C [B * len, inner] (the forward's output)
  float* stats;               // [B, H, len, 3]: m, l (the forward's), D (the dq kernel's)
  __nv_bfloat16* dq;  // the q|k|v gradient: dQ into columns [0, inner), dK, dV into [inner, 3 inner)
  int dq_ld;
  Ia3Sums sums;   // the (IA)3 contributions K dK~, V dV~ summed over chunks of kChunkRows tokens
  float* sums_k;  // [B * chunks, inner]
  float* sums_v;
};

// Tokens per row of the (IA)3 sums the dkv kernel writes: a warp's 16 key rows.
constexpr int kChunkRows = 16;

// A backward block's (example b, head h): its q|k|v rows, its real keys, its adapter's (IA)3 scales.
struct BackwardHead {
  int b, h, H, n_keys;
  int64_t ld, head_col;       // q|k|v row stride; the head's first column in [B * len, inner] tensors
  const __nv_bfloat16* base;  // the example's first q|k|v row, the head's columns
  const float* k_scale;       // (IA)3 scales of the head (null: none)
  const float* v_scale;
  template <int DK>
  __device__ static BackwardHead of(const AttentionBackwardArgs& a) {
    BackwardHead g;
    g.b = blockIdx.z;
    g.h = blockIdx.y;
    g.H = gridDim.y;
    g.ld = 3 * static_cast<int64_t>(a.inner);
    g.base = a.qkv + static_cast<int64_t>(g.b) * a.len * g.ld + static_cast<int64_t>(g.h) * DK;
    g.head_col = static_cast<int64_t>(g.b) * a.len * a.inner + static_cast<int64_t>(g.h) * DK;
    g.n_keys = min(max(a.lengths[g.b], 0), a.len);
    head_scales(a.index, g.b, g.h, DK, a.k_offset, a.v_offset, g.k_scale, g.v_scale);
    return g;
  }
  __device__ float* stats_row(const AttentionBackwardArgs& a, int i) const {
    return a.stats + ((static_cast<int64_t>(b) * H + h) * a.len + min(i, a.len - 1)) * 3;
  }
  // Query row i's keep word w (keys 32 w .. 32 w + 31); i < len.
  __device__ uint32_t keep_word(const AttentionBackwardArgs& a, int i, int w) const {
    return a.keep_bits[((static_cast<int64_t>(b) * H + h) * a.len + i) * keep_bits_words(a.len) + w];
  }
};

// The dropout scale of a kept (1) or dropped (0) bit: 1 / (1 - rate) or 0; 1 without dropout.
__device__ __forceinline__ float keep_scale_of(const DropoutSite& d, uint32_t bit) {
  return d.rate > 0.f ? (bit ? d.keep_scale : 0.f) : 1.f;
}

// The two products of a backward kernel for the 8-column blocks 2 np, 2 np + 1 (16 rows of the warp, k over DK):
// s = A1 B1^T and dp = A2 B2^T with A1, A2 given as fragments and B1, B2 tiles stored [n][k] (the scores and dP').
template <int DK>
__device__ __forceinline__ void score_products(float (&s)[2][4], float (&dp)[2][4], const uint32_t (&a1)[DK / 16][4],
                                               const __nv_bfloat16* b1, const uint32_t (&a2)[DK / 16][4],
                                               const __nv_bfloat16* b2, int np) {
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int e = 0; e < 4; ++e) s[h][e] = dp[h][e] = 0.f;
#pragma unroll
  for (int kk = 0; kk < DK / 16; ++kk) {
    uint32_t b[4];
    b_fragments_nk<DK>(b, b1, np, kk);
    mma_pair(s[0], s[1], a1[kk], b);
    b_fragments_nk<DK>(b, b2, np, kk);
    mma_pair(dp[0], dp[1], a2[kk], b);
  }
}

// dQ of one (example, head, 64-query tile), a warp per 16 query rows; also D = rowsum(dC * C) into stats[.., 2]
// for the dkv kernel. Per key tile (K~ and V~ made as the forward makes them): S = Q K~^T, P = exp(S + bias - m) / l,
// dP' = dC V~^T, dS = P (drop dP' - D), dQ += dS K~.
template <int DK, int kMinBlocks = 1>
__global__ void __launch_bounds__(kThreads, kMinBlocksBound<kMinBlocks>) fused_attention_dq_kernel(AttentionBackwardArgs a) {
  wait_for_previous_kernel();
  using S = BackwardSmem<DK>;
  extern __shared__ __align__(128) unsigned char smem[];
  __nv_bfloat16* Qs = reinterpret_cast<__nv_bfloat16*>(smem);
  __nv_bfloat16* dCs = Qs + S::kStage;
  __nv_bfloat16* Ks = dCs + S::kStage;  // two stages
  __nv_bfloat16* Vs = Ks + 2 * S::kStage;  // two stages
  float* rows = reinterpret_cast<float*>(smem + 6 * S::kTileBytes);  // [64][3]: m log2(e), 1 / l, D
  const BackwardHead hd = BackwardHead::of<DK>(a);
  const DropoutSite dropout = with_seed(a.dropout);
  const int q0 = blockIdx.x * kTile, len = a.len, inner = a.inner, n_keys = hd.n_keys;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  __nv_bfloat16* dq_rows = a.dq + (static_cast<int64_t>(hd.b) * len + q0) * a.dq_ld + static_cast<int64_t>(hd.h) * DK;
  if (q0 >= n_keys) {
    // Padding queries: their output gradient dC is exactly zero (nothing reads a padded position: it is
    // masked as a key everywhere), so dS and dQ are too; the dkv kernel skips these tiles.
    for (int v = threadIdx.x; v < kTile * DK; v += kThreads)
      if (q0 + v / DK < len) dq_rows[static_cast<int64_t>(v / DK) * a.dq_ld + v % DK] = __float2bfloat16_rn(0.f);
    return;
  }
  KeyValueStages<DK> kv(Ks, Vs, hd.base + inner, hd.base + 2 * inner, hd.ld, n_keys, hd.k_scale, hd.v_scale);
  kv.start();
  load_tile<DK>(hd.base, hd.ld, q0, len, nullptr, Qs, S::kLd);
  load_tile<DK>(a.dctx + hd.head_col, inner, q0, len, nullptr, dCs, S::kLd);
  // D_i = dC_i . C_i (a warp per row), with the forward's m and l of the row
  for (int r = warp; r < kTile; r += kWarps) {
    const int i = q0 + r;
    float d = 0.f;
    if (i < len) {
      const __nv_bfloat16* dcrow = a.dctx + hd.head_col + static_cast<int64_t>(i) * inner;
      const __nv_bfloat16* crow = a.ctx + hd.head_col + static_cast<int64_t>(i) * inner;
      for (int c = lane; c < DK; c += 32) d += __bfloat162float(dcrow[c]) * __bfloat162float(crow[c]);
    }
    d = warp_sum(d);
    if (lane == 0) {
      float* st = hd.stats_row(a, i);
      const float l = i < len ? st[1] : 0.f;
      rows[r * 3 + 0] = i < len ? st[0] * kLog2e : 0.f;
      rows[r * 3 + 1] = l > 0.f ? 1.f / l : 0.f;
      rows[r * 3 + 2] = d;
      if (i < len) st[2] = d;
    }
  }
  __syncthreads();

  const int wr = warp * 16;
  uint32_t qf[DK / 16][4], dcf[DK / 16][4];  // A fragments of this warp's rows of Q and dC
#pragma unroll
  for (int kk = 0; kk < DK / 16; ++kk) {
    a_fragment<DK>(qf[kk], Qs, wr, kk);
    a_fragment<DK>(dcf[kk], dCs, wr, kk);
  }
  int row[2];
  float m_log2[2], inv_l[2], D[2];
  const float* brow[2];
#pragma unroll
  for (int u = 0; u < 2; ++u) {
    const int r = wr + g + 8 * u;
    row[u] = q0 + r;
    m_log2[u] = rows[r * 3 + 0];
    inv_l[u] = rows[r * 3 + 1];
    D[u] = rows[r * 3 + 2];
    brow[u] = a.bias_table + static_cast<int64_t>(hd.h) * (2 * len - 1) + (len - 1 - min(row[u], len - 1));
  }
  float acc[DK / 8][4];  // dQ of this warp's rows
#pragma unroll
  for (int dt = 0; dt < DK / 8; ++dt) acc[dt][0] = acc[dt][1] = acc[dt][2] = acc[dt][3] = 0.f;

  for (int it = 0; it < kv.n_tiles; ++it) {
    const int k0 = it * kTile;
    kv.ready(it);
    const __nv_bfloat16* Kt = kv.k_tile(it);
    const __nv_bfloat16* Vt = kv.v_tile(it);
    uint32_t keep[2][2] = {{~0u, ~0u}, {~0u, ~0u}};  // [row][word of this tile]
    if (dropout.rate > 0.f) {
#pragma unroll
      for (int u = 0; u < 2; ++u)
        if (row[u] < len) keep[u][0] = hd.keep_word(a, row[u], k0 / 32), keep[u][1] = hd.keep_word(a, row[u], k0 / 32 + 1);
    }
#pragma unroll
    for (int np = 0; np < kTile / 16; ++np) {  // keys k0 + 16 np .. + 15: two 8-key blocks
      float s[2][4], dp[2][4];
      score_products<DK>(s, dp, qf, Kt, dcf, Vt, np);  // S = Q K~^T, dP' = dC V~^T
      float ds[2][4];
#pragma unroll
      for (int half = 0; half < 2; ++half)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int u = e >> 1, jj = 16 * np + 8 * half + 2 * t + (e & 1), j = k0 + jj;
          float d = 0.f;
          if (j < n_keys && row[u] < len) {
            const float p = ex2_approx(fmaf(s[half][e] + brow[u][j], kLog2e, -m_log2[u])) * inv_l[u];
            d = p * (keep_scale_of(dropout, (keep[u][jj >> 5] >> (jj & 31)) & 1u) * dp[half][e] - D[u]);
          }
          ds[half][e] = d;
        }
      // dS of keys 16 np .. + 15 as an A fragment; B[k = key][n = d] = K~[key][d]
      uint32_t dsf[4];
      pack_a_fragment(ds, dsf);
      accumulate_product<DK>(acc, dsf, Kt, np);
    }
  }
#pragma unroll
  for (int u = 0; u < 2; ++u) {
    if (row[u] >= len) continue;
    __nv_bfloat16* out = dq_rows + static_cast<int64_t>(wr + g + 8 * u) * a.dq_ld + 2 * t;
#pragma unroll
    for (int dt = 0; dt < DK / 8; ++dt)
      *as_vector<uint32_t>(out + dt * 8) = pack_bf16x2(acc[dt][2 * u], acc[dt][2 * u + 1]);
  }
}

// dK~ and dV~ (fp32, the gradients of the scaled keys and values K~ = K diag l_k, V~ = V diag l_v) of one
// (example, head, 64-key tile), a warp per 16 key rows. Per query tile (those past the example's length are
// padding, whose dC is exactly zero: skipped): S^T = K~ Q^T, P^T, dP'^T = V~ dC^T, dS^T = P^T (drop dP'^T - D),
// dV~ += P'^T dC, dK~ += dS^T Q.
template <int DK, int kMinBlocks = 1>
__global__ void __launch_bounds__(kThreads, kMinBlocksBound<kMinBlocks>) fused_attention_dkv_kernel(AttentionBackwardArgs a) {
  wait_for_previous_kernel();
  using S = BackwardSmem<DK>;
  extern __shared__ __align__(128) unsigned char smem[];
  __nv_bfloat16* Ks = reinterpret_cast<__nv_bfloat16*>(smem);
  __nv_bfloat16* Vs = Ks + S::kStage;
  __nv_bfloat16* Qs = Vs + S::kStage;       // two stages
  __nv_bfloat16* dCs = Qs + 2 * S::kStage;  // two stages
  float* rows = reinterpret_cast<float*>(smem + 6 * S::kTileBytes);  // [64][3]: m log2(e), 1 / l, D
  uint32_t* keep_s = as_vector<uint32_t>(smem + 6 * S::kTileBytes + S::kRows);  // [64 queries][2 words]
  const BackwardHead hd = BackwardHead::of<DK>(a);
  const DropoutSite dropout = with_seed(a.dropout);
  const int k0 = blockIdx.x * kTile, len = a.len, inner = a.inner, n_keys = hd.n_keys;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int wr = warp * 16;  // this warp's first key row in the tile

  float dk[DK / 8][4], dv[DK / 8][4];  // this warp's 16 key rows of dK~ and dV~
#pragma unroll
  for (int dt = 0; dt < DK / 8; ++dt)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[dt][e] = dv[dt][e] = 0.f;
  if (k0 < n_keys) {  // keys past the example's length get no gradient (zero probability)
    const int n_tiles = (n_keys + kTile - 1) / kTile;
    copy_tile_async<DK>(hd.base, hd.ld, 0, len, Qs);
    copy_tile_async<DK>(a.dctx + hd.head_col, inner, 0, len, dCs);
    cp_async_commit();
    load_tile<DK>(hd.base + inner, hd.ld, k0, len, hd.k_scale, Ks, S::kLd);
    load_tile<DK>(hd.base + 2 * inner, hd.ld, k0, len, hd.v_scale, Vs, S::kLd);
    __syncthreads();
    uint32_t kf[DK / 16][4], vf[DK / 16][4];  // A fragments of this warp's key rows of K~ and V~
#pragma unroll
    for (int kk = 0; kk < DK / 16; ++kk) {
      a_fragment<DK>(kf[kk], Ks, wr, kk);
      a_fragment<DK>(vf[kk], Vs, wr, kk);
    }
    int key[2];
#pragma unroll
    for (int u = 0; u < 2; ++u) key[u] = k0 + wr + g + 8 * u;
    const int word = wr / 32;  // the keep word of the block's 64 keys that holds this warp's 16

    for (int it = 0; it < n_tiles; ++it) {
      const int q0 = it * kTile;
      cp_async_wait<0>();
      __syncthreads();  // tile it has landed for everyone; tile it - 1's stage, rows and keep words are free
      if (it + 1 < n_tiles) {
        const int next = ((it + 1) & 1) * S::kStage;
        copy_tile_async<DK>(hd.base, hd.ld, q0 + kTile, len, Qs + next);
        copy_tile_async<DK>(a.dctx + hd.head_col, inner, q0 + kTile, len, dCs + next);
        cp_async_commit();
      }
      const __nv_bfloat16* Qt = Qs + (it & 1) * S::kStage;
      const __nv_bfloat16* dCt = dCs + (it & 1) * S::kStage;
      for (int r = threadIdx.x; r < kTile; r += kThreads) {
        const int i = q0 + r;
        const float* st = hd.stats_row(a, i);
        const float l = i < len ? st[1] : 0.f;
        rows[r * 3 + 0] = i < len ? st[0] * kLog2e : 0.f;
        rows[r * 3 + 1] = l > 0.f ? 1.f / l : 0.f;
        rows[r * 3 + 2] = i < len ? st[2] : 0.f;
      }
      if (dropout.rate > 0.f)
        for (int v = threadIdx.x; v < 2 * kTile; v += kThreads) {
          const int i = q0 + v / 2;
          keep_s[v] = i < len ? hd.keep_word(a, i, k0 / 32 + v % 2) : 0u;
        }
      __syncthreads();

#pragma unroll
      for (int np = 0; np < kTile / 16; ++np) {  // queries q0 + 16 np .. + 15: two 8-query blocks
        float s[2][4], dp[2][4];
        score_products<DK>(s, dp, kf, Qt, vf, dCt, np);  // S^T = K~ Q^T, dP'^T = V~ dC^T
        float pd[2][4], ds[2][4];
#pragma unroll
        for (int half = 0; half < 2; ++half)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int u = e >> 1, c = 16 * np + 8 * half + 2 * t + (e & 1), i = q0 + c, j = key[u];
            float p_kept = 0.f, d = 0.f;
            if (j < n_keys && i < len) {
              const float bias = a.bias_table[static_cast<int64_t>(hd.h) * (2 * len - 1) + (j - i + len - 1)];
              const float p = ex2_approx(fmaf(s[half][e] + bias, kLog2e, -rows[c * 3 + 0])) * rows[c * 3 + 1];
              const float drop = keep_scale_of(dropout, (keep_s[2 * c + word] >> (j & 31)) & 1u);
              p_kept = p * drop;
              d = p * (drop * dp[half][e] - rows[c * 3 + 2]);
            }
            pd[half][e] = p_kept;
            ds[half][e] = d;
          }
        // P'^T and dS^T of queries 16 np .. + 15 as A fragments; B[k = query][n = d] = dC[query][d], Q[query][d]
        uint32_t pdf[4], dsf[4];
        pack_a_fragment(pd, pdf);
        pack_a_fragment(ds, dsf);
        accumulate_product<DK>(dv, pdf, dCt, np);
        accumulate_product<DK>(dk, dsf, Qt, np);
      }
    }
  }
  // dK = l_k dK~ and dV = l_v dV~ (as T, rows k0 + wr + g (+ 8) of the q|k|v gradient; zeros for keys past the
  // example's length), and the (IA)3 contributions K dK~, V dV~ (0 without an adapter) summed over the warp's 16
  // rows, which are one chunk of the sums: over g by shuffles, in a fixed order.
  const int64_t row0 = k0 + wr + g;  // and row0 + 8
  const int64_t sum_row = static_cast<int64_t>(hd.b) * a.sums.chunks_per_example() + (k0 + wr) / kChunkRows;
#pragma unroll
  for (int dt = 0; dt < DK / 8; ++dt) {
    const int col = dt * 8 + 2 * t;
    const float2 lk = hd.k_scale ? make_float2(hd.k_scale[col], hd.k_scale[col + 1]) : make_float2(1.f, 1.f);
    const float2 lv = hd.v_scale ? make_float2(hd.v_scale[col], hd.v_scale[col + 1]) : make_float2(1.f, 1.f);
    float c[4] = {0.f, 0.f, 0.f, 0.f};  // K dK~ (two columns), V dV~ (two columns)
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      const int64_t row = row0 + 8 * u;
      if (row >= len) continue;
      const __nv_bfloat16* k_row = hd.base + row * hd.ld + inner + col;
      __nv_bfloat16* dk_row = a.dq + (static_cast<int64_t>(hd.b) * len + row) * a.dq_ld + inner + hd.h * DK + col;
      *as_vector<__nv_bfloat162>(dk_row) = __floats2bfloat162_rn(dk[dt][2 * u] * lk.x, dk[dt][2 * u + 1] * lk.y);
      *as_vector<__nv_bfloat162>(dk_row + inner) =
          __floats2bfloat162_rn(dv[dt][2 * u] * lv.x, dv[dt][2 * u + 1] * lv.y);
      if (hd.k_scale) {  // (k_scale and v_scale: both or neither, the example's adapter)
        const float2 kk = __bfloat1622float2(*as_vector<__nv_bfloat162>(k_row));
        const float2 vv = __bfloat1622float2(*as_vector<__nv_bfloat162>(k_row + inner));
        c[0] += kk.x * dk[dt][2 * u];
        c[1] += kk.y * dk[dt][2 * u + 1];
        c[2] += vv.x * dv[dt][2 * u];
        c[3] += vv.y * dv[dt][2 * u + 1];
      }
    }
#pragma unroll
    for (int e = 0; e < 4; ++e)
#pragma unroll
      for (int o = 4; o < 32; o <<= 1) c[e] += __shfl_xor_sync(kFullMask, c[e], o);  // over g = lane >> 2
    if (g == 0 && k0 + wr < len) {
      *as_vector<float2>(a.sums_k + sum_row * inner + hd.h * DK + col) = make_float2(c[0], c[1]);
      *as_vector<float2>(a.sums_v + sum_row * inner + hd.h * DK + col) = make_float2(c[2], c[3]);
    }
  }
}

// The shared memory of the forward kernel in use (attention_kernel_wmma).
template <int DK>
size_t forward_smem_bytes() {
  return attention_kernel_wmma() ? FusedSmem<DK>::kBytes : MmaSmem<DK>::kBytes;
}

// cuda.attentionOccupancy (attention_occupancy(stream)): the mma.sync kernels compiled for one more block per SM than
// their registers allow by default, at d_kv 64 (T0-3B's): the forward for 4 blocks of 128 threads (<= 128 registers;
// 168 by default: 3 blocks), the dq and dkv kernels for 3 (<= 168; 190 and 172: 2 blocks). ptxas (CUDA 13.0, sm_90)
// then spills 104, 88 and 40 bytes a thread. These kernels are latency-bound at 12.5-18.75% occupancy (H200, session
// 19's ncu: 5.5-8.3 cycles between a warp's instructions), so more warps may pay for the spills: what rank-bench's
// -OCCUPANCY rows measure. Other d_kv keep their one instance (d_kv 128 would spill kilobytes).
template <int DK>
struct OccupancyBlocks {
  static constexpr int kForward = DK == 64 ? 4 : 1;
  static constexpr int kBackward = DK == 64 ? 3 : 1;
};

template <int DK>
void launch_fused(const __nv_bfloat16* qkv, int inner, int batch, int heads, int len, const float* bias_table,
                  const int32_t* lengths, const AdapterIndex& index, int64_t k_offset, int64_t v_offset,
                  const DropoutSite& dropout, __nv_bfloat16* out, float* stats, const KeepBits& keep,
                  cudaStream_t stream) {
  const dim3 grid((len + kTile - 1) / kTile, heads, batch);
  const size_t smem = forward_smem_bytes<DK>();
  if (attention_kernel_wmma()) {
    opt_in_shared_memory(reinterpret_cast<const void*>(fused_encoder_attention_kernel<DK>), smem);
    TFEW_LAUNCH(grid, kThreads, smem, stream, fused_encoder_attention_kernel<DK>)(
        qkv, inner, len, bias_table, lengths, index, k_offset, v_offset, dropout, out, stats, keep);
    TFEW_CUDA_CHECK_LAUNCH("fused_encoder_attention_kernel");
    return;
  }
  constexpr int kOccupancy = OccupancyBlocks<DK>::kForward;
  if (kOccupancy > 1 && attention_occupancy(stream)) {
    opt_in_shared_memory(reinterpret_cast<const void*>(fused_encoder_attention_mma_kernel<DK, kOccupancy>), smem);
    TFEW_LAUNCH(grid, kThreads, smem, stream, fused_encoder_attention_mma_kernel<DK, kOccupancy>)(
        qkv, inner, len, bias_table, lengths, index, k_offset, v_offset, dropout, out, stats, keep);
  } else {
    opt_in_shared_memory(reinterpret_cast<const void*>(fused_encoder_attention_mma_kernel<DK>), smem);
    TFEW_LAUNCH(grid, kThreads, smem, stream, fused_encoder_attention_mma_kernel<DK>)(
        qkv, inner, len, bias_table, lengths, index, k_offset, v_offset, dropout, out, stats, keep);
  }
  TFEW_CUDA_CHECK_LAUNCH("fused_encoder_attention_mma_kernel");
}

template <int DK, int kMinBlocks>
void launch_fused_backward_instances(const AttentionBackwardArgs& args, int batch, int heads, cudaStream_t stream) {
  using S = BackwardSmem<DK>;
  opt_in_shared_memory(reinterpret_cast<const void*>(fused_attention_dq_kernel<DK, kMinBlocks>), S::kDqBytes);
  opt_in_shared_memory(reinterpret_cast<const void*>(fused_attention_dkv_kernel<DK, kMinBlocks>), S::kDkvBytes);
  const dim3 grid((args.len + kTile - 1) / kTile, heads, batch);
  TFEW_LAUNCH(grid, kThreads, S::kDqBytes, stream, fused_attention_dq_kernel<DK, kMinBlocks>)(args);
  TFEW_CUDA_CHECK_LAUNCH("fused_attention_dq_kernel");
  TFEW_LAUNCH(grid, kThreads, S::kDkvBytes, stream, fused_attention_dkv_kernel<DK, kMinBlocks>)(args);
  TFEW_CUDA_CHECK_LAUNCH("fused_attention_dkv_kernel");
}

template <int DK>
void launch_fused_backward(const AttentionBackwardArgs& args, int batch, int heads, cudaStream_t stream) {
  constexpr int kOccupancy = OccupancyBlocks<DK>::kBackward;
  if (kOccupancy > 1 && attention_occupancy(stream))
    launch_fused_backward_instances<DK, kOccupancy>(args, batch, heads, stream);
  else
    launch_fused_backward_instances<DK, 1>(args, batch, heads, stream);
}

}  // namespace

// TFEW_CUDA_ATTENTION_KERNEL=wmma selects the first fused forward (for comparisons); read once per process. A value
// that names neither kernel is an InvalidArgument error (thrown again at every call: a static whose initialiser
// throws stays uninitialised), not silently the default.
bool attention_kernel_wmma() {
  static const bool wmma = [] {
    const char* v = std::getenv("TFEW_CUDA_ATTENTION_KERNEL");
    const std::string kernel = v ? v : "";
    if (!kernel.empty() && kernel != "mma" && kernel != "wmma")
      fail(ErrorCode::InvalidArgument, "TFEW_CUDA_ATTENTION_KERNEL must be 'mma' (the default) or 'wmma', got '" + kernel + "'");
    return kernel == "wmma";
  }();
  return wmma;
}

// The opt-in shared memory per block differs by GPU: 163 KiB on A100, 227 KiB on H100, but 99 KiB on compute
// capability 8.6 / 8.9 cards, where the WMMA forward's d_kv 128 (110 KiB) does not fit (the mma.sync forward
// needs 85 KiB, its backward's kernels 103 KiB): the cuBLAS path is used where they do not fit.
bool fused_encoder_attention_supported(int d_kv) {
  size_t needed = 0;
  switch (d_kv) {
    case 16: needed = forward_smem_bytes<16>(); break;
    case 32: needed = forward_smem_bytes<32>(); break;
    case 64: needed = forward_smem_bytes<64>(); break;
    case 128: needed = forward_smem_bytes<128>(); break;
    default: return false;
  }
  return needed <= shared_memory_optin_limit();
}

bool fused_encoder_attention_backward_supported(int d_kv) {
  size_t needed = 0;
  switch (d_kv) {
    case 16: needed = BackwardSmem<16>::kDkvBytes; break;
    case 32: needed = BackwardSmem<32>::kDkvBytes; break;
    case 64: needed = BackwardSmem<64>::kDkvBytes; break;
    case 128: needed = BackwardSmem<128>::kDkvBytes; break;
    default: return false;
  }
  return fused_encoder_attention_supported(d_kv) && needed <= shared_memory_optin_limit();
}

// The kernels copy q|k|v (and dC, C) 16 bytes at a time (cp.async) and store pairs: a misaligned view would fault on a
// GPU only (x86, and so the emulator, tolerates it). Checked here, a typed error instead of a lost context.
static void check_fused_alignment(const char* what, int inner, int ld,
                                  std::initializer_list<const __nv_bfloat16*> views) {
  bool ok = inner % 8 == 0 && ld % 8 == 0;
  for (const __nv_bfloat16* p : views) ok = ok && p != nullptr && aligned_x4<8>(p);
  if (!ok)
    fail(ErrorCode::Internal,
         std::string(what) + ": a view of q|k|v or of the context is missing or not 16-byte aligned");
}

void fused_encoder_attention(const __nv_bfloat16* qkv, int inner, int d_kv, int batch, int heads, int len,
                             const float* bias_table, const int32_t* lengths, const AdapterIndex& index,
                             int64_t k_offset, int64_t v_offset, const DropoutSite& dropout, __nv_bfloat16* out,
                             cudaStream_t stream, float* stats, const KeepBits& keep) {
  if (batch <= 0 || len <= 0) return;
  check_fused_alignment("fused encoder attention", inner, 3 * inner, {qkv, out});
  switch (d_kv) {
#define TFEW_FUSED_CASE(DK)                                                                                       \
  case DK:                                                                                                        \
    launch_fused<DK>(qkv, inner, batch, heads, len, bias_table, lengths, index, k_offset, v_offset, dropout, out, \
                     stats, keep, stream);                                                                        \
    break;
    TFEW_FUSED_CASE(16)
    TFEW_FUSED_CASE(32)
    TFEW_FUSED_CASE(64)
    TFEW_FUSED_CASE(128)
#undef TFEW_FUSED_CASE
    default: fail(ErrorCode::Internal, "fused encoder attention: unsupported d_kv " + std::to_string(d_kv));
  }
}

void fused_encoder_attention_backward(const __nv_bfloat16* qkv, int inner, int d_kv, int batch, int heads, int len,
                                      const float* bias_table, const int32_t* lengths, const AdapterIndex& index,
                                      int64_t k_offset, int64_t v_offset, const DropoutSite& dropout,
                                      const uint32_t* keep_bits, const __nv_bfloat16* dctx,
                                      const __nv_bfloat16* ctx, float* stats, __nv_bfloat16* dqkv, int dqkv_ld,
                                      const Ia3Sums& sums, float* sums_k, float* sums_v, cudaStream_t stream) {
  if (batch <= 0 || len <= 0) return;
  if (dropout.rate > 0.f && keep_bits == nullptr)
    fail(ErrorCode::Internal, "fused encoder attention backward: dropout without the forward's keep bits");
  if (sums.chunk != kChunkRows || sums.tokens_per_example != len)
    fail(ErrorCode::Internal, "fused encoder attention backward: (IA)3 sums over " + std::to_string(sums.chunk) +
                                  " tokens, the kernel sums " + std::to_string(kChunkRows));
  check_fused_alignment("fused encoder attention backward", inner, dqkv_ld, {qkv, dctx, ctx, dqkv});
  const AttentionBackwardArgs args{qkv,       inner, len,   bias_table, lengths, index, k_offset, v_offset,
                                   dropout,   keep_bits, dctx, ctx,    stats,   dqkv,  dqkv_ld,  sums,
                                   sums_k,    sums_v};
  switch (d_kv) {
#define TFEW_FUSED_CASE(DK)                                  \
  case DK:                                                   \
    launch_fused_backward<DK>(args, batch, heads, stream);   \
    break;
    TFEW_FUSED_CASE(16)
    TFEW_FUSED_CASE(32)
    TFEW_FUSED_CASE(64)
    TFEW_FUSED_CASE(128)
#undef TFEW_FUSED_CASE
    default: fail(ErrorCode::Internal, "fused encoder attention backward: unsupported d_kv " + std::to_string(d_kv));
  }
}

}  // namespace kernels
}  // namespace tfew
