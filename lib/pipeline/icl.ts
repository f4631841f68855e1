// The in-context-learning baseline: no training; k labelled demonstrations, each rendered with the same
// template as the query and followed by its answer, are concatenated in front of the query in the encoder
// input, and the query's answer choices are rank-classified as usual. The demonstrations are the same
// few-shot examples T-Few trains on for that seed.
import { InvalidArgumentError } from '../errors';
import type { Task } from '../tasks/registry';
import type { Example } from '../tasks/types';
import type { RenderedPrompt, Template } from '../templates/engine';
import type { EncodedPrompt, PromptTokenizer } from './encode';
import { report, requireTokenizer, scoreRun, type EvaluationReport, type EvaluationRun, type ScoringModel } from './evaluate';

/** Encoder budget for ICL inputs: long enough for dozens of short demonstrations. */
export const DEFAULT_ICL_MAX_INPUT_LENGTH = 1024;
/** Between demonstrations (T5's tokenizer turns newlines into spaces; it still reads well in logs). */
export const ICL_SEPARATOR = '\n\n';

/** A demonstration's text: its prompt followed by its gold answer. */
export function demonstrationText(prompt: RenderedPrompt): string {
  if (prompt.label < 0) throw new InvalidArgumentError('a demonstration needs a label');
  return `${prompt.input.join(' ')} ${prompt.choices[prompt.label]}`;
}

export interface IclInput extends EncodedPrompt {
  /** Demonstrations that fit (the earliest are dropped first when the budget is exceeded). */
  demonstrationsUsed: number;
}

/**
 * Builds one ICL encoder input: as many of the demonstrations as fit in `maxInputLength` tokens (dropping
 * from the front), then the query (truncated itself only when it alone exceeds the budget), EOS last.
 */
export function buildIclInput(tokenizer: PromptTokenizer, demonstrations: readonly RenderedPrompt[], query: RenderedPrompt, maxInputLength = DEFAULT_ICL_MAX_INPUT_LENGTH): IclInput {
  const queryIds = tokenizer.encode(query.input.join(' '), { addEos: true, maxLength: maxInputLength });
  const demoIds = demonstrations.map((d) => tokenizer.encode(`${demonstrationText(d)}${ICL_SEPARATOR}`, { addEos: false }));
  let budget = maxInputLength - queryIds.length;
  let first = demoIds.length;
  while (first > 0 && demoIds[first - 1].length <= budget) {
    budget -= demoIds[first - 1].length;
    first--;
  }
  const inputIds = [...demoIds.slice(first).flat(), ...queryIds];
  return {
    inputIds,
    choiceIds: query.choices.map((c) => tokenizer.encode(c, { addEos: true })),
    label: query.label,
    demonstrationsUsed: demoIds.length - first,
  };
}

export interface IclOptions {
  task?: Task;
  /** Query examples; default the task's evaluation set. */
  examples?: Example[];
  /** Demonstration pool per seed; default the task's few-shot training set for that seed. */
  demonstrations?: (seed: number) => Example[];
  templates?: Template[];
  seeds?: readonly number[];
  /** Demonstrations per query (default: the whole few-shot set, as many as fit). */
  shots?: number;
  maxInputLength?: number;
  batchSize?: number;
  lengthNormalize?: boolean;
  limit?: number;
  onRun?: (run: EvaluationRun & { demonstrationsUsed: number }) => void;
}

/** ICL accuracy per template and seed, and its cost, in the same report shape as evaluate(). */
export async function evaluateIcl(model: ScoringModel, options: IclOptions): Promise<EvaluationReport & { demonstrationBytes: number }> {
  const tokenizer = requireTokenizer(model);
  const templates = options.templates ?? options.task?.templates();
  if (!templates || templates.length === 0) throw new InvalidArgumentError('evaluateIcl() needs templates (or a task)');
  const seeds = options.seeds ?? options.task?.seeds ?? [0];
  const maxLen = options.maxInputLength ?? DEFAULT_ICL_MAX_INPUT_LENGTH;
  const runs: EvaluationRun[] = [];
  let demoBytes = 0;
  for (const seed of seeds) {
    const pool = options.demonstrations?.(seed) ?? options.task?.trainExamples(seed);
    if (!pool || pool.length === 0) throw new InvalidArgumentError('ICL needs labelled demonstrations');
    const demos = pool.filter((e) => e.label >= 0).slice(0, options.shots ?? pool.length);
    let queries = options.examples ?? options.task?.evalExamples(seed);
    if (!queries) throw new InvalidArgumentError('evaluateIcl() needs a task or examples');
    queries = queries.filter((e) => e.label >= 0);
    if (options.limit !== undefined) queries = queries.slice(0, options.limit);
    const labels = queries.map((q) => q.label);
    for (const template of templates) {
      const rendered = demos.map((d) => template.render(d));
      demoBytes = Math.max(demoBytes, Buffer.byteLength(rendered.map(demonstrationText).join(ICL_SEPARATOR)));
      const inputs = queries.map((q) => buildIclInput(tokenizer, rendered, template.render(q), maxLen));
      const run = {
        ...(await scoreRun(model, inputs, labels, template.name, seed, {
          adapter: null, batchSize: options.batchSize, lengthNormalize: options.lengthNormalize,
        })),
        demonstrationsUsed: Math.min(...inputs.map((i) => i.demonstrationsUsed)),
      };
      runs.push(run);
      options.onRun?.(run);
    }
  }
  return { ...report('ICL', options.task?.name ?? 'custom', runs), demonstrationBytes: demoBytes };
}
