// A T-Few run: for each seed, train a fresh (IA)3 adapter on that seed's few-shot examples with the T-Few
// recipe (lib/trainer.ts), then evaluate every template on the task's evaluation set.
//
// T-Few draws one random template per example each time the example is fetched. We render every few-shot
// example under every training template once and let the trainer shuffle the pool: each batch then
// samples (example, template) pairs uniformly, the same distribution.
import * as path from 'path';
import { IA3Adapter } from '../adapter';
import { InvalidArgumentError } from '../errors';
import type { T5Model } from '../model';
import type { Task } from '../tasks/registry';
import { Trainer, type StepEvent, type TrainExample, type TrainerOptions } from '../trainer';
import type { Template } from '../templates/engine';
import { ia3ParameterCount, measure, trainingFlops } from './cost';
import { DEFAULT_MAX_INPUT_LENGTH, encodePrompt } from './encode';
import { evaluate, promptCost, requireTokenizer, type EvaluationReport, type EvaluationRun } from './evaluate';

/** The recipe knobs, T-Few's values by default (the Trainer's defaults, then the task's overrides). */
export type RecipeOptions = Pick<TrainerOptions,
  'steps' | 'batchSize' | 'lr' | 'lmWeight' | 'ulWeight' | 'lnWeight' | 'dropout' | 'maxInputLength' | 'warmupRatio' | 'clipNorm' | 'scaleParameter' | 'weightDecay' | 'recompute'>;

export interface TrainingRun {
  seed: number;
  /** The recipe actually used (defaults resolved), for reproducibility. */
  recipe: Required<RecipeOptions> & { seed: number };
  steps: number;
  seconds: number;
  peakRssBytes: number;
  /** The total loss of the first and last step. */
  firstLoss: number;
  finalLoss: number;
  /** Analytic training FLOPs (3 x forward x steps x batch). */
  flops: number;
  trainExamples: number;
  adapterPath?: string;
  aborted: boolean;
}

/** Renders few-shot examples under every template into trainer examples (token ids). */
export function trainingExamples(model: Pick<T5Model, 'tokenizer'>, task: Task, seed: number | undefined, templates: Template[], maxInputLength: number): TrainExample[] {
  const tokenizer = requireTokenizer(model);
  const out: TrainExample[] = [];
  for (const ex of task.trainExamples(seed)) {
    if (ex.label < 0) continue;
    for (const t of templates) {
      const enc = encodePrompt(tokenizer, t.render(ex), maxInputLength);
      out.push({ input: enc.inputIds, choices: enc.choiceIds, label: enc.label });
    }
  }
  if (out.length === 0) throw new InvalidArgumentError(`task ${task.name} has no labelled training examples for seed ${seed}`);
  return out;
}

export interface TrainAdapterOptions extends RecipeOptions {
  task: Task;
  /** The few-shot subset (T-Few seed; RAFT fold start). Undefined for RAFT = all 50 examples. */
  seed?: number;
  /** Default: the task's templates. */
  templates?: Template[];
  /** Start from these vectors (e.g. pre-trained (IA)3); default all ones. */
  initAdapter?: IA3Adapter;
  saveTo?: string;
  /** Seeds the trainer's shuffling and dropout; default the few-shot seed (or 42). */
  trainerSeed?: number;
  onStep?: (event: StepEvent) => void;
  signal?: AbortSignal;
}

/** Trains one adapter on one seed's few-shot set. */
export async function trainAdapter(model: T5Model, options: TrainAdapterOptions): Promise<{ adapter: IA3Adapter; run: TrainingRun }> {
  const { task } = options;
  const templates = options.templates ?? task.templates();
  const maxInputLength = options.maxInputLength ?? task.recipe.maxInputLength ?? DEFAULT_MAX_INPUT_LENGTH;
  const examples = trainingExamples(model, task, options.seed, templates, maxInputLength);
  const adapter = options.initAdapter ? options.initAdapter.clone() : IA3Adapter.create(model);
  const trainerOptions: TrainerOptions = {
    steps: options.steps,
    batchSize: options.batchSize ?? task.recipe.batchSize,
    lr: options.lr,
    lmWeight: options.lmWeight ?? task.recipe.lmWeight,
    ulWeight: options.ulWeight ?? task.recipe.ulWeight,
    lnWeight: options.lnWeight ?? task.recipe.lnWeight,
    dropout: options.dropout,
    maxInputLength,
    warmupRatio: options.warmupRatio,
    clipNorm: options.clipNorm,
    scaleParameter: options.scaleParameter,
    weightDecay: options.weightDecay,
    recompute: options.recompute,
    seed: options.trainerSeed ?? options.seed ?? 42,
    saveTo: options.saveTo,
  };
  const trainer = new Trainer(model, adapter, trainerOptions);
  if (options.onStep) trainer.on('step', options.onStep);
  const m = await measure(() => trainer.train(examples, { signal: options.signal }), model.gpuIndex);
  const forward = promptCost(model.config, examples.map((e) => ({ inputIds: e.input as number[], choiceIds: e.choices as number[][], label: e.label }))).flops;
  const batch = Math.min(trainer.options.batchSize, examples.length);
  const { evalSet: _e, evalEvery: _v, saveTo: _s, ...resolved } = trainer.options;
  return {
    adapter,
    run: {
      seed: options.seed ?? -1,
      recipe: resolved,
      steps: m.result.steps,
      seconds: m.seconds,
      peakRssBytes: m.peakRssBytes,
      firstLoss: m.result.losses[0] ?? NaN,
      finalLoss: m.result.losses[m.result.losses.length - 1] ?? NaN,
      flops: trainingFlops(forward, m.result.steps, batch),
      trainExamples: examples.length,
      adapterPath: m.result.adapterPath,
      aborted: m.result.aborted,
    },
  };
}

export interface FewShotOptions extends RecipeOptions {
  task: Task;
  /** Default: the task's seeds (the paper's five). */
  seeds?: readonly number[];
  /** Evaluation templates; default the task's. */
  templates?: Template[];
  /** Training templates; default the evaluation templates. */
  trainTemplates?: Template[];
  initAdapter?: IA3Adapter;
  /** Save each seed's adapter to <saveDir>/seed-<seed>. */
  saveDir?: string;
  /** Evaluate on the first N evaluation examples only. */
  evalLimit?: number;
  evalBatchSize?: number;
  onStep?: (seed: number, event: StepEvent) => void;
  onTrained?: (run: TrainingRun) => void;
  onEvalRun?: (run: EvaluationRun) => void;
  signal?: AbortSignal;
}

export interface FewShotResult {
  task: string;
  training: TrainingRun[];
  evaluation: EvaluationReport;
  /** Adapters by seed. */
  adapters: Map<number, IA3Adapter>;
  /** Bytes of one adapter on disk (float32 vectors). */
  adapterBytes: number;
}

/** Trains one adapter per seed, then evaluates every template with each seed's adapter. */
export async function runFewShot(model: T5Model, options: FewShotOptions): Promise<FewShotResult> {
  const { task } = options;
  const seeds = options.seeds ?? task.seeds;
  if (seeds.length === 0) throw new InvalidArgumentError('runFewShot needs at least one seed');
  const templates = options.templates ?? task.templates();
  const adapters = new Map<number, IA3Adapter>();
  const training: TrainingRun[] = [];
  for (const seed of seeds) {
    const { adapter, run } = await trainAdapter(model, {
      ...options,
      seed,
      templates: options.trainTemplates ?? templates,
      saveTo: options.saveDir ? path.join(options.saveDir, `seed-${seed}`) : undefined,
      onStep: options.onStep ? (e) => options.onStep?.(seed, e) : undefined,
    });
    adapters.set(seed, adapter);
    training.push(run);
    options.onTrained?.(run);
    if (run.aborted) break;
  }
  const evaluation = await evaluate(model, {
    task,
    templates,
    seeds: training.map((t) => t.seed),
    adapter: (seed) => adapters.get(seed) ?? null,
    maxInputLength: options.maxInputLength,
    batchSize: options.evalBatchSize,
    limit: options.evalLimit,
    method: 'T-Few',
    onRun: options.onEvalRun,
  });
  return { task: task.name, training, evaluation, adapters, adapterBytes: 4 * ia3ParameterCount(model.config) };
}
