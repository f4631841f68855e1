// The T-Few optimizer, written to read like the recipe it reproduces (tfew-spec.md "Adafactor step"):
//   1. global gradient-norm clipping at 1.0 (torch.nn.utils.clip_grad_norm_),
//   2. Hugging Face transformers' Adafactor (scale_parameter=True, relative_step=False, warmup_init=False,
//      no first moment, eps (1e-30, 1e-3), clip_threshold 1, decay_rate -0.8, weight decay 0),
//   3. a LambdaLR linear warmup over 6% of the steps from factor 0, then linear decay to 0 at the last step.
// This file is the oracle a device-side Adafactor is checked against, so it favours clarity over speed:
// every (IA)3 module is one parameter tensor with its own state and its own RMS, and the arithmetic runs
// in float64 (the vectors are at most a few thousand values each).
import type { IA3Module } from './adapter';
import { InvalidArgumentError } from './errors';

/** Parameters and gradients may be float32 (adapters) or float64 (fixtures, tests). */
export type FloatArray = Float32Array | Float64Array;

export interface AdafactorOptions {
  /** The external learning rate (HF's `lr`); T-Few uses 3e-3. A schedule may override it per step. */
  lr?: number;
  /** [eps1, eps2]: eps1 regularises the squared gradient, eps2 floors the parameter scale. */
  eps?: [number, number];
  /** Updates whose RMS exceeds this are scaled down to it. */
  clipThreshold?: number;
  /** beta2 at step t is 1 - t^decayRate. */
  decayRate?: number;
  weightDecay?: number;
  /** Multiply the learning rate by max(eps2, RMS(parameter)). T-Few: true. */
  scaleParameter?: boolean;
  /** HF's time-dependent step size min(1e-2, 1/sqrt(t)) in place of lr. T-Few: false. */
  relativeStep?: boolean;
  /** With relativeStep, start from 1e-6 * t instead of 1e-2. T-Few: false. */
  warmupInit?: boolean;
}

type ResolvedAdafactorOptions = Required<AdafactorOptions>;

/** The defaults are T-Few's settings, not HF's (HF defaults to relative_step=True). */
export const TFEW_ADAFACTOR_DEFAULTS: Readonly<ResolvedAdafactorOptions> = Object.freeze({
  lr: 3e-3,
  eps: [1e-30, 1e-3] as [number, number],
  clipThreshold: 1.0,
  decayRate: -0.8,
  weightDecay: 0,
  scaleParameter: true,
  relativeStep: false,
  warmupInit: false,
});

/**
 * Adafactor's per-tensor state. Every (IA)3 vector has a 2-D PEFT shape ([out, 1] or [1, in]), and HF
 * factors the second moment of every tensor with two or more dimensions, so the state is always the
 * row and column running means (for these shapes this reduces to a per-element second moment).
 */
export interface AdafactorModuleState {
  /** Number of steps this tensor has taken. */
  step: number;
  /** RMS of the parameter before the latest step (HF keeps it as state["RMS"]). */
  rms: number;
  /** Running mean over columns of g^2 + eps1, one per row: [rows]. */
  rowSq: Float64Array;
  /** Running mean over rows of g^2 + eps1, one per column: [cols]. */
  colSq: Float64Array;
}

function checkFinitePositive(name: string, v: number): void {
  if (!Number.isFinite(v) || v <= 0) throw new InvalidArgumentError(`${name} must be a finite number > 0, got ${v}`);
}

function checkModules(modules: readonly IA3Module[]): number {
  let end = 0;
  for (const m of modules) {
    const [rows, cols] = m.peftShape;
    if (!Number.isInteger(rows) || !Number.isInteger(cols) || rows < 1 || cols < 1 || rows * cols !== m.length) {
      throw new InvalidArgumentError(`module ${m.name}: shape [${m.peftShape}] does not hold ${m.length} values`);
    }
    if (!Number.isInteger(m.offset) || m.offset < 0) throw new InvalidArgumentError(`module ${m.name}: bad offset ${m.offset}`);
    end = Math.max(end, m.offset + m.length);
  }
  return end;
}

/** Root mean square of values[start, start + n), in float64 (HF: tensor.norm(2) / sqrt(numel)). */
function rms(values: ArrayLike<number>, start: number, n: number): number {
  let sum = 0;
  for (let i = 0; i < n; i++) {
    const v = values[start + i];
    sum += v * v;
  }
  return Math.sqrt(sum / n);
}

/**
 * Hugging Face transformers' Adafactor over the modules of one flat adapter array. One instance holds the
 * state of one adapter; call step() once per optimizer step with that adapter's parameters and gradient.
 */
export class Adafactor {
  readonly modules: readonly IA3Module[];
  readonly options: Readonly<ResolvedAdafactorOptions>;
  readonly size: number;
  private readonly states: AdafactorModuleState[];

  constructor(modules: readonly IA3Module[], options: AdafactorOptions = {}) {
    const o: ResolvedAdafactorOptions = { ...TFEW_ADAFACTOR_DEFAULTS, ...stripUndefined(options) };
    if (!o.relativeStep) checkFinitePositive('lr', o.lr);
    if (!Array.isArray(o.eps) || o.eps.length !== 2 || !(o.eps[0] >= 0) || !(o.eps[1] >= 0)) {
      throw new InvalidArgumentError(`eps must be a pair of numbers >= 0, got ${JSON.stringify(o.eps)}`);
    }
    checkFinitePositive('clipThreshold', o.clipThreshold);
    if (!Number.isFinite(o.decayRate) || o.decayRate >= 0) {
      throw new InvalidArgumentError(`decayRate must be < 0, got ${o.decayRate}`);
    }
    if (!Number.isFinite(o.weightDecay) || o.weightDecay < 0) {
      throw new InvalidArgumentError(`weightDecay must be >= 0, got ${o.weightDecay}`);
    }
    if (modules.length === 0) throw new InvalidArgumentError('Adafactor needs at least one module');
    this.size = checkModules(modules);
    this.modules = modules;
    this.options = Object.freeze({ ...o, eps: [o.eps[0], o.eps[1]] as [number, number] });
    this.states = modules.map((m) => ({
      step: 0,
      rms: 0,
      rowSq: new Float64Array(m.peftShape[0]),
      colSq: new Float64Array(m.peftShape[1]),
    }));
  }

  /** The state of module i (for inspection and tests; do not modify). */
  state(i: number): Readonly<AdafactorModuleState> {
    return this.states[i];
  }

  /** The steps taken so far (all modules step together). */
  get stepCount(): number {
    return this.states[0].step;
  }

  /**
   * HF's _get_lr: the step size (lr, or the relative step) times max(eps2, RMS(p)) when scaleParameter.
   * `step` is the tensor's step count after incrementing, `paramRms` the RMS of the parameter before the update.
   */
  effectiveLr(lr: number, step: number, paramRms: number): number {
    const o = this.options;
    let stepSize = lr;
    if (o.relativeStep) {
      const minStep = o.warmupInit ? 1e-6 * step : 1e-2;
      stepSize = Math.min(minStep, 1 / Math.sqrt(step));
    }
    const paramScale = o.scaleParameter ? Math.max(o.eps[1], paramRms) : 1.0;
    return paramScale * stepSize;
  }

  /**
   * One optimizer step, in place on `params`. `lr` replaces options.lr for this step (what a LambdaLR
   * schedule does to the param group). `grads` is read only.
   */
  step(params: FloatArray, grads: ArrayLike<number>, lr: number = this.options.lr): void {
    if (params.length !== this.size || grads.length !== this.size) {
      throw new InvalidArgumentError(
        `Adafactor.step: expected ${this.size} parameters and gradients, got ${params.length} and ${grads.length}`,
      );
    }
    if (!Number.isFinite(lr) || lr < 0) throw new InvalidArgumentError(`lr must be a finite number >= 0, got ${lr}`);
    const { eps, clipThreshold, decayRate, weightDecay } = this.options;
    const eps1 = eps[0];

    for (let mi = 0; mi < this.modules.length; mi++) {
      const { offset, length } = this.modules[mi];
      const [rows, cols] = this.modules[mi].peftShape;
      const st = this.states[mi];

      st.step += 1;
      st.rms = rms(params, offset, length);
      const lrT = this.effectiveLr(lr, st.step, st.rms);
      const beta2t = 1.0 - Math.pow(st.step, decayRate);

      // Running means of (g^2 + eps1) along each row and each column (the factored second moment).
      for (let i = 0; i < rows; i++) {
        let sum = 0;
        for (let j = 0; j < cols; j++) {
          const g = grads[offset + i * cols + j];
          sum += g * g + eps1;
        }
        st.rowSq[i] = beta2t * st.rowSq[i] + (1 - beta2t) * (sum / cols);
      }
      for (let j = 0; j < cols; j++) {
        let sum = 0;
        for (let i = 0; i < rows; i++) {
          const g = grads[offset + i * cols + j];
          sum += g * g + eps1;
        }
        st.colSq[j] = beta2t * st.colSq[j] + (1 - beta2t) * (sum / rows);
      }

      // HF's _approx_sq_grad: v[i,j] ~ rowSq[i] * colSq[j] / mean(rowSq); update = g / sqrt(v).
      let rowMean = 0;
      for (let i = 0; i < rows; i++) rowMean += st.rowSq[i];
      rowMean /= rows;
      const update = new Float64Array(length);
      for (let i = 0; i < rows; i++) {
        const rFactor = 1 / Math.sqrt(st.rowSq[i] / rowMean);
        for (let j = 0; j < cols; j++) {
          const cFactor = 1 / Math.sqrt(st.colSq[j]);
          update[i * cols + j] = rFactor * cFactor * grads[offset + i * cols + j];
        }
      }

      // Scale the update down when its RMS exceeds the threshold, then by the step size.
      const clipDivisor = Math.max(1.0, rms(update, 0, length) / clipThreshold);
      const scale = lrT / clipDivisor;

      // Weight decay is applied to the parameter before the update, with the same effective lr.
      const keep = weightDecay !== 0 ? 1 - weightDecay * lrT : 1;
      for (let k = 0; k < length; k++) {
        params[offset + k] = params[offset + k] * keep - update[k] * scale;
      }
    }
  }
}

/**
 * torch.nn.utils.clip_grad_norm_ over one flat gradient: scales `grads` in place by
 * maxNorm / (norm + 1e-6) when that is below 1, and returns the L2 norm before clipping.
 * maxNorm <= 0 or Infinity disables clipping (the norm is still returned).
 */
export function clipGradNorm(grads: FloatArray, maxNorm: number): number {
  let sum = 0;
  for (let i = 0; i < grads.length; i++) sum += grads[i] * grads[i];
  const norm = Math.sqrt(sum);
  if (maxNorm > 0 && Number.isFinite(maxNorm)) {
    const coef = maxNorm / (norm + 1e-6);
    if (coef < 1) for (let i = 0; i < grads.length; i++) grads[i] *= coef;
  }
  return norm;
}

/**
 * transformers' get_linear_schedule_with_warmup as a LambdaLR factor: rises linearly from 0 at step 0
 * to 1 at `warmupSteps`, then falls linearly to 0 at `totalSteps`. `step` is LambdaLR's counter, i.e. the
 * number of optimizer steps already taken (the first step uses factor 0, as in T-Few).
 */
export function linearWarmupDecay(step: number, totalSteps: number, warmupSteps: number): number {
  if (step < warmupSteps) return step / Math.max(1, warmupSteps);
  return Math.max(0, (totalSteps - step) / Math.max(1, totalSteps - warmupSteps));
}

/** T-Few's warmup length: warmup_ratio * num_steps, kept fractional as T-Few passes it (60 of 1000). */
export function warmupSteps(totalSteps: number, warmupRatio: number): number {
  return totalSteps * warmupRatio;
}

export interface TfewOptimizerOptions {
  /** Peak learning rate. Default 3e-3. */
  lr?: number;
  /** Length of the schedule (T-Few: 1000). */
  totalSteps?: number;
  /** Fraction of totalSteps spent warming up (T-Few: 0.06). */
  warmupRatio?: number;
  /** Global gradient-norm clipping threshold; 0 or Infinity disables it. Default 1.0. */
  clipNorm?: number;
  scaleParameter?: boolean;
  weightDecay?: number;
}

export interface TfewStepInfo {
  /** The scheduled learning rate used for this step (before Adafactor's parameter scaling). */
  lr: number;
  /** The global gradient L2 norm before clipping. */
  gradNorm: number;
}

/**
 * The whole T-Few update for one adapter: clip, schedule, Adafactor. One instance per adapter (its own
 * Adafactor state, its own clipping norm).
 */
export class TfewOptimizer {
  readonly adafactor: Adafactor;
  readonly lr: number;
  readonly totalSteps: number;
  readonly warmupSteps: number;
  readonly clipNorm: number;
  /** LambdaLR's counter: how many optimizer steps the schedule has seen. */
  scheduleStep = 0;
  private scratch: Float64Array;

  constructor(modules: readonly IA3Module[], options: TfewOptimizerOptions = {}) {
    const lr = options.lr ?? 3e-3;
    const totalSteps = options.totalSteps ?? 1000;
    const warmupRatio = options.warmupRatio ?? 0.06;
    const clipNorm = options.clipNorm ?? 1.0;
    checkFinitePositive('lr', lr);
    if (!Number.isInteger(totalSteps) || totalSteps < 1) {
      throw new InvalidArgumentError(`totalSteps must be an integer >= 1, got ${totalSteps}`);
    }
    if (!(warmupRatio >= 0 && warmupRatio <= 1)) {
      throw new InvalidArgumentError(`warmupRatio must be in [0, 1], got ${warmupRatio}`);
    }
    if (Number.isNaN(clipNorm) || clipNorm < 0) throw new InvalidArgumentError(`clipNorm must be >= 0, got ${clipNorm}`);
    this.adafactor = new Adafactor(modules, {
      lr,
      scaleParameter: options.scaleParameter ?? true,
      weightDecay: options.weightDecay ?? 0,
      relativeStep: false,
      warmupInit: false,
    });
    this.lr = lr;
    this.totalSteps = totalSteps;
    this.warmupSteps = warmupSteps(totalSteps, warmupRatio);
    this.clipNorm = clipNorm;
    this.scratch = new Float64Array(this.adafactor.size);
  }

  /** The scheduled learning rate at LambdaLR step `step`. */
  lrAt(step: number): number {
    return this.lr * linearWarmupDecay(step, this.totalSteps, this.warmupSteps);
  }

  /**
   * Clips a copy of `grads` (the caller's array is left alone), applies Adafactor at the scheduled lr, and
   * advances the schedule. `scheduleStep` overrides the schedule position for this step.
   */
  step(params: FloatArray, grads: ArrayLike<number>, options: { scheduleStep?: number } = {}): TfewStepInfo {
    if (grads.length !== this.adafactor.size || params.length !== this.adafactor.size) {
      throw new InvalidArgumentError(
        `expected ${this.adafactor.size} parameters and gradients, got ${params.length} and ${grads.length}`,
      );
    }
    if (options.scheduleStep !== undefined) {
      if (!Number.isInteger(options.scheduleStep) || options.scheduleStep < 0) {
        throw new InvalidArgumentError(`scheduleStep must be an integer >= 0, got ${options.scheduleStep}`);
      }
      this.scheduleStep = options.scheduleStep;
    }
    const clipped = this.scratch;
    for (let i = 0; i < clipped.length; i++) clipped[i] = grads[i];
    const gradNorm = clipGradNorm(clipped, this.clipNorm);
    const lr = this.lrAt(this.scheduleStep);
    this.adafactor.step(params, clipped, lr);
    this.scheduleStep += 1;
    return { lr, gradNorm };
  }
}

function stripUndefined<T extends object>(o: T): Partial<T> {
  const out: Partial<T> = {};
  for (const [k, v] of Object.entries(o)) if (v !== undefined) (out as Record<string, unknown>)[k] = v;
  return out;
}
