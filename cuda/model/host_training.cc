// The host training session and HF's Adafactor in C++ (the same steps as lib/optim.ts, which the tests
// compare it with): state in float64, parameters in float32.
#include <algorithm>
#include <cmath>

#include "core/errors.h"
#include "engine.h"
#include "training.h"

namespace tfew {

double linear_warmup_decay(int step, int total_steps, double warmup_steps) {
  if (step < warmup_steps) return step / std::max(1.0, warmup_steps);
  return std::max(0.0, (total_steps - step) / std::max(1.0, total_steps - warmup_steps));
}

std::vector<AdafactorModule> adafactor_modules(const T5Config& c) {
  IA3Layout l = IA3Layout::make(c);
  const int inner = c.inner_dim(), ff = c.d_ff;
  std::vector<AdafactorModule> m;
  auto kv = [&](int64_t off) { m.push_back({off, inner, 1}); };  // PEFT shape [inner, 1]
  auto f = [&](int64_t off) { m.push_back({off, 1, ff}); };       // PEFT shape [1, d_ff]
  for (const auto& b : l.encoder) { kv(b.self_k); kv(b.self_v); f(b.ff); }
  for (const auto& b : l.decoder) { kv(b.self_k); kv(b.self_v); kv(b.cross_k); kv(b.cross_v); f(b.ff); }
  return m;
}

static double rms(const float* x, int64_t n) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += static_cast<double>(x[i]) * x[i];
  return std::sqrt(s / n);
}

void adafactor_step(const OptimizerOptions& o, const std::vector<AdafactorModule>& modules,
                    std::vector<AdafactorModuleState>& state, float* params, const double* grads, double lr) {
  std::vector<double> update;
  for (size_t mi = 0; mi < modules.size(); ++mi) {
    const AdafactorModule& m = modules[mi];
    AdafactorModuleState& st = state[mi];
    const int64_t n = static_cast<int64_t>(m.rows) * m.cols;
    float* p = params + m.offset;
    const double* g = grads + m.offset;
    if (st.row_sq.empty()) {
      st.row_sq.assign(m.rows, 0.0);
      st.col_sq.assign(m.cols, 0.0);
    }
    st.step += 1;
    // _get_lr: lr * max(eps2, RMS(p)) with scale_parameter; beta2 = 1 - step^decay_rate
    const double lr_t = lr * (o.scale_parameter ? std::max(o.eps2, rms(p, n)) : 1.0);
    const double beta2 = 1.0 - std::pow(static_cast<double>(st.step), o.decay_rate);
    // factored second moment: running means of g^2 + eps1 along rows and along columns
    for (int i = 0; i < m.rows; ++i) {
      double s = 0;
      for (int j = 0; j < m.cols; ++j) s += g[i * m.cols + j] * g[i * m.cols + j] + o.eps1;
      st.row_sq[i] = beta2 * st.row_sq[i] + (1 - beta2) * (s / m.cols);
    }
    for (int j = 0; j < m.cols; ++j) {
      double s = 0;
      for (int i = 0; i < m.rows; ++i) s += g[i * m.cols + j] * g[i * m.cols + j] + o.eps1;
      st.col_sq[j] = beta2 * st.col_sq[j] + (1 - beta2) * (s / m.rows);
    }
    // _approx_sq_grad: update = g / sqrt(row_sq[i] / mean(row_sq) * col_sq[j])
    double row_mean = 0;
    for (double r : st.row_sq) row_mean += r;
    row_mean /= m.rows;
    update.resize(n);
    double usq = 0;
    for (int i = 0; i < m.rows; ++i)
      for (int j = 0; j < m.cols; ++j) {
        double u = g[i * m.cols + j] / std::sqrt(st.row_sq[i] / row_mean) / std::sqrt(st.col_sq[j]);
        update[i * m.cols + j] = u;
        usq += u * u;
      }
    // the update's RMS is clipped to clip_threshold, then scaled by the step size; weight decay first
    const double scale = lr_t / std::max(1.0, std::sqrt(usq / n) / o.clip_threshold);
    const double keep = o.weight_decay != 0 ? 1 - o.weight_decay * lr_t : 1.0;
    for (int64_t k = 0; k < n; ++k) p[k] = static_cast<float>(p[k] * keep - update[k] * scale);
  }
}

namespace {

class HostTrainingSession : public TrainingSession {
 public:
  HostTrainingSession(const T5Config& c, std::vector<std::vector<float>> initial, const OptimizerOptions& o)
      : options_(o), modules_(adafactor_modules(c)), size_(IA3Layout::make(c).total), params_(std::move(initial)) {
    TFEW_CHECK_ARG(!params_.empty(), "a training session needs at least one adapter");
    TFEW_CHECK_ARG(o.total_steps >= 1, "total_steps must be >= 1");
    TFEW_CHECK_ARG(o.lr > 0 && std::isfinite(o.lr), "lr must be a positive number");
    for (const auto& p : params_)
      if (static_cast<int64_t>(p.size()) != size_)
        fail(ErrorCode::InvalidAdapter, "adapter has " + std::to_string(p.size()) + " values; this model needs " + std::to_string(size_));
    state_.assign(params_.size(), std::vector<AdafactorModuleState>(modules_.size()));
  }

  int num_adapters() const override { return static_cast<int>(params_.size()); }

  std::vector<float> read(int a) const override {
    TFEW_CHECK_ARG(a >= 0 && a < num_adapters(), "adapter index out of range");
    return params_[a];
  }

  TrainStepOutput step(Engine& engine, const Batch& batch, const LossOptions& loss, int schedule_step) override {
    if (schedule_step >= 0) schedule_ = schedule_step;
    AdapterSet set;
    for (const auto& p : params_) set.vectors.push_back(p.data());
    LossOutput g = engine.loss_and_gradients(batch, set, loss);

    TrainStepOutput out;
    out.lm_loss = g.lm_loss;
    out.ul_loss = g.ul_loss;
    out.ln_loss = g.ln_loss;
    out.total_loss = g.total_loss;
    out.lr = options_.lr * linear_warmup_decay(schedule_, options_.total_steps,
                                               options_.total_steps * options_.warmup_ratio);
    out.grad_norms.assign(params_.size(), 0.0);
    out.stepped.assign(params_.size(), 0);
    for (int a : batch.adapter_of_example)
      if (a >= 0) out.stepped[a] = 1;
    std::vector<double> grad(size_);
    for (size_t a = 0; a < params_.size(); ++a) {
      if (!out.stepped[a]) continue;  // no gradient: no step (as a parameter without .grad in PyTorch)
      const float* ga = g.gradients.data() + a * size_;
      double sq = 0;
      for (int64_t i = 0; i < size_; ++i) sq += static_cast<double>(ga[i]) * ga[i];
      const double norm = std::sqrt(sq);
      out.grad_norms[a] = norm;
      double coef = 1.0;
      if (options_.clip_norm > 0 && std::isfinite(options_.clip_norm)) coef = std::min(1.0, options_.clip_norm / (norm + 1e-6));
      for (int64_t i = 0; i < size_; ++i) grad[i] = ga[i] * coef;
      adafactor_step(options_, modules_, state_[a], params_[a].data(), grad.data(), out.lr);
    }
    ++schedule_;
    return out;
  }

 private:
  OptimizerOptions options_;
  std::vector<AdafactorModule> modules_;
  int64_t size_;
  std::vector<std::vector<float>> params_;
  std::vector<std::vector<AdafactorModuleState>> state_;
  int schedule_ = 0;
};

}  // namespace

std::unique_ptr<TrainingSession> make_host_training_session(const T5Config& config,
                                                            std::vector<std::vector<float>> initial,
                                                            const OptimizerOptions& options) {
  return std::make_unique<HostTrainingSession>(config, std::move(initial), options);
}

}  // namespace tfew
