// The interface both backends implement. lib/ talks to it through cuda/napi; the CPU backend
// (cuda/cpu) is the readable oracle, the CUDA backend (cuda/gpu + cuda/kernels) the fast one.
#pragma once
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "core/errors.h"
#include "batch.h"
#include "t5_config.h"
#include "training.h"

namespace tfew {

enum class DType { F64, F32, F16, BF16 };

// A tensor as stored in a checkpoint file: raw little-endian bytes, typically inside an mmap'd file. `data` is
// valid only while the WeightSource that returned it lives (engines convert or upload in their constructor).
struct TensorView {
  std::string name;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  const void* data = nullptr;
  int64_t numel() const {
    int64_t n = 1;
    for (auto d : shape) n *= d;
    return n;
  }
};

// Converts n elements starting at element `start` of a TensorView to fp32.
void convert_to_f32(const TensorView& t, int64_t start, int64_t n, float* out);

// Looks weights up by their Hugging Face name. The engine asks for each tensor it needs exactly once and
// converts it straight from the mapped file, so the host never holds a second fp32 copy of the checkpoint.
class WeightSource {
 public:
  virtual ~WeightSource() = default;
  // Throws InvalidModel naming the tensor (and file) when it is missing or has another shape.
  virtual TensorView get(const std::string& name, const std::vector<int64_t>& expected_shape) const = 0;
  virtual bool has(const std::string& name) const = 0;
};

// How the CUDA engine ran its calls: CUDA graphs replayed or captured, or kernels launched one by one (for
// tests, benchmarks and service monitoring). The CPU backend has no graphs: all zero.
struct GraphStats {
  bool enabled = false;  // graphs on
  std::string off_reason;  // when off: why (e.g. "off (capture failed: ...)")
  bool buckets = false;  // small calls padded to shape buckets (cuda.graphBuckets)
  uint64_t replays = 0, captures = 0, eager = 0;  // calls of each kind so far
  uint64_t capture_failures = 0;  // graphs that found no device memory to instantiate or launch (calls ran eagerly)
  int64_t cached = 0;                             // graphs held now
  // Once a graph found device memory only by evicting others: how many graphs fit (new shapes beyond them run
  // eagerly); 0 while no such limit was seen, and after a reservation.
  int64_t graph_limit = 0;
  // the last call: "score" or "train" ("" before any), the shape it ran at (after bucketing), and how
  std::string last_kind, last_launch;
  int last_batch = 0, last_enc_len = 0, last_rows = 0, last_dec_len = 0;
  // The activation arena: its size now, and how often a call had to grow device memory (the arena, or the adapter
  // slots): each time every captured graph is dropped, since graphs point into them. Engine::reserve sizes both
  // once, so calls within stay at 0. (A call that fails for want of memory drops them too, uncounted.)
  int64_t arena_bytes = 0;
  uint64_t arena_growths = 0;
};

// The largest calls a model is to serve or train on (T5Model.load's cuda.reserve, T5Model.reserveMemory):
// Engine::reserve plans the device memory of all of them once, so that no call up to these sizes allocates
// (or drops captured CUDA graphs), and a shape that does not fit fails there rather than in the middle of a
// service or a training run.
struct ReserveShape {
  int batch = 0;    // examples per call
  int enc_len = 0;  // input tokens of the longest example (eos included)
  int choices = 0;  // answer choices of one example (0: encode() only)
  int dec_len = 0;  // tokens of the longest choice (eos included)
  int n_adapters = 1;  // distinct adapters in one call (a training session's: its adapters)
  bool training = false;  // training steps (losses and gradients) rather than rank classification
  Recompute recompute = Recompute::Auto;  // training: as LossOptions.recompute
};
// Throws InvalidArgument for a shape that no call could have (the CPU backend checks, then has nothing to plan).
inline void check_reserve_shape(const ReserveShape& s) {
  constexpr int64_t kMaxTokens = 1 << 24;  // as the CUDA engine's per-call bound
  TFEW_CHECK_ARG(s.batch >= 1 && s.enc_len >= 1, "a reserved shape needs batch and input length >= 1");
  TFEW_CHECK_ARG(s.choices >= 0 && s.dec_len >= (s.choices > 0 ? 1 : 0) && s.n_adapters >= 0 && s.n_adapters <= 65536,
                 "a reserved shape needs choices >= 0, a choice length >= 1 with choices, 0..65536 adapters");
  TFEW_CHECK_ARG(!s.training || s.choices >= 1, "a reserved training shape needs answer choices");
  TFEW_CHECK_ARG(static_cast<int64_t>(s.batch) * s.enc_len <= kMaxTokens &&
                     static_cast<int64_t>(s.batch) * s.choices * s.dec_len <= kMaxTokens,
                 "a reserved shape of more than " + std::to_string(kMaxTokens) + " input or choice tokens");
}

// Where an engine keeps its GraphStats: shared with the JS side, which reads it without waiting for the model
// (a busy service's model is almost never idle) and after the engine is gone.
class GraphStatsBox {
 public:
  GraphStats read() const {
    std::lock_guard<std::mutex> lock(mu_);
    return stats_;
  }
  template <typename Update>
  void update(Update&& f) {
    std::lock_guard<std::mutex> lock(mu_);
    f(stats_);
  }

 private:
  mutable std::mutex mu_;
  GraphStats stats_;
};

class Engine {
 public:
  virtual ~Engine() = default;
  virtual const char* device() const = 0;  // "cpu" or "cuda"
  virtual const char* precision() const = 0;  // of weights and activations: "fp32" or "bf16"
  virtual const T5Config& config() const = 0;
  virtual std::string describe() const = 0;  // one line for logs: device, threads / GPU name

  // Rank-classification forward: per-token log-probs of every choice row.
  virtual ScoreOutput score(const Batch& batch, const AdapterSet& adapters, bool want_logits,
                            bool want_encoder_hidden) = 0;
  // The T-Few losses and their gradients with respect to every adapter used in the batch.
  virtual LossOutput loss_and_gradients(const Batch& batch, const AdapterSet& adapters,
                                        const LossOptions& options) = 0;
  // Folds one adapter into the frozen weights (rows of k/v projections, columns of wo) for single-task
  // serving; afterwards calls without an adapter equal calls with it on the unmerged weights.
  virtual void merge_adapter(const float* vectors) = 0;
  // A training session over copies of `initial` adapters. The default keeps vectors and optimizer state on
  // the host and takes gradients from loss_and_gradients; a backend may override it (state on the device).
  virtual std::unique_ptr<TrainingSession> create_training_session(std::vector<std::vector<float>> initial,
                                                                   const OptimizerOptions& options) {
    return make_host_training_session(config(), std::move(initial), options);
  }
  // The engine's graph counts (null: no graphs, as on the CPU backend).
  virtual std::shared_ptr<GraphStatsBox> graph_stats() const { return nullptr; }
  // Plans and allocates the memory that calls up to these shapes need (ReserveShape); returns the bytes of
  // activation memory now held. The CPU backend allocates per call: it only checks the shapes.
  virtual int64_t reserve(const std::vector<ReserveShape>& shapes) {
    for (const ReserveShape& s : shapes) check_reserve_shape(s);
    return 0;
  }
  // Frees all memory the engine holds (device memory included). Safe to call twice.
  virtual void release() = 0;
};

std::unique_ptr<Engine> make_cpu_engine(const T5Config& config, const WeightSource& weights, int threads);

// Set when the addon was compiled with the CUDA backend (TFEW_WITH_CUDA). probe_cuda() never throws: it
// says whether a GPU, a driver and cuBLAS can be used here, and why not.
struct CudaProbe {
  bool compiled = false;
  bool usable = false;
  std::string reason;       // why not usable, or "" when usable
  int device_count = 0;     // GPUs visible (0 when the driver or runtime failed)
  int device_index = -1;    // the GPU probed (-1 when none could be chosen)
  std::string device_name;  // e.g. "NVIDIA H200"
  int compute_capability = 0;
  int64_t total_memory = 0;
  std::string cublas_library;
};
// device: an index among the visible GPUs; -1 picks $TFEW_CUDA_DEVICE, else 0.
CudaProbe probe_cuda(int device = -1);
// cudaMemGetInfo on a GPU (bytes; device as probe_cuda's); ok false without a usable CUDA backend. For tests and
// benchmarks: what dispose() gives back, peak device memory.
struct CudaMemoryInfo {
  bool ok = false;
  int64_t free_bytes = 0, total_bytes = 0;
};
CudaMemoryInfo cuda_memory_info(int device = -1);
// How a CUDA engine runs. Each switch comes from the load options (T5Model.load's `cuda`), else from its
// environment variable (TFEW_CUDA_PRECISION, TFEW_CUDA_FUSED_ATTENTION, TFEW_CUDA_GRAPHS), else the default.
struct CudaEngineOptions {
  int device = -1;          // which GPU, an index among the visible ones; -1: $TFEW_CUDA_DEVICE, else 0
  std::string precision;    // "bf16" (default): bf16 storage, fp32 accumulation; "fp32": the verification mode
  int fused_attention = -1; // -1 default (on where supported), 0 off (cuBLAS encoder attention), 1 on
  int fused_backward = -1;  // bf16 training: -1 default (fused where supported: faster on an H200), 0 cuBLAS, 1 fused
  // bf16 inference: the decoder's linear layers at a few rows (up to 32: one example's choices) in the few-row kernels
  // with their norm, activation and (IA)3 scales folded in: -1 default (off until timed on a GPU), 0 off, 1 on where
  // supported (d_model 512, 1024 or 2048)
  int few_row_linears = -1;
  // GEMM tuning: -1 default (off until timed on a GPU), 0 off, 1 on: each linear layer's GEMM shape is timed on its
  // first call (cublasGemmEx against cuBLASLt's heuristic candidates) and runs on the fastest (gpu/gemm.h)
  int gemm_tuning = -1;
  // Programmatic dependent launch (kernels/launch.cuh): each of our kernels may be scheduled while the kernel before
  // it finishes (the launch gaps of latency-bound calls): -1 default (off until timed on a GPU), 0 off, 1 on where
  // the GPU has it (compute capability 9.0 and up)
  int programmatic_launch = -1;
  // bf16 with the fused encoder attention at d_kv 64: its mma.sync kernels' instances compiled for one more block per
  // SM (kernels/attention_fused.cu, OccupancyBlocks): -1 default (off until timed on a GPU), 0 off, 1 on
  int attention_occupancy = -1;
  // bf16 inference with the fused encoder attention: run the encoder chunk by chunk (each through every layer), whole
  // examples of about this many rows (q|k|v, context and FFN temporaries then stay in L2): -1 default
  // ($TFEW_CUDA_ENCODER_CHUNK_ROWS, else 0), 0 off (every layer over the whole batch)
  int encoder_chunk_rows = -1;
  int graphs = -1;          // -1 default (on), 0 off, 1 on (still off under TFEW_CUDA_DEBUG_SYNC)
  // small rank-classification calls padded to shape buckets so that similar lengths share a graph:
  // -1 default (on), 0 off (every call at its exact shape), 1 on
  int graph_buckets = -1;
  // the decoder's cross-attention: "auto" (default: folded where it saves work), "folded" (wherever it
  // applies), "precomputed" (every layer's encoder keys/values, always)
  std::string cross_attention;
};
std::unique_ptr<Engine> make_cuda_engine(const T5Config& config, const WeightSource& weights,
                                         const CudaEngineOptions& options);
// The activation arena a bf16 CUDA engine allocates for calls of one shape (bytes, from its planner
// gpu/engine_plan.h; inference with the fused encoder attention). Needs no GPU, only the CUDA build
// (DeviceUnavailable without it). For tests and memory planning: the weights come on top.
struct CudaArenaShape {
  int batch = 0, enc_len = 0, rows = 0, dec_len = 0;
  bool training = false;
  // training: the encoder attention backward in the fused kernels (its dropout keep bits, no [B, H, L, L]
  // buffers; the engine's default) or through cuBLAS (the [B, H, L, L] buffers). (false here: the planner tests
  // name the fused plan where they want it)
  bool fused_backward = false;
  int n_adapters = 1;
  Recompute recompute = Recompute::None;
  bool folded_cross = false;  // the folded cross-attention (no encoder keys/values)
  bool dropout = true;        // training with dropout at config.dropout_rate (T-Few's): the mask bits planned
};
int64_t cuda_arena_bytes(const T5Config& config, const CudaArenaShape& shape);
// The activation arena a bf16 CUDA engine (fused attention, graph buckets on, either cross-attention path) reserves
// for rank classification up to `shape` (Engine::reserve; not training). For tests of the reservation's promise.
int64_t cuda_reserve_bytes(const T5Config& config, const ReserveShape& shape);
// Recompute::Auto's choice for a training step of this shape, with `have` bytes of arena already held and
// `free` bytes of device memory free besides, and the training shapes reserved (Engine::reserve) before.
Recompute cuda_recompute_choice(const T5Config& config, const CudaArenaShape& shape, int64_t have, int64_t free,
                                const std::vector<CudaArenaShape>& reserved = {});

}  // namespace tfew
