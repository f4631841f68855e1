// Dropout masks on the device, bit-identical to the CPU backend's: core/dropout_mask.h is the one definition
// (element `index` of dropout site `site` is kept by a hash of (seed, site, index)). No mask is stored: the
// backward pass regenerates it, and CPU and GPU drop the same elements.
#pragma once
#include <cstdint>

#include "core/dropout_mask.h"
#include "kernels/kernels.cuh"  // DropoutSite

namespace tfew {
namespace kernels {

// The site ready for per-element masks: the seed read from device memory (a replayed graph's seed lives there),
// the stream key, threshold and keep scale computed. Kernels call this once on entry, not per element.
__device__ __forceinline__ DropoutSite with_seed(DropoutSite d) {
  if (d.rate > 0.f && !d.prepared) {
    const uint64_t seed = d.seed_dev ? *d.seed_dev : d.seed;
    d.key = dropout_stream_key(seed, d.site);
    d.threshold = dropout_threshold(d.rate);
    d.keep_scale = 1.f / (1.f - d.rate);
    d.prepared = true;
  }
  return d;
}

// Whether element `index` of a prepared site (with_seed) is kept.
__device__ __forceinline__ bool dropout_keeps(const DropoutSite& d, uint64_t index) {
  return dropout_kept(d.key, d.threshold, index);
}

// 1 / (1 - rate) where kept, 0 where dropped, 1 without dropout.
__device__ __forceinline__ float dropout_scale(const DropoutSite& d, uint64_t index) {
  if (d.rate <= 0.f) return 1.f;
  if (d.prepared) return dropout_kept(d.key, d.threshold, index) ? d.keep_scale : 0.f;
  const DropoutSite p = with_seed(d);  // (a kernel that did not prepare its site: correct, only slower)
  return dropout_kept(p.key, p.threshold, index) ? p.keep_scale : 0.f;
}

}  // namespace kernels
}  // namespace tfew
