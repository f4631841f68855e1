// A small HTTP front end for RankBatcher (`tfew serve`): one model in memory, any number of named (IA)3 adapters,
// requests of different tasks scored together in mixed-task batches. Node's own http module; JSON in and out.
//
//   GET  /health     {"status":"ok","device":...,"adapters":[names],"stats":{...}}
//   POST /classify   {"input": "text" | [ids], "choices": ["a","b"] | [[ids]], "adapter"?: "name"}
//                    -> {"prediction": 1, "label": "b", "scores": [...], "logProbs": [...]}
//                    or {"requests": [ {...}, ... ]} -> {"results": [ {...} | {"error": {...}} ]} (each on its own)
// Errors: {"error": {"code": "E_...", "message": "..."}} with 400 (bad input, unknown adapter), 404 / 405 (route),
// 413 (body over maxBodyBytes), 429 (QueueFullError), 503 (closing), 500 (anything else).
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
  choices: string[] | number[][];
  adapter?: string;
}

class HttpError extends TfewError {
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
  private readonly maxBodyBytes: number;
  private readonly maxRequestsPerBody: number;
  private closing = false;

  /** `adapters`: name -> adapter (each checked against the model now, not at the first request). */
  constructor(private readonly model: T5Model, private readonly adapters: Map<string, IA3Adapter>, options: RankServerOptions = {}) {
    for (const [name, a] of adapters) {
      if (!(a instanceof IA3Adapter)) throw new InvalidArgumentError(`adapter "${name}" is not an IA3Adapter`);
      a.assertCompatible(model.config);
    }
    const { maxBodyBytes, maxRequestsPerBody, ...batcherOptions } = options;
    this.maxBodyBytes = maxBodyBytes ?? 1 << 20;
    this.maxRequestsPerBody = maxRequestsPerBody ?? 256;
    this.batcher = new RankBatcher(model, batcherOptions);
    this.server = http.createServer((req, res) => {
      this.handle(req, res).catch((e) => this.send(res, statusOf(e), errorBody(e)));
    });
  }

  /** Starts listening; resolves with the bound address (port 0 picks a free port). */
  listen(port: number, host = '127.0.0.1'): Promise<AddressInfo> {
    return new Promise((resolve, reject) => {
      this.server.once('error', reject);
      this.server.listen(port, host, () => {
        this.server.off('error', reject);
        resolve(this.server.address() as AddressInfo);
      });
    });
  }

  /** Stops taking connections and requests, answers the accepted ones, then resolves. The model stays loaded. */
  async close(): Promise<void> {
    this.closing = true;
    const closed = new Promise<void>((resolve) => this.server.close(() => resolve()));
    await this.batcher.close();
    this.server.closeIdleConnections?.();
    await closed;
  }

  async [asyncDispose](): Promise<void> {
    await this.close();
  }

  private async handle(req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
    const url = (req.url ?? '/').split('?')[0];
    if (url === '/health') {
      if (req.method !== 'GET') throw new HttpError(405, 'E_METHOD', 'use GET /health');
      this.send(res, this.closing ? 503 : 200, {
        status: this.closing ? 'closing' : 'ok', device: this.model.device, model: this.model.describe(),
        adapters: [...this.adapters.keys()], stats: this.batcher.stats, pending: this.batcher.pending,
      });
      return;
    }
    if (url !== '/classify') throw new HttpError(404, 'E_NOT_FOUND', `no route ${url}; use POST /classify or GET /health`);
    if (req.method !== 'POST') throw new HttpError(405, 'E_METHOD', 'use POST /classify');
    if (this.closing) throw new HttpError(503, 'E_CLOSING', 'the server is shutting down');
    const body = await this.readJson(req);
    if (body && typeof body === 'object' && Array.isArray((body as { requests?: unknown }).requests)) {
      const requests = (body as { requests: unknown[] }).requests;
      if (requests.length > this.maxRequestsPerBody) {
        throw new HttpError(413, 'E_TOO_LARGE', `${requests.length} requests in one body (at most ${this.maxRequestsPerBody})`);
      }
      // each request on its own: one bad request does not fail the others
      const results = await Promise.all(requests.map((r) => this.classify(r).catch((e: unknown) => errorBody(e))));
      this.send(res, 200, { results });
      return;
    }
    this.send(res, 200, await this.classify(body));
  }

  private async classify(raw: unknown): Promise<RankOneResult & { label?: string }> {
    const r = raw as ClassifyRequest;
    if (!r || typeof r !== 'object') throw new InvalidArgumentError('a request is an object {"input", "choices", "adapter"?}');
    let adapter: IA3Adapter | null = null;
    if (r.adapter !== undefined && r.adapter !== null) {
      if (typeof r.adapter !== 'string') throw new InvalidArgumentError('"adapter" must be the name of a loaded adapter');
      const found = this.adapters.get(r.adapter);
      if (!found) throw new HttpError(400, 'E_UNKNOWN_ADAPTER', `no adapter named "${r.adapter}" (loaded: ${[...this.adapters.keys()].join(', ') || 'none'})`);
      adapter = found;
    }
    const out = await this.batcher.classify(r.input, r.choices, { adapter });
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
    if (res.headersSent) return;
    const text = JSON.stringify(body);
    res.writeHead(status, { 'content-type': 'application/json; charset=utf-8', 'content-length': Buffer.byteLength(text) });
    res.end(text);
  }
}
