// T-Few against in-context learning (and the untrained model) on one task: accuracy with the paper's
// protocol and the paper's Table 1 cost columns, measured with the same model on the same machine.
import type { IA3Adapter } from '../adapter';
import type { T5Model } from '../model';
import type { CostRow } from './cost';
import { evaluate, withoutPredictions, type EvaluationReport } from './evaluate';
import { runFewShot, type FewShotOptions, type FewShotResult, type TrainingRun } from './fewshot';
import { evaluateIcl } from './icl';
import type { MethodResult, ReportInput } from './report';

export interface CompareOptions extends FewShotOptions {
  /** Already-trained adapters by seed: skips training (training cost then comes from `training`). */
  adapters?: Map<number, IA3Adapter>;
  training?: TrainingRun[];
  /** ICL demonstrations per query (default: the seed's whole few-shot set, as many as fit). */
  iclShots?: number;
  iclMaxInputLength?: number;
  /** Also evaluate the model without an adapter (the paper's "T0 zero-shot" row). Default true. */
  zeroShot?: boolean;
}

export interface Comparison {
  task: string;
  tfew: EvaluationReport;
  training: TrainingRun[];
  icl: EvaluationReport & { demonstrationBytes: number };
  zeroShot?: EvaluationReport;
  adapterBytes: number;
  costs: CostRow[];
}

/** Builds the cost table rows from the three evaluations. */
export function costRows(c: Omit<Comparison, 'costs'>): CostRow[] {
  const mean = (xs: number[]) => (xs.length ? xs.reduce((a, b) => a + b, 0) / xs.length : 0);
  const row = (method: string, r: EvaluationReport, trainingFlops: number, trainingSeconds: number, diskBytes: number): CostRow => ({
    method,
    inferenceFlopsPerExample: r.cost.flopsPerExample,
    trainingFlops,
    diskBytes,
    accuracy: r.summary.median,
    accuracyIqr: r.summary.iqr,
    msPerExample: r.cost.msPerExample,
    trainingSeconds,
    peakRssBytes: r.cost.peakRssBytes,
    peakDeviceBytes: r.cost.peakDeviceBytes,
    meanInputTokens: r.cost.meanInputTokens,
  });
  // Adapters trained in an earlier run come without their training cost: reported as n/a, not 0.
  const trained = c.training.length > 0;
  const rows = [row('T-Few', c.tfew, trained ? mean(c.training.map((t) => t.flops)) : NaN,
    trained ? mean(c.training.map((t) => t.seconds)) : NaN, c.adapterBytes)];
  if (c.zeroShot) rows.push(row('zero-shot', c.zeroShot, 0, 0, 0));
  rows.push(row('ICL', c.icl, 0, 0, c.icl.demonstrationBytes));
  return rows;
}

/** Trains (unless adapters are given) and evaluates T-Few, then ICL and zero-shot, with the same templates and seeds. */
export async function compareWithIcl(model: T5Model, options: CompareOptions): Promise<Comparison> {
  const { task } = options;
  let tfew: EvaluationReport;
  let training: TrainingRun[];
  let adapterBytes: number;
  let seeds: readonly number[];
  if (options.adapters) {
    const adapters = options.adapters;
    seeds = options.seeds ?? [...adapters.keys()];
    training = options.training ?? [];
    tfew = await evaluate(model, {
      task, templates: options.templates, seeds, adapter: (s) => adapters.get(s) ?? null,
      maxInputLength: options.maxInputLength, batchSize: options.evalBatchSize, limit: options.evalLimit, method: 'T-Few',
      onRun: options.onEvalRun,
    });
    const any = adapters.values().next().value as IA3Adapter | undefined;
    adapterBytes = any ? 4 * any.data.length : 0;
  } else {
    const r: FewShotResult = await runFewShot(model, options);
    tfew = r.evaluation;
    training = r.training;
    adapterBytes = r.adapterBytes;
    seeds = r.training.map((t) => t.seed);
  }
  const icl = await evaluateIcl(model, {
    task, templates: options.templates, seeds, shots: options.iclShots, maxInputLength: options.iclMaxInputLength,
    batchSize: options.evalBatchSize, limit: options.evalLimit,
  });
  // Without training only RAFT's held-out folds depend on the seed: elsewhere one pass is enough.
  const zeroShotSeeds = task.kind === 'raft' ? seeds : seeds.slice(0, 1);
  const zeroShot = options.zeroShot === false ? undefined : await evaluate(model, {
    task, templates: options.templates, seeds: zeroShotSeeds, adapter: null, maxInputLength: options.maxInputLength,
    batchSize: options.evalBatchSize, limit: options.evalLimit, method: 'zero-shot',
  });
  const partial = { task: task.name, tfew, training, icl, zeroShot, adapterBytes };
  return { ...partial, costs: costRows(partial) };
}

/** Method results for the report (T-Few, zero-shot, ICL). */
export function methodResults(c: Comparison): MethodResult[] {
  const out: MethodResult[] = [c.tfew];
  if (c.zeroShot) out.push(c.zeroShot);
  out.push(c.icl);
  return out.map((r) => ({ method: r.method, task: r.task, runs: r.runs, summary: r.summary }));
}

/** The report input of a comparison (lib/pipeline/report.ts renders it). */
export function comparisonReport(c: Comparison, setup: string[], notes: string[] = []): Omit<ReportInput, 'plotPath'> {
  return {
    title: `T-Few vs in-context learning: ${c.task}`,
    setup,
    results: methodResults(c),
    costs: c.costs,
    notes: [
      'T-Few: one (IA)3 adapter trained per seed with LM + UL + LN losses; ICL: the same seed\'s few-shot examples as demonstrations in the encoder input, no training.',
      ...notes,
    ],
  };
}

/** The JSON-friendly form of a comparison (drops predictions to keep files small). */
export function comparisonJson(c: Comparison): unknown {
  const strip = withoutPredictions;
  return { task: c.task, tfew: strip(c.tfew), zeroShot: c.zeroShot ? strip(c.zeroShot) : undefined, icl: strip(c.icl), training: c.training, costs: c.costs };
}
