// Evaluation with the paper's protocol: every template on every seed's model, accuracy per run, then the
// median and interquartile range over all runs.
import type { IA3Adapter } from '../adapter';
import { InvalidArgumentError } from '../errors';
import { asReplicas, shareOut } from '../replicas';
import type { Task } from '../tasks/registry';
import type { Example } from '../tasks/types';
import type { Template } from '../templates/engine';
import { measure, rankFlops, type FlopsConfig } from './cost';
import { DEFAULT_MAX_INPUT_LENGTH, encodePrompt, type EncodedPrompt, type PromptTokenizer } from './encode';
import { accuracy, summarizeRuns, type AccuracySummary, type RunAccuracy } from './metrics';

/** What evaluation needs from a model (T5Model provides it). */
export interface ScoringModel {
  readonly config: FlopsConfig;
  readonly tokenizer?: PromptTokenizer;
  /** The GPU it runs on (T5Model.gpuIndex), whose memory the reports measure; null or absent: none. */
  readonly gpuIndex?: number | null;
  rankClassify(
    inputs: number[][],
    choices: number[][][],
    options?: { adapter?: IA3Adapter | null | (IA3Adapter | null)[]; batchSize?: number; lengthNormalize?: boolean; maxInputLength?: number },
  ): Promise<{ predictions: number[]; scores: number[][] }>;
}

export function requireTokenizer(model: { tokenizer?: PromptTokenizer }): PromptTokenizer {
  if (!model.tokenizer) throw new InvalidArgumentError('the model directory has no usable tokenizer (tokenizer.json or spiece.model); the pipeline needs one to render prompts');
  return model.tokenizer;
}

/** The adapter of each seed's run: one for all, none (zero-shot), or a function of the seed. */
export type AdapterForSeed = IA3Adapter | null | ((seed: number) => IA3Adapter | null | Promise<IA3Adapter | null>);

export interface EvaluateOptions {
  /** The task: its evaluation set, templates and seeds. */
  task?: Task;
  /** Evaluate these examples instead of the task's evaluation set. */
  examples?: Example[];
  /** Default: the task's templates. */
  templates?: Template[];
  /** Default: the task's seeds (one run per seed and template). */
  seeds?: readonly number[];
  adapter?: AdapterForSeed;
  /** Default 256 (T-Few). */
  maxInputLength?: number;
  /** Examples per native call. */
  batchSize?: number;
  /** Default true (T-Few's length-normalised rank classification). */
  lengthNormalize?: boolean;
  /** Use only the first N evaluation examples (quick checks). */
  limit?: number;
  /** Name of the method in results (default "T-Few" with an adapter, else "zero-shot"). */
  method?: string;
  onRun?: (run: EvaluationRun) => void;
}

export interface EvaluationRun extends RunAccuracy {
  predictions: number[];
  labels: number[];
  seconds: number;
  peakRssBytes: number;
  peakDeviceBytes: number;
  /** Mean encoder length and analytic FLOPs per example of this run. */
  meanInputTokens: number;
  flopsPerExample: number;
}

export interface EvaluationReport {
  method: string;
  task: string;
  runs: EvaluationRun[];
  summary: AccuracySummary;
  cost: { flopsPerExample: number; msPerExample: number; peakRssBytes: number; peakDeviceBytes: number; meanInputTokens: number };
}

/** Mean analytic forward FLOPs and encoder length over encoded prompts. */
export function promptCost(config: FlopsConfig, encoded: readonly EncodedPrompt[]): { flops: number; inputTokens: number } {
  let flops = 0;
  let tokens = 0;
  for (const e of encoded) {
    flops += rankFlops(config, e.inputIds.length, e.choiceIds.map((c) => c.length));
    tokens += e.inputIds.length;
  }
  return { flops: flops / Math.max(1, encoded.length), inputTokens: tokens / Math.max(1, encoded.length) };
}

/** Scores encoded prompts with one adapter, timing the work. */
export async function scoreEncoded(
  model: ScoringModel,
  encoded: EncodedPrompt[],
  options: { adapter?: IA3Adapter | null; batchSize?: number; lengthNormalize?: boolean },
): Promise<{ predictions: number[]; scores: number[][]; seconds: number; peakRssBytes: number; peakDeviceBytes: number }> {
  const m = await measure(() =>
    model.rankClassify(
      encoded.map((e) => e.inputIds),
      encoded.map((e) => e.choiceIds),
      {
        adapter: options.adapter ?? null,
        batchSize: options.batchSize,
        lengthNormalize: options.lengthNormalize ?? true,
        // Inputs arrive tokenized and already truncated by encodePrompt (RAFT's may be longer than 256).
        maxInputLength: Math.max(...encoded.map((e) => e.inputIds.length)),
      },
    ),
    model.gpuIndex ?? null,
  );
  return { predictions: m.result.predictions, scores: m.result.scores, seconds: m.seconds, peakRssBytes: m.peakRssBytes,
           peakDeviceBytes: m.peakDeviceBytes };
}

function evalSetFor(options: EvaluateOptions, seed: number): Example[] {
  let examples = options.examples ?? options.task?.evalExamples(seed);
  if (!examples) throw new InvalidArgumentError('evaluate() needs a task or examples');
  examples = examples.filter((e) => e.label >= 0);
  if (options.limit !== undefined) examples = examples.slice(0, options.limit);
  if (examples.length === 0) throw new InvalidArgumentError('no labelled evaluation examples');
  return examples;
}

async function adapterFor(adapter: AdapterForSeed | undefined, seed: number): Promise<IA3Adapter | null> {
  if (typeof adapter === 'function') return adapter(seed);
  return adapter ?? null;
}

/**
 * Accuracy of every template on every seed, and the median / IQR over all of them. `model` may be replicas of one
 * model (the same checkpoint on several GPUs): the template x seed runs are shared out among them and run at once
 * (the report lists them in seed, then template order all the same; onRun is called as each ends).
 */
export async function evaluate(model: ScoringModel | readonly ScoringModel[], options: EvaluateOptions): Promise<EvaluationReport> {
  const models = asReplicas(model, 'evaluate()');
  const tokenizer = requireTokenizer(models[0]);
  const templates = options.templates ?? options.task?.templates();
  if (!templates || templates.length === 0) throw new InvalidArgumentError('evaluate() needs templates (or a task)');
  const seeds = options.seeds ?? options.task?.seeds ?? [0];
  const maxLen = options.maxInputLength ?? options.task?.recipe.maxInputLength ?? DEFAULT_MAX_INPUT_LENGTH;
  // each seed's adapter and evaluation set, looked up once (when its first run starts)
  const perSeed = new Map<number, Promise<{ adapter: IA3Adapter | null; examples: Example[] }>>();
  const seedData = (seed: number) => {
    let d = perSeed.get(seed);
    if (!d) {
      d = (async () => ({ adapter: await adapterFor(options.adapter, seed), examples: evalSetFor(options, seed) }))();
      perSeed.set(seed, d);
    }
    return d;
  };
  const jobs = seeds.flatMap((seed) => templates.map((template) => ({ seed, template })));
  const runs: EvaluationRun[] = new Array(jobs.length);
  let anyAdapter = false;
  await shareOut(models, jobs.length, async (m, k) => {
    const { seed, template } = jobs[k];
    const { adapter, examples } = await seedData(seed);
    anyAdapter ||= adapter !== null;
    const encoded = examples.map((ex) => encodePrompt(tokenizer, template.render(ex), maxLen));
    runs[k] = await scoreRun(m, encoded, examples.map((e) => e.label), template.name, seed, {
      adapter, batchSize: options.batchSize, lengthNormalize: options.lengthNormalize,
    });
    options.onRun?.(runs[k]);
  });
  return report(options.method ?? (anyAdapter ? 'T-Few' : 'zero-shot'), options.task?.name ?? 'custom', runs);
}

/** Scores one template x seed run of encoded prompts: accuracy, predictions, time, memory, analytic cost. */
export async function scoreRun(
  model: ScoringModel,
  encoded: EncodedPrompt[],
  labels: number[],
  template: string,
  seed: number,
  options: { adapter?: IA3Adapter | null; batchSize?: number; lengthNormalize?: boolean },
): Promise<EvaluationRun> {
  const cost = promptCost(model.config, encoded);
  const scored = await scoreEncoded(model, encoded, options);
  return {
    template,
    seed,
    accuracy: accuracy(scored.predictions, labels),
    count: encoded.length,
    predictions: scored.predictions,
    labels,
    seconds: scored.seconds,
    peakRssBytes: scored.peakRssBytes,
    peakDeviceBytes: scored.peakDeviceBytes,
    meanInputTokens: cost.inputTokens,
    flopsPerExample: cost.flops,
  };
}

/** Aggregates runs into a report (shared with the ICL baseline). */
export function report(method: string, task: string, runs: EvaluationRun[]): EvaluationReport {
  const examples = runs.reduce((a, r) => a + r.count, 0);
  const weighted = (f: (r: EvaluationRun) => number) => runs.reduce((a, r) => a + f(r) * r.count, 0) / examples;
  return {
    method,
    task,
    runs,
    summary: summarizeRuns(runs),
    cost: {
      flopsPerExample: weighted((r) => r.flopsPerExample),
      msPerExample: (1000 * runs.reduce((a, r) => a + r.seconds, 0)) / examples,
      peakRssBytes: Math.max(...runs.map((r) => r.peakRssBytes)),
      peakDeviceBytes: Math.max(...runs.map((r) => r.peakDeviceBytes)),
      meanInputTokens: weighted((r) => r.meanInputTokens),
    },
  };
}

/** A report without the per-example predictions and labels (for JSON files). */
export function withoutPredictions(r: EvaluationReport): Omit<EvaluationReport, 'runs'> & { runs: Omit<EvaluationRun, 'predictions' | 'labels'>[] } {
  return { ...r, runs: r.runs.map(({ predictions: _p, labels: _l, ...rest }) => rest) };
}
