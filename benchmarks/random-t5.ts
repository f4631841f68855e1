// Random T5 checkpoints of real sizes (the T0-3B architecture, or its width with fewer layers) written as
// bf16 safetensors, for the GPU benchmark and the GPU parity tests. Nothing is downloaded.
//
// Weights follow T5's initialisation scales (HF _init_weights with factor 1): embeddings and lm_head N(0, 1),
// q N(0, (d d_kv)^-1/2), k/v/wi N(0, d^-1/2), o N(0, inner^-1/2), wo N(0, d_ff^-1/2), norms 1, relative
// bias N(0, d^-1/2). Generating 2.85 billion independent normals in JS would take minutes, so each scale has
// a pool of ~4M seeded normals and a tensor reads the pool from a seeded offset with wrap-around (the pool
// length is odd, so rows of a matrix are never copies of each other). Deterministic for a seed.
//
// CLI:  node dist/benchmarks/random-t5.js --out DIR [--layers N] [--seed S] [--batch B --enc-len L]
import * as fs from 'fs';
import * as path from 'path';
import { requiredTensors } from '../lib/checkpoint';
import { parseT5Config, T5ModelConfig } from '../lib/config';
import { seededRandom } from '../lib/random';
import { floatBitsToBf16 } from '../lib/safetensors';

/** config.json of the T0-3B architecture (bigscience/T0_3B: T5 v1.1 LM-adapted XL). */
export function t0_3bConfigJson(layers = 24): Record<string, unknown> {
  return {
    architectures: ['T5ForConditionalGeneration'],
    model_type: 't5',
    vocab_size: 32128,
    d_model: 2048,
    d_ff: 5120,
    d_kv: 64,
    num_heads: 32,
    num_layers: layers,
    num_decoder_layers: layers,
    relative_attention_num_buckets: 32,
    relative_attention_max_distance: 128,
    dropout_rate: 0.1,
    layer_norm_epsilon: 1e-6,
    feed_forward_proj: 'gated-gelu',
    dense_act_fn: 'gelu_new',
    is_gated_act: true,
    tie_word_embeddings: false,
    is_encoder_decoder: true,
    pad_token_id: 0,
    eos_token_id: 1,
    decoder_start_token_id: 0,
  };
}

/** A small seeded PRNG (mulberry32): uniform in [0, 1). */
export const mulberry32 = seededRandom;

const POOL_LENGTH = 4_194_319; // odd: consecutive rows of a wrapped matrix are shifted, never equal

/** bf16 bytes of POOL_LENGTH normals N(0, std^2). */
function normalPool(std: number, seed: number): Buffer {
  const rand = mulberry32(seed);
  const f = new Float32Array(1);
  const bits = new Uint32Array(f.buffer);
  const out = Buffer.alloc(POOL_LENGTH * 2);
  for (let i = 0; i < POOL_LENGTH; i += 2) {
    // Box-Muller: two normals per pair of uniforms
    const u1 = Math.max(rand(), 1e-12);
    const u2 = rand();
    const r = Math.sqrt(-2 * Math.log(u1)) * std;
    f[0] = r * Math.cos(2 * Math.PI * u2);
    out.writeUInt16LE(floatBitsToBf16(bits[0]), 2 * i);
    if (i + 1 < POOL_LENGTH) {
      f[0] = r * Math.sin(2 * Math.PI * u2);
      out.writeUInt16LE(floatBitsToBf16(bits[0]), 2 * (i + 1));
    }
  }
  return out;
}

/** The init std of a tensor (null: fill with ones). */
function initStd(name: string, c: T5ModelConfig): number | null {
  const inner = c.numHeads * c.dKv;
  if (name.endsWith('layer_norm.weight')) return null;
  if (name === 'shared.weight' || name === 'lm_head.weight') return 1;
  if (name.endsWith('relative_attention_bias.weight')) return c.dModel ** -0.5;
  if (name.endsWith('.q.weight')) return (c.dModel * c.dKv) ** -0.5;
  if (name.endsWith('.k.weight') || name.endsWith('.v.weight')) return c.dModel ** -0.5;
  if (name.endsWith('.o.weight')) return inner ** -0.5;
  if (name.endsWith('.wo.weight')) return c.dFf ** -0.5;
  if (/\.wi(_0|_1)?\.weight$/.test(name)) return c.dModel ** -0.5;
  throw new Error(`random-t5: no init rule for ${name}`);
}

export interface RandomT5Options {
  /** config.json contents (default: the T0-3B architecture). */
  configJson?: Record<string, unknown>;
  seed?: number;
}

/**
 * Writes DIR/config.json and DIR/model.safetensors (bf16). Skips the work when DIR already holds a
 * checkpoint written with the same config and seed (a marker file records them).
 */
export function writeRandomT5(dir: string, options: RandomT5Options = {}): T5ModelConfig {
  const configJson = options.configJson ?? t0_3bConfigJson();
  const seed = options.seed ?? 1234;
  const config = parseT5Config(configJson, path.join(dir, 'config.json'));
  const marker = path.join(dir, '.random-t5.json');
  const signature = JSON.stringify({ configJson, seed, version: 1 });
  if (fs.existsSync(marker) && fs.readFileSync(marker, 'utf8') === signature && fs.existsSync(path.join(dir, 'model.safetensors'))) {
    return config;
  }
  fs.mkdirSync(dir, { recursive: true });
  fs.writeFileSync(path.join(dir, 'config.json'), JSON.stringify(configJson, null, 2));

  const tensors = requiredTensors(config);
  const header: Record<string, unknown> = { __metadata__: { format: 'pt', generator: '@tfew/cuda benchmarks/random-t5' } };
  let offset = 0;
  for (const t of tensors) {
    const bytes = t.shape.reduce((a, b) => a * b, 1) * 2;
    header[t.name] = { dtype: 'BF16', shape: t.shape, data_offsets: [offset, offset + bytes] };
    offset += bytes;
  }
  let json = JSON.stringify(header);
  json += ' '.repeat((8 - (Buffer.byteLength(json) % 8)) % 8);
  const headerBuf = Buffer.from(json, 'utf8');
  const lenBuf = Buffer.alloc(8);
  lenBuf.writeBigUInt64LE(BigInt(headerBuf.length));

  const pools = new Map<number, Buffer>();
  const pool = (std: number): Buffer => {
    let p = pools.get(std);
    if (!p) {
      p = normalPool(std, seed + pools.size * 7919);
      pools.set(std, p);
    }
    return p;
  };
  const ones = Buffer.alloc(64 << 10);
  for (let i = 0; i < ones.length; i += 2) ones.writeUInt16LE(0x3f80, i); // bf16 1.0

  const file = path.join(dir, 'model.safetensors');
  const tmp = `${file}.tmp-${process.pid}`;
  const fd = fs.openSync(tmp, 'w');
  const rand = mulberry32(seed ^ 0x5bd1e995);
  try {
    fs.writeSync(fd, lenBuf);
    fs.writeSync(fd, headerBuf);
    for (const t of tensors) {
      let remaining = t.shape.reduce((a, b) => a * b, 1) * 2;
      const std = initStd(t.name, config);
      if (std === null) {
        while (remaining > 0) remaining -= fs.writeSync(fd, ones, 0, Math.min(remaining, ones.length));
        continue;
      }
      const src = pool(std);
      let at = 2 * Math.floor(rand() * POOL_LENGTH);
      while (remaining > 0) {
        const n = Math.min(remaining, src.length - at);
        let done = 0;
        while (done < n) done += fs.writeSync(fd, src, at + done, n - done);
        remaining -= n;
        at = 0;
      }
    }
  } finally {
    fs.closeSync(fd);
  }
  fs.renameSync(tmp, file);
  fs.writeFileSync(marker, signature);
  return config;
}

export interface RandomBatch {
  inputIds: number[][];
  choices: number[][][];
  labels: number[];
}

/**
 * Random token ids (2..vocab-1, eos 1 last) with the given input lengths and choice lengths per example.
 * Deterministic for a seed.
 */
export function randomBatch(vocab: number, inputLengths: number[], choiceLengths: number[][], seed = 7): RandomBatch {
  const rand = mulberry32(seed);
  const token = () => 2 + Math.floor(rand() * (vocab - 2));
  const seq = (n: number) => [...Array.from({ length: n - 1 }, token), 1];
  return {
    inputIds: inputLengths.map(seq),
    choices: choiceLengths.map((lens) => lens.map(seq)),
    labels: choiceLengths.map((lens) => Math.floor(rand() * lens.length)),
  };
}

// ---- CLI
if (require.main === module) {
  const args = process.argv.slice(2);
  const opt = (name: string, fallback?: string): string | undefined => {
    const i = args.indexOf(`--${name}`);
    return i >= 0 ? args[i + 1] : fallback;
  };
  const out = opt('out');
  if (!out) {
    console.error('usage: random-t5 --out DIR [--layers N] [--seed S] [--batch-json FILE --batch B --enc-len L]');
    process.exit(2);
  }
  const layers = Number(opt('layers', '24'));
  const seed = Number(opt('seed', '1234'));
  const t0 = Date.now();
  const config = writeRandomT5(out, { configJson: t0_3bConfigJson(layers), seed });
  console.log(`[random-t5] ${out}: T0-3B width, ${layers}+${layers} layers, bf16 (${((Date.now() - t0) / 1000).toFixed(1)} s)`);
  const batchFile = opt('batch-json');
  if (batchFile) {
    // The GPU parity batch: long, unevenly padded inputs and choices of different lengths and counts.
    const batch = randomBatch(config.vocabSize, [300, 37, 128, 255], [[3, 8], [5, 1, 7], [8, 8], [2, 6, 4, 3]], seed + 1);
    fs.writeFileSync(batchFile, JSON.stringify(batch));
    console.log(`[random-t5] batch -> ${batchFile}`);
  }
}
