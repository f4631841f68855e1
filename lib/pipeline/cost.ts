// Cost accounting, the columns of the paper's Table 1: inference FLOPs per example, training FLOPs,
// disk space of what a task adds, plus what we measure: wall time per example and peak memory.
//
// Analytic FLOPs (matrix multiplications and attention, 2 FLOPs per multiply-add; norms, softmax and
// the (IA)3 scalings are elementwise and left out). For one example with an encoder input of Le tokens
// and answer choices of l_1..l_C tokens (Ld = sum l_c), d = d_model, i = heads * d_kv, f = d_ff,
// F = 3 d f for gated-GELU (wi_0, wi_1, wo) or 2 d f for ReLU (wi, wo), V = vocabulary:
//   encoder  = L_enc * [ Le * 2(4 d i + F) + 4 Le^2 i ]
//   decoder  = L_dec * [ Ld * 2(2 d i + 2 d i + F)        self q,k,v,o; cross q,o; FFN
//                        + Le * 2(2 d i)                  cross k,v: once per example, shared by the choices
//                        + sum_c 4 l_c^2 i + Ld * 4 Le i ] self- and cross-attention scores and mixing
//   lm head  = Ld * 2 d V
// Each token passes through one stack, so this is close to the paper's "N FLOPs per token" for an
// encoder-decoder of N parameters (Table 1 footnote). Training FLOPs follow the paper's convention:
// 3 x forward (forward + backward) per example, times steps x batch size.
import { performance } from 'perf_hooks';
import { native } from '../native';

/** The model dimensions the formula needs (T5ModelConfig / NativeConfig provide them). */
export interface FlopsConfig {
  dModel: number;
  dFf: number;
  dKv: number;
  numHeads: number;
  numLayers: number;
  numDecoderLayers: number;
  vocabSize: number;
  gatedGelu: boolean;
}

/** Forward FLOPs of rank-classifying one example. */
export function rankFlops(config: FlopsConfig, encoderLength: number, choiceLengths: readonly number[]): number {
  const d = config.dModel;
  const i = config.numHeads * config.dKv;
  const ffn = (config.gatedGelu ? 3 : 2) * d * config.dFf;
  const le = encoderLength;
  const ld = choiceLengths.reduce((a, b) => a + b, 0);
  const selfScores = choiceLengths.reduce((a, l) => a + 4 * l * l * i, 0);
  const encoder = config.numLayers * (le * 2 * (4 * d * i + ffn) + 4 * le * le * i);
  const decoder = config.numDecoderLayers * (ld * 2 * (4 * d * i + ffn) + le * 2 * (2 * d * i) + selfScores + ld * 4 * le * i);
  const head = ld * 2 * d * config.vocabSize;
  return encoder + decoder + head;
}

/** Training FLOPs by the paper's convention: 3 x forward, summed over the examples of every step. */
export function trainingFlops(forwardFlopsPerExample: number, steps: number, batchSize: number): number {
  return 3 * forwardFlopsPerExample * steps * batchSize;
}

/** Parameters of the model (embeddings, attention, FFN, norms, relative-position biases, head). */
export function parameterCount(config: FlopsConfig & { tiedHead?: boolean; numBuckets?: number }): number {
  const d = config.dModel;
  const i = config.numHeads * config.dKv;
  const ffn = (config.gatedGelu ? 3 : 2) * d * config.dFf;
  const buckets = (config.numBuckets ?? 32) * config.numHeads;
  const enc = config.numLayers * (4 * d * i + ffn + 2 * d) + d + buckets;
  const dec = config.numDecoderLayers * (8 * d * i + ffn + 3 * d) + d + buckets;
  const emb = config.vocabSize * d * (config.tiedHead === false ? 2 : 1);
  return enc + dec + emb;
}

/** Number of (IA)3 values: L_enc (2 i + f) + L_dec (4 i + f). */
export function ia3ParameterCount(config: FlopsConfig): number {
  const i = config.numHeads * config.dKv;
  return config.numLayers * (2 * i + config.dFf) + config.numDecoderLayers * (4 * i + config.dFf);
}

export interface Measured<T> {
  result: T;
  seconds: number;
  /** Highest resident set size of this process seen while `fn` ran (bytes). */
  peakRssBytes: number;
  /** Peak RSS minus the RSS just before (bytes): the memory this work added on the host. */
  peakRssDeltaBytes: number;
  /** Highest GPU memory in use seen while `fn` ran (cudaMemGetInfo, bytes); NaN without a usable GPU. */
  peakDeviceBytes: number;
}

/** Memory in use now on GPU `gpu` (bytes); NaN for null (a model on the CPU) or without a usable CUDA backend. */
function deviceBytesInUse(gpu: number | null): number {
  if (gpu === null) return NaN;
  try {
    const m = native().cudaMemoryInfo(gpu);
    return m ? m.total - m.free : NaN;
  } catch {
    return NaN;
  }
}

/**
 * Runs `fn`, timing it and sampling the process's resident memory and the memory in use on GPU `gpu` (the model's:
 * T5Model.gpuIndex; null for a model on the CPU) every `sampleMs` (native work runs off the event loop, so the
 * sampler keeps ticking). The CUDA engine's arena only grows, so the device number after the work is its peak too.
 */
export async function measure<T>(fn: () => Promise<T>, gpu: number | null, sampleMs = 10): Promise<Measured<T>> {
  const before = process.memoryUsage().rss;
  let peak = before;
  let peakDevice = deviceBytesInUse(gpu);
  const sample = () => {
    peak = Math.max(peak, process.memoryUsage().rss);
    const d = deviceBytesInUse(gpu);
    if (Number.isFinite(d)) peakDevice = Number.isFinite(peakDevice) ? Math.max(peakDevice, d) : d;
  };
  const timer = setInterval(sample, sampleMs);
  const started = performance.now();
  try {
    const result = await fn();
    const seconds = (performance.now() - started) / 1000;
    sample();
    return { result, seconds, peakRssBytes: peak, peakRssDeltaBytes: peak - before, peakDeviceBytes: peakDevice };
  } finally {
    clearInterval(timer);
  }
}

/** One row of the cost table (the paper's Table 1 plus our measurements). */
export interface CostRow {
  method: string;
  /** Mean analytic forward FLOPs per evaluated example. */
  inferenceFlopsPerExample: number;
  /** Analytic training FLOPs (0 for methods that do not train; NaN when the adapters were trained elsewhere). */
  trainingFlops: number;
  /** Bytes a task adds: the (IA)3 vectors (float32), or the demonstrations' text for ICL. */
  diskBytes: number;
  /** Median accuracy over templates x seeds. */
  accuracy: number;
  accuracyIqr: number;
  /** Measured wall time per evaluated example (ms), and training wall time (s). */
  msPerExample: number;
  trainingSeconds: number;
  /** Peak host RSS during inference (bytes). */
  peakRssBytes: number;
  /** Peak GPU memory in use during inference (bytes); NaN on the CPU backend. */
  peakDeviceBytes: number;
  /** Mean encoder input length (tokens). */
  meanInputTokens: number;
}

/** Human-readable numbers for tables: 1.1e12, 3.4 MB, 12.3 ms. */
export function formatFlops(x: number): string {
  if (!Number.isFinite(x)) return 'n/a';
  if (x === 0) return '0';
  return x.toExponential(1).replace('e+', 'e');
}

export function formatBytes(x: number): string {
  if (!Number.isFinite(x)) return 'n/a';
  if (x < 1024) return `${x} B`;
  if (x < 1024 * 1024) return `${(x / 1024).toFixed(1)} kB`;
  if (x < 1024 ** 3) return `${(x / 1024 ** 2).toFixed(1)} MB`;
  return `${(x / 1024 ** 3).toFixed(2)} GB`;
}
