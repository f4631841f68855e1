// Rendered prompts -> token ids, with T-Few's truncation rules.
import { InvalidArgumentError } from '../errors';
import type { RenderedPrompt, Template } from '../templates/engine';
import type { Example } from '../tasks/types';

/** What the pipeline needs from a tokenizer (lib/tokenizer.ts's T5Tokenizer fits). */
export interface PromptTokenizer {
  encode(text: string, options?: { addEos?: boolean; maxLength?: number }): number[];
}

export interface EncodedPrompt {
  /** Encoder input ids, EOS last. */
  inputIds: number[];
  /** One id list per answer choice, each ending with EOS. */
  choiceIds: number[][];
  label: number;
}

/** T-Few's input length cap (tokenizer.model_max_length in its runs). */
export const DEFAULT_MAX_INPUT_LENGTH = 256;

/**
 * Tokenizes a prompt the way T-Few's data module does: a single input is truncated to `maxInputLength`
 * tokens with EOS kept; a multi-piece input (RAFT) has each piece tokenized and truncated on its own, only
 * the last with EOS, then concatenated (so it can exceed `maxInputLength`, as in T-Few). Every choice ends
 * with EOS.
 */
export function encodePrompt(tokenizer: PromptTokenizer, prompt: RenderedPrompt, maxInputLength = DEFAULT_MAX_INPUT_LENGTH): EncodedPrompt {
  if (!Number.isInteger(maxInputLength) || maxInputLength < 2) {
    throw new InvalidArgumentError(`maxInputLength must be an integer >= 2, got ${maxInputLength}`);
  }
  const pieces = prompt.input;
  if (pieces.length === 0) throw new InvalidArgumentError('a prompt needs at least one input piece');
  const inputIds: number[] = [];
  pieces.forEach((piece, i) => {
    const last = i === pieces.length - 1;
    inputIds.push(...tokenizer.encode(piece, { addEos: last, maxLength: maxInputLength }));
  });
  const choiceIds = prompt.choices.map((c) => tokenizer.encode(c, { addEos: true }));
  return { inputIds, choiceIds, label: prompt.label };
}

/** Renders and encodes every example with one template. */
export function encodeExamples(tokenizer: PromptTokenizer, template: Template, examples: readonly Example[], maxInputLength = DEFAULT_MAX_INPUT_LENGTH): EncodedPrompt[] {
  return examples.map((ex) => encodePrompt(tokenizer, template.render(ex), maxInputLength));
}
