// `tfew bench`: the cost side of the comparison without a full run. Times T-Few inference (an adapter in
// place), ICL inference with k demonstrations, and a few training steps extrapolated to the recipe's
// 1000, on the same examples and model.
import { IA3Adapter } from '../adapter';
import { InvalidArgumentError } from '../errors';
import type { Recompute, T5Model } from '../model';
import type { Task } from '../tasks/registry';
import type { Template } from '../templates/engine';
import { ia3ParameterCount, type CostRow } from './cost';
import { evaluate, type EvaluationReport } from './evaluate';
import { trainAdapter } from './fewshot';
import { evaluateIcl } from './icl';

export interface BenchOptions {
  task: Task;
  template?: Template;
  /** Evaluation examples to time (default 64). */
  examples?: number;
  /** ICL demonstrations per query (default: the few-shot set). */
  shots?: number;
  /** Training steps actually run (default 10) and the recipe length they are scaled to (default 1000). */
  trainSteps?: number;
  recipeSteps?: number;
  batchSize?: number;
  iclMaxInputLength?: number;
  /** The timed training steps' recompute level (CUDA; the Trainer's default 'auto'). */
  recompute?: Recompute;
}

export interface BenchResult {
  rows: CostRow[];
  notes: string[];
  tfew: EvaluationReport;
  icl: EvaluationReport;
  secondsPerTrainingStep: number;
}

export async function benchmark(model: T5Model, options: BenchOptions): Promise<BenchResult> {
  const { task } = options;
  const template = options.template ?? task.templates()[0];
  if (!template) throw new InvalidArgumentError(`task ${task.name} has no template`);
  const n = options.examples ?? 64;
  const seed = task.seeds[0];
  const trainSteps = options.trainSteps ?? 10;
  const recipeSteps = options.recipeSteps ?? 1000;
  const batchSize = options.batchSize ?? 8;

  // Inference cost does not depend on the adapter's values: the identity adapter stands in for a trained one.
  const tfew = await evaluate(model, { task, templates: [template], seeds: [seed], adapter: IA3Adapter.create(model), limit: n, method: 'T-Few' });
  const icl = await evaluateIcl(model, { task, templates: [template], seeds: [seed], shots: options.shots, limit: n, maxInputLength: options.iclMaxInputLength });
  const { run } = await trainAdapter(model, { task, seed: task.kind === 'raft' ? undefined : seed, templates: [template], steps: trainSteps, batchSize, recompute: options.recompute });
  const perStep = run.seconds / Math.max(1, run.steps);
  const perStepFlops = run.flops / Math.max(1, run.steps);

  const row = (method: string, r: EvaluationReport, trainingFlops: number, trainingSeconds: number, diskBytes: number): CostRow => ({
    method,
    inferenceFlopsPerExample: r.cost.flopsPerExample,
    trainingFlops,
    diskBytes,
    accuracy: NaN,
    accuracyIqr: NaN,
    msPerExample: r.cost.msPerExample,
    trainingSeconds,
    peakRssBytes: r.cost.peakRssBytes,
    peakDeviceBytes: r.cost.peakDeviceBytes,
    meanInputTokens: r.cost.meanInputTokens,
  });
  const rows = [
    row('T-Few', tfew, perStepFlops * recipeSteps, perStep * recipeSteps, 4 * ia3ParameterCount(model.config)),
    row('ICL', icl, 0, 0, (icl as EvaluationReport & { demonstrationBytes: number }).demonstrationBytes),
  ];
  return {
    rows,
    tfew,
    icl,
    secondsPerTrainingStep: perStep,
    notes: [
      `Template: ${template.name}; ${tfew.runs[0].count} examples timed; ICL with ${options.shots ?? 'all'} demonstrations (as many as fit in ${options.iclMaxInputLength ?? 1024} tokens).`,
      `Training: ${run.steps} steps of batch ${Math.min(batchSize, run.trainExamples)} timed (${(perStep * 1000).toFixed(1)} ms/step), extrapolated to ${recipeSteps} steps.`,
      'Accuracy is not measured here (use `tfew icl --compare`).',
    ],
  };
}
