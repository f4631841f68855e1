// T5's LayerNorm is an RMSNorm: no mean subtraction, no bias, variance = mean(x^2) in fp32 (as Hugging Face
// computes it even for bf16 models). Reads the fp32 residual stream (inference) or the training forward's saved
// copy of it in the storage type (the backward reads the same copy, so a recomputed norm is bit-identical),
// writes the GEMM input type.
// out_scale folds in the d_model^-0.5 rescale before a tied head, so it costs no extra pass.
// Backward (the weight is frozen): with r = 1/rms and u = w * dy, dx = r u - x r^3 mean(u x); r is
// recomputed from x instead of being stored. In training the backward also writes what the next sub-layer's
// backward starts from (its output dropout applied to the residual gradient, cast for a GEMM), saving that
// sub-layer a pass over the gradient and a launch.
#include <atomic>
#include <cstdlib>
#include <type_traits>

#include "kernels/device_common.cuh"
#include "kernels/dropout.cuh"
#include "kernels/rmsnorm_row.cuh"

namespace tfew {
namespace kernels {

namespace {

// One row of the norm, by one block: the sums and the output of rmsnorm_forward. The training forward's fused
// residual add calls it too, so a norm recomputed by the backward (rmsnorm_forward) is the same bit for bit.
// (xr is not __restrict__: the fused kernel reads here what it has just written, which must not go through the
// read-only cache.)
template <typename TIn, typename TOut>
__device__ __forceinline__ void rmsnorm_row(const TIn* xr, const float* __restrict__ weight, int d,
                                            float eps, float out_scale, TOut* __restrict__ orow, float* scratch) {
  float ss = 0.f;
  for (int c = threadIdx.x; c < d; c += blockDim.x) {
    const float v = to_f32(xr[c]);
    ss += v * v;
  }
  ss = block_sum(ss, scratch);
  const float inv_rms = rsqrtf(ss / static_cast<float>(d) + eps);
  for (int c = threadIdx.x; c < d; c += blockDim.x) {
    orow[c] = from_f32<TOut>(weight[c] * (to_f32(xr[c]) * inv_rms) * out_scale);
  }
}

template <typename TIn, typename TOut>
__global__ void rmsnorm_forward_kernel(const TIn* __restrict__ x, const float* __restrict__ weight, int d,
                                       float eps, float out_scale, TOut* __restrict__ out) {
  wait_for_previous_kernel();
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  rmsnorm_row(x + row * d, weight, d, eps, out_scale, out + row * d, scratch);
}

// The training forward's residual add (with the sub-layer's output dropout) and saved copy, then the next
// sub-layer's norm of that copy (rmsnorm_row: rmsnorm_forward's arithmetic). Each thread reads back only the
// elements it wrote (rmsnorm_row strides as the loop here), so no barrier is needed before it.
template <typename T>
__global__ void residual_add_norm_kernel(float* __restrict__ x, const float* __restrict__ y, DropoutSite site,
                                         T* __restrict__ saved, const float* __restrict__ weight, int d, float eps,
                                         float out_scale, T* __restrict__ out) {
  wait_for_previous_kernel();
  __shared__ float scratch[32];
  site = with_seed(site);
  const int64_t row = blockIdx.x;
  for (int c = threadIdx.x; c < d; c += blockDim.x) {
    const int64_t i = row * d + c;
    const float v = x[i] + y[i] * dropout_scale(site, static_cast<uint64_t>(i));
    x[i] = v;
    saved[i] = from_f32<T>(v);
  }
  rmsnorm_row(saved + row * d, weight, d, eps, out_scale, out + row * d, scratch);
}

template <typename TX>
__global__ void rmsnorm_backward_kernel(const float* __restrict__ dy, const TX* __restrict__ x,
                                        const float* __restrict__ weight, int d, float eps, bool accumulate,
                                        float* __restrict__ dx, TX* __restrict__ cast_out, DropoutSite cast_site) {
  wait_for_previous_kernel();
  __shared__ float scratch[32];
  cast_site = with_seed(cast_site);
  const int64_t row = blockIdx.x;
  const TX* xr = x + row * d;
  const float* dyr = dy + row * d;
  float ss = 0.f, ux = 0.f;
  for (int c = threadIdx.x; c < d; c += blockDim.x) {
    const float v = to_f32(xr[c]);
    ss += v * v;
    ux += weight[c] * dyr[c] * v;
  }
  ss = block_sum(ss, scratch);
  ux = block_sum(ux, scratch);
  const float r = rsqrtf(ss / static_cast<float>(d) + eps);
  const float coef = ux / static_cast<float>(d) * r * r * r;
  float* dxr = dx + row * d;
  for (int c = threadIdx.x; c < d; c += blockDim.x) {
    const float g = r * weight[c] * dyr[c] - to_f32(xr[c]) * coef;
    const float v = accumulate ? dxr[c] + g : g;
    dxr[c] = v;
    if (cast_out) {  // as dropout_cast(dx, n, cast_site, cast_out) would, element for element
      const int64_t i = row * d + c;
      cast_out[i] = from_f32<TX>(v * dropout_scale(cast_site, static_cast<uint64_t>(i)));
    }
  }
}

// ---- the warp-per-row forms (the T0/T5 widths, every pointer aligned for 4-element vectors)
// A row by one warp, each lane 4 consecutive columns per 128, warp shuffles only, or by kSplit warps of the block
// (each a run of the row's 128-column chunks; their sums added in warp order through shared memory). The
// block-per-row form above gives each of 512 threads 4 elements of a 2,048-wide row and two block barriers per sum:
// on an H200 (session 12) RANK-3B-B32's norms took 3.4 ms for ~1 ms of memory traffic. A warp per row in turn is a
// long chain of dependent loads (and dropout hashes) per warp when there are few rows: TRAIN-3B's decoder norms
// (128 rows, 16 blocks) took 17 us each for ~1 us of memory traffic (ncu, H200, session 19), ~2.5 ms a step.
// norm_split picks the warps per row from the number of rows (one when the rows alone give the GPU enough warps).
// Results differ between splits only by the order of the sums of squares. Each norm's split depends on its rows
// and width alone, so the training forward's fused residual add and the backward's recomputed norm (the same rows)
// stay bit-identical to each other; the few-row decoder linears use the one-warp form (rmsnorm_row_warp).
// kChunks = d / 128 is a compile-time constant (the T5 and T0 widths 512, 768, 1024, 2048, 4096; other widths take
// the block-per-row form): the loops unroll (by up to 8 chunks: registers), so a lane's loads of a row are in flight
// together.
constexpr int kNormWarpsPerBlock = 8;
// Warps wanted in flight for a norm (~32 per SM of an H100 / H200): fewer rows than this get split.
constexpr int64_t kNormTargetWarps = 4096;

// A forced number of warps per row (0: none): the addon's _testing.normWarpsPerRow, else
// TFEW_CUDA_NORM_WARPS_PER_ROW=1|2|4|8 (read once). For the tests that hold every form to the CPU backend; a graph
// keeps what it captured.
std::atomic<int> g_forced_norm_warps{-1};  // -1: not set by the hook (the environment decides)
int forced_norm_warps() {
  const int hook = g_forced_norm_warps.load(std::memory_order_relaxed);
  if (hook >= 0) return hook;
  static const int from_env = [] {
    const char* v = std::getenv("TFEW_CUDA_NORM_WARPS_PER_ROW");
    return v ? std::atoi(v) : 0;
  }();
  return from_env;
}

// Warps per row: 1, 2, 4 or 8 (dividing the row's chunks), the fewest that give kNormTargetWarps warps.
inline int norm_split(int64_t n_rows, int chunks) {
  const int w = forced_norm_warps();
  if ((w == 1 || w == 2 || w == 4 || w == 8) && chunks % w == 0) return w;
  int split = 1;
  while (split < kNormWarpsPerBlock && n_rows * split < kNormTargetWarps && chunks % (2 * split) == 0) split *= 2;
  return split;
}

// This thread's row (blockIdx.x holds kNormWarpsPerBlock / kSplit rows) and part of it. A row past n_rows is not
// `live` (row 0 stands in for its pointers; its threads still reach the barriers of a split row).
template <int kSplit>
struct NormRowOfThread {
  int64_t row;
  int part;
  bool live;
  __device__ __forceinline__ explicit NormRowOfThread(int64_t n_rows) {
    const int warp = threadIdx.x >> 5;
    row = static_cast<int64_t>(blockIdx.x) * (kNormWarpsPerBlock / kSplit) + warp / kSplit;
    part = warp % kSplit;
    live = row < n_rows;
    if (!live) row = 0;
  }
};

template <int kChunks, int kSplit, typename TIn, typename TOut>
__global__ void __launch_bounds__(32 * kNormWarpsPerBlock)
rmsnorm_forward_warp_kernel(const TIn* __restrict__ x, const float* __restrict__ weight, int64_t n_rows, int d,
                            float eps, float out_scale, TOut* __restrict__ out) {
  wait_for_previous_kernel();
  __shared__ float partial[kNormWarpsPerBlock];
  const NormRowOfThread<kSplit> r(n_rows);
  if (kSplit == 1 && !r.live) return;
  const int64_t row = r.row;
  rmsnorm_row_part<kChunks, kSplit>(x + row * d, weight, d, eps, out_scale, out + row * d, r.part, r.live, partial);
}

// residual_add_norm_kernel's work, kSplit warps per row; each lane reads back only the columns it wrote.
template <int kChunks, int kSplit, typename T>
__global__ void __launch_bounds__(32 * kNormWarpsPerBlock)
residual_add_norm_warp_kernel(float* __restrict__ x, const float* __restrict__ y, DropoutSite site, T* saved,
                              const float* __restrict__ weight, int64_t n_rows, int d, float eps, float out_scale,
                              T* __restrict__ out) {
  wait_for_previous_kernel();
  __shared__ float partial[kNormWarpsPerBlock];
  site = with_seed(site);
  const NormRowOfThread<kSplit> r(n_rows);
  if (kSplit == 1 && !r.live) return;
  const int64_t row = r.row;
  constexpr int kPer = kChunks / kSplit;
  if (r.live) {
#pragma unroll 8
    for (int k = r.part * kPer; k < (r.part + 1) * kPer; ++k) {
      const int64_t i = row * d + (threadIdx.x & 31) * 4 + 128 * k;
      float xv[4], yv[4], keep[4];
      load_x4(x + i, xv);
      load_x4(y + i, yv);
      dropout_scales(site, static_cast<uint64_t>(i), keep);
      for (int u = 0; u < 4; ++u) xv[u] = xv[u] + yv[u] * keep[u];
      store_x4(x + i, xv);
      store_x4(saved + i, xv);
    }
  }
  rmsnorm_row_part<kChunks, kSplit>(saved + row * d, weight, d, eps, out_scale, out + row * d, r.part, r.live, partial);
}

template <int kChunks, int kSplit, typename TX>
__global__ void __launch_bounds__(32 * kNormWarpsPerBlock)
rmsnorm_backward_warp_kernel(const float* __restrict__ dy, const TX* __restrict__ x, const float* __restrict__ weight,
                             int64_t n_rows, int d, float eps, bool accumulate, float* __restrict__ dx,
                             TX* __restrict__ cast_out, DropoutSite cast_site) {
  wait_for_previous_kernel();
  __shared__ float partial[kNormWarpsPerBlock];
  cast_site = with_seed(cast_site);
  const NormRowOfThread<kSplit> r(n_rows);
  if (kSplit == 1 && !r.live) return;
  const int64_t row = r.row;
  constexpr int kPer = kChunks / kSplit;
  const int lane = threadIdx.x & 31, k0 = r.part * kPer;
  const TX* xr = x + row * d;
  const float* dyr = dy + row * d;
  float ss = 0.f, ux = 0.f;
  if (r.live) {
#pragma unroll 8
    for (int k = k0; k < k0 + kPer; ++k) {
      const int c = lane * 4 + 128 * k;
      float v[4], g[4], w[4];
      load_x4(xr + c, v);
      load_x4(dyr + c, g);
      load_x4(weight + c, w);
      for (int u = 0; u < 4; ++u) {
        ss += v[u] * v[u];
        ux += w[u] * g[u] * v[u];
      }
    }
  }
  ss = row_sum_over_warps<kSplit>(warp_sum(ss), partial);
  ux = row_sum_over_warps<kSplit>(warp_sum(ux), partial);
  if (!r.live) return;
  const float rr = rsqrtf(ss / static_cast<float>(d) + eps);
  const float coef = ux / static_cast<float>(d) * rr * rr * rr;
  float* dxr = dx + row * d;
#pragma unroll 8
  for (int k = k0; k < k0 + kPer; ++k) {
    const int c = lane * 4 + 128 * k;
    float v[4], g[4], w[4], out[4];
    load_x4(xr + c, v);
    load_x4(dyr + c, g);
    load_x4(weight + c, w);
    if (accumulate) load_x4(dxr + c, out);
    for (int u = 0; u < 4; ++u) {
      const float grad = rr * w[u] * g[u] - v[u] * coef;
      out[u] = accumulate ? out[u] + grad : grad;
    }
    store_x4(dxr + c, out);
    if (cast_out) {  // as dropout_cast(dx, n, cast_site, cast_out) would, element for element
      const int64_t i = row * d + c;
      float keep[4];
      dropout_scales(cast_site, static_cast<uint64_t>(i), keep);
      for (int u = 0; u < 4; ++u) out[u] *= keep[u];
      store_x4(cast_out + i, out);
    }
  }
}

inline unsigned norm_warp_blocks(int64_t n_rows, int split) {
  const int64_t rows_per_block = kNormWarpsPerBlock / split;
  return static_cast<unsigned>((n_rows + rows_per_block - 1) / rows_per_block);
}

// Launches launch(std::integral_constant<int, d / 128>(), std::integral_constant<int, split>()) where the
// warp-per-row forms have an instance for width d, split per norm_split; false (nothing launched) elsewhere.
template <typename Launch>
bool with_norm_form(int64_t n_rows, int d, Launch&& launch) {
  if (d % 128 != 0) return false;
  const int chunks = d / 128, split = norm_split(n_rows, chunks);
  auto with_split = [&](auto c) {
    using C = decltype(c);
    switch (split) {
      case 1: launch(c, std::integral_constant<int, 1>()); break;
      case 2: if constexpr (C::value % 2 == 0) launch(c, std::integral_constant<int, 2>()); break;
      case 4: if constexpr (C::value % 4 == 0) launch(c, std::integral_constant<int, 4>()); break;
      default: if constexpr (C::value % 8 == 0) launch(c, std::integral_constant<int, 8>()); break;
    }
    return true;
  };
  switch (chunks) {
    case 4: return with_split(std::integral_constant<int, 4>());     // T5-small
    case 6: return with_split(std::integral_constant<int, 6>());     // T5-base
    case 8: return with_split(std::integral_constant<int, 8>());     // T5-large, the original T5-11B
    case 16: return with_split(std::integral_constant<int, 16>());   // T5-3B, T0-3B
    case 32: return with_split(std::integral_constant<int, 32>());   // T5 v1.1 XXL, T0 (11B)
    default: return false;
  }
}

}  // namespace

void set_norm_warps_per_row(int warps) { g_forced_norm_warps.store(warps > 0 ? warps : 0, std::memory_order_relaxed); }

template <typename TX>
void rmsnorm_backward(const float* dy, const TX* x, const float* weight, int n_rows, int d, float eps,
                      bool accumulate, float* dx, cudaStream_t stream, TX* cast_out, const DropoutSite& cast_site) {
  if (n_rows <= 0) return;
  if (aligned_x4(dy) && aligned_x4(x) && aligned_x4(weight) && aligned_x4(dx) && (!cast_out || aligned_x4(cast_out)) &&
      with_norm_form(n_rows, d, [&](auto chunks, auto split) {
        TFEW_LAUNCH(norm_warp_blocks(n_rows, split), 32 * kNormWarpsPerBlock, 0, stream,
                    rmsnorm_backward_warp_kernel<decltype(chunks)::value, decltype(split)::value, TX>)(
            dy, x, weight, n_rows, d, eps, accumulate, dx, cast_out, cast_site);
      })) {
    TFEW_CUDA_CHECK_LAUNCH("rmsnorm_backward_warp_kernel");
    return;
  }
  const int block = d >= 1024 ? 512 : (d >= 256 ? 256 : 128);
  TFEW_LAUNCH(n_rows, block, 0, stream, rmsnorm_backward_kernel<TX>)(dy, x, weight, d, eps, accumulate, dx, cast_out,
                                                                     cast_site);
  TFEW_CUDA_CHECK_LAUNCH("rmsnorm_backward_kernel");
}

template <typename TIn, typename TOut>
void rmsnorm_forward(const TIn* x, const float* weight, int n_rows, int d, float eps, float out_scale,
                     TOut* out, cudaStream_t stream) {
  if (n_rows <= 0) return;
  if (aligned_x4(x) && aligned_x4(weight) && aligned_x4(out) && with_norm_form(n_rows, d, [&](auto chunks, auto split) {
        TFEW_LAUNCH(norm_warp_blocks(n_rows, split), 32 * kNormWarpsPerBlock, 0, stream,
                    rmsnorm_forward_warp_kernel<decltype(chunks)::value, decltype(split)::value, TIn, TOut>)(
            x, weight, n_rows, d, eps, out_scale, out);
      })) {
    TFEW_CUDA_CHECK_LAUNCH("rmsnorm_forward_warp_kernel");
    return;
  }
  const int block = d >= 1024 ? 512 : (d >= 256 ? 256 : 128);
  TFEW_LAUNCH(n_rows, block, 0, stream, rmsnorm_forward_kernel<TIn, TOut>)(x, weight, d, eps, out_scale, out);
  TFEW_CUDA_CHECK_LAUNCH("rmsnorm_forward_kernel");
}

template <typename T>
void residual_add_norm(float* x, const float* y, int n_rows, int d, const DropoutSite& site, T* saved,
                       const float* weight, float eps, float out_scale, T* out, cudaStream_t stream) {
  if (n_rows <= 0) return;
  // The same form as rmsnorm_forward picks for the saved copy (the same sums, which the backward's recomputed norm
  // relies on): decided by the norm's operands only. The stream operands are arena buffers like them.
  if (aligned_x4(saved) && aligned_x4(weight) && aligned_x4(out) && with_norm_form(n_rows, d, [&](auto chunks, auto split) {
        if (!aligned_x4(x) || !aligned_x4(y)) fail(ErrorCode::Internal, "residual_add_norm: a misaligned residual stream");
        TFEW_LAUNCH(norm_warp_blocks(n_rows, split), 32 * kNormWarpsPerBlock, 0, stream,
                    residual_add_norm_warp_kernel<decltype(chunks)::value, decltype(split)::value, T>)(
            x, y, site, saved, weight, n_rows, d, eps, out_scale, out);
      })) {
    TFEW_CUDA_CHECK_LAUNCH("residual_add_norm_warp_kernel");
    return;
  }
  const int block = d >= 1024 ? 512 : (d >= 256 ? 256 : 128);  // rmsnorm_forward's (the same sums)
  TFEW_LAUNCH(n_rows, block, 0, stream, residual_add_norm_kernel<T>)(x, y, site, saved, weight, d, eps, out_scale, out);
  TFEW_CUDA_CHECK_LAUNCH("residual_add_norm_kernel");
}

using bf16 = __nv_bfloat16;
template void residual_add_norm<float>(float*, const float*, int, int, const DropoutSite&, float*, const float*,
                                       float, float, float*, cudaStream_t);
template void residual_add_norm<bf16>(float*, const float*, int, int, const DropoutSite&, bf16*, const float*, float,
                                      float, bf16*, cudaStream_t);
template void rmsnorm_backward<float>(const float*, const float*, const float*, int, int, float, bool, float*,
                                      cudaStream_t, float*, const DropoutSite&);
template void rmsnorm_backward<bf16>(const float*, const bf16*, const float*, int, int, float, bool, float*,
                                     cudaStream_t, bf16*, const DropoutSite&);
template void rmsnorm_forward<float, float>(const float*, const float*, int, int, float, float, float*, cudaStream_t);
template void rmsnorm_forward<float, bf16>(const float*, const float*, int, int, float, float, bf16*, cudaStream_t);
template void rmsnorm_forward<bf16, bf16>(const bf16*, const float*, int, int, float, float, bf16*, cudaStream_t);

}  // namespace kernels
}  // namespace tfew
