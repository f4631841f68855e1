// Turns examples (token ids per input and per answer choice, an adapter index per example) into the flat
// NativeBatch layout of cuda/model/batch.h, validating everything on the way so bad input fails here with
// a message that names the example, not deep inside the engine.
import { InvalidArgumentError } from './errors';
import { native, NativeBatch } from './native';

export interface EncodedExample {
  inputIds: number[];
  choices: number[][];
  label?: number;
  adapterIndex: number; // -1 = no adapter
}

/** Throws InvalidArgumentError unless `ids` is a non-empty array of token ids in [0, vocabSize). */
export function checkIds(ids: unknown, vocabSize: number, what: string): asserts ids is number[] {
  if (!Array.isArray(ids) && !ArrayBuffer.isView(ids)) throw new InvalidArgumentError(`${what} must be an array of token ids`);
  const arr = ids as ArrayLike<unknown>;
  if (arr.length === 0) throw new InvalidArgumentError(`${what} is empty`);
  for (let i = 0; i < arr.length; i++) {
    const id = arr[i];
    if (typeof id !== 'number' || !Number.isInteger(id) || id < 0 || id >= vocabSize) {
      throw new InvalidArgumentError(`${what}: token id ${JSON.stringify(id)} at position ${i} is not in the vocabulary [0, ${vocabSize})`);
    }
  }
}

/**
 * Throws InvalidArgumentError naming example `b` unless its input and choices are token ids in the vocabulary,
 * it has choices, none of them only padding, and (withLabels) its label is one of them. padId: the config's pad
 * token. Choices are padded with it and the engine masks exactly the targets equal to it, so a choice needs at
 * least one other token (else its length-normalised score would be 0 / 0).
 */
export function checkExample(ex: Omit<EncodedExample, 'adapterIndex'>, b: number, vocabSize: number, withLabels: boolean,
                             padId = 0): void {
  checkIds(ex.inputIds, vocabSize, `input ${b}`);
  if (!Array.isArray(ex.choices) || ex.choices.length === 0) throw new InvalidArgumentError(`example ${b} has no answer choices`);
  ex.choices.forEach((c, j) => {
    checkIds(c, vocabSize, `choice ${j} of example ${b}`);
    if (c.every((id) => id === padId)) throw new InvalidArgumentError(`choice ${j} of example ${b} has only pad tokens (${padId})`);
  });
  if (withLabels) {
    if (!Number.isInteger(ex.label) || (ex.label as number) < 0 || (ex.label as number) >= ex.choices.length) {
      throw new InvalidArgumentError(`label ${String(ex.label)} of example ${b} is not one of its ${ex.choices.length} choices`);
    }
  }
}

/**
 * A training batch's encoder length is its longest input rounded up to a multiple of this (masked padding, as
 * Hugging Face's `pad_to_multiple_of=8`): the CUDA engine's strided cross-attention GEMMs have the length as a
 * dimension and ran ~4.5x slower at 249 tokens than at 256 on an H200 (TRAIN-3B-LEN249 41.5 ms a step against
 * 34.6 at 256, session 19). Both backends get the same batch, so their dropout masks (numbered by position in the
 * padded batch) stay the same. Rank classification pads in the engine instead (graph_bucket_call), where it can
 * keep encoder states and logits at their exact shape. The addon's value (model/graph_buckets.h
 * kEncoderLengthAlignment), the engine's alignment of larger calls.
 */
export function trainingLengthMultiple(): number {
  return native().buildInfo.encoderLengthAlignment;
}
/** Input positions one engine call may have (the addon's, model/graph_buckets.h kMaxCallTokens). */
function maxCallTokens(): number {
  return native().buildInfo.maxCallTokens;
}

/** buildBatch's options: labels wanted, the pad token, the encoder length's multiple, examples already checked. */
export interface BuildBatchOptions {
  withLabels?: boolean;
  padId?: number;
  lengthMultiple?: number;
  /** Every example has passed checkExample already (rankClassify checks the whole list before its first call). */
  checked?: boolean;
}

/**
 * The engine's flat batch of `examples` (each checked: checkExample, unless `checked`), padded to the longest input
 * (rounded up to a multiple of `lengthMultiple`) and the longest choice.
 */
export function buildBatch(examples: EncodedExample[], vocabSize: number, options: BuildBatchOptions = {}): NativeBatch {
  const { withLabels = false, padId = 0, lengthMultiple = 1, checked = false } = options;
  if (examples.length === 0) throw new InvalidArgumentError('the batch is empty');
  let encLen = 0;
  let decLen = 0;
  let numRows = 0;
  examples.forEach((ex, b) => {
    if (!checked) checkExample(ex, b, vocabSize, withLabels, padId);
    encLen = Math.max(encLen, ex.inputIds.length);
    for (const c of ex.choices) decLen = Math.max(decLen, c.length);
    numRows += ex.choices.length;
  });
  const B = examples.length;
  // (not past the engines' 2^24 input positions a call, which the exact length may stay within)
  const rounded = Math.ceil(encLen / lengthMultiple) * lengthMultiple;
  if (B * rounded <= maxCallTokens()) encLen = rounded;
  const inputIds = new Int32Array(B * encLen).fill(padId);
  const encLengths = new Int32Array(B);
  const choiceIds = new Int32Array(numRows * decLen).fill(padId);
  const rowStart = new Int32Array(B + 1);
  const adapterOfExample = new Int32Array(B);
  const labels = withLabels ? new Int32Array(B) : undefined;
  let r = 0;
  examples.forEach((ex, b) => {
    inputIds.set(ex.inputIds, b * encLen);
    encLengths[b] = ex.inputIds.length;
    rowStart[b] = r;
    for (const c of ex.choices) choiceIds.set(c, (r++) * decLen);
    adapterOfExample[b] = ex.adapterIndex;
    if (labels) labels[b] = ex.label as number;
  });
  rowStart[B] = r;
  return { batchSize: B, encLen, inputIds, encLengths, numRows, decLen, choiceIds, rowStart, adapterOfExample, labels };
}

/** Splits per-row token log-probs back into per-example lists: sums, lengths (non-pad tokens, eos counted). */
export function perChoiceScores(batch: NativeBatch, tokenLogp: Float32Array, padId: number): { logProbs: number[][]; lengths: number[][] } {
  const logProbs: number[][] = [];
  const lengths: number[][] = [];
  for (let b = 0; b < batch.batchSize; b++) {
    const lp: number[] = [];
    const ln: number[] = [];
    for (let r = batch.rowStart[b]; r < batch.rowStart[b + 1]; r++) {
      let sum = 0;
      let n = 0;
      for (let t = 0; t < batch.decLen; t++) {
        if (batch.choiceIds[r * batch.decLen + t] === padId) continue;
        sum += tokenLogp[r * batch.decLen + t];
        n++;
      }
      lp.push(sum);
      ln.push(n);
    }
    logProbs.push(lp);
    lengths.push(ln);
  }
  return { logProbs, lengths };
}

/**
 * The examples of each native call, by index, batchSize at a time. With groupByLength (and more than one call)
 * grouped by length: by number of choices first (on CUDA a call whose examples all have as many choices takes the
 * folded cross-attention), then within each by input length, then by longest choice, longest first (a group's
 * first call is its largest: a CUDA arena grows at most once a group); ties keep the order given. Else in the
 * order given.
 */
export function callGroups(examples: readonly { inputIds: ArrayLike<number>; choices: readonly ArrayLike<number>[] }[],
                           batchSize: number, groupByLength = true): number[][] {
  const order = examples.map((_, i) => i);
  if (groupByLength && examples.length > batchSize) {
    const longestChoice = examples.map((e) => Math.max(...e.choices.map((c) => c.length)));
    order.sort((a, b) => examples[b].choices.length - examples[a].choices.length ||
                         examples[b].inputIds.length - examples[a].inputIds.length ||
                         longestChoice[b] - longestChoice[a] || a - b);
  }
  const groups: number[][] = [];
  for (let start = 0; start < order.length; start += batchSize) groups.push(order.slice(start, start + batchSize));
  return groups;
}
