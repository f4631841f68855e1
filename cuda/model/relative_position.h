// T5's relative-position buckets, shared by both backends and computed on the host exactly as Hugging Face
// does (float32 log, truncation): on the device, logf may differ by an ulp, which flips buckets at exact
// boundaries (n = 16, 32, 64 for the bidirectional encoder buckets). The tables are tiny.
#pragma once
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <vector>

namespace tfew {

// Distances below this get a bucket each; the rest share log-spaced buckets up to max_distance.
inline int relative_max_exact(int num_buckets, bool bidirectional) { return (bidirectional ? num_buckets / 2 : num_buckets) / 2; }

// Whether the settings make buckets inside the table in both directions (encoder and decoder): the log spacing
// divides by log(max_distance / max_exact), so it needs max_exact >= 1 and max_distance above it.
inline bool relative_buckets_valid(int num_buckets, int max_distance) {
  for (bool bidirectional : {true, false}) {
    const int max_exact = relative_max_exact(num_buckets, bidirectional);
    if (max_exact < 1 || max_distance <= max_exact) return false;
  }
  return true;
}

// relative = key position - query position (settings that pass relative_buckets_valid).
inline int32_t relative_position_bucket(int relative, bool bidirectional, int num_buckets, int max_distance) {
  int32_t bucket = 0;
  int n;
  if (bidirectional) {
    num_buckets /= 2;
    if (relative > 0) bucket += num_buckets;
    n = relative < 0 ? -relative : relative;
  } else {
    n = relative < 0 ? -relative : 0;
  }
  const int max_exact = num_buckets / 2;  // (= relative_max_exact of the caller's num_buckets)
  if (n < max_exact) return bucket + n;
  // float32 throughout, like torch: log(n / max_exact) / log(max_distance / max_exact) * (num_buckets - max_exact)
  const float ratio = static_cast<float>(n) / static_cast<float>(max_exact);
  const float denom = static_cast<float>(std::log(static_cast<double>(max_distance) / max_exact));
  const float scaled = std::log(ratio) / denom * static_cast<float>(num_buckets - max_exact);
  int large = max_exact + static_cast<int>(scaled);
  if (large > num_buckets - 1) large = num_buckets - 1;
  return bucket + large;
}

// Buckets of every relative distance j - i in [-(len - 1), len - 1], at index j - i + len - 1.
inline std::vector<int32_t> relative_bucket_span(int len, bool bidirectional, int num_buckets, int max_distance) {
  std::vector<int32_t> out(2 * static_cast<size_t>(len) - 1);
  for (int rel = -(len - 1); rel <= len - 1; ++rel)
    out[rel + len - 1] = relative_position_bucket(rel, bidirectional, num_buckets, max_distance);
  return out;
}

}  // namespace tfew
