// A tiny T5 the project builds itself (no downloads): HF layout (config.json, model.safetensors,
// tokenizer.json + tokenizer_config.json) so every code path that loads real checkpoints loads it too.
// Weights are random with T5's initialisation scales and fully determined by the seed.
import * as fs from 'fs';
import * as path from 'path';
import { requiredTensors } from './checkpoint';
import { readT5Config, T5ModelConfig } from './config';
import { InvalidArgumentError } from './errors';
import type { NativeConfig } from './native';
import { writeSafetensors, WritableTensor } from './safetensors';

export interface TinyModelOptions {
  /** Vocabulary source: lowercased and split on whitespace/punctuation; duplicates are dropped. */
  words: string[];
  seed?: number;
  dModel?: number;
  dFf?: number;
  numHeads?: number;
  dKv?: number;
  numLayers?: number;
  /** gated-gelu FFN (T5 v1.1 / T0); false: relu (T5 v1.0). */
  gated?: boolean;
  dropoutRate?: number;
}

const SPECIAL_TOKENS = ['<pad>', '</s>', '<unk>'] as const;
// The same split as the tokenizer's "Whitespace" pre-tokenizer (word characters, or runs of other non-spaces).
const WORD_PATTERN = /\w+|[^\w\s]+/g;

/** The tiny model's vocabulary: the special tokens, then the distinct lowercased words in first-seen order. */
export function tinyVocabulary(words: string[]): string[] {
  const vocab: string[] = [...SPECIAL_TOKENS];
  const seen = new Set<string>(vocab);
  for (const w of words) {
    for (const piece of w.toLowerCase().match(WORD_PATTERN) ?? []) {
      if (!seen.has(piece)) {
        seen.add(piece);
        vocab.push(piece);
      }
    }
  }
  return vocab;
}

/** Writes a tiny T5 checkpoint into DIR (created if needed) and returns its resolved config. */
export function buildTinyT5(dir: string, options: TinyModelOptions): { dir: string; config: T5ModelConfig } {
  if (!options || !Array.isArray(options.words) || options.words.some((w) => typeof w !== 'string')) {
    throw new InvalidArgumentError('buildTinyT5: options.words must be an array of strings');
  }
  const positive = (name: string, v: number | undefined, fallback: number): number => {
    const x = v ?? fallback;
    if (!Number.isInteger(x) || x < 1) throw new InvalidArgumentError(`buildTinyT5: ${name} must be a positive integer, got ${x}`);
    return x;
  };
  const dModel = positive('dModel', options.dModel, 64);
  const dFf = positive('dFf', options.dFf, 128);
  const numHeads = positive('numHeads', options.numHeads, 4);
  const dKv = positive('dKv', options.dKv, 16);
  const numLayers = positive('numLayers', options.numLayers, 2);
  const gated = options.gated ?? true;
  const dropoutRate = options.dropoutRate ?? 0.1;
  if (!(dropoutRate >= 0 && dropoutRate < 1)) throw new InvalidArgumentError(`buildTinyT5: dropoutRate must be in [0, 1), got ${dropoutRate}`);
  const seed = options.seed ?? 0;
  if (!Number.isInteger(seed)) throw new InvalidArgumentError(`buildTinyT5: seed must be an integer, got ${seed}`);

  const vocab = tinyVocabulary(options.words);
  if (vocab.length === SPECIAL_TOKENS.length) throw new InvalidArgumentError('buildTinyT5: options.words has no words');

  fs.mkdirSync(dir, { recursive: true });
  const configJson = {
    architectures: ['T5ForConditionalGeneration'],
    model_type: 't5',
    vocab_size: vocab.length,
    d_model: dModel,
    d_ff: dFf,
    d_kv: dKv,
    num_heads: numHeads,
    num_layers: numLayers,
    num_decoder_layers: numLayers,
    relative_attention_num_buckets: 32,
    relative_attention_max_distance: 128,
    dropout_rate: dropoutRate,
    layer_norm_epsilon: 1e-6,
    initializer_factor: 1.0,
    feed_forward_proj: gated ? 'gated-gelu' : 'relu',
    dense_act_fn: gated ? 'gelu_new' : 'relu',
    is_gated_act: gated,
    // T0's layout: a separate lm_head and no d_model^-0.5 rescale of the decoder output.
    tie_word_embeddings: false,
    scale_decoder_outputs: false,
    is_encoder_decoder: true,
    pad_token_id: 0,
    eos_token_id: 1,
    decoder_start_token_id: 0,
    use_cache: true,
  };
  fs.writeFileSync(path.join(dir, 'config.json'), `${JSON.stringify(configJson, null, 2)}\n`);
  const config = readT5Config(dir);

  writeSafetensors(path.join(dir, 'model.safetensors'), tinyWeights(config, seed), { format: 'pt' });
  writeTokenizer(dir, vocab);
  return { dir, config };
}

/** T5-style initial weights for every tensor the engine needs (HF T5PreTrainedModel._init_weights scales). */
function tinyWeights(config: NativeConfig, seed: number): Record<string, WritableTensor> {
  const d = config.dModel;
  const stdOf = (name: string): number => {
    if (name === 'shared.weight') return 1;
    // HF draws the untied head from N(0, 1); we scale it by d^-0.5 so the random model's logits stay O(1).
    if (name === 'lm_head.weight') return d ** -0.5;
    if (name.endsWith('relative_attention_bias.weight')) return 0.1;
    if (/\.q\.weight$/.test(name)) return (d * config.dKv) ** -0.5;
    if (/\.(k|v|o)\.weight$/.test(name) || /\.wi(_0|_1)?\.weight$/.test(name)) return d ** -0.5;
    if (/\.wo\.weight$/.test(name)) return config.dFf ** -0.5;
    return 0;
  };
  const out: Record<string, WritableTensor> = {};
  for (const { name, shape } of requiredTensors(config)) {
    const n = shape.reduce((a, b) => a * b, 1);
    const data = new Float32Array(n);
    if (name.endsWith('layer_norm.weight')) {
      data.fill(1);
    } else {
      // One stream per tensor, keyed by its name, so each tensor is independent of the others' order.
      const normal = gaussian(seed, name);
      const std = stdOf(name);
      for (let i = 0; i < n; i++) data[i] = std * normal();
    }
    out[name] = { dtype: 'F32', shape, data };
  }
  return out;
}

/** N(0, 1) samples from a SplitMix32-style generator seeded by (seed, key); Box-Muller transform. */
function gaussian(seed: number, key: string): () => number {
  let h = 0x811c9dc5 ^ (seed | 0) ^ Math.floor(seed / 2 ** 32);
  for (let i = 0; i < key.length; i++) h = Math.imul(h ^ key.charCodeAt(i), 0x01000193);
  let state = h >>> 0;
  const nextUint = (): number => {
    state = (state + 0x9e3779b9) >>> 0;
    let z = state;
    z = Math.imul(z ^ (z >>> 16), 0x85ebca6b);
    z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35);
    return (z ^ (z >>> 16)) >>> 0;
  };
  let spare: number | undefined;
  return () => {
    if (spare !== undefined) {
      const s = spare;
      spare = undefined;
      return s;
    }
    const u1 = (nextUint() + 1) / 2 ** 32; // (0, 1]: log stays finite
    const u2 = nextUint() / 2 ** 32;
    const r = Math.sqrt(-2 * Math.log(u1));
    spare = r * Math.sin(2 * Math.PI * u2);
    return r * Math.cos(2 * Math.PI * u2);
  };
}

/** A word-level tokenizer.json (lowercase, whitespace/punctuation split, </s> appended) + tokenizer_config.json. */
function writeTokenizer(dir: string, vocab: string[]): void {
  const special = (content: string, id: number) => ({
    id, content, single_word: false, lstrip: false, rstrip: false, normalized: false, special: true,
  });
  const tokenizer = {
    version: '1.0',
    truncation: null,
    padding: null,
    added_tokens: SPECIAL_TOKENS.map((t, i) => special(t, i)),
    normalizer: { type: 'Lowercase' },
    pre_tokenizer: { type: 'Whitespace' },
    post_processor: {
      type: 'TemplateProcessing',
      single: [{ Sequence: { id: 'A', type_id: 0 } }, { SpecialToken: { id: '</s>', type_id: 0 } }],
      pair: [
        { Sequence: { id: 'A', type_id: 0 } }, { SpecialToken: { id: '</s>', type_id: 0 } },
        { Sequence: { id: 'B', type_id: 0 } }, { SpecialToken: { id: '</s>', type_id: 0 } },
      ],
      special_tokens: { '</s>': { id: '</s>', ids: [1], tokens: ['</s>'] } },
    },
    decoder: null,
    model: { type: 'WordLevel', vocab: Object.fromEntries(vocab.map((w, i) => [w, i])), unk_token: '<unk>' },
  };
  fs.writeFileSync(path.join(dir, 'tokenizer.json'), `${JSON.stringify(tokenizer, null, 2)}\n`);
  const tokenizerConfig = {
    tokenizer_class: 'PreTrainedTokenizerFast',
    pad_token: '<pad>',
    eos_token: '</s>',
    unk_token: '<unk>',
    model_max_length: 512,
    clean_up_tokenization_spaces: false,
  };
  fs.writeFileSync(path.join(dir, 'tokenizer_config.json'), `${JSON.stringify(tokenizerConfig, null, 2)}\n`);
}
