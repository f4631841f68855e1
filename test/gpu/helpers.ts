// Shared by the GPU tests: whether CUDA is usable (tests skip cleanly otherwise), loading a model on the
// CUDA backend in a given precision, and the bf16 tolerances measured from PyTorch in the same device run.
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { CudaOptions, IA3Adapter, T5Model } from '../../lib';
import { mulberry32, t0_3bConfigJson, writeRandomT5 } from '../../benchmarks/random-t5';
import { native } from '../../lib/native';

export interface CudaStatus {
  usable: boolean;
  reason: string;
}

let status: CudaStatus | undefined;

/** Probes once; an addon that cannot load counts as "no CUDA" (the CPU tests report that failure). */
export function cudaStatus(): CudaStatus {
  if (!status && process.env.TFEW_EMULATOR_MISSING) status = { usable: false, reason: process.env.TFEW_EMULATOR_MISSING };
  if (!status) {
    try {
      const p = native().probeCuda();
      status = { usable: p.usable, reason: p.reason };
    } catch (e) {
      status = { usable: false, reason: (e as Error).message };
    }
    // eslint-disable-next-line no-console
    if (!status.usable) console.warn(`[tfew tests] skipping CUDA tests: ${status.reason}`);
  }
  return status;
}

/** True when the GPU is the CUDA emulator (cuda/emu: the cuda-emulator jest project), not a real one. */
export function emulated(): boolean {
  try {
    return cudaStatus().usable && /emulator/.test(native().probeCuda().deviceName);
  } catch {
    return false;
  }
}

/**
 * The random checkpoint of the "T0-3B width" tests: 2 + 2 layers of T0-3B (d_model 2048, d_ff 5120, 32 heads
 * of 64, vocab 32128) on a GPU. On the emulator, where every kernel thread runs on the CPU, the same shape
 * at a quarter of the width (d_model 512, d_ff 1280, 8 heads of 64: the same d_kv, so the same kernel
 * instances), and its own directory.
 */
export function randomCheckpoint(): { dir: string; config: Record<string, unknown>; weightBytesBf16: number } {
  const config = t0_3bConfigJson(2);
  let name = 'tfew-rand-t0w-2l';
  if (emulated()) {
    Object.assign(config, { d_model: 512, d_ff: 1280, num_heads: 8 });
    name = 'tfew-rand-t0w-emu-2l';
  }
  const dir = process.env.TFEW_RANDOM_T5_DIR && !emulated() ? process.env.TFEW_RANDOM_T5_DIR : path.join(os.tmpdir(), name);
  writeRandomT5(dir, { configJson: config, seed: 1234 }); // no-op when already written
  const d = config.d_model as number, ff = config.d_ff as number, inner = (config.num_heads as number) * (config.d_kv as number);
  const layers = config.num_layers as number, vocab = config.vocab_size as number;
  const perLayer = 4 * inner * d + 3 * ff * d; // q k v o + gated wi_0 wi_1 wo (the decoder adds cross q k v o)
  const weights = 2 * vocab * d + layers * perLayer + layers * (perLayer + 4 * inner * d);
  return { dir, config, weightBytesBf16: 2 * weights };
}

/** describe() when CUDA is usable, describe.skip otherwise. */
export const describeCuda: jest.Describe = cudaStatus().usable ? describe : describe.skip;

export type Precision = 'bf16' | 'fp32';

/**
 * Loads DIR on the CUDA backend. precision 'fp32' selects the engine's verification mode (fp32 weights and
 * activations, cuBLAS without TF32); `cuda` sets the other engine switches (e.g. fusedAttention: false).
 * (Explicit options, not environment variables: jest gives each test file its own copy of process.env, which
 * the addon's getenv never sees.)
 */
export async function loadCuda(dir: string, precision: Precision, options: Parameters<typeof T5Model.load>[1] = {},
                               cuda: CudaOptions = {}): Promise<T5Model> {
  return T5Model.load(dir, { ...options, device: 'cuda', cuda: { ...cuda, precision } });
}

/**
 * PyTorch's own bf16 error against the same reference, measured by benchmarks/pytorch_baseline.py
 * ("errors") in the same device run and passed as TFEW_BF16_ERRORS=<json>. Layout:
 *   { fixtures: { <checkpoint>: { base|ia3: { encoder_hidden, logits, sum_logp, scores } } },
 *     random: { encoder_hidden, sum_logp, scores } }
 * Each value uses the metric the tests use (see helpers/reference.ts: relError per example / choice,
 * maxRelError for sums and scores).
 */
interface Bf16Errors {
  fixtures?: Record<string, Record<string, Record<string, number>>>;
  random?: Record<string, number>;
}

const RECORDED_FILE = path.join(__dirname, 'bf16-measured.json');
const PREDICTED_FILE = path.join(__dirname, 'bf16-predicted.json');
let measured: Bf16Errors | null | undefined;
let recorded: Bf16Errors | undefined;
let predicted: Bf16Errors | undefined;
const warnedPaths = new Set<string>();

function lookup(errors: Bf16Errors | null | undefined, keys: string[]): number | undefined {
  let node: unknown = errors;
  for (const k of keys) node = node && typeof node === 'object' ? (node as Record<string, unknown>)[k] : undefined;
  return typeof node === 'number' && Number.isFinite(node) && node > 0 ? node : undefined;
}

/**
 * The bf16 tolerance of one quantity: twice PyTorch's own bf16 error (flash-attention's rule). PyTorch's error is
 * the one measured in the same device run (TFEW_BF16_ERRORS); where there is none (the CUDA emulator, or a GPU run
 * whose PyTorch step failed: a warning names the quantity) the one measured on an H200 in session 12
 * (bf16-measured.json), else the one predicted without a GPU (bf16-predicted.json).
 * The emulator's bf16 numerics are the device's (the same code, roundings and fp32 accumulation; only summation
 * orders differ), so the same bounds hold there.
 */
export function bf16Tolerance(keys: string[]): number {
  if (measured === undefined) {
    const file = process.env.TFEW_BF16_ERRORS;
    measured = file && fs.existsSync(file) ? (JSON.parse(fs.readFileSync(file, 'utf8')) as Bf16Errors) : null;
  }
  const m = lookup(measured, keys);
  if (m !== undefined) return 2 * m;
  recorded ??= JSON.parse(fs.readFileSync(RECORDED_FILE, 'utf8')) as Bf16Errors;
  predicted ??= JSON.parse(fs.readFileSync(PREDICTED_FILE, 'utf8')) as Bf16Errors;
  const r = lookup(recorded, keys);
  const p = r ?? lookup(predicted, keys);
  if (p === undefined) throw new Error(`no PyTorch bf16 error, measured or predicted, for ${keys.join('.')}`);
  if (!emulated() && !warnedPaths.has(keys.join('.'))) {
    warnedPaths.add(keys.join('.'));
    // eslint-disable-next-line no-console
    console.warn(`[tfew tests] no PyTorch bf16 error for ${keys.join('.')} from this run (TFEW_BF16_ERRORS): twice the ` +
                 `${r !== undefined ? 'one recorded on an H200' : 'predicted'} ${p}`);
  }
  return 2 * p;
}

/**
 * Indices of the examples whose best score beats every other by more than `margin` relative to the larger
 * magnitude of the two. Scores (log-probabilities, <= 0) each within a relative error e of these cannot change
 * the winner of such an example when margin >= 2e.
 */
export function clearWinners(scores: ArrayLike<number>[], margin: number): number[] {
  const out: number[] = [];
  scores.forEach((row, b) => {
    const s = Array.from(row).sort((x, y) => y - x);
    if (s.length < 2 || s[0] - s[1] > margin * Math.max(Math.abs(s[0]), Math.abs(s[1]), 1e-6)) out.push(b);
  });
  return out;
}

/** Row-major argmax of each row. */
export function argmaxRows(scores: ArrayLike<number>[]): number[] {
  return scores.map((row) => {
    let best = 0;
    for (let i = 1; i < row.length; i++) if (row[i] > row[best]) best = i;
    return best;
  });
}

/** An adapter of `model`'s layout with every entry 1 + spread * (uniform - 0.5), from a seeded generator. */
export function randomAdapter(model: T5Model, seed: number, spread = 0.4): IA3Adapter {
  const a = IA3Adapter.create(model);
  const rand = mulberry32(seed);
  for (let i = 0; i < a.data.length; i++) a.data[i] = 1 + spread * (rand() - 0.5);
  a.markChanged();
  return a;
}
