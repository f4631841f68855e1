// The TypeScript view of the native addon (cuda/napi). Only lib/ talks to it; users see T5Model etc.
// The addon is found by node-gyp-build: prebuilds/<platform>-<arch>/ first, then build/Release;
// TFEW_NATIVE_ADDON=<path to a .node file> loads that file instead.
import * as fs from 'fs';
import * as path from 'path';

export type NativeDType = 'F64' | 'F32' | 'F16' | 'BF16';

/** How the CUDA backend runs (T5Model.load's `cuda` option); unset fields fall back to the environment. */
export interface CudaOptions {
  /**
   * Which GPU: an index among the visible ones (as CUDA_VISIBLE_DEVICES leaves them), so that one process can hold
   * a model on each GPU. Default: $TFEW_CUDA_DEVICE, else 0. An index that is not visible is a DeviceUnavailableError
   * (with device 'auto' too, when there are GPUs: a model meant for a GPU does not quietly run on the CPU).
   */
  device?: number;
  /** 'bf16' (default): bf16 storage, fp32 accumulation. 'fp32': fp32 everywhere, no TF32 (verification). */
  precision?: 'bf16' | 'fp32';
  /** The fused tensor-core encoder attention (bf16; default on where the GPU's shared memory allows). */
  fusedAttention?: boolean;
  /**
   * bf16 training: the encoder attention backward in the fused flash-style kernels (with fusedAttention, where
   * they fit) instead of cuBLAS. Default on: faster on an H200 (session 18: TRAIN-3B 37.3 ms against 38.9 ms with
   * cuBLAS's backward; the 1,000-step run 37.8 s against 39.9 s). With recompute 'none' the fused backward keeps
   * each encoder layer's attention output (0.12 GiB more than the cuBLAS backward's plan at TRAIN-3B: 7.97 GiB in
   * use on the H200); with 'attention' it runs the attention forward again (0.13 GiB less). false: cuBLAS.
   */
  fusedBackward?: boolean;
  /**
   * bf16 rank classification: at up to 32 decoder rows (one example's choices) the decoder's linear layers run in
   * our own kernels, each with the norm before it, the activation after it or its (IA)3 scale folded in (6 fewer
   * launches per decoder layer) instead of cuBLAS with separate passes. Default off: on an H200 (session 18) no
   * faster than cuBLAS (RANK-3B-B1 4.81 vs 4.77 ms; with the precomputed cross-attention 4.74 ms, within noise).
   * Needs d_model 512, 1024 or 2048; elsewhere ignored.
   */
  fewRowLinears?: boolean;
  /**
   * GEMM tuning: the first call of each linear layer's (and folded cross-attention's) GEMM shape, outside a CUDA
   * graph capture, times cuBLAS's own choice against up to 8 of cuBLASLt's heuristic candidates on the call's own
   * operands and keeps the fastest (cuBLASLt's where it is at least 3% faster); split-K candidates reduce in fp32.
   * First calls take longer (a few ms per shape); describe() says how many shapes changed. Needs libcublasLt beside
   * cuBLAS. Default off: on an H200 (session 18) it gained 1.1% at RANK-3B-B32 (42.5 vs 43.0 ms) and lost 4% at
   * RANK-3B-B1 and 0.7% at TRAIN-3B (rank-bench's -TUNED rows).
   */
  gemmTuning?: boolean;
  /**
   * Programmatic dependent launch (compute capability 9.0 and up: H100, H200): each of our kernels is launched so
   * that the GPU may schedule it while the kernel before it finishes; it waits for that kernel's results on the GPU
   * (cuda/kernels/launch.cuh). Aimed at latency-bound calls (RANK-3B-B1: about 500 kernels of a few microseconds
   * each), where the gaps between kernels add up; results are bit-identical. CUDA graphs keep it. Default off: on an
   * H200 (session 18) it made every workload slower (RANK-3B-B1 +5.6%, TRAIN-3B +1.7%; rank-bench's -PDL rows): next
   * to cuBLAS's kernels, which do not take part, little overlaps. Ignored on older GPUs (describe() says so).
   */
  programmaticLaunch?: boolean;
  /**
   * bf16 with the fused encoder attention at d_kv 64 (T0-3B's): its mma.sync kernels run as instances compiled for
   * one more block per SM (the forward at 4 blocks, its backward's two kernels at 3), fewer registers a thread and
   * a few spilled (cuda/kernels/attention_fused.cu). Those kernels are latency-bound at 12.5-18.75% occupancy on an
   * H200 (session 19's Nsight Compute). The same arithmetic, so the same bits. Default off until timed on a GPU
   * (rank-bench's -OCCUPANCY rows); ignored at other d_kv, in fp32 and with the cuBLAS attention (describe() says
   * "higher-occupancy kernels" when on).
   */
  attentionOccupancy?: boolean;
  /**
   * bf16 inference (rank classification, encode()) with the fused encoder attention: the encoder runs chunk by chunk
   * (whole examples, about this many rows, at least one example; each chunk through every layer) instead of over the
   * whole batch at once, every chunk's q|k|v,
   * context, FFN pre-activation and activation in the same bytes, so that they are read back from the GPU's L2
   * cache rather than from DRAM (RANK-3B-B32 moves ~1.3 GB of such temporaries per layer). Weights are read once per
   * chunk instead of once; chunks are evened out (6 examples at up to 4 a chunk: 3 + 3). 0 (the default) runs each
   * layer over the whole batch: on an H200 (session 18) chunks were slower (RANK-3B-B32 47.8 ms in chunks of 1024
   * rows, 44.7 in chunks of 2048, 43.0 whole). Training is not chunked; fp32 mode and the unfused attention ignore
   * it (describe() says so).
   */
  encoderChunkRows?: number;
  /**
   * CUDA graphs for repeated batch shapes (default on): a small call's shape is captured on its second call,
   * later ones replay it (64 graphs per kind kept, the least recently used dropped). Training steps and large
   * batches, bound by the GPU rather than by launches, are captured right after a call of the same shape or on a
   * shape's third call (a capture leaves the GPU idle, and batches of changing lengths would rarely replay it).
   */
  graphs?: boolean;
  /**
   * With graphs: small rank-classification calls (at most 4096 encoder and 512 decoder tokens, and at most 2.5
   * TFLOP of encoder GEMMs: about 1,000 tokens of T0-3B) run padded up to a grid of lengths (encoder: multiples of 8 to 64, then 8 steps per doubling, at most 12.5% more above 64;
   * choices longer than 4 tokens: multiples of 4; examples and choice rows above 4: 6, 8, 12, 16, 24, .., with
   * filler examples of one token), so that a service's calls of similar sizes replay one CUDA graph instead of
   * launching every kernel. Larger calls (graphs or not) run at their exact shape but for the encoder length,
   * padded to a multiple of 8 (cuBLAS's strided GEMMs of the folded cross-attention ran ~4.5x slower at 249 tokens
   * than at 256 on an H200). Padding is masked: the results equal the exact shape's within rounding. Default on;
   * false runs every call at its exact shape.
   */
  graphBuckets?: boolean;
  /**
   * The decoder's cross-attention in rank classification. 'precomputed': every layer's keys and values of the
   * encoder output, once per example. 'folded': W_k and W_v folded into the queries, no keys or values (fewer
   * FLOPs and far less memory when the choices are short; needs the same number of choices in every example
   * of a batch, else precomputed). 'auto' (default): folded where it saves FLOPs (choice tokens per example x
   * (encoder length + d_kv) <= encoder length x d_kv), which on an H200 was faster at every batch size measured.
   * Training decides the same way.
   */
  crossAttention?: 'auto' | 'folded' | 'precomputed';
  /**
   * The largest calls this model will serve or train on: their device memory is planned and allocated at load
   * (T5Model.reserveMemory does the same later), so that no call up to these sizes allocates device memory or
   * drops the CUDA graphs captured so far (a call that has to grow the activation arena drops them all:
   * graphStats().arenaGrowths counts those), and a size that does not fit fails at load with OutOfMemoryError
   * instead of in the middle of a service or a training run. Larger calls still work (they grow the memory).
   * The CPU backend, which allocates per call, only checks the shapes. (withMergedAdapter's model, a model of its
   * own, reserves what this option says; later reserveMemory() calls are not carried over.)
   */
  reserve?: ReserveShape | ReserveShape[];
}

/**
 * One size of call to plan device memory for (CudaOptions.reserve, T5Model.reserveMemory): every call with at most
 * these numbers (rank classification with or without graph-bucket padding, either cross-attention path, encode(),
 * and with `training` the training steps) fits in what is reserved.
 */
export interface ReserveShape {
  /** Examples per call (rankClassify's batchSize, RankBatcher's maxBatch, the Trainer's batchSize). */
  batchSize: number;
  /** Tokens of the longest input, eos included (rankClassify's maxInputLength). */
  inputLength: number;
  /** Answer choices of one example (0: encode() only). */
  choices: number;
  /** Tokens of the longest answer choice, eos included (needed when choices > 0). */
  choiceLength?: number;
  /** Distinct adapters in one call (mixed-task batches; a training session's adapters). Default 1. */
  adapters?: number;
  /** Training steps (lossAndGradients, TrainingSession.step, Trainer) rather than rank classification. */
  training?: boolean;
  /** Training: the recompute level the steps use (LossOptions.recompute; default 'auto'). */
  recompute?: boolean | 'auto' | 'none' | 'attention' | 'all';
}

/** ReserveShape as the addon takes it. */
export interface NativeReserveShape {
  batch: number;
  encLen: number;
  choices: number;
  decLen: number;
  nAdapters: number;
  training: boolean;
  recompute: 'auto' | 'none' | 'attention' | 'all';
}

/** T5 hyper-parameters, resolved from config.json by lib/config.ts (mirrors cuda/model/t5_config.h). */
export interface NativeConfig {
  vocabSize: number;
  dModel: number;
  dFf: number;
  dKv: number;
  numHeads: number;
  numLayers: number;
  numDecoderLayers: number;
  numBuckets: number;
  maxDistance: number;
  layerNormEps: number;
  gatedGelu: boolean;
  tiedHead: boolean;
  scaleDecoderOutputs: boolean;
  dropoutRate: number;
  padTokenId: number;
  eosTokenId: number;
  decoderStartTokenId: number;
}

/** One tensor inside a safetensors file: absolute byte offset of its data in `file`. */
export interface NativeTensorSpec {
  name: string;
  file: string;
  offset: number;
  byteLength: number;
  dtype: NativeDType;
  shape: number[];
}

/** A batch laid out as cuda/model/batch.h describes. */
export interface NativeBatch {
  batchSize: number;
  encLen: number;
  inputIds: Int32Array; // [B*encLen], right-padded with the pad token
  encLengths: Int32Array; // [B]
  numRows: number;
  decLen: number;
  choiceIds: Int32Array; // [R*decLen], right-padded with the pad token (masked as a target)
  rowStart: Int32Array; // [B+1]
  adapterOfExample: Int32Array; // [B], -1 = none
  labels?: Int32Array; // [B], gold choice index within the example's rows
}

export interface NativeScoreResult {
  tokenLogp: Float32Array; // [R*decLen], 0 at pad
  logits?: Float32Array; // [R*decLen*vocab]
  encoderHidden?: Float32Array; // [B*encLen*dModel]
}

export interface NativeLossResult {
  lmLoss: number;
  ulLoss: number;
  lnLoss: number;
  totalLoss: number;
  tokenLogp: Float32Array;
  gradients: Float32Array; // [numAdapters * ia3Size], adapter-major
}

export interface NativeLossOptions {
  lmWeight: number;
  ulWeight: number;
  lnWeight: number;
  dropout: boolean;
  seed: number;
  recompute?: 'auto' | 'none' | 'attention' | 'all';
}

/**
 * How the CUDA backend ran its calls (T5Model.graphStats): CUDA graphs replayed or captured, or kernels launched
 * one by one. The CPU backend has no graphs: all zero, last null.
 */
export interface GraphStats {
  /** CUDA graphs on (cuda.graphs, and capture works here). */
  enabled: boolean;
  /** When off: why (e.g. "off (capture failed: ...)"); '' when on or on the CPU backend. */
  offReason: string;
  /** Small rank-classification calls padded to shape buckets (cuda.graphBuckets). */
  buckets: boolean;
  /** Calls so far that replayed a graph, captured one (the second call of a shape), or ran eagerly. */
  replays: number;
  captures: number;
  eager: number;
  /**
   * Graphs that found no device memory to instantiate, even after every cached graph was dropped to make room, or
   * to launch (those calls ran eagerly). Three failed captures in a row turn graphs off (offReason says so); any
   * other capture failure turns them off at once.
   */
  captureFailures: number;
  /** Graphs held now (at most 64 per kind; the least recently used goes first). */
  cached: number;
  /**
   * Once a graph found device memory only by evicting others: how many graphs fit; shapes beyond them run eagerly
   * (capturing them would evict graphs in use, and shapes taking turns would be captured again and again). 0 while
   * no such limit was seen, and after reserveMemory().
   */
  graphLimit: number;
  /** Bytes of the activation arena held now (0 on the CPU backend, and before the first call or reserve). */
  arenaBytes: number;
  /**
   * Calls that had to grow device memory (a larger activation arena, or more adapter slots), each dropping every
   * captured graph (they point into it). Calls within CudaOptions.reserve / reserveMemory() never do.
   */
  arenaGrowths: number;
  /** The last call: the shape it ran at (after bucketing) and how; null before any. */
  last: { kind: 'score' | 'train'; launch: 'replay' | 'capture' | 'eager'; batch: number; encLen: number; rows: number; decLen: number } | null;
}

export interface NativeModel {
  readonly device: 'cpu' | 'cuda';
  /** What the engine computes in (CUDA: cuda.precision, else TFEW_CUDA_PRECISION, else bf16). */
  readonly precision: 'fp32' | 'bf16';
  describe(): string;
  graphStats(): GraphStats;
  /** adapters: flat Float32Arrays laid out by IA3 layout order (lib/adapter.ts), referenced by index. */
  /** adapterKeys: [id, version] per adapter (IA3Adapter); an adapter seen before at the same version is not copied again. */
  score(batch: NativeBatch, adapters: Float32Array[], wantLogits: boolean, wantEncoderHidden: boolean,
        adapterKeys?: number[]): Promise<NativeScoreResult>;
  lossAndGradients(batch: NativeBatch, adapters: Float32Array[], options: NativeLossOptions, adapterKeys?: number[]): Promise<NativeLossResult>;
  /** A native training session over copies of these adapters (vectors and optimizer state stay native). */
  createTrainingSession(adapters: Float32Array[], options: NativeOptimizerOptions): Promise<NativeTrainingSession>;
  /** Folds one adapter into the weights (k/v rows, wo columns). */
  mergeAdapter(adapter: Float32Array): Promise<void>;
  /** Plans and allocates memory for calls up to these shapes; resolves with the activation bytes held. */
  reserve(shapes: NativeReserveShape[]): Promise<number>;
  dispose(): Promise<void>;
}

/** The T-Few optimizer (mirrors cuda/model/training.h OptimizerOptions and lib/optim.ts TfewOptimizer). */
export interface NativeOptimizerOptions {
  lr: number;
  totalSteps: number;
  warmupRatio: number;
  clipNorm: number;
  scaleParameter: boolean;
  weightDecay: number;
}

export interface NativeTrainStepResult {
  lmLoss: number;
  ulLoss: number;
  lnLoss: number;
  totalLoss: number;
  lr: number;
  gradNorms: number[]; // per session adapter, before clipping
  stepped: boolean[]; // per session adapter: was it in the batch
}

export interface NativeTrainingSession {
  /** One T-Few step; scheduleStep < 0 continues the schedule. adapterOfExample indexes the session's adapters. */
  step(batch: NativeBatch, loss: NativeLossOptions, scheduleStep: number): Promise<NativeTrainStepResult>;
  read(adapter: number): Promise<Float32Array>;
  dispose(): Promise<void>;
}

export interface CudaProbe {
  compiled: boolean;
  usable: boolean;
  reason: string;
  /** GPUs visible (0 when the driver or runtime failed, or in a build without CUDA). */
  deviceCount: number;
  /** The GPU probed (-1 when none could be chosen). */
  deviceIndex: number;
  deviceName: string;
  computeCapability: number;
  totalMemory: number;
  cublasLibrary: string;
}

export interface NativeAddon {
  version: string;
  /** cudaEmulated: the CUDA-emulator build (build-emu/, tests only): its "GPU" is the CPU. */
  /**
   * How the addon was built, and the engines' call limits (model/graph_buckets.h): the multiple the encoder length
   * of a large call is padded to, and the input positions one call may have.
   */
  buildInfo: { cudaCompiled: boolean; cudaEmulated?: boolean; compiler: string; napiVersion: number; encoderLengthAlignment: number;
    maxCallTokens: number };
  /** device: a GPU index (default: $TFEW_CUDA_DEVICE, else 0). */
  probeCuda(device?: number): CudaProbe;
  /** cudaMemGetInfo on a GPU (default as probeCuda's), or null without a usable CUDA backend there. */
  cudaMemoryInfo(device?: number): { free: number; total: number } | null;
  /**
   * The CUDA graph bucket rules (cuda/model/graph_buckets.h): each length's bucket; with a request (one example with
   * `rows` choices of at most choiceLength tokens) the choice length's bucket and the longest input at which such a
   * request still runs padded (0: none).
   */
  graphBuckets(lengths: number[], request?: { config: NativeConfig; rows: number; choiceLength: number } | null, counts?: number[]):
    { lengths: number[]; choiceLength?: number; singleLimit?: number; counts?: number[] };
  /** The shape a rank-classification call runs at with graph buckets (padded when small: CudaEngine::score). */
  graphBucketCall(config: NativeConfig, batch: number, encLen: number, rows: number, decLen: number):
    { batch: number; encLen: number; rows: number; decLen: number; padded: boolean };
  loadModel(config: NativeConfig, tensors: NativeTensorSpec[],
            options: { device: 'cpu' | 'cuda'; threads: number; cuda?: CudaOptions; reserve?: NativeReserveShape[] }): Promise<NativeModel>;
  /** Internal checks of the native thread pool's failure handling (test/core-review.test.ts); not an API. */
  _testing: {
    parallelFor(options: {
      threads: number; n: number; nested: boolean; throwIn: 'none' | 'worker' | 'caller'; kind: 'runtime' | 'bad_alloc' | 'tfew';
    }): Promise<number[]>;
    /** The CUDA planner's activation arena (bytes) of a bf16 engine for calls of one shape; no GPU needed. */
    cudaArenaBytes(config: NativeConfig, shape: {
      batch: number; encLen: number; rows: number; decLen: number; training: boolean; nAdapters: number;
      recompute: 'none' | 'attention' | 'all'; foldedCross?: boolean;
      /** training: the encoder attention backward in the fused kernels (the engine's default), or through cuBLAS
       *  (this helper's default: the plan the older tests were written against) */
      fusedBackward?: boolean;
      /** training with dropout (default; the fused backward's mask bits are planned only then) */
      dropout?: boolean;
    }): Promise<number>;
    /**
     * The recompute level 'auto' picks for a training shape, holding haveBytes of arena with freeBytes free (and, as
     * an engine after reserve(), these training shapes reserved).
     */
    cudaRecomputeChoice(config: NativeConfig, shape: {
      batch: number; encLen: number; rows: number; decLen: number; training: boolean; nAdapters: number;
      fusedBackward?: boolean;
    }, haveBytes: number, freeBytes: number,
    reserved?: { batch: number; encLen: number; rows: number; decLen: number; training: boolean; nAdapters: number }[]): Promise<'none' | 'attention' | 'all'>;
    /** The arena reserve() plans for rank classification up to this shape (bf16, graph buckets on). */
    cudaReserveBytes(config: NativeConfig, shape: { batch: number; encLen: number; choices: number; decLen: number; nAdapters: number }): Promise<number>;
    /** A temporary file mapped, truncated and read: rejects with the Io error a truncation during loading gives. */
    readAfterTruncation(): Promise<void>;
    /** The CPU backend's linear kernels: y = x W^T and dx = dy W (+ dxInit) (test/cpu-linear.test.ts). */
    /** Emulation build only: the GEMM tuner keeps a cuBLASLt candidate wherever it can (its call path is then tested). */
    emulatorGemmTuningPrefersCublasLt?(on: boolean): void;
    /** Emulation build only: kernel launches so far (not graph replays), ordinary and programmatic; reset: count from 0. */
    emulatorLaunchCounts?(reset?: boolean): { ordinary: number; programmatic: number };
    /** CUDA builds: the norms' warps per row from now on (1, 2, 4 or 8 where it divides the row's 128-column chunks; 0: chosen from the rows). */
    normWarpsPerRow?(warps: number): void;
    /** Emulation build only: the SM count the emulated device reports (<= 0: the default, 132). */
    emulatorMultiprocessors?(count: number): void;
    cpuLinear(x: Float32Array, w: Float32Array, dy: Float32Array, dxInit: Float32Array | null, n: number, inDim: number,
              out: number, threads: number): Promise<{ y: Float32Array; dx: Float32Array; simd: 'avx2+fma' | 'baseline' }>;
  };
}

/** The package root (where package.json is), from lib/ under ts-jest or dist/lib/ when compiled. */
export function packageRoot(): string {
  let dir = __dirname;
  for (;;) {
    if (fs.existsSync(path.join(dir, 'package.json')) && fs.existsSync(path.join(dir, 'CMakeLists.txt'))) return dir;
    const up = path.dirname(dir);
    if (up === dir) return path.resolve(__dirname, '..');
    dir = up;
  }
}

let cached: NativeAddon | undefined;
let loadError: Error | undefined;

/** Loads the addon once. Throws NativeLoadError (lib/errors.ts) with the reason when it cannot be found. */
export function native(): NativeAddon {
  if (cached) return cached;
  if (loadError) throw loadError;
  try {
    const override = process.env.TFEW_NATIVE_ADDON;
    // A specific build (override), e.g. the CUDA-emulator addon the GPU tests run on without a GPU (build-emu/), or
    // the package's own.
    // eslint-disable-next-line @typescript-eslint/no-var-requires
    const addon = (override ? require(path.resolve(override)) : require('node-gyp-build')(packageRoot())) as NativeAddon;
    // An addon built from older sources lacks what lib now reads from it (lib/batch.ts pads training batches to its
    // limits): refused here, by name, rather than mis-padding batches later.
    if (typeof addon.buildInfo?.encoderLengthAlignment !== 'number' || typeof addon.buildInfo?.maxCallTokens !== 'number') {
      throw new Error('it was built from older sources than this lib (its buildInfo has no encoderLengthAlignment)');
    }
    cached = addon;
    return cached;
  } catch (e) {
    // eslint-disable-next-line @typescript-eslint/no-var-requires
    const { NativeLoadError } = require('./errors');
    // (npm builds the addon in the package's install script; npm 11 may skip that until the package is approved)
    loadError = new NativeLoadError(`the native addon could not be loaded: ${(e as Error).message}. Build it with ` +
      '"npm rebuild @tfew/cuda" (in a checkout of @tfew/cuda: "npm run build:native"); if npm skipped its install ' +
      'script, approve it first: "npm install-scripts approve @tfew/cuda"');
    throw loadError;
  }
}
