// Dynamic batching for services: concurrent single-example requests, each with its own (IA)3 adapter or none,
// are gathered into mixed-task batches, so one engine call scores examples of several tasks together (the
// engine applies a different adapter per example in the same pass). A service handling one request at a time
// pays the whole per-call cost for each; batched, that cost is shared (RANK-3B-B1 vs RANK-3B-B32 in
// benchmarks/RESULTS.md).
//
// Policy: a request waits at most `maxDelayMs` for company while an engine is idle; a full batch (`maxBatch`
// examples) goes at once; while a batch runs, new requests queue and go together as soon as it returns. One
// engine call at a time per model (a model serialises its calls anyway). Given several replicas of a model (the
// same checkpoint loaded once per GPU: `cuda: { device: n }`), batches run on all of them at once, each taking the
// next batch as it returns: throughput grows with the GPUs. Requests are tokenized and checked when they
// arrive (token ids in the vocabulary, at most maxInputLength input tokens: ids are refused beyond it, text is
// truncated; bounded choices), so one client's bad request is refused alone and costs no engine time. Should the
// engine still reject a batch for one request (an adapter that does not fit, out of memory), its requests are
// scored one by one, so only that one fails. When more requests wait than a batch takes, a batch is the oldest
// of them and the ones nearest it in shape (groupByLength): a batch costs what its longest input costs for every
// example in it, and one number of choices throughout keeps the CUDA engine's folded cross-attention.
import { performance } from 'perf_hooks';
import { IA3Adapter } from './adapter';
import { asyncDispose } from './disposable';
import { checkIds } from './batch';
import { AbortError, DisposedError, InvalidAdapterError, InvalidArgumentError, isAbortSignal, OutOfMemoryError, TfewError } from './errors';
import type { T5Model } from './model';
import { assertReplicas } from './replicas';

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
  /** Input tokens (eos included): text is truncated to it, longer token-id inputs are refused. Default 256. */
  maxInputLength?: number;
  /** Answer choices per request. Default 128 (RAFT's banking_77 has 77). */
  maxChoices?: number;
  /** Tokens per answer choice (eos included); longer ones are refused. Default 128. */
  maxChoiceLength?: number;
  /**
   * CUDA: before a replica's first batch, and before each batch with more or longer choices than any before it,
   * reserve its device memory for the largest batch the batcher can make of such requests (maxBatch requests of
   * maxInputLength tokens; T5Model.reserveMemory). Calls within it then never grow device memory, which would drop
   * the CUDA graphs captured so far, and a service too large for the GPU finds out at its first request, not under
   * load. A reservation that does not fit is counted (stats.reservations) and the batch runs as it can. Default true.
   */
  reserveMemory?: boolean;
  /**
   * The most distinct adapters one batch can carry (RankServer: its named adapters), the adapter slots reserved with
   * the memory. Default maxBatch (every request its own).
   */
  maxAdapters?: number;
  /**
   * When more requests wait than one batch takes (a backlog), a batch is the oldest waiting request and, from the
   * oldest 2 x maxBatch waiting, the ones nearest it in shape: the same number of choices first (the CUDA engine
   * folds the cross-attention only for batches with one number of choices: 12% faster at 32 examples on an H200),
   * then inputs no longer than the longest already in the batch, longest first, then the shortest longer ones. A
   * batch's encoder runs every example at its longest input's length, so like lengths waste less (rankClassify's
   * groupByLength: 1.55x on an H200 for 128 prompts of 32-256 tokens). The oldest request always goes next, and a
   * request passed over twice goes in the next batch, so none waits more than three batches once it is among the
   * oldest 2 x maxBatch, while batches take maxBatch each (a burst shared among idle replicas makes smaller ones, and
   * requests retried after a replica's failure go first: then the oldest of those passed over go first). false:
   * batches in arrival order. Default true.
   */
  groupByLength?: boolean;
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
  /** Batches chosen by shape from a backlog (groupByLength) rather than taken in arrival order. */
  groupedBatches: number;
  /** Time from a request's arrival to its batch being sent, ms: the mean and the largest over sent requests. */
  meanWaitMs: number;
  maxWaitMs: number;
  /** Engine time per batch that returned (the rankClassify call), ms: the mean and the last. */
  meanBatchMs: number;
  lastBatchMs: number;
  /**
   * Per replica (one model: one entry): batches it ran, whether one is running now, batches that failed in a row
   * for the engine's own reasons, and whether it was taken out of rotation for that (three in a row, while another
   * replica can still run).
   */
  replicas: { batches: number; busy: boolean; failures: number; retired: boolean }[];
  /**
   * Device memory reserved for the largest batches (options.reserveMemory, CUDA replicas only): reservations made,
   * those that did not fit (OutOfMemoryError: the batches then ran as they could), and that error's message.
   */
  reservations: { made: number; failed: number; lastError?: string };
}

/** classify() while maxQueue requests wait. */
export class QueueFullError extends TfewError {
  constructor(message: string) { super('E_QUEUE_FULL', message); }
}

interface Pending {
  inputIds: number[];  // (emptied when the request is aborted while queued: its entry stays until skipped)
  choiceIds: number[][];
  adapter: IA3Adapter | null;
  resolve: (r: RankOneResult) => void;
  reject: (e: Error) => void;
  settled: boolean;
  dispatched: boolean;
  arrivedAt: number;  // performance.now()
  signal?: AbortSignal;
  onAbort?: () => void;
  retried: boolean;  // sent again, to another replica, after its batch failed for the engine's own reasons
  failedOn?: number;  // (retried) the replica it failed on
  inQueue: boolean;  // still waiting in `queue` (a batch chosen by shape takes entries from behind its head)
  passedOver: number;  // batches chosen by shape without it while it was among the candidates
}

// Errors that may concern one request, not the engine: its batch-mates are scored again without it (out of
// memory included: one request can make the whole batch too big).
const isInputError = (e: unknown): boolean =>
  e instanceof InvalidArgumentError || e instanceof InvalidAdapterError || e instanceof OutOfMemoryError;

const MAX_TIMER_MS = 2 ** 31 - 1;
// Batches a replica may fail in a row (the engine's own errors: a lost GPU) before it leaves the rotation.
const MAX_REPLICA_FAILURES = 3;
// A request passed over this many times by batches chosen by shape goes in the next batch.
const MAX_PASSED_OVER = 2;

export class RankBatcher {
  private readonly maxBatch: number;
  private readonly maxDelayMs: number;
  private readonly maxQueue: number;
  private readonly lengthNormalize: boolean;
  private readonly maxInputLength: number;
  private readonly maxChoices: number;
  private readonly maxChoiceLength: number;
  // Requests in arrival order from `head` on; aborted ones stay (settled) and are skipped when batches form, so
  // an abort costs O(1) however long the queue.
  private queue: Pending[] = [];
  private head = 0;
  // Requests sent again after their batch failed on a replica (the engine's own error), first in line for the others.
  private retryQueue: Pending[] = [];
  private waiting = 0;  // queued, not aborted, not yet sent
  private abortedInQueue = 0;  // aborted entries still in `queue`
  // The replicas (one model, or the same checkpoint on several GPUs) and which of them runs a batch now.
  private readonly models: T5Model[];
  private readonly busy: boolean[];
  private readonly replicaBatches: number[];
  private readonly failuresInRow: number[];
  private readonly retired: boolean[];
  private timer: NodeJS.Timeout | undefined;
  private closed = false;
  private idleWaiters: (() => void)[] = [];
  private readonly counts = { requests: 0, batches: 0, batchedExamples: 0, largestBatch: 0, isolatedBatches: 0, groupedBatches: 0 };
  private waitSumMs = 0;
  private maxWaitMs = 0;
  private batchSumMs = 0;
  private timedBatches = 0;  // (batches that returned: a failed one has no engine time to count)
  private lastBatchMs = 0;
  private readonly reserve: boolean;
  private readonly maxAdapters: number;
  private readonly groupByLength: boolean;
  // per replica: the choice shape its memory is reserved for (choices, longest choice, adapters), or none yet
  private readonly reserved: ({ choices: number; choiceLength: number; adapters: number } | null)[];
  private readonly reservations: { made: number; failed: number; lastError?: string } = { made: 0, failed: 0 };

  /**
   * `model`: one model, or replicas of one (the same checkpoint loaded on several GPUs): a batch runs on whichever
   * is free, so several run at once.
   */
  constructor(model: T5Model | readonly T5Model[], options: RankBatcherOptions = {}) {
    const models = Array.isArray(model) ? [...model] as T5Model[] : [model as T5Model];
    if (models.length === 0 || models.some((m) => !m || typeof m.rankClassify !== 'function')) {
      throw new InvalidArgumentError('RankBatcher needs a T5Model, or a non-empty array of replicas of one');
    }
    assertReplicas(models, 'RankBatcher');
    this.models = models;
    this.busy = models.map(() => false);
    this.replicaBatches = models.map(() => 0);
    this.failuresInRow = models.map(() => 0);
    this.retired = models.map(() => false);
    this.reserved = models.map(() => null);
    if (options === null || typeof options !== 'object') throw new InvalidArgumentError('RankBatcher options must be an object');
    const int = (name: string, v: number | undefined, dflt: number, min: number): number => {
      const x = v ?? dflt;
      if (!Number.isInteger(x) || x < min) throw new InvalidArgumentError(`${name} must be an integer >= ${min}, got ${String(v)}`);
      return x;
    };
    this.maxBatch = int('maxBatch', options.maxBatch, 32, 1);
    this.maxQueue = int('maxQueue', options.maxQueue, 4096, 1);
    this.maxInputLength = int('maxInputLength', options.maxInputLength, 256, 1);
    this.maxChoices = int('maxChoices', options.maxChoices, 128, 1);
    this.maxChoiceLength = int('maxChoiceLength', options.maxChoiceLength, 128, 1);
    const delay = options.maxDelayMs ?? 2;
    if (typeof delay !== 'number' || !Number.isFinite(delay) || delay < 0 || delay > MAX_TIMER_MS) {
      throw new InvalidArgumentError(`maxDelayMs must be a number in [0, ${MAX_TIMER_MS}], got ${String(options.maxDelayMs)}`);
    }
    this.maxDelayMs = delay;
    const normalize = options.lengthNormalize ?? true;
    if (typeof normalize !== 'boolean') throw new InvalidArgumentError(`lengthNormalize must be a boolean, got ${String(normalize)}`);
    this.lengthNormalize = normalize;
    const reserve = options.reserveMemory ?? true;
    if (typeof reserve !== 'boolean') throw new InvalidArgumentError(`reserveMemory must be a boolean, got ${String(options.reserveMemory)}`);
    this.reserve = reserve;
    this.maxAdapters = Math.min(this.maxBatch, int('maxAdapters', options.maxAdapters, this.maxBatch, 1));
    const group = options.groupByLength ?? true;
    if (typeof group !== 'boolean') throw new InvalidArgumentError(`groupByLength must be a boolean, got ${String(options.groupByLength)}`);
    this.groupByLength = group;
  }

  /** Scores `choices` for `input` (a string, or token ids with eos) in the next batch. */
  classify(input: string | ArrayLike<number>, choices: (string | ArrayLike<number>)[],
           options: RankRequestOptions | null = {}): Promise<RankOneResult> {
    return new Promise<RankOneResult>((resolve, reject) => {
      try {
        if (this.closed) throw new DisposedError('the RankBatcher has been closed');
        if (this.models.every((m) => m.disposed)) throw new DisposedError('the RankBatcher\'s model has been disposed');
        const o = options ?? {};
        if (typeof o !== 'object') throw new InvalidArgumentError('classify options must be an object');
        if (o.signal !== undefined && !isAbortSignal(o.signal)) throw new InvalidArgumentError('signal must be an AbortSignal');
        if (o.signal?.aborted) throw new AbortError();
        const adapter = o.adapter ?? null;
        if (adapter !== null && !(adapter instanceof IA3Adapter)) throw new InvalidArgumentError('adapter must be an IA3Adapter or null');
        if (adapter) adapter.assertCompatible(this.models[0].config);
        if (this.waiting >= this.maxQueue) {
          throw new QueueFullError(`${this.waiting} requests are waiting (maxQueue ${this.maxQueue}); retry later`);
        }
        const { inputIds, choiceIds } = this.encode(input, choices);
        const p: Pending = { inputIds, choiceIds, adapter, resolve, reject, settled: false, dispatched: false,
                             arrivedAt: performance.now(), signal: o.signal, retried: false, inQueue: true, passedOver: 0 };
        if (o.signal) {
          p.onAbort = () => {
            if (!p.dispatched && !p.settled) {
              this.waiting--;
              if (!p.retried) this.dropAborted(p);  // (a retried one is dropped from retryQueue when it comes up)
            }
            this.settle(p, new AbortError());
            this.wakeIdleWaiters();  // (close() may be waiting for this one)
          };
          o.signal.addEventListener('abort', p.onAbort, { once: true });
        }
        this.counts.requests++;
        this.queue.push(p);
        this.waiting++;
        this.schedule();
      } catch (e) {
        reject(e as Error);
      }
    });
  }

  /** Counts of what the batcher did (for logs and tests). */
  get stats(): RankBatcherStats {
    const c = this.counts;
    return {
      ...c,
      meanWaitMs: c.batchedExamples > 0 ? this.waitSumMs / c.batchedExamples : 0,
      maxWaitMs: this.maxWaitMs,
      meanBatchMs: this.timedBatches > 0 ? this.batchSumMs / this.timedBatches : 0,
      lastBatchMs: this.lastBatchMs,
      replicas: this.models.map((_, i) => ({ batches: this.replicaBatches[i], busy: this.busy[i], failures: this.failuresInRow[i], retired: this.retired[i] })),
      reservations: { ...this.reservations },
    };
  }

  /** The batching settings in force (the options with their defaults filled in): what /health reports. */
  get settings(): { maxBatch: number; maxDelayMs: number; maxQueue: number; maxInputLength: number; groupByLength: boolean } {
    return { maxBatch: this.maxBatch, maxDelayMs: this.maxDelayMs, maxQueue: this.maxQueue, maxInputLength: this.maxInputLength,
             groupByLength: this.groupByLength };
  }

  /** Requests waiting for a batch (not counting a running one). */
  get pending(): number {
    return this.waiting;
  }

  /** Stops taking requests; resolves once every accepted request has been answered. The model stays loaded. */
  async close(): Promise<void> {
    this.closed = true;
    if (this.timer) this.dispatchSoon(0);
    if (!this.busy.includes(true) && this.waiting === 0) return;
    await new Promise<void>((resolve) => this.idleWaiters.push(resolve));
  }

  /** `await using batcher = new RankBatcher(model)`: close() at the end of the scope. */
  async [asyncDispose](): Promise<void> {
    await this.close();
  }

  // ---- internals

  // Token ids of the request, checked: what would fail in the engine for this request alone fails here.
  private encode(input: string | ArrayLike<number>, choices: (string | ArrayLike<number>)[]): { inputIds: number[]; choiceIds: number[][] } {
    const vocab = this.models[0].config.vocabSize;
    const ids = (value: unknown, what: string, limit: number, truncate: boolean): number[] => {
      let out: number[];
      if (typeof value === 'string') {
        out = this.models[0].tokenize(value, truncate ? limit : undefined);
      } else if (Array.isArray(value) || ArrayBuffer.isView(value)) {
        out = Array.from(value as ArrayLike<number>);
      } else {
        throw new InvalidArgumentError(`${what} must be a string or an array of token ids`);
      }
      if (out.length > limit) {
        throw new InvalidArgumentError(`${what} has ${out.length} tokens; this batcher takes at most ${limit}` +
                                       (truncate ? ' (token ids are not truncated)' : ''));
      }
      checkIds(out, vocab, what);  // (buildBatch's check, here at arrival: a bad request costs no engine call)
      return out;
    };
    const inputIds = ids(input, 'the input', this.maxInputLength, true);
    if (!Array.isArray(choices) || choices.length === 0) throw new InvalidArgumentError('choices must be a non-empty array');
    if (choices.length > this.maxChoices) throw new InvalidArgumentError(`${choices.length} choices; this batcher takes at most ${this.maxChoices}`);
    const choiceIds = choices.map((c, j) => ids(c, `choice ${j}`, this.maxChoiceLength, false));
    return { inputIds, choiceIds };
  }

  // A replica that can take a batch now (not running one, not disposed, not retired), or -1.
  private idleReplica(): number {
    return this.models.findIndex((m, i) => !this.busy[i] && !m.disposed && !this.retired[i]);
  }

  // Retirement only ever leaves others to do the work: when every live replica is retired, they all come back.
  private keepOneInRotation(): void {
    const live = this.models.map((m, i) => i).filter((i) => !this.models[i].disposed);
    if (live.length > 0 && live.every((i) => this.retired[i])) {
      for (const i of live) {
        this.retired[i] = false;
        this.failuresInRow[i] = 0;
      }
    }
  }

  // Live replicas in rotation other than `replica`.
  private othersInRotation(replica: number): number {
    return this.models.filter((m, i) => i !== replica && !m.disposed && !this.retired[i]).length;
  }

  private schedule(): void {
    if (this.waiting === 0) return;
    this.keepOneInRotation();
    if (this.idleReplica() < 0) {
      // a running batch's end sends what queued meanwhile; with every replica disposed, what waits fails now
      if (this.models.every((m) => m.disposed) && !this.busy.includes(true)) this.dispatchSoon(0);
      return;
    }
    if (this.waiting >= this.maxBatch || this.closed) this.dispatchSoon(0);
    else if (!this.timer) this.dispatchSoon(this.maxDelayMs);
  }

  private dispatchSoon(ms: number): void {
    if (this.timer) clearTimeout(this.timer);
    // (0 ms still goes through a timer: requests made in the same tick join the batch)
    this.timer = setTimeout(() => {
      this.timer = undefined;
      this.dispatch();
    }, ms);
  }

  // Starts idle replicas while requests wait: each takes a batch (and the next ones as it returns). What waits is
  // shared evenly among them (33 requests on two idle replicas: 17 + 16, not 32 + 1: the burst is answered sooner).
  private dispatch(): void {
    this.keepOneInRotation();
    const idle = this.models.map((_, i) => i).filter((i) => !this.busy[i] && !this.models[i].disposed && !this.retired[i]);
    const share = Math.min(this.maxBatch, Math.ceil(this.waiting / Math.max(1, idle.length)));
    for (const i of idle) {
      if (this.waiting === 0) break;
      void this.runBatches(i, share);
    }
    if (this.waiting > 0 && this.models.every((m) => m.disposed)) {
      // (every replica is gone: what waits can never run)
      for (let batch = this.takeBatch(0); batch.length > 0; batch = this.takeBatch(0)) {
        for (const p of batch) this.settle(p, new DisposedError('the RankBatcher\'s model has been disposed'));
      }
    }
    this.wakeIdleWaiters();  // (close() after every waiting request was aborted: nothing left to run)
  }

  // A batch that failed for the engine's own reasons on `replica`: its requests go once more, first in line, to
  // another replica (a lost GPU must not fail every request it happens to take); those already retried fail.
  private requeue(replica: number, batch: Pending[], error: Error): void {
    const again = batch.filter((p) => !p.settled && !p.retried && this.othersInRotation(replica) > 0);
    for (const p of batch) if (!p.settled && !again.includes(p)) this.settle(p, error);
    for (const p of again) {
      p.retried = true;
      p.failedOn = replica;
      p.dispatched = false;
    }
    this.retryQueue.push(...again);
    this.waiting += again.length;
  }

  // An aborted request's entry stays in the queue (removing it would cost O(queue)) but lets go of its tokens;
  // when such entries outnumber the waiting ones (clients giving up during a long batch), they are swept out.
  private dropAborted(p: Pending): void {
    p.inputIds = [];
    p.choiceIds = [];
    p.adapter = null;
    if (++this.abortedInQueue > 1024 && this.abortedInQueue > this.waiting) {
      this.queue = this.queue.slice(this.head).filter((q) => q.inQueue && !q.settled && q !== p);
      this.head = 0;
      this.abortedInQueue = 0;
    }
  }

  // The next batch for `replica`: retried requests first (not back to the replica they failed on, while another can
  // take them), then up to `limit` (maxBatch) requests: in arrival order, or, when more wait than that and
  // groupByLength is on, chosen by shape (takeByShape); aborted ones skipped.
  private takeBatch(replica: number, limit = this.maxBatch): Pending[] {
    const batch: Pending[] = [];
    if (this.retryQueue.length > 0) {
      const alone = this.othersInRotation(replica) === 0;
      const keep: Pending[] = [];
      for (const p of this.retryQueue) {
        if (p.settled) continue;  // (aborted while waiting again)
        if (batch.length < limit && (alone || p.failedOn !== replica)) {
          p.dispatched = true;
          this.waiting--;
          batch.push(p);
        } else {
          keep.push(p);
        }
      }
      this.retryQueue = keep;
    }
    if (this.groupByLength && batch.length < limit) this.takeByShape(batch, limit - batch.length);
    while (batch.length < limit && this.head < this.queue.length) {
      const p = this.queue[this.head++];
      if (!p.inQueue) continue;  // (taken by shape from behind the head)
      if (p.settled) {
        this.abortedInQueue--;
        continue;
      }
      p.inQueue = false;
      p.dispatched = true;
      this.waiting--;
      batch.push(p);
    }
    // (past what a batch chosen by shape took, and requests aborted while queued, at the head)
    for (let p = this.queue[this.head]; this.head < this.queue.length && (!p.inQueue || p.settled); p = this.queue[++this.head]) {
      if (p.inQueue) this.abortedInQueue--;
    }
    if (this.head === this.queue.length) {
      this.queue = [];
      this.head = 0;
      this.abortedInQueue = 0;
    } else if (this.head > 1024 && this.head * 2 > this.queue.length) {
      this.queue = this.queue.slice(this.head);
      this.head = 0;
    }
    return batch;
  }

  // A batch of `need` requests chosen by shape from the oldest 2 x maxBatch waiting in `queue`, when more than `need`
  // wait there (else takeBatch takes them in arrival order): the oldest, and any passed over MAX_PASSED_OVER times,
  // then the others by likeness to them (RankBatcherOptions.groupByLength). Those left out are passed over once more.
  private takeByShape(batch: Pending[], need: number): void {
    const candidates: Pending[] = [];
    for (let i = this.head; i < this.queue.length && candidates.length < 2 * this.maxBatch; i++) {
      const p = this.queue[i];
      if (p.inQueue && !p.settled) candidates.push(p);
    }
    if (candidates.length <= need) return;
    const chosen = new Set<Pending>(candidates.filter((p, i) => i === 0 || p.passedOver >= MAX_PASSED_OVER).slice(0, need));
    const choices = candidates[0].choiceIds.length;
    let longest = 0;
    for (const p of chosen) longest = Math.max(longest, p.inputIds.length);
    // (rank: another number of choices than the oldest's last; then no longer than the longest chosen, longest first
    // (no padding added); then longer, shortest first)
    const rank = (p: Pending): [number, number, number] => {
      const n = p.inputIds.length;
      return [p.choiceIds.length === choices ? 0 : 1, n <= longest ? 0 : 1, n <= longest ? longest - n : n - longest];
    };
    const rest = candidates.filter((p) => !chosen.has(p))
      .map((p) => ({ p, r: rank(p) }))
      .sort((a, b) => a.r[0] - b.r[0] || a.r[1] - b.r[1] || a.r[2] - b.r[2]);
    for (const { p } of rest) {
      if (chosen.size >= need) break;
      chosen.add(p);
    }
    for (const p of candidates) {  // (in arrival order)
      if (!chosen.has(p)) {
        p.passedOver++;
        continue;
      }
      p.inQueue = false;
      p.dispatched = true;
      this.waiting--;
      batch.push(p);
    }
    this.counts.groupedBatches++;
  }

  // `first`: the size of its first batch (dispatch's share); later ones take up to maxBatch.
  private async runBatches(replica: number, first = this.maxBatch): Promise<void> {
    if (this.busy[replica]) return;
    this.busy[replica] = true;
    const model = this.models[replica];
    let took = false;
    try {
      for (let batch = this.takeBatch(replica, first); batch.length > 0; batch = model.disposed ? [] : this.takeBatch(replica)) {
        took = true;
        this.counts.batches++;
        this.replicaBatches[replica]++;
        this.counts.batchedExamples += batch.length;
        this.counts.largestBatch = Math.max(this.counts.largestBatch, batch.length);
        await this.reserveFor(replica, batch);
        const sentAt = performance.now();
        for (const p of batch) {
          this.waitSumMs += sentAt - p.arrivedAt;
          this.maxWaitMs = Math.max(this.maxWaitMs, sentAt - p.arrivedAt);
        }
        try {
          const results = await this.score(model, batch);
          this.lastBatchMs = performance.now() - sentAt;
          this.batchSumMs += this.lastBatchMs;
          this.timedBatches++;
          this.failuresInRow[replica] = 0;
          batch.forEach((p, i) => this.settle(p, undefined, results[i]));
        } catch (e) {
          if (batch.length > 1 && isInputError(e)) {
            this.counts.isolatedBatches++;
            for (const p of batch) {
              if (p.settled) continue;
              try {
                this.settle(p, undefined, (await this.score(model, [p]))[0]);
              } catch (one) {
                this.settle(p, one as Error);
              }
            }
          } else if (!(e instanceof DisposedError) && !isInputError(e)) {
            // the engine's own failure: another replica gets the batch; one failing batch after batch leaves the
            // rotation (while another can run), instead of taking every batch as fast as it fails
            this.requeue(replica, batch, e as Error);
            if (++this.failuresInRow[replica] >= MAX_REPLICA_FAILURES && this.othersInRotation(replica) > 0) this.retired[replica] = true;
            if (this.retired[replica]) break;
          } else {
            for (const p of batch) this.settle(p, e as Error);
          }
        }
      }
    } finally {
      this.busy[replica] = false;
      // (a replica that found nothing it may take leaves the rest to the others, which send it as they return)
      if (this.waiting > 0 && took) this.schedule();
      else this.wakeIdleWaiters();
    }
  }

  // close()'s waiters, once nothing runs and nothing waits.
  private wakeIdleWaiters(): void {
    if (this.busy.includes(true) || this.waiting > 0) return;
    const waiters = this.idleWaiters;
    this.idleWaiters = [];
    waiters.forEach((w) => w());
  }

  // options.reserveMemory: the device memory of the largest batch of requests like these, before it is needed. The
  // reserved shape only grows (each growth drops the replica's graphs once), to the largest choices seen. Never
  // throws: a reservation that fails is counted, and the batch runs as it can.
  private async reserveFor(replica: number, batch: Pending[]): Promise<void> {
    const model = this.models[replica];
    if (!this.reserve || model.device !== 'cuda' || model.disposed) return;
    const had = this.reserved[replica];
    const want = { choices: had?.choices ?? 0, choiceLength: had?.choiceLength ?? 0, adapters: had?.adapters ?? 0 };
    for (const p of batch) {
      want.choices = Math.max(want.choices, p.choiceIds.length);
      for (const c of p.choiceIds) want.choiceLength = Math.max(want.choiceLength, c.length);
      // (adapter slots are small beside the activations: as many as a batch may carry, at once)
      if (p.adapter) want.adapters = this.maxAdapters;
    }
    if (had && want.choices === had.choices && want.choiceLength === had.choiceLength && want.adapters === had.adapters) return;
    this.reserved[replica] = want;  // (once per shape, fitting or not: a failed one is not tried batch after batch)
    try {
      await model.reserveMemory({ batchSize: this.maxBatch, inputLength: this.maxInputLength, ...want });
      this.reservations.made++;
    } catch (e) {
      if (e instanceof DisposedError) return;  // (the batch is answered for it)
      this.reservations.failed++;
      this.reservations.lastError = (e as Error).message;
    }
  }

  private async score(model: T5Model, batch: Pending[]): Promise<RankOneResult[]> {
    const r = await model.rankClassify(
      batch.map((p) => p.inputIds),
      batch.map((p) => p.choiceIds),
      { adapter: batch.map((p) => p.adapter), lengthNormalize: this.lengthNormalize, batchSize: batch.length });
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
