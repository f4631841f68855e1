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
#include "model/relative_position.h"
#include "gpu/weights.h"
#include "kernels/kernels.cuh"
#include "cpu/cpu_ops.h"  // tfew_losses: the T-Few losses are defined once, by the CPU backend
#include "model/engine.h"

namespace tfew {
namespace gpu {

namespace {

constexpr size_t kCublasWorkspaceBytes = 32u << 20;  // what cuBLAS recommends on Hopper
constexpr size_t kMaxCachedGraphs = 32;
const kernels::DropoutSite kNoDropout{};

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
  int32_t* row_start = nullptr;  // [B + 1]
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
  p.row_start = pl.place<int32_t>(B + 1);
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

// Training (loss_and_gradients) on top of an inference plan built without the fused attention: what the
// backward pass needs from the forward (the inputs of every sub-layer and the pre-activations, nothing
// recomputable by a cheap kernel) and the backward's own buffers.
template <typename T>
struct TrainPlan {
  Plan<T> fwd;  // inputs, the forward's temporaries (h, the scaled q|k|v copy, scores, ctx, ...), logits
  size_t bytes = 0;
  // saved forward state, per layer
  std::vector<float*> enc_x_attn, enc_x_ff;  // residual stream entering each sub-layer [Ne, d]
  std::vector<T*> enc_qkv, enc_ff_pre;       // unscaled q|k|v [Ne, 3 inner], wi outputs [Ne, wi_cols]
  float* enc_pre_final = nullptr;
  std::vector<float*> dec_x_self, dec_x_cross, dec_x_ff;
  std::vector<T*> dec_qkv, dec_q_cross, dec_ff_pre;
  float* dec_pre_final = nullptr;
  float* sublayer_out = nullptr;  // a sub-layer's output before its (dropped-out) residual add [maxN, d]
  // backward
  float* dlogp = nullptr;      // [Nd] d loss / d token log-prob (from the host)
  T* dlogits = nullptr;        // [Nd, V]
  float* dnormed = nullptr;    // gradient of a norm's output [maxN, d]
  float* dy_dec = nullptr;     // gradient of the decoder residual stream [Nd, d]
  float* dx_enc = nullptr;     // ... of the encoder's [Ne, d]
  T* dout = nullptr;           // a sub-layer output's gradient as GEMM input [maxN, d]
  float* dscaled = nullptr;    // [maxN, d_ff]
  T* d_pre = nullptr;          // [maxN, wi_cols]
  float* g_ff = nullptr;       // per-token l_ff contributions [maxN, d_ff]
  float* dctx = nullptr;       // [maxN, inner]
  T* dqkv = nullptr;           // [maxN, 3 inner]
  float* g_k = nullptr;        // per-token l_k / l_v contributions [maxN, inner]
  float* g_v = nullptr;
  float* stats = nullptr;      // softmax statistics per (query, head) [maxN, H, 3]
  T* dkv_cross = nullptr;      // gradient of every layer's cross k|v [Ne, layers * 2 inner]
  float* grads = nullptr;      // [num_adapters, layout.total]
  float* partial = nullptr;    // per-example sums [B, max(inner, d_ff)]
};

template <typename T>
TrainPlan<T> make_train_plan(const T5Config& c, const Shape& s, int n_adapters, uintptr_t base) {
  TrainPlan<T> t;
  t.fwd = make_plan<T>(c, s, false, base);
  const size_t d = c.d_model, inner = c.inner_dim(), ff = c.d_ff, H = c.num_heads, V = c.vocab_size;
  const size_t wi_cols = c.gated_gelu ? 2 * ff : ff;
  const size_t Ne = static_cast<size_t>(s.batch) * s.enc_len, Nd = static_cast<size_t>(s.rows) * s.dec_len;
  const size_t N = std::max(Ne, Nd);
  const size_t kv_cols = 2 * inner * c.num_decoder_layers;
  Placer pl(base, t.fwd.bytes);
  for (int l = 0; l < c.num_layers; ++l) {
    t.enc_x_attn.push_back(pl.place<float>(Ne * d));
    t.enc_qkv.push_back(pl.place<T>(Ne * 3 * inner));
    t.enc_x_ff.push_back(pl.place<float>(Ne * d));
    t.enc_ff_pre.push_back(pl.place<T>(Ne * wi_cols));
  }
  t.enc_pre_final = pl.place<float>(Ne * d);
  for (int l = 0; l < c.num_decoder_layers; ++l) {
    t.dec_x_self.push_back(pl.place<float>(Nd * d));
    t.dec_qkv.push_back(pl.place<T>(Nd * 3 * inner));
    t.dec_x_cross.push_back(pl.place<float>(Nd * d));
    t.dec_q_cross.push_back(pl.place<T>(Nd * inner));
    t.dec_x_ff.push_back(pl.place<float>(Nd * d));
    t.dec_ff_pre.push_back(pl.place<T>(Nd * wi_cols));
  }
  t.dec_pre_final = pl.place<float>(Nd * d);
  t.sublayer_out = pl.place<float>(N * d);
  t.dlogp = pl.place<float>(Nd);
  t.dlogits = pl.place<T>(Nd * V);
  t.dnormed = pl.place<float>(N * d);
  t.dy_dec = pl.place<float>(Nd * d);
  t.dx_enc = pl.place<float>(Ne * d);
  t.dout = pl.place<T>(N * d);
  t.dscaled = pl.place<float>(N * ff);
  t.d_pre = pl.place<T>(N * wi_cols);
  t.g_ff = pl.place<float>(N * ff);
  t.dctx = pl.place<float>(N * inner);
  t.dqkv = pl.place<T>(N * 3 * inner);
  t.g_k = pl.place<float>(N * inner);
  t.g_v = pl.place<float>(N * inner);
  t.stats = pl.place<float>(N * H * 3);
  t.dkv_cross = pl.place<T>(Ne * kv_cols);
  t.grads = pl.place<float>(static_cast<size_t>(n_adapters) * IA3Layout::make(c).total);
  t.partial = pl.place<float>(static_cast<size_t>(s.batch) * std::max(inner, ff));
  t.bytes = align_up(pl.cursor(), 256);
  return t;
}

// Dropout sites, numbered exactly as the CPU backend numbers them (cpu/t5_cpu.cc), so both drop the same
// elements for the same seed.
enum DropSite : uint64_t { kEmbed = 1, kSelfProbs, kSelfOut, kCrossProbs, kCrossOut, kFfHidden, kFfOut, kFinal };
inline uint64_t drop_site_id(int stack, int layer, DropSite s) {
  return (static_cast<uint64_t>(stack) * 4096 + layer) * 16 + s;
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
      graphs_enabled_ = env_flag("TFEW_CUDA_GRAPHS", true) && !profiler_.detail() && !debug_sync();
      if (!graphs_enabled_)
        graph_note_ = profiler_.detail() ? "off (detail profiling)"
                      : debug_sync()     ? "off (TFEW_CUDA_DEBUG_SYNC)"
                                         : "off (TFEW_CUDA_GRAPHS=0)";
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

  LossOutput loss_and_gradients(const Batch& batch, const AdapterSet& adapters, const LossOptions& options) override {
    std::lock_guard<std::mutex> lock(mutex_);
    check_usable();
    TFEW_CUDA_CHECK(cudaSetDevice(device_));
    try {
      return train_unlocked(batch, adapters, options);
    } catch (...) {
      after_failure();
      throw;
    }
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
  // pointer_arrays: the plan uses the batched-GEMM encoder attention (not the fused kernel).
  void pack_inputs(const Batch& b, const Plan<T>& plan, bool pointer_arrays) {
    const size_t bytes = plan.inputs_end - plan.inputs_begin;
    staging_in_.reserve(bytes);
    char* host = staging_in_.get();
    const uintptr_t arena = reinterpret_cast<uintptr_t>(arena_.get());
    auto host_ptr = [&](const void* device_ptr) {
      return host + (reinterpret_cast<uintptr_t>(device_ptr) - arena - plan.inputs_begin);
    };
    const int B = b.batch_size, Le = b.enc_len, R = b.num_rows, Ld = plan.shape.dec_len, H = config_.num_heads;
    const int64_t inner = config_.inner_dim(), dkv = config_.d_kv;

    // batched attention GEMM operands of (example, head) bh = b * H + h
    auto qk_k = reinterpret_cast<const void**>(host_ptr(plan.qk_k));
    auto qk_q = reinterpret_cast<const void**>(host_ptr(plan.qk_q));
    auto qk_s = reinterpret_cast<void**>(host_ptr(plan.qk_s));
    auto pv_v = reinterpret_cast<const void**>(host_ptr(plan.pv_v));
    auto pv_p = reinterpret_cast<const void**>(host_ptr(plan.pv_p));
    auto pv_c = reinterpret_cast<void**>(host_ptr(plan.pv_c));
    for (int e = 0; e < B && pointer_arrays; ++e) {
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
    std::memcpy(host_ptr(plan.row_start), b.row_start.data(), (B + 1) * sizeof(int32_t));
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
        {
          Span span(prof, "softmax", s);
          kernels::encoder_softmax<T>(p.scores, p.enc_bias, p.enc_lengths, B, H, Le, kNoDropout, p.probs, s);
        }
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
        kernels::ffn_activation<T>(p.ff_enc, Ne, ff, c.gated_gelu, enc_ix, ia3.ff, kNoDropout, p.act_enc, s);
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
                                           dec_ix, ia3.self_k, ia3.self_v, kNoDropout, p.ctx_dec, inner, s);
      }
      { Span span(prof, "gemm", s); gemm_.linear<T, float>(p.ctx_dec, inner, L.o, inner, p.x_dec, d, Nd, d, inner, 1.f); }
      // cross-attention: this layer's slice of the shared keys/values
      { Span span(prof, "rmsnorm", s); kernels::rmsnorm_forward<T>(p.x_dec, L.ln_cross, Nd, d, eps, 1.f, p.h_dec, s); }
      { Span span(prof, "gemm", s); gemm_.linear<T, T>(p.h_dec, d, L.q_cross, d, p.q_cross, inner, Nd, inner, d, 0.f); }
      {
        Span span(prof, "decoder_attention", s);
        kernels::cross_attention<T>(p.q_cross, inner, p.kv_cross + static_cast<int64_t>(l) * 2 * inner, kv_cols, inner,
                                    dkv, H, R, Ld, p.row_example, p.enc_lengths, Le, dec_ix, ia3.cross_k, ia3.cross_v,
                                    kNoDropout, p.ctx_dec, inner, s);
      }
      { Span span(prof, "gemm", s); gemm_.linear<T, float>(p.ctx_dec, inner, L.o_cross, inner, p.x_dec, d, Nd, d, inner, 1.f); }
      // feed-forward
      { Span span(prof, "rmsnorm", s); kernels::rmsnorm_forward<T>(p.x_dec, L.ln_ff, Nd, d, eps, 1.f, p.h_dec, s); }
      { Span span(prof, "gemm", s); gemm_.linear<T, T>(p.h_dec, d, L.wi, d, p.ff_dec, wi_cols, Nd, wi_cols, d, 0.f); }
      {
        Span span(prof, "ffn_act", s);
        kernels::ffn_activation<T>(p.ff_dec, Nd, ff, c.gated_gelu, dec_ix, ia3.ff, kNoDropout, p.act_dec, s);
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
    pack_inputs(b, plan, !fused_attention_);

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

  // ---- training: forward with saved activations, T-Few losses, backward to the (IA)3 vectors

  LossOutput train_unlocked(const Batch& b, const AdapterSet& adapters, const LossOptions& options) {
    validate(b, adapters);
    TFEW_CHECK_ARG(b.num_rows > 0, "training needs answer choices");
    TFEW_CHECK_ARG(static_cast<int>(b.labels.size()) == b.batch_size, "labels are needed, one per example");
    for (int i = 0; i < b.batch_size; ++i) {
      const int n_choices = b.row_start[i + 1] - b.row_start[i];
      TFEW_CHECK_ARG(n_choices > 0, "every example needs at least one answer choice");
      TFEW_CHECK_ARG(b.labels[i] >= 0 && b.labels[i] < n_choices,
                     "label " + std::to_string(b.labels[i]) + " of example " + std::to_string(i) +
                         " is not one of its choices");
      TFEW_CHECK_ARG(b.enc_lengths[i] >= 1, "every input needs at least one token");
    }
    Shape shape;
    shape.batch = b.batch_size;
    shape.enc_len = b.enc_len;
    shape.rows = b.num_rows;
    shape.dec_len = b.dec_len;
    shape.adapters = std::any_of(b.adapter_of_example.begin(), b.adapter_of_example.end(), [](int a) { return a >= 0; });
    const int n_adapters = static_cast<int>(adapters.vectors.size());
    if (shape.adapters) upload_adapters(adapters);
    ensure_arena(make_train_plan<T>(config_, shape, n_adapters, 0).bytes);
    const TrainPlan<T> tp = make_train_plan<T>(config_, shape, n_adapters, reinterpret_cast<uintptr_t>(arena_.get()));
    const Plan<T>& f = tp.fwd;
    pack_inputs(b, f, true);
    TFEW_CUDA_CHECK(cudaMemcpyAsync(arena_.get() + f.inputs_begin, staging_in_.get(), f.inputs_end - f.inputs_begin,
                                    cudaMemcpyHostToDevice, stream_));

    kernels::DropoutSite drop;
    drop.rate = options.dropout ? config_.dropout_rate : 0.f;
    drop.seed = options.dropout ? options.seed : 0;
    enqueue_train_forward(tp, drop);

    const size_t Nd = static_cast<size_t>(shape.rows) * shape.dec_len;
    LossOutput out;
    out.token_logp.resize(Nd);
    TFEW_CUDA_CHECK(cudaMemcpyAsync(out.token_logp.data(), f.token_logp, Nd * sizeof(float), cudaMemcpyDeviceToHost,
                                    stream_));
    TFEW_CUDA_CHECK(cudaStreamSynchronize(stream_));

    // The losses are a few scalars over R * dec_len log-probs: the CPU backend's own function computes them
    // (and d loss / d log-prob), so both backends share one definition.
    cpu::TFewLossInput li{out.token_logp.data(), b.choice_ids.data(), b.num_rows, b.dec_len, config_.pad_token_id,
                          b.row_start.data(), b.labels.data(), b.batch_size, options.lm_weight, options.ul_weight,
                          options.ln_weight};
    cpu::TFewLossOutput lo = cpu::tfew_losses(li);
    out.lm_loss = lo.lm;
    out.ul_loss = lo.ul;
    out.ln_loss = lo.ln;
    out.total_loss = lo.total;
    out.gradients.assign(static_cast<size_t>(n_adapters) * layout_.total, 0.f);
    if (!shape.adapters) return out;  // no example uses an adapter: every gradient is zero

    TFEW_CUDA_CHECK(cudaMemcpyAsync(tp.dlogp, lo.dtoken_logp.data(), Nd * sizeof(float), cudaMemcpyHostToDevice, stream_));
    TFEW_CUDA_CHECK(cudaMemsetAsync(tp.grads, 0, out.gradients.size() * sizeof(float), stream_));
    enqueue_backward(tp, drop, n_adapters);
    TFEW_CUDA_CHECK(cudaMemcpyAsync(out.gradients.data(), tp.grads, out.gradients.size() * sizeof(float),
                                    cudaMemcpyDeviceToHost, stream_));
    TFEW_CUDA_CHECK(cudaStreamSynchronize(stream_));
    return out;
  }

  static kernels::DropoutSite at_site(const kernels::DropoutSite& d, int stack, int layer, DropSite site) {
    kernels::DropoutSite s = d;
    s.site = drop_site_id(stack, layer, site);
    return s;
  }

  // The forward of the CPU backend's training pass, step for step (dropout sites included), saving each
  // sub-layer's input. The encoder attention runs as batched GEMMs on a copy of q|k|v with (IA)3 applied.
  void enqueue_train_forward(const TrainPlan<T>& t, const kernels::DropoutSite& drop) {
    const T5Config& c = config_;
    const Plan<T>& f = t.fwd;
    cudaStream_t s = stream_;
    const int d = c.d_model, inner = c.inner_dim(), ff = c.d_ff, H = c.num_heads, dkv = c.d_kv, V = c.vocab_size;
    const int wi_cols = c.gated_gelu ? 2 * ff : ff;
    const int B = f.shape.batch, Le = f.shape.enc_len, R = f.shape.rows, Ld = f.shape.dec_len;
    const int Ne = B * Le, Nd = R * Ld, Lenc = c.num_layers, Ldec = c.num_decoder_layers;
    const int kv_cols = 2 * inner * Ldec;
    const float eps = c.layer_norm_eps;
    const kernels::AdapterIndex enc_ix = adapter_index(f, false), dec_ix = adapter_index(f, true);

    // encoder
    kernels::relative_bias_table(weights_.enc_rel_bias, f.enc_buckets, 2 * Le - 1, H, f.enc_bias, s);
    float* x0 = Lenc > 0 ? t.enc_x_attn[0] : t.enc_pre_final;
    kernels::embedding_forward<T>(weights_.enc_embed, V, d, f.enc_ids, Ne, x0, s);
    kernels::dropout_inplace<float>(x0, static_cast<int64_t>(Ne) * d, at_site(drop, 0, 0, kEmbed), s);
    for (int l = 0; l < Lenc; ++l) {
      const EncoderLayerWeights<T>& L = weights_.encoder[l];
      const IA3Layout::EncoderBlock& ia3 = layout_.encoder[l];
      kernels::rmsnorm_forward<T>(t.enc_x_attn[l], L.ln_attn, Ne, d, eps, 1.f, f.h_enc, s);
      gemm_.linear<T, T>(f.h_enc, d, L.qkv, d, t.enc_qkv[l], 3 * inner, Ne, 3 * inner, d, 0.f);
      TFEW_CUDA_CHECK(cudaMemcpyAsync(f.qkv_enc, t.enc_qkv[l], sizeof(T) * Ne * 3 * inner, cudaMemcpyDeviceToDevice, s));
      kernels::ia3_scale_kv<T>(f.qkv_enc, 3 * inner, inner, 2 * inner, inner, Ne, enc_ix, ia3.self_k, ia3.self_v, s);
      gemm_.attention_scores<T>(f.qk_k, f.qk_q, f.qk_s, 3 * inner, Le, dkv, B * H);
      kernels::encoder_softmax<T>(f.scores, f.enc_bias, f.enc_lengths, B, H, Le, at_site(drop, 0, l, kSelfProbs),
                                  f.probs, s);
      gemm_.attention_context<T>(f.pv_v, f.pv_p, f.pv_c, 3 * inner, inner, Le, dkv, B * H);
      gemm_.linear<T, float>(f.ctx_enc, inner, L.o, inner, t.sublayer_out, d, Ne, d, inner, 0.f);
      kernels::residual_add(t.enc_x_attn[l], t.sublayer_out, static_cast<int64_t>(Ne) * d,
                            at_site(drop, 0, l, kSelfOut), t.enc_x_ff[l], s);
      kernels::rmsnorm_forward<T>(t.enc_x_ff[l], L.ln_ff, Ne, d, eps, 1.f, f.h_enc, s);
      gemm_.linear<T, T>(f.h_enc, d, L.wi, d, t.enc_ff_pre[l], wi_cols, Ne, wi_cols, d, 0.f);
      kernels::ffn_activation<T>(t.enc_ff_pre[l], Ne, ff, c.gated_gelu, enc_ix, ia3.ff, at_site(drop, 0, l, kFfHidden),
                                 f.act_enc, s);
      gemm_.linear<T, float>(f.act_enc, ff, L.wo, ff, t.sublayer_out, d, Ne, d, ff, 0.f);
      float* next = l + 1 < Lenc ? t.enc_x_attn[l + 1] : t.enc_pre_final;
      kernels::residual_add(t.enc_x_ff[l], t.sublayer_out, static_cast<int64_t>(Ne) * d, at_site(drop, 0, l, kFfOut),
                            next, s);
    }
    kernels::rmsnorm_forward<T>(t.enc_pre_final, weights_.enc_final_ln, Ne, d, eps, 1.f, f.enc_out, s);
    kernels::dropout_inplace<T>(f.enc_out, static_cast<int64_t>(Ne) * d, at_site(drop, 0, 0, kFinal), s);

    // decoder
    gemm_.linear<T, T>(f.enc_out, d, weights_.dec_kv_cross, d, f.kv_cross, kv_cols, Ne, kv_cols, d, 0.f);
    kernels::relative_bias_table(weights_.dec_rel_bias, f.dec_buckets, 2 * Ld - 1, H, f.dec_bias, s);
    float* y0 = Ldec > 0 ? t.dec_x_self[0] : t.dec_pre_final;
    kernels::embedding_forward<T>(weights_.dec_embed, V, d, f.dec_ids, Nd, y0, s);
    kernels::dropout_inplace<float>(y0, static_cast<int64_t>(Nd) * d, at_site(drop, 1, 0, kEmbed), s);
    for (int l = 0; l < Ldec; ++l) {
      const DecoderLayerWeights<T>& L = weights_.decoder[l];
      const IA3Layout::DecoderBlock& ia3 = layout_.decoder[l];
      kernels::rmsnorm_forward<T>(t.dec_x_self[l], L.ln_self, Nd, d, eps, 1.f, f.h_dec, s);
      gemm_.linear<T, T>(f.h_dec, d, L.qkv, d, t.dec_qkv[l], 3 * inner, Nd, 3 * inner, d, 0.f);
      kernels::decoder_self_attention<T>(t.dec_qkv[l], 3 * inner, inner, dkv, H, R, Ld, f.dec_bias, f.row_example,
                                         dec_ix, ia3.self_k, ia3.self_v, at_site(drop, 1, l, kSelfProbs), f.ctx_dec,
                                         inner, s);
      gemm_.linear<T, float>(f.ctx_dec, inner, L.o, inner, t.sublayer_out, d, Nd, d, inner, 0.f);
      kernels::residual_add(t.dec_x_self[l], t.sublayer_out, static_cast<int64_t>(Nd) * d,
                            at_site(drop, 1, l, kSelfOut), t.dec_x_cross[l], s);
      kernels::rmsnorm_forward<T>(t.dec_x_cross[l], L.ln_cross, Nd, d, eps, 1.f, f.h_dec, s);
      gemm_.linear<T, T>(f.h_dec, d, L.q_cross, d, t.dec_q_cross[l], inner, Nd, inner, d, 0.f);
      kernels::cross_attention<T>(t.dec_q_cross[l], inner, f.kv_cross + static_cast<int64_t>(l) * 2 * inner, kv_cols,
                                  inner, dkv, H, R, Ld, f.row_example, f.enc_lengths, Le, dec_ix, ia3.cross_k,
                                  ia3.cross_v, at_site(drop, 1, l, kCrossProbs), f.ctx_dec, inner, s);
      gemm_.linear<T, float>(f.ctx_dec, inner, L.o_cross, inner, t.sublayer_out, d, Nd, d, inner, 0.f);
      kernels::residual_add(t.dec_x_cross[l], t.sublayer_out, static_cast<int64_t>(Nd) * d,
                            at_site(drop, 1, l, kCrossOut), t.dec_x_ff[l], s);
      kernels::rmsnorm_forward<T>(t.dec_x_ff[l], L.ln_ff, Nd, d, eps, 1.f, f.h_dec, s);
      gemm_.linear<T, T>(f.h_dec, d, L.wi, d, t.dec_ff_pre[l], wi_cols, Nd, wi_cols, d, 0.f);
      kernels::ffn_activation<T>(t.dec_ff_pre[l], Nd, ff, c.gated_gelu, dec_ix, ia3.ff, at_site(drop, 1, l, kFfHidden),
                                 f.act_dec, s);
      gemm_.linear<T, float>(f.act_dec, ff, L.wo, ff, t.sublayer_out, d, Nd, d, ff, 0.f);
      float* next = l + 1 < Ldec ? t.dec_x_self[l + 1] : t.dec_pre_final;
      kernels::residual_add(t.dec_x_ff[l], t.sublayer_out, static_cast<int64_t>(Nd) * d, at_site(drop, 1, l, kFfOut),
                            next, s);
    }
    const float head_scale = c.scale_decoder_outputs ? 1.f / std::sqrt(static_cast<float>(d)) : 1.f;
    kernels::rmsnorm_forward<T>(t.dec_pre_final, weights_.dec_final_ln, Nd, d, eps, head_scale, f.h_dec, s);
    kernels::dropout_inplace<T>(f.h_dec, static_cast<int64_t>(Nd) * d, at_site(drop, 1, 0, kFinal), s);
    gemm_.linear<T, float>(f.h_dec, d, weights_.lm_head, d, f.logits, V, Nd, V, d, 0.f);
    kernels::token_logprobs(f.logits, Nd, V, f.targets, c.pad_token_id, f.token_logp, s);
  }

  // One feed-forward sub-layer backward: dy (the residual stream's gradient) gains the sub-layer's input
  // gradient; l_ff's gradient is accumulated into t.grads.
  void ffn_backward(const TrainPlan<T>& t, float* dy, const float* x_in, const float* ln, const T* wi, const T* wo,
                    const T* pre, int n, const kernels::AdapterIndex& ix, int64_t ff_offset, bool decoder,
                    int n_adapters, const kernels::DropoutSite& drop_out, const kernels::DropoutSite& drop_hidden) {
    const T5Config& c = config_;
    const int d = c.d_model, ff = c.d_ff, wi_cols = c.gated_gelu ? 2 * ff : ff;
    kernels::dropout_cast<T>(dy, static_cast<int64_t>(n) * d, drop_out, t.dout, stream_);
    gemm_.linear_backward<T, float>(t.dout, d, wo, ff, t.dscaled, ff, n, d, ff, 1.f, 0.f);
    kernels::ffn_backward<T>(t.dscaled, pre, n, ff, c.gated_gelu, ix, ff_offset, drop_hidden, t.d_pre, t.g_ff, stream_);
    reduce_ia3(t, t.g_ff, ff, decoder, n_adapters, ff_offset);
    gemm_.linear_backward<T, float>(t.d_pre, wi_cols, wi, d, t.dnormed, d, n, wi_cols, d, 1.f, 0.f);
    kernels::rmsnorm_backward(t.dnormed, x_in, ln, n, d, c.layer_norm_eps, true, dy, stream_);
  }

  void reduce_ia3(const TrainPlan<T>& t, const float* g, int width, bool decoder, int n_adapters, int64_t offset) {
    const Plan<T>& f = t.fwd;
    kernels::ia3_grad_reduce(g, width, f.shape.batch, decoder ? f.shape.dec_len : f.shape.enc_len,
                             decoder ? f.row_start : nullptr, f.adapter_of_example, n_adapters, t.partial, t.grads,
                             layout_.total, offset, stream_);
  }

  void enqueue_backward(const TrainPlan<T>& t, const kernels::DropoutSite& drop, int n_adapters) {
    const T5Config& c = config_;
    const Plan<T>& f = t.fwd;
    cudaStream_t s = stream_;
    const int d = c.d_model, inner = c.inner_dim(), H = c.num_heads, dkv = c.d_kv, V = c.vocab_size;
    const int B = f.shape.batch, Le = f.shape.enc_len, R = f.shape.rows, Ld = f.shape.dec_len;
    const int Ne = B * Le, Nd = R * Ld, Lenc = c.num_layers, Ldec = c.num_decoder_layers;
    const int kv_cols = 2 * inner * Ldec;
    const float eps = c.layer_norm_eps;
    const kernels::AdapterIndex enc_ix = adapter_index(f, false), dec_ix = adapter_index(f, true);

    // head and final decoder norm
    kernels::token_logprobs_backward<T>(f.logits, Nd, V, f.targets, c.pad_token_id, t.dlogp, t.dlogits, s);
    const float head_scale = c.scale_decoder_outputs ? 1.f / std::sqrt(static_cast<float>(d)) : 1.f;
    gemm_.linear_backward<T, float>(t.dlogits, V, weights_.lm_head, d, t.dnormed, d, Nd, V, d, head_scale, 0.f);
    kernels::dropout_inplace<float>(t.dnormed, static_cast<int64_t>(Nd) * d, at_site(drop, 1, 0, kFinal), s);
    kernels::rmsnorm_backward(t.dnormed, t.dec_pre_final, weights_.dec_final_ln, Nd, d, eps, false, t.dy_dec, s);

    kernels::AttentionGeometry self_g;
    self_g.kind = kernels::AttentionKind::DecoderSelf;
    self_g.heads = H;
    self_g.d_kv = dkv;
    self_g.n_seq = R;
    self_g.n_examples = B;
    self_g.q_len = Ld;
    self_g.k_len = Ld;
    self_g.bias_table = f.dec_bias;
    self_g.row_example = f.row_example;
    kernels::AttentionGeometry cross_g = self_g;
    cross_g.kind = kernels::AttentionKind::Cross;
    cross_g.k_len = Le;
    cross_g.bias_table = nullptr;
    cross_g.key_lengths = f.enc_lengths;
    cross_g.row_start = f.row_start;

    for (int l = Ldec - 1; l >= 0; --l) {
      const DecoderLayerWeights<T>& L = weights_.decoder[l];
      const IA3Layout::DecoderBlock& ia3 = layout_.decoder[l];
      ffn_backward(t, t.dy_dec, t.dec_x_ff[l], L.ln_ff, L.wi, L.wo, t.dec_ff_pre[l], Nd, dec_ix, ia3.ff, true,
                   n_adapters, at_site(drop, 1, l, kFfOut), at_site(drop, 1, l, kFfHidden));

      // cross-attention: q from this layer, k|v from the encoder output (their gradient is kept per layer
      // and sent into the encoder by one GEMM after the loop)
      kernels::dropout_cast<T>(t.dy_dec, static_cast<int64_t>(Nd) * d, at_site(drop, 1, l, kCrossOut), t.dout, s);
      gemm_.linear_backward<T, float>(t.dout, d, L.o_cross, inner, t.dctx, inner, Nd, d, inner, 1.f, 0.f);
      cross_g.dropout = at_site(drop, 1, l, kCrossProbs);
      const T* kv = f.kv_cross + static_cast<int64_t>(l) * 2 * inner;
      kernels::attention_backward_query<T>(cross_g, t.dec_q_cross[l], inner, kv, kv + inner, kv_cols, t.dctx, dec_ix,
                                           ia3.cross_k, ia3.cross_v, t.dqkv, inner, t.g_k, t.g_v, t.stats, s);
      T* dkv = t.dkv_cross + static_cast<int64_t>(l) * 2 * inner;
      kernels::attention_backward_key<T>(cross_g, t.dec_q_cross[l], inner, kv, kv + inner, kv_cols, t.dctx, dec_ix,
                                         ia3.cross_k, ia3.cross_v, t.stats, dkv, dkv + inner, kv_cols, s);
      reduce_ia3(t, t.g_k, inner, true, n_adapters, ia3.cross_k);
      reduce_ia3(t, t.g_v, inner, true, n_adapters, ia3.cross_v);
      gemm_.linear_backward<T, float>(t.dqkv, inner, L.q_cross, d, t.dnormed, d, Nd, inner, d, 1.f, 0.f);
      kernels::rmsnorm_backward(t.dnormed, t.dec_x_cross[l], L.ln_cross, Nd, d, eps, true, t.dy_dec, s);

      // causal self-attention
      kernels::dropout_cast<T>(t.dy_dec, static_cast<int64_t>(Nd) * d, at_site(drop, 1, l, kSelfOut), t.dout, s);
      gemm_.linear_backward<T, float>(t.dout, d, L.o, inner, t.dctx, inner, Nd, d, inner, 1.f, 0.f);
      self_g.dropout = at_site(drop, 1, l, kSelfProbs);
      const T* qkv = t.dec_qkv[l];
      kernels::attention_backward_query<T>(self_g, qkv, 3 * inner, qkv + inner, qkv + 2 * inner, 3 * inner, t.dctx,
                                           dec_ix, ia3.self_k, ia3.self_v, t.dqkv, 3 * inner, t.g_k, t.g_v, t.stats, s);
      kernels::attention_backward_key<T>(self_g, qkv, 3 * inner, qkv + inner, qkv + 2 * inner, 3 * inner, t.dctx,
                                         dec_ix, ia3.self_k, ia3.self_v, t.stats, t.dqkv + inner, t.dqkv + 2 * inner,
                                         3 * inner, s);
      reduce_ia3(t, t.g_k, inner, true, n_adapters, ia3.self_k);
      reduce_ia3(t, t.g_v, inner, true, n_adapters, ia3.self_v);
      gemm_.linear_backward<T, float>(t.dqkv, 3 * inner, L.qkv, d, t.dnormed, d, Nd, 3 * inner, d, 1.f, 0.f);
      kernels::rmsnorm_backward(t.dnormed, t.dec_x_self[l], L.ln_self, Nd, d, eps, true, t.dy_dec, s);
    }
    // (the decoder embedding is frozen: the decoder's gradient stops here)

    // encoder output: the gradients of every layer's cross k|v, in one GEMM
    if (Ldec > 0) {
      gemm_.linear_backward<T, float>(t.dkv_cross, kv_cols, weights_.dec_kv_cross, d, t.dnormed, d, Ne, kv_cols, d, 1.f,
                                      0.f);
    } else {
      TFEW_CUDA_CHECK(cudaMemsetAsync(t.dnormed, 0, sizeof(float) * Ne * d, s));
    }
    kernels::dropout_inplace<float>(t.dnormed, static_cast<int64_t>(Ne) * d, at_site(drop, 0, 0, kFinal), s);
    kernels::rmsnorm_backward(t.dnormed, t.enc_pre_final, weights_.enc_final_ln, Ne, d, eps, false, t.dx_enc, s);

    kernels::AttentionGeometry enc_g;
    enc_g.kind = kernels::AttentionKind::EncoderSelf;
    enc_g.heads = H;
    enc_g.d_kv = dkv;
    enc_g.n_seq = B;
    enc_g.n_examples = B;
    enc_g.q_len = Le;
    enc_g.k_len = Le;
    enc_g.bias_table = f.enc_bias;
    enc_g.key_lengths = f.enc_lengths;
    enc_g.keys_prescaled = true;  // the training forward's encoder attention scaled K (and V) in a copy
    for (int l = Lenc - 1; l >= 0; --l) {
      const EncoderLayerWeights<T>& L = weights_.encoder[l];
      const IA3Layout::EncoderBlock& ia3 = layout_.encoder[l];
      ffn_backward(t, t.dx_enc, t.enc_x_ff[l], L.ln_ff, L.wi, L.wo, t.enc_ff_pre[l], Ne, enc_ix, ia3.ff, false,
                   n_adapters, at_site(drop, 0, l, kFfOut), at_site(drop, 0, l, kFfHidden));
      kernels::dropout_cast<T>(t.dx_enc, static_cast<int64_t>(Ne) * d, at_site(drop, 0, l, kSelfOut), t.dout, s);
      gemm_.linear_backward<T, float>(t.dout, d, L.o, inner, t.dctx, inner, Ne, d, inner, 1.f, 0.f);
      enc_g.dropout = at_site(drop, 0, l, kSelfProbs);
      const T* qkv = t.enc_qkv[l];
      kernels::attention_backward_query<T>(enc_g, qkv, 3 * inner, qkv + inner, qkv + 2 * inner, 3 * inner, t.dctx,
                                           enc_ix, ia3.self_k, ia3.self_v, t.dqkv, 3 * inner, t.g_k, t.g_v, t.stats, s);
      kernels::attention_backward_key<T>(enc_g, qkv, 3 * inner, qkv + inner, qkv + 2 * inner, 3 * inner, t.dctx,
                                         enc_ix, ia3.self_k, ia3.self_v, t.stats, t.dqkv + inner, t.dqkv + 2 * inner,
                                         3 * inner, s);
      reduce_ia3(t, t.g_k, inner, false, n_adapters, ia3.self_k);
      reduce_ia3(t, t.g_v, inner, false, n_adapters, ia3.self_v);
      gemm_.linear_backward<T, float>(t.dqkv, 3 * inner, L.qkv, d, t.dnormed, d, Ne, 3 * inner, d, 1.f, 0.f);
      kernels::rmsnorm_backward(t.dnormed, t.enc_x_attn[l], L.ln_attn, Ne, d, eps, true, t.dx_enc, s);
    }
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
