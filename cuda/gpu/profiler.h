// Optional CUDA-event timing of the engine's forward for the benchmark (benchmarks/rank-bench.ts).
#pragma once
#include <cuda_runtime_api.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "gpu/cuda_check.h"
#include "gpu/engine_plan.h"

namespace tfew {
namespace gpu {

// Optional timing (TFEW_CUDA_PROFILE=<file>): CUDA events around the whole forward, and with
// TFEW_CUDA_PROFILE_DETAIL=1 around every launch by family (GEMMs vs the rest; graphs off), appended to the
// file as one JSON line per call. The benchmark reads it.
class Profiler {
 public:
  Profiler() {
    const char* f = std::getenv("TFEW_CUDA_PROFILE");
    if (f && f[0]) file_ = f;
    detail_ = !file_.empty() && env_flag("TFEW_CUDA_PROFILE_DETAIL", false);
  }
  ~Profiler() {
    for (auto& e : events_) cudaEventDestroy(e);
  }
  bool enabled() const { return !file_.empty(); }
  bool detail() const { return detail_; }

  void begin_call(cudaStream_t stream) {
    if (!enabled()) return;
    used_ = 0;
    marks_.clear();
    keyed_marks_.clear();
    call_start_ = record(stream);
  }
  // A span of the launch sequence attributed to `family` (only in detail mode).
  void mark(const char* family, cudaStream_t stream, bool begin) {
    if (!detail_) return;
    marks_.push_back({family, record(stream), begin});
  }
  // A GEMM call by its call site and shape (only in detail mode): timed and counted apart from the families (which
  // already hold the GEMMs' total), so that the benchmark can say which shapes run slowly.
  void keyed_mark(const std::string& key, cudaStream_t stream, bool begin) {
    if (!detail_) return;
    keyed_marks_.push_back({key, record(stream), begin});
  }
  void end_call(cudaStream_t stream) {
    if (!enabled()) return;
    call_end_ = record(stream);
  }
  // After the stream was synchronised.
  // kind: "score" (the inference forward) or "train" (a training step: forward, losses, backward).
  // launch: "replay", "capture" (a graph captured and launched) or "eager".
  void report(const char* kind, const Shape& s, const std::string& device, const char* precision, const char* launch) {
    if (!enabled()) return;
    float total = 0.f;
    cudaEventElapsedTime(&total, events_[call_start_], events_[call_end_]);
    std::map<std::string, double> by_family;
    std::map<std::string, size_t> open;
    for (const auto& m : marks_) {
      if (m.begin) {
        open[m.family] = m.event;
      } else {
        float ms = 0.f;
        cudaEventElapsedTime(&ms, events_[open[m.family]], events_[m.event]);
        by_family[m.family] += ms;
      }
    }
    cudaGetLastError();
    FILE* f = std::fopen(file_.c_str(), "a");
    if (!f) return;
    std::fprintf(f,
                 "{\"kind\":\"%s\",\"device\":\"%s\",\"precision\":\"%s\",\"batch\":%d,\"enc_len\":%d,\"rows\":%d,"
                 "\"dec_len\":%d,\"adapters\":%s,\"folded_cross\":%s,\"graph\":%s,\"launch\":\"%s\","
                 "\"forward_ms\":%.4f",
                 kind, device.c_str(), precision, s.batch, s.enc_len, s.rows, s.dec_len, s.adapters ? "true" : "false",
                 s.folded_cross ? "true" : "false", std::strcmp(launch, "eager") != 0 ? "true" : "false", launch, total);
    if (detail_) {
      std::fprintf(f, ",\"families_ms\":{");
      bool first = true;
      for (const auto& kv : by_family) {
        std::fprintf(f, "%s\"%s\":%.4f", first ? "" : ",", kv.first.c_str(), kv.second);
        first = false;
      }
      std::fprintf(f, "}");
      std::map<std::string, std::pair<double, int>> by_key;  // ms, calls
      for (size_t i = 0; i + 1 < keyed_marks_.size(); i += 2) {  // begin, end pairs: GEMM calls do not nest
        float ms = 0.f;
        cudaEventElapsedTime(&ms, events_[keyed_marks_[i].event], events_[keyed_marks_[i + 1].event]);
        auto& entry = by_key[keyed_marks_[i].family];
        entry.first += ms;
        entry.second += 1;
      }
      cudaGetLastError();
      std::fprintf(f, ",\"gemm_shapes\":{");
      first = true;
      for (const auto& kv : by_key) {
        std::fprintf(f, "%s\"%s\":{\"ms\":%.4f,\"calls\":%d}", first ? "" : ",", kv.first.c_str(), kv.second.first,
                     kv.second.second);
        first = false;
      }
      std::fprintf(f, "}");
    }
    std::fprintf(f, "}\n");
    std::fclose(f);
  }

 private:
  struct Mark {
    std::string family;
    size_t event;
    bool begin;
  };
  size_t record(cudaStream_t stream) {
    if (used_ == events_.size()) {
      cudaEvent_t e;
      TFEW_CUDA_CHECK(cudaEventCreate(&e));
      events_.push_back(e);
    }
    TFEW_CUDA_CHECK(cudaEventRecord(events_[used_], stream));
    return used_++;
  }
  std::string file_;
  bool detail_ = false;
  std::vector<cudaEvent_t> events_;
  size_t used_ = 0, call_start_ = 0, call_end_ = 0;
  std::vector<Mark> marks_;
  std::vector<Mark> keyed_marks_;
};

// Brackets one launch family for the detail profile.
class Span {
 public:
  // A null family times nothing (a span already counted by another, e.g. GEMMs the Gemm times itself).
  Span(Profiler& p, const char* family, cudaStream_t s) : p_(p), family_(family), s_(s) {
    if (family_) p_.mark(family_, s_, true);
  }
  ~Span() {
    try {
      if (family_) p_.mark(family_, s_, false);
    } catch (...) {  // a failed timing event must not mask the error being unwound (or abort)
    }
  }

 private:
  Profiler& p_;
  const char* family_;
  cudaStream_t s_;
};

// Brackets one GEMM call by its key for the detail profile (an empty key times nothing).
class KeyedSpan {
 public:
  KeyedSpan(Profiler& p, std::string key, cudaStream_t s) : p_(p), key_(std::move(key)), s_(s) {
    if (!key_.empty()) p_.keyed_mark(key_, s_, true);
  }
  ~KeyedSpan() {
    try {
      if (!key_.empty()) p_.keyed_mark(key_, s_, false);
    } catch (...) {  // as Span
    }
  }

 private:
  Profiler& p_;
  std::string key_;
  cudaStream_t s_;
};

}  // namespace gpu
}  // namespace tfew
