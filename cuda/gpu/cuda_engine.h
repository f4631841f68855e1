// The CUDA engine: the T5 forward for rank classification, and the T-Few training step, on one GPU.
//
// Data path of score(): the host validates the batch and packs every per-call input (token ids, lengths,
// decoder inputs, row -> example and example -> adapter maps, relative-position buckets, the pointer arrays
// of the batched attention GEMMs) into one pinned buffer, copied with one cudaMemcpyAsync into the
// activation arena. The forward then only launches kernels and cuBLAS calls on the engine's stream, reading
// everything shape-independent from device memory — which is what lets a CUDA graph captured for one shape
// be replayed for every batch of that shape. Outputs are copied back once at the end.
//
// Rank classification the fast way: the encoder runs once per example; all rows of the batch are decoded
// together, every choice row reading its example's encoder output (row -> example index, no copies).
// Cross-attention either computes every layer's keys/values of the encoder output once per example
// ("precomputed": one GEMM for all layers), or, when the choices have fewer tokens than that costs, folds W_k
// and W_v into the queries and works in model space ("folded": folded_cross_products; no keys or
// values at all: 9% fewer FLOPs and 1.1 GiB less arena at RANK-3B-B32). Training folds by the same rule
// (train_folded_cross_forward / folded_cross_backward: at TRAIN-3B about 0.9 TFLOP less per step). Mixed-task
// batches need no extra pass: the (IA)3 kernels look up each token's adapter.
//
// Memory: weights in one allocation (gpu/weights.h); activations in one arena planned from the batch shape
// (gpu/engine_plan.h), grown on demand (never in the steady state), with the encoder's and the decoder's
// temporaries sharing the same bytes. release() frees all of it.
//
// One class, three files:
//   cuda_engine.cc    set-up, the Engine entry points, validation and input packing, the arena and the
//                     adapters in device memory, CUDA graphs, score(), merge_adapter(), release()
//   cuda_forward.cc   the inference forward (enqueue_forward)
//   cuda_training.cc  loss_and_gradients(): the training forward that saves activations, the T-Few losses,
//                     and the backward pass to the (IA)3 vectors
//   cuda_session.cc   training sessions: vectors and Adafactor state on the device (kernels/adafactor.cu)
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <functional>
#include <map>
#include <tuple>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

#include "gpu/device_memory.h"
#include "gpu/engine_plan.h"
#include "gpu/gemm.h"
#include "gpu/profiler.h"
#include "gpu/weights.h"
#include "kernels/kernels.cuh"
#include "model/engine.h"

namespace tfew {
namespace gpu {

constexpr size_t kCublasWorkspaceBytes = 32u << 20;  // what cuBLAS recommends on Hopper
constexpr size_t kMaxCachedGraphs = 64;  // per kind (inference, training); the least recently used goes first
constexpr int kMaxGraphMemoryFailures = 3;  // graphs in a row that find no device memory (instantiated or launched): off
constexpr size_t kMaxSeenKeys = 4096;    // keys remembered for "capture on the second call" (then forgotten)
// consecutive_only calls (launch_cached): a key's call after this many calls of it, not in a row, is captured too
constexpr int kCallsBeforeCaptureApart = 2;
const kernels::DropoutSite kNoDropout{};

// Dropout sites, numbered exactly as the CPU backend numbers them (cpu/t5_cpu.cc), so both drop the same
// elements for the same seed.
enum DropSite : uint64_t { kEmbed = 1, kSelfProbs, kSelfOut, kCrossProbs, kCrossOut, kFfHidden, kFfOut, kFinal };
inline uint64_t drop_site_id(int stack, int layer, DropSite s) {
  return (static_cast<uint64_t>(stack) * 4096 + layer) * 16 + s;
}

template <typename T>
class DeviceTrainingSession;

// T: the storage type of weights and GEMM operands, __nv_bfloat16 (default) or float (verification mode).
template <typename T>
class CudaEngine final : public Engine {
 public:
  CudaEngine(const T5Config& config, const WeightSource& weights, int device, const CudaProbe& probe,
             const CudaEngineOptions& options);
  ~CudaEngine() override { release(); }

  const char* device() const override { return "cuda"; }
  const char* precision() const override { return precision_name(); }
  const T5Config& config() const override { return config_; }
  std::string describe() const override;

  ScoreOutput score(const Batch& batch, const AdapterSet& adapters, bool want_logits,
                    bool want_encoder_hidden) override;
  LossOutput loss_and_gradients(const Batch& batch, const AdapterSet& adapters, const LossOptions& options) override;
  void merge_adapter(const float* vectors) override;
  std::shared_ptr<GraphStatsBox> graph_stats() const override { return stats_; }
  // Sizes the arena, the pinned staging buffers and the adapter slots for the largest of `shapes` (every cross-
  // attention path, graph-bucket padding included), so that calls up to them never allocate.
  int64_t reserve(const std::vector<ReserveShape>& shapes) override;
  void release() override;
  // A training session whose vectors, gradients and Adafactor state stay in device memory
  // (gpu/cuda_session.cc): per step only the per-token log-probs (for the losses) and the scalars move.
  std::unique_ptr<TrainingSession> create_training_session(std::vector<std::vector<float>> initial,
                                                           const OptimizerOptions& options) override;
  // The session's step and read, under the engine's lock (called by DeviceTrainingSession).
  TrainStepOutput session_step(DeviceTrainingSession<T>& session, const Batch& b, const LossOptions& loss,
                               int schedule_step);
  std::vector<float> session_read(const DeviceTrainingSession<T>& session, int adapter);

 private:
  static const char* precision_name() { return std::is_same<T, float>::value ? "fp32" : "bf16"; }

  // ---- checks (cuda_engine.cc)
  void validate_config() const;
  void check_usable() const;
  // After an exception: wait for work already queued (so pinned buffers are not reused under a copy) and
  // remember errors that leave the context unusable.
  void after_failure();
  void validate(const Batch& b, const AdapterSet& adapters) const;
  void validate(const Batch& b, int n_adapters) const;

  // ---- per-call inputs, arena, adapters (cuda_engine.cc)
  const std::vector<int32_t>& buckets(int len, bool bidirectional);
  // Writes the input block of `plan` into pinned memory, at the same offsets it has in the arena.
  // pointer_arrays: the plan uses the batched-GEMM encoder attention (not the fused kernel).
  void pack_inputs(const Batch& b, const Plan<T>& plan, bool pointer_arrays, uint64_t dropout_seed = 0);
  // Where device_ptr (inside plan's inputs block) lies in the pinned staging copy of that block.
  char* staged(const Plan<T>& plan, const void* device_ptr);
  // Grows the arena, when it holds less than `needed` bytes (the call's own plan), to wanted() bytes (the plan
  // of arena_shape; computed only then), or to `needed` when that does not fit. A call's growth counts in
  // GraphStats::arena_growths (reserve()'s does not).
  void ensure_arena(size_t needed, const std::function<size_t()>& wanted, bool for_call = true);
  // Room for n adapters in adapters_dev_ (growing it drops every graph: they hold its address; a call's growth
  // counts in GraphStats::arena_growths).
  void ensure_adapter_slots(size_t n, bool for_call);
  // Uploads the adapters a call uses, skipping those whose values did not change since the last call.
  void upload_adapters(const AdapterSet& set);

  // ---- CUDA graphs (cuda_engine.cc)
  // The graphs of one kind, keyed by everything their launch sequence depends on besides device data.
  template <typename Key>
  struct GraphCache {
    struct Entry {
      cudaGraphExec_t exec = nullptr;
      uint64_t last_use = 0;
    };
    std::map<Key, Entry> graphs;
    std::map<Key, int> seen;  // calls per key so far (a graph is captured on a key's second call)
    uint64_t clock = 0;
    bool has_last = false;  // the key of the call before (see launch_cached's consecutive_only)
    Key last{};
    bool same_as_last(const Key& key) const { return has_last && !(key < last) && !(last < key); }
    void destroy() {
      for (auto& kv : graphs) cudaGraphExecDestroy(kv.second.exec);  // in-flight replays still complete
      graphs.clear();
    }
    // Makes room for one more graph by destroying the least recently used.
    void evict_one() {
      auto oldest = graphs.begin();
      for (auto it = graphs.begin(); it != graphs.end(); ++it)
        if (it->second.last_use < oldest->second.last_use) oldest = it;
      if (oldest == graphs.end()) return;
      cudaGraphExecDestroy(oldest->second.exec);
      graphs.erase(oldest);
    }
  };
  void destroy_graphs();
  // Runs the forward of `plan`: replays a graph for a shape seen before, captures one on the second call of
  // a shape (the first runs eagerly so cuBLAS and lazily loaded kernels initialise outside capture).
  enum class Launch { Eager, Capture, Replay };
  static const char* launch_name(Launch l) {
    return l == Launch::Replay ? "replay" : l == Launch::Capture ? "capture" : "eager";
  }
  Launch launch_forward(const Plan<T>& plan, bool launch_bound);
  // Replays the graph cached under `key`, or runs `enqueue` eagerly (the first call of a key, so cuBLAS and
  // lazily loaded kernels initialise outside capture), or captures it (the second call of the key, or with
  // consecutive_only a call right after one of the same key or its third call), and counts the call in stats_.
  // Inference graphs are keyed by shape, training steps by TrainGraphKey.
  // consecutive_only, for calls bound by the GPU rather than by launches (training steps, large batches): a
  // capture leaves the GPU idle while the call is recorded and instantiated, and a replay saves such a call
  // little, so a graph pays when its shape repeats call after call (fixed-length batches) or keeps coming back (a
  // Trainer's random batches of a few-shot set: each padded to its longest input, the same few lengths again
  // and again; a 1,000-step run on an H200 had 220 of its steps eager under "call after call" alone), not for
  // batches of ever different lengths, where every shape seen twice would cost a capture.
  template <typename Key>
  Launch launch_cached(GraphCache<Key>& cache, const Key& key, const std::function<void()>& enqueue,
                       bool consecutive_only);
  // Whether small calls run padded to their bucket: with graphs, and under TFEW_CUDA_DEBUG_SYNC (which turns graphs
  // off), so that a fault on a padded shape reproduces there.
  bool pads_to_buckets() const { return graph_buckets_ && (graphs_enabled_ || debug_sync()); }
  // Whether a larger call runs with its encoder length padded to a multiple of 8 (kEncoderLengthAlignment; masked,
  // as a bucket's padding): cuda.graphBuckets, graphs or not (false: every call at its exact shape).
  bool pads_to_aligned_lengths() const { return graph_buckets_; }
  // The switches GraphStats reports: graphs on, why not, buckets.
  void graph_switches(GraphStats& s) const {
    s.enabled = graphs_enabled_;
    s.off_reason = graphs_enabled_ ? "" : graph_note_;
    s.buckets = pads_to_buckets();
  }
  // Counts a call in stats_ and the shape it ran at.
  void note_launch(const char* kind, const Shape& shape, Launch launch);
  // Returns null when capture does not work here (graphs go off for this engine) or the graph finds no device
  // memory even after make_room() has dropped every cached graph it could (the call runs eagerly;
  // kMaxGraphMemoryFailures in a row turn graphs off).
  cudaGraphExec_t capture(const std::function<void()>& enqueue, const std::function<bool()>& make_room);
  // Launches a cached graph; false (counted in capture_failures) when the launch found no device memory (a graph's
  // first launch uploads it), and the caller drops the graph and runs eagerly. Other errors throw.
  bool launch_graph(cudaGraphExec_t exec);
  size_t cached_graphs() const { return graphs_.graphs.size() + train_graphs_.graphs.size(); }
  // Whether the device has freed room for another graph since graph_memory_limit_ was set (then the limit goes).
  bool graph_room_freed();
  // The device holds `graphs` graphs (at least 1): new shapes beyond them run eagerly until memory frees up.
  void set_graph_memory_limit(size_t graphs);
  // Graphs off for this engine, `note` saying why (GraphStats.off_reason); the cached ones are destroyed.
  void graphs_off(const std::string& note);

  // ---- inference (cuda_forward.cc, score_unlocked in cuda_engine.cc)
  kernels::AdapterIndex adapter_index(const Plan<T>& p, bool decoder_rows) const;
  void enqueue_forward(const Plan<T>& p);
  void enqueue_ffn(float* x, T* h, T* pre, T* act, const float* ln, const T* wi, const T* wo, int n,
                   const kernels::AdapterIndex& ix, int64_t ff_offset, bool few_rows);
  // Whether an inference decoder of n_rows rows runs its linear layers in the few-row kernels (few_row_linears_).
  bool uses_few_row_linears(int n_rows) const;
  // How many examples the inference encoder runs each layer over at once (encoder_chunk_rows_): the batch, or fewer.
  int encoder_chunk_examples(int batch, int enc_len) const;
  void folded_cross_products(const Plan<T>& p, int layer, const kernels::DropoutSite& drop, T* probs,
                             T* probs_dropped, T* context);
  bool folds_cross_attention(const Batch& b) const;
  ScoreOutput score_unlocked(const Batch& b, const AdapterSet& adapters, bool want_logits, bool want_hidden);

  // ---- training (cuda_training.cc)
  LossOutput train_unlocked(const Batch& b, const AdapterSet& adapters, const LossOptions& options);
  // The kernels read the adapters at adapter_source_ (or adapters_dev_).
  // Enqueues a whole training step's forward, losses and backward (no host round trip); returns the device
  // gradients [n_adapters, layout.total], or null when no example uses an adapter. read_train_results() then
  // copies the losses and token log-probs (the step's only synchronisation).
  float* train_to_device(const Batch& b, int n_adapters, const LossOptions& options);
  void read_train_results(LossOutput& out, bool with_token_logp);
  // The forward of the CPU backend's training pass, step for step (dropout sites included), saving each
  // sub-layer's input. The encoder attention runs in the fused kernel (bf16), else as batched GEMMs on a scaled
  // copy of q|k|v.
  void enqueue_train_forward(const TrainPlan<T>& t, const kernels::DropoutSite& drop);
  // A stack's start in the training forward: its relative-position bias table (L positions), the n token
  // embeddings into the fp32 stream x with their dropout, and x's T copy (the first sub-layer's saved input).
  void train_embed(const float* rel_bias, const int32_t* buckets, int L, float* bias, const T* embed,
                   const int32_t* ids, int n, float* x, const kernels::DropoutSite& embed_drop, T* saved);
  // One feed-forward sub-layer of the training forward: from h (its input, normalised) through the saved wi
  // output `pre` to x += dropout(wo(...)) (the fp32 stream, in place), whose T copy goes to x_next_saved and
  // whose next norm (next_ln, next_scale) to next_h (kernels::residual_add_norm).
  void train_ffn_forward(const TrainPlan<T>& t, float* x, const T* h, T* pre, T* act, const T* wi, const T* wo, int n,
                         const kernels::AdapterIndex& ix, int64_t ff_offset, const kernels::DropoutSite& drop_hidden,
                         const kernels::DropoutSite& drop_out, T* x_next_saved, const float* next_ln,
                         float next_scale, T* next_h);
  // One feed-forward sub-layer backward: dy (the residual stream's gradient) gains the sub-layer's input
  // gradient; l_ff's gradient is accumulated into t.grads. Every sub-layer backward starts from t.dout, its
  // output dropout applied to dy and cast to T, which the norm backward before it wrote (`next_out`: the site of
  // the sub-layer after this one in backward order, whose t.dout this one's norm backward writes).
  void ffn_backward(const TrainPlan<T>& t, float* dy, const T* x_in, const float* ln, const T* wi, const T* wo,
                    const T* pre, int n, const kernels::AdapterIndex& ix, int64_t ff_offset, bool decoder,
                    int n_adapters, const kernels::DropoutSite& drop_hidden, const kernels::DropoutSite& next_out);
  // Sums one or two vectors' (IA)3 contributions (second: none, or the v beside a k) into t.grads: one launch.
  void reduce_ia3(const TrainPlan<T>& t, const kernels::Ia3GradSource& first, const kernels::Ia3GradSource& second,
                  int width, bool decoder, int n_adapters);
  void enqueue_backward(const TrainPlan<T>& t, const kernels::DropoutSite& drop, int n_adapters);
  Recompute recompute_for_memory(const Shape& shape, int n_adapters);
  void encoder_attention_backward(const TrainPlan<T>& t, int layer, const kernels::DropoutSite& drop);
  // The folded cross-attention of decoder layer `layer` in training: forward from t.dec_q_cross[layer] to the
  // context in fwd.ctx_dec; backward from t.dctx to the q gradient in t.dqkv (ld inner), the l_k / l_v
  // contributions in t.g_k / t.g_v, and the encoder output's gradient added into t.dx_enc (set when `first`).
  void train_folded_cross_forward(const TrainPlan<T>& t, int layer, const kernels::DropoutSite& drop);
  void folded_cross_backward(const TrainPlan<T>& t, int layer, const kernels::DropoutSite& drop, bool first);
  void pack_backward_pointers(const TrainPlan<T>& t, bool dropout);

  // ---- merge and release (cuda_engine.cc)
  void merge_unlocked(const float* vectors);
  void release_unlocked();

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
  const float* adapter_source_ = nullptr;  // a training session's vectors during its step, else adapters_dev_
  size_t adapter_capacity_ = 0;
  std::vector<std::vector<float>> adapter_cache_;
  std::vector<uint64_t> adapter_cache_key_;  // per slot: the AdapterSet content key last uploaded (0: unknown)
  std::map<int, std::vector<int32_t>> enc_bucket_cache_, dec_bucket_cache_;

  bool fused_attention_ = false;
  // bf16 training runs the encoder attention backward in the fused kernels too (no [B, H, L, L] tensors; the
  // default); cuda.fusedBackward false (TFEW_CUDA_FUSED_BACKWARD=0) takes the cuBLAS backward (for comparisons)
  bool fused_backward_ = false;
  // bf16 inference: the decoder's linear layers at up to kernels::kFewRowsMax rows in our own kernels, each with its
  // norm, activation or (IA)3 scale folded in (kernels/linear_few_rows.cu), instead of cuBLAS and separate passes.
  // cuda.fewRowLinears / TFEW_CUDA_FEW_ROW_LINEARS; off by default (no faster than cuBLAS on an H200, session 18).
  bool few_row_linears_ = false;
  // cuda.programmaticLaunch / TFEW_CUDA_PROGRAMMATIC_LAUNCH (kernels/launch.cuh); off by default (slower on an H200,
  // session 18: the -PDL rows). programmatic_note_: why it is off when it was asked for.
  bool programmatic_launch_ = false;
  std::string programmatic_note_;
  // cuda.attentionOccupancy / TFEW_CUDA_ATTENTION_OCCUPANCY (kernels::set_attention_occupancy): off by default until
  // timed on a GPU; applies to the fused mma.sync kernels at d_kv 64 only.
  bool attention_occupancy_ = false;
  // cuda.encoderChunkRows / TFEW_CUDA_ENCODER_CHUNK_ROWS (0: off; bf16 with the fused attention only).
  int encoder_chunk_rows_ = 0;
  std::string encoder_chunk_note_;  // why it is off when it was asked for
  bool gemm_tuning_wanted_ = false;  // cuda.gemmTuning / TFEW_CUDA_GEMM_TUNING (Gemm::enable_tuning)
  std::string gemm_tuning_text() const;  // for describe()
  enum class CrossMode { Auto, Folded, Precomputed } cross_mode_ = CrossMode::Auto;
  GemmSupport gemm_support_;  // bf16 engines: what cuBLAS said to the probe (fp32 engines need neither)
  bool graphs_enabled_ = true;
  std::string graph_note_;
  int graph_memory_failures_ = 0;  // graphs in a row that found no device memory (at instantiation or first launch)
  // Once a graph found device memory only by evicting others: how many graphs the device holds (0: no limit seen).
  // Beyond it new shapes run eagerly; reserve() clears it (the memory is planned anew), and so does device memory
  // freed since (another model disposed, another process gone): graph_room_freed().
  size_t graph_memory_limit_ = 0;
  size_t free_at_graph_limit_ = 0;  // device memory free just after the limit was set
  size_t graph_bytes_seen_ = 0;     // what the last graph that needed room took of it (cudaMemGetInfo's view)
  // Small rank-classification calls run padded up to graph_bucket_length (cuda.graphBuckets), so that calls of
  // similar lengths replay one graph instead of launching eagerly.
  bool graph_buckets_ = true;
  bool bucket_arena_full_ = false;  // the arena could not grow for a bucket: buckets stay within it
  // The training shapes reserve() planned, with their adapter counts: Recompute::Auto keeps steps within them
  // inside the reserved arena (recompute_for_memory).
  std::vector<ReservedTraining> reserved_training_;
  GraphCache<Shape> graphs_;
  // Everything a captured training step depends on besides device data (the dropout seed, labels and loss
  // weights are device data).
  struct TrainGraphKey {
    Shape shape;
    int n_adapters = 0;
    Recompute recompute = Recompute::None;
    bool dropout = false;
    const float* adapters = nullptr;
    bool operator<(const TrainGraphKey& o) const {
      return std::tie(shape, n_adapters, recompute, dropout, adapters) <
             std::tie(o.shape, o.n_adapters, o.recompute, o.dropout, o.adapters);
    }
  };
  GraphCache<TrainGraphKey> train_graphs_;
  std::shared_ptr<GraphStatsBox> stats_ = std::make_shared<GraphStatsBox>();  // read by the main thread at any time
  TrainPlan<T> train_plan_;  // the last training step's buffers (read_train_results)
  Launch train_launch_ = Launch::Eager;  // ... and how it ran (for the profile)
  Profiler profiler_;
};

}  // namespace gpu
}  // namespace tfew
