// Reads a Hugging Face T5 config.json (T5 v1.0, v1.1, T0, flan-t5) into the hyper-parameters the native
// engine needs. Defaults follow HF's T5Config so that sparse configs resolve the same way transformers does.
import * as fs from 'fs';
import * as path from 'path';
import { InvalidModelError } from './errors';
import type { NativeConfig } from './native';

export interface T5ModelConfig extends NativeConfig {
  modelType: string;
  feedForwardProj: string;
  /** The parsed config.json as it was on disk. */
  raw: Record<string, unknown>;
}

// mT5 is architecturally T5 v1.1 (gated-gelu, untied head), so the engine runs it unchanged.
const SUPPORTED_MODEL_TYPES = new Set(['t5', 'mt5']);
const SUPPORTED_FFN = new Set(['relu', 'gated-gelu']);

function isPlainObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** Resolves a parsed config.json. `file` is only used in error messages. */
export function parseT5Config(json: unknown, file: string): T5ModelConfig {
  if (!isPlainObject(json)) throw new InvalidModelError(`${file}: config must be a JSON object`);
  const raw = json;

  const modelType = resolveModelType(raw, file);

  const int = (key: string, fallback: number, min: number): number => {
    const v = raw[key];
    if (v === undefined || v === null) return fallback;
    if (typeof v !== 'number' || !Number.isInteger(v) || v < min) {
      throw new InvalidModelError(`${file}: "${key}" must be an integer >= ${min}, got ${JSON.stringify(v)}`);
    }
    return v;
  };
  const num = (key: string, fallback: number, ok: (x: number) => boolean, what: string): number => {
    const v = raw[key];
    if (v === undefined || v === null) return fallback;
    if (typeof v !== 'number' || !Number.isFinite(v) || !ok(v)) {
      throw new InvalidModelError(`${file}: "${key}" must be ${what}, got ${JSON.stringify(v)}`);
    }
    return v;
  };
  const bool = (key: string, fallback: boolean): boolean => {
    const v = raw[key];
    if (v === undefined || v === null) return fallback;
    if (typeof v !== 'boolean') throw new InvalidModelError(`${file}: "${key}" must be true or false, got ${JSON.stringify(v)}`);
    return v;
  };

  const ffnRaw = raw.feed_forward_proj ?? 'relu';
  if (typeof ffnRaw !== 'string') throw new InvalidModelError(`${file}: "feed_forward_proj" must be a string`);
  const feedForwardProj = ffnRaw.toLowerCase();
  if (!SUPPORTED_FFN.has(feedForwardProj)) {
    throw new InvalidModelError(
      `${file}: unsupported feed_forward_proj "${ffnRaw}" (supported: "relu" for T5 v1.0, "gated-gelu" for T5 v1.1 / T0 / flan-t5)`,
    );
  }

  const numLayers = int('num_layers', 6, 1);
  const tiedHead = bool('tie_word_embeddings', true);
  const config: T5ModelConfig = {
    vocabSize: int('vocab_size', 32128, 1),
    dModel: int('d_model', 512, 1),
    dFf: int('d_ff', 2048, 1),
    dKv: int('d_kv', 64, 1),
    numHeads: int('num_heads', 8, 1),
    numLayers,
    numDecoderLayers: int('num_decoder_layers', numLayers, 1),
    numBuckets: int('relative_attention_num_buckets', 32, 2),
    maxDistance: int('relative_attention_max_distance', 128, 1),
    layerNormEps: num('layer_norm_epsilon', 1e-6, (x) => x > 0, 'a positive number'),
    gatedGelu: feedForwardProj.startsWith('gated-'),
    tiedHead,
    // transformers >= 5 writes scale_decoder_outputs; older configs rescale exactly when the head is tied.
    scaleDecoderOutputs: bool('scale_decoder_outputs', tiedHead),
    dropoutRate: num('dropout_rate', 0.1, (x) => x >= 0 && x < 1, 'in [0, 1)'),
    padTokenId: int('pad_token_id', 0, 0),
    eosTokenId: int('eos_token_id', 1, 0),
    decoderStartTokenId: int('decoder_start_token_id', 0, 0),
    modelType,
    feedForwardProj,
    raw,
  };

  // T5's buckets: exact ones for distances below max_exact (num_buckets / 4 in the bidirectional encoder, / 2 in the
  // decoder), then log-spaced up to max_distance. Without an exact bucket, or with max_distance not above max_exact,
  // the log spacing divides by zero or goes negative and the bucket falls outside the table (the addon's check:
  // relative_buckets_valid in cuda/model/relative_position.h).
  if (config.numBuckets < 4 || config.maxDistance <= Math.floor(config.numBuckets / 2)) {
    throw new InvalidModelError(`${file}: relative_attention_num_buckets ${config.numBuckets} and relative_attention_max_distance ` +
      `${config.maxDistance} do not make T5's position buckets (at least 4 buckets, and max_distance above num_buckets / 2)`);
  }
  for (const key of ['padTokenId', 'eosTokenId', 'decoderStartTokenId'] as const) {
    if (config[key] >= config.vocabSize) {
      throw new InvalidModelError(`${file}: ${key} ${config[key]} is outside the vocabulary (vocab_size ${config.vocabSize})`);
    }
  }
  return config;
}

function resolveModelType(raw: Record<string, unknown>, file: string): string {
  const mt = raw.model_type;
  if (typeof mt === 'string') {
    if (!SUPPORTED_MODEL_TYPES.has(mt.toLowerCase())) {
      throw new InvalidModelError(`${file}: model_type "${mt}" is not a T5 model (expected "t5")`);
    }
    return mt.toLowerCase();
  }
  if (mt !== undefined && mt !== null) throw new InvalidModelError(`${file}: "model_type" must be a string`);
  // Very old configs omit model_type; accept them only when the architecture says T5.
  const archs = raw.architectures;
  if (Array.isArray(archs) && archs.some((a) => typeof a === 'string' && /^T5/.test(a))) return 't5';
  throw new InvalidModelError(`${file}: no model_type (expected "t5")`);
}

/** Reads and resolves DIR/config.json. */
export function readT5Config(dir: string): T5ModelConfig {
  const file = path.join(dir, 'config.json');
  if (!fs.existsSync(file)) throw new InvalidModelError(`no config.json in ${dir}`);
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (e) {
    throw new InvalidModelError(`${file}: cannot be read: ${(e as Error).message}`);
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (e) {
    throw new InvalidModelError(`${file}: invalid JSON: ${(e as Error).message}`);
  }
  return parseT5Config(json, file);
}
