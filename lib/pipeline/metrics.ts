// Accuracy and the paper's aggregate: median and interquartile range over every (template, seed) run.
import { InvalidArgumentError } from '../errors';

export function accuracy(predictions: readonly number[], labels: readonly number[]): number {
  if (predictions.length !== labels.length) {
    throw new InvalidArgumentError(`${predictions.length} predictions for ${labels.length} labels`);
  }
  if (labels.length === 0) throw new InvalidArgumentError('accuracy of an empty set');
  let correct = 0;
  for (let i = 0; i < labels.length; i++) if (predictions[i] === labels[i]) correct++;
  return correct / labels.length;
}

/** The q-quantile with linear interpolation between order statistics (NumPy's default, "type 7"). */
export function quantile(values: readonly number[], q: number): number {
  if (values.length === 0) throw new InvalidArgumentError('quantile of an empty list');
  if (!(q >= 0 && q <= 1)) throw new InvalidArgumentError(`quantile must be in [0, 1], got ${q}`);
  const sorted = [...values].sort((a, b) => a - b);
  const h = (sorted.length - 1) * q;
  const lo = Math.floor(h);
  const hi = Math.min(lo + 1, sorted.length - 1);
  return sorted[lo] + (h - lo) * (sorted[hi] - sorted[lo]);
}

export function median(values: readonly number[]): number {
  return quantile(values, 0.5);
}

export interface Spread {
  median: number;
  /** 25th and 75th percentiles; iqr = q75 - q25. */
  q25: number;
  q75: number;
  iqr: number;
  mean: number;
  min: number;
  max: number;
  count: number;
}

export function spread(values: readonly number[]): Spread {
  const q25 = quantile(values, 0.25);
  const q75 = quantile(values, 0.75);
  return {
    median: median(values),
    q25,
    q75,
    iqr: q75 - q25,
    mean: values.reduce((a, b) => a + b, 0) / values.length,
    min: Math.min(...values),
    max: Math.max(...values),
    count: values.length,
  };
}

/** One evaluation run: one template on one seed's model (or one seed's demonstrations for ICL). */
export interface RunAccuracy {
  template: string;
  seed: number;
  accuracy: number;
  /** Evaluated examples. */
  count: number;
}

export interface AccuracySummary extends Spread {
  /** Median and IQR over seeds, per template. */
  perTemplate: Record<string, Spread>;
  /** Median and IQR over templates, per seed. */
  perSeed: Record<string, Spread>;
}

/**
 * The paper's protocol: the median (and interquartile range) of the accuracies of every template x seed
 * run, pooled; per-template and per-seed breakdowns alongside.
 */
export function summarizeRuns(runs: readonly RunAccuracy[]): AccuracySummary {
  if (runs.length === 0) throw new InvalidArgumentError('no runs to summarize');
  const group = (key: (r: RunAccuracy) => string): Record<string, Spread> => {
    const by = new Map<string, number[]>();
    for (const r of runs) {
      const k = key(r);
      if (!by.has(k)) by.set(k, []);
      (by.get(k) as number[]).push(r.accuracy);
    }
    return Object.fromEntries([...by].map(([k, v]) => [k, spread(v)]));
  };
  return {
    ...spread(runs.map((r) => r.accuracy)),
    perTemplate: group((r) => r.template),
    perSeed: group((r) => String(r.seed)),
  };
}
