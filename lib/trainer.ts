// Few-shot (IA)3 training the T-Few way: shuffled mini-batches, the LM + UL + LN losses from the engine,
// per-adapter gradient clipping, Adafactor and the warmup/decay schedule (lib/optim.ts), with progress
// events, periodic evaluation by rank classification, an AbortSignal and deterministic runs under a seed.
//
// Mixed-task training: an example may name its own adapter (default: the trainer's). One engine call
// computes every adapter's gradient; each adapter then has its own optimizer state and is clipped on its
// own gradient norm (as if each task were trained alone with T-Few's global-norm clipping), while all of
// them follow the trainer's single learning-rate schedule.
import * as fs from 'fs';
import * as path from 'path';
import { EventEmitter } from 'events';
import { performance } from 'perf_hooks';
import type TypedEmitter from 'typed-emitter';
import type { IA3Adapter } from './adapter';
import { recomputeLevel, type Recompute } from './model';
import { DisposedError, FileFormatError, InvalidArgumentError, TfewError } from './errors';
import type { NativeConfig, ReserveShape } from './native';
import { TfewOptimizer } from './optim';
import { seededRandom } from './random';

export interface TrainExample {
  /** The prompt: text (tokenized by the model's tokenizer) or token ids (eos included). */
  input: string | number[];
  /** The answer choices: text or token ids (eos included). */
  choices: (string | number[])[];
  /** Index of the gold choice. */
  label: number;
  /** The adapter this example trains (mixed-task training); default: the trainer's adapter. */
  adapter?: IA3Adapter;
}

export interface TrainerOptions {
  /** Optimizer steps (T-Few: 1000). */
  steps?: number;
  /** Examples per step (T-Few: 8). With fewer examples than this, a step uses them all. */
  batchSize?: number;
  /** Peak learning rate (T-Few: 3e-3). */
  lr?: number;
  /** Adafactor's scale_parameter (T-Few: true). */
  scaleParameter?: boolean;
  /** Gradient-norm clipping threshold per adapter; 0 disables it (T-Few: 1.0). */
  clipNorm?: number;
  /** Fraction of the steps spent warming the learning rate up from 0 (T-Few: 0.06). */
  warmupRatio?: number;
  weightDecay?: number;
  lmWeight?: number;
  ulWeight?: number;
  lnWeight?: number;
  /** Dropout at the model's rate during training steps (T-Few: on). */
  dropout?: boolean;
  /** Seeds the shuffling and (as seed + step) the dropout masks. */
  seed?: number;
  /** CUDA: recompute encoder projections in the backward (less device memory, same results; LossOptions). */
  recompute?: Recompute;
  /** Inputs are truncated to this many tokens (T-Few: 256). */
  maxInputLength?: number;
  /** Evaluate on evalSet every this many steps (and after the last step). */
  evalEvery?: number;
  evalSet?: TrainExample[];
  /** Save the trainer's adapter here (PEFT format) when training finishes without being aborted. */
  saveTo?: string;
  /**
   * Run the optimizer natively (a TrainingSession: vectors and optimizer state stay in the engine, the
   * IA3Adapter objects are updated at eval points and at the end) when the model offers it. Default true;
   * false runs lib/optim.ts on the host after every step (the same maths; the oracle in the tests).
   */
  nativeOptimizer?: boolean;
}

export interface StepEvent {
  /** Steps completed so far (1-based). */
  step: number;
  totalSteps: number;
  /** The scheduled learning rate used by this step. */
  lr: number;
  totalLoss: number;
  lmLoss: number;
  ulLoss: number;
  lnLoss: number;
  /** L2 norm of this step's gradients before clipping, over all adapters of the batch. */
  gradNorm: number;
  examplesPerSecond: number;
}

export interface EvalEvent {
  step: number;
  accuracy: number;
  predictions: number[];
}

export interface DoneEvent {
  steps: number;
  seconds: number;
  aborted: boolean;
  adapterPath?: string;
}

export type TrainerEvents = {
  step: (event: StepEvent) => void;
  eval: (event: EvalEvent) => void;
  done: (event: DoneEvent) => void;
};

export interface TrainResult {
  /** Steps completed. */
  steps: number;
  /** The total loss of every completed step. */
  losses: number[];
  aborted: boolean;
  adapterPath?: string;
}

export interface EvaluationResult {
  accuracy: number;
  predictions: number[];
}

type TokenIds = number[];

interface LossAndGradientsResult {
  totalLoss: number;
  lmLoss: number;
  ulLoss: number;
  lnLoss: number;
  adapterGradients: Map<IA3Adapter, Float32Array>;
}

/**
 * What the trainer needs from a model; T5Model (lib/model.ts) provides it. Kept structural so the trainer
 * does not depend on how the model is loaded.
 */
export interface TrainableModel {
  readonly config: NativeConfig;
  readonly tokenizer?: { encode(text: string, options?: { addEos?: boolean; maxLength?: number }): number[] } | undefined;
  readonly disposed: boolean;
  lossAndGradients(
    batch: { inputIds: (number[] | string)[]; choices: (number[][] | string[])[]; labels: number[] },
    options?: {
      adapter?: IA3Adapter | (IA3Adapter | null)[];
      lmWeight?: number;
      ulWeight?: number;
      lnWeight?: number;
      dropout?: boolean;
      seed?: number;
      maxInputLength?: number;
      recompute?: Recompute;
    },
  ): Promise<LossAndGradientsResult>;
  rankClassify(
    inputs: string[] | number[][],
    choices: (string[] | number[][])[],
    options?: { adapter?: IA3Adapter | (IA3Adapter | null)[]; maxInputLength?: number; batchSize?: number },
  ): Promise<{ predictions: number[] }>;
  /**
   * Optional (T5Model has it): plans device memory for the run's largest step before the first, so that a run that
   * cannot fit fails at once rather than at the first long batch, and no step grows the memory mid-run.
   */
  reserveMemory?(shapes: ReserveShape | ReserveShape[]): Promise<number>;
  /** Optional: a native training session (T5Model has one); without it the optimizer runs in lib/optim.ts. */
  createTrainingSession?(
    adapters: IA3Adapter[],
    options: { lr: number; totalSteps: number; warmupRatio: number; clipNorm: number; scaleParameter: boolean; weightDecay: number },
  ): Promise<TrainingSessionLike>;
}

/** What the trainer needs from a native training session (lib/model.ts TrainingSession). */
export interface TrainingSessionLike {
  step(
    batch: { inputIds: (number[] | string)[]; choices: (number[][] | string[])[]; labels: number[] },
    options: {
      adapter: IA3Adapter[]; lmWeight: number; ulWeight: number; lnWeight: number; dropout: boolean; seed: number;
      maxInputLength: number; scheduleStep: number; recompute: Recompute;
    },
  ): Promise<{ totalLoss: number; lmLoss: number; ulLoss: number; lnLoss: number; lr: number; gradNorms: Map<IA3Adapter, number> }>;
  sync(): Promise<void>;
  dispose(): Promise<void>;
}

type ResolvedOptions = Required<Omit<TrainerOptions, 'evalEvery' | 'evalSet' | 'saveTo'>> &
  Pick<TrainerOptions, 'evalEvery' | 'evalSet' | 'saveTo'>;

const DEFAULTS = {
  steps: 1000,
  batchSize: 8,
  lr: 3e-3,
  scaleParameter: true,
  clipNorm: 1.0,
  warmupRatio: 0.06,
  weightDecay: 0,
  lmWeight: 1,
  ulWeight: 1,
  lnWeight: 1,
  dropout: true,
  seed: 42,
  recompute: 'auto',
  maxInputLength: 256,
  nativeOptimizer: true,
};

/** Fisher-Yates shuffle of 0..n-1. */
function permutation(n: number, random: () => number): number[] {
  const order = Array.from({ length: n }, (_, i) => i);
  for (let i = n - 1; i > 0; i--) {
    const j = Math.floor(random() * (i + 1));
    [order[i], order[j]] = [order[j], order[i]];
  }
  return order;
}

const OPTION_NAMES: readonly string[] = [...Object.keys(DEFAULTS), 'evalEvery', 'evalSet', 'saveTo'];

function resolveOptions(options: TrainerOptions): ResolvedOptions {
  if (options === null || typeof options !== 'object') throw new InvalidArgumentError(`Trainer options must be an object, got ${String(options)}`);
  // a misspelt option (e.g. learningRate) would otherwise be ignored in silence
  const unknown = Object.keys(options).filter((k) => !OPTION_NAMES.includes(k));
  if (unknown.length > 0) throw new InvalidArgumentError(`unknown Trainer option(s) ${unknown.join(', ')}; known: ${OPTION_NAMES.join(', ')}`);
  const o = { ...DEFAULTS } as ResolvedOptions;
  for (const [k, v] of Object.entries(options)) if (v !== undefined) (o as unknown as Record<string, unknown>)[k] = v;

  const positiveInt = (name: keyof TrainerOptions, v: unknown): void => {
    if (typeof v !== 'number' || !Number.isInteger(v) || v < 1) {
      throw new InvalidArgumentError(`${name} must be an integer >= 1, got ${String(v)}`);
    }
  };
  const nonNegative = (name: keyof TrainerOptions, v: unknown): void => {
    if (typeof v !== 'number' || !Number.isFinite(v) || v < 0) {
      throw new InvalidArgumentError(`${name} must be a finite number >= 0, got ${String(v)}`);
    }
  };
  positiveInt('steps', o.steps);
  positiveInt('batchSize', o.batchSize);
  positiveInt('maxInputLength', o.maxInputLength);
  if (o.evalEvery !== undefined) positiveInt('evalEvery', o.evalEvery);
  if (typeof o.lr !== 'number' || !Number.isFinite(o.lr) || o.lr <= 0) {
    throw new InvalidArgumentError(`lr must be a finite number > 0, got ${String(o.lr)}`);
  }
  nonNegative('clipNorm', o.clipNorm);
  nonNegative('weightDecay', o.weightDecay);
  nonNegative('lmWeight', o.lmWeight);
  nonNegative('ulWeight', o.ulWeight);
  nonNegative('lnWeight', o.lnWeight);
  if (o.lmWeight + o.ulWeight + o.lnWeight === 0) throw new InvalidArgumentError('at least one loss weight must be > 0');
  if (typeof o.warmupRatio !== 'number' || !(o.warmupRatio >= 0 && o.warmupRatio <= 1)) {
    throw new InvalidArgumentError(`warmupRatio must be in [0, 1], got ${String(o.warmupRatio)}`);
  }
  if (typeof o.seed !== 'number' || !Number.isInteger(o.seed) || o.seed < 0) {
    throw new InvalidArgumentError(`seed must be an integer >= 0, got ${String(o.seed)}`);
  }
  for (const name of ['scaleParameter', 'dropout', 'nativeOptimizer'] as const) {
    if (typeof o[name] !== 'boolean') throw new InvalidArgumentError(`${name} must be a boolean, got ${String(o[name])}`);
  }
  if (o.saveTo !== undefined && (typeof o.saveTo !== 'string' || o.saveTo.length === 0 || o.saveTo.includes('\0'))) {
    throw new InvalidArgumentError(`saveTo must be a directory path (a non-empty string), got ${JSON.stringify(o.saveTo)}`);
  }
  recomputeLevel(o.recompute); // throws on a value LossOptions would reject, before any step runs
  if (o.evalEvery !== undefined && (!o.evalSet || o.evalSet.length === 0)) {
    throw new InvalidArgumentError('evalEvery needs a non-empty evalSet');
  }
  return o;
}

function isTokenIds(v: unknown): v is TokenIds {
  return Array.isArray(v) && v.every((t) => typeof t === 'number' && Number.isInteger(t) && t >= 0);
}

export class Trainer extends (EventEmitter as new () => TypedEmitter<TrainerEvents>) {
  readonly model: TrainableModel;
  readonly adapter: IA3Adapter;
  readonly options: Readonly<ResolvedOptions>;
  private running = false;

  constructor(model: TrainableModel, adapter: IA3Adapter, options: TrainerOptions = {}) {
    super();
    if (!model || typeof model.lossAndGradients !== 'function') throw new InvalidArgumentError('Trainer needs a model');
    if (!adapter || !(adapter.data instanceof Float32Array)) throw new InvalidArgumentError('Trainer needs an IA3Adapter');
    adapter.assertCompatible(model.config);
    this.model = model;
    this.adapter = adapter;
    this.options = Object.freeze(resolveOptions(options));
    if (this.options.evalSet) this.checkExamples(this.options.evalSet, 'evalSet');
  }

  /**
   * Runs `options.steps` optimizer steps over `examples` (reshuffled every epoch), updating the adapters
   * in place. Resolves when done or, after the step in flight, when `signal` aborts.
   */
  async train(examples: TrainExample[], runOptions: { signal?: AbortSignal } = {}): Promise<TrainResult> {
    if (this.running) throw new InvalidArgumentError('this trainer is already training');
    this.checkModel();
    this.checkExamples(examples, 'examples');
    const { signal } = runOptions;
    const o = this.options;
    if (o.saveTo !== undefined) checkWritableDir(o.saveTo);  // now, not after the last step
    this.running = true;
    const started = performance.now();
    const losses: number[] = [];
    let aborted = false;
    let adapterPath: string | undefined;
    try {
      const prepared = this.tokenizedOnce(examples);  // before the session: a failure here leaks nothing
      const largest = this.largestCalls(prepared);
      if (largest && typeof this.model.reserveMemory === 'function') await this.model.reserveMemory(largest);
      const stepper = await this.stepper(examples);
      let failed = false;
      try {
        const batches = this.batchStream(examples.length);
        for (let step = 0; step < o.steps; step++) {
          if (signal?.aborted) {
            aborted = true;
            break;
          }
          this.checkModel();
          const stepStarted = performance.now();
          const batch = batches.next().value as number[];
          const chosen = batch.map((i) => prepared[i]);
          const r = await stepper.step(
            { inputIds: chosen.map((e) => e.input), choices: chosen.map((e) => this.choicesOf(e)), labels: chosen.map((e) => e.label) },
            {
              adapter: chosen.map((e) => e.adapter ?? this.adapter),
              lmWeight: o.lmWeight,
              ulWeight: o.ulWeight,
              lnWeight: o.lnWeight,
              dropout: o.dropout,
              seed: o.seed + step,
              maxInputLength: o.maxInputLength,
              scheduleStep: step,
              recompute: o.recompute,
            },
          );
          losses.push(r.totalLoss);
          const seconds = (performance.now() - stepStarted) / 1000;
          let squaredNorm = 0;
          for (const norm of r.gradNorms.values()) squaredNorm += norm * norm;
          this.emit('step', {
            step: step + 1,
            totalSteps: o.steps,
            lr: r.lr,
            totalLoss: r.totalLoss,
            lmLoss: r.lmLoss,
            ulLoss: r.ulLoss,
            lnLoss: r.lnLoss,
            gradNorm: Math.sqrt(squaredNorm),
            examplesPerSecond: batch.length / Math.max(seconds, 1e-9),
          });

          const done = step + 1;
          if (o.evalEvery !== undefined && o.evalSet && (done % o.evalEvery === 0 || done === o.steps)) {
            await stepper.sync();
            const { accuracy, predictions } = await this.evaluate(o.evalSet);
            this.emit('eval', { step: done, accuracy, predictions });
          }
        }
      } catch (e) {
        failed = true;
        throw e;
      } finally {
        // The adapters hold every step taken, aborted or not. The session is freed even when that copy fails
        // (e.g. the model was disposed), and a failed copy does not hide the error that stopped the run.
        try {
          await stepper.sync();
        } catch (e) {
          if (!failed) throw e;
        } finally {
          await stepper.dispose();
        }
      }

      if (!aborted && o.saveTo !== undefined) {
        await this.adapter.save(o.saveTo);
        adapterPath = o.saveTo;
      }
    } finally {
      this.running = false;
    }
    const seconds = (performance.now() - started) / 1000;
    this.emit('done', { steps: losses.length, seconds, aborted, ...(adapterPath !== undefined ? { adapterPath } : {}) });
    return { steps: losses.length, losses, aborted, ...(adapterPath !== undefined ? { adapterPath } : {}) };
  }

  /**
   * How one optimizer step runs: a native training session over every adapter of the run when the model
   * offers one (and nativeOptimizer is on), else lossAndGradients + lib/optim.ts on the host. Both start a
   * fresh optimizer state and schedule per adapter; every adapter in a batch steps at the same schedule
   * position and one absent from the batch does not step (as a parameter without .grad in PyTorch).
   */
  private async stepper(examples: TrainExample[]): Promise<TrainingSessionLike> {
    const o = this.options;
    const optimizerOptions = {
      lr: o.lr, totalSteps: o.steps, warmupRatio: o.warmupRatio, clipNorm: o.clipNorm,
      scaleParameter: o.scaleParameter, weightDecay: o.weightDecay,
    };
    if (o.nativeOptimizer && typeof this.model.createTrainingSession === 'function') {
      const adapters = [...new Set([this.adapter, ...examples.map((e) => e.adapter ?? this.adapter)])];
      return this.model.createTrainingSession(adapters, optimizerOptions);
    }
    const model = this.model;
    const optimizers = new Map<IA3Adapter, TfewOptimizer>();
    return {
      async step(batch, options) {
        const result = await model.lossAndGradients(batch, options);
        if (result.adapterGradients.size === 0) {
          throw new TfewError('E_INTERNAL', 'lossAndGradients returned no adapter gradients');
        }
        const gradNorms = new Map<IA3Adapter, number>();
        let lr = 0;
        for (const [adapter, gradient] of result.adapterGradients) {
          let opt = optimizers.get(adapter);
          if (!opt) optimizers.set(adapter, (opt = new TfewOptimizer(adapter.modules, optimizerOptions)));
          const info = opt.step(adapter.data, gradient, { scheduleStep: options.scheduleStep });
          adapter.markChanged();
          gradNorms.set(adapter, info.gradNorm);
          lr = info.lr;
        }
        return { ...result, lr, gradNorms };
      },
      async sync() {},
      async dispose() {},
    };
  }

  /**
   * Rank-classification accuracy on labelled examples, each with its own adapter (default: the trainer's).
   * Evaluation runs without dropout.
   */
  async evaluate(examples: TrainExample[]): Promise<EvaluationResult> {
    this.checkModel();
    this.checkExamples(examples, 'examples');
    const { inputs, choices } = this.forRankClassify(examples);
    const { predictions } = await this.model.rankClassify(inputs, choices, {
      adapter: examples.map((e) => e.adapter ?? this.adapter),
      maxInputLength: this.options.maxInputLength,
    });
    let correct = 0;
    for (let i = 0; i < examples.length; i++) if (predictions[i] === examples[i].label) correct++;
    return { accuracy: correct / examples.length, predictions };
  }

  /** Batches of example indices: a fresh seeded permutation per epoch, the incomplete tail dropped. */
  private *batchStream(numExamples: number): Generator<number[], never> {
    const random = seededRandom(this.options.seed);
    const size = Math.min(this.options.batchSize, numExamples);
    for (;;) {
      const order = permutation(numExamples, random);
      for (let start = 0; start + size <= numExamples; start += size) yield order.slice(start, start + size);
    }
  }

  private checkModel(): void {
    if (this.model.disposed) throw new DisposedError();
  }

  private checkExamples(examples: TrainExample[], what: string): void {
    if (!Array.isArray(examples) || examples.length === 0) throw new InvalidArgumentError(`${what} must be a non-empty array`);
    const checked = new Set<IA3Adapter>([this.adapter]);
    examples.forEach((e, i) => {
      if (!e || (typeof e.input !== 'string' && !isTokenIds(e.input))) {
        throw new InvalidArgumentError(`${what}[${i}].input must be a string or an array of token ids`);
      }
      if (!Array.isArray(e.choices) || e.choices.length === 0) {
        throw new InvalidArgumentError(`${what}[${i}].choices must be a non-empty array`);
      }
      e.choices.forEach((c, j) => {
        if (typeof c !== 'string' && !isTokenIds(c)) {
          throw new InvalidArgumentError(`${what}[${i}].choices[${j}] must be a string or an array of token ids`);
        }
      });
      if (!Number.isInteger(e.label) || e.label < 0 || e.label >= e.choices.length) {
        throw new InvalidArgumentError(`${what}[${i}].label ${e.label} is not a choice index (0..${e.choices.length - 1})`);
      }
      if (e.adapter !== undefined && !checked.has(e.adapter)) {
        e.adapter.assertCompatible(this.model.config);
        checked.add(e.adapter);
      }
    });
  }

  /**
   * The examples with their text tokenized once for the whole run (inputs truncated to maxInputLength, as the
   * model would each step), not again at every step they are drawn in. Without a tokenizer: as given.
   */
  private tokenizedOnce(examples: TrainExample[]): TrainExample[] {
    if (!this.model.tokenizer) return examples;
    const maxLength = this.options.maxInputLength;
    return examples.map((e) => ({
      ...e,
      input: typeof e.input === 'string' ? this.tokenize(e.input, maxLength) : e.input,
      choices: e.choices.map((c) => (typeof c === 'string' ? this.tokenize(c) : c)),
    }));
  }

  /**
   * The largest calls of a run over these (tokenized) examples, for TrainableModel.reserveMemory: its steps (the
   * batch size, the longest input and choice, the most choices, every adapter: a native session's gradients are per
   * adapter) and, with an evalSet, evaluate()'s rank classification (batches of up to 32). Undefined when some text
   * has no token count (no tokenizer: the steps then fail on their own).
   */
  private largestCalls(prepared: TrainExample[]): ReserveShape[] | undefined {
    const extent = (examples: TrainExample[]) => {
      let inputLength = 0, choices = 0, choiceLength = 0;
      for (const e of examples) {
        if (typeof e.input === 'string' || e.choices.some((c) => typeof c === 'string')) return undefined;
        // (an empty input or choice: no reservation, the step rejects it with its own message)
        if (e.input.length === 0 || e.choices.length === 0 || e.choices.some((c) => c.length === 0)) return undefined;
        inputLength = Math.max(inputLength, e.input.length);
        choices = Math.max(choices, e.choices.length);
        for (const c of e.choices as number[][]) choiceLength = Math.max(choiceLength, c.length);
      }
      return { inputLength, choices, choiceLength, adapters: new Set(examples.map((e) => e.adapter ?? this.adapter)).size };
    };
    const steps = extent(prepared);
    if (!steps) return undefined;
    const shapes: ReserveShape[] = [{
      batchSize: Math.min(this.options.batchSize, prepared.length), ...steps,
      adapters: new Set([this.adapter, ...prepared.map((e) => e.adapter ?? this.adapter)]).size,
      training: true, recompute: this.options.recompute,
    }];
    const evalSet = this.options.evalSet;
    if (evalSet && this.options.evalEvery) {
      const evaluation = extent(this.tokenizedOnce(evalSet));
      if (!evaluation) return undefined;
      const batchSize = Math.min(32, evalSet.length);  // rankClassify's default, as evaluate() calls it
      shapes.push({ batchSize, ...evaluation, adapters: Math.min(evaluation.adapters, batchSize) });
    }
    return shapes;
  }

  /** One example's choices in the form the model takes: all text or all token ids. */
  private choicesOf(e: TrainExample): string[] | number[][] {
    if (e.choices.every((c): c is string => typeof c === 'string')) return e.choices;
    return e.choices.map((c) => (typeof c === 'string' ? this.tokenize(c) : c));
  }

  /** The inputs of a set in one form (rankClassify takes all text or all token ids). */
  private forRankClassify(examples: TrainExample[]): { inputs: string[] | number[][]; choices: (string[] | number[][])[] } {
    const choices = examples.map((e) => this.choicesOf(e));
    const texts = examples.map((e) => e.input).filter((x): x is string => typeof x === 'string');
    if (texts.length === examples.length) return { inputs: texts, choices };
    const ids = examples.map((e) =>
      typeof e.input === 'string' ? this.tokenize(e.input, this.options.maxInputLength) : e.input,
    );
    return { inputs: ids, choices };
  }

  private tokenize(text: string, maxLength?: number): number[] {
    const tokenizer = this.model.tokenizer;
    if (!tokenizer) {
      throw new InvalidArgumentError('this model has no tokenizer: give inputs and choices as token ids');
    }
    return tokenizer.encode(text, maxLength !== undefined ? { maxLength } : undefined);
  }
}

/** Throws FileFormatError unless `dir` is, or could be created as, a writable directory. */
function checkWritableDir(dir: string): void {
  let probe = path.resolve(dir);
  while (!fs.existsSync(probe)) {
    const parent = path.dirname(probe);
    if (parent === probe) break;
    probe = parent;
  }
  const fail = (why: string) => new FileFormatError(`saveTo ${dir}: ${why}`);
  if (!fs.statSync(probe).isDirectory()) throw fail(`${probe} is not a directory`);
  try {
    fs.accessSync(probe, fs.constants.W_OK);
  } catch {
    throw fail(`${probe} is not writable`);
  }
}
