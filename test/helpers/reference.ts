// The golden fixture batch and expected values of one tiny checkpoint, in the shapes the public API takes.
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { readSafetensorsF64, readSafetensorsHeader, readTensorF32, writeSafetensors, WritableTensor } from '../../lib/safetensors';
import { fixturesDir } from './paths';

export const CHECKPOINTS = ['tiny-gated-gelu-untied', 'tiny-relu-tied'] as const;

export interface FixtureBatch {
  dir: string;
  ref: Map<string, { shape: number[]; data: Float64Array }>;
  inputIds: number[][]; // unpadded (per attention_mask), eos included
  choices: number[][][]; // per example, per choice, trailing pads stripped
  labels: number[];
  get(key: string): Float64Array;
}

export function loadFixture(name: string): FixtureBatch {
  const dir = path.join(fixturesDir(), name);
  const ref = readSafetensorsF64(path.join(dir, 'reference.safetensors'));
  const get = (key: string): Float64Array => {
    const t = ref.get(key);
    if (!t) throw new Error(`fixture ${name} has no ${key}`);
    return t.data;
  };
  const [B, Le] = (ref.get('input_ids') as { shape: number[] }).shape;
  const [, C, Lc] = (ref.get('choices') as { shape: number[] }).shape;
  const ids = get('input_ids');
  const mask = get('attention_mask');
  const ch = get('choices');
  const inputIds: number[][] = [];
  const choices: number[][][] = [];
  for (let b = 0; b < B; b++) {
    const row: number[] = [];
    for (let t = 0; t < Le; t++) if (mask[b * Le + t] === 1) row.push(ids[b * Le + t]);
    inputIds.push(row);
    const cs: number[][] = [];
    for (let c = 0; c < C; c++) {
      const toks = Array.from(ch.subarray((b * C + c) * Lc, (b * C + c + 1) * Lc));
      while (toks.length > 0 && toks[toks.length - 1] === 0) toks.pop();
      cs.push(toks);
    }
    choices.push(cs);
  }
  return { dir, ref, inputIds, choices, labels: Array.from(get('labels')), get };
}

/** Norm-based relative error ||a - b|| / ||b||. */
export function relError(a: ArrayLike<number>, b: ArrayLike<number>): number {
  if (a.length !== b.length) throw new Error(`length mismatch: ${a.length} vs ${b.length}`);
  let num = 0;
  let den = 0;
  for (let i = 0; i < a.length; i++) {
    num += (a[i] - b[i]) ** 2;
    den += b[i] ** 2;
  }
  return Math.sqrt(num / Math.max(den, 1e-300));
}

/** Elementwise max |a - b| / max(|b|, floor). */
export function maxRelError(a: ArrayLike<number>, b: ArrayLike<number>, floor = 1e-6): number {
  let worst = 0;
  for (let i = 0; i < a.length; i++) worst = Math.max(worst, Math.abs(a[i] - b[i]) / Math.max(Math.abs(b[i]), floor));
  return worst;
}

/**
 * A copy of a fixture checkpoint whose feed-forward sub-layers' norm weights are multiplied by `factor` (everything
 * else as it is): the FFN pre-activations grow by that factor, reaching values far below zero (gated-gelu's
 * overflow region) that the fixtures' own weights never produce.
 */
export function scaledFfnNormCopy(dir: string, factor: number): string {
  const out = fs.mkdtempSync(path.join(os.tmpdir(), 'tfew-ffn-scaled-'));
  fs.cpSync(dir, out, { recursive: true });
  const file = path.join(dir, 'model.safetensors');
  const tensors: Record<string, WritableTensor> = {};
  for (const [name, entry] of readSafetensorsHeader(file).entries) {
    const data = readTensorF32(file, entry);
    if (/^(encoder\.block\.\d+\.layer\.1|decoder\.block\.\d+\.layer\.2)\.layer_norm\.weight$/.test(name)) {
      for (let i = 0; i < data.length; ++i) data[i] *= factor;
    }
    tensors[name] = { dtype: 'F32', shape: entry.shape, data };
  }
  writeSafetensors(path.join(out, 'model.safetensors'), tensors);
  return out;
}
