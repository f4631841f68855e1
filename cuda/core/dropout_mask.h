// Dropout masks, one definition for the CPU backend (cpu/dropout.cc) and the CUDA kernels
// (kernels/dropout.cuh), so both drop the same elements and a mask need not be stored: element `index` of dropout
// site `site` under `seed` is kept iff the index-th output of a SplitMix64 stream keyed by (seed, site), in its
// top 24 bits, is at least rate * 2^24. Per element that is one SplitMix64 output (three 64-bit multiplies);
// the key is computed once per site (the CUDA kernels: once per thread).
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define TFEW_HOST_DEVICE __host__ __device__
#else
#define TFEW_HOST_DEVICE
#endif

namespace tfew {

constexpr uint64_t kSplitMixGamma = 0x9e3779b97f4a7c15ull;

// SplitMix64's output function (Steele, Lea and Flood 2014).
TFEW_HOST_DEVICE inline uint64_t splitmix64_mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// The stream key of (seed, site): the seed's and the site's bits mixed, so sites and seeds give unrelated masks.
TFEW_HOST_DEVICE inline uint64_t dropout_stream_key(uint64_t seed, uint64_t site) {
  return splitmix64_mix(seed ^ splitmix64_mix(site + kSplitMixGamma));
}

// rate * 2^24 (exact for a float rate in [0, 1]; 2^24 drops everything).
TFEW_HOST_DEVICE inline uint32_t dropout_threshold(float rate) {
  return rate <= 0.f ? 0u : rate >= 1.f ? (1u << 24) : static_cast<uint32_t>(rate * 16777216.f);
}

TFEW_HOST_DEVICE inline bool dropout_kept(uint64_t key, uint32_t threshold, uint64_t index) {
  return static_cast<uint32_t>(splitmix64_mix(key + (index + 1) * kSplitMixGamma) >> 40) >= threshold;
}

// One site's mask with its key and threshold computed once (host code): scale(index) is what inverted dropout
// multiplies element `index` by, 1 / (1 - rate) or 0 (1 everywhere at rate 0).
struct DropoutMask {
  uint64_t key;
  uint32_t threshold;
  float keep_scale;
  DropoutMask(float rate, uint64_t seed, uint64_t site)
      : key(dropout_stream_key(seed, site)), threshold(dropout_threshold(rate)), keep_scale(rate > 0.f ? 1.f / (1.f - rate) : 1.f) {}
  bool kept(uint64_t index) const { return threshold == 0 || dropout_kept(key, threshold, index); }
  float scale(uint64_t index) const { return kept(index) ? keep_scale : 0.f; }
};

}  // namespace tfew
