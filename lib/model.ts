// T5Model: the public entry point. Loads a Hugging Face T5/T0 directory onto a backend (CUDA when usable, else
// the CPU reference), tokenizes, batches, and runs rank classification and the T-Few losses and gradients.
import * as fs from 'fs';
import * as os from 'os';
import { IA3Adapter } from './adapter';
import { asyncDispose } from './disposable';
import { buildBatch, callGroups, checkExample, EncodedExample, perChoiceScores, trainingLengthMultiple } from './batch';
import { resolveCheckpoint } from './checkpoint';
import type { T5ModelConfig } from './config';
import { AbortError, DeviceUnavailableError, DisposedError, FileFormatError, fromNative, InvalidAdapterError, InvalidArgumentError, isAbortSignal, OutOfMemoryError } from './errors';
import { CudaOptions, CudaProbe, GraphStats, ReserveShape, native, NativeAddon, NativeConfig, NativeLossOptions, NativeBatch, NativeModel, NativeReserveShape, NativeScoreResult, NativeTensorSpec, NativeTrainingSession } from './native';
import type { TfewOptimizerOptions } from './optim';
import { T5Tokenizer } from './tokenizer';

export type DeviceOption = 'auto' | 'cpu' | 'cuda';

/** The most CPU backend threads a model may use (the addon clamps to the same bound). */
export const MAX_CPU_THREADS = 256;

export interface LoadOptions {
  /** 'auto' (default) uses CUDA when a GPU, driver and cuBLAS are usable, else the CPU backend. */
  device?: DeviceOption;
  /** CPU backend threads, 1..MAX_CPU_THREADS (default: all cores, at most MAX_CPU_THREADS). */
  threads?: number;
  /** Fold this adapter into the weights (single-task serving); calls then need no adapter. */
  mergeAdapter?: IA3Adapter;
  /**
   * CUDA backend switches: precision 'bf16' (default) or 'fp32' (verification mode), fusedAttention,
   * fusedBackward, fewRowLinears, gemmTuning, programmaticLaunch, attentionOccupancy, encoderChunkRows, graphs,
   * graphBuckets, crossAttention. Unset fields fall back to TFEW_CUDA_PRECISION, TFEW_CUDA_FUSED_ATTENTION,
   * TFEW_CUDA_FUSED_BACKWARD, TFEW_CUDA_FEW_ROW_LINEARS, TFEW_CUDA_GEMM_TUNING, TFEW_CUDA_PROGRAMMATIC_LAUNCH,
   * TFEW_CUDA_ATTENTION_OCCUPANCY, TFEW_CUDA_ENCODER_CHUNK_ROWS, TFEW_CUDA_GRAPHS, TFEW_CUDA_GRAPH_BUCKETS and
   * TFEW_CUDA_CROSS_ATTENTION.
   */
  cuda?: CudaOptions;
}

export type AdapterOption = IA3Adapter | null | undefined | (IA3Adapter | null | undefined)[];

export interface RankClassifyOptions {
  /** Divide each choice's summed log-prob by its token count, eos counted (T-Few). Default true. */
  lengthNormalize?: boolean;
  /** One adapter for all examples, or one per example (mixed-task batch; null = none). */
  adapter?: AdapterOption;
  /** Truncation of string inputs, in tokens (eos kept). Default 256. */
  maxInputLength?: number;
  /** Examples per native call (memory bound). Default 32. */
  batchSize?: number;
  /**
   * When the examples span several native calls, group them into calls by length (longest first) instead of in
   * the order given, so that a call pads little: each call's inputs are padded to its longest. Results come back
   * in the order given either way, equal within rounding (on the CPU backend, bit for bit). Default true.
   */
  groupByLength?: boolean;
  /** Stops between native calls (batches of batchSize): the call rejects with AbortError. */
  signal?: AbortSignal;
}

export interface RankClassifyResult {
  predictions: number[];
  /** Length-normalised log-probs (or the sums when lengthNormalize is false). */
  scores: number[][];
  /** Summed log-probs of each choice. */
  logProbs: number[][];
}

export interface LossBatch {
  inputIds: (number[] | string)[];
  choices: (number[][] | string[])[];
  labels: number[];
}

export interface LossOptions {
  adapter?: AdapterOption;
  lmWeight?: number;
  ulWeight?: number;
  lnWeight?: number;
  /** Training-mode dropout at the config's rate. Default false. */
  dropout?: boolean;
  seed?: number;
  maxInputLength?: number;
  /**
   * CUDA backend: what the backward pass recomputes instead of keeping it from the forward. 'none' (or false)
   * keeps everything: fastest. 'attention' recomputes the encoder's q|k|v projections (one GEMM more per
   * encoder layer) and, with the fused attention backward (`cuda.fusedBackward`, the default), the attention's
   * output by running its forward again (T0-3B at 8 x 256 tokens: 0.79 GiB less device memory; 0.54 GiB with the
   * cuBLAS backward), 'all' (or true) also its feed-forward wi projections (two GEMMs; 1.69 GiB less; 1.44). 'auto' (the default): the first of those that fits
   * in the free device memory (256 MiB kept free). The results are the same, bit for bit, at every level. The
   * CPU backend ignores it.
   */
  recompute?: Recompute;
}

export interface LossResult {
  totalLoss: number;
  lmLoss: number;
  ulLoss: number;
  lnLoss: number;
  /** Gradients of the first adapter by PEFT module name (views into its flat gradient). */
  gradients: Record<string, Float32Array>;
  /** Flat gradient (IA3 layout order) of every adapter used in the batch. */
  adapterGradients: Map<IA3Adapter, Float32Array>;
}

/** The T-Few optimizer of a training session: the options of lib/optim.ts TfewOptimizer, same defaults. */
export type TrainingSessionOptions = TfewOptimizerOptions;

export interface TrainingStepOptions extends Omit<LossOptions, 'adapter'> {
  /** The adapter of each example (one of the session's), or one for all. Default: the session's first. */
  adapter?: IA3Adapter | IA3Adapter[];
  /** Schedule position of this step (then continues from it). Default: the next one. */
  scheduleStep?: number;
}

export interface TrainingStepResult {
  totalLoss: number;
  lmLoss: number;
  lnLoss: number;
  ulLoss: number;
  /** The scheduled learning rate of this step. */
  lr: number;
  /** Gradient norm before clipping of every adapter that stepped. */
  gradNorms: Map<IA3Adapter, number>;
}

/**
 * T-Few training steps with the adapters' vectors and optimizer state held natively (on the GPU for a backend
 * that keeps them there): one call per step, no vectors or gradients through JavaScript. Same maths as
 * lib/optim.ts TfewOptimizer (per-adapter clipping, warmup + linear decay, HF Adafactor). The IA3Adapter
 * objects are updated by sync() (and by Trainer at eval points and at the end).
 */
export class TrainingSession {
  readonly adapters: readonly IA3Adapter[];
  private nativeSession: NativeTrainingSession | undefined;

  /** @internal use T5Model.createTrainingSession */
  constructor(private readonly model: T5Model, adapters: IA3Adapter[], session: NativeTrainingSession) {
    this.adapters = adapters;
    this.nativeSession = session;
  }

  async step(batch: LossBatch, options: TrainingStepOptions = {}): Promise<TrainingStepResult> {
    const session = this.live();
    const n = batch?.inputIds?.length ?? 0;
    const perExample = Array.isArray(options.adapter) ? options.adapter : new Array(n).fill(options.adapter ?? this.adapters[0]);
    if (perExample.length !== n) throw new InvalidArgumentError(`got ${perExample.length} adapters for ${n} examples`);
    const scheduleStep = options.scheduleStep ?? -1;
    if (options.scheduleStep !== undefined && (!Number.isInteger(scheduleStep) || scheduleStep < 0 || scheduleStep > 2 ** 31 - 1)) {
      throw new InvalidArgumentError(`scheduleStep must be an integer >= 0, got ${String(options.scheduleStep)}`);
    }
    const { batch: nb } = this.model.lossBatch(batch, perExample, { fixed: this.adapters, maxInputLength: options.maxInputLength });
    const weights = lossWeights(options);
    const out = await this.model.callNative(() => session.step(nb, weights, scheduleStep));
    const gradNorms = new Map<IA3Adapter, number>();
    this.adapters.forEach((a, i) => {
      if (out.stepped[i]) gradNorms.set(a, out.gradNorms[i]);
    });
    return { totalLoss: out.totalLoss, lmLoss: out.lmLoss, ulLoss: out.ulLoss, lnLoss: out.lnLoss, lr: out.lr, gradNorms };
  }

  /** Copies the trained vectors into the IA3Adapter objects. */
  async sync(): Promise<void> {
    const session = this.live();
    for (let i = 0; i < this.adapters.length; i++) {
      const v = await this.model.callNative(() => session.read(i));
      this.adapters[i].data.set(v);
      this.adapters[i].markChanged();
    }
  }

  /** Frees the session (device memory included) after the steps and reads issued before it. Safe to call twice. */
  async dispose(): Promise<void> {
    const s = this.nativeSession;
    this.nativeSession = undefined;
    // through the model's queue, so a step issued before dispose() runs first (the addon's dispose of a session
    // the model already ended is a no-op)
    if (s) await this.model.callNative(() => s.dispose());
  }

  async [asyncDispose](): Promise<void> {
    await this.dispose();
  }

  private live(): NativeTrainingSession {
    if (!this.nativeSession) throw new DisposedError('the training session has been disposed');
    if (this.model.disposed) throw new DisposedError(`the model loaded from ${this.model.dir} has been disposed`);
    return this.nativeSession;
  }
}

// [id, version] of each adapter: the addon reuses its snapshot of an adapter it has seen at that version
// (IA3Adapter.markChanged / set bump the version) instead of copying the vectors again.
function adapterKeys(adapters: readonly IA3Adapter[]): number[] {
  return adapters.flatMap((a) => [a.id, a.version]);
}

async function mapNativeErrors<T>(f: () => Promise<T>): Promise<T> {
  try {
    return await f();
  } catch (e) {
    throw fromNative(e);
  }
}

/** "'a', 'b' or 'c'": the allowed values in an error message. */
function oneOf(values: readonly string[]): string {
  const q = values.map((v) => `'${v}'`);
  return q.length > 1 ? `${q.slice(0, -1).join(', ')} or ${q[q.length - 1]}` : q.join('');
}

/** The recompute levels; the one list behind LossOptions, the Trainer and the CLI's --recompute. */
export const RECOMPUTE_LEVELS = ['auto', 'none', 'attention', 'all'] as const;
export type RecomputeLevel = (typeof RECOMPUTE_LEVELS)[number];
/** LossOptions.recompute: how much of the encoder's forward the CUDA backward recomputes. */
export type Recompute = boolean | RecomputeLevel;

/** Validates a recompute option (undefined = 'auto', false = 'none', true = 'all') and names its level. */
export function recomputeLevel(value: Recompute | undefined): RecomputeLevel {
  if (value === undefined) return 'auto';
  if (value === false) return 'none';
  if (value === true) return 'all';
  if ((RECOMPUTE_LEVELS as readonly unknown[]).includes(value)) return value;
  throw new InvalidArgumentError(`recompute must be a boolean, ${oneOf(RECOMPUTE_LEVELS)}, got ${JSON.stringify(value) ?? String(value)}`);
}

function lossWeights(options: LossOptions): NativeLossOptions {
  const w = {
    lmWeight: options.lmWeight ?? 1,
    ulWeight: options.ulWeight ?? 1,
    lnWeight: options.lnWeight ?? 1,
    dropout: options.dropout ?? false,
    seed: options.seed ?? 0,
    recompute: recomputeLevel(options.recompute),
  };
  for (const [k, v] of Object.entries(w)) {
    if (typeof v === 'number' && !Number.isFinite(v)) throw new InvalidArgumentError(`${k} must be a finite number`);
  }
  // dropout masks hash the seed as an unsigned 64-bit integer: only exact non-negative integers convert
  if (!Number.isSafeInteger(w.seed) || w.seed < 0) throw new InvalidArgumentError(`seed must be an integer >= 0, got ${String(w.seed)}`);
  return w;
}

/** maxInputLength (the truncation of string inputs, eos kept): an integer >= 1, default 256. */
function checkMaxInputLength(value: number | undefined): number {
  const v = value ?? 256;
  if (!Number.isInteger(v) || v < 1) throw new InvalidArgumentError(`maxInputLength must be an integer >= 1, got ${String(v)}`);
  return v;
}

/** rankClassify's and encode()'s batching options, defaults filled in (32 examples a call, grouped by length). */
function checkBatching(options: { batchSize?: number; groupByLength?: boolean }): { batchSize: number; groupByLength: boolean } {
  const batchSize = options.batchSize ?? 32;
  if (!Number.isInteger(batchSize) || batchSize < 1) throw new InvalidArgumentError(`batchSize must be an integer >= 1, got ${String(batchSize)}`);
  const groupByLength = options.groupByLength ?? true;
  if (typeof groupByLength !== 'boolean') throw new InvalidArgumentError('groupByLength must be a boolean');
  return { batchSize, groupByLength };
}

/** Which bytes the weights are, for replicaMismatch: each tensor's file (symbolic links resolved) and place in it. */
function weightsIdentity(tensors: readonly NativeTensorSpec[]): string {
  const real = new Map<string, string>();
  for (const t of tensors) {
    if (real.has(t.file)) continue;
    try {
      real.set(t.file, fs.realpathSync(t.file));
    } catch (e) {
      throw new FileFormatError(`${t.file}: cannot read: ${(e as Error).message}`);
    }
  }
  return JSON.stringify(tensors.map((t) => [t.name, real.get(t.file), t.offset, t.dtype]));
}

export class T5Model {
  readonly dir: string;
  readonly config: T5ModelConfig;
  readonly tokenizer: T5Tokenizer | undefined;
  // why there is no tokenizer (the tokenize() error)
  private noTokenizer = '';
  /** The backend actually used. */
  readonly device: 'cpu' | 'cuda';
  /** Why this backend was chosen (e.g. why CUDA was not used). */
  readonly deviceReason: string;
  /** CUDA: the GPU the model is on (an index among the visible ones; CudaOptions.device); null on the CPU. */
  readonly gpuIndex: number | null;
  /** What the backend computes in: 'fp32' on the CPU; on CUDA cuda.precision, else TFEW_CUDA_PRECISION, else 'bf16'. */
  readonly precision: 'fp32' | 'bf16';
  private nativeModel: NativeModel | undefined;
  private readonly tensors: NativeTensorSpec[];
  private readonly weightsKey: string;  // weightsIdentity(tensors), at load
  private readonly threads: number;
  private readonly cudaOptions: CudaOptions | undefined;
  // Native calls of this model run one after another. The addon serialises them with a mutex anyway, but a call
  // waiting for that mutex holds one of libuv's threads (4 by default) meanwhile, starving fs, zlib, dns and
  // the calls of other models.
  private callsInFlight = 0;
  private lastCall: Promise<void> = Promise.resolve();
  // The (IA)3 vectors folded into the weights at load (mergeAdapter), for withMergedAdapter to compose.
  private mergedVectors: Float32Array | undefined;
  private disposing: Promise<void> | undefined;

  private constructor(dir: string, config: T5ModelConfig, tensors: NativeTensorSpec[], tokenizer: T5Tokenizer | undefined,
                      nm: NativeModel, reason: string, threads: number, cudaOptions: CudaOptions | undefined, gpuIndex: number,
                      weightsKey: string) {
    this.dir = dir;
    this.threads = threads;
    this.cudaOptions = cudaOptions;
    this.config = config;
    this.tensors = tensors;
    this.weightsKey = weightsKey;
    this.tokenizer = tokenizer;
    this.nativeModel = nm;
    this.device = nm.device;
    this.deviceReason = reason;
    this.gpuIndex = nm.device === 'cuda' ? gpuIndex : null;
    this.precision = nm.precision;
  }

  /**
   * Chooses the backend for `device` and says why; `gpu` is the GPU index (CudaOptions.device). Throws
   * DeviceUnavailableError for 'cuda' without a usable GPU there, and for a `gpu` that is not visible.
   */
  static selectDevice(device: DeviceOption = 'auto', gpu?: number): { device: 'cpu' | 'cuda'; reason: string; probe: CudaProbe } {
    checkGpuIndex(gpu, 'the GPU index');
    const probe = native().probeCuda(gpu);
    const on = `${probe.deviceName}${probe.deviceCount > 1 ? ` (GPU ${probe.deviceIndex} of ${probe.deviceCount})` : ''}`;
    if (device === 'cpu') return { device: 'cpu', reason: 'device: cpu was requested', probe };
    // a GPU asked for by index that is not there: an error with 'auto' too (a model meant for GPU 3 of a machine
    // with 2 should not quietly run on the CPU); 'auto' falls back only where CUDA cannot run at all
    if (gpu !== undefined && probe.deviceCount > 0 && gpu >= probe.deviceCount) {
      throw new DeviceUnavailableError(probe.reason);
    }
    if (device === 'cuda') {
      if (!probe.usable) throw new DeviceUnavailableError(`device 'cuda' is not available: ${probe.reason}`);
      return { device: 'cuda', reason: `CUDA on ${on}`, probe };
    }
    if (device !== 'auto') throw new InvalidArgumentError(`device must be 'auto', 'cpu' or 'cuda', got '${String(device)}'`);
    if (probe.usable) return { device: 'cuda', reason: `auto: CUDA on ${on}`, probe };
    return { device: 'cpu', reason: `auto: CUDA not used (${probe.reason})`, probe };
  }

  static async load(dir: string, options: LoadOptions = {}): Promise<T5Model> {
    // (plain JavaScript callers: typed errors, not TypeErrors from deep inside)
    if (typeof dir !== 'string' || dir.length === 0) throw new InvalidArgumentError(`the model directory must be a non-empty string, got ${String(dir)}`);
    if (options === null || typeof options !== 'object') throw new InvalidArgumentError(`load options must be an object, got ${String(options)}`);
    if (options.mergeAdapter !== undefined && !(options.mergeAdapter instanceof IA3Adapter)) {
      throw new InvalidArgumentError('mergeAdapter must be an IA3Adapter (IA3Adapter.load(path) reads one from disk)');
    }
    const { config, tensors } = await resolveCheckpoint(dir);
    const cudaOptions = checkCudaOptions(options.cuda);
    const { device, reason, probe } = T5Model.selectDevice(options.device ?? 'auto', cudaOptions?.device);
    const threads = options.threads ?? Math.min(MAX_CPU_THREADS, Math.max(1, os.cpus().length));
    if (!Number.isInteger(threads) || threads < 1 || threads > MAX_CPU_THREADS) {
      throw new InvalidArgumentError(`threads must be an integer in [1, ${MAX_CPU_THREADS}], got ${String(threads)}`);
    }
    // Everything that can fail without the weights is checked first: a failure after the native load would
    // leave the weights (device memory too) waiting for the garbage collector.
    const { tokenizer, missing: noTokenizer } = T5Tokenizer.forModel(dir);
    const weightsKey = weightsIdentity(tensors);
    if (options.mergeAdapter) options.mergeAdapter.assertCompatible(config);
    let nm: NativeModel;
    try {
      const cuda = cudaOptions;
      const reserve = cuda?.reserve === undefined ? undefined : reserveShapes(cuda.reserve, 'cuda.reserve');
      nm = await native().loadModel(config, tensors, { device, threads, cuda, reserve });
    } catch (e) {
      throw fromNative(e);
    }
    // (a copy: the caller's object may change; withMergedAdapter loads with it again)
    const model = new T5Model(dir, config, tensors, tokenizer, nm, reason, threads, cudaOptions && { ...cudaOptions }, probe.deviceIndex,
                              weightsKey);
    model.noTokenizer = noTokenizer;
    if (options.mergeAdapter) {
      try {
        await nm.mergeAdapter(options.mergeAdapter.data);
      } catch (e) {
        await nm.dispose();
        throw fromNative(e);
      }
      model.mergedVectors = Float32Array.from(options.mergeAdapter.data);
    }
    return model;
  }

  /**
   * A second model on the same backend with `adapter` folded into its weights (the original is unchanged). On a
   * model that already has an adapter merged, both are: (IA)3 vectors rescale, so merging a then b is merging
   * their elementwise product.
   */
  async withMergedAdapter(adapter: IA3Adapter): Promise<T5Model> {
    this.live();
    if (!(adapter instanceof IA3Adapter)) throw new InvalidArgumentError('withMergedAdapter needs an IA3Adapter');
    adapter.assertCompatible(this.config);
    let merged = adapter;
    if (this.mergedVectors) {
      const product = Float32Array.from(this.mergedVectors);
      for (let i = 0; i < product.length; i++) product[i] *= adapter.data[i];
      merged = IA3Adapter.fromFlat(this.config, product);
    }
    // (on the same GPU, even where that was TFEW_CUDA_DEVICE's choice)
    const cuda = this.gpuIndex === null ? this.cudaOptions : { ...this.cudaOptions, device: this.gpuIndex };
    return T5Model.load(this.dir, { device: this.device, threads: this.threads, mergeAdapter: merged, cuda });
  }

  /**
   * Why `other` is not a replica of this model, or null when it is. Replicas share out one job (a service's
   * batches, an evaluation's runs), so they must score alike: the same architecture, the same weights (the same
   * tensors of the same files), the same adapter merged, the same backend and precision. (Rounding-level options,
   * such as the attention kernels, may differ.)
   */
  replicaMismatch(other: T5Model): string | null {
    if (other === this) return 'it is the same model object';
    if (JSON.stringify(other.config) !== JSON.stringify(this.config)) return 'their configs differ';
    if (other.weightsKey !== this.weightsKey) return `their weights differ (${this.dir} and ${other.dir})`;
    const merged = (m: T5Model) => m.mergedVectors ?? new Float32Array(0);
    const [a, b] = [merged(this), merged(other)];
    if (a.length !== b.length || a.some((x, i) => !Object.is(x, b[i]))) return 'they have different adapters merged into their weights';
    if (other.device !== this.device) return `they run on different backends (${this.device}, ${other.device})`;
    if (other.precision !== this.precision) return `they compute in different precisions (${this.precision}, ${other.precision})`;
    return null;
  }

  get disposed(): boolean {
    return this.nativeModel === undefined;
  }

  /** One line describing the backend (device, threads or GPU). */
  describe(): string {
    return this.nativeModel ? this.nativeModel.describe() : 'disposed';
  }

  /**
   * How the CUDA backend ran its calls so far: CUDA graphs replayed or captured, or kernels launched one by one
   * (a service whose calls mostly run eagerly pays the launch overhead each time), and the shape the last call
   * ran at. The CPU backend has no graphs: all zero. Throws DisposedError once the model is disposed.
   */
  graphStats(): GraphStats {
    if (!this.nativeModel) throw new DisposedError('the model has been disposed');
    return this.nativeModel.graphStats();
  }

  /**
   * CUDA: captures the graphs of the call shapes a service expects before its traffic comes, so that the first
   * calls of those shapes replay a graph instead of launching every kernel one by one. Each distinct shape runs
   * twice on filler tokens (eagerly, then captured), after reserving their memory (reserveMemory(): a call that
   * grows device memory drops the graphs captured before it, so reserve the largest calls you will serve too, before
   * warming up). With graph buckets (the
   * default) a shape stands for every small call whose lengths, examples and rows fall in its buckets: `graphBucketLengths(maxInputLength)`
   * gives one input length per bucket (24 up to 256); calls above the buckets' limits (see
   * CudaOptions.graphBuckets; they run with their input length rounded up to a multiple of 8) and calls with
   * buckets off replay only at exactly the warmed lengths. At most 64
   * graphs are kept, so more distinct shapes are refused. Resolves with the number of graphs captured: none on
   * the CPU backend or with graphs off.
   */
  async warmUpGraphs(shapes: GraphWarmUpShape[]): Promise<number> {
    this.live();
    if (!Array.isArray(shapes)) throw new InvalidArgumentError('warmUpGraphs takes an array of shapes');
    const checked = shapes.map((s, i) => {
      const where = `warmUpGraphs shape ${i}`;
      if (typeof s !== 'object' || s === null) throw new InvalidArgumentError(`${where} must be an object`);
      const { inputLength, choiceLengths, batchSize = 1, adapter = true } = s;
      if (!Number.isInteger(inputLength) || inputLength < 1 || inputLength > 16384) {
        throw new InvalidArgumentError(`${where}: inputLength must be an integer in [1, 16384]`);
      }
      if (!Array.isArray(choiceLengths) || choiceLengths.length === 0 || choiceLengths.length > 1024 ||
          !choiceLengths.every((n) => Number.isInteger(n) && n >= 1 && n <= 1024)) {
        throw new InvalidArgumentError(`${where}: choiceLengths must be 1 to 1024 integers in [1, 1024]`);
      }
      if (!Number.isInteger(batchSize) || batchSize < 1 || batchSize > 1024) {
        throw new InvalidArgumentError(`${where}: batchSize must be an integer in [1, 1024]`);
      }
      if (typeof adapter !== 'boolean') throw new InvalidArgumentError(`${where}: adapter must be a boolean`);
      return { inputLength, choiceLengths, batchSize, adapter };
    });
    // one run per shape the engine tells apart (with buckets: bucketed lengths; the choices count by number and
    // the longest), the largest first
    const buckets = this.device === 'cuda' && this.graphStats().buckets;
    const distinct = new Map<string, (typeof checked)[number]>();
    for (const s of checked) {
      const longest = Math.max(...s.choiceLengths);
      const rows = s.batchSize * s.choiceLengths.length;
      const runs = buckets ? native().graphBucketCall(this.config, s.batchSize, s.inputLength, rows, longest) : undefined;
      // (the choices per example too: with equal rows per example, the cross-attention path depends on them)
      // (a larger call than the buckets take runs at its exact shape but for an encoder length aligned to 8)
      const key = runs ? [runs.batch, runs.encLen, runs.rows, runs.decLen, s.choiceLengths.length, s.adapter].join(',')
        : [s.batchSize, s.inputLength, rows, longest, s.adapter].join(',');
      if (!distinct.has(key)) distinct.set(key, s);
    }
    if (distinct.size > 64) throw new InvalidArgumentError(`warmUpGraphs: ${distinct.size} distinct shapes, but at most 64 graphs are kept`);
    if (this.device !== 'cuda' || !this.graphStats().enabled) return 0;
    const size = (s: (typeof checked)[number]) => s.batchSize * s.inputLength + s.choiceLengths.length * Math.max(...s.choiceLengths);
    const order = [...distinct.values()].sort((a, b) => size(b) - size(a));
    // Memory for all of them first (arena and adapter slots): growing either while warming would drop the graphs
    // captured before. Where that does not fit, the calls may still: largest first, as far as they go.
    try {
      await this.reserveMemory(order.map((s) => ({
        batchSize: s.batchSize, inputLength: s.inputLength, choices: s.choiceLengths.length,
        choiceLength: Math.max(...s.choiceLengths), adapters: s.adapter ? 1 : 0,
      })));
    } catch (e) {
      if (!(e instanceof OutOfMemoryError)) throw e;
    }
    const capturesBefore = this.graphStats().captures;
    // filler: any token but pad and eos (a choice must hold a token other than pad), eos last as in real inputs
    const { padTokenId: pad, eosTokenId: eos, vocabSize } = this.config;
    let filler = 2;
    while (filler === pad || filler === eos) filler++;
    if (filler >= vocabSize) filler = eos;
    const tokens = (n: number): number[] => [...new Array<number>(n - 1).fill(filler), eos];
    const identity = checked.some((s) => s.adapter) ? IA3Adapter.create(this) : undefined;  // all ones
    for (const s of order) {
      const inputs = Array.from({ length: s.batchSize }, () => tokens(s.inputLength));
      const choices = inputs.map(() => s.choiceLengths.map(tokens));
      const options = { adapter: s.adapter ? identity : undefined, batchSize: s.batchSize, maxInputLength: s.inputLength };
      for (let k = 0; k < 2; k++) await this.rankClassify(inputs, choices, options);
    }
    return this.graphStats().captures - capturesBefore;
  }

  /**
   * Plans and allocates the device memory of calls up to these sizes now (as CudaOptions.reserve does at load):
   * later calls within them allocate nothing and keep the CUDA graphs captured so far, and a size that does not
   * fit rejects here with OutOfMemoryError. Reserving only ever grows the memory held (growing it drops the
   * graphs captured so far, so reserve before warmUpGraphs). Resolves with the bytes of activation memory held;
   * the CPU backend allocates per call: it checks the shapes and resolves with 0.
   */
  async reserveMemory(shapes: ReserveShape | ReserveShape[]): Promise<number> {
    const nm = this.live();
    const checked = reserveShapes(shapes, 'reserveMemory');
    return this.callNative(() => nm.reserve(checked));
  }

  /** Token ids of a text (eos appended), truncated to maxLength tokens with eos kept. */
  tokenize(text: string, maxLength?: number): number[] {
    if (!this.tokenizer) throw new InvalidArgumentError(`${this.noTokenizer}: pass token ids instead of strings`);
    return this.tokenizer.encode(text, { addEos: true, maxLength });
  }

  /** Rank classification: every choice scored by its (length-normalised) log-prob given the input. */
  async rankClassify(inputs: string[] | number[][], choices: (string[] | number[][])[],
                     options: RankClassifyOptions = {}): Promise<RankClassifyResult> {
    const nm = this.live();
    if (!Array.isArray(inputs) || !Array.isArray(choices)) throw new InvalidArgumentError('inputs and choices must be arrays');
    if (inputs.length !== choices.length) {
      throw new InvalidArgumentError(`got ${inputs.length} inputs but ${choices.length} lists of choices`);
    }
    const lengthNormalize = options.lengthNormalize ?? true;
    const { batchSize, groupByLength } = checkBatching(options);
    const maxInputLength = checkMaxInputLength(options.maxInputLength);
    if (options.signal !== undefined && !isAbortSignal(options.signal)) throw new InvalidArgumentError('signal must be an AbortSignal');
    const perExample = this.adaptersPerExample(options.adapter, inputs.length);
    const examples = inputs.map((input, b) => ({
      inputIds: this.ids(input, maxInputLength),
      choices: this.choiceIds(choices[b], b),
    }));
    const n = examples.length;
    const result: RankClassifyResult = { predictions: new Array(n), scores: new Array(n), logProbs: new Array(n) };
    await this.scoreInCalls(nm, examples, perExample, batchSize, groupByLength, 'scores', (batch, out, members) => {
      const { logProbs, lengths } = perChoiceScores(batch, out.tokenLogp, this.config.padTokenId);
      logProbs.forEach((lp, k) => {
        const scores = lengthNormalize ? lp.map((s, j) => s / lengths[k][j]) : lp.slice();
        const i = members[k];
        result.logProbs[i] = lp;
        result.scores[i] = scores;
        result.predictions[i] = argmax(scores);
      });
    }, options.signal);
    return result;
  }

  /**
   * Encoder output (after the final layer norm) per example: [length * dModel], real positions only. Native calls
   * of batchSize examples (default 32), grouped by length as rankClassify groups them (groupByLength).
   */
  async encode(inputs: string[] | number[][],
               options: { adapter?: AdapterOption; maxInputLength?: number; batchSize?: number; groupByLength?: boolean } = {}): Promise<Float32Array[]> {
    const nm = this.live();
    if (!Array.isArray(inputs)) throw new InvalidArgumentError('inputs must be an array');
    const maxInputLength = checkMaxInputLength(options.maxInputLength);
    const { batchSize, groupByLength } = checkBatching(options);
    if (inputs.length === 0) return [];
    const perExample = this.adaptersPerExample(options.adapter, inputs.length);
    const examples = inputs.map((input) => ({ inputIds: this.ids(input, maxInputLength), choices: [[this.config.eosTokenId]] }));
    const d = this.config.dModel;
    const result: Float32Array[] = new Array(examples.length);
    await this.scoreInCalls(nm, examples, perExample, batchSize, groupByLength, 'hidden', (batch, out, members) => {
      const hidden = out.encoderHidden as Float32Array;
      members.forEach((i, k) => {
        result[i] = hidden.slice(k * batch.encLen * d, (k * batch.encLen + examples[i].inputIds.length) * d);
      });
    });
    return result;
  }

  /**
   * Decoder logits of every choice: [example][choice] -> [choiceLength * vocabSize]. For inspection and tests.
   * Runs in calls of batchSize examples (default 8: a call's logits are rows x positions x vocabulary floats, 66 MB
   * for 8 T0 examples of 8 choices of 8 tokens), grouped by length as rankClassify's (groupByLength); the results
   * come back in the order given.
   */
  async choiceLogits(inputs: string[] | number[][], choices: (string[] | number[][])[],
                     options: { adapter?: AdapterOption; maxInputLength?: number; batchSize?: number; groupByLength?: boolean } = {}): Promise<Float32Array[][]> {
    const nm = this.live();
    if (!Array.isArray(inputs) || !Array.isArray(choices)) throw new InvalidArgumentError('inputs and choices must be arrays');
    if (inputs.length !== choices.length) throw new InvalidArgumentError(`got ${inputs.length} inputs but ${choices.length} lists of choices`);
    const maxInputLength = checkMaxInputLength(options.maxInputLength);
    const { batchSize, groupByLength } = checkBatching({ ...options, batchSize: options.batchSize ?? 8 });
    if (inputs.length === 0) return [];
    const perExample = this.adaptersPerExample(options.adapter, inputs.length);
    const examples = inputs.map((input, b) => ({ inputIds: this.ids(input, maxInputLength), choices: this.choiceIds(choices[b], b) }));
    const V = this.config.vocabSize;
    const result: Float32Array[][] = new Array(examples.length);
    await this.scoreInCalls(nm, examples, perExample, batchSize, groupByLength, 'logits', (batch, out, members) => {
      const logits = out.logits as Float32Array;
      members.forEach((i, k) => {
        result[i] = examples[i].choices.map((c, j) => {
          const r = batch.rowStart[k] + j;
          return logits.slice(r * batch.decLen * V, (r * batch.decLen + c.length) * V);
        });
      });
    });
    return result;
  }

  // rankClassify's, encode's and choiceLogits' native calls. Every example and adapter is checked before the first
  // call (a bad one late in the list costs no work, and the message gives its index in the list: the calls'
  // batches are not in the order given; buildBatch does not check them again); then calls of batchSize (callGroups: grouped by length unless
  // groupByLength is false). `take` gets each call's batch and output with its examples' indices in `examples`
  // (batch example k is examples[members[k]]); `signal` stops between calls.
  private async scoreInCalls(nm: NativeModel, examples: Omit<EncodedExample, 'adapterIndex'>[],
                             perExample: (IA3Adapter | null)[], batchSize: number, groupByLength: boolean,
                             want: 'scores' | 'logits' | 'hidden',
                             take: (batch: NativeBatch, out: NativeScoreResult, members: number[]) => void,
                             signal?: AbortSignal): Promise<void> {
    examples.forEach((ex, b) => checkExample(ex, b, this.config.vocabSize, false, this.config.padTokenId));
    this.checkAdapters(perExample);
    let done = 0;
    for (const members of callGroups(examples, batchSize, groupByLength)) {
      if (signal?.aborted) throw new AbortError(`rankClassify aborted after ${done} of ${examples.length} examples`);
      done += members.length;
      const { encoded, adapters } = this.withAdapters(members.map((i) => examples[i]), members.map((i) => perExample[i]));
      const batch = buildBatch(encoded, this.config.vocabSize, { padId: this.config.padTokenId, checked: true });
      const out = await this.callNative(() => nm.score(batch, adapters.map((a) => a.data), want === 'logits', want === 'hidden',
                                                       adapterKeys(adapters)));
      take(batch, out, members);
    }
  }

  /** The T-Few losses (LM + UL + LN, weighted) and their gradients with respect to the adapters' vectors. */
  async lossAndGradients(batch: LossBatch, options: LossOptions = {}): Promise<LossResult> {
    const nm = this.live();
    const perExample = this.adaptersPerExample(options.adapter, batch?.inputIds?.length ?? 0);
    const { batch: nb, adapters } = this.lossBatch(batch, perExample, { maxInputLength: options.maxInputLength });
    const weights = lossWeights(options);
    const out = await this.callNative(() => nm.lossAndGradients(nb, adapters.map((a) => a.data), weights, adapterKeys(adapters)));
    const adapterGradients = new Map<IA3Adapter, Float32Array>();
    adapters.forEach((a, i) => adapterGradients.set(a, out.gradients.subarray(i * a.data.length, (i + 1) * a.data.length)));
    const gradients: Record<string, Float32Array> = {};
    if (adapters.length > 0) {
      const g = adapterGradients.get(adapters[0]) as Float32Array;
      for (const m of adapters[0].modules) gradients[m.name] = g.subarray(m.offset, m.offset + m.length);
    }
    return { totalLoss: out.totalLoss, lmLoss: out.lmLoss, ulLoss: out.ulLoss, lnLoss: out.lnLoss, gradients, adapterGradients };
  }

  /**
   * A native training session over these adapters (their current vectors are copied): see TrainingSession.
   * Examples of a step may use any of them (mixed-task training).
   */
  async createTrainingSession(adapters: IA3Adapter[], options: TrainingSessionOptions = {}): Promise<TrainingSession> {
    const nm = this.live();
    if (!Array.isArray(adapters) || adapters.length === 0) throw new InvalidArgumentError('a training session needs at least one adapter');
    if (new Set(adapters).size !== adapters.length) throw new InvalidArgumentError('the same adapter appears twice');
    for (const a of adapters) {
      if (!(a instanceof IA3Adapter)) throw new InvalidArgumentError('createTrainingSession takes IA3Adapter objects');
      a.assertCompatible(this.config);
    }
    const o = {
      lr: options.lr ?? 3e-3,
      totalSteps: options.totalSteps ?? 1000,
      warmupRatio: options.warmupRatio ?? 0.06,
      clipNorm: options.clipNorm ?? 1.0,
      scaleParameter: options.scaleParameter ?? true,
      weightDecay: options.weightDecay ?? 0,
    };
    if (!(o.lr > 0) || !Number.isFinite(o.lr)) throw new InvalidArgumentError(`lr must be a positive number, got ${o.lr}`);
    if (!Number.isInteger(o.totalSteps) || o.totalSteps < 1) throw new InvalidArgumentError(`totalSteps must be an integer >= 1, got ${o.totalSteps}`);
    if (!(o.warmupRatio >= 0 && o.warmupRatio <= 1)) throw new InvalidArgumentError(`warmupRatio must be in [0, 1], got ${o.warmupRatio}`);
    if (!(o.clipNorm >= 0)) throw new InvalidArgumentError(`clipNorm must be >= 0, got ${o.clipNorm}`);
    if (!(o.weightDecay >= 0) || !Number.isFinite(o.weightDecay)) throw new InvalidArgumentError(`weightDecay must be >= 0, got ${o.weightDecay}`);
    const session = await this.callNative(() => nm.createTrainingSession(adapters.map((a) => a.data), o));
    return new TrainingSession(this, adapters.slice(), session);
  }

  /**
   * @internal The native batch of a loss call and the adapters it indexes (collected from the examples, or
   * `fixed`: a training session's list, which every example's adapter must be in).
   */
  lossBatch(batch: LossBatch, perExample: (IA3Adapter | null)[], options: { fixed?: readonly IA3Adapter[]; maxInputLength?: number } = {}): { batch: NativeBatch; adapters: IA3Adapter[] } {
    const { inputIds, choices, labels } = batch ?? ({} as LossBatch);
    if (!Array.isArray(inputIds) || !Array.isArray(choices) || !Array.isArray(labels)) {
      throw new InvalidArgumentError('a loss batch needs { inputIds, choices, labels } arrays');
    }
    if (inputIds.length !== choices.length || inputIds.length !== labels.length) {
      throw new InvalidArgumentError(`inputIds (${inputIds.length}), choices (${choices.length}) and labels (${labels.length}) differ in length`);
    }
    const maxInputLength = checkMaxInputLength(options.maxInputLength);
    const chunk = inputIds.map((input, b) => ({ inputIds: this.ids(input, maxInputLength), choices: this.choiceIds(choices[b], b), label: labels[b] }));
    const { encoded, adapters } = this.withAdapters(chunk, perExample, options.fixed);
    return {
      batch: buildBatch(encoded, this.config.vocabSize, { withLabels: true, padId: this.config.padTokenId, lengthMultiple: trainingLengthMultiple() }),
      adapters,
    };
  }

  /**
   * Frees the weights (device memory included) once the calls made before it have finished (they complete
   * normally). Later calls reject with DisposedError. Safe to call twice.
   */
  async dispose(): Promise<void> {
    if (!this.disposing) this.disposing = this.disposeOnce();
    return this.disposing;  // (a second call resolves when the first has freed everything)
  }

  private async disposeOnce(): Promise<void> {
    const nm = this.nativeModel;
    this.nativeModel = undefined;
    if (!nm) return;
    // Wait for the queue to drain. A call made before dispose() may issue its next native call (its next chunk
    // of examples) from a continuation: those run before a setImmediate, so the queue is looked at again after one.
    for (;;) {
      const last = this.lastCall;
      await last;
      await new Promise<void>((resolve) => setImmediate(resolve));
      if (this.lastCall === last && this.callsInFlight === 0) break;
    }
    await nm.dispose();
  }

  /** `await using model = await T5Model.load(...)`: dispose() at the end of the scope. */
  async [asyncDispose](): Promise<void> {
    await this.dispose();
  }

  /**
   * @internal Runs a native call of this model (or of its training sessions) after the ones before it, and maps
   * its errors to typed ones. With nothing in flight it starts at once, so a call made before dispose() is
   * issued before the dispose.
   */
  callNative<T>(call: () => Promise<T>): Promise<T> {
    const invoke = (): Promise<T> => mapNativeErrors(call);
    const run = this.callsInFlight === 0 ? invoke() : this.lastCall.then(invoke);
    this.callsInFlight++;
    this.lastCall = run.then(() => undefined, () => undefined).then(() => {
      this.callsInFlight--;
    });
    return run;
  }

  // ---- internals ----

  private live(): NativeModel {
    if (!this.nativeModel) throw new DisposedError(`the model loaded from ${this.dir} has been disposed`);
    return this.nativeModel;
  }


  private ids(input: number[] | string, maxLength: number): number[] {
    if (typeof input === 'string') return this.tokenize(input, maxLength);
    if (Array.isArray(input) || ArrayBuffer.isView(input)) return Array.from(input as ArrayLike<number>);
    throw new InvalidArgumentError('each input must be a string or an array of token ids');
  }

  private choiceIds(list: string[] | number[][] | undefined, example: number): number[][] {
    if (!Array.isArray(list) || list.length === 0) throw new InvalidArgumentError(`example ${example} has no answer choices`);
    return (list as (string | number[])[]).map((c) => (typeof c === 'string' ? this.tokenize(c) : this.ids(c, Number.MAX_SAFE_INTEGER)));
  }

  private adaptersPerExample(option: AdapterOption, n: number): (IA3Adapter | null)[] {
    if (Array.isArray(option)) {
      if (option.length !== n) throw new InvalidArgumentError(`got ${option.length} adapters for ${n} examples`);
      return option.map((a) => a ?? null);
    }
    return new Array(n).fill(option ?? null);
  }

  /** Throws InvalidArgumentError / InvalidAdapterError naming the first example whose adapter does not fit. */
  private checkAdapters(perExample: readonly (IA3Adapter | null)[]): void {
    const checked = new Set<IA3Adapter>();
    perExample.forEach((a, b) => {
      if (!a || checked.has(a)) return;
      if (!(a instanceof IA3Adapter)) throw new InvalidArgumentError(`adapter of example ${b} is not an IA3Adapter`);
      try {
        a.assertCompatible(this.config);
      } catch (e) {
        if (e instanceof InvalidAdapterError) throw new InvalidAdapterError(`adapter of example ${b}: ${e.message}`);
        throw e;
      }
      checked.add(a);
    });
  }

  /**
   * Gives every example the index of its adapter in `adapters` (-1: none). Adapters are collected as they
   * appear, or, with `fixed` (a training session's list), must already be in it.
   */
  private withAdapters(chunk: Omit<EncodedExample, 'adapterIndex'>[], perExample: (IA3Adapter | null)[],
                       fixed?: readonly IA3Adapter[]): { encoded: EncodedExample[]; adapters: IA3Adapter[] } {
    const adapters: IA3Adapter[] = fixed ? fixed.slice() : [];
    const index = new Map<IA3Adapter, number>(adapters.map((a, i) => [a, i]));
    const encoded = chunk.map((ex, b) => {
      const a = perExample[b];
      let adapterIndex = -1;
      if (a) {
        if (!(a instanceof IA3Adapter)) throw new InvalidArgumentError(`adapter of example ${b} is not an IA3Adapter`);
        if (!index.has(a)) {
          if (fixed) throw new InvalidArgumentError(`the adapter of example ${b} is not one of the training session's adapters`);
          a.assertCompatible(this.config);
          index.set(a, adapters.length);
          adapters.push(a);
        }
        adapterIndex = index.get(a) as number;
      }
      return { ...ex, adapterIndex };
    });
    return { encoded, adapters };
  }
}

function argmax(xs: number[]): number {
  let best = 0;
  for (let i = 1; i < xs.length; i++) if (xs[i] > xs[best]) best = i;
  return best;
}

/** Which backends this machine can use, and why (for `tfew doctor` and logs). */
export function backendInfo(): { build: ReturnType<typeof native>['buildInfo']; cuda: CudaProbe } {
  return { build: native().buildInfo, cuda: native().probeCuda() };
}

export type { NativeBatch };

/** One call shape for T5Model.warmUpGraphs. */
export interface GraphWarmUpShape {
  /** Input tokens per example (eos included). */
  inputLength: number;
  /** The token count of each answer choice (eos included), e.g. [2, 2] for "yes" / "no". */
  choiceLengths: number[];
  /** Examples per call (default 1: single requests). */
  batchSize?: number;
  /** Calls with an adapter (default true, as a service's calls are); false: without. */
  adapter?: boolean;
}

/**
 * The input lengths that CUDA graph buckets pad small calls to (cuda/model/graph_buckets.h), one per bucket up to
 * maxLength (the last one maxLength itself when it falls inside a bucket): the lengths to pass to
 * T5Model.warmUpGraphs so that every input length up to maxLength replays a graph. Buckets cover calls of at most
 * 4096 encoder tokens and 2.5 TFLOP of encoder GEMMs (about 1,000 tokens of T0-3B): given `request` (a model's
 * config and one request's choices), only the lengths at which such a single request runs padded (a longer one runs
 * at its exact length, where a graph warmed for it would serve that one length alone).
 */
export function graphBucketLengths(maxLength: number, request?: { config: NativeConfig; choiceLengths: number[] }): number[] {
  if (!Number.isInteger(maxLength) || maxLength < 1 || maxLength > 2 ** 20) {
    throw new InvalidArgumentError(`maxLength must be an integer in [1, 2^20], got ${String(maxLength)}`);
  }
  let limit = maxLength;
  if (request !== undefined) {
    if (typeof request !== 'object' || request === null || typeof request.config !== 'object' || request.config === null) {
      throw new InvalidArgumentError('graphBucketLengths: request must be { config, choiceLengths } (config: a model\'s config)');
    }
    const { config, choiceLengths } = request;
    if (!Array.isArray(choiceLengths) || choiceLengths.length === 0 || choiceLengths.length > 2 ** 20 ||
        !choiceLengths.every((n) => Number.isInteger(n) && n >= 1 && n <= 2 ** 20)) {
      throw new InvalidArgumentError('graphBucketLengths: choiceLengths must be 1 to 2^20 integers in [1, 2^20]');
    }
    let rules: ReturnType<NativeAddon['graphBuckets']>;
    try {
      rules = native().graphBuckets([1], { config, rows: choiceLengths.length, choiceLength: Math.max(...choiceLengths) });
    } catch (e) {
      throw fromNative(e);  // (a config that is not a T5 config's)
    }
    limit = Math.min(limit, rules.singleLimit ?? 0);
  }
  const out: number[] = [];
  let len = 1;
  while (len <= limit) {
    const bucket = native().graphBuckets([len]).lengths[0];
    out.push(Math.min(bucket, limit));
    len = bucket + 1;
  }
  return out;
}

/** The values of CudaOptions.precision and .crossAttention, for checkCudaOptions and the CLI's flags. */
export const CUDA_PRECISIONS: readonly NonNullable<CudaOptions['precision']>[] = ['bf16', 'fp32'];
export const CUDA_CROSS_ATTENTION: readonly NonNullable<CudaOptions['crossAttention']>[] = ['auto', 'folded', 'precomputed'];

/** ReserveShape(s) checked and in the addon's terms (`where` names the option in errors). */
function reserveShapes(value: ReserveShape | ReserveShape[], where: string): NativeReserveShape[] {
  const list = Array.isArray(value) ? value : [value];
  if (list.length === 0 || list.length > 64) throw new InvalidArgumentError(`${where}: 1 to 64 shapes, got ${list.length}`);
  return list.map((s, i) => {
    const at = Array.isArray(value) ? `${where}[${i}]` : where;
    if (typeof s !== 'object' || s === null || Array.isArray(s)) throw new InvalidArgumentError(`${at} must be an object`);
    const known = ['batchSize', 'inputLength', 'choices', 'choiceLength', 'adapters', 'training', 'recompute'];
    const unknown = Object.keys(s).filter((k) => !known.includes(k));
    if (unknown.length > 0) throw new InvalidArgumentError(`${at}: unknown field ${unknown.map((k) => `'${k}'`).join(', ')} (fields: ${known.join(', ')})`);
    const int = (name: keyof ReserveShape, v: unknown, min: number, max: number): number => {
      if (!Number.isInteger(v) || (v as number) < min || (v as number) > max) {
        throw new InvalidArgumentError(`${at}.${name} must be an integer in [${min}, ${max}], got ${JSON.stringify(v) ?? String(v)}`);
      }
      return v as number;
    };
    const recompute = (() => {
      try {
        return recomputeLevel(s.recompute);
      } catch (e) {
        throw new InvalidArgumentError(`${at}.${(e as Error).message}`);
      }
    })();
    const { training = false } = s;
    if (typeof training !== 'boolean') throw new InvalidArgumentError(`${at}.training must be a boolean`);
    if (!training && s.recompute !== undefined) throw new InvalidArgumentError(`${at}.recompute applies to training shapes only`);
    const choices = int('choices', s.choices, training ? 1 : 0, 1 << 20);
    const shape: NativeReserveShape = {
      batch: int('batchSize', s.batchSize, 1, 1 << 20),
      encLen: int('inputLength', s.inputLength, 1, 1 << 20),
      choices,
      decLen: choices === 0 && s.choiceLength === undefined ? 0 : int('choiceLength', s.choiceLength, choices > 0 ? 1 : 0, 1 << 20),
      nAdapters: int('adapters', s.adapters ?? 1, 0, 65536),
      training,
      recompute,
    };
    const tokens = 1 << 24;  // the engine's bound per call
    if (shape.batch * shape.encLen > tokens || shape.batch * choices * shape.decLen > tokens) {
      throw new InvalidArgumentError(`${at}: more than ${tokens} input or choice tokens in one call`);
    }
    return shape;
  });
}

function checkGpuIndex(gpu: unknown, what: string): void {
  if (gpu !== undefined && !(Number.isInteger(gpu) && (gpu as number) >= 0)) {
    throw new InvalidArgumentError(`${what} must be an integer >= 0, got ${String(gpu)}`);
  }
}

function checkCudaOptions(o: CudaOptions | undefined): CudaOptions | undefined {
  if (o === undefined) return undefined;
  if (typeof o !== 'object' || o === null) throw new InvalidArgumentError('cuda must be an object');
  checkGpuIndex(o.device, 'cuda.device');
  if (o.precision !== undefined && !CUDA_PRECISIONS.includes(o.precision)) {
    throw new InvalidArgumentError(`cuda.precision must be ${oneOf(CUDA_PRECISIONS)}, got ${String(o.precision)}`);
  }
  for (const k of ['fusedAttention', 'fusedBackward', 'fewRowLinears', 'gemmTuning', 'programmaticLaunch',
    'attentionOccupancy', 'graphs', 'graphBuckets'] as const) {
    if (o[k] !== undefined && typeof o[k] !== 'boolean') throw new InvalidArgumentError(`cuda.${k} must be a boolean`);
  }
  if (o.encoderChunkRows !== undefined && !(Number.isInteger(o.encoderChunkRows) && o.encoderChunkRows >= 0 && o.encoderChunkRows <= 1 << 24)) {
    throw new InvalidArgumentError(`cuda.encoderChunkRows must be an integer from 0 to 16777216, got ${String(o.encoderChunkRows)}`);
  }
  if (o.crossAttention !== undefined && !CUDA_CROSS_ATTENTION.includes(o.crossAttention)) {
    throw new InvalidArgumentError(`cuda.crossAttention must be ${oneOf(CUDA_CROSS_ATTENTION)}, got ${String(o.crossAttention)}`);
  }
  return o;
}
