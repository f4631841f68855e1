// A training session: the (IA)3 vectors of one or more adapters and their optimizer state, held by the
// native side so a T-Few step (forward, LM + UL + LN losses, backward, clipping, schedule, Adafactor) needs
// no round trip through JavaScript beyond the scalars it reports. The host implementation
// (host_training.cc) works with any Engine; a backend may provide its own (e.g. state in device memory).
//
// Semantics are those of lib/optim.ts (TfewOptimizer), the readable oracle: per adapter, clip its gradient to
// clip_norm (torch clip_grad_norm_), take the scheduled lr (linear warmup over warmup_ratio * total_steps
// from 0, then linear decay to 0), and apply HF Adafactor per (IA)3 module with its PEFT shape ([n,1] for k/v,
// [1,d_ff] for the FFN vector: the factored second moment). Adapters absent from a batch do not step.
#pragma once
#include <memory>
#include <vector>

#include "batch.h"
#include "t5_config.h"

namespace tfew {

class Engine;

struct OptimizerOptions {
  double lr = 3e-3;
  int total_steps = 1000;
  double warmup_ratio = 0.06;
  double clip_norm = 1.0;  // <= 0: no clipping
  bool scale_parameter = true;
  double weight_decay = 0.0;
  // HF Adafactor constants (relative_step = warmup_init = false, no first moment).
  double eps1 = 1e-30, eps2 = 1e-3, clip_threshold = 1.0, decay_rate = -0.8;
};

struct TrainStepOutput {
  double lm_loss = 0, ul_loss = 0, ln_loss = 0, total_loss = 0;
  double lr = 0;                   // the scheduled lr of this step
  std::vector<double> grad_norms;  // per adapter, before clipping (0 for adapters not in the batch)
  std::vector<char> stepped;       // per adapter: was it in the batch
};

class TrainingSession {
 public:
  virtual ~TrainingSession() = default;
  virtual int num_adapters() const = 0;
  // One optimizer step on `batch` (adapter_of_example indexes this session's adapters). schedule_step < 0:
  // the next position of the schedule; otherwise that position (then continues from it).
  virtual TrainStepOutput step(Engine& engine, const Batch& batch, const LossOptions& loss, int schedule_step) = 0;
  // The current vectors of adapter i (IA3Layout order).
  virtual std::vector<float> read(int adapter) const = 0;
};

std::unique_ptr<TrainingSession> make_host_training_session(const T5Config& config,
                                                            std::vector<std::vector<float>> initial,
                                                            const OptimizerOptions& options);

// ---- the optimizer pieces, exposed for tests and for backends that reuse them ----

// The scheduled lr factor at LambdaLR step `step` (transformers' get_linear_schedule_with_warmup).
double linear_warmup_decay(int step, int total_steps, double warmup_steps);

// One (IA)3 module as Adafactor sees it: a rows x cols parameter at `offset` of the flat adapter.
struct AdafactorModule {
  int64_t offset;
  int rows, cols;
};
struct AdafactorModuleState {
  int64_t step = 0;
  std::vector<double> row_sq, col_sq;  // running means of g^2 + eps1 along each row / column
};
std::vector<AdafactorModule> adafactor_modules(const T5Config& config);
// HF Adafactor on every module of one adapter, in place; `lr` is the scheduled lr.
void adafactor_step(const OptimizerOptions& o, const std::vector<AdafactorModule>& modules,
                    std::vector<AdafactorModuleState>& state, float* params, const double* grads, double lr);

}  // namespace tfew
