// Classifying new inputs with a trained adapter: one prediction (label name, scores) per example.
import type { IA3Adapter } from '../adapter';
import { InvalidArgumentError } from '../errors';
import type { Example } from '../tasks/types';
import type { Template } from '../templates/engine';
import { DEFAULT_MAX_INPUT_LENGTH, encodePrompt } from './encode';
import { requireTokenizer, scoreEncoded, type ScoringModel } from './evaluate';

export interface Prediction {
  id: string;
  /** Index of the chosen answer choice. */
  prediction: number;
  /** The chosen answer choice's text (for RAFT and user tasks: the label name). */
  label: string;
  /** Length-normalised log-probability of every choice. */
  scores: number[];
}

export interface ClassifyOptions {
  template: Template;
  adapter?: IA3Adapter | null;
  maxInputLength?: number;
  batchSize?: number;
  /** Report these names instead of the rendered choice texts (e.g. RAFT's label names). */
  labelNames?: readonly string[];
  onProgress?: (done: number, total: number) => void;
}

/** Rank-classifies examples (labels, when present, are ignored). */
export async function classify(model: ScoringModel, examples: readonly Example[], options: ClassifyOptions): Promise<Prediction[]> {
  if (examples.length === 0) throw new InvalidArgumentError('nothing to classify');
  const tokenizer = requireTokenizer(model);
  const maxLen = options.maxInputLength ?? DEFAULT_MAX_INPUT_LENGTH;
  const chunk = Math.max(1, options.batchSize ?? 32);
  const out: Prediction[] = [];
  for (let start = 0; start < examples.length; start += chunk) {
    const part = examples.slice(start, start + chunk);
    const prompts = part.map((ex) => options.template.render({ ...ex, label: -1 }));
    const encoded = prompts.map((p) => encodePrompt(tokenizer, p, maxLen));
    const scored = await scoreEncoded(model, encoded, { adapter: options.adapter, batchSize: chunk });
    part.forEach((ex, i) => {
      const p = scored.predictions[i];
      out.push({ id: ex.id, prediction: p, label: options.labelNames?.[p] ?? prompts[i].choices[p], scores: scored.scores[i] });
    });
    options.onProgress?.(Math.min(start + chunk, examples.length), examples.length);
  }
  return out;
}
