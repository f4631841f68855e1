// Shared by the GPU tests: whether CUDA is usable (tests skip cleanly otherwise), loading a model on the
// CUDA backend in a given precision, and the bf16 tolerances measured from PyTorch in the same device run.
import * as fs from 'fs';
import { T5Model } from '../../lib';
import { native } from '../../lib/native';

export interface CudaStatus {
  usable: boolean;
  reason: string;
}

let status: CudaStatus | undefined;

/** Probes once; an addon that cannot load counts as "no CUDA" (the CPU tests report that failure). */
export function cudaStatus(): CudaStatus {
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

/** describe() when CUDA is usable, describe.skip otherwise. */
export const describeCuda: jest.Describe = cudaStatus().usable ? describe : describe.skip;

export type Precision = 'bf16' | 'fp32';

/**
 * Loads DIR on the CUDA backend. precision 'fp32' selects the engine's verification mode (fp32 weights and
 * activations, cuBLAS without TF32) through TFEW_CUDA_PRECISION, which the engine reads when it is created;
 * `env` sets other engine switches the same way (e.g. TFEW_CUDA_FUSED_ATTENTION=0, TFEW_CUDA_GRAPHS=0).
 */
export async function loadCuda(dir: string, precision: Precision, options: Parameters<typeof T5Model.load>[1] = {},
                               env: Record<string, string> = {}): Promise<T5Model> {
  const vars: Record<string, string> = { TFEW_CUDA_PRECISION: precision, ...env };
  const previous = Object.keys(vars).map((k) => [k, process.env[k]] as const);
  Object.assign(process.env, vars);
  try {
    return await T5Model.load(dir, { ...options, device: 'cuda' });
  } finally {
    for (const [k, v] of previous) {
      if (v === undefined) delete process.env[k];
      else process.env[k] = v;
    }
  }
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
    if (!errors) {
      // eslint-disable-next-line no-console
      console.warn(`[tfew tests] TFEW_BF16_ERRORS not set or missing: bf16 checks use the fallback tolerance ${FALLBACK_BF16_TOL}`);
    }
  }
  return errors;
}

/** Used only when no PyTorch measurement is available (e.g. a GPU machine without python/transformers). */
export const FALLBACK_BF16_TOL = 0.05;

/** The bf16 tolerance of one quantity: twice PyTorch's own bf16 error (flash-attention's rule). */
export function bf16Tolerance(path: string[]): number {
  const e = loadErrors();
  let node: unknown = e;
  for (const k of path) node = node && typeof node === 'object' ? (node as Record<string, unknown>)[k] : undefined;
  return typeof node === 'number' && Number.isFinite(node) && node > 0 ? 2 * node : FALLBACK_BF16_TOL;
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
