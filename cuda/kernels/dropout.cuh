// Dropout masks on the device, bit-identical to the CPU backend's (cpu/dropout.cc): element `index` of
// dropout site `site` is kept iff a splitmix64 hash of (seed, site, index), as a double in [0, 1), is >= rate.
// No mask is stored: the backward pass regenerates it, and CPU and GPU drop the same elements.
#pragma once
#include <cstdint>

#include "kernels/kernels.cuh"  // DropoutSite

namespace tfew {
namespace kernels {

__device__ __forceinline__ uint64_t splitmix64_device(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// The site with its seed read from device memory once: kernels call this on entry, so a thread reads the
// seed once instead of once per element (a replayed graph's seed lives in device memory).
__device__ __forceinline__ DropoutSite with_seed(DropoutSite d) {
  if (d.rate > 0.f && d.seed_dev) {
    d.seed = *d.seed_dev;
    d.seed_dev = nullptr;
  }
  return d;
}

// 1 / (1 - rate) where kept, 0 where dropped, 1 without dropout.
__device__ __forceinline__ float dropout_scale(const DropoutSite& d, uint64_t index) {
  if (d.rate <= 0.f) return 1.f;
  const uint64_t seed = d.seed_dev ? *d.seed_dev : d.seed;
  const uint64_t h = splitmix64_device(seed ^ splitmix64_device(d.site * 0x100000001b3ull ^ splitmix64_device(index)));
  const double u = static_cast<double>(h >> 11) * (1.0 / 9007199254740992.0);
  return u >= static_cast<double>(d.rate) ? 1.f / (1.f - d.rate) : 0.f;
}

}  // namespace kernels
}  // namespace tfew
