// The N-API addon: module functions (version, buildInfo, probeCuda, loadModel) and the NativeModel class.
// Every long call runs in a Napi::AsyncWorker (never on the event loop) and settles a promise; engine errors
// (tfew::TfewError) become rejections whose Error carries `code`. Methods never throw: bad arguments reject too.
// Calls on one model are serialised by its mutex, so concurrent calls from JS are safe (lib/model.ts also queues
// them, so waiting calls do not hold libuv threads); dispose() waits for a running call and frees the engine.
// Nothing on the main thread waits for that mutex.
#include <napi.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "core/errors.h"
#include "core/thread_pool.h"
#include "cpu/cpu_ops.h"
#include "cpu/scratch.h"
#include "io/mapped_file.h"
#include "model/engine.h"
#include "model/graph_buckets.h"
#include "model/relative_position.h"
#ifdef TFEW_WITH_CUDA
namespace tfew {
namespace kernels {
void set_norm_warps_per_row(int warps);  // kernels/rmsnorm.cu (tests: every form of the norms)
}  // namespace kernels
}  // namespace tfew
#endif
#ifdef TFEW_CUDA_EMULATION
#include "emu/emu_selftest.h"
namespace tfew {
namespace gpu {
void set_gemm_tuning_prefers_cublaslt(bool on);  // gpu/gemm.h (tests on the emulator)
}  // namespace gpu
}  // namespace tfew
#endif

namespace tfew {
namespace napi {

// ---------- conversions JS -> native (run on the main thread, before a worker starts) ----------
// Everything the engine reads is copied out of JS values here: a worker never touches JS memory, and numbers
// are checked before a cast (a double outside the target range is undefined behaviour in a static_cast).

static double get_double(const Napi::Object& o, const char* key) {
  Napi::Value v = o.Get(key);
  if (!v.IsNumber()) fail(ErrorCode::InvalidArgument, std::string("expected a number for '") + key + "'");
  return v.As<Napi::Number>().DoubleValue();
}
static bool is_integer_in(double d, double lo, double hi) { return d >= lo && d <= hi && d == std::floor(d); }
static int32_t get_int(const Napi::Object& o, const char* key) {
  double d = get_double(o, key);
  if (!is_integer_in(d, INT32_MIN, INT32_MAX))
    fail(ErrorCode::InvalidArgument, std::string("expected a 32-bit integer for '") + key + "'");
  return static_cast<int32_t>(d);
}
static bool get_bool(const Napi::Object& o, const char* key) {
  Napi::Value v = o.Get(key);
  if (!v.IsBoolean()) fail(ErrorCode::InvalidArgument, std::string("expected a boolean for '") + key + "'");
  return v.As<Napi::Boolean>().Value();
}
static std::string get_string(const Napi::Object& o, const char* key) {
  Napi::Value v = o.Get(key);
  if (!v.IsString()) fail(ErrorCode::InvalidArgument, std::string("expected a string for '") + key + "'");
  return v.As<Napi::String>().Utf8Value();
}
static Napi::Object get_object(const Napi::Object& o, const char* key) {
  Napi::Value v = o.Get(key);
  if (!v.IsObject()) fail(ErrorCode::InvalidArgument, std::string("expected an object for '") + key + "'");
  return v.As<Napi::Object>();
}
static std::vector<int32_t> get_i32(const Napi::Object& o, const char* key, bool optional = false) {
  Napi::Value v = o.Get(key);
  if (optional && (v.IsUndefined() || v.IsNull())) return {};
  if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != napi_int32_array)
    fail(ErrorCode::InvalidArgument, std::string("expected an Int32Array for '") + key + "'");
  auto a = v.As<Napi::Int32Array>();
  if (a.ElementLength() == 0) return {};  // a detached buffer has no data pointer
  return std::vector<int32_t>(a.Data(), a.Data() + a.ElementLength());
}

static T5Config to_config(const Napi::Object& o) {
  T5Config c;
  c.vocab_size = get_int(o, "vocabSize");
  c.d_model = get_int(o, "dModel");
  c.d_ff = get_int(o, "dFf");
  c.d_kv = get_int(o, "dKv");
  c.num_heads = get_int(o, "numHeads");
  c.num_layers = get_int(o, "numLayers");
  c.num_decoder_layers = get_int(o, "numDecoderLayers");
  c.num_buckets = get_int(o, "numBuckets");
  c.max_distance = get_int(o, "maxDistance");
  const double eps = get_double(o, "layerNormEps"), dropout = get_double(o, "dropoutRate");
  // checked as doubles: a cast of an out-of-range double to float is undefined
  if (!(eps > 0 && eps <= 3.4e38)) fail(ErrorCode::InvalidModel, "config: layer_norm_epsilon must be a positive number");
  if (!(dropout >= 0 && dropout < 1)) fail(ErrorCode::InvalidModel, "config: dropout_rate must be in [0, 1)");
  c.layer_norm_eps = static_cast<float>(eps);
  c.dropout_rate = static_cast<float>(dropout);
  c.gated_gelu = get_bool(o, "gatedGelu");
  c.tied_head = get_bool(o, "tiedHead");
  c.scale_decoder_outputs = get_bool(o, "scaleDecoderOutputs");
  c.pad_token_id = get_int(o, "padTokenId");
  c.eos_token_id = get_int(o, "eosTokenId");
  c.decoder_start_token_id = get_int(o, "decoderStartTokenId");
  if (c.vocab_size <= 0 || c.d_model <= 0 || c.d_ff <= 0 || c.d_kv <= 0 || c.num_heads <= 0 || c.num_layers <= 0 ||
      c.num_decoder_layers <= 0 || c.num_buckets <= 1 || c.max_distance <= 0)
    fail(ErrorCode::InvalidModel, "config has a non-positive dimension");
  if (!relative_buckets_valid(c.num_buckets, c.max_distance))
    fail(ErrorCode::InvalidModel, "config: relative_attention_num_buckets and relative_attention_max_distance do not make T5's position buckets");
  if (static_cast<int64_t>(c.num_heads) * c.d_kv > INT32_MAX) fail(ErrorCode::InvalidModel, "config: num_heads * d_kv is too large");
  if (!(c.layer_norm_eps > 0) || !(c.dropout_rate < 1))  // a tiny eps or a rate just below 1 may round in float
    fail(ErrorCode::InvalidModel, "config: layer_norm_epsilon or dropout_rate does not fit a float");
  // The engine indexes the embedding table with these: outside the vocabulary they would read out of bounds.
  const std::pair<const char*, int> ids[] = {{"pad_token_id", c.pad_token_id}, {"eos_token_id", c.eos_token_id},
                                             {"decoder_start_token_id", c.decoder_start_token_id}};
  for (const auto& id : ids)
    if (id.second < 0 || id.second >= c.vocab_size)
      fail(ErrorCode::InvalidModel, std::string("config: ") + id.first + " " + std::to_string(id.second) +
                                        " is outside the vocabulary (size " + std::to_string(c.vocab_size) + ")");
  return c;
}

// A byte offset, length or dimension: a non-negative integer a double holds exactly.
static int64_t to_size(double d, const std::string& what) {
  if (!is_integer_in(d, 0, 9007199254740992.0)) fail(ErrorCode::InvalidModel, what + " must be a non-negative integer");
  return static_cast<int64_t>(d);
}

static std::vector<TensorSpec> to_specs(const Napi::Array& a) {
  std::vector<TensorSpec> specs;
  for (uint32_t i = 0; i < a.Length(); ++i) {
    Napi::Value e = a.Get(i);
    if (!e.IsObject()) fail(ErrorCode::InvalidArgument, "tensor spec " + std::to_string(i) + " is not an object");
    Napi::Object o = e.As<Napi::Object>();
    TensorSpec s;
    s.name = get_string(o, "name");
    s.file = get_string(o, "file");
    s.offset = to_size(get_double(o, "offset"), "offset of tensor " + s.name);
    s.byte_length = to_size(get_double(o, "byteLength"), "byteLength of tensor " + s.name);
    s.dtype = parse_dtype(get_string(o, "dtype"));
    Napi::Value shape_value = o.Get("shape");
    if (!shape_value.IsArray()) fail(ErrorCode::InvalidArgument, "shape of tensor " + s.name + " is not an array");
    Napi::Array shape = shape_value.As<Napi::Array>();
    for (uint32_t j = 0; j < shape.Length(); ++j) {
      Napi::Value d = shape.Get(j);
      if (!d.IsNumber()) fail(ErrorCode::InvalidModel, "shape of tensor " + s.name + " has a non-number");
      s.shape.push_back(to_size(d.As<Napi::Number>().DoubleValue(), "a dimension of tensor " + s.name));
    }
    specs.push_back(std::move(s));
  }
  return specs;
}

static Batch to_batch(const Napi::Object& o) {
  Batch b;
  b.batch_size = get_int(o, "batchSize");
  b.enc_len = get_int(o, "encLen");
  b.num_rows = get_int(o, "numRows");
  b.dec_len = get_int(o, "decLen");
  b.input_ids = get_i32(o, "inputIds");
  b.enc_lengths = get_i32(o, "encLengths");
  b.choice_ids = get_i32(o, "choiceIds");
  b.row_start = get_i32(o, "rowStart");
  b.adapter_of_example = get_i32(o, "adapterOfExample");
  b.labels = get_i32(o, "labels", true);
  return b;
}

// The adapters of one call: immutable snapshots of their vectors, shared with the worker thread (JavaScript may
// change an adapter's Float32Array while the call runs).
struct AdapterCopies {
  std::vector<std::shared_ptr<const std::vector<float>>> data;
  std::vector<uint64_t> keys;  // per snapshot: its content key (AdapterSet::content_keys)
  AdapterSet view() const {
    AdapterSet s;
    for (const auto& d : data) s.vectors.push_back(d->data());
    s.content_keys = keys;
    return s;
  }
  // The vectors as the engine's own (a training session's starting values): moved out where this call holds the
  // only reference (no snapshot table shares them: createTrainingSession's case), else copied. (Snapshots are
  // allocated non-const, so moving out of one nobody else sees is defined.)
  std::vector<std::vector<float>> take_vectors() {
    std::vector<std::vector<float>> out;
    for (auto& d : data) {
      if (d.use_count() == 1) out.push_back(std::move(*std::const_pointer_cast<std::vector<float>>(d)));
      else out.push_back(*d);
    }
    data.clear();
    return out;
  }
};

// A process-wide counter: every snapshot gets a key no other snapshot had (of any model).
static uint64_t new_content_key() {
  static std::atomic<uint64_t> next{1};
  return next++;
}

// Snapshots of a model's adapters by IA3Adapter id, each valid for one `version` of it (lib/adapter.ts bumps the
// version on set() and markChanged()). A call whose adapter has a snapshot's id and version reuses the snapshot:
// no copy of its vectors on the event loop (2 MiB per adapter at T0-3B) and, on CUDA, no upload or compare.
// Used on the main thread only.
struct AdapterSnapshots {
  struct Entry {
    double version = 0;
    std::shared_ptr<const std::vector<float>> data;
    uint64_t key = 0;
    uint64_t last_use = 0;
  };
  std::unordered_map<double, Entry> by_id;
  uint64_t uses = 0;
  // At most 256 MiB of snapshots (124 at T0-3B) and 256 entries; beyond, the least recently used one goes (a
  // call in flight keeps its snapshots alive through their shared_ptr).
  static size_t capacity(int64_t floats_per_adapter) {
    const size_t bytes = static_cast<size_t>(std::max<int64_t>(floats_per_adapter, 1)) * sizeof(float);
    return std::max<size_t>(8, std::min<size_t>(256, (size_t(256) << 20) / bytes));
  }
  void evict_one() {
    auto oldest = by_id.begin();
    for (auto it = by_id.begin(); it != by_id.end(); ++it)
      if (it->second.last_use < oldest->second.last_use) oldest = it;
    if (oldest != by_id.end()) by_id.erase(oldest);
  }
};

static AdapterCopies to_adapters(const Napi::Value& v, int64_t expected_size, AdapterSnapshots* snapshots = nullptr,
                                 const Napi::Value& ids_versions = Napi::Value()) {
  AdapterCopies c;
  if (v.IsUndefined() || v.IsNull()) return c;
  if (!v.IsArray()) fail(ErrorCode::InvalidArgument, "adapters must be an array of Float32Array");
  Napi::Array a = v.As<Napi::Array>();
  // [id0, version0, id1, version1, ...] (optional): which IA3Adapter, at which version, each array is
  const bool keyed = snapshots && !ids_versions.IsEmpty() && !ids_versions.IsUndefined() && !ids_versions.IsNull();
  Napi::Array iv;
  if (keyed) {
    if (!ids_versions.IsArray() || ids_versions.As<Napi::Array>().Length() != 2 * a.Length())
      fail(ErrorCode::InvalidArgument, "adapter keys must be an array of [id, version] for each adapter");
    iv = ids_versions.As<Napi::Array>();
  }
  for (uint32_t i = 0; i < a.Length(); ++i) {
    Napi::Value e = a.Get(i);
    if (!e.IsTypedArray() || e.As<Napi::TypedArray>().TypedArrayType() != napi_float32_array)
      fail(ErrorCode::InvalidAdapter, "adapter " + std::to_string(i) + " is not a Float32Array");
    auto f = e.As<Napi::Float32Array>();
    if (static_cast<int64_t>(f.ElementLength()) != expected_size)
      fail(ErrorCode::InvalidAdapter, "adapter " + std::to_string(i) + " has " + std::to_string(f.ElementLength()) +
                                          " values; this model needs " + std::to_string(expected_size));
    if (keyed) {
      const Napi::Value id_v = iv.Get(2 * i), version_v = iv.Get(2 * i + 1);
      if (!id_v.IsNumber() || !version_v.IsNumber()) fail(ErrorCode::InvalidArgument, "adapter keys must be numbers");
      const double id = id_v.As<Napi::Number>().DoubleValue(), version = version_v.As<Napi::Number>().DoubleValue();
      auto it = snapshots->by_id.find(id);
      if (it != snapshots->by_id.end() && it->second.version == version) {
        it->second.last_use = ++snapshots->uses;
        c.data.push_back(it->second.data);
        c.keys.push_back(it->second.key);
        continue;
      }
      if (it != snapshots->by_id.end()) snapshots->by_id.erase(it);
      if (snapshots->by_id.size() >= AdapterSnapshots::capacity(expected_size)) snapshots->evict_one();
      AdapterSnapshots::Entry entry;
      entry.version = version;
      entry.last_use = ++snapshots->uses;
      entry.data = std::make_shared<std::vector<float>>(f.Data(), f.Data() + f.ElementLength());
      entry.key = new_content_key();
      c.data.push_back(entry.data);
      c.keys.push_back(entry.key);
      snapshots->by_id[id] = std::move(entry);
      continue;
    }
    c.data.push_back(std::make_shared<std::vector<float>>(f.Data(), f.Data() + f.ElementLength()));
    c.keys.push_back(0);
  }
  return c;
}

// LossOptions.recompute as lib/model.ts names it, and back.
static Recompute to_recompute(const std::string& r) {
  if (r == "none") return Recompute::None;
  if (r == "attention") return Recompute::Attention;
  if (r == "all") return Recompute::All;
  if (r == "auto") return Recompute::Auto;
  fail(ErrorCode::InvalidArgument, "recompute must be 'auto', 'none', 'attention' or 'all', got '" + r + "'");
}
static const char* recompute_name(Recompute r) {
  return r == Recompute::None ? "none" : r == Recompute::Attention ? "attention" : r == Recompute::All ? "all" : "auto";
}

static LossOptions to_loss_options(const Napi::Object& o) {
  LossOptions opt;
  const char* weights[] = {"lmWeight", "ulWeight", "lnWeight"};
  float* dest[] = {&opt.lm_weight, &opt.ul_weight, &opt.ln_weight};
  for (int i = 0; i < 3; ++i) {
    double w = get_double(o, weights[i]);
    if (!(std::abs(w) <= 3.4e38)) fail(ErrorCode::InvalidArgument, std::string(weights[i]) + " must be a finite number");
    *dest[i] = static_cast<float>(w);
  }
  opt.dropout = get_bool(o, "dropout");
  if (o.Has("recompute")) opt.recompute = to_recompute(get_string(o, "recompute"));
  const double seed = get_double(o, "seed");
  if (!is_integer_in(seed, 0, 9007199254740992.0)) fail(ErrorCode::InvalidArgument, "seed must be an integer >= 0");
  opt.seed = static_cast<uint64_t>(seed);
  return opt;
}

// ReserveShape from { batch, encLen, choices, decLen, nAdapters, training?, recompute? } (lib/model.ts checks and
// names them; the engine checks again), and an array of them.
static ReserveShape to_reserve_shape(const Napi::Object& o) {
  ReserveShape r;
  r.batch = get_int(o, "batch");
  r.enc_len = get_int(o, "encLen");
  r.choices = get_int(o, "choices");
  r.dec_len = get_int(o, "decLen");
  r.n_adapters = get_int(o, "nAdapters");
  r.training = o.Has("training") && get_bool(o, "training");
  r.recompute = o.Has("recompute") ? to_recompute(get_string(o, "recompute")) : Recompute::Auto;
  check_reserve_shape(r);
  return r;
}
static std::vector<ReserveShape> to_reserve_shapes(const Napi::Value& v) {
  if (!v.IsArray()) fail(ErrorCode::InvalidArgument, "reserve: expected an array of shapes");
  Napi::Array a = v.As<Napi::Array>();
  std::vector<ReserveShape> out;
  for (uint32_t i = 0; i < a.Length(); ++i) {
    Napi::Value e = a.Get(i);
    if (!e.IsObject()) fail(ErrorCode::InvalidArgument, "reserve: expected an array of shapes");
    out.push_back(to_reserve_shape(e.As<Napi::Object>()));
  }
  return out;
}

static Napi::Error to_js_error(Napi::Env env, ErrorCode code, const std::string& message) {
  Napi::Error e = Napi::Error::New(env, message);
  e.Set("code", Napi::String::New(env, error_code_name(code)));
  return e;
}

static Napi::Float32Array to_f32(Napi::Env env, const std::vector<float>& v) {
  auto a = Napi::Float32Array::New(env, v.size());
  if (!v.empty()) std::memcpy(a.Data(), v.data(), v.size() * sizeof(float));
  return a;
}

// ---------- the model holder shared by the JS object and its in-flight workers ----------

struct SessionHolder;
static void end_session(const std::shared_ptr<SessionHolder>& s);

struct ModelHolder {
  std::mutex mu;
  std::unique_ptr<Engine> engine;
  // Training sessions of this model: dispose() ends them too (their device memory goes with the model's).
  std::vector<std::weak_ptr<SessionHolder>> sessions;
  T5Config config;
  int64_t ia3_size = 0;
  std::string device;
  std::string precision;  // the engine's: "fp32" or "bf16"
  // The last describe() text. Read and written on the main thread only (describe() must not wait for the
  // lock while a call runs: that would block the event loop).
  std::string description;
  std::shared_ptr<GraphStatsBox> graph_stats;  // the engine's counts (null on the CPU backend); outlives it
  AdapterSnapshots adapter_snapshots;  // main thread only

  Engine& use() {
    if (!engine) fail(ErrorCode::Disposed, "the model has been disposed");
    return *engine;
  }
};

// A worker that runs `work` off the event loop and resolves with `result(env)`.
class PromiseWorker : public Napi::AsyncWorker {
 public:
  PromiseWorker(Napi::Env env) : Napi::AsyncWorker(env), deferred_(Napi::Promise::Deferred::New(env)) {}
  Napi::Promise promise() { return deferred_.Promise(); }

 protected:
  virtual void work() = 0;
  virtual Napi::Value result(Napi::Env env) = 0;

  void Execute() override {
    try {
      work();
    } catch (const TfewError& e) {
      code_ = e.code();
      SetError(e.what());
    } catch (const std::bad_alloc&) {
      code_ = ErrorCode::OutOfMemory;
      SetError("out of host memory");
    } catch (const std::exception& e) {
      code_ = ErrorCode::Internal;
      SetError(e.what());
    } catch (...) {  // nothing may escape into the libuv thread: that would terminate the process
      code_ = ErrorCode::Internal;
      SetError("unknown native exception");
    }
  }
  void OnOK() override {
    Napi::HandleScope scope(Env());
    try {
      deferred_.Resolve(result(Env()));
    } catch (const Napi::Error& e) {
      deferred_.Reject(e.Value());
    } catch (const std::bad_alloc&) {  // node-addon-api lets only Napi::Error through its callbacks
      deferred_.Reject(to_js_error(Env(), ErrorCode::OutOfMemory, "out of host memory").Value());
    } catch (const std::exception& e) {
      deferred_.Reject(to_js_error(Env(), ErrorCode::Internal, e.what()).Value());
    }
  }
  void OnError(const Napi::Error& e) override {
    deferred_.Reject(to_js_error(Env(), code_, e.Message()).Value());
  }

 private:
  Napi::Promise::Deferred deferred_;
  ErrorCode code_ = ErrorCode::Internal;
};

// A call that resolves with undefined: `work` runs off the event loop.
class VoidWorker : public PromiseWorker {
 public:
  VoidWorker(Napi::Env env, std::function<void()> work) : PromiseWorker(env), work_(std::move(work)) {}
  static Napi::Value queue(Napi::Env env, std::function<void()> work);

 protected:
  void work() override { work_(); }
  Napi::Value result(Napi::Env env) override { return env.Undefined(); }

 private:
  std::function<void()> work_;
};

// Rejects immediately (argument errors found on the main thread) without throwing into JS.
static Napi::Value rejected(Napi::Env env, ErrorCode code, const std::string& message) {
  auto d = Napi::Promise::Deferred::New(env);
  d.Reject(to_js_error(env, code, message).Value());
  return d.Promise();
}

// The synchronous counterpart of settle, for functions that return a value rather than a promise: a TfewError is
// thrown as the typed JS error (node-addon-api throws a Napi::Error in JS).
template <typename F>
static auto throw_typed(Napi::Env env, F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const TfewError& e) {
    throw to_js_error(env, e.code(), e.what());
  }
}

// Runs the main-thread part of a call (reading the arguments, queueing the worker). Every failure becomes a
// rejected promise: methods never throw, and no C++ exception other than Napi::Error may leave a callback.
template <typename Start>
static Napi::Value settle(Napi::Env env, Start&& start) {
  try {
    return start();
  } catch (const TfewError& e) {
    return rejected(env, e.code(), e.what());
  } catch (const Napi::Error& e) {
    auto d = Napi::Promise::Deferred::New(env);
    d.Reject(e.Value());
    return d.Promise();
  } catch (const std::bad_alloc&) {
    return rejected(env, ErrorCode::OutOfMemory, "out of host memory");
  } catch (const std::exception& e) {
    return rejected(env, ErrorCode::Internal, e.what());
  }
}

template <typename W>
static Napi::Value queue(W* worker) {
  auto p = worker->promise();
  worker->Queue();
  return p;
}
Napi::Value VoidWorker::queue(Napi::Env env, std::function<void()> work) {
  return tfew::napi::queue(new VoidWorker(env, std::move(work)));
}

// A call that resolves with a value: `work` runs off the event loop and returns Out, `convert` turns it into
// JS values on the main thread.
template <typename Out>
class CallWorker : public PromiseWorker {
 public:
  using Work = std::function<Out()>;
  using Convert = std::function<Napi::Value(Napi::Env, Out&)>;
  CallWorker(Napi::Env env, Work work, Convert convert)
      : PromiseWorker(env), work_(std::move(work)), convert_(std::move(convert)) {}

 protected:
  void work() override { out_ = work_(); }
  Napi::Value result(Napi::Env env) override { return convert_(env, out_); }

 private:
  Work work_;
  Convert convert_;
  Out out_{};
};

template <typename Out>
static Napi::Value queue_call(Napi::Env env, typename CallWorker<Out>::Work work,
                              typename CallWorker<Out>::Convert convert) {
  return queue(new CallWorker<Out>(env, std::move(work), std::move(convert)));
}

// A native object for JS: the holder travels in an External that the class's constructor unwraps.
template <typename Holder>
static Napi::Value wrap_holder(Napi::Env env, Napi::FunctionReference& ctor, std::shared_ptr<Holder> holder) {
  auto* ext = new std::shared_ptr<Holder>(std::move(holder));
  auto external = Napi::External<std::shared_ptr<Holder>>::New(env, ext, [](Napi::Env, std::shared_ptr<Holder>* p) { delete p; });
  return ctor.New({external});
}

template <typename Holder>
static std::shared_ptr<Holder> unwrap_holder(const Napi::CallbackInfo& info, const char* made_by) {
  if (info.Length() != 1 || !info[0].IsExternal())
    throw Napi::TypeError::New(info.Env(), std::string("this object is created by ") + made_by);
  return *info[0].As<Napi::External<std::shared_ptr<Holder>>>().Data();
}

// The losses of a loss_and_gradients call or a training step, as JS numbers.
static void set_losses(Napi::Env env, Napi::Object& o, double lm, double ul, double ln, double total) {
  o.Set("lmLoss", Napi::Number::New(env, lm));
  o.Set("ulLoss", Napi::Number::New(env, ul));
  o.Set("lnLoss", Napi::Number::New(env, ln));
  o.Set("totalLoss", Napi::Number::New(env, total));
}

// Per-environment state: the classes' constructors. The addon may be loaded by several environments (the main
// thread and worker_threads), each with its own JS functions; a process-wide static would give one environment
// another's constructor (a crash in the main thread once a worker that loaded the addon had exited).
struct AddonData {
  Napi::FunctionReference model_ctor, session_ctor;
};

class NativeModel : public Napi::ObjectWrap<NativeModel> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "NativeModel",
                       {InstanceAccessor<&NativeModel::Device>("device"),
                        InstanceAccessor<&NativeModel::Precision>("precision"),
                        InstanceMethod<&NativeModel::Describe>("describe"),
                        InstanceMethod<&NativeModel::GraphStatsOf>("graphStats"),
                        InstanceMethod<&NativeModel::Score>("score"),
                        InstanceMethod<&NativeModel::LossAndGradients>("lossAndGradients"),
                        InstanceMethod<&NativeModel::MergeAdapter>("mergeAdapter"),
                        InstanceMethod<&NativeModel::Reserve>("reserve"),
                        InstanceMethod<&NativeModel::CreateTrainingSession>("createTrainingSession"),
                        InstanceMethod<&NativeModel::Dispose>("dispose")});
  }

  NativeModel(const Napi::CallbackInfo& info)
      : Napi::ObjectWrap<NativeModel>(info), holder_(unwrap_holder<ModelHolder>(info, "loadModel()")) {}

 private:
  Napi::Value Device(const Napi::CallbackInfo& info) { return Napi::String::New(info.Env(), holder_->device); }
  Napi::Value Precision(const Napi::CallbackInfo& info) { return Napi::String::New(info.Env(), holder_->precision); }

  // Never waits for the model's lock (a running call holds it for seconds: the event loop would stall); while
  // a call runs it returns the last description.
  Napi::Value Describe(const Napi::CallbackInfo& info) {
    std::unique_lock<std::mutex> lock(holder_->mu, std::try_to_lock);
    if (lock.owns_lock()) holder_->description = holder_->engine ? holder_->engine->describe() : "disposed";
    return Napi::String::New(info.Env(), holder_->description);
  }

  // Never waits for the model: the counts live in a box of their own (GraphStatsBox).
  Napi::Value GraphStatsOf(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const GraphStats s = holder_->graph_stats ? holder_->graph_stats->read() : GraphStats{};
    Napi::Object o = Napi::Object::New(env);
    o.Set("enabled", s.enabled);
    o.Set("offReason", s.off_reason);
    o.Set("buckets", s.buckets);
    o.Set("replays", static_cast<double>(s.replays));
    o.Set("captures", static_cast<double>(s.captures));
    o.Set("eager", static_cast<double>(s.eager));
    o.Set("captureFailures", static_cast<double>(s.capture_failures));
    o.Set("cached", static_cast<double>(s.cached));
    o.Set("graphLimit", static_cast<double>(s.graph_limit));
    o.Set("arenaBytes", static_cast<double>(s.arena_bytes));
    o.Set("arenaGrowths", static_cast<double>(s.arena_growths));
    if (s.last_kind.empty()) {
      o.Set("last", env.Null());
    } else {
      Napi::Object last = Napi::Object::New(env);
      last.Set("kind", s.last_kind);
      last.Set("launch", s.last_launch);
      last.Set("batch", s.last_batch);
      last.Set("encLen", s.last_enc_len);
      last.Set("rows", s.last_rows);
      last.Set("decLen", s.last_dec_len);
      o.Set("last", last);
    }
    return o;
  }

  Napi::Value Score(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return settle(env, [&] {
      if (info.Length() < 4 || !info[0].IsObject())
        fail(ErrorCode::InvalidArgument, "score(batch, adapters, wantLogits, wantEncoderHidden[, adapterKeys])");
      auto batch = std::make_shared<Batch>(to_batch(info[0].As<Napi::Object>()));
      auto adapters = std::make_shared<AdapterCopies>(
          to_adapters(info[1], holder_->ia3_size, &holder_->adapter_snapshots, info.Length() > 4 ? info[4] : Napi::Value()));
      const bool logits = info[2].ToBoolean().Value(), enc = info[3].ToBoolean().Value();
      auto h = holder_;
      return queue_call<ScoreOutput>(
          env,
          [h, batch, adapters, logits, enc] {
            std::lock_guard<std::mutex> lock(h->mu);
            return h->use().score(*batch, adapters->view(), logits, enc);
          },
          [logits, enc](Napi::Env env, ScoreOutput& out) -> Napi::Value {
            Napi::Object o = Napi::Object::New(env);
            o.Set("tokenLogp", to_f32(env, out.token_logp));
            if (logits) o.Set("logits", to_f32(env, out.logits));
            if (enc) o.Set("encoderHidden", to_f32(env, out.encoder_hidden));
            return o;
          });
    });
  }

  Napi::Value LossAndGradients(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return settle(env, [&] {
      if (info.Length() < 3 || !info[0].IsObject() || !info[2].IsObject())
        fail(ErrorCode::InvalidArgument, "lossAndGradients(batch, adapters, options[, adapterKeys])");
      const LossOptions opt = to_loss_options(info[2].As<Napi::Object>());
      auto batch = std::make_shared<Batch>(to_batch(info[0].As<Napi::Object>()));
      auto adapters = std::make_shared<AdapterCopies>(
          to_adapters(info[1], holder_->ia3_size, &holder_->adapter_snapshots, info.Length() > 3 ? info[3] : Napi::Value()));
      auto h = holder_;
      return queue_call<LossOutput>(
          env,
          [h, batch, adapters, opt] {
            std::lock_guard<std::mutex> lock(h->mu);
            return h->use().loss_and_gradients(*batch, adapters->view(), opt);
          },
          [](Napi::Env env, LossOutput& out) -> Napi::Value {
            Napi::Object o = Napi::Object::New(env);
            set_losses(env, o, out.lm_loss, out.ul_loss, out.ln_loss, out.total_loss);
            o.Set("tokenLogp", to_f32(env, out.token_logp));
            o.Set("gradients", to_f32(env, out.gradients));
            return o;
          });
    });
  }

  // reserve(shapes) -> Promise<number>: the bytes of activation memory held after planning for the shapes.
  Napi::Value Reserve(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return settle(env, [&] {
      auto shapes = std::make_shared<std::vector<ReserveShape>>(to_reserve_shapes(info.Length() > 0 ? info[0] : env.Undefined()));
      auto h = holder_;
      return queue_call<int64_t>(
          env,
          [h, shapes] {
            std::lock_guard<std::mutex> lock(h->mu);
            return h->use().reserve(*shapes);
          },
          [](Napi::Env env, int64_t& bytes) -> Napi::Value { return Napi::Number::New(env, static_cast<double>(bytes)); });
    });
  }

  Napi::Value MergeAdapter(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return settle(env, [&] {
      Napi::Array arr = Napi::Array::New(env, 1);
      arr.Set(uint32_t(0), info.Length() > 0 ? info[0] : env.Undefined());
      auto a = std::make_shared<AdapterCopies>(to_adapters(arr, holder_->ia3_size));
      auto h = holder_;
      return VoidWorker::queue(env, [h, a] {
        std::lock_guard<std::mutex> lock(h->mu);
        h->use().merge_adapter(a->data[0]->data());
      });
    });
  }

  Napi::Value CreateTrainingSession(const Napi::CallbackInfo& info);

  Napi::Value Dispose(const Napi::CallbackInfo& info) {
    auto h = holder_;
    h->adapter_snapshots.by_id.clear();  // (main thread; a call in flight holds its own snapshots)
    return settle(info.Env(), [&] {
      return VoidWorker::queue(info.Env(), [h] {
        std::lock_guard<std::mutex> lock(h->mu);  // waits for a call in flight
        for (auto& weak : h->sessions) end_session(weak.lock());
        h->sessions.clear();
        if (h->engine) {
          h->engine->release();
          h->engine.reset();
        }
      });
    });
  }

  std::shared_ptr<ModelHolder> holder_;
};


// A training session and the model it trains; calls lock the model (one call at a time per model) and
// check both are alive.
struct SessionHolder {
  std::shared_ptr<ModelHolder> model;
  std::unique_ptr<TrainingSession> session;
  TrainingSession& use() {
    model->use();  // a session never outlives its model's engine
    if (!session) fail(ErrorCode::Disposed, "the training session has been disposed");
    return *session;
  }
};

// Frees a session (under its model's lock, held by the caller).
static void end_session(const std::shared_ptr<SessionHolder>& s) {
  if (s) s->session.reset();
}

// An optional integer argument: undefined -> fallback; anything else must be a 32-bit integer.
static int optional_int_arg(const Napi::Value& v, int fallback, const char* what) {
  if (v.IsUndefined() || v.IsNull()) return fallback;
  if (!v.IsNumber() || !is_integer_in(v.As<Napi::Number>().DoubleValue(), INT32_MIN, INT32_MAX))
    fail(ErrorCode::InvalidArgument, std::string(what) + " must be an integer");
  return static_cast<int>(v.As<Napi::Number>().DoubleValue());
}

class NativeTrainingSession : public Napi::ObjectWrap<NativeTrainingSession> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "NativeTrainingSession",
                       {InstanceMethod<&NativeTrainingSession::Step>("step"),
                        InstanceMethod<&NativeTrainingSession::Read>("read"),
                        InstanceMethod<&NativeTrainingSession::Dispose>("dispose")});
  }

  NativeTrainingSession(const Napi::CallbackInfo& info)
      : Napi::ObjectWrap<NativeTrainingSession>(info),
        holder_(unwrap_holder<SessionHolder>(info, "createTrainingSession()")) {}

 private:
  // step(batch, lossOptions, scheduleStep) -> { lmLoss, ulLoss, lnLoss, totalLoss, lr, gradNorms, stepped }
  Napi::Value Step(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return settle(env, [&] {
      if (info.Length() < 2 || !info[0].IsObject() || !info[1].IsObject())
        fail(ErrorCode::InvalidArgument, "step(batch, lossOptions, scheduleStep)");
      // a negative schedule step (or none) continues the schedule
      const int schedule = std::max(-1, optional_int_arg(info.Length() > 2 ? info[2] : env.Undefined(), -1, "scheduleStep"));
      auto batch = std::make_shared<Batch>(to_batch(info[0].As<Napi::Object>()));
      const LossOptions opt = to_loss_options(info[1].As<Napi::Object>());
      auto h = holder_;
      return queue_call<TrainStepOutput>(
          env,
          [h, batch, opt, schedule] {
            std::lock_guard<std::mutex> lock(h->model->mu);
            TrainingSession& session = h->use();
            return session.step(h->model->use(), *batch, opt, schedule);
          },
          [](Napi::Env env, TrainStepOutput& out) -> Napi::Value {
            Napi::Object o = Napi::Object::New(env);
            set_losses(env, o, out.lm_loss, out.ul_loss, out.ln_loss, out.total_loss);
            o.Set("lr", Napi::Number::New(env, out.lr));
            Napi::Array norms = Napi::Array::New(env, out.grad_norms.size());
            Napi::Array stepped = Napi::Array::New(env, out.stepped.size());
            for (uint32_t i = 0; i < out.grad_norms.size(); ++i) {
              norms.Set(i, Napi::Number::New(env, out.grad_norms[i]));
              stepped.Set(i, Napi::Boolean::New(env, out.stepped[i] != 0));
            }
            o.Set("gradNorms", norms);
            o.Set("stepped", stepped);
            return o;
          });
    });
  }

  Napi::Value Read(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return settle(env, [&] {
      const int adapter = optional_int_arg(info.Length() > 0 ? info[0] : env.Undefined(), -1, "adapter index");
      auto h = holder_;
      return queue_call<std::vector<float>>(
          env,
          [h, adapter] {
            std::lock_guard<std::mutex> lock(h->model->mu);
            return h->use().read(adapter);
          },
          [](Napi::Env env, std::vector<float>& out) -> Napi::Value { return to_f32(env, out); });
    });
  }

  Napi::Value Dispose(const Napi::CallbackInfo& info) {
    auto h = holder_;
    return settle(info.Env(), [&] {
      return VoidWorker::queue(info.Env(), [h] {
        std::lock_guard<std::mutex> lock(h->model->mu);
        h->session.reset();
      });
    });
  }

  std::shared_ptr<SessionHolder> holder_;
};


// createTrainingSession(adapters: Float32Array[], options) -> Promise<NativeTrainingSession>
Napi::Value NativeModel::CreateTrainingSession(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return settle(env, [&] {
    if (info.Length() < 2 || !info[1].IsObject()) fail(ErrorCode::InvalidArgument, "createTrainingSession(adapters, options)");
    Napi::Object o = info[1].As<Napi::Object>();
    OptimizerOptions opt;
    opt.lr = get_double(o, "lr");
    opt.total_steps = get_int(o, "totalSteps");
    opt.warmup_ratio = get_double(o, "warmupRatio");
    opt.clip_norm = get_double(o, "clipNorm");
    opt.scale_parameter = get_bool(o, "scaleParameter");
    opt.weight_decay = get_double(o, "weightDecay");
    // Checked here for every backend's session (clipNorm may be +Infinity: no clipping).
    TFEW_CHECK_ARG(opt.lr > 0 && std::isfinite(opt.lr), "lr must be a positive number");
    TFEW_CHECK_ARG(opt.total_steps >= 1, "totalSteps must be >= 1");
    TFEW_CHECK_ARG(opt.warmup_ratio >= 0 && opt.warmup_ratio <= 1, "warmupRatio must be in [0, 1]");
    TFEW_CHECK_ARG(opt.clip_norm >= 0, "clipNorm must be >= 0");
    TFEW_CHECK_ARG(opt.weight_decay >= 0 && std::isfinite(opt.weight_decay), "weightDecay must be a finite number >= 0");
    auto adapters = std::make_shared<AdapterCopies>(to_adapters(info[0], holder_->ia3_size));
    auto h = holder_;
    return queue_call<std::shared_ptr<SessionHolder>>(
        env,
        [h, adapters, opt] {
          std::lock_guard<std::mutex> lock(h->mu);
          auto session = std::make_shared<SessionHolder>();
          session->model = h;
          session->session = h->use().create_training_session(adapters->take_vectors(), opt);
          auto& list = h->sessions;
          list.erase(std::remove_if(list.begin(), list.end(), [](const std::weak_ptr<SessionHolder>& w) { return w.expired(); }),
                     list.end());
          list.push_back(session);
          return session;
        },
        [](Napi::Env env, std::shared_ptr<SessionHolder>& session) -> Napi::Value {
          return wrap_holder(env, env.GetInstanceData<AddonData>()->session_ctor, session);
        });
  });
}

// A GPU index argument: undefined or null picks the default ($TFEW_CUDA_DEVICE, else 0: -1 here); else an integer
// >= 0 (whether that GPU exists is the probe's to say).
static int device_index_arg(const Napi::Value& v, const char* what) {
  if (v.IsUndefined() || v.IsNull()) return -1;
  const double d = v.IsNumber() ? v.As<Napi::Number>().DoubleValue() : -1;
  if (!is_integer_in(d, 0, 1 << 20)) fail(ErrorCode::InvalidArgument, std::string(what) + " must be an integer >= 0");
  return static_cast<int>(d);
}

// The CPU backend's thread count is clamped to this: beyond it threads only cost memory (8 MiB stacks).
static constexpr int kMaxCpuThreads = 256;

// loadModel(config, tensors, { device, threads, cuda?: { device?, precision?, fusedAttention?, fusedBackward?,
// fewRowLinears?, gemmTuning?, programmaticLaunch?, attentionOccupancy?, encoderChunkRows?, graphs?, graphBuckets?, crossAttention? },
// reserve?: shapes as reserve() takes them })
//   -> Promise<NativeModel>
static Napi::Value LoadModel(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  class Worker : public PromiseWorker {
   public:
    Worker(Napi::Env env, T5Config c, std::vector<TensorSpec> s, std::string device, int threads, CudaEngineOptions cuda,
           std::vector<ReserveShape> reserve)
        : PromiseWorker(env), config_(c), specs_(std::move(s)), device_(std::move(device)), threads_(threads),
          cuda_(std::move(cuda)), reserve_(std::move(reserve)) {}
    void work() override {
      FileWeightSource source(specs_);  // mmaps the files; unmapped when the engine has converted them
      holder_ = std::make_shared<ModelHolder>();
      holder_->config = config_;
      holder_->ia3_size = IA3Layout::make(config_).total;
      holder_->device = device_;
      if (device_ == "cuda")
        holder_->engine = make_cuda_engine(config_, source, cuda_);
      else
        holder_->engine = make_cpu_engine(config_, source, threads_);
      holder_->precision = holder_->engine->precision();
      // (a failure here releases the engine: the holder dies with this worker)
      if (!reserve_.empty()) holder_->engine->reserve(reserve_);
      holder_->description = holder_->engine->describe();
      holder_->graph_stats = holder_->engine->graph_stats();
    }
    Napi::Value result(Napi::Env env) override {
      return wrap_holder(env, env.GetInstanceData<AddonData>()->model_ctor, holder_);
    }
   private:
    T5Config config_;
    std::vector<TensorSpec> specs_;
    std::string device_;
    int threads_;
    CudaEngineOptions cuda_;
    std::vector<ReserveShape> reserve_;
    std::shared_ptr<ModelHolder> holder_;
  };
  return settle(env, [&] {
    if (info.Length() < 3 || !info[0].IsObject() || !info[1].IsArray() || !info[2].IsObject())
      fail(ErrorCode::InvalidArgument, "loadModel(config, tensors, options)");
    Napi::Object opts = info[2].As<Napi::Object>();
    std::string device = opts.Get("device").ToString().Utf8Value();
    if (device != "cpu" && device != "cuda") fail(ErrorCode::InvalidArgument, "device must be 'cpu' or 'cuda'");
    double requested = opts.Has("threads") && opts.Get("threads").IsNumber() ? opts.Get("threads").As<Napi::Number>().DoubleValue() : 0;
    int threads = requested >= 1 ? static_cast<int>(std::min<double>(requested, kMaxCpuThreads))
                                 : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    threads = std::min(threads, kMaxCpuThreads);
    CudaEngineOptions cuda;
    if (opts.Has("cuda") && opts.Get("cuda").IsObject()) {
      Napi::Object c = opts.Get("cuda").As<Napi::Object>();
      if (c.Has("device")) cuda.device = device_index_arg(c.Get("device"), "cuda.device");
      if (c.Has("precision") && c.Get("precision").IsString()) cuda.precision = c.Get("precision").As<Napi::String>().Utf8Value();
      if (c.Has("fusedAttention") && c.Get("fusedAttention").IsBoolean())
        cuda.fused_attention = c.Get("fusedAttention").As<Napi::Boolean>().Value() ? 1 : 0;
      if (c.Has("fusedBackward") && c.Get("fusedBackward").IsBoolean())
        cuda.fused_backward = c.Get("fusedBackward").As<Napi::Boolean>().Value() ? 1 : 0;
      if (c.Has("gemmTuning") && c.Get("gemmTuning").IsBoolean())
        cuda.gemm_tuning = c.Get("gemmTuning").As<Napi::Boolean>().Value() ? 1 : 0;
      if (c.Has("fewRowLinears") && c.Get("fewRowLinears").IsBoolean())
        cuda.few_row_linears = c.Get("fewRowLinears").As<Napi::Boolean>().Value() ? 1 : 0;
      if (c.Has("programmaticLaunch") && c.Get("programmaticLaunch").IsBoolean())
        cuda.programmatic_launch = c.Get("programmaticLaunch").As<Napi::Boolean>().Value() ? 1 : 0;
      if (c.Has("attentionOccupancy") && c.Get("attentionOccupancy").IsBoolean())
        cuda.attention_occupancy = c.Get("attentionOccupancy").As<Napi::Boolean>().Value() ? 1 : 0;
      if (c.Has("encoderChunkRows") && c.Get("encoderChunkRows").IsNumber())  // (checked by lib: an integer >= 0)
        cuda.encoder_chunk_rows = c.Get("encoderChunkRows").As<Napi::Number>().Int32Value();
      if (c.Has("graphs") && c.Get("graphs").IsBoolean()) cuda.graphs = c.Get("graphs").As<Napi::Boolean>().Value() ? 1 : 0;
      if (c.Has("graphBuckets") && c.Get("graphBuckets").IsBoolean())
        cuda.graph_buckets = c.Get("graphBuckets").As<Napi::Boolean>().Value() ? 1 : 0;
      if (c.Has("crossAttention") && c.Get("crossAttention").IsString())
        cuda.cross_attention = c.Get("crossAttention").As<Napi::String>().Utf8Value();
    }
    // the shapes to plan memory for at load (lib passes cuda.reserve here, checked and named as reserve())
    std::vector<ReserveShape> reserve;
    if (opts.Has("reserve") && !opts.Get("reserve").IsUndefined()) reserve = to_reserve_shapes(opts.Get("reserve"));
    return queue(new Worker(env, to_config(info[0].As<Napi::Object>()), to_specs(info[1].As<Napi::Array>()), device,
                            threads, cuda, std::move(reserve)));
  });
}

// probeCuda(device?) -> { compiled, usable, reason, deviceCount, deviceIndex, deviceName, ... }
static Napi::Value ProbeCuda(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const CudaProbe p = throw_typed(env, [&] { return probe_cuda(device_index_arg(info[0], "probeCuda's device")); });
  Napi::Object o = Napi::Object::New(env);
  o.Set("compiled", Napi::Boolean::New(env, p.compiled));
  o.Set("usable", Napi::Boolean::New(env, p.usable));
  o.Set("reason", Napi::String::New(env, p.reason));
  o.Set("deviceCount", Napi::Number::New(env, p.device_count));
  o.Set("deviceIndex", Napi::Number::New(env, p.device_index));
  o.Set("deviceName", Napi::String::New(env, p.device_name));
  o.Set("computeCapability", Napi::Number::New(env, p.compute_capability));
  o.Set("totalMemory", Napi::Number::New(env, static_cast<double>(p.total_memory)));
  o.Set("cublasLibrary", Napi::String::New(env, p.cublas_library));
  return o;
}

// cudaMemoryInfo(device?) -> { free, total } in bytes, or null without a usable CUDA backend (on that GPU).
static Napi::Value CudaMemory(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const CudaMemoryInfo m =
      throw_typed(env, [&] { return cuda_memory_info(device_index_arg(info[0], "cudaMemoryInfo's device")); });
  if (!m.ok) return env.Null();
  Napi::Object o = Napi::Object::New(env);
  o.Set("free", Napi::Number::New(env, static_cast<double>(m.free_bytes)));
  o.Set("total", Napi::Number::New(env, static_cast<double>(m.total_bytes)));
  return o;
}

// ---------- internal: checks of the thread pool's failure handling (test/core-review.test.ts) ----------

// _testing.parallelFor({ threads, n, nested, throwIn: 'none'|'worker'|'caller', kind: 'runtime'|'bad_alloc'|'tfew' })
// runs ThreadPool::parallel_for over [0, n) on a fresh pool, each index visited directly or (nested) through an
// inner parallel_for over 4 sub-indices. With threads > 1 the caller's first chunk waits (up to 5 s) until a pool
// thread has started one, so both kinds of thread take part. Without a throw it resolves with the visit counts. With one, it runs the same
// loop again without throwing and, when that covers every index exactly once (the pool survived), rejects with
// the first run's exception as every native call reports it.
static Napi::Value TestParallelFor(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  class Worker : public PromiseWorker {
   public:
    Worker(Napi::Env env, int threads, int64_t n, bool nested, std::string throw_in, std::string kind)
        : PromiseWorker(env), threads_(threads), n_(n), nested_(nested), throw_in_(std::move(throw_in)), kind_(std::move(kind)) {}
    void work() override {
      ThreadPool pool(threads_);
      const std::thread::id caller = std::this_thread::get_id();
      auto run = [&](bool may_throw) {
        std::vector<std::atomic<int>> counts(static_cast<size_t>(n_));
        std::atomic<bool> pool_thread_started{false}, caller_waited{false};
        pool.parallel_for(n_, 1, [&](int64_t begin, int64_t end) {
          const bool on_caller = std::this_thread::get_id() == caller;
          if (!on_caller) pool_thread_started = true;
          if (on_caller && threads_ > 1 && !caller_waited.exchange(true))
            for (int i = 0; i < 5000 && !pool_thread_started; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(1));
          if (may_throw && ((throw_in_ == "worker" && !on_caller) || (throw_in_ == "caller" && on_caller))) {
            if (kind_ == "bad_alloc") throw std::bad_alloc();
            if (kind_ == "tfew") fail(ErrorCode::InvalidArgument, "chunk " + std::to_string(begin) + " failed");
            throw std::runtime_error("chunk " + std::to_string(begin) + " failed");
          }
          for (int64_t i = begin; i < end; ++i) {
            if (nested_)
              pool.parallel_for(4, 1, [&](int64_t b, int64_t e) { counts[i] += static_cast<int>(e - b); });
            else
              counts[i] += 1;
          }
        });
        std::vector<int> out;
        for (auto& c : counts) out.push_back(c.load());
        return out;
      };
      if (throw_in_ == "none") {
        counts_ = run(false);
        return;
      }
      std::exception_ptr first;
      try {
        run(true);
      } catch (...) {
        first = std::current_exception();
      }
      const std::vector<int> again = run(false);
      const int expected = nested_ ? 4 : 1;
      for (int c : again)
        if (c != expected) fail(ErrorCode::Internal, "the pool is broken after an exception");
      if (first) std::rethrow_exception(first);
      fail(ErrorCode::Internal, "no chunk threw");
    }
    Napi::Value result(Napi::Env env) override {
      Napi::Array a = Napi::Array::New(env, counts_.size());
      for (uint32_t i = 0; i < counts_.size(); ++i) a.Set(i, Napi::Number::New(env, counts_[i]));
      return a;
    }
   private:
    int threads_;
    int64_t n_;
    bool nested_;
    std::string throw_in_, kind_;
    std::vector<int> counts_;
  };
  return settle(env, [&] {
    if (info.Length() < 1 || !info[0].IsObject()) fail(ErrorCode::InvalidArgument, "parallelFor(options)");
    Napi::Object o = info[0].As<Napi::Object>();
    const int threads = get_int(o, "threads"), n = get_int(o, "n");
    TFEW_CHECK_ARG(threads >= 1 && threads <= 64 && n >= 0 && n <= 100000, "threads in [1, 64], n in [0, 100000]");
    return queue(new Worker(env, threads, n, get_bool(o, "nested"), get_string(o, "throwIn"), get_string(o, "kind")));
  });
}

static Napi::Object Init(Napi::Env env, Napi::Object exports) {
  Napi::Function ctor = NativeModel::Define(env);
  auto* data = new AddonData();  // freed with the environment (SetInstanceData's default finalizer)
  data->model_ctor = Napi::Persistent(ctor);
  data->session_ctor = Napi::Persistent(NativeTrainingSession::Define(env));
  env.SetInstanceData(data);
  exports.Set("NativeModel", ctor);
  exports.Set("version", Napi::String::New(env, "0.1.0"));
  Napi::Object build = Napi::Object::New(env);
#ifdef TFEW_WITH_CUDA
  build.Set("cudaCompiled", Napi::Boolean::New(env, true));
#ifdef TFEW_CUDA_EMULATION
  build.Set("cudaEmulated", Napi::Boolean::New(env, true));  // the CUDA emulator build (tests only): no GPU used
#endif
#else
  build.Set("cudaCompiled", Napi::Boolean::New(env, false));
#endif
#if defined(__clang__)
  build.Set("compiler", Napi::String::New(env, std::string("clang ") + __clang_version__));
#elif defined(__GNUC__)
  build.Set("compiler", Napi::String::New(env, std::string("gcc ") + __VERSION__));
#else
  build.Set("compiler", Napi::String::New(env, "unknown"));
#endif
  build.Set("napiVersion", Napi::Number::New(env, NAPI_VERSION));
  // the engines' call limits that lib/batch.ts builds batches to (model/graph_buckets.h): one definition
  build.Set("encoderLengthAlignment", Napi::Number::New(env, kEncoderLengthAlignment));
  build.Set("maxCallTokens", Napi::Number::New(env, static_cast<double>(kMaxCallTokens)));
  exports.Set("buildInfo", build);
  exports.Set("probeCuda", Napi::Function::New(env, ProbeCuda));
  exports.Set("cudaMemoryInfo", Napi::Function::New(env, CudaMemory));
  exports.Set("loadModel", Napi::Function::New(env, LoadModel));
  // The CUDA graph bucket rules (model/graph_buckets.h), for lib's warm-up lengths:
  // graphBuckets(lengths, request?: { config, rows, choiceLength }, counts?) -> { lengths: each length's bucket, and
  // with a request (one example with `rows` choices of at most choiceLength tokens): choiceLength, its bucket, and
  // singleLimit, the longest input at which such a request runs padded (0: none); with counts (of examples or
  // rows): counts, their buckets }
  exports.Set("graphBuckets", Napi::Function::New(env, [](const Napi::CallbackInfo& info) -> Napi::Value {
    Napi::Env env = info.Env();
    return throw_typed(env, [&]() -> Napi::Value {
      if (info.Length() < 1 || !info[0].IsArray()) fail(ErrorCode::InvalidArgument, "graphBuckets(lengths, request?, counts?)");
      auto length_arg = [](const Napi::Value& v) {
        const double d = v.IsNumber() ? v.As<Napi::Number>().DoubleValue() : -1;
        if (!is_integer_in(d, 1, 1 << 20)) fail(ErrorCode::InvalidArgument, "graphBuckets: lengths are integers in [1, 2^20]");
        return static_cast<int>(d);
      };
      Napi::Array in = info[0].As<Napi::Array>();
      Napi::Array lengths = Napi::Array::New(env, in.Length());
      for (uint32_t i = 0; i < in.Length(); ++i) lengths.Set(i, graph_bucket_length(length_arg(in.Get(i))));
      Napi::Object o = Napi::Object::New(env);
      o.Set("lengths", lengths);
      if (info.Length() > 2 && info[2].IsArray()) {  // counts of examples or rows: their buckets
        Napi::Array c = info[2].As<Napi::Array>();
        Napi::Array counts = Napi::Array::New(env, c.Length());
        for (uint32_t i = 0; i < c.Length(); ++i) counts.Set(i, graph_bucket_count(length_arg(c.Get(i))));
        o.Set("counts", counts);
      }
      if (info.Length() > 1 && info[1].IsObject()) {
        Napi::Object r = info[1].As<Napi::Object>();
        const T5Config c = to_config(get_object(r, "config"));
        const int rows = length_arg(r.Get("rows")), choice = graph_bucket_choice_length(length_arg(r.Get("choiceLength")));
        int limit = 0;  // (a longer input is more tokens and more work: the last length that runs padded)
        for (int len = 1; len <= kGraphBucketMaxTokens; ++len)
          if (graph_bucket_call(c, 1, len, rows, choice).padded) limit = len;
        o.Set("choiceLength", choice);
        o.Set("singleLimit", limit);
      }
      return o;
    });
  }));
  Napi::Object testing = Napi::Object::New(env);  // internal checks, not part of the API
  testing.Set("parallelFor", Napi::Function::New(env, TestParallelFor));
  // cudaArenaBytes(config, { batch, encLen, rows, decLen, training, nAdapters, recompute, foldedCross?,
  // fusedBackward? (training; default false: the cuBLAS backward's plan, where the engine's default is the fused
  // one), dropout? (training; default true) }): the planner's
  // arena size;
  // cudaRecomputeChoice(config, shape, haveBytes, freeBytes[, reservedTrainingShapes]): Recompute::Auto's level
  auto arena_shape_arg = [](const Napi::Object& o) {
    CudaArenaShape a;
    a.batch = get_int(o, "batch");
    a.enc_len = get_int(o, "encLen");
    a.rows = get_int(o, "rows");
    a.dec_len = get_int(o, "decLen");
    a.training = get_bool(o, "training");
    a.n_adapters = get_int(o, "nAdapters");
    a.folded_cross = o.Has("foldedCross") && get_bool(o, "foldedCross");
    a.fused_backward = o.Has("fusedBackward") && get_bool(o, "fusedBackward");
    a.dropout = !o.Has("dropout") || get_bool(o, "dropout");
    a.recompute = o.Has("recompute") ? to_recompute(get_string(o, "recompute")) : Recompute::None;
    if (a.recompute == Recompute::Auto) fail(ErrorCode::InvalidArgument, "recompute: 'none', 'attention' or 'all'");
    return a;
  };
  auto resolved = [](Napi::Env env, Napi::Value v) {
    auto d = Napi::Promise::Deferred::New(env);
    d.Resolve(v);
    return d.Promise();
  };
  testing.Set("cudaArenaBytes", Napi::Function::New(env, [=](const Napi::CallbackInfo& info) -> Napi::Value {
    return settle(info.Env(), [&]() -> Napi::Value {
      if (info.Length() < 2 || !info[0].IsObject() || !info[1].IsObject()) fail(ErrorCode::InvalidArgument, "cudaArenaBytes(config, shape)");
      const int64_t bytes = cuda_arena_bytes(to_config(info[0].As<Napi::Object>()), arena_shape_arg(info[1].As<Napi::Object>()));
      return resolved(info.Env(), Napi::Number::New(info.Env(), static_cast<double>(bytes)));
    });
  }));
  // cudaReserveBytes(config, { batch, encLen, choices, decLen, nAdapters }): the arena reserve() plans for rank
  // classification up to that shape (bf16, graph buckets on); and (not a testing hook: lib's warm-up uses it)
  // graphBucketCall(config, batch, encLen, rows, decLen): the shape such a call runs at (score_unlocked's padding)
  testing.Set("cudaReserveBytes", Napi::Function::New(env, [=](const Napi::CallbackInfo& info) -> Napi::Value {
    return settle(info.Env(), [&]() -> Napi::Value {
      if (info.Length() < 2 || !info[0].IsObject() || !info[1].IsObject()) fail(ErrorCode::InvalidArgument, "cudaReserveBytes(config, shape)");
      const int64_t bytes = cuda_reserve_bytes(to_config(info[0].As<Napi::Object>()), to_reserve_shape(info[1].As<Napi::Object>()));
      return resolved(info.Env(), Napi::Number::New(info.Env(), static_cast<double>(bytes)));
    });
  }));
  exports.Set("graphBucketCall", Napi::Function::New(env, [](const Napi::CallbackInfo& info) -> Napi::Value {
    Napi::Env env = info.Env();
    return throw_typed(env, [&]() -> Napi::Value {
      if (info.Length() < 5 || !info[0].IsObject()) fail(ErrorCode::InvalidArgument, "graphBucketCall(config, batch, encLen, rows, decLen)");
      int v[4];
      for (int i = 0; i < 4; ++i) {
        const double d = info[i + 1].IsNumber() ? info[i + 1].As<Napi::Number>().DoubleValue() : -1;
        if (!is_integer_in(d, 1, 1 << 20)) fail(ErrorCode::InvalidArgument, "graphBucketCall: sizes are integers in [1, 2^20]");
        v[i] = static_cast<int>(d);
      }
      const BucketedCall p = graph_bucket_call(to_config(info[0].As<Napi::Object>()), v[0], v[1], v[2], v[3]);
      Napi::Object o = Napi::Object::New(env);
      o.Set("batch", p.batch);
      o.Set("encLen", p.enc_len);
      o.Set("rows", p.rows);
      o.Set("decLen", p.dec_len);
      o.Set("padded", p.padded);
      return o;
    });
  }));
  testing.Set("cudaRecomputeChoice", Napi::Function::New(env, [=](const Napi::CallbackInfo& info) -> Napi::Value {
    return settle(info.Env(), [&]() -> Napi::Value {
      if (info.Length() < 4 || !info[0].IsObject() || !info[1].IsObject() || !info[2].IsNumber() || !info[3].IsNumber())
        fail(ErrorCode::InvalidArgument, "cudaRecomputeChoice(config, shape, haveBytes, freeBytes)");
      std::vector<CudaArenaShape> reserved;  // optional: the training shapes reserved before
      if (info.Length() > 4 && info[4].IsArray()) {
        Napi::Array list = info[4].As<Napi::Array>();
        for (uint32_t i = 0; i < list.Length(); ++i) {
          if (!list.Get(i).IsObject()) fail(ErrorCode::InvalidArgument, "cudaRecomputeChoice: reserved shapes must be objects");
          reserved.push_back(arena_shape_arg(list.Get(i).As<Napi::Object>()));
        }
      }
      const Recompute r = cuda_recompute_choice(to_config(info[0].As<Napi::Object>()), arena_shape_arg(info[1].As<Napi::Object>()),
                                                static_cast<int64_t>(info[2].As<Napi::Number>().DoubleValue()),
                                                static_cast<int64_t>(info[3].As<Napi::Number>().DoubleValue()), reserved);
      return resolved(info.Env(), Napi::String::New(info.Env(), recompute_name(r)));
    });
  }));
  // cpuLinear(x, w, dy, dxInit | null, n, in, out, threads) -> { y, dx, simd }: the CPU backend's linear kernels
  // (y = x W^T; dx = dy W, added to dxInit when given) on small inputs, synchronously, for test/cpu-linear.test.ts
  testing.Set("cpuLinear", Napi::Function::New(env, [=](const Napi::CallbackInfo& info) -> Napi::Value {
    return settle(info.Env(), [&]() -> Napi::Value {
      if (info.Length() < 8 || !info[0].IsTypedArray() || !info[1].IsTypedArray() || !info[2].IsTypedArray())
        fail(ErrorCode::InvalidArgument, "cpuLinear(x, w, dy, dxInit, n, in, out, threads)");
      const int64_t n = info[4].As<Napi::Number>().Int64Value();
      const int in = info[5].As<Napi::Number>().Int32Value(), out = info[6].As<Napi::Number>().Int32Value();
      const int threads = info[7].As<Napi::Number>().Int32Value();
      auto x = info[0].As<Napi::Float32Array>(), w = info[1].As<Napi::Float32Array>(), dy = info[2].As<Napi::Float32Array>();
      const bool accumulate = info[3].IsTypedArray();
      if (n < 1 || in < 1 || out < 1 || threads < 1 || static_cast<int64_t>(x.ElementLength()) != n * in ||
          static_cast<int64_t>(w.ElementLength()) != static_cast<int64_t>(out) * in ||
          static_cast<int64_t>(dy.ElementLength()) != n * out ||
          (accumulate && static_cast<int64_t>(info[3].As<Napi::Float32Array>().ElementLength()) != n * in))
        fail(ErrorCode::InvalidArgument, "cpuLinear: sizes do not match n, in, out");
      ThreadPool pool(threads);
      Napi::Float32Array y = Napi::Float32Array::New(info.Env(), static_cast<size_t>(n * out));
      Napi::Float32Array dx = Napi::Float32Array::New(info.Env(), static_cast<size_t>(n * in));
      if (accumulate) std::memcpy(dx.Data(), info[3].As<Napi::Float32Array>().Data(), sizeof(float) * n * in);
      cpu::linear_forward(pool, x.Data(), w.Data(), y.Data(), n, in, out);
      cpu::linear_backward_input(pool, dy.Data(), w.Data(), dx.Data(), n, in, out, accumulate);
      Napi::Object o = Napi::Object::New(info.Env());
      o.Set("y", y);
      o.Set("dx", dx);
      o.Set("simd", cpu::linear_simd());
      return resolved(info.Env(), o);
    });
  }));
  // The CPU attention (cuda/cpu/attention.cc) on small inputs, synchronously, for test/cpu-attention.test.ts. Seeds
  // and sites are uint64: passed as BigInt (a Number would lose bits above 2^53).
  auto f32_arg = [](const Napi::Object& o, const char* key, double len, bool optional) {
    Napi::Value v = o.Get(key);
    if (optional && (v.IsUndefined() || v.IsNull())) return std::vector<float>();
    if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != napi_float32_array ||
        static_cast<double>(v.As<Napi::TypedArray>().ElementLength()) != len)
      fail(ErrorCode::InvalidArgument, std::string("'") + key + "' must be a Float32Array of " + std::to_string(static_cast<int64_t>(len)));
    auto a = v.As<Napi::Float32Array>();
    return std::vector<float>(a.Data(), a.Data() + a.ElementLength());
  };
  auto u64_arg = [](const Napi::Object& o, const char* key) {
    Napi::Value v = o.Get(key);
    bool lossless = false;
    const uint64_t u = v.IsBigInt() ? v.As<Napi::BigInt>().Uint64Value(&lossless) : 0;
    if (!lossless) fail(ErrorCode::InvalidArgument, std::string("'") + key + "' must be a BigInt in [0, 2^64)");
    return u;
  };
  auto size_arg = [](const Napi::Object& o, const char* key) {
    const int32_t n = get_int(o, key);
    if (n < 1 || n > (1 << 16)) fail(ErrorCode::InvalidArgument, std::string("'") + key + "' must be in [1, 65536]");
    return n;
  };
  auto rate_arg = [](const Napi::Object& o, const char* key) {
    const double r = get_double(o, key);  // (checked as a double: a rate just below 1 may round to 1 in float)
    if (!(r >= 0 && r < 1 && static_cast<float>(r) < 1.f)) fail(ErrorCode::InvalidArgument, std::string("'") + key + "' must be in [0, 1)");
    return static_cast<float>(r);
  };
  // cpuAttention({ q, k, v, dout, kvOf, keyLen, bias?, dkInit?, dvInit?, batch, heads, dKv, qLen, kLen, kvBatch,
  // causal, dropoutRate, seed, site, threads }) -> { out, probs, dq, dk, dv }: attention_forward, then
  // attention_backward of dout; dk and dv accumulate into dkInit / dvInit (zeros when absent).
  testing.Set("cpuAttention", Napi::Function::New(env, [=](const Napi::CallbackInfo& info) -> Napi::Value {
    return settle(info.Env(), [&]() -> Napi::Value {
      if (info.Length() < 1 || !info[0].IsObject()) fail(ErrorCode::InvalidArgument, "cpuAttention(options)");
      Napi::Object o = info[0].As<Napi::Object>();
      cpu::AttentionShape s;
      s.batch = size_arg(o, "batch"), s.heads = size_arg(o, "heads"), s.d_kv = size_arg(o, "dKv");
      s.q_len = size_arg(o, "qLen"), s.k_len = size_arg(o, "kLen"), s.causal = get_bool(o, "causal");
      const int kv_batch = size_arg(o, "kvBatch"), threads = get_int(o, "threads");
      const double inner = static_cast<double>(s.heads) * s.d_kv, nq = static_cast<double>(s.batch) * s.q_len * inner,
                   nk = static_cast<double>(kv_batch) * s.k_len * inner, np = static_cast<double>(s.batch) * s.heads * s.q_len * s.k_len;
      if (threads < 1 || threads > 64 || std::max({nq, nk, np}) > (1 << 26))
        fail(ErrorCode::InvalidArgument, "cpuAttention: threads in [1, 64], at most 2^26 elements per tensor");
      const std::vector<float> q = f32_arg(o, "q", nq, false), k = f32_arg(o, "k", nk, false), v = f32_arg(o, "v", nk, false),
                               dout = f32_arg(o, "dout", nq, false),
                               bias = f32_arg(o, "bias", static_cast<double>(s.heads) * s.q_len * s.k_len, true);
      std::vector<float> dk = f32_arg(o, "dkInit", nk, true), dv = f32_arg(o, "dvInit", nk, true);
      dk.resize(static_cast<size_t>(nk)), dv.resize(static_cast<size_t>(nk));  // (absent: zeros)
      const std::vector<int32_t> kv_of = get_i32(o, "kvOf"), key_len = get_i32(o, "keyLen");
      if (kv_of.size() != static_cast<size_t>(s.batch) || key_len.size() != static_cast<size_t>(s.batch))
        fail(ErrorCode::InvalidArgument, "cpuAttention: kvOf and keyLen need one entry per query sequence");
      for (int i = 0; i < s.batch; ++i)  // (attention.cc trusts both: a key_len above k_len would read past a row)
        if (kv_of[i] < 0 || kv_of[i] >= kv_batch || key_len[i] < 1 || key_len[i] > s.k_len)
          fail(ErrorCode::InvalidArgument, "cpuAttention: kvOf entries must be in [0, kvBatch), keyLen entries in [1, kLen]");
      const float rate = rate_arg(o, "dropoutRate");
      const uint64_t seed = u64_arg(o, "seed"), site = u64_arg(o, "site");
      Napi::Env env = info.Env();
      auto out = Napi::Float32Array::New(env, static_cast<size_t>(nq)), dq = Napi::Float32Array::New(env, static_cast<size_t>(nq));
      auto probs = Napi::Float32Array::New(env, static_cast<size_t>(np));
      ThreadPool pool(threads);
      cpu::attention_forward(pool, s, q.data(), k.data(), v.data(), kv_of.data(), key_len.data(), bias.empty() ? nullptr : bias.data(),
                             rate, seed, site, probs.Data(), out.Data());
      cpu::attention_backward(pool, s, q.data(), k.data(), v.data(), kv_of.data(), key_len.data(), probs.Data(), rate, seed,
                              site, dout.data(), dq.Data(), dk.data(), dv.data());
      Napi::Object r = Napi::Object::New(env);
      r.Set("out", out), r.Set("probs", probs), r.Set("dq", dq);
      auto to_js = [&](const std::vector<float>& x) {
        auto a = Napi::Float32Array::New(env, x.size());
        std::copy(x.begin(), x.end(), a.Data());
        return a;
      };
      r.Set("dk", to_js(dk)), r.Set("dv", to_js(dv));
      return resolved(env, r);
    });
  }));
  // cpuDropoutKeep(seed, site, rate, n) -> Uint8Array: the dropout mask (1: kept) of indices [0, n) at (seed, site)
  testing.Set("cpuDropoutKeep", Napi::Function::New(env, [=](const Napi::CallbackInfo& info) -> Napi::Value {
    return settle(info.Env(), [&]() -> Napi::Value {
      Napi::Object o = Napi::Object::New(info.Env());  // (the positional arguments, read by the same checks)
      const char* keys[] = {"seed", "site", "rate", "n"};
      for (size_t i = 0; i < 4; ++i) o.Set(keys[i], i < info.Length() ? info[i] : info.Env().Undefined());
      const uint64_t seed = u64_arg(o, "seed"), site = u64_arg(o, "site");
      const float rate = rate_arg(o, "rate");
      const int32_t n = get_int(o, "n");
      if (n < 0 || n > (1 << 26)) fail(ErrorCode::InvalidArgument, "cpuDropoutKeep: n must be in [0, 2^26]");
      auto keep = Napi::Uint8Array::New(info.Env(), static_cast<size_t>(n));
      for (int32_t i = 0; i < n; ++i) keep[i] = cpu::dropout_keep(seed, site, static_cast<uint64_t>(i), rate) ? 1 : 0;
      return resolved(info.Env(), keep);
    });
  }));
  // cpuFfnActivation({ h0, h1, dhidden, gated, n, dFf }) -> { hidden, dh0, dh1 }: ffn_activation_forward and
  // ffn_activation_backward on [n, dFf] pre-activations (h1 and dh1 unused, empty, with relu)
  testing.Set("cpuFfnActivation", Napi::Function::New(env, [=](const Napi::CallbackInfo& info) -> Napi::Value {
    return settle(info.Env(), [&]() -> Napi::Value {
      if (info.Length() < 1 || !info[0].IsObject()) fail(ErrorCode::InvalidArgument, "cpuFfnActivation(options)");
      Napi::Object o = info[0].As<Napi::Object>();
      const int n = size_arg(o, "n"), d_ff = size_arg(o, "dFf");
      const bool gated = get_bool(o, "gated");
      const double count = static_cast<double>(n) * d_ff;
      const std::vector<float> h0 = f32_arg(o, "h0", count, false), dhidden = f32_arg(o, "dhidden", count, false);
      const std::vector<float> h1 = gated ? f32_arg(o, "h1", count, false) : std::vector<float>();
      auto hidden = Napi::Float32Array::New(info.Env(), static_cast<size_t>(count));
      auto dh0 = Napi::Float32Array::New(info.Env(), static_cast<size_t>(count));
      auto dh1 = Napi::Float32Array::New(info.Env(), gated ? static_cast<size_t>(count) : 0);
      ThreadPool pool(1);
      cpu::ffn_activation_forward(pool, h0.data(), gated ? h1.data() : nullptr, gated, n, d_ff, hidden.Data());
      cpu::ffn_activation_backward(pool, h0.data(), gated ? h1.data() : nullptr, gated, dhidden.data(), n, d_ff,
                                   dh0.Data(), gated ? dh1.Data() : nullptr);
      Napi::Object r = Napi::Object::New(info.Env());
      r.Set("hidden", hidden), r.Set("dh0", dh0), r.Set("dh1", dh1);
      return resolved(info.Env(), r);
    });
  }));
  // cpuPositionBias({ table, heads, qLen, kLen, bidirectional, numBuckets, maxDistance }) -> Float32Array
  // [heads, qLen, kLen]: position_bias of a relative_attention_bias table [numBuckets, heads]
  testing.Set("cpuPositionBias", Napi::Function::New(env, [=](const Napi::CallbackInfo& info) -> Napi::Value {
    return settle(info.Env(), [&]() -> Napi::Value {
      if (info.Length() < 1 || !info[0].IsObject()) fail(ErrorCode::InvalidArgument, "cpuPositionBias(options)");
      Napi::Object o = info[0].As<Napi::Object>();
      const int heads = size_arg(o, "heads"), q_len = size_arg(o, "qLen"), k_len = size_arg(o, "kLen");
      const int buckets = size_arg(o, "numBuckets"), max_distance = size_arg(o, "maxDistance");
      const bool bidirectional = get_bool(o, "bidirectional");
      const int max_exact = relative_max_exact(buckets, bidirectional);  // (the log-spaced buckets divide by log(maxDistance / it))
      if (max_exact < 1 || max_distance <= max_exact || static_cast<double>(heads) * q_len * k_len > (1 << 26))
        fail(ErrorCode::InvalidArgument, "cpuPositionBias: too few buckets for maxDistance, or over 2^26 elements");
      const std::vector<float> table = f32_arg(o, "table", static_cast<double>(buckets) * heads, false);
      auto bias = Napi::Float32Array::New(info.Env(), static_cast<size_t>(heads) * q_len * k_len);
      cpu::position_bias(table.data(), heads, q_len, k_len, bidirectional, buckets, max_distance, bias.Data());
      return resolved(info.Env(), bias);
    });
  }));
  // cpuScratchFailFreshBlocks(n) -> number: the CPU backend's next n fresh blocks fail as if out of memory
  // (cuda/cpu/scratch.h); returns how many failures were still pending
  testing.Set("cpuScratchFailFreshBlocks", Napi::Function::New(env, [](const Napi::CallbackInfo& info) -> Napi::Value {
    const int n = info.Length() > 0 && info[0].IsNumber() ? info[0].As<Napi::Number>().Int32Value() : 0;
    return Napi::Number::New(info.Env(), cpu::scratch_fail_fresh_blocks(n));
  }));
  // cpuScratchCachedBytes() -> number: bytes the CPU backend's block cache holds for reuse (cuda/cpu/scratch.h)
  testing.Set("cpuScratchCachedBytes", Napi::Function::New(env, [](const Napi::CallbackInfo& info) -> Napi::Value {
    return Napi::Number::New(info.Env(), static_cast<double>(cpu::scratch_cached_bytes()));
  }));
  // readAfterTruncation(): a temporary file mapped, truncated and read (a truncation during loading): rejects
  // with the Io error, and the process lives on
  testing.Set("readAfterTruncation", Napi::Function::New(env, [=](const Napi::CallbackInfo& info) -> Napi::Value {
    return settle(info.Env(), [&]() -> Napi::Value {
      read_after_truncation_for_test();
      return resolved(info.Env(), info.Env().Undefined());
    });
  }));
#ifdef TFEW_WITH_CUDA
  // normWarpsPerRow(warps): the CUDA norms' warps per row from now on (1, 2, 4 or 8 where it divides the row's
  // 128-column chunks; 0: chosen from the rows, the default)
  testing.Set("normWarpsPerRow", Napi::Function::New(env, [](const Napi::CallbackInfo& info) -> Napi::Value {
    kernels::set_norm_warps_per_row(info[0].ToNumber().Int32Value());
    return info.Env().Undefined();
  }));
#endif
#ifdef TFEW_CUDA_EMULATION
  // emulatorSelfTest(name) -> { error, message }: one deliberate mistake and what the CUDA emulator made of it
  testing.Set("emulatorSelfTest", Napi::Function::New(env, [](const Napi::CallbackInfo& info) -> Napi::Value {
    const emu::SelfTestResult r = emu::run_self_test(info.Length() > 0 ? info[0].ToString().Utf8Value() : "");
    Napi::Object o = Napi::Object::New(info.Env());
    o.Set("error", r.error);
    o.Set("message", r.message);
    return o;
  }));
  // emulatorGraphExecBytes(bytes): the device memory each executable graph holds from now on (-1: the default)
  testing.Set("emulatorGraphExecBytes", Napi::Function::New(env, [](const Napi::CallbackInfo& info) -> Napi::Value {
    emu::set_graph_exec_bytes(static_cast<long long>(info[0].ToNumber().Int64Value()));
    return info.Env().Undefined();
  }));
  // emulatorFailGraphLaunches(count): the next count graph launches find no device memory
  testing.Set("emulatorFailGraphLaunches", Napi::Function::New(env, [](const Napi::CallbackInfo& info) -> Napi::Value {
    emu::fail_graph_launches(info[0].ToNumber().Int32Value());
    return info.Env().Undefined();
  }));
  // emulatorMultiprocessors(count): the SM count the emulated device reports (<= 0: the default, 132)
  testing.Set("emulatorMultiprocessors", Napi::Function::New(env, [](const Napi::CallbackInfo& info) -> Napi::Value {
    emu::set_multiprocessors(info[0].ToNumber().Int32Value());
    return info.Env().Undefined();
  }));
  // emulatorLaunchCounts(reset) -> { ordinary, programmatic }: kernel launches so far (not graph replays)
  testing.Set("emulatorLaunchCounts", Napi::Function::New(env, [](const Napi::CallbackInfo& info) -> Napi::Value {
    const emu::LaunchCounts c = emu::launch_counts(info.Length() > 0 && info[0].ToBoolean().Value());
    Napi::Object o = Napi::Object::New(info.Env());
    o.Set("ordinary", static_cast<double>(c.ordinary));
    o.Set("programmatic", static_cast<double>(c.programmatic));
    return o;
  }));
  // emulatorGemmTuningPrefersCublasLt(on): the GEMM tuner keeps a cuBLASLt candidate wherever it can (gpu/gemm.h)
  testing.Set("emulatorGemmTuningPrefersCublasLt", Napi::Function::New(env, [](const Napi::CallbackInfo& info) -> Napi::Value {
    gpu::set_gemm_tuning_prefers_cublaslt(info[0].ToBoolean().Value());
    return info.Env().Undefined();
  }));
  // emulatorHoldDeviceMemory(bytes) -> bool: another process holds that much of the current device (0: none)
  testing.Set("emulatorHoldDeviceMemory", Napi::Function::New(env, [](const Napi::CallbackInfo& info) -> Napi::Value {
    const double bytes = info[0].ToNumber().DoubleValue();
    return Napi::Boolean::New(info.Env(), bytes >= 0 && emu::hold_device_memory(static_cast<size_t>(bytes)));
  }));
#endif
  exports.Set("_testing", testing);
  return exports;
}

NODE_API_MODULE(tfew, Init)

}  // namespace napi
}  // namespace tfew
