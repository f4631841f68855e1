// A small HTTP front end for RankBatcher (`tfew serve`): one model in memory (or a replica of it on each of several
// GPUs), any number of named (IA)3 adapters, requests of different tasks scored together in mixed-task batches.
// Node's own http module; JSON in and out.
//
//   GET  /health     {"status":"ok","device":...,"adapters":[names],"batching":{...},"stats":{...},"graphs":{...},"replicas":[...]}
//                    (503 once stopping or disposed; graphs: the first replica's T5Model.graphStats(), null once
//                    disposed; replicas: each one's describe() and graphStats())
//   POST /classify   {"input": "text" | [ids], "choices": ["a","b"] | [[ids]], "adapter"?: "name"}
//                    -> {"prediction": 1, "label": "b", "scores": [...], "logProbs": [...]}
//                    or {"requests": [ {...}, ... ]} -> {"results": [ {...} | {"error": {...}} ]} (each on its own)
// Errors: {"error": {"code": "E_...", "message": "..."}} with 400 (bad input, unknown adapter), 404 / 405 (route),
// 413 (body over maxBodyBytes, too many requests in one body), 429 (queue full), 503 (stopping), 500 (other).
// A client that disconnects takes its waiting requests out of the queue.
import { setMaxListeners } from 'events';
import * as http from 'http';
import type { AddressInfo } from 'net';
import { IA3Adapter } from './adapter';
import { asyncDispose } from './disposable';
import { InvalidAdapterError, InvalidArgumentError, TfewError } from './errors';
import type { T5Model } from './model';
import { QueueFullError, RankBatcher, RankBatcherOptions, RankOneResult } from './serve';

export interface RankServerOptions extends RankBatcherOptions {
  /** Largest request body accepted, in bytes. Default 1 MiB. */
  maxBodyBytes?: number;
  /** Most requests in one {"requests": [...]} body. Default 256. */
  maxRequestsPerBody?: number;
}

interface ClassifyRequest {
  input: string | number[];
  choices: (string | number[])[];
  adapter?: string;
}

/** An HTTP-level failure: its status and code go to the client. */
export class HttpError extends TfewError {
  constructor(readonly status: number, code: string, message: string) {
    super(code, message);
  }
}

function statusOf(e: unknown): number {
  if (e instanceof HttpError) return e.status;
  if (e instanceof QueueFullError) return 429;
  if (e instanceof InvalidArgumentError || e instanceof InvalidAdapterError) return 400;
  if (e instanceof TfewError && e.code === 'E_DISPOSED') return 503;
  return 500;
}

function errorBody(e: unknown): { error: { code: string; message: string } } {
  const code = e instanceof TfewError ? e.code : 'E_INTERNAL';
  return { error: { code, message: (e as Error)?.message ?? String(e) } };
}

export class RankServer {
  readonly batcher: RankBatcher;
  readonly server: http.Server;
  private readonly adapters: Map<string, IA3Adapter>;
  private readonly maxBodyBytes: number;
  private readonly maxRequestsPerBody: number;
  private closing = false;
  private closed: Promise<void> | undefined;
  private binding: Promise<void> | undefined;  // a listen() in progress (settles, never rejects)

  private readonly models: T5Model[];

  /**
   * `model`: one model, or replicas of one (the same checkpoint on several GPUs; RankBatcher runs batches on all).
   * `adapters`: name -> adapter, a Map or a plain object (each checked against the model now, not at the first request).
   */
  constructor(model: T5Model | readonly T5Model[], adapters: Map<string, IA3Adapter> | Record<string, IA3Adapter> = new Map(),
              options: RankServerOptions = {}) {
    const models = Array.isArray(model) ? [...model] as T5Model[] : [model as T5Model];
    if (models.length === 0 || models.some((m) => !m || typeof m.rankClassify !== 'function')) {
      throw new InvalidArgumentError('RankServer needs a T5Model, or a non-empty array of replicas of one');
    }
    if (models.some((m) => m.disposed)) throw new InvalidArgumentError('RankServer needs a model that has not been disposed');
    this.models = models;
    if (adapters === null || typeof adapters !== 'object') throw new InvalidArgumentError('adapters must be a Map or an object of name -> IA3Adapter');
    this.adapters = adapters instanceof Map ? new Map(adapters) : new Map(Object.entries(adapters));
    for (const [name, a] of this.adapters) {
      if (!(a instanceof IA3Adapter)) throw new InvalidArgumentError(`adapter "${name}" is not an IA3Adapter`);
      a.assertCompatible(models[0].config);
    }
    if (options === null || typeof options !== 'object') throw new InvalidArgumentError('RankServer options must be an object');
    const { maxBodyBytes, maxRequestsPerBody, ...batcherOptions } = options;
    const positive = (name: string, v: number | undefined, dflt: number): number => {
      const x = v ?? dflt;
      if (!Number.isInteger(x) || x < 1) throw new InvalidArgumentError(`${name} must be an integer >= 1, got ${String(v)}`);
      return x;
    };
    this.maxBodyBytes = positive('maxBodyBytes', maxBodyBytes, 1 << 20);
    this.maxRequestsPerBody = positive('maxRequestsPerBody', maxRequestsPerBody, 256);
    // (a batch carries at most as many distinct adapters as the server has: the memory reserved for them)
    this.batcher = new RankBatcher(models, { ...batcherOptions, maxAdapters: batcherOptions.maxAdapters ?? Math.max(1, this.adapters.size) });
    this.server = http.createServer((req, res) => {
      this.handle(req, res).catch((e) => this.send(res, statusOf(e), errorBody(e)));
    });
  }

  /** Starts listening; resolves with the bound address (port 0 picks a free port). Fails with E_LISTEN. */
  listen(port: number, host = '127.0.0.1'): Promise<AddressInfo> {
    const error = (why: string) => new TfewError('E_LISTEN', `cannot listen on ${String(host)}:${port}: ${why}`);
    if (!Number.isInteger(port) || port < 0 || port > 65535) return Promise.reject(error('the port must be an integer in [0, 65535]'));
    if (typeof host !== 'string') return Promise.reject(error('the host must be a string'));
    if (this.server.listening || this.binding || this.closing) {
      return Promise.reject(error(this.closing ? 'the server was closed' : 'already listening'));
    }
    const bound = new Promise<AddressInfo>((resolve, reject) => {
      const fail = (e: Error) => reject(error(e.message));
      this.server.once('error', fail);
      this.server.listen(port, host, () => {
        this.server.off('error', fail);
        resolve(this.server.address() as AddressInfo);
      });
    });
    const settled = bound.then(() => undefined, () => undefined);  // (the caller handles the rejection)
    this.binding = settled;
    void settled.then(() => {
      if (this.binding === settled) this.binding = undefined;
    });
    return bound;
  }

  /**
   * Stops taking connections and requests, answers the accepted ones, then resolves (the model stays loaded).
   * Connections still open `graceMs` after the answers (a client that never finishes its request) are cut.
   * Calling it again returns the same promise.
   */
  close(graceMs = 10_000): Promise<void> {
    if (this.closed) return this.closed;
    if (typeof graceMs !== 'number' || !(graceMs >= 0 && graceMs <= 2 ** 31 - 1)) {
      return Promise.reject(new InvalidArgumentError(`graceMs must be a number in [0, ${2 ** 31 - 1}], got ${String(graceMs)}`));
    }
    this.closing = true;
    this.closed = (async () => {
      await this.binding;  // (a listen() still binding: let it finish, then close it)
      const serverClosed = this.server.listening ? new Promise<void>((resolve) => this.server.close(() => resolve())) : Promise.resolve();
      this.server.closeIdleConnections();
      await this.batcher.close();
      this.server.closeIdleConnections();
      const cut = setTimeout(() => this.server.closeAllConnections(), graceMs);
      try {
        await serverClosed;
      } finally {
        clearTimeout(cut);
      }
    })();
    return this.closed;
  }

  /**
   * Cuts every connection at once (a second Ctrl-C): requests already in a running batch are scored and their
   * answers dropped, waiting ones leave the queue with their connections. Starts close() if it has not begun.
   */
  closeNow(): void {
    void this.close(0).catch(() => undefined);
    this.server.closeAllConnections();
  }

  async [asyncDispose](): Promise<void> {
    await this.close();
  }

  private async handle(req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
    const url = (req.url ?? '/').split('?')[0];
    if (url === '/health') {
      if (req.method !== 'GET' && req.method !== 'HEAD') throw new HttpError(405, 'E_METHOD', 'use GET /health');
      const first = this.models.find((m) => !m.disposed) ?? this.models[0];  // (the first replica still loaded)
      const status = first.disposed ? 'disposed' : this.closing ? 'closing' : 'ok';
      this.send(res, status === 'ok' ? 200 : 503, {
        status, device: first.device, model: first.describe(),
        adapters: [...this.adapters.keys()], batching: this.batcher.settings, stats: this.batcher.stats, pending: this.batcher.pending,
        // CUDA: how many batches replayed a graph (a low share: launch-bound batches of ever new shapes)
        graphs: first.disposed ? null : first.graphStats(),
        replicas: this.models.map((m) => ({ model: m.describe(), gpu: m.gpuIndex, disposed: m.disposed, graphs: m.disposed ? null : m.graphStats() })),
      });
      return;
    }
    if (url !== '/classify') throw new HttpError(404, 'E_NOT_FOUND', `no route ${url}; use POST /classify or GET /health`);
    if (req.method !== 'POST') throw new HttpError(405, 'E_METHOD', 'use POST /classify');
    if (this.closing) throw new HttpError(503, 'E_CLOSING', 'the server is shutting down');
    const body = await this.readJson(req);
    if (this.closing) throw new HttpError(503, 'E_CLOSING', 'the server is shutting down');
    // A client that goes away before its answer takes its waiting requests out of the queue.
    const gone = new AbortController();
    setMaxListeners(this.maxRequestsPerBody + 1, gone.signal);  // (one listener per request of the body)
    res.on('close', () => {
      if (!res.writableFinished) gone.abort();
    });
    if (body !== null && typeof body === 'object' && !Array.isArray(body) && 'requests' in body) {
      const requests = (body as { requests: unknown }).requests;
      if (!Array.isArray(requests)) throw new InvalidArgumentError('"requests" must be an array of requests');
      if (requests.length > this.maxRequestsPerBody) {
        throw new HttpError(413, 'E_TOO_LARGE', `${requests.length} requests in one body (at most ${this.maxRequestsPerBody})`);
      }
      // each request on its own: one bad request does not fail the others
      const results = await Promise.all(requests.map((r) => this.classify(r, gone.signal).catch((e: unknown) => errorBody(e))));
      this.send(res, 200, { results });
      return;
    }
    this.send(res, 200, await this.classify(body, gone.signal));
  }

  private async classify(raw: unknown, signal: AbortSignal): Promise<RankOneResult & { label?: string }> {
    if (raw === null || typeof raw !== 'object' || Array.isArray(raw)) {
      throw new InvalidArgumentError('a request is an object {"input", "choices", "adapter"?}');
    }
    const r = raw as ClassifyRequest;
    let adapter: IA3Adapter | null = null;
    if (r.adapter !== undefined && r.adapter !== null) {
      if (typeof r.adapter !== 'string') throw new InvalidArgumentError('"adapter" must be the name of a loaded adapter');
      const found = this.adapters.get(r.adapter);
      if (!found) throw new HttpError(400, 'E_UNKNOWN_ADAPTER', `no adapter named "${r.adapter}" (loaded: ${[...this.adapters.keys()].join(', ') || 'none'})`);
      adapter = found;
    }
    const out = await this.batcher.classify(r.input, r.choices, { adapter, signal });
    const label = Array.isArray(r.choices) && typeof r.choices[out.prediction] === 'string' ? (r.choices[out.prediction] as string) : undefined;
    return label === undefined ? out : { ...out, label };
  }

  private readJson(req: http.IncomingMessage): Promise<unknown> {
    return new Promise((resolve, reject) => {
      const chunks: Buffer[] = [];
      let size = 0;
      let failed = false;
      req.on('data', (c: Buffer) => {
        size += c.length;
        if (size > this.maxBodyBytes && !failed) {
          failed = true;
          reject(new HttpError(413, 'E_TOO_LARGE', `request body over ${this.maxBodyBytes} bytes`));
          req.resume();  // drain the rest; the answer goes out once the body is read
        } else if (!failed) {
          chunks.push(c);
        }
      });
      req.on('end', () => {
        if (failed) return;
        try {
          resolve(JSON.parse(Buffer.concat(chunks).toString('utf8')));
        } catch (e) {
          reject(new InvalidArgumentError(`the body is not JSON: ${(e as Error).message}`));
        }
      });
      req.on('error', reject);
    });
  }

  private send(res: http.ServerResponse, status: number, body: unknown): void {
    if (res.headersSent || res.destroyed) return;
    const text = JSON.stringify(body);
    const headers: http.OutgoingHttpHeaders = { 'content-type': 'application/json; charset=utf-8', 'content-length': Buffer.byteLength(text) };
    if (status === 405) headers.allow = (res.req?.url ?? '').startsWith('/health') ? 'GET, HEAD' : 'POST';
    if (this.closing) headers.connection = 'close';  // no keep-alive while stopping: close() need not wait it out
    res.writeHead(status, headers);
    res.end(res.req?.method === 'HEAD' ? undefined : text);
  }
}
