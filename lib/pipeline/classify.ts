// Classifying new inputs with a trained adapter: one prediction (label name, scores) per example.
import type { IA3Adapter } from '../adapter';
import { callGroups } from '../batch';
import { InvalidArgumentError } from '../errors';
import { asReplicas, shareOut } from '../replicas';
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

/**
 * Rank-classifies examples (labels, when present, are ignored). The prompts are tokenized first and scored in
 * chunks of batchSize grouped by length (callGroups: each chunk pads to its longest prompt). `model` may be
 * replicas of one model (the same checkpoint on several GPUs): the chunks are shared out among them. The
 * predictions come in input order.
 */
export async function classify(model: ScoringModel | readonly ScoringModel[], examples: readonly Example[],
                               options: ClassifyOptions): Promise<Prediction[]> {
  const models = asReplicas(model, 'classify()');
  if (examples.length === 0) throw new InvalidArgumentError('nothing to classify');
  const tokenizer = requireTokenizer(models[0]);
  const maxLen = options.maxInputLength ?? DEFAULT_MAX_INPUT_LENGTH;
  const chunk = Math.max(1, options.batchSize ?? 32);
  const prompts = examples.map((ex) => options.template.render({ ...ex, label: -1 }));
  const encoded = prompts.map((p) => encodePrompt(tokenizer, p, maxLen));
  const jobs = callGroups(encoded.map((e) => ({ inputIds: e.inputIds, choices: e.choiceIds })), chunk);
  const out: Prediction[] = new Array(examples.length);
  let done = 0;
  await shareOut(models, jobs.length, async (m, job) => {
    const members = jobs[job];
    const scored = await scoreEncoded(m, members.map((i) => encoded[i]), { adapter: options.adapter, batchSize: chunk });
    members.forEach((i, k) => {
      const p = scored.predictions[k];
      out[i] = { id: examples[i].id, prediction: p, label: options.labelNames?.[p] ?? prompts[i].choices[p], scores: scored.scores[k] };
    });
    done += members.length;
    options.onProgress?.(done, examples.length);
  });
  return out;
}
