// Dropout masks, one definition for the CPU backend (cpu/dropout.cc) and the CUDA kernels
// (kernels/dropout.cuh), so both drop the same elements and a mask need not be stored: element `index` of dropout
// site `site` under `seed` is kept iff its 32-bit half of output index / 2 of a SplitMix64 stream keyed by
// (seed, site) (the low half for an even index, the high half for the odd one after it) is at least rate * 2^32.
// One output (three 64-bit multiplies) thus decides two neighbouring elements: kernels that handle elements in
// pairs hash once for both (dropout_kept_pair; on an H200 the hash was a large part of the training encoder's
// attention forward and activation, which are compute-bound). The key is computed once per site (the CUDA kernels:
// once per thread).
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

// rate * 2^32, rounded down (a float rate times 2^32 is exact in double; 2^32 drops everything).
TFEW_HOST_DEVICE inline uint64_t dropout_threshold(float rate) {
  return rate <= 0.f ? 0u
         : rate >= 1.f ? (uint64_t{1} << 32)
                       : static_cast<uint64_t>(static_cast<double>(rate) * 4294967296.0);
}

// The stream's output for elements 2 pair and 2 pair + 1.
TFEW_HOST_DEVICE inline uint64_t dropout_pair_bits(uint64_t key, uint64_t pair) {
  return splitmix64_mix(key + (pair + 1) * kSplitMixGamma);
}

TFEW_HOST_DEVICE inline bool dropout_kept(uint64_t key, uint64_t threshold, uint64_t index) {
  const uint64_t bits = dropout_pair_bits(key, index >> 1);
  return ((index & 1) ? bits >> 32 : bits & 0xffffffffu) >= threshold;
}

// Elements even_index and even_index + 1 (even_index even), from one output.
TFEW_HOST_DEVICE inline void dropout_kept_pair(uint64_t key, uint64_t threshold, uint64_t even_index, bool& kept0,
                                               bool& kept1) {
  const uint64_t bits = dropout_pair_bits(key, even_index >> 1);
  kept0 = (bits & 0xffffffffu) >= threshold;
  kept1 = (bits >> 32) >= threshold;
}

// One site's mask with its key and threshold computed once (host code): scale(index) is what inverted dropout
// multiplies element `index` by, 1 / (1 - rate) or 0 (1 everywhere at rate 0).
struct DropoutMask {
  uint64_t key;
  uint64_t threshold;
  float keep_scale;
  DropoutMask(float rate, uint64_t seed, uint64_t site)
      : key(dropout_stream_key(seed, site)), threshold(dropout_threshold(rate)), keep_scale(rate > 0.f ? 1.f / (1.f - rate) : 1.f) {}
  bool kept(uint64_t index) const { return threshold == 0 || dropout_kept(key, threshold, index); }
  float scale(uint64_t index) const { return kept(index) ? keep_scale : 0.f; }
};

}  // namespace tfew
