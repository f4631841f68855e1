// One row of T5's RMSNorm by one warp, or by kSplit warps of a block (rmsnorm.cu's warp-per-row forms), shared with
// the kernels that normalise their own input (the few-row decoder linears, linear_few_rows.cu), so that every copy of
// a norm of one split computes the same sums in the same order and gives the same bits.
#pragma once
#include "kernels/device_common.cuh"

namespace tfew {
namespace kernels {

// The sum over a row's kSplit warps of v (each warp's value already warp-summed), added in warp order, so every
// thread of the row gets the same bits. `partial` holds one float per warp of the block (shared memory), and every
// thread of the block calls this (barriers). kSplit == 1: v.
template <int kSplit>
__device__ __forceinline__ float row_sum_over_warps(float v, float* partial) {
  if constexpr (kSplit == 1) {
    return v;
  } else {
    const int warp = threadIdx.x >> 5, first = warp - warp % kSplit;
    __syncthreads();  // partial may still be read by the previous sum
    if ((threadIdx.x & 31) == 0) partial[warp] = v;
    __syncthreads();
    float s = partial[first];
#pragma unroll
    for (int w = 1; w < kSplit; ++w) s += partial[first + w];
    return s;
  }
}

// This warp's part of a row: lane l holds columns 4 l + 128 k for the kChunks / kSplit chunks k of part `part`
// (consecutive chunks; kChunks = d / 128). The sum of squares in that order, a butterfly over the warp, the parts in
// warp order; then out = weight * (x * inv_rms) * out_scale, one rounding. xr, weight and orow aligned for
// 4-element vectors. `live`: whether the row exists (a block's last rows may not; they still take part in the
// barriers). kSplit == 1 is the warp-per-row form (no barrier, partial unused).
template <int kChunks, int kSplit, typename TIn, typename TOut>
__device__ __forceinline__ void rmsnorm_row_part(const TIn* xr, const float* __restrict__ weight, int d, float eps,
                                                 float out_scale, TOut* __restrict__ orow, int part, bool live,
                                                 float* partial) {
  static_assert(kChunks % kSplit == 0, "a row's chunks split evenly over its warps");
  constexpr int kPer = kChunks / kSplit;
  const int lane = threadIdx.x & 31, k0 = part * kPer;
  float ss = 0.f;
  if (live) {
#pragma unroll 8
    for (int k = k0; k < k0 + kPer; ++k) {
      const int c = lane * 4 + 128 * k;
      float v[4];
      load_x4(xr + c, v);
      for (int u = 0; u < 4; ++u) ss += v[u] * v[u];
    }
  }
  ss = row_sum_over_warps<kSplit>(warp_sum(ss), partial);
  if (!live) return;
  const float inv_rms = rsqrtf(ss / static_cast<float>(d) + eps);
#pragma unroll 8
  for (int k = k0; k < k0 + kPer; ++k) {
    const int c = lane * 4 + 128 * k;
    float v[4], w[4];
    load_x4(xr + c, v);
    load_x4(weight + c, w);
    for (int u = 0; u < 4; ++u) v[u] = w[u] * (v[u] * inv_rms) * out_scale;
    store_x4(orow + c, v);
  }
}

// A whole row by one warp (rmsnorm_row_part with one part): the form of every norm of a call with many rows.
template <int kChunks, typename TIn, typename TOut>
__device__ __forceinline__ void rmsnorm_row_warp(const TIn* xr, const float* __restrict__ weight, int d, float eps,
                                                 float out_scale, TOut* __restrict__ orow) {
  rmsnorm_row_part<kChunks, 1>(xr, weight, d, eps, out_scale, orow, 0, true, nullptr);
}

}  // namespace kernels
}  // namespace tfew
