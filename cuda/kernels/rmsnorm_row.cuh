// One row of T5's RMSNorm by one warp (rmsnorm.cu's warp-per-row form), shared with the kernels that normalise
// their own input (the few-row decoder linears, linear_few_rows.cu), so that every copy of a norm computes the same
// sums in the same order and gives the same bits.
#pragma once
#include "kernels/device_common.cuh"

namespace tfew {
namespace kernels {

// Lane l holds columns 4 l + 128 k (k < kChunks = d / 128): the sum of squares in that order, then a butterfly over
// the warp; out = weight * (x * inv_rms) * out_scale, one rounding. xr, weight and orow aligned for 4-element vectors.
template <int kChunks, typename TIn, typename TOut>
__device__ __forceinline__ void rmsnorm_row_warp(const TIn* xr, const float* __restrict__ weight, int d, float eps,
                                                 float out_scale, TOut* __restrict__ orow) {
  const int lane = threadIdx.x & 31;
  float ss = 0.f;
#pragma unroll 8
  for (int k = 0; k < kChunks; ++k) {
    const int c = lane * 4 + 128 * k;
    float v[4];
    load_x4(xr + c, v);
    for (int u = 0; u < 4; ++u) ss += v[u] * v[u];
  }
  ss = warp_sum(ss);
  const float inv_rms = rsqrtf(ss / static_cast<float>(d) + eps);
#pragma unroll 8
  for (int k = 0; k < kChunks; ++k) {
    const int c = lane * 4 + 128 * k;
    float v[4], w[4];
    load_x4(xr + c, v);
    load_x4(weight + c, w);
    for (int u = 0; u < 4; ++u) v[u] = w[u] * (v[u] * inv_rms) * out_scale;
    store_x4(orow + c, v);
  }
}

}  // namespace kernels
}  // namespace tfew
