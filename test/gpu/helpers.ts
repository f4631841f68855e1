// Shared by the GPU tests: whether CUDA is usable (tests skip cleanly otherwise), loading a model on the
// CUDA backend in a given precision, and the bf16 tolerances measured from PyTorch in the same device run.
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { CudaOptions, T5Model } from '../../lib';
import { t0_3bConfigJson, writeRandomT5 } from '../../benchmarks/random-t5';
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

let errors: Bf16Errors | null | undefined;

function loadErrors(): Bf16Errors | null {
  if (errors === undefined) {
    const file = process.env.TFEW_BF16_ERRORS;
    errors = file && fs.existsSync(file) ? (JSON.parse(fs.readFileSync(file, 'utf8')) as Bf16Errors) : null;
    if (!errors && !emulated()) {
      // eslint-disable-next-line no-console
      console.warn(`[tfew tests] TFEW_BF16_ERRORS not set or missing: bf16 checks use the fallback tolerance ${FALLBACK_BF16_TOL}`);
    }
  }
  return errors;
}

/** Used only when no PyTorch measurement is available (e.g. a GPU machine without python/transformers). */
export const FALLBACK_BF16_TOL = 0.05;

/**
 * The bf16 tolerance on the CUDA emulator. Its bf16 numerics are the device's (the same code, roundings and
 * fp32 accumulation; only summation orders differ), but no PyTorch run measures them there. Its bf16 checks
 * are there to catch wrong code, whose errors are of order 1; how close bf16 comes to the reference is judged
 * on the GPU against PyTorch's measured error. Measured here on the tiny fixtures: bf16 scores within 1e-2,
 * (IA)3 gradients within 9e-2 (single-loss gradients of the relu checkpoint, whose norms are small).
 */
export const EMULATOR_BF16_TOL = 0.15;

/** The bf16 tolerance of one quantity: twice PyTorch's own bf16 error (flash-attention's rule). */
export function bf16Tolerance(path: string[]): number {
  const e = loadErrors();
  let node: unknown = e;
  for (const k of path) node = node && typeof node === 'object' ? (node as Record<string, unknown>)[k] : undefined;
  if (typeof node === 'number' && Number.isFinite(node) && node > 0) return 2 * node;
  return emulated() ? EMULATOR_BF16_TOL : FALLBACK_BF16_TOL;
}

/** Indices of the examples whose best score beats the runner-up by more than `margin` (relative). */
export function clearWinners(scores: ArrayLike<number>[], margin: number): number[] {
  const out: number[] = [];
  scores.forEach((row, b) => {
    const s = Array.from(row).sort((x, y) => y - x);
    if (s.length < 2 || s[0] - s[1] > margin * Math.max(Math.abs(s[0]), 1e-6)) out.push(b);
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
