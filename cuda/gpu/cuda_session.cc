// Training sessions on the CUDA engine: the adapters' vectors, their gradients and the Adafactor state live in
// device memory for the whole run. A step is the training forward and backward of cuda_training.cc reading
// the session's vectors, then kernels/adafactor.cu (per-adapter clipping + HF Adafactor) updating them in
// place: only the per-token log-probs (the T-Few losses are computed on the host, as in loss_and_gradients)
// and the per-adapter gradient norms cross to the host. Same maths as cuda/model/host_training.cc.
#include "gpu/cuda_engine.h"
#include "kernels/adafactor.cuh"

namespace tfew {
namespace gpu {

template <typename T>
class DeviceTrainingSession final : public TrainingSession {
 public:
  DeviceTrainingSession(CudaEngine<T>& engine, const T5Config& config, std::vector<std::vector<float>> initial,
                        const OptimizerOptions& options)
      : engine_(engine), options_(options), size_(IA3Layout::make(config).total), n_(static_cast<int>(initial.size())) {
    TFEW_CUDA_CHECK(cudaGetDevice(&device_));  // (the engine's: create_training_session set it)
    TFEW_CHECK_ARG(n_ > 0, "a training session needs at least one adapter");
    TFEW_CHECK_ARG(options.total_steps >= 1, "total_steps must be >= 1");
    for (const auto& v : initial)
      if (static_cast<int64_t>(v.size()) != size_)
        fail(ErrorCode::InvalidAdapter, "adapter has " + std::to_string(v.size()) + " values; this model needs " +
                                            std::to_string(size_));
    // module table: PEFT shapes and where each module's factored second moment lives
    std::vector<kernels::AdafactorModuleDesc> descs;
    for (const AdafactorModule& m : adafactor_modules(config)) {
      descs.push_back({m.offset, m.rows, m.cols, state_size_, state_size_ + m.rows});
      state_size_ += m.rows + m.cols;
    }
    num_modules_ = static_cast<int>(descs.size());
    params_.allocate(static_cast<size_t>(n_) * size_ * sizeof(float), "training session vectors");
    state_.allocate(static_cast<size_t>(n_) * state_size_ * sizeof(float), "Adafactor state");
    modules_.allocate(descs.size() * sizeof(kernels::AdafactorModuleDesc), "Adafactor module table");
    flags_.allocate(2 * static_cast<size_t>(n_) * sizeof(int32_t), "Adafactor step flags");
    module_sq_.allocate(static_cast<size_t>(n_) * num_modules_ * sizeof(float), "Adafactor scratch");
    grad_norms_.allocate(static_cast<size_t>(n_) * sizeof(float), "gradient norms");
    flags_host_.allocate(flags_.size());
    norms_host_.allocate(grad_norms_.size());
    for (int a = 0; a < n_; ++a)
      TFEW_CUDA_CHECK(cudaMemcpy(params_.get() + static_cast<size_t>(a) * size_ * sizeof(float), initial[a].data(),
                                 size_ * sizeof(float), cudaMemcpyHostToDevice));
    TFEW_CUDA_CHECK(cudaMemset(state_.get(), 0, state_.size()));
    TFEW_CUDA_CHECK(cudaMemcpy(modules_.get(), descs.data(), modules_.size(), cudaMemcpyHostToDevice));
    // The copies above ran on the legacy stream, which the engine's non-blocking stream does not wait for.
    TFEW_CUDA_CHECK(cudaDeviceSynchronize());
    steps_taken_.assign(n_, 0);
  }

  // Its memory is freed on its own GPU, whichever thread ends it (a pool thread that never set a device, the
  // garbage collector's): freeing with another GPU current would create a context there.
  ~DeviceTrainingSession() override { cudaSetDevice(device_); }

  int num_adapters() const override { return n_; }

  TrainStepOutput step(Engine& engine, const Batch& batch, const LossOptions& loss, int schedule_step) override {
    if (&engine != &engine_) fail(ErrorCode::InvalidArgument, "this training session belongs to another model");
    return engine_.session_step(*this, batch, loss, schedule_step);
  }

  std::vector<float> read(int adapter) const override { return engine_.session_read(*this, adapter); }

 private:
  friend class CudaEngine<T>;
  CudaEngine<T>& engine_;
  int device_ = 0;
  OptimizerOptions options_;
  int64_t size_;
  int n_;
  int num_modules_ = 0;
  int64_t state_size_ = 0;
  int schedule_ = 0;
  std::vector<int32_t> steps_taken_;  // Adafactor's per-adapter step count (adapters step only when in a batch)
  DeviceMemory params_, state_, modules_, flags_, module_sq_, grad_norms_;
  // pinned staging of the step flags (in) and gradient norms (out): copies that never wait on the stream
  PinnedMemory flags_host_, norms_host_;
};

template <typename T>
std::unique_ptr<TrainingSession> CudaEngine<T>::create_training_session(std::vector<std::vector<float>> initial,
                                                                        const OptimizerOptions& options) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_usable();
  TFEW_CUDA_CHECK(cudaSetDevice(device_));
  return std::make_unique<DeviceTrainingSession<T>>(*this, config_, std::move(initial), options);
}

template <typename T>
TrainStepOutput CudaEngine<T>::session_step(DeviceTrainingSession<T>& s, const Batch& b, const LossOptions& loss,
                                            int schedule_step) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_usable();
  TFEW_CUDA_CHECK(cudaSetDevice(device_));
  try {
    validate(b, s.n_);
    if (schedule_step >= 0) s.schedule_ = schedule_step;
    TrainStepOutput out;
    out.lr = s.options_.lr * linear_warmup_decay(s.schedule_, s.options_.total_steps,
                                                 s.options_.total_steps * s.options_.warmup_ratio);
    out.grad_norms.assign(s.n_, 0.0);
    out.stepped.assign(s.n_, 0);
    for (int a : b.adapter_of_example)
      if (a >= 0) out.stepped[a] = 1;

    adapter_source_ = reinterpret_cast<const float*>(s.params_.get());
    const float* grads = train_to_device(b, s.n_, loss);
    adapter_source_ = nullptr;

    if (grads) {
      // (the previous step's copies are done: every step ends with a synchronisation)
      int32_t* flags = reinterpret_cast<int32_t*>(s.flags_host_.get());
      for (int a = 0; a < s.n_; ++a) {
        s.steps_taken_[a] += out.stepped[a] ? 1 : 0;
        flags[a] = out.stepped[a];
        flags[s.n_ + a] = s.steps_taken_[a];
      }
      int32_t* flags_dev = reinterpret_cast<int32_t*>(s.flags_.get());
      TFEW_CUDA_CHECK(cudaMemcpyAsync(flags_dev, flags, s.flags_.size(), cudaMemcpyHostToDevice, stream_));
      kernels::AdafactorParams p;
      p.modules = reinterpret_cast<const kernels::AdafactorModuleDesc*>(s.modules_.get());
      p.num_modules = s.num_modules_;
      p.adapter_size = s.size_;
      p.state_size = s.state_size_;
      p.lr = static_cast<float>(out.lr);
      p.scale_parameter = s.options_.scale_parameter;
      p.clip_norm = static_cast<float>(s.options_.clip_norm);
      p.weight_decay = static_cast<float>(s.options_.weight_decay);
      p.eps1 = static_cast<float>(s.options_.eps1);
      p.eps2 = static_cast<float>(s.options_.eps2);
      p.clip_threshold = static_cast<float>(s.options_.clip_threshold);
      p.decay_rate = static_cast<float>(s.options_.decay_rate);
      float* norms_dev = reinterpret_cast<float*>(s.grad_norms_.get());
      kernels::adafactor_step(p, s.n_, flags_dev, flags_dev + s.n_, reinterpret_cast<float*>(s.params_.get()), grads,
                              reinterpret_cast<float*>(s.state_.get()), reinterpret_cast<float*>(s.module_sq_.get()),
                              norms_dev, stream_);
      TFEW_CUDA_CHECK(cudaMemcpyAsync(s.norms_host_.get(), norms_dev, s.grad_norms_.size(), cudaMemcpyDeviceToHost,
                                      stream_));
    } else {
      std::fill(out.stepped.begin(), out.stepped.end(), 0);  // no adapter in the batch: nothing steps
    }
    LossOutput lo;
    read_train_results(lo, false);  // synchronises the stream: the step's one wait
    const float* norms = reinterpret_cast<const float*>(s.norms_host_.get());
    for (int a = 0; a < s.n_; ++a) out.grad_norms[a] = grads && out.stepped[a] ? norms[a] : 0.0;
    out.lm_loss = lo.lm_loss;
    out.ul_loss = lo.ul_loss;
    out.ln_loss = lo.ln_loss;
    out.total_loss = lo.total_loss;
    ++s.schedule_;
    return out;
  } catch (...) {
    adapter_source_ = nullptr;
    after_failure();
    throw;
  }
}

template <typename T>
std::vector<float> CudaEngine<T>::session_read(const DeviceTrainingSession<T>& s, int adapter) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_usable();
  TFEW_CHECK_ARG(adapter >= 0 && adapter < s.n_, "adapter index out of range");
  TFEW_CUDA_CHECK(cudaSetDevice(device_));
  std::vector<float> out(s.size_);
  TFEW_CUDA_CHECK(cudaMemcpyAsync(out.data(), s.params_.get() + static_cast<size_t>(adapter) * s.size_ * sizeof(float),
                                  s.size_ * sizeof(float), cudaMemcpyDeviceToHost, stream_));
  TFEW_CUDA_CHECK(cudaStreamSynchronize(stream_));
  return out;
}

template class DeviceTrainingSession<float>;
template class DeviceTrainingSession<__nv_bfloat16>;
template std::unique_ptr<TrainingSession> CudaEngine<float>::create_training_session(std::vector<std::vector<float>>, const OptimizerOptions&);
template std::unique_ptr<TrainingSession> CudaEngine<__nv_bfloat16>::create_training_session(std::vector<std::vector<float>>, const OptimizerOptions&);
template TrainStepOutput CudaEngine<float>::session_step(DeviceTrainingSession<float>&, const Batch&, const LossOptions&, int);
template TrainStepOutput CudaEngine<__nv_bfloat16>::session_step(DeviceTrainingSession<__nv_bfloat16>&, const Batch&, const LossOptions&, int);
template std::vector<float> CudaEngine<float>::session_read(const DeviceTrainingSession<float>&, int);
template std::vector<float> CudaEngine<__nv_bfloat16>::session_read(const DeviceTrainingSession<__nv_bfloat16>&, int);

}  // namespace gpu
}  // namespace tfew
