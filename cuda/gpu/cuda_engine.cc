// The CUDA engine's set-up and entry points (the class and the data path: gpu/cuda_engine.h): validation and
// input packing, the activation arena and the adapters in device memory, CUDA graphs, score(),
// merge_adapter() and release(). The forward itself is in cuda_forward.cc, training in cuda_training.cc.
#include "gpu/cuda_engine.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <iomanip>
#include <sstream>

#include "core/errors.h"
#include "gpu/cuda_check.h"
#include "model/relative_position.h"

namespace tfew {
namespace gpu {

template <typename T>
CudaEngine<T>::CudaEngine(const T5Config& config, const WeightSource& weights, int device, const CudaProbe& probe,
                          const CudaEngineOptions& options)
    : config_(config), layout_(IA3Layout::make(config)), device_(device), probe_(probe) {
  validate_config();
  TFEW_CUDA_CHECK(cudaSetDevice(device_));
  TFEW_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  try {
    cublas_workspace_.allocate(kCublasWorkspaceBytes, "the cuBLAS workspace");
    load_weights<T>(config_, weights, stream_, weights_);
    gemm_.init(stream_, cublas_workspace_.get(), kCublasWorkspaceBytes, &profiler_);
    kernels::attention_kernel_wmma();  // TFEW_CUDA_ATTENTION_KERNEL: a value that names no kernel is refused at load
    // fused attention off selects the cuBLAS path in bf16 too (for comparisons).
    const bool fused_wanted = options.fused_attention >= 0 ? options.fused_attention == 1
                                                           : env_flag("TFEW_CUDA_FUSED_ATTENTION", true);
    fused_attention_ = std::is_same<T, __nv_bfloat16>::value &&
                       kernels::fused_encoder_attention_supported(config_.d_kv) && fused_wanted;
    // On by default since session 18: on an H200 TRAIN-3B took 37.3 ms with the fused (mma.sync) backward against
    // 38.9 ms with cuBLAS's, the 1,000-step run 37.8 s against 39.9 s, at 0.05 GiB more device memory (7.97 GiB).
    const bool fused_backward_wanted = options.fused_backward >= 0 ? options.fused_backward == 1
                                                                   : env_flag("TFEW_CUDA_FUSED_BACKWARD", true);
    fused_backward_ = fused_attention_ && kernels::fused_encoder_attention_backward_supported(config_.d_kv) &&
                      fused_backward_wanted;
    // Off by default: no faster than cuBLAS on an H200 (session 18: RANK-3B-B1-FEW-ROWS 4.81 vs 4.77 ms).
    const bool few_rows_wanted = options.few_row_linears >= 0 ? options.few_row_linears == 1
                                                              : env_flag("TFEW_CUDA_FEW_ROW_LINEARS", false);
    few_row_linears_ = std::is_same<T, __nv_bfloat16>::value && few_rows_wanted &&
                       kernels::few_rows_norm_supported(config_.d_model);
    // Off by default: on an H200 (session 18) -1.1% at RANK-3B-B32, +4% at RANK-3B-B1, +0.7% at TRAIN-3B (-TUNED rows).
    gemm_tuning_wanted_ = options.gemm_tuning >= 0 ? options.gemm_tuning == 1 : env_flag("TFEW_CUDA_GEMM_TUNING", false);
    gemm_.enable_tuning(gemm_tuning_wanted_);
    // Off by default: slower on an H200 (session 18: RANK-3B-B1 +5.6%, TRAIN-3B +1.7%; the -PDL rows); griddepcontrol
    // needs cc 9.0.
    const bool pdl_wanted = options.programmatic_launch >= 0 ? options.programmatic_launch == 1
                                                             : env_flag("TFEW_CUDA_PROGRAMMATIC_LAUNCH", false);
    if (pdl_wanted) {
      const char* unsupported = probe_.compute_capability < 90 ? "off (it needs compute capability 9.0)"
                                                                : kernels::programmatic_launch_unsupported();
      programmatic_launch_ = unsupported[0] == '\0';
      programmatic_note_ = unsupported;
    }
    kernels::set_programmatic_launch(stream_, programmatic_launch_);
    // Off by default until timed on a GPU (rank-bench's -OCCUPANCY rows): more resident warps against a few spilled
    // registers, for the latency-bound attention kernels.
    const bool occupancy_wanted = options.attention_occupancy >= 0 ? options.attention_occupancy == 1
                                                                   : env_flag("TFEW_CUDA_ATTENTION_OCCUPANCY", false);
    attention_occupancy_ = occupancy_wanted && fused_attention_ && !kernels::attention_kernel_wmma() && config_.d_kv == 64;
    kernels::set_attention_occupancy(stream_, attention_occupancy_);
    // Off by default: slower on an H200 (session 18: RANK-3B-B32 47.8 ms in chunks of 1024 rows, 44.7 of 2048, 43.0 whole).
    encoder_chunk_rows_ = options.encoder_chunk_rows >= 0 ? options.encoder_chunk_rows
                                                          : env_int("TFEW_CUDA_ENCODER_CHUNK_ROWS", 0, 1 << 24, 0);
    if (encoder_chunk_rows_ > 0 && (!std::is_same<T, __nv_bfloat16>::value || !fused_attention_)) {
      encoder_chunk_rows_ = 0;
      encoder_chunk_note_ = ", encoder chunks off (bf16 with the fused encoder attention only)";
    }
    const char* cross_env = std::getenv("TFEW_CUDA_CROSS_ATTENTION");
    const std::string cross = !options.cross_attention.empty() ? options.cross_attention : cross_env ? cross_env : "auto";
    if (cross == "folded") cross_mode_ = CrossMode::Folded;
    else if (cross == "precomputed") cross_mode_ = CrossMode::Precomputed;
    else if (cross != "auto") fail(ErrorCode::InvalidArgument, "cross attention must be 'auto', 'folded' or 'precomputed', got '" + cross + "'");
    if (std::is_same<T, __nv_bfloat16>::value) {
      gemm_support_ = gemm_.probe_bf16_f32(stream_);
      if (!gemm_support_.strided_bf16_f32) cross_mode_ = CrossMode::Precomputed;  // folding needs it
    } else {
      gemm_support_ = GemmSupport{true, true};  // fp32 in, fp32 out: always there
    }
    const bool graphs_wanted = options.graphs >= 0 ? options.graphs == 1 : env_flag("TFEW_CUDA_GRAPHS", true);
    graphs_enabled_ = graphs_wanted && !profiler_.detail() && !debug_sync();
    graph_buckets_ = options.graph_buckets >= 0 ? options.graph_buckets == 1 : env_flag("TFEW_CUDA_GRAPH_BUCKETS", true);
    if (!graphs_enabled_)
      graph_note_ = profiler_.detail() ? "off (detail profiling)"
                    : debug_sync()     ? "off (TFEW_CUDA_DEBUG_SYNC)"
                                       : "off (graphs disabled)";
    stats_->update([&](GraphStats& s) { graph_switches(s); });
  } catch (...) {
    release_unlocked();
    throw;
  }
}

template <typename T>
std::string CudaEngine<T>::gemm_tuning_text() const {
  if (!gemm_tuning_wanted_) return "";
  if (!gemm_.tuning_note().empty()) return ", GEMM tuning " + gemm_.tuning_note();
  const Gemm::TuningStats t = gemm_.tuning_stats();
  std::ostringstream os;
  os << ", GEMM tuning on (" << t.shapes << " shapes timed, " << t.changed << " on a cuBLASLt algorithm";
  if (t.changed > 0) os << " saving " << std::fixed << std::setprecision(3) << t.saved_ms << " ms per call of each";
  os << ")";
  return os.str();
}

template <typename T>
int CudaEngine<T>::encoder_chunk_examples(int batch, int enc_len) const {
  if (encoder_chunk_rows_ <= 0 || enc_len <= 0 || batch <= 0) return batch;
  const int most = std::max(1, std::min(batch, encoder_chunk_rows_ / enc_len));
  // as many chunks as `most` gives, evened out (6 examples at most 4 a chunk: 3 + 3, not 4 + 2): each chunk reads the
  // layer's weights once, so a small last chunk would cost as much as a full one
  const int chunks = (batch + most - 1) / most;
  return (batch + chunks - 1) / chunks;
}

template <typename T>
bool CudaEngine<T>::uses_few_row_linears(int n_rows) const {
  return few_row_linears_ && n_rows > 0 && n_rows <= kernels::kFewRowsMax;
}

template <typename T>
std::string CudaEngine<T>::describe() const {
  std::ostringstream os;
  os << "cuda:" << device_ << " " << probe_.device_name << " (cc " << probe_.compute_capability / 10 << "."
     << probe_.compute_capability % 10 << ", " << (probe_.total_memory >> 20) << " MiB), "
     << precision_name() << " weights " << (weights_.storage.size() >> 20) << " MiB, arena "
     << (arena_.size() >> 20) << " MiB, encoder attention " << (fused_attention_ ? "fused" : "cuBLAS")
     << (fused_attention_ && kernels::attention_kernel_wmma() ? " (WMMA kernel)" : "")
     << (fused_attention_ ? (fused_backward_ ? " (backward fused)" : " (backward cuBLAS)") : "")
     << (attention_occupancy_ ? " (higher-occupancy kernels)" : "")
     << (few_row_linears_ ? ", few-row decoder linears fused" : "")
     << gemm_tuning_text()
     << (encoder_chunk_rows_ > 0 ? ", encoder in chunks of ~" + std::to_string(encoder_chunk_rows_) + " rows"
                                 : encoder_chunk_note_)
     << (programmatic_launch_ ? ", programmatic dependent launch on"
                              : programmatic_note_.empty() ? "" : ", programmatic dependent launch " + programmatic_note_)
     << ", cross-attention "
     << (cross_mode_ == CrossMode::Auto ? "auto" : cross_mode_ == CrossMode::Folded ? "folded" : "precomputed")
     << (gemm_support_.strided_bf16_f32 ? "" : " (this cuBLAS has no strided bf16->fp32 batches)")
     << (gemm_support_.batched_bf16_f32 ? "" : ", no batched bf16->fp32 GEMMs in this cuBLAS: bf16 training and the cuBLAS encoder attention fail")
     << ", cuBLAS " << probe_.cublas_library << ", CUDA graphs "
     << (graphs_enabled_ ? (graph_buckets_ ? "on (small calls padded to shape buckets)" : "on (exact shapes)")
                         : graph_note_)
     << (!graphs_enabled_ && pads_to_buckets() ? ", small calls padded to shape buckets" : "");
  return os.str();
}

template <typename T>
ScoreOutput CudaEngine<T>::score(const Batch& batch, const AdapterSet& adapters, bool want_logits,
                                 bool want_encoder_hidden) {
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

template <typename T>
LossOutput CudaEngine<T>::loss_and_gradients(const Batch& batch, const AdapterSet& adapters, const LossOptions& options) {
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

template <typename T>
void CudaEngine<T>::merge_adapter(const float* vectors) {
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

template <typename T>
void CudaEngine<T>::release() {
  std::lock_guard<std::mutex> lock(mutex_);
  release_unlocked();
}

// ---- checks

template <typename T>
void CudaEngine<T>::validate_config() const {
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

template <typename T>
void CudaEngine<T>::check_usable() const {
  if (released_) fail(ErrorCode::Disposed, "the model has been disposed");
  if (!broken_.empty()) fail(ErrorCode::Cuda, broken_);
}

template <typename T>
void CudaEngine<T>::after_failure() {
  const cudaError_t e = cudaStreamSynchronize(stream_);
  if (is_sticky_cuda_error(e)) {
    broken_ = std::string("a previous CUDA error left the GPU context of this process unusable (") +
              cudaGetErrorName(e) + "): restart the process";
  } else {
    cudaGetLastError();
  }
}

template <typename T>
void CudaEngine<T>::validate(const Batch& b, const AdapterSet& adapters) const {
  for (const float* v : adapters.vectors) TFEW_CHECK_ARG(v != nullptr, "null adapter");
  validate(b, static_cast<int>(adapters.vectors.size()));
}

template <typename T>
void CudaEngine<T>::validate(const Batch& b, int n_adapters) const {
  const int B = b.batch_size, Le = b.enc_len, R = b.num_rows, Ld = b.dec_len, V = config_.vocab_size;
  TFEW_CHECK_ARG(B >= 1, "batch_size must be at least 1");
  TFEW_CHECK_ARG(Le >= 1, "enc_len must be at least 1");
  TFEW_CHECK_ARG(R >= 0 && Ld >= (R > 0 ? 1 : 0), "num_rows / dec_len out of range");
  // GEMM row counts and kernel grids are 32-bit: far above any real batch, checked so that none overflows
  constexpr int64_t kMaxTokens = kMaxCallTokens;  // (model/graph_buckets.h: the padding rules keep within it too)
  TFEW_CHECK_ARG(static_cast<int64_t>(B) * Le <= kMaxTokens && static_cast<int64_t>(R) * Ld <= kMaxTokens,
                 "too many tokens in one call (" + std::to_string(static_cast<int64_t>(B) * Le) + " input, " +
                     std::to_string(static_cast<int64_t>(R) * Ld) + " choice positions; at most " +
                     std::to_string(kMaxTokens) + " each): use a smaller batchSize");
  TFEW_CHECK_ARG(static_cast<int64_t>(b.input_ids.size()) == static_cast<int64_t>(B) * Le,
                 "input_ids must have batch_size * enc_len entries");
  TFEW_CHECK_ARG(static_cast<int>(b.enc_lengths.size()) == B, "enc_lengths must have batch_size entries");
  TFEW_CHECK_ARG(static_cast<int64_t>(b.choice_ids.size()) == static_cast<int64_t>(R) * Ld,
                 "choice_ids must have num_rows * dec_len entries");
  TFEW_CHECK_ARG(static_cast<int>(b.row_start.size()) == B + 1, "row_start must have batch_size + 1 entries");
  TFEW_CHECK_ARG(b.row_start[0] == 0 && b.row_start[B] == R, "row_start must run from 0 to num_rows");
  for (int i = 0; i < B; ++i) {
    // as the CPU backend: every example is scored over at least one choice
    TFEW_CHECK_ARG(b.row_start[i] < b.row_start[i + 1], "every example needs at least one answer choice");
    // as the CPU backend: an input without tokens has no keys to attend to (its softmax is undefined)
    TFEW_CHECK_ARG(b.enc_lengths[i] >= 1 && b.enc_lengths[i] <= Le, "every input needs at least one token");
  }
  TFEW_CHECK_ARG(b.adapter_of_example.empty() || static_cast<int>(b.adapter_of_example.size()) == B,
                 "adapter_of_example must have batch_size entries");
  for (int a : b.adapter_of_example)
    TFEW_CHECK_ARG(a >= -1 && a < n_adapters, "adapter_of_example refers to an adapter that was not passed");
  for (int32_t id : b.input_ids)
    TFEW_CHECK_ARG(id >= 0 && id < V, "input token id " + std::to_string(id) + " is outside the vocabulary");
  for (int32_t id : b.choice_ids)
    TFEW_CHECK_ARG(id >= 0 && id < V, "choice token id " + std::to_string(id) + " is outside the vocabulary");
  TFEW_CHECK_ARG(config_.decoder_start_token_id >= 0 && config_.decoder_start_token_id < V,
                 "decoder_start_token_id outside the vocabulary");
}

// ---- per-call inputs

template <typename T>
const std::vector<int32_t>& CudaEngine<T>::buckets(int len, bool bidirectional) {
  auto& cache = bidirectional ? enc_bucket_cache_ : dec_bucket_cache_;
  auto it = cache.find(len);
  if (it == cache.end())
    it = cache.emplace(len, relative_bucket_span(len, bidirectional, config_.num_buckets, config_.max_distance)).first;
  return it->second;
}

template <typename T>
char* CudaEngine<T>::staged(const Plan<T>& plan, const void* device_ptr) {
  return staging_in_.get() +
         (reinterpret_cast<uintptr_t>(device_ptr) - reinterpret_cast<uintptr_t>(arena_.get()) - plan.inputs_begin);
}

template <typename T>
void CudaEngine<T>::pack_inputs(const Batch& b, const Plan<T>& plan, bool pointer_arrays, uint64_t dropout_seed) {
  staging_in_.reserve(plan.inputs_end - plan.inputs_begin);
  auto host_ptr = [&](const void* device_ptr) { return staged(plan, device_ptr); };
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
  std::memcpy(host_ptr(plan.dropout_seed), &dropout_seed, sizeof(dropout_seed));
  int32_t* labels = reinterpret_cast<int32_t*>(host_ptr(plan.labels));
  for (int e = 0; e < B; ++e) labels[e] = static_cast<int>(b.labels.size()) == B ? b.labels[e] : -1;
  const auto& eb = buckets(Le, true);
  std::memcpy(host_ptr(plan.enc_buckets), eb.data(), eb.size() * sizeof(int32_t));
  if (Ld > 0) {
    const auto& db = buckets(Ld, false);
    std::memcpy(host_ptr(plan.dec_buckets), db.data(), db.size() * sizeof(int32_t));
  }
}

// ---- memory

template <typename T>
void CudaEngine<T>::ensure_arena(size_t needed, const std::function<size_t()>& wanted_bytes, bool for_call) {
  if (needed <= arena_.size()) return;
  const size_t wanted = wanted_bytes();
  TFEW_CUDA_CHECK(cudaStreamSynchronize(stream_));
  destroy_graphs();  // they point into the old arena
  arena_.reset();
  struct Count {  // the arena's size after it all (0 when nothing could be allocated), and one more growth when a
    CudaEngine& e;  // call's allocation succeeded (a call that retries at its exact shape counts once)
    bool for_call;
    ~Count() {
      const int64_t bytes = static_cast<int64_t>(e.arena_.size());
      e.stats_->update([&](GraphStats& s) {
        s.arena_bytes = bytes;
        if (for_call && bytes > 0) ++s.arena_growths;
      });
    }
  } count{*this, for_call};
  if (wanted > needed) {
    try {
      arena_.allocate(align_up(wanted, kArenaGranule), "the activation arena");
      return;
    } catch (const TfewError& e) {
      if (e.code() != ErrorCode::OutOfMemory) throw;
    }
  }
  arena_.allocate(align_up(needed, kArenaGranule), "the activation arena");
}

template <typename T>
int64_t CudaEngine<T>::reserve(const std::vector<ReserveShape>& shapes) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_usable();
  TFEW_CUDA_CHECK(cudaSetDevice(device_));
  for (const ReserveShape& r : shapes) check_reserve_shape(r);
  try {
    size_t arena = 0, inputs = 0, outputs = 0, slots = 0;
    auto need = [&](const Plan<T>& p, size_t arena_bytes) {
      arena = std::max(arena, arena_bytes);
      inputs = std::max(inputs, p.inputs_end - p.inputs_begin);
      outputs = std::max(outputs, static_cast<size_t>(p.shape.rows) * p.shape.dec_len * sizeof(float));
    };
    // a call's cross-attention path: folded or precomputed (decided per call), or only precomputed
    std::vector<bool> folded_paths = {false};
    if (cross_mode_ != CrossMode::Precomputed) folded_paths.push_back(true);
    std::vector<ReservedTraining> training;
    for (const ReserveShape& r : shapes) {
      slots = std::max(slots, static_cast<size_t>(r.n_adapters));
      if (r.training) {
        Shape s;
        s.batch = r.batch;
        s.enc_len = aligned_encoder_length(r.enc_len);  // (lib/batch.ts pads training batches so: TRAINING_LENGTH_MULTIPLE)
        s.rows = r.batch * r.choices;
        s.dec_len = r.dec_len;
        s.adapters = r.n_adapters > 0;
        s.training = true;
        s.dropout = config_.dropout_rate > 0.f;  // (the mask bits: a step without dropout needs less)
        for (const bool folded : folded_paths) {
          s.folded_cross = folded;
          const Recompute level = r.recompute == Recompute::Auto ? recompute_for_memory(s, r.n_adapters) : r.recompute;
          const TrainPlan<T> t = make_train_plan<T>(config_, s, r.n_adapters, level, fused_backward_, 0);
          need(t.fwd, t.bytes);
        }
        s.folded_cross = false;
        training.push_back({s, r.n_adapters});
        continue;
      }
      for (const Shape& c : reserved_call_shapes(config_, r.batch, r.enc_len, r.choices, r.dec_len, r.n_adapters > 0,
                                                 pads_to_buckets(), pads_to_aligned_lengths(), folded_paths)) {
        const Plan<T> p = make_plan<T>(config_, c, fused_attention_, 0);
        need(p, p.bytes);
      }
    }
    // Refused before anything is freed (ensure_arena and the adapter buffer free what they replace first) when it
    // cannot fit: a reservation that fails leaves the model as it was.
    const size_t want = std::max(align_up(arena, kArenaGranule), arena_.size());
    const size_t slot_bytes = static_cast<size_t>(layout_.total) * sizeof(float);
    const size_t adapters_want = slots > adapter_capacity_ ? std::max<size_t>(slots, 8) * slot_bytes : adapters_dev_.size();
    if (want > arena_.size() || adapters_want > adapters_dev_.size()) {
      size_t free_bytes = 0, total_bytes = 0;
      TFEW_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
      const size_t available = free_bytes + arena_.size() + adapters_dev_.size();
      if (want + adapters_want > available)
        fail(ErrorCode::OutOfMemory, "the reserved shapes need " + mib_text(want) + " of activation memory" +
                                         (adapters_want > adapters_dev_.size() ? " and " + mib_text(adapters_want) + " for adapters" : "") +
                                         "; " + mib_text(available) + " of device memory is free for them");
    }
    const size_t held = arena_.size();
    try {
      ensure_arena(arena, [arena] { return arena; }, /*for_call=*/false);
    } catch (const TfewError& e) {
      // (the memory went elsewhere since the check: the arena held before, if that can still be had)
      if (e.code() == ErrorCode::OutOfMemory && held > 0 && arena_.size() == 0) {
        try {
          ensure_arena(held, [held] { return held; }, /*for_call=*/false);
        } catch (const TfewError&) {
        }
      }
      throw;
    }
    staging_in_.reserve(inputs);
    staging_out_.reserve(std::max<size_t>(outputs, sizeof(float)));
    ensure_adapter_slots(slots, /*for_call=*/false);
    graph_memory_limit_ = 0;  // (how many graphs fit is seen again, in the memory as now planned)
    stats_->update([](GraphStats& s) { s.graph_limit = 0; });
    for (const ReservedTraining& t : training) {  // (one already reserved that covers it decides the same)
      const bool covered = std::any_of(reserved_training_.begin(), reserved_training_.end(),
                                       [&](const ReservedTraining& old) { return old.covers(t.shape, t.n_adapters); });
      if (!covered) reserved_training_.push_back(t);
    }
    return static_cast<int64_t>(arena_.size());
  } catch (...) {
    after_failure();
    throw;
  }
}

// (here, not in cuda_training.cc: reserve() uses it too)
template <typename T>
Recompute CudaEngine<T>::recompute_for_memory(const Shape& shape, int n_adapters) {
  return recompute_for_step<T>(config_, shape, n_adapters, fused_backward_, arena_.size(), reserved_training_, [] {
    size_t free_bytes = 0, total_bytes = 0;
    TFEW_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
    return free_bytes;
  });
}

template <typename T>
void CudaEngine<T>::ensure_adapter_slots(size_t n, bool for_call) {
  if (n <= adapter_capacity_) return;
  if (for_call) stats_->update([](GraphStats& s) { ++s.arena_growths; });  // (it drops every graph too)
  const size_t total = static_cast<size_t>(layout_.total);
  TFEW_CUDA_CHECK(cudaStreamSynchronize(stream_));
  destroy_graphs();  // they hold the old adapter pointer
  // Nothing is valid until the new buffer exists: allocate() frees the old one first, and when it fails (out
  // of memory, not sticky) the next call with adapters must try again, not use stale slots or a null buffer.
  const size_t capacity = std::max<size_t>(n, 8);
  adapter_capacity_ = 0;
  adapter_cache_.clear();
  adapter_cache_key_.clear();
  adapters_dev_.allocate(capacity * total * sizeof(float), "(IA)3 adapters");
  adapter_cache_.assign(capacity, std::vector<float>());
  adapter_cache_key_.assign(capacity, 0);
  adapter_capacity_ = capacity;
}

template <typename T>
void CudaEngine<T>::upload_adapters(const AdapterSet& set) {
  const size_t n = set.vectors.size();
  adapter_source_ = nullptr;  // the kernels read adapters_dev_
  if (n == 0) return;
  const size_t total = static_cast<size_t>(layout_.total);
  ensure_adapter_slots(n, /*for_call=*/true);
  for (size_t i = 0; i < n; ++i) {
    // The same snapshot as this slot's last upload: nothing to read (2 MiB per adapter at T0-3B) or copy.
    const uint64_t key = i < set.content_keys.size() ? set.content_keys[i] : 0;
    if (key != 0 && adapter_cache_key_[i] == key) continue;
    adapter_cache_key_[i] = 0;  // (until this slot holds the vector again)
    std::vector<float>& cached = adapter_cache_[i];
    const float* v = set.vectors[i];
    if (cached.size() != total || std::memcmp(cached.data(), v, total * sizeof(float)) != 0) {
      cached.assign(v, v + total);
      try {
        TFEW_CUDA_CHECK(cudaMemcpyAsync(adapters_dev_.get() + i * total * sizeof(float), cached.data(),
                                        total * sizeof(float), cudaMemcpyHostToDevice, stream_));
      } catch (...) {
        cached.clear();  // the device slot does not hold it: compare again next time
        throw;
      }
    }
    adapter_cache_key_[i] = key;
  }
}

// ---- graphs

template <typename T>
void CudaEngine<T>::destroy_graphs() {
  graphs_.destroy();
  train_graphs_.destroy();
  stats_->update([](GraphStats& s) { s.cached = 0; });
}

template <typename T>
typename CudaEngine<T>::Launch CudaEngine<T>::launch_forward(const Plan<T>& plan, bool launch_bound) {
  const Launch launch = launch_cached(graphs_, plan.shape, [&] { enqueue_forward(plan); }, !launch_bound);
  note_launch("score", plan.shape, launch);
  return launch;
}

template <typename T>
void CudaEngine<T>::note_launch(const char* kind, const Shape& shape, Launch launch) {
  const int64_t cached = static_cast<int64_t>(cached_graphs()), limit = static_cast<int64_t>(graph_memory_limit_);
  stats_->update([&](GraphStats& s) {
    (launch == Launch::Replay ? s.replays : launch == Launch::Capture ? s.captures : s.eager) += 1;
    graph_switches(s);  // (a failed capture turns graphs off)
    s.cached = cached;
    s.graph_limit = limit;
    s.last_kind = kind;
    s.last_launch = launch_name(launch);
    s.last_batch = shape.batch;
    s.last_enc_len = shape.enc_len;
    s.last_rows = shape.rows;
    s.last_dec_len = shape.dec_len;
  });
}

template <typename T>
template <typename Key>
typename CudaEngine<T>::Launch CudaEngine<T>::launch_cached(GraphCache<Key>& cache, const Key& key,
                                                             const std::function<void()>& enqueue, bool consecutive_only) {
  if (!graphs_enabled_) {
    enqueue();
    return Launch::Eager;
  }
  const bool after_same = cache.same_as_last(key);
  cache.last = key;
  cache.has_last = true;
  // A graph that cannot launch here (no device memory for it) goes, and the call runs eagerly. The graphs left are
  // what the device holds: the limit (lifted again once memory frees up), so that the shape is not captured again
  // and again only to fail at launch; kMaxGraphMemoryFailures in a row turn graphs off.
  auto drop_and_run = [&](typename std::map<Key, typename GraphCache<Key>::Entry>::iterator at) {
    cudaGraphExecDestroy(at->second.exec);
    cache.graphs.erase(at);
    if (++graph_memory_failures_ >= kMaxGraphMemoryFailures) {
      graphs_off("off (no device memory for graphs: " + std::to_string(kMaxGraphMemoryFailures) +
                 " in a row could not be instantiated or launched)");
    } else {
      set_graph_memory_limit(cached_graphs());
    }
    enqueue();
    return Launch::Eager;
  };
  auto launched = [&](Launch how) {
    graph_memory_failures_ = 0;
    return how;
  };
  auto it = cache.graphs.find(key);
  if (it != cache.graphs.end()) {
    it->second.last_use = ++cache.clock;
    return launch_graph(it->second.exec) ? launched(Launch::Replay) : drop_and_run(it);
  }
  if (cache.seen.size() >= kMaxSeenKeys) cache.seen.clear();  // a long-running service sees many shapes
  const int calls_before = cache.seen[key]++;
  const bool repeated = consecutive_only ? after_same || calls_before >= kCallsBeforeCaptureApart : calls_before > 0;
  // Once the device has shown how many graphs it holds, a shape beyond them runs eagerly: capturing it would evict
  // a graph in use, and shapes taking turns would be captured again and again, slower than launching them.
  const bool room = graph_memory_limit_ == 0 || cached_graphs() < graph_memory_limit_ || (repeated && graph_room_freed());
  if (!repeated || !room) {
    enqueue();
    return Launch::Eager;
  }
  // Room for a graph that finds no device memory: this kind's least recently used graph, then the other kind's.
  auto make_room = [&]() -> bool {
    if (!cache.graphs.empty()) {
      cache.evict_one();
      return true;
    }
    if (cached_graphs() == 0) return false;
    destroy_graphs();
    return true;
  };
  cudaGraphExec_t exec = capture(enqueue, make_room);
  if (!exec) {
    enqueue();
    return Launch::Eager;
  }
  if (cache.graphs.size() >= kMaxCachedGraphs) cache.evict_one();
  it = cache.graphs.emplace(key, typename GraphCache<Key>::Entry{exec, ++cache.clock}).first;
  return launch_graph(exec) ? launched(Launch::Capture) : drop_and_run(it);
}

template <typename T>
void CudaEngine<T>::graphs_off(const std::string& note) {
  graphs_enabled_ = false;
  graph_note_ = note;
  destroy_graphs();  // (their memory back: nothing replays them any more)
}

template <typename T>
void CudaEngine<T>::set_graph_memory_limit(size_t graphs) {
  graph_memory_limit_ = std::max<size_t>(graphs, 1);  // (0 would mean no limit)
  size_t free_bytes = 0, total_bytes = 0;
  if (cudaMemGetInfo(&free_bytes, &total_bytes) != cudaSuccess) cudaGetLastError();
  free_at_graph_limit_ = free_bytes;
}

template <typename T>
bool CudaEngine<T>::graph_room_freed() {
  size_t free_bytes = 0, total_bytes = 0;
  if (cudaMemGetInfo(&free_bytes, &total_bytes) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  constexpr size_t kMinGraphBytes = 2u << 20;  // (cudaMemGetInfo may not see a small graph at all)
  if (free_bytes < free_at_graph_limit_ + std::max(graph_bytes_seen_, kMinGraphBytes)) return false;
  graph_memory_limit_ = 0;  // (should the device still be short, capture() sets a new one)
  return true;
}

template <typename T>
bool CudaEngine<T>::launch_graph(cudaGraphExec_t exec) {
  const cudaError_t e = cudaGraphLaunch(exec, stream_);
  if (e == cudaSuccess) return true;
  if (e != cudaErrorMemoryAllocation) TFEW_CUDA_CHECK(e);
  cudaGetLastError();  // (out of memory is not sticky)
  stats_->update([](GraphStats& s) { ++s.capture_failures; });
  return false;
}

template <typename T>
cudaGraphExec_t CudaEngine<T>::capture(const std::function<void()>& enqueue, const std::function<bool()>& make_room) {
  cudaGraph_t graph = nullptr;
  TFEW_CUDA_CHECK(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
  std::string failure;
  try {
    enqueue();
  } catch (const std::exception& e) {
    failure = e.what();
  }
  cudaError_t e = cudaStreamEndCapture(stream_, &graph);
  if (failure.empty() && (e != cudaSuccess || !graph))
    failure = std::string("cudaStreamEndCapture: ") + cudaGetErrorString(e);
  cudaGraphExec_t exec = nullptr;
  bool out_of_memory = false;
  if (failure.empty()) {
    e = cudaGraphInstantiate(&exec, graph, 0);
    // An executable graph holds device memory, and a reservation may have left none: cached graphs make room, one
    // at a time, and the count that then fits becomes the limit (launch_cached).
    bool evicted = false;
    size_t free_before = 0, free_after = 0, total_bytes = 0;
    while (e == cudaErrorMemoryAllocation && make_room()) {
      cudaGetLastError();
      exec = nullptr;
      evicted = true;
      if (cudaMemGetInfo(&free_before, &total_bytes) != cudaSuccess) cudaGetLastError();
      e = cudaGraphInstantiate(&exec, graph, 0);
    }
    if (e == cudaSuccess && evicted) {
      set_graph_memory_limit(cached_graphs() + 1);  // (this one included)
      free_after = free_at_graph_limit_;
      graph_bytes_seen_ = free_before > free_after ? free_before - free_after : 0;
    }
    if (e != cudaSuccess) {
      out_of_memory = e == cudaErrorMemoryAllocation;
      failure = std::string("cudaGraphInstantiate: ") + cudaGetErrorString(e);
      exec = nullptr;
    }
  }
  if (graph) cudaGraphDestroy(graph);
  if (!failure.empty()) {
    cudaGetLastError();
    if (out_of_memory) stats_->update([](GraphStats& s) { ++s.capture_failures; });
    // Out of memory is a state of the device, not a defect of capture here: the call runs eagerly and graphs stay
    // on, unless it keeps happening (then each capture would only cost the call its time).
    if (out_of_memory && ++graph_memory_failures_ < kMaxGraphMemoryFailures) return nullptr;
    graphs_off(out_of_memory ? "off (no device memory for graphs: " + std::to_string(kMaxGraphMemoryFailures) +
                                   " in a row could not be instantiated or launched: " + failure + ")"
                             : "off (capture failed: " + failure + ")");
    return nullptr;
  }
  return exec;  // (the failure count restarts once it launches)
}

// ---- score, merge, release

// Whether score() folds the cross-attention for this batch. It needs the same number of choice rows in every
// example (its per-example products are one strided batch). Its cost per example and layer against computing
// the keys/values: (tokens x heads) x (2 Le d + 2 d_kv d) against Le x 2 d inner, i.e. a ratio of
// tokens (Le + d_kv) / (Le d_kv). "auto" folds where that ratio is at most 1. Measured on an H200 (session 12,
// T0-3B, 2 choices of 8 tokens): folded 59.4 ms vs precomputed 73.3 ms for 32 examples, 5.9 vs 8.3 ms for one,
// 54.3 vs 68.5 ms for a training step of 8: folding won at every batch size (the earlier rule, folding only
// from 2048 encoder tokens on, was a guess made without a GPU).
template <typename T>
bool CudaEngine<T>::folds_cross_attention(const Batch& b) const {
  if (cross_mode_ == CrossMode::Precomputed || b.num_rows <= 0 || b.num_rows % b.batch_size != 0) return false;
  const int rows_per_example = b.num_rows / b.batch_size;
  for (int e = 0; e < b.batch_size; ++e)
    if (b.row_start[e + 1] - b.row_start[e] != rows_per_example) return false;
  if (cross_mode_ == CrossMode::Folded) return true;
  const double tokens = static_cast<double>(rows_per_example) * b.dec_len, Le = b.enc_len, dkv = config_.d_kv;
  return tokens * (Le + dkv) <= Le * dkv;
}

namespace {
// b padded to a graph bucket's shape (masked as everywhere: the same results for b's rows): longer encoder and
// choice lengths, filler examples up to `batch` (one eos token, one row of one eos token, no adapter), and rows up
// to `rows`, those beyond the fillers' on the last example (scored, then dropped).
Batch padded_batch(const Batch& b, int batch, int enc_len, int rows, int dec_len, int32_t pad_id, int32_t eos_id) {
  Batch p;
  p.batch_size = batch;
  p.enc_len = enc_len;
  p.input_ids.assign(static_cast<size_t>(batch) * enc_len, pad_id);
  for (int e = 0; e < b.batch_size; ++e)
    std::copy_n(b.input_ids.begin() + static_cast<size_t>(e) * b.enc_len, b.enc_len,
                p.input_ids.begin() + static_cast<size_t>(e) * enc_len);
  p.enc_lengths = b.enc_lengths;
  p.adapter_of_example = b.adapter_of_example;
  if (p.adapter_of_example.empty()) p.adapter_of_example.assign(b.batch_size, -1);  // (optional in a Batch)
  p.row_start = b.row_start;
  for (int e = b.batch_size; e < batch; ++e) {
    p.input_ids[static_cast<size_t>(e) * enc_len] = eos_id;
    p.enc_lengths.push_back(1);
    p.adapter_of_example.push_back(-1);
    p.row_start.push_back(p.row_start.back() + 1);
  }
  p.row_start.back() = rows;  // (the last example's extra rows)
  p.num_rows = rows;
  p.dec_len = dec_len;
  p.choice_ids.assign(static_cast<size_t>(rows) * dec_len, pad_id);
  for (int r = 0; r < rows; ++r) {
    if (r < b.num_rows)
      std::copy_n(b.choice_ids.begin() + static_cast<size_t>(r) * b.dec_len, b.dec_len,
                  p.choice_ids.begin() + static_cast<size_t>(r) * dec_len);
    else
      p.choice_ids[static_cast<size_t>(r) * dec_len] = eos_id;
  }
  return p;
}
}  // namespace

template <typename T>
ScoreOutput CudaEngine<T>::score_unlocked(const Batch& call, const AdapterSet& adapters, bool want_logits,
                                          bool want_hidden) {
  validate(call, adapters);
  // A small call (bound by launches, not by the GPU: kGraphBucketMaxFlops) runs at its graph bucket's shape
  // (graph_bucket_length); logits and encoder states, which come back per position, keep the exact shape.
  const BucketedCall p = graph_bucket_call(config_, call.batch_size, call.enc_len, call.num_rows, call.dec_len);
  Batch bucketed;
  const Batch* run = &call;
  // (a larger call: its encoder length aligned to 8 alone, graph_bucket_call's kEncoderLengthAlignment)
  const bool pads = p.padded ? pads_to_buckets() : pads_to_aligned_lengths();
  if (pads && !want_logits && !want_hidden && call.num_rows > 0 &&
      (p.enc_len != call.enc_len || p.dec_len != call.dec_len || p.batch != call.batch_size || p.rows != call.num_rows)) {
    bucketed = padded_batch(call, p.batch, p.enc_len, p.rows, p.dec_len, config_.pad_token_id, config_.eos_token_id);
    run = &bucketed;
  }
  const bool adapters_used =
      std::any_of(call.adapter_of_example.begin(), call.adapter_of_example.end(), [](int a) { return a >= 0; });
  auto shape_of = [&](const Batch& b) {
    Shape s;
    s.batch = b.batch_size;
    s.enc_len = b.enc_len;
    s.rows = b.num_rows;
    s.dec_len = b.num_rows > 0 ? b.dec_len : 0;
    s.want_hidden = want_hidden;
    s.adapters = adapters_used;
    // the cross-attention path of the shape that runs (a bucket's: every call of a bucket takes the same path and
    // replays the same graph; both paths give the same results within rounding)
    s.folded_cross = folds_cross_attention(b);
    return s;
  };
  Shape shape = shape_of(*run);

  if (shape.adapters) upload_adapters(adapters);
  auto arena_for = [&](const Shape& s) {
    ensure_arena(make_plan<T>(config_, s, fused_attention_, 0).bytes,
                 [&] { return make_plan<T>(config_, arena_shape(s), fused_attention_, 0).bytes; });
  };
  // Once the arena could not grow for a bucket, buckets only use the arena there is (growing it again would free
  // it, fail, and shrink it to the exact shape's size on every such call).
  if (run != &call && bucket_arena_full_ && make_plan<T>(config_, shape, fused_attention_, 0).bytes > arena_.size()) {
    run = &call;
    shape = shape_of(call);
  }
  try {
    arena_for(shape);
  } catch (const TfewError& e) {
    if (run == &call || e.code() != ErrorCode::OutOfMemory) throw;
    run = &call;  // the bucket's padding does not fit in the memory left: the exact shape may
    shape = shape_of(call);
    bucket_arena_full_ = true;
    arena_for(shape);
  }
  const Batch& b = *run;
  const Plan<T> plan = make_plan<T>(config_, shape, fused_attention_, reinterpret_cast<uintptr_t>(arena_.get()));
  pack_inputs(b, plan, !fused_attention_);

  profiler_.begin_call(stream_);
  TFEW_CUDA_CHECK(cudaMemcpyAsync(arena_.get() + plan.inputs_begin, staging_in_.get(),
                                  plan.inputs_end - plan.inputs_begin, cudaMemcpyHostToDevice, stream_));
  const Launch launch = launch_forward(plan, /*launch_bound=*/p.padded);

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
  // the caller's [R, dec_len] layout (the bucket's padded positions hold 0)
  const float* logp = reinterpret_cast<const float*>(staging_out_.get());
  out.token_logp.resize(static_cast<size_t>(call.num_rows) * call.dec_len);
  for (int r = 0; r < call.num_rows; ++r)
    std::copy_n(logp + static_cast<size_t>(r) * b.dec_len, call.dec_len,
                out.token_logp.begin() + static_cast<size_t>(r) * call.dec_len);
  profiler_.report("score", shape, probe_.device_name, precision_name(), launch_name(launch));
  return out;
}

template <typename T>
void CudaEngine<T>::merge_unlocked(const float* vectors) {
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

template <typename T>
void CudaEngine<T>::release_unlocked() {
  if (released_) return;
  released_ = true;
  cudaSetDevice(device_);
  if (stream_) cudaStreamSynchronize(stream_);
  destroy_graphs();
  gemm_.destroy();
  arena_.reset();
  adapters_dev_.reset();
  adapter_cache_.clear();
  adapter_cache_key_.clear();
  weights_.storage.reset();
  cublas_workspace_.reset();
  staging_in_.reset();
  staging_out_.reset();
  if (stream_) {
    kernels::set_programmatic_launch(stream_, false);  // (a later stream may get this handle)
    kernels::set_attention_occupancy(stream_, false);
    cudaStreamDestroy(stream_);
  }
  stream_ = nullptr;
  cudaGetLastError();
}

// Members defined in this file (the forward and training are instantiated in their own files).
template class CudaEngine<float>;
template class CudaEngine<__nv_bfloat16>;
// the training step's graphs (cuda_training.cc)
#define TFEW_INSTANTIATE_TRAIN_GRAPHS(T)                                                                       \
  template CudaEngine<T>::Launch CudaEngine<T>::launch_cached<CudaEngine<T>::TrainGraphKey>(                \
      CudaEngine<T>::GraphCache<CudaEngine<T>::TrainGraphKey>&, const CudaEngine<T>::TrainGraphKey&,            \
      const std::function<void()>&, bool);
TFEW_INSTANTIATE_TRAIN_GRAPHS(float)
TFEW_INSTANTIATE_TRAIN_GRAPHS(__nv_bfloat16)
#undef TFEW_INSTANTIATE_TRAIN_GRAPHS

}  // namespace gpu

namespace {
gpu::Shape engine_shape(const CudaArenaShape& a) {
  TFEW_CHECK_ARG(a.batch > 0 && a.enc_len > 0 && a.rows >= 0 && a.dec_len >= 0 && a.n_adapters >= 0,
                 "an arena shape needs batch, enc_len > 0 and rows, dec_len, n_adapters >= 0");
  gpu::Shape s;
  s.batch = a.batch;
  s.enc_len = a.enc_len;
  s.rows = a.rows;
  s.dec_len = a.dec_len;
  s.adapters = a.n_adapters > 0;
  s.training = a.training;
  s.folded_cross = a.folded_cross;
  s.dropout = a.training && a.dropout;
  return s;
}
}  // namespace

Recompute cuda_recompute_choice(const T5Config& config, const CudaArenaShape& a, int64_t have, int64_t free,
                                const std::vector<CudaArenaShape>& reserved) {
  TFEW_CHECK_ARG(a.training && have >= 0 && free >= 0, "a training shape and byte counts >= 0");
  std::vector<gpu::ReservedTraining> planned;
  for (const CudaArenaShape& r : reserved) planned.push_back({engine_shape(r), r.n_adapters});
  return gpu::recompute_for_step<__nv_bfloat16>(config, engine_shape(a), a.n_adapters, a.fused_backward, have, planned,
                                                [free] { return static_cast<size_t>(free); });
}

int64_t cuda_reserve_bytes(const T5Config& config, const ReserveShape& r) {
  check_reserve_shape(r);
  TFEW_CHECK_ARG(!r.training, "cuda_reserve_bytes plans rank classification");
  size_t bytes = 0;
  for (const gpu::Shape& s : gpu::reserved_call_shapes(config, r.batch, r.enc_len, r.choices, r.dec_len, r.n_adapters > 0,
                                                       /*pads=*/true, /*aligns=*/true, {false, true}))
    bytes = std::max(bytes, gpu::make_plan<__nv_bfloat16>(config, s, true, 0).bytes);
  return static_cast<int64_t>(bytes);
}

int64_t cuda_arena_bytes(const T5Config& config, const CudaArenaShape& a) {
  const gpu::Shape s = engine_shape(a);
  if (a.training)
    return gpu::make_train_plan<__nv_bfloat16>(config, s, a.n_adapters, a.recompute, a.fused_backward, 0).bytes;
  return gpu::make_plan<__nv_bfloat16>(config, s, true, 0).bytes;
}

std::unique_ptr<Engine> make_cuda_engine(const T5Config& config, const WeightSource& weights,
                                         const CudaEngineOptions& options) {
  const CudaProbe probe = probe_cuda(options.device);
  if (!probe.usable) fail(ErrorCode::DeviceUnavailable, probe.reason);
  const int device = probe.device_index;
  // fp32 keeps weights and activations in fp32 (cuBLAS without TF32): a verification mode whose results match
  // the CPU backend closely. The default is bf16 storage with fp32 accumulation.
  std::string p = options.precision;
  if (p.empty()) {
    const char* precision = std::getenv("TFEW_CUDA_PRECISION");
    p = precision ? precision : "";
  }
  if (p == "fp32") return std::unique_ptr<Engine>(new gpu::CudaEngine<float>(config, weights, device, probe, options));
  if (p.empty() || p == "bf16")
    return std::unique_ptr<Engine>(new gpu::CudaEngine<__nv_bfloat16>(config, weights, device, probe, options));
  fail(ErrorCode::InvalidArgument, "the CUDA precision must be bf16 or fp32, not \"" + p + "\"");
}

}  // namespace tfew
