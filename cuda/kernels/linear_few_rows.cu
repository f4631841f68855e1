// The inference decoder's linear layers when a call has few decoder rows (at most kFewRowsMax: one example's
// choices; RANK-3B-B1 has 16 rows), each with the pass beside it folded in:
//   few_rows_norm_linear      y = rmsnorm(x) W^T (+ l_k)       self-attention q|k|v, cross-attention q
//   few_rows_norm_ffn_in      act = f(rmsnorm(x) wi^T) * l_ff   the FFN's wi with gated-gelu or relu
//   few_rows_linear_residual  x += (a (* l_v)) W^T              o, cross-attention o, wo
// At so few rows a GEMM only streams its weights (a few microseconds each at T0-3B width) and the norm, activation
// and (IA)3 passes around cuBLAS's GEMMs are launches of their own: 6 of the 18 launches of a decoder layer at
// RANK-3B-B1 (folded cross-attention), each a few microseconds of a latency-bound call.
//
// A column block is kNTiles tiles of 8 output columns and every row (kMTiles tiles of 16). Blocks are persistent
// (the grid is what the GPU runs at once) and loop over column blocks; a block's 8 warps split K in
// interleaved 32-wide chunks and feed mma.sync m16n8k16 (bf16 in, fp32 accumulation) with W read straight from
// global memory, 16 bytes a lane: lane 4 g + t reads W[n0 + g][32 c + 8 t, + 8) and the A rows g and g + 8 at the
// same columns. A dot product does not care in which order its terms come, so the chunk's two k16 steps s = 0, 1
// take the lane's 8 values as fragment k = {2t, 2t+1} <- 8t + 4s + {0, 1} (b0; a0, a1) and k = {2t+8, 2t+9} <-
// 8t + 4s + {2, 3} (b1; a2, a3): one permutation for A and B, every k once. The warps' partial sums meet in shared
// memory and are added in warp order (deterministic); then the epilogue writes.
// The normalised input (norm_*) and the l_v-scaled context are staged in shared memory by the block (one read of
// the input per block, whatever the number of column blocks it takes); a plain input is read from global memory (L2) as fragments. The norm is rmsnorm_row_warp and
// the epilogues repeat the unfused kernels' arithmetic (the GEMM's bf16 output, then the activation or the (IA)3
// scale in fp32), so results differ from the cuBLAS path only by the order of the dot products' sums.
#include <algorithm>
#include <map>
#include <mutex>
#include <tuple>

#include "kernels/activation.cuh"
#include "kernels/device_common.cuh"
#include "kernels/rmsnorm_row.cuh"

namespace tfew {
namespace kernels {

namespace {

using bf16 = __nv_bfloat16;
constexpr int kWarps = 8;
// The staged input may take this much shared memory (T0-3B: 32 rows x 2,048 columns, 130 KiB with the padding).
constexpr size_t kMaxStagedBytes = 160 * 1024;

enum class FewIn { Plain, Scaled, Norm };
enum class FewOut { Store, Residual, Gated, Relu };

struct FewRowsArgs {
  const bf16* a = nullptr;       // Plain / Scaled: the input [rows, lda]
  const float* x = nullptr;      // Norm: the fp32 residual stream [rows, lda]
  int lda = 0;
  const float* norm_weight = nullptr;
  float eps = 0.f;
  const bf16* w = nullptr;       // [N, K], row stride ldw
  int ldw = 0;
  int rows = 0, k = 0;
  int second_half = 0;           // Gated: the row of W where wi_1's rows begin (d_ff)
  AdapterIndex index;            // the (IA)3 vectors (scale_offset < 0 or !index.active(): none)
  int64_t scale_offset = -1;     // Scaled: l_v of the input's columns; Store: l_k of the output's; Gated / Relu: l_ff
  void* out = nullptr;           // Store / Gated / Relu: bf16; Residual: the fp32 stream to add into
  int ldo = 0;
  int n_out = 0;                 // output columns (Gated: d_ff)
};

// Staged rows are padded by 32 elements (64 bytes): the 8 rows a warp's fragment load touches then alternate between
// the two halves of the 128-byte bank line, 4 wavefronts for 512 bytes (unpadded rows of 4 KiB would all share one).
__host__ __device__ constexpr int staged_stride(int k) { return k + 32; }

// 16 bytes of W, read once: through the read-only path without a place in L1 (which the staged input and the
// partial sums use; W is read by one block only).
__device__ __forceinline__ uint4 load_streaming(const bf16* p) {
#if defined(TFEW_CUDA_EMULATION) || !defined(__CUDA_ARCH__)
  return __ldg(as_vector<uint4>(p));
#else
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
#endif
}

__device__ __forceinline__ const float* adapter_vector(const AdapterIndex& ix, int row, int64_t offset) {
  if (offset < 0 || ix.adapters == nullptr || ix.adapter_of_example == nullptr) return nullptr;  // (as active())
  const int a = adapter_of_token(ix, row);
  return a >= 0 ? ix.adapters + a * ix.adapter_stride + offset : nullptr;
}

template <int kMTiles, int kNTiles, FewIn kIn, FewOut kOut, int kNormChunks>
__global__ void __launch_bounds__(32 * kWarps) few_rows_linear_kernel(FewRowsArgs p) {
  extern __shared__ __align__(16) unsigned char few_smem[];
  constexpr int kRows = 16 * kMTiles;
  constexpr bool kStaged = kIn != FewIn::Plain;
  // Gated: tiles [0, kNTiles/2) are wi_0's columns, the rest wi_1's at the same columns (the epilogue pairs them)
  constexpr int kOutTiles = kOut == FewOut::Gated ? kNTiles / 2 : kNTiles;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int lds = staged_stride(p.k);
  bf16* staged = reinterpret_cast<bf16*>(few_smem);
  // the warps' partial sums, [warp][m][j][e][lane], after the staged input
  float* partial = reinterpret_cast<float*>(few_smem + (kStaged ? static_cast<size_t>(kRows) * lds * sizeof(bf16) : 0));
  const int n_blocks = p.n_out / (8 * kOutTiles);

  // Blocks are persistent (the grid fits the GPU at once): each stages its input once and takes column blocks
  // blockIdx.x, + gridDim.x, ... This lane's W row in each tile of column block `col_block`:
  const bf16* w_row[kNTiles];
  auto point_w = [&](int col_block) {
    const int col0 = col_block * 8 * kOutTiles;
#pragma unroll
    for (int j = 0; j < kNTiles; ++j) {
      const int n = kOut == FewOut::Gated && j >= kOutTiles ? p.second_half + col0 + 8 * (j - kOutTiles) + g
                                                             : col0 + 8 * j + g;
      w_row[j] = p.w + static_cast<int64_t>(n) * p.ldw + 8 * t;
    }
  };
  // W is the DRAM stream: a column block's first chunks are requested before the work that precedes them (the
  // staging of the input, the previous block's reduction), and each iteration requests the next kUnroll chunks
  // before multiplying the current ones.
  constexpr int kUnroll = kNTiles >= 4 ? 2 : 4;
  const int n_chunks = p.k / 32;
  auto load_w = [&](uint4 (&wq)[kUnroll][kNTiles], int c0) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = c0 + kWarps * u;
#pragma unroll
      for (int j = 0; j < kNTiles; ++j)
        wq[u][j] = c < n_chunks ? load_streaming(w_row[j] + 32 * c) : make_uint4(0, 0, 0, 0);
    }
  };
  uint4 wq[kUnroll][kNTiles];
  int col_block = blockIdx.x;
  point_w(col_block);
  load_w(wq, warp);
  // The weights are constant: their first chunks are on their way before the wait (kernels/launch.cuh), while the
  // kernel before this one finishes, when the launch overlaps it.
  wait_for_previous_kernel();

  // ---- the input: staged (normalised, or scaled by l_v) or read in place. The norm's rows: each warp's two or
  // four at once would need their sums in registers together; one after the other, once per block.
  if constexpr (kIn == FewIn::Norm) {
    for (int r = warp; r < kRows; r += kWarps) {
      if (r < p.rows) {
        rmsnorm_row_warp<kNormChunks>(p.x + static_cast<int64_t>(r) * p.lda, p.norm_weight, p.k, p.eps, 1.f,
                                      staged + r * lds);
      } else {
        for (int c = 8 * lane; c < p.k; c += 256) *as_vector<uint4>(staged + r * lds + c) = make_uint4(0, 0, 0, 0);
      }
    }
  } else if constexpr (kIn == FewIn::Scaled) {
    for (int r = warp; r < kRows; r += kWarps) {
      const float* l = r < p.rows ? adapter_vector(p.index, r, p.scale_offset) : nullptr;
      for (int c = 8 * lane; c < p.k; c += 256) {
        float v[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
        if (r < p.rows) load_x8(p.a + static_cast<int64_t>(r) * p.lda + c, v);
        if (l)  // as ia3_scale_columns: the bf16 context times l_v, rounded once
          for (int u = 0; u < 8; ++u) v[u] *= l[c + u];
        store_x8(staged + r * lds + c, v);
      }
    }
  }
  if constexpr (kStaged) __syncthreads();
  const bf16* a_base = kStaged ? staged : p.a;
  const int64_t a_ld = kStaged ? lds : p.lda;

  // this lane's A rows (g, g + 8) in each row tile
  const bf16* a_row[kMTiles][2];
  bool a_live[kMTiles][2];
#pragma unroll
  for (int m = 0; m < kMTiles; ++m)
    for (int h = 0; h < 2; ++h) {
      const int r = 16 * m + g + 8 * h;
      a_live[m][h] = kStaged || r < p.rows;  // (staged rows past p.rows are zeros)
      a_row[m][h] = a_base + (a_live[m][h] ? r : 0) * a_ld + 8 * t;
    }

  while (true) {
    float acc[kMTiles][kNTiles][4];
#pragma unroll
    for (int m = 0; m < kMTiles; ++m)
#pragma unroll
      for (int j = 0; j < kNTiles; ++j)
        for (int e = 0; e < 4; ++e) acc[m][j][e] = 0.f;

    // ---- the main loop: kUnroll chunks (128 bytes of W a lane) in flight while the previous ones are multiplied
    for (int c0 = warp; c0 < n_chunks; c0 += kWarps * kUnroll) {
      uint4 wn[kUnroll][kNTiles], aq[kUnroll][kMTiles][2];
      load_w(wn, c0 + kWarps * kUnroll);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int c = c0 + kWarps * u;
#pragma unroll
        for (int m = 0; m < kMTiles; ++m)
          for (int h = 0; h < 2; ++h)
            aq[u][m][h] = a_live[m][h] && c < n_chunks ? *as_vector<uint4>(a_row[m][h] + 32 * c)
                                                       : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (c0 + kWarps * u >= n_chunks) continue;
#pragma unroll
        for (int s = 0; s < 2; ++s) {
#pragma unroll
          for (int m = 0; m < kMTiles; ++m) {
            const uint32_t* lo = reinterpret_cast<const uint32_t*>(&aq[u][m][0]);  // row g
            const uint32_t* hi = reinterpret_cast<const uint32_t*>(&aq[u][m][1]);  // row g + 8
            const uint32_t af[4] = {lo[2 * s], hi[2 * s], lo[2 * s + 1], hi[2 * s + 1]};
#pragma unroll
            for (int j = 0; j < kNTiles; ++j) {
              const uint32_t* wv = reinterpret_cast<const uint32_t*>(&wq[u][j]);
              const uint32_t bf[2] = {wv[2 * s], wv[2 * s + 1]};
              mma_bf16_16816(acc[m][j], af, bf);
            }
          }
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
#pragma unroll
        for (int j = 0; j < kNTiles; ++j) wq[u][j] = wn[u][j];
    }

    // the next column block's first chunks, in flight during this one's reduction and epilogue
    const int col0 = col_block * 8 * kOutTiles;
    const int next = col_block + gridDim.x;
    if (next < n_blocks) {
      point_w(next);
      load_w(wq, warp);
    }

    // ---- the warps' partial sums, added in warp order
#pragma unroll
    for (int m = 0; m < kMTiles; ++m)
#pragma unroll
      for (int j = 0; j < kNTiles; ++j)
        for (int e = 0; e < 4; ++e) partial[((warp * kMTiles + m) * kNTiles + j) * 128 + e * 32 + lane] = acc[m][j][e];
    __syncthreads();

    // ---- epilogue: a thread per (row tile, output tile, lane of the fragment layout)
    for (int i = threadIdx.x; i < kMTiles * kOutTiles * 32; i += 32 * kWarps) {
      const int fl = i & 31, ft = fl & 3, fg = fl >> 2, j = (i >> 5) % kOutTiles, m = (i >> 5) / kOutTiles;
      auto sum_over_warps = [&](int tile, float (&v)[4]) {
        for (int e = 0; e < 4; ++e) {
          float s = 0.f;
          for (int w = 0; w < kWarps; ++w) s += partial[((w * kMTiles + m) * kNTiles + tile) * 128 + e * 32 + fl];
          v[e] = s;
        }
      };
      float v[4];
      sum_over_warps(j, v);
      float lin[4];
      if constexpr (kOut == FewOut::Gated) sum_over_warps(j + kOutTiles, lin);
      const int col = col0 + 8 * j + 2 * ft;
      for (int h = 0; h < 2; ++h) {  // rows fg and fg + 8 of the tile: v[2h], v[2h + 1] at columns col, col + 1
        const int row = 16 * m + fg + 8 * h;
        if (row >= p.rows) continue;
        float y0 = v[2 * h], y1 = v[2 * h + 1];
        if constexpr (kOut == FewOut::Residual) {
          float* dst = static_cast<float*>(p.out) + static_cast<int64_t>(row) * p.ldo + col;
          dst[0] += y0;  // cuBLAS's beta = 1: acc + x in fp32
          dst[1] += y1;
          continue;
        } else {
          // the GEMM's bf16 output, then the pass that followed it in fp32, rounded once more
          y0 = __bfloat162float(__float2bfloat16_rn(y0));
          y1 = __bfloat162float(__float2bfloat16_rn(y1));
          if constexpr (kOut == FewOut::Gated) {
            y0 = gelu_new(y0) * __bfloat162float(__float2bfloat16_rn(lin[2 * h]));
            y1 = gelu_new(y1) * __bfloat162float(__float2bfloat16_rn(lin[2 * h + 1]));
          } else if constexpr (kOut == FewOut::Relu) {
            y0 = fmaxf(y0, 0.f);
            y1 = fmaxf(y1, 0.f);
          }
          const float* l = adapter_vector(p.index, row, p.scale_offset);
          if (l) {
            y0 *= l[col];
            y1 *= l[col + 1];
          }
          bf16* dst = static_cast<bf16*>(p.out) + static_cast<int64_t>(row) * p.ldo + col;
          dst[0] = __float2bfloat16_rn(y0);
          dst[1] = __float2bfloat16_rn(y1);
        }
      }
    }
    if (next >= n_blocks) break;
    __syncthreads();  // the partial sums are read before the next column block writes them
    col_block = next;
  }
}

// The current device's SM count (a driver query; not cached, so that the emulator's tests may change it).
int multiprocessors() {
  int device = 0, n = 0;
  TFEW_CUDA_CHECK(cudaGetDevice(&device));
  TFEW_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  return n;
}

// How many blocks of `kernel` (256 threads, smem bytes) an SM of the current device runs at once (cached).
int blocks_per_multiprocessor(const void* kernel, size_t smem) {
  static std::mutex mu;
  static std::map<std::tuple<const void*, size_t, int>, int> cache;
  int device = 0;
  TFEW_CUDA_CHECK(cudaGetDevice(&device));
  std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_tuple(kernel, smem, device);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  int n = 0;
  TFEW_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, 32 * kWarps, smem));
  return cache[key] = n;
}

// Bytes of shared memory a form needs: the staged input and the warps' partial sums.
template <int kMTiles, int kNTiles, FewIn kIn>
size_t few_rows_smem(int k) {
  const size_t staged = kIn == FewIn::Plain ? 0 : static_cast<size_t>(16 * kMTiles) * staged_stride(k) * sizeof(bf16);
  return staged + static_cast<size_t>(kWarps) * kMTiles * kNTiles * 128 * sizeof(float);
}

// The persistent grid: as many blocks as the GPU runs at once (occupancy x SMs, cached per form and device), at most
// one per column block. Returns false (nothing launched) where a block does not fit.
template <int kMTiles, int kNTiles, FewIn kIn, FewOut kOut, int kNormChunks>
bool launch_few_rows(FewRowsArgs p, int n_out, cudaStream_t stream) {
  constexpr int kOutTiles = kOut == FewOut::Gated ? kNTiles / 2 : kNTiles;
  const size_t smem = few_rows_smem<kMTiles, kNTiles, kIn>(p.k);
  if (smem > shared_memory_optin_limit()) return false;
  const void* kernel = reinterpret_cast<const void*>(few_rows_linear_kernel<kMTiles, kNTiles, kIn, kOut, kNormChunks>);
  if (smem > 48 * 1024) opt_in_shared_memory(kernel, smem);
  const int per_sm = blocks_per_multiprocessor(kernel, smem);
  if (per_sm <= 0) return false;
  p.n_out = n_out;
  const int column_blocks = n_out / (8 * kOutTiles);
  const int grid = std::min(column_blocks, per_sm * multiprocessors());
  TFEW_LAUNCH(grid, 32 * kWarps, smem, stream, few_rows_linear_kernel<kMTiles, kNTiles, kIn, kOut, kNormChunks>)(p);
  TFEW_CUDA_CHECK_LAUNCH("few_rows_linear_kernel");
  return true;
}

// launch(integral_constant<int, row tiles>) for 1 to kFewRowsMax rows.
template <typename Launch>
void with_row_tiles(int rows, Launch&& launch) {
  if (rows <= 16) launch(std::integral_constant<int, 1>());
  else launch(std::integral_constant<int, 2>());
}

// launch(integral_constant<int, d / 128>) for the widths with a norm instance (T5-small, -large, -3B / T0-3B).
template <typename Launch>
bool with_norm_width(int d, Launch&& launch) {
  switch (d) {
    case 512: launch(std::integral_constant<int, 4>()); return true;
    case 1024: launch(std::integral_constant<int, 8>()); return true;
    case 2048: launch(std::integral_constant<int, 16>()); return true;
    default: return false;
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }


// What every form needs: rows in range, K in whole chunks, 16-byte rows of W and of a staged or plain input, and
// the staged input within kMaxStagedBytes (a block's whole shared memory must also be within what the GPU lets a block
// have: launch_few_rows checks; 99 KiB on some GPUs, where 16 rows of T0-3B fit).
bool few_rows_shape_ok(int rows, int k, const bf16* w, int ldw, bool staged) {
  if (rows <= 0 || rows > kFewRowsMax || k <= 0 || k % 32 != 0 || ldw % 8 != 0 || !aligned16(w)) return false;
  const size_t bytes = static_cast<size_t>(16 * ((rows + 15) / 16)) * staged_stride(k) * sizeof(bf16);
  return !staged || bytes <= kMaxStagedBytes;
}

// The arguments of a norm form: rmsnorm(x) (k = d_model columns, rows rows) times W [., k], into out.
FewRowsArgs norm_args(const float* x, int ldx, const float* norm_weight, float eps, const bf16* w, int k, int rows,
                      const AdapterIndex& index, int64_t scale_offset, bf16* out, int ldo) {
  FewRowsArgs p;
  p.x = x;
  p.lda = ldx;
  p.norm_weight = norm_weight;
  p.eps = eps;
  p.w = w;
  p.ldw = k;
  p.rows = rows;
  p.k = k;
  p.index = index;
  p.scale_offset = scale_offset;
  p.out = out;
  p.ldo = ldo;
  return p;
}

}  // namespace

bool few_rows_norm_supported(int d_model) {
  return with_norm_width(d_model, [](auto) {});
}

bool few_rows_norm_linear(const float* x, int ldx, const float* norm_weight, float eps, const bf16* w, int n, int k,
                          int rows, bf16* out, int ldo, const AdapterIndex& index, int64_t out_scale_offset,
                          cudaStream_t stream) {
  if (!few_rows_shape_ok(rows, k, w, k, true) || n % 16 != 0 || ldx % 4 != 0 || ldo % 2 != 0 || !aligned16(x) ||
      !aligned16(norm_weight) || !aligned16(out) || !few_rows_norm_supported(k))
    return false;
  const FewRowsArgs p = norm_args(x, ldx, norm_weight, eps, w, k, rows, index, out_scale_offset, out, ldo);
  // 32 columns a block where that still gives every SM a column block (q|k|v: 6,144 columns), else 16
  const bool wide = n % 32 == 0 && n / 32 >= multiprocessors();
  bool launched = false;
  with_row_tiles(rows, [&](auto mt) {
    with_norm_width(k, [&](auto chunks) {
      constexpr int kM = decltype(mt)::value, kC = decltype(chunks)::value;
      launched = wide ? launch_few_rows<kM, 4, FewIn::Norm, FewOut::Store, kC>(p, n, stream)
                      : launch_few_rows<kM, 2, FewIn::Norm, FewOut::Store, kC>(p, n, stream);
    });
  });
  return launched;
}

bool few_rows_norm_ffn_in(const float* x, int ldx, const float* norm_weight, float eps, const bf16* wi, int d_model,
                          int d_ff, bool gated, int rows, const AdapterIndex& index, int64_t ff_offset, bf16* act,
                          cudaStream_t stream) {
  if (!few_rows_shape_ok(rows, d_model, wi, d_model, true) || d_ff % 16 != 0 || ldx % 4 != 0 || !aligned16(x) ||
      !aligned16(norm_weight) || !aligned16(act) || !few_rows_norm_supported(d_model))
    return false;
  FewRowsArgs p = norm_args(x, ldx, norm_weight, eps, wi, d_model, rows, index, ff_offset, act, d_ff);
  p.second_half = d_ff;
  bool launched = false;
  with_row_tiles(rows, [&](auto mt) {
    with_norm_width(d_model, [&](auto chunks) {
      constexpr int kM = decltype(mt)::value, kC = decltype(chunks)::value;
      // gated: 16 columns of each half a block (wi_0's and wi_1's rows of the same columns)
      launched = gated ? launch_few_rows<kM, 4, FewIn::Norm, FewOut::Gated, kC>(p, d_ff, stream)
                       : launch_few_rows<kM, 2, FewIn::Norm, FewOut::Relu, kC>(p, d_ff, stream);
    });
  });
  return launched;
}

bool few_rows_linear_residual(const bf16* a, int lda, const bf16* w, int n, int k, int rows, const AdapterIndex& index,
                              int64_t in_scale_offset, float* x, int ldx, cudaStream_t stream) {
  const bool scaled = in_scale_offset >= 0 && index.active();
  if (!few_rows_shape_ok(rows, k, w, k, scaled) || n % 16 != 0 || lda % 8 != 0 || ldx % 2 != 0 || !aligned16(a) ||
      !aligned16(x))
    return false;
  FewRowsArgs p;
  p.a = a;
  p.lda = lda;
  p.w = w;
  p.ldw = k;
  p.rows = rows;
  p.k = k;
  p.index = index;
  p.scale_offset = in_scale_offset;
  p.out = x;
  p.ldo = ldx;
  bool launched = false;
  with_row_tiles(rows, [&](auto mt) {
    constexpr int kM = decltype(mt)::value;
    launched = scaled ? launch_few_rows<kM, 2, FewIn::Scaled, FewOut::Residual, 0>(p, n, stream)
                      : launch_few_rows<kM, 2, FewIn::Plain, FewOut::Residual, 0>(p, n, stream);
  });
  return launched;
}

}  // namespace kernels
}  // namespace tfew
