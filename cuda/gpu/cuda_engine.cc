// The CUDA engine: the T5 forward for rank classification on one GPU.
//
// Data path of score(): the host validates the batch and packs every per-call input (token ids, lengths,
// decoder inputs, row -> example and example -> adapter maps, relative-position buckets, the pointer arrays
// of the batched attention GEMMs) into one pinned buffer, copied with one cudaMemcpyAsync into the
// activation arena. The forward then only launches kernels and cuBLAS calls on the engine's stream, reading
// everything shape-independent from device memory — which is what lets a CUDA graph captured for one shape
// be replayed for every batch of that shape. Outputs are copied back once at the end.
//
// Rank classification the fast way: the encoder runs once per example; each decoder layer computes the
// cross-attention keys/values of the encoder output once per example and every choice row of that example
// reads them (row -> example index, no copies); all rows of the batch are decoded together. Mixed-task
// batches need no extra pass: the (IA)3 kernels look up each token's adapter.
//
// Memory: weights in one allocation (gpu/weights.h); activations in one arena planned from the batch shape,
// grown on demand (never in the steady state), with the encoder's and the decoder's temporaries sharing the
// same bytes. release() frees all of it.
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <sstream>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "core/errors.h"
#include "gpu/cublas_loader.h"
#include "gpu/cuda_check.h"
#include "gpu/device_memory.h"
#include "gpu/device_select.h"
#include "gpu/gemm.h"
#include "gpu/relative_position.h"
#include "gpu/weights.h"
#include "kernels/kernels.cuh"
#include "model/engine.h"

namespace tfew {
namespace gpu {

namespace {

constexpr size_t kCublasWorkspaceBytes = 32u << 20;  // what cuBLAS recommends on Hopper
constexpr size_t kMaxCachedGraphs = 32;

bool env_flag(const char* name, bool fallback) {
  const char* v = std::getenv(name);
  if (!v || !v[0]) return fallback;
  return !(std::strcmp(v, "0") == 0 || std::strcmp(v, "false") == 0 || std::strcmp(v, "off") == 0);
}

// Shape of one call; everything the launch sequence depends on besides device-resident data.
struct Shape {
  int batch = 0, enc_len = 0, rows = 0, dec_len = 0;
  bool want_hidden = false, adapters = false;
  bool operator<(const Shape& o) const {
    return std::tie(batch, enc_len, rows, dec_len, want_hidden, adapters) <
           std::tie(o.batch, o.enc_len, o.rows, o.dec_len, o.want_hidden, o.adapters);
  }
};

// Where every buffer of one call lives in the arena. Built twice: once from base 0 to size the arena, once
// from the arena's base.
template <typename T>
struct Plan {
  Shape shape;
  size_t bytes = 0;
  // per-call inputs, one contiguous block [inputs_begin, inputs_end) filled by a single copy
  size_t inputs_begin = 0, inputs_end = 0;
  const void** qk_k = nullptr;
  const void** qk_q = nullptr;
  void** qk_s = nullptr;
  const void** pv_v = nullptr;
  const void** pv_p = nullptr;
  void** pv_c = nullptr;
  int32_t* enc_ids = nullptr;
  int32_t* enc_lengths = nullptr;
  int32_t* dec_ids = nullptr;
  int32_t* targets = nullptr;
  int32_t* row_example = nullptr;
  int32_t* adapter_of_example = nullptr;
  int32_t* enc_buckets = nullptr;
  int32_t* dec_buckets = nullptr;
  // results and tensors that live across the encoder -> decoder boundary
  float* enc_bias = nullptr;  // [H, 2 Le - 1]
  float* dec_bias = nullptr;  // [H, 2 Ld - 1]
  T* enc_out = nullptr;       // [Ne, d]
  float* enc_hidden = nullptr;  // [Ne, d] fp32 copy of the encoder output, when asked for
  float* token_logp = nullptr;  // [Nd]
  // encoder temporaries
  float* x_enc = nullptr;
  T* h_enc = nullptr;
  T* qkv_enc = nullptr;
  float* scores = nullptr;  // [B, H, Le, Le]
  T* probs = nullptr;
  T* ctx_enc = nullptr;
  T* ff_enc = nullptr;
  T* act_enc = nullptr;
  // decoder temporaries (same bytes as the encoder's)
  float* x_dec = nullptr;
  T* h_dec = nullptr;
  T* qkv_dec = nullptr;
  T* ctx_dec = nullptr;
  T* q_cross = nullptr;
  T* kv_cross = nullptr;  // [Ne, layers * 2 inner]
  T* ff_dec = nullptr;
  T* act_dec = nullptr;
  float* logits = nullptr;  // [Nd, vocab]
};

// fused_attention: the encoder attention runs as one kernel, without score/probability buffers or the
// pointer arrays of the batched GEMMs.
template <typename T>
Plan<T> make_plan(const T5Config& c, const Shape& s, bool fused_attention, uintptr_t base) {
  Plan<T> p;
  p.shape = s;
  const size_t d = c.d_model, inner = c.inner_dim(), ff = c.d_ff, H = c.num_heads, V = c.vocab_size;
  const size_t wi_cols = c.gated_gelu ? 2 * ff : ff;
  const size_t B = s.batch, Le = s.enc_len, R = s.rows, Ld = s.dec_len;
  const size_t Ne = B * Le, Nd = R * Ld, BH = fused_attention ? 0 : B * H;

  Placer pl(base);
  p.inputs_begin = 0;
  p.qk_k = pl.place<const void*>(BH);
  p.qk_q = pl.place<const void*>(BH);
  p.qk_s = pl.place<void*>(BH);
  p.pv_v = pl.place<const void*>(BH);
  p.pv_p = pl.place<const void*>(BH);
  p.pv_c = pl.place<void*>(BH);
  p.enc_ids = pl.place<int32_t>(Ne);
  p.enc_lengths = pl.place<int32_t>(B);
  p.dec_ids = pl.place<int32_t>(Nd);
  p.targets = pl.place<int32_t>(Nd);
  p.row_example = pl.place<int32_t>(R);
  p.adapter_of_example = pl.place<int32_t>(B);
  p.enc_buckets = pl.place<int32_t>(2 * Le - 1);
  p.dec_buckets = pl.place<int32_t>(Ld > 0 ? 2 * Ld - 1 : 0);
  p.inputs_end = pl.cursor();

  p.enc_bias = pl.place<float>(H * (2 * Le - 1));
  p.dec_bias = pl.place<float>(Ld > 0 ? H * (2 * Ld - 1) : 0);
  p.enc_out = pl.place<T>(Ne * d);
  p.enc_hidden = s.want_hidden ? pl.place<float>(Ne * d) : nullptr;
  p.token_logp = pl.place<float>(Nd);

  const size_t phase_start = pl.cursor();
  p.x_enc = pl.place<float>(Ne * d);
  p.h_enc = pl.place<T>(Ne * d);
  p.qkv_enc = pl.place<T>(Ne * 3 * inner);
  p.scores = pl.place<float>(BH * Le * Le);  // BH = 0 with fused attention
  p.probs = pl.place<T>(BH * Le * Le);
  p.ctx_enc = pl.place<T>(Ne * inner);
  p.ff_enc = pl.place<T>(Ne * wi_cols);
  p.act_enc = pl.place<T>(Ne * ff);
  const size_t encoder_end = pl.cursor();

  pl.set_cursor(phase_start);
  p.x_dec = pl.place<float>(Nd * d);
  p.h_dec = pl.place<T>(Nd * d);
  p.qkv_dec = pl.place<T>(Nd * 3 * inner);
  p.ctx_dec = pl.place<T>(Nd * inner);
  p.q_cross = pl.place<T>(Nd * inner);
  p.kv_cross = pl.place<T>(Ne * 2 * inner * c.num_decoder_layers);  // every decoder layer's cross k|v
  p.ff_dec = pl.place<T>(Nd * wi_cols);
  p.act_dec = pl.place<T>(Nd * ff);
  p.logits = pl.place<float>(Nd * V);
  p.bytes = align_up(std::max(encoder_end, pl.cursor()), 256);
  return p;
}

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
    call_start_ = record(stream);
  }
  // A span of the launch sequence attributed to `family` (only in detail mode).
  void mark(const char* family, cudaStream_t stream, bool begin) {
    if (!detail_) return;
    marks_.push_back({family, record(stream), begin});
  }
  void end_call(cudaStream_t stream) {
    if (!enabled()) return;
    call_end_ = record(stream);
  }
  // After the stream was synchronised.
  void report(const Shape& s, const std::string& device, const char* precision, bool graph) {
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
                 "{\"device\":\"%s\",\"precision\":\"%s\",\"batch\":%d,\"enc_len\":%d,\"rows\":%d,\"dec_len\":%d,"
                 "\"adapters\":%s,\"graph\":%s,\"forward_ms\":%.4f",
                 device.c_str(), precision, s.batch, s.enc_len, s.rows, s.dec_len, s.adapters ? "true" : "false",
                 graph ? "true" : "false", total);
    if (detail_) {
      std::fprintf(f, ",\"families_ms\":{");
      bool first = true;
      for (const auto& kv : by_family) {
        std::fprintf(f, "%s\"%s\":%.4f", first ? "" : ",", kv.first.c_str(), kv.second);
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
};

// Brackets one launch family for the detail profile.
class Span {
 public:
  Span(Profiler& p, const char* family, cudaStream_t s) : p_(p), family_(family), s_(s) { p_.mark(family_, s_, true); }
  ~Span() {
    try {
      p_.mark(family_, s_, false);
    } catch (...) {  // a failed timing event must not mask the error being unwound (or abort)
    }
  }

 private:
  Profiler& p_;
  const char* family_;
  cudaStream_t s_;
};

template <typename T>
class CudaEngine final : public Engine {
 public:
  CudaEngine(const T5Config& config, const WeightSource& weights, int device, const CudaProbe& probe)
      : config_(config), layout_(IA3Layout::make(config)), device_(device), probe_(probe) {
    validate_config();
    TFEW_CUDA_CHECK(cudaSetDevice(device_));
    TFEW_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    try {
      cublas_workspace_.allocate(kCublasWorkspaceBytes, "the cuBLAS workspace");
      load_weights<T>(config_, weights, stream_, weights_);
      gemm_.init(stream_, cublas_workspace_.get(), kCublasWorkspaceBytes);
      // TFEW_CUDA_FUSED_ATTENTION=0 selects the cuBLAS path in bf16 too (for comparisons).
      fused_attention_ = std::is_same<T, __nv_bfloat16>::value && kernels::fused_encoder_attention_supported(config_.d_kv) &&
                         env_flag("TFEW_CUDA_FUSED_ATTENTION", true);
      graphs_enabled_ = env_flag("TFEW_CUDA_GRAPHS", true) && !profiler_.detail();
      if (!graphs_enabled_) graph_note_ = profiler_.detail() ? "off (detail profiling)" : "off (TFEW_CUDA_GRAPHS=0)";
    } catch (...) {
      release_unlocked();
      throw;
    }
  }

  ~CudaEngine() override { release(); }

  const char* device() const override { return "cuda"; }
  const T5Config& config() const override { return config_; }

  std::string describe() const override {
    std::ostringstream os;
    os << "cuda:" << device_ << " " << probe_.device_name << " (cc " << probe_.compute_capability / 10 << "."
       << probe_.compute_capability % 10 << ", " << (probe_.total_memory >> 20) << " MiB), "
       << precision_name() << " weights " << (weights_.storage.size() >> 20) << " MiB, arena "
       << (arena_.size() >> 20) << " MiB, encoder attention " << (fused_attention_ ? "fused" : "cuBLAS")
       << ", cuBLAS " << probe_.cublas_library << ", CUDA graphs "
       << (graphs_enabled_ ? "on" : graph_note_);
    return os.str();
  }

  ScoreOutput score(const Batch& batch, const AdapterSet& adapters, bool want_logits,
                    bool want_encoder_hidden) override {
    std::lock_guard<std::mutex> lock(mutex_);
    check_usable();
    TFEW_CUDA_CHECK(cudaSetDevice(device_));
    try {
      return score_unlocked(batch, adapters, want_logits, want_encoder_hidden);
    } catch (...) {
      after_failure();
      throw;
    }
  }

  LossOutput loss_and_gradients(const Batch&, const AdapterSet&, const LossOptions&) override {
    fail(ErrorCode::Internal, "training on CUDA is not implemented yet: load the model with device 'cpu' to train");
  }

  void merge_adapter(const float* vectors) override {
    std::lock_guard<std::mutex> lock(mutex_);
    check_usable();
    TFEW_CUDA_CHECK(cudaSetDevice(device_));
    try {
      merge_unlocked(vectors);
    } catch (...) {
      after_failure();
      throw;
    }
  }

  void release() override {
    std::lock_guard<std::mutex> lock(mutex_);
    release_unlocked();
  }

 private:
  static const char* precision_name() { return std::is_same<T, float>::value ? "fp32" : "bf16"; }

  void validate_config() const {
    const T5Config& c = config_;
    if (c.d_model <= 0 || c.d_ff <= 0 || c.d_kv <= 0 || c.num_heads <= 0 || c.vocab_size <= 0 ||
        c.num_layers < 0 || c.num_decoder_layers < 0 || c.num_buckets <= 1 || c.max_distance <= 0)
      fail(ErrorCode::InvalidModel, "invalid T5 dimensions for the CUDA backend");
    if (c.d_kv > kernels::kMaxDKv)
      fail(ErrorCode::InvalidModel, "d_kv " + std::to_string(c.d_kv) + " exceeds the CUDA backend's limit of " +
                                        std::to_string(kernels::kMaxDKv));
    const int64_t widest = std::max<int64_t>({3LL * c.inner_dim(), 2LL * c.d_ff, c.vocab_size});
    if (widest > (1LL << 30)) fail(ErrorCode::InvalidModel, "T5 dimensions too large for the CUDA backend");
  }

  void check_usable() const {
    if (released_) fail(ErrorCode::Disposed, "the model has been disposed");
    if (!broken_.empty()) fail(ErrorCode::Cuda, broken_);
  }

  // After an exception: wait for work already queued (so pinned buffers are not reused under a copy) and
  // remember errors that leave the context unusable.
  void after_failure() {
    const cudaError_t e = cudaStreamSynchronize(stream_);
    if (is_sticky_cuda_error(e)) {
      broken_ = std::string("a previous CUDA error left the GPU context unusable (") + cudaGetErrorName(e) +
                "); dispose the model and load it again";
    } else {
      cudaGetLastError();
    }
  }

  // ---- validation and input packing

  void validate(const Batch& b, const AdapterSet& adapters) const {
    const int B = b.batch_size, Le = b.enc_len, R = b.num_rows, Ld = b.dec_len, V = config_.vocab_size;
    TFEW_CHECK_ARG(B >= 1, "batch_size must be at least 1");
    TFEW_CHECK_ARG(Le >= 1, "enc_len must be at least 1");
    TFEW_CHECK_ARG(R >= 0 && Ld >= (R > 0 ? 1 : 0), "num_rows / dec_len out of range");
    TFEW_CHECK_ARG(static_cast<int64_t>(b.input_ids.size()) == static_cast<int64_t>(B) * Le,
                   "input_ids must have batch_size * enc_len entries");
    TFEW_CHECK_ARG(static_cast<int>(b.enc_lengths.size()) == B, "enc_lengths must have batch_size entries");
    TFEW_CHECK_ARG(static_cast<int64_t>(b.choice_ids.size()) == static_cast<int64_t>(R) * Ld,
                   "choice_ids must have num_rows * dec_len entries");
    TFEW_CHECK_ARG(static_cast<int>(b.row_start.size()) == B + 1, "row_start must have batch_size + 1 entries");
    TFEW_CHECK_ARG(b.row_start[0] == 0 && b.row_start[B] == R, "row_start must run from 0 to num_rows");
    for (int i = 0; i < B; ++i) {
      TFEW_CHECK_ARG(b.row_start[i] <= b.row_start[i + 1], "row_start must be non-decreasing");
      TFEW_CHECK_ARG(b.enc_lengths[i] >= 0 && b.enc_lengths[i] <= Le, "enc_lengths out of range");
    }
    TFEW_CHECK_ARG(b.adapter_of_example.empty() || static_cast<int>(b.adapter_of_example.size()) == B,
                   "adapter_of_example must have batch_size entries");
    const int n_adapters = static_cast<int>(adapters.vectors.size());
    for (int a : b.adapter_of_example)
      TFEW_CHECK_ARG(a >= -1 && a < n_adapters, "adapter_of_example refers to an adapter that was not passed");
    for (const float* v : adapters.vectors) TFEW_CHECK_ARG(v != nullptr, "null adapter");
    for (int32_t id : b.input_ids)
      TFEW_CHECK_ARG(id >= 0 && id < V, "input token id " + std::to_string(id) + " is outside the vocabulary");
    for (int32_t id : b.choice_ids)
      TFEW_CHECK_ARG(id >= 0 && id < V, "choice token id " + std::to_string(id) + " is outside the vocabulary");
    TFEW_CHECK_ARG(config_.decoder_start_token_id >= 0 && config_.decoder_start_token_id < V,
                   "decoder_start_token_id outside the vocabulary");
  }

  const std::vector<int32_t>& buckets(int len, bool bidirectional) {
    auto& cache = bidirectional ? enc_bucket_cache_ : dec_bucket_cache_;
    auto it = cache.find(len);
    if (it == cache.end())
      it = cache.emplace(len, relative_bucket_span(len, bidirectional, config_.num_buckets, config_.max_distance)).first;
    return it->second;
  }

  // Writes the input block of `plan` into pinned memory, at the same offsets it has in the arena.
  void pack_inputs(const Batch& b, const Plan<T>& plan) {
    const size_t bytes = plan.inputs_end - plan.inputs_begin;
    staging_in_.reserve(bytes);
    char* host = staging_in_.get();
    const uintptr_t arena = reinterpret_cast<uintptr_t>(arena_.get());
    auto host_ptr = [&](const void* device_ptr) {
      return host + (reinterpret_cast<uintptr_t>(device_ptr) - arena - plan.inputs_begin);
    };
    const int B = b.batch_size, Le = b.enc_len, R = b.num_rows, Ld = b.dec_len, H = config_.num_heads;
    const int64_t inner = config_.inner_dim(), dkv = config_.d_kv;

    // batched attention GEMM operands of (example, head) bh = b * H + h
    auto qk_k = reinterpret_cast<const void**>(host_ptr(plan.qk_k));
    auto qk_q = reinterpret_cast<const void**>(host_ptr(plan.qk_q));
    auto qk_s = reinterpret_cast<void**>(host_ptr(plan.qk_s));
    auto pv_v = reinterpret_cast<const void**>(host_ptr(plan.pv_v));
    auto pv_p = reinterpret_cast<const void**>(host_ptr(plan.pv_p));
    auto pv_c = reinterpret_cast<void**>(host_ptr(plan.pv_c));
    for (int e = 0; e < B && !fused_attention_; ++e) {
      for (int h = 0; h < H; ++h) {
        const size_t bh = static_cast<size_t>(e) * H + h;
        const T* qkv_rows = plan.qkv_enc + static_cast<int64_t>(e) * Le * 3 * inner + h * dkv;
        qk_q[bh] = qkv_rows;
        qk_k[bh] = qkv_rows + inner;
        pv_v[bh] = qkv_rows + 2 * inner;
        qk_s[bh] = plan.scores + bh * Le * Le;
        pv_p[bh] = plan.probs + bh * Le * Le;
        pv_c[bh] = plan.ctx_enc + static_cast<int64_t>(e) * Le * inner + h * dkv;
      }
    }
    std::memcpy(host_ptr(plan.enc_ids), b.input_ids.data(), b.input_ids.size() * sizeof(int32_t));
    std::memcpy(host_ptr(plan.enc_lengths), b.enc_lengths.data(), B * sizeof(int32_t));
    int32_t* dec_ids = reinterpret_cast<int32_t*>(host_ptr(plan.dec_ids));
    for (int r = 0; r < R; ++r) {  // decoder input = [decoder_start, choice[:-1]]
      dec_ids[static_cast<int64_t>(r) * Ld] = config_.decoder_start_token_id;
      for (int i = 1; i < Ld; ++i)
        dec_ids[static_cast<int64_t>(r) * Ld + i] = b.choice_ids[static_cast<int64_t>(r) * Ld + i - 1];
    }
    if (!b.choice_ids.empty())
      std::memcpy(host_ptr(plan.targets), b.choice_ids.data(), b.choice_ids.size() * sizeof(int32_t));
    int32_t* row_example = reinterpret_cast<int32_t*>(host_ptr(plan.row_example));
    for (int e = 0; e < B; ++e)
      for (int r = b.row_start[e]; r < b.row_start[e + 1]; ++r) row_example[r] = e;
    int32_t* adapter_of = reinterpret_cast<int32_t*>(host_ptr(plan.adapter_of_example));
    for (int e = 0; e < B; ++e) adapter_of[e] = b.adapter_of_example.empty() ? -1 : b.adapter_of_example[e];
    const auto& eb = buckets(Le, true);
    std::memcpy(host_ptr(plan.enc_buckets), eb.data(), eb.size() * sizeof(int32_t));
    if (Ld > 0) {
      const auto& db = buckets(Ld, false);
      std::memcpy(host_ptr(plan.dec_buckets), db.data(), db.size() * sizeof(int32_t));
    }
  }

  // ---- memory

  void ensure_arena(size_t bytes) {
    if (bytes <= arena_.size()) return;
    TFEW_CUDA_CHECK(cudaStreamSynchronize(stream_));
    destroy_graphs();  // they point into the old arena
    arena_.reset();
    const size_t granule = 64u << 20;
    arena_.allocate(align_up(bytes + bytes / 8, granule), "the activation arena");
  }

  // Uploads the adapters a call uses, skipping those whose values did not change since the last call.
  void upload_adapters(const AdapterSet& set) {
    const size_t n = set.vectors.size();
    if (n == 0) return;
    const size_t total = static_cast<size_t>(layout_.total);
    if (n > adapter_capacity_) {
      TFEW_CUDA_CHECK(cudaStreamSynchronize(stream_));
      destroy_graphs();  // they hold the old adapter pointer
      adapter_capacity_ = std::max<size_t>(n, 8);
      adapters_dev_.allocate(adapter_capacity_ * total * sizeof(float), "(IA)3 adapters");
      adapter_cache_.assign(adapter_capacity_, std::vector<float>());
    }
    for (size_t i = 0; i < n; ++i) {
      std::vector<float>& cached = adapter_cache_[i];
      const float* v = set.vectors[i];
      if (cached.size() == total && std::memcmp(cached.data(), v, total * sizeof(float)) == 0) continue;
      cached.assign(v, v + total);
      TFEW_CUDA_CHECK(cudaMemcpyAsync(adapters_dev_.get() + i * total * sizeof(float), cached.data(),
                                      total * sizeof(float), cudaMemcpyHostToDevice, stream_));
    }
  }

  // ---- graphs

  void destroy_graphs() {
    for (auto& kv : graphs_) cudaGraphExecDestroy(kv.second);
    graphs_.clear();
  }

  // Runs the forward of `plan`: replays a graph for a shape seen before, captures one on the second call of
  // a shape (the first runs eagerly so cuBLAS and lazily loaded kernels initialise outside capture).
  bool launch_forward(const Plan<T>& plan) {
    if (!graphs_enabled_) {
      enqueue_forward(plan);
      return false;
    }
    auto it = graphs_.find(plan.shape);
    if (it != graphs_.end()) {
      TFEW_CUDA_CHECK(cudaGraphLaunch(it->second, stream_));
      return true;
    }
    if (seen_shapes_[plan.shape]++ == 0) {
      enqueue_forward(plan);
      return false;
    }
    cudaGraphExec_t exec = capture(plan);
    if (!exec) {
      enqueue_forward(plan);
      return false;
    }
    if (graphs_.size() >= kMaxCachedGraphs) destroy_graphs();
    graphs_[plan.shape] = exec;
    TFEW_CUDA_CHECK(cudaGraphLaunch(exec, stream_));
    return true;
  }

  // Returns null (and turns graphs off for this engine) when capture does not work here.
  cudaGraphExec_t capture(const Plan<T>& plan) {
    cudaGraph_t graph = nullptr;
    TFEW_CUDA_CHECK(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
    std::string failure;
    try {
      enqueue_forward(plan);
    } catch (const std::exception& e) {
      failure = e.what();
    }
    cudaError_t e = cudaStreamEndCapture(stream_, &graph);
    if (failure.empty() && (e != cudaSuccess || !graph))
      failure = std::string("cudaStreamEndCapture: ") + cudaGetErrorString(e);
    cudaGraphExec_t exec = nullptr;
    if (failure.empty()) {
      e = cudaGraphInstantiate(&exec, graph, 0);
      if (e != cudaSuccess) {
        failure = std::string("cudaGraphInstantiate: ") + cudaGetErrorString(e);
        exec = nullptr;
      }
    }
    if (graph) cudaGraphDestroy(graph);
    if (!failure.empty()) {
      cudaGetLastError();
      graphs_enabled_ = false;
      graph_note_ = "off (capture failed: " + failure + ")";
      return nullptr;
    }
    return exec;
  }

  // ---- the forward

  kernels::AdapterIndex adapter_index(const Plan<T>& p, bool decoder_rows) const {
    kernels::AdapterIndex ix;
    if (!p.shape.adapters) return ix;
    ix.adapters = reinterpret_cast<const float*>(adapters_dev_.get());
    ix.adapter_stride = layout_.total;
    ix.adapter_of_example = p.adapter_of_example;
    ix.row_example = decoder_rows ? p.row_example : nullptr;
    ix.tokens_per_row = decoder_rows ? p.shape.dec_len : p.shape.enc_len;
    return ix;
  }

  void enqueue_forward(const Plan<T>& p) {
    const T5Config& c = config_;
    cudaStream_t s = stream_;
    const int d = c.d_model, inner = c.inner_dim(), ff = c.d_ff, H = c.num_heads, dkv = c.d_kv,
              V = c.vocab_size;
    const int wi_cols = c.gated_gelu ? 2 * ff : ff;
    const int B = p.shape.batch, Le = p.shape.enc_len, R = p.shape.rows, Ld = p.shape.dec_len;
    const int Ne = B * Le, Nd = R * Ld;
    const float eps = c.layer_norm_eps;
    const kernels::AdapterIndex enc_ix = adapter_index(p, false), dec_ix = adapter_index(p, true);
    Profiler& prof = profiler_;

    // ---- encoder
    {
      Span span(prof, "embedding+bias", s);
      kernels::relative_bias_table(weights_.enc_rel_bias, p.enc_buckets, 2 * Le - 1, H, p.enc_bias, s);
      kernels::embedding_forward<T>(weights_.enc_embed, V, d, p.enc_ids, Ne, p.x_enc, s);
    }
    for (int l = 0; l < c.num_layers; ++l) {
      const EncoderLayerWeights<T>& L = weights_.encoder[l];
      const IA3Layout::EncoderBlock& ia3 = layout_.encoder[l];
      { Span span(prof, "rmsnorm", s); kernels::rmsnorm_forward<T>(p.x_enc, L.ln_attn, Ne, d, eps, 1.f, p.h_enc, s); }
      { Span span(prof, "gemm", s); gemm_.linear<T, T>(p.h_enc, d, L.qkv, d, p.qkv_enc, 3 * inner, Ne, 3 * inner, d, 0.f); }
      if (fused_attention_) {
        Span span(prof, "encoder_attention", s);
        if constexpr (std::is_same<T, __nv_bfloat16>::value)
          kernels::fused_encoder_attention(p.qkv_enc, inner, dkv, B, H, Le, p.enc_bias, p.enc_lengths, enc_ix,
                                           ia3.self_k, ia3.self_v, p.ctx_enc, s);
      } else {
        {
          Span span(prof, "ia3", s);
          kernels::ia3_scale_kv<T>(p.qkv_enc, 3 * inner, inner, 2 * inner, inner, Ne, enc_ix, ia3.self_k, ia3.self_v, s);
        }
        { Span span(prof, "gemm_attention", s); gemm_.attention_scores<T>(p.qk_k, p.qk_q, p.qk_s, 3 * inner, Le, dkv, B * H); }
        { Span span(prof, "softmax", s); kernels::encoder_softmax<T>(p.scores, p.enc_bias, p.enc_lengths, B, H, Le, p.probs, s); }
        {
          Span span(prof, "gemm_attention", s);
          gemm_.attention_context<T>(p.pv_v, p.pv_p, p.pv_c, 3 * inner, inner, Le, dkv, B * H);
        }
      }
      { Span span(prof, "gemm", s); gemm_.linear<T, float>(p.ctx_enc, inner, L.o, inner, p.x_enc, d, Ne, d, inner, 1.f); }
      { Span span(prof, "rmsnorm", s); kernels::rmsnorm_forward<T>(p.x_enc, L.ln_ff, Ne, d, eps, 1.f, p.h_enc, s); }
      { Span span(prof, "gemm", s); gemm_.linear<T, T>(p.h_enc, d, L.wi, d, p.ff_enc, wi_cols, Ne, wi_cols, d, 0.f); }
      {
        Span span(prof, "ffn_act", s);
        kernels::ffn_activation<T>(p.ff_enc, Ne, ff, c.gated_gelu, enc_ix, ia3.ff, p.act_enc, s);
      }
      { Span span(prof, "gemm", s); gemm_.linear<T, float>(p.act_enc, ff, L.wo, ff, p.x_enc, d, Ne, d, ff, 1.f); }
    }
    {
      Span span(prof, "rmsnorm", s);
      kernels::rmsnorm_forward<T>(p.x_enc, weights_.enc_final_ln, Ne, d, eps, 1.f, p.enc_out, s);
      if (p.enc_hidden) kernels::rmsnorm_forward<float>(p.x_enc, weights_.enc_final_ln, Ne, d, eps, 1.f, p.enc_hidden, s);
    }
    if (Nd == 0) return;

    // ---- decoder: all choice rows of the batch together
    {
      Span span(prof, "embedding+bias", s);
      kernels::relative_bias_table(weights_.dec_rel_bias, p.dec_buckets, 2 * Ld - 1, H, p.dec_bias, s);
      kernels::embedding_forward<T>(weights_.dec_embed, V, d, p.dec_ids, Nd, p.x_dec, s);
    }
    // Cross-attention keys/values of every layer, once per example (its choice rows share them): one GEMM.
    const int kv_cols = 2 * inner * c.num_decoder_layers;
    {
      Span span(prof, "gemm", s);
      gemm_.linear<T, T>(p.enc_out, d, weights_.dec_kv_cross, d, p.kv_cross, kv_cols, Ne, kv_cols, d, 0.f);
    }
    for (int l = 0; l < c.num_decoder_layers; ++l) {
      const DecoderLayerWeights<T>& L = weights_.decoder[l];
      const IA3Layout::DecoderBlock& ia3 = layout_.decoder[l];
      // causal self-attention
      { Span span(prof, "rmsnorm", s); kernels::rmsnorm_forward<T>(p.x_dec, L.ln_self, Nd, d, eps, 1.f, p.h_dec, s); }
      { Span span(prof, "gemm", s); gemm_.linear<T, T>(p.h_dec, d, L.qkv, d, p.qkv_dec, 3 * inner, Nd, 3 * inner, d, 0.f); }
      {
        Span span(prof, "decoder_attention", s);
        kernels::decoder_self_attention<T>(p.qkv_dec, 3 * inner, inner, dkv, H, R, Ld, p.dec_bias, p.row_example,
                                           dec_ix, ia3.self_k, ia3.self_v, p.ctx_dec, inner, s);
      }
      { Span span(prof, "gemm", s); gemm_.linear<T, float>(p.ctx_dec, inner, L.o, inner, p.x_dec, d, Nd, d, inner, 1.f); }
      // cross-attention: this layer's slice of the shared keys/values
      { Span span(prof, "rmsnorm", s); kernels::rmsnorm_forward<T>(p.x_dec, L.ln_cross, Nd, d, eps, 1.f, p.h_dec, s); }
      { Span span(prof, "gemm", s); gemm_.linear<T, T>(p.h_dec, d, L.q_cross, d, p.q_cross, inner, Nd, inner, d, 0.f); }
      {
        Span span(prof, "decoder_attention", s);
        kernels::cross_attention<T>(p.q_cross, inner, p.kv_cross + static_cast<int64_t>(l) * 2 * inner, kv_cols, inner,
                                    dkv, H, R, Ld, p.row_example, p.enc_lengths, Le, dec_ix, ia3.cross_k, ia3.cross_v,
                                    p.ctx_dec, inner, s);
      }
      { Span span(prof, "gemm", s); gemm_.linear<T, float>(p.ctx_dec, inner, L.o_cross, inner, p.x_dec, d, Nd, d, inner, 1.f); }
      // feed-forward
      { Span span(prof, "rmsnorm", s); kernels::rmsnorm_forward<T>(p.x_dec, L.ln_ff, Nd, d, eps, 1.f, p.h_dec, s); }
      { Span span(prof, "gemm", s); gemm_.linear<T, T>(p.h_dec, d, L.wi, d, p.ff_dec, wi_cols, Nd, wi_cols, d, 0.f); }
      {
        Span span(prof, "ffn_act", s);
        kernels::ffn_activation<T>(p.ff_dec, Nd, ff, c.gated_gelu, dec_ix, ia3.ff, p.act_dec, s);
      }
      { Span span(prof, "gemm", s); gemm_.linear<T, float>(p.act_dec, ff, L.wo, ff, p.x_dec, d, Nd, d, ff, 1.f); }
    }
    // head: final norm (with the tied-head rescale folded in), logits in fp32, target log-probs
    const float head_scale = c.scale_decoder_outputs ? 1.f / std::sqrt(static_cast<float>(d)) : 1.f;
    {
      Span span(prof, "rmsnorm", s);
      kernels::rmsnorm_forward<T>(p.x_dec, weights_.dec_final_ln, Nd, d, eps, head_scale, p.h_dec, s);
    }
    { Span span(prof, "gemm_head", s); gemm_.linear<T, float>(p.h_dec, d, weights_.lm_head, d, p.logits, V, Nd, V, d, 0.f); }
    {
      Span span(prof, "logprobs", s);
      kernels::token_logprobs(p.logits, Nd, V, p.targets, c.pad_token_id, p.token_logp, s);
    }
  }

  ScoreOutput score_unlocked(const Batch& b, const AdapterSet& adapters, bool want_logits, bool want_hidden) {
    validate(b, adapters);
    Shape shape;
    shape.batch = b.batch_size;
    shape.enc_len = b.enc_len;
    shape.rows = b.num_rows;
    shape.dec_len = b.num_rows > 0 ? b.dec_len : 0;
    shape.want_hidden = want_hidden;
    shape.adapters = std::any_of(b.adapter_of_example.begin(), b.adapter_of_example.end(), [](int a) { return a >= 0; });

    if (shape.adapters) upload_adapters(adapters);
    ensure_arena(make_plan<T>(config_, shape, fused_attention_, 0).bytes);
    const Plan<T> plan = make_plan<T>(config_, shape, fused_attention_, reinterpret_cast<uintptr_t>(arena_.get()));
    pack_inputs(b, plan);

    profiler_.begin_call(stream_);
    TFEW_CUDA_CHECK(cudaMemcpyAsync(arena_.get() + plan.inputs_begin, staging_in_.get(),
                                    plan.inputs_end - plan.inputs_begin, cudaMemcpyHostToDevice, stream_));
    const bool graphed = launch_forward(plan);

    const size_t Nd = static_cast<size_t>(shape.rows) * shape.dec_len;
    const size_t Ne = static_cast<size_t>(shape.batch) * shape.enc_len;
    ScoreOutput out;
    staging_out_.reserve(std::max<size_t>(Nd, 1) * sizeof(float));
    if (Nd > 0)
      TFEW_CUDA_CHECK(cudaMemcpyAsync(staging_out_.get(), plan.token_logp, Nd * sizeof(float),
                                      cudaMemcpyDeviceToHost, stream_));
    profiler_.end_call(stream_);
    if (want_logits && Nd > 0) {
      out.logits.resize(Nd * config_.vocab_size);
      TFEW_CUDA_CHECK(cudaMemcpyAsync(out.logits.data(), plan.logits, out.logits.size() * sizeof(float),
                                      cudaMemcpyDeviceToHost, stream_));
    }
    if (want_hidden) {
      out.encoder_hidden.resize(Ne * config_.d_model);
      TFEW_CUDA_CHECK(cudaMemcpyAsync(out.encoder_hidden.data(), plan.enc_hidden,
                                      out.encoder_hidden.size() * sizeof(float), cudaMemcpyDeviceToHost, stream_));
    }
    TFEW_CUDA_CHECK(cudaStreamSynchronize(stream_));
    out.token_logp.assign(reinterpret_cast<const float*>(staging_out_.get()),
                          reinterpret_cast<const float*>(staging_out_.get()) + Nd);
    profiler_.report(shape, probe_.device_name, precision_name(), graphed);
    return out;
  }

  void merge_unlocked(const float* vectors) {
    TFEW_CHECK_ARG(vectors != nullptr, "merge_adapter: null adapter");
    const int64_t d = config_.d_model, inner = config_.inner_dim(), ff = config_.d_ff;
    DeviceMemory l;
    l.allocate(layout_.total * sizeof(float), "the adapter to merge");
    TFEW_CUDA_CHECK(cudaMemcpyAsync(l.get(), vectors, layout_.total * sizeof(float), cudaMemcpyHostToDevice, stream_));
    const float* v = reinterpret_cast<const float*>(l.get());
    // k/v vectors scale output features (rows of [out, in] weights); ff vectors scale the input of wo (columns).
    for (int i = 0; i < config_.num_layers; ++i) {
      const auto& L = weights_.encoder[i];
      const auto& o = layout_.encoder[i];
      kernels::scale_rows<T>(L.qkv + inner * d, inner, d, v + o.self_k, stream_);
      kernels::scale_rows<T>(L.qkv + 2 * inner * d, inner, d, v + o.self_v, stream_);
      kernels::scale_cols<T>(L.wo, d, ff, v + o.ff, stream_);
    }
    for (int i = 0; i < config_.num_decoder_layers; ++i) {
      const auto& L = weights_.decoder[i];
      const auto& o = layout_.decoder[i];
      kernels::scale_rows<T>(L.qkv + inner * d, inner, d, v + o.self_k, stream_);
      kernels::scale_rows<T>(L.qkv + 2 * inner * d, inner, d, v + o.self_v, stream_);
      kernels::scale_rows<T>(L.kv_cross, inner, d, v + o.cross_k, stream_);
      kernels::scale_rows<T>(L.kv_cross + inner * d, inner, d, v + o.cross_v, stream_);
      kernels::scale_cols<T>(L.wo, d, ff, v + o.ff, stream_);
    }
    TFEW_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }

  void release_unlocked() {
    if (released_) return;
    released_ = true;
    cudaSetDevice(device_);
    if (stream_) cudaStreamSynchronize(stream_);
    destroy_graphs();
    gemm_.destroy();
    arena_.reset();
    adapters_dev_.reset();
    adapter_cache_.clear();
    weights_.storage.reset();
    cublas_workspace_.reset();
    staging_in_.reset();
    staging_out_.reset();
    if (stream_) cudaStreamDestroy(stream_);
    stream_ = nullptr;
    cudaGetLastError();
  }

  const T5Config config_;
  const IA3Layout layout_;
  const int device_;
  const CudaProbe probe_;
  std::mutex mutex_;
  bool released_ = false;
  std::string broken_;

  cudaStream_t stream_ = nullptr;
  DeviceMemory cublas_workspace_;
  Gemm gemm_;
  ModelWeights<T> weights_;
  DeviceMemory arena_;
  PinnedMemory staging_in_, staging_out_;
  DeviceMemory adapters_dev_;
  size_t adapter_capacity_ = 0;
  std::vector<std::vector<float>> adapter_cache_;
  std::map<int, std::vector<int32_t>> enc_bucket_cache_, dec_bucket_cache_;

  bool fused_attention_ = false;
  bool graphs_enabled_ = true;
  std::string graph_note_;
  std::map<Shape, cudaGraphExec_t> graphs_;
  std::map<Shape, int> seen_shapes_;
  Profiler profiler_;
};

}  // namespace
}  // namespace gpu

std::unique_ptr<Engine> make_cuda_engine(const T5Config& config, const WeightSource& weights, int max_batch_hint) {
  (void)max_batch_hint;  // the arena is sized from the first batches instead
  const CudaProbe probe = probe_cuda();
  if (!probe.usable) fail(ErrorCode::DeviceUnavailable, probe.reason);
  int count = 0;
  TFEW_CUDA_CHECK(cudaGetDeviceCount(&count));
  std::string error;
  const int device = gpu::selected_device(count, &error);
  if (device < 0) fail(ErrorCode::DeviceUnavailable, error);
  // TFEW_CUDA_PRECISION=fp32 keeps weights and activations in fp32 (cuBLAS without TF32): a verification
  // mode whose results match the CPU backend closely. The default is bf16 storage with fp32 accumulation.
  const char* precision = std::getenv("TFEW_CUDA_PRECISION");
  const std::string p = precision ? precision : "";
  if (p == "fp32") return std::unique_ptr<Engine>(new gpu::CudaEngine<float>(config, weights, device, probe));
  if (p.empty() || p == "bf16")
    return std::unique_ptr<Engine>(new gpu::CudaEngine<__nv_bfloat16>(config, weights, device, probe));
  fail(ErrorCode::InvalidArgument, "TFEW_CUDA_PRECISION must be bf16 or fp32, not \"" + p + "\"");
}

}  // namespace tfew
