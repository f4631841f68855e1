// Dynamic batching for services: concurrent single-example requests, each with its own (IA)3 adapter or none,
// are gathered into mixed-task batches, so one engine call scores examples of several tasks together (the
// engine applies a different adapter per example in the same pass). A service handling one request at a time
// pays the whole per-call cost for each; batched, that cost is shared (RANK-3B-B1 vs RANK-3B-B32 in
// benchmarks/RESULTS.md).
//
// Policy: a request waits at most `maxDelayMs` for company while the engine is idle; a full batch (`maxBatch`
// examples) goes at once; while a batch runs, new requests queue and go together as soon as it returns. One
// engine call at a time (the model serialises its calls anyway). A request that the engine rejects for its own
// input (a bad token id, an adapter that does not fit the model, an input too long for memory) must not fail its
// batch-mates: when a batch is rejected with such an error, its requests are scored one by one, so only the bad
// one rejects.
import { IA3Adapter } from './adapter';
import { asyncDispose } from './disposable';
import { AbortError, DisposedError, InvalidAdapterError, InvalidArgumentError, OutOfMemoryError, TfewError } from './errors';
import type { T5Model } from './model';

export interface RankBatcherOptions {
  /** The most examples in one engine call. Default 32. */
  maxBatch?: number;
  /** How long a request waits for others to join its batch while the engine is idle, in ms. Default 2; 0 sends
   *  at once (batches still form while a call runs). */
  maxDelayMs?: number;
  /** The most requests waiting; beyond it classify() rejects with QueueFullError (back-pressure). Default 4096. */
  maxQueue?: number;
  /** As RankClassifyOptions.lengthNormalize (default true). */
  lengthNormalize?: boolean;
  /** As RankClassifyOptions.maxInputLength (string inputs). */
  maxInputLength?: number;
}

export interface RankRequestOptions {
  /** This request's adapter (null or absent: the bare model). */
  adapter?: IA3Adapter | null;
  /** Aborting rejects the request with AbortError (a request already in a running batch is dropped from its result). */
  signal?: AbortSignal;
}

/** One example's rank classification (as one row of RankClassifyResult). */
export interface RankOneResult {
  prediction: number;
  scores: number[];
  logProbs: number[];
}

export interface RankBatcherStats {
  /** Requests accepted. */
  requests: number;
  /** Engine calls made for batches (not counting one-by-one retries). */
  batches: number;
  /** Examples sent in those batches. */
  batchedExamples: number;
  /** The largest batch sent. */
  largestBatch: number;
  /** Batches rejected for one request's input and then scored one by one. */
  isolatedBatches: number;
}

/** classify() while maxQueue requests wait. */
export class QueueFullError extends TfewError {
  constructor(message: string) { super('E_QUEUE_FULL', message); }
}

interface Pending {
  input: string | number[];
  choices: string[] | number[][];
  adapter: IA3Adapter | null;
  resolve: (r: RankOneResult) => void;
  reject: (e: Error) => void;
  settled: boolean;
  signal?: AbortSignal;
  onAbort?: () => void;
}

// Errors that may concern one request, not the engine: its batch-mates are scored again without it (out of
// memory included: one over-long input can make the whole batch too big).
const isInputError = (e: unknown): boolean =>
  e instanceof InvalidArgumentError || e instanceof InvalidAdapterError || e instanceof OutOfMemoryError;

export class RankBatcher {
  private readonly maxBatch: number;
  private readonly maxDelayMs: number;
  private readonly maxQueue: number;
  private readonly lengthNormalize: boolean;
  private readonly maxInputLength?: number;
  private queue: Pending[] = [];
  private running = false;
  private timer: NodeJS.Timeout | undefined;
  private closed = false;
  private idleWaiters: (() => void)[] = [];
  private readonly counts: RankBatcherStats = { requests: 0, batches: 0, batchedExamples: 0, largestBatch: 0, isolatedBatches: 0 };

  constructor(private readonly model: T5Model, options: RankBatcherOptions = {}) {
    const int = (name: string, v: number | undefined, dflt: number, min: number): number => {
      const x = v ?? dflt;
      if (!Number.isInteger(x) || x < min) throw new InvalidArgumentError(`${name} must be an integer >= ${min}, got ${String(v)}`);
      return x;
    };
    this.maxBatch = int('maxBatch', options.maxBatch, 32, 1);
    this.maxQueue = int('maxQueue', options.maxQueue, 4096, 1);
    const delay = options.maxDelayMs ?? 2;
    if (!Number.isFinite(delay) || delay < 0) throw new InvalidArgumentError(`maxDelayMs must be a number >= 0, got ${String(options.maxDelayMs)}`);
    this.maxDelayMs = delay;
    this.lengthNormalize = options.lengthNormalize ?? true;
    this.maxInputLength = options.maxInputLength;
  }

  /** Scores `choices` for `input` (a string, or token ids with eos) in the next batch. */
  classify(input: string | number[], choices: string[] | number[][], options: RankRequestOptions = {}): Promise<RankOneResult> {
    return new Promise<RankOneResult>((resolve, reject) => {
      if (this.closed) return reject(new DisposedError('the RankBatcher has been closed'));
      if (this.model.disposed) return reject(new DisposedError('the RankBatcher\'s model has been disposed'));
      if (options.signal?.aborted) return reject(new AbortError());
      if (typeof input !== 'string' && !Array.isArray(input)) return reject(new InvalidArgumentError('input must be a string or an array of token ids'));
      if (!Array.isArray(choices) || choices.length === 0) return reject(new InvalidArgumentError('choices must be a non-empty array'));
      const adapter = options.adapter ?? null;
      if (adapter !== null && !(adapter instanceof IA3Adapter)) return reject(new InvalidArgumentError('adapter must be an IA3Adapter or null'));
      if (this.queue.length >= this.maxQueue) {
        return reject(new QueueFullError(`${this.queue.length} requests are waiting (maxQueue ${this.maxQueue}); retry later`));
      }
      const p: Pending = { input, choices, adapter, resolve, reject, settled: false, signal: options.signal };
      if (options.signal) {
        p.onAbort = () => {
          this.queue = this.queue.filter((q) => q !== p);
          this.settle(p, new AbortError());
        };
        options.signal.addEventListener('abort', p.onAbort, { once: true });
      }
      this.counts.requests++;
      this.queue.push(p);
      this.schedule();
    });
  }

  /** Counts of what the batcher did (for logs and tests). */
  get stats(): RankBatcherStats {
    return { ...this.counts };
  }

  /** Requests waiting for a batch (not counting a running one). */
  get pending(): number {
    return this.queue.length;
  }

  /** Stops taking requests; resolves once every accepted request has been answered. The model stays loaded. */
  async close(): Promise<void> {
    this.closed = true;
    if (this.timer) this.dispatchSoon(0);
    if (!this.running && this.queue.length === 0) return;
    await new Promise<void>((resolve) => this.idleWaiters.push(resolve));
  }

  /** `await using batcher = new RankBatcher(model)`: close() at the end of the scope. */
  async [asyncDispose](): Promise<void> {
    await this.close();
  }

  // ---- internals

  private schedule(): void {
    if (this.running) return;  // the running batch's end sends what queued meanwhile
    if (this.queue.length >= this.maxBatch || this.closed) this.dispatchSoon(0);
    else if (!this.timer) this.dispatchSoon(this.maxDelayMs);
  }

  private dispatchSoon(ms: number): void {
    if (this.timer) clearTimeout(this.timer);
    // (0 ms still goes through a timer: requests made in the same tick join the batch)
    this.timer = setTimeout(() => {
      this.timer = undefined;
      void this.runBatches();
    }, ms);
  }

  private async runBatches(): Promise<void> {
    if (this.running) return;
    this.running = true;
    try {
      while (this.queue.length > 0) {
        const batch = this.queue.splice(0, this.maxBatch);
        this.counts.batches++;
        this.counts.batchedExamples += batch.length;
        this.counts.largestBatch = Math.max(this.counts.largestBatch, batch.length);
        try {
          const results = await this.score(batch);
          batch.forEach((p, i) => this.settle(p, undefined, results[i]));
        } catch (e) {
          if (batch.length > 1 && isInputError(e)) {
            this.counts.isolatedBatches++;
            for (const p of batch) {
              if (p.settled) continue;
              try {
                this.settle(p, undefined, (await this.score([p]))[0]);
              } catch (one) {
                this.settle(p, one as Error);
              }
            }
          } else {
            for (const p of batch) this.settle(p, e as Error);
          }
        }
      }
    } finally {
      this.running = false;
      if (this.queue.length === 0) {
        const waiters = this.idleWaiters;
        this.idleWaiters = [];
        waiters.forEach((w) => w());
      } else {
        this.schedule();
      }
    }
  }

  private async score(batch: Pending[]): Promise<RankOneResult[]> {
    const r = await this.model.rankClassify(
      batch.map((p) => p.input) as string[] | number[][],
      batch.map((p) => p.choices),
      { adapter: batch.map((p) => p.adapter), lengthNormalize: this.lengthNormalize, maxInputLength: this.maxInputLength, batchSize: batch.length });
    return r.predictions.map((prediction, i) => ({ prediction, scores: r.scores[i], logProbs: r.logProbs[i] }));
  }

  private settle(p: Pending, error?: Error, result?: RankOneResult): void {
    if (p.settled) return;
    p.settled = true;
    if (p.signal && p.onAbort) p.signal.removeEventListener('abort', p.onAbort);
    if (error) p.reject(error);
    else p.resolve(result as RankOneResult);
  }
}
