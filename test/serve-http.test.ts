// `tfew serve` / RankServer (lib/serve-http.ts): HTTP requests of different tasks scored in mixed-task batches.
// Answers must equal rankClassify with the named adapter; errors map to their HTTP statuses with typed codes;
// the CLI command loads named adapters, serves, and stops on SIGTERM after answering what it accepted.
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import * as http from 'http';
import * as net from 'net';
import { IA3Adapter, InvalidArgumentError, T5Model, TfewError } from '../lib';
import { main } from '../lib/cli/main';
import { RankServer } from '../lib/serve-http';
import { buildTinyT5 } from '../lib/tiny';
import { normalFrom, seededRandom } from '../lib/random';

const WORDS = ['great film loved it awful boring plot superb acting terrible waste of time yes no maybe positive negative review the a was'];

let dir: string;
let model: T5Model;
const adapters = new Map<string, IA3Adapter>();
const maxRel = (a: number[], b: number[]) => Math.max(...a.map((x, i) => Math.abs(x - b[i]) / Math.max(Math.abs(b[i]), 1e-6)));

beforeAll(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tfew-serve-http-'));
  buildTinyT5(path.join(dir, 'model'), { words: WORDS, gated: true, seed: 5, dModel: 48, dFf: 64, numHeads: 4, dKv: 12, numLayers: 2 });
  model = await T5Model.load(path.join(dir, 'model'), { device: 'cpu', threads: 2 });
  for (const [name, seed] of [['sentiment', 1], ['topic', 2]] as const) {
    const r = seededRandom(seed);
    const a = IA3Adapter.create(model);
    for (let i = 0; i < a.data.length; i++) a.data[i] = 1 + 0.3 * normalFrom(r);
    a.markChanged();
    adapters.set(name, a);
    await a.save(path.join(dir, 'adapters', name));
  }
});
afterAll(async () => {
  await model?.dispose();
  fs.rmSync(dir, { recursive: true, force: true });
});

// (a parsed JSON answer: the tests read its fields)
// eslint-disable-next-line @typescript-eslint/no-explicit-any
async function getJson(url: string): Promise<any> {
  return (await fetch(url)).json();
}

async function post(base: string, body: unknown, raw?: string): Promise<{ status: number; json: any }> {
  const res = await fetch(`${base}/classify`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: raw ?? JSON.stringify(body) });
  return { status: res.status, json: await res.json() };
}

describe('RankServer', () => {
  let server: RankServer;
  let base: string;
  beforeAll(async () => {
    server = new RankServer(model, adapters, { maxBatch: 8, maxDelayMs: 5, maxQueue: 64, maxBodyBytes: 4096 });
    const a = await server.listen(0);
    base = `http://127.0.0.1:${a.port}`;
  });
  afterAll(async () => server.close());

  test('/health reports the batching settings; grouping by length is on by default', async () => {
    const health = await getJson(`${base}/health`);
    expect(health.batching).toEqual({ maxBatch: 8, maxDelayMs: 5, maxQueue: 64, maxInputLength: expect.any(Number), groupByLength: true });
  });

  test('concurrent requests of two tasks and none: each answer equals rankClassify with that adapter, in shared batches', async () => {
    const reqs = [
      { input: 'the film was great', choices: ['positive', 'negative'], adapter: 'sentiment' },
      { input: 'awful boring plot', choices: ['yes', 'no', 'maybe'], adapter: 'topic' },
      { input: [5, 6, 7, 1], choices: [[8, 1], [9, 10, 1]] },
      { input: 'superb acting', choices: ['positive review', 'negative review'], adapter: 'sentiment' },
      { input: 'a terrible waste of time', choices: ['yes', 'no'], adapter: 'topic' },
    ];
    const before = server.batcher.stats.batches;
    const answers = await Promise.all(reqs.map((r) => post(base, r)));
    expect(server.batcher.stats.batches - before).toBeLessThan(reqs.length);
    for (let i = 0; i < reqs.length; i++) {
      const r = reqs[i];
      expect(answers[i].status).toBe(200);
      const want = await model.rankClassify([r.input] as string[], [r.choices] as string[][], { adapter: r.adapter ? adapters.get(r.adapter) : null });
      expect(answers[i].json.prediction).toBe(want.predictions[0]);
      expect(maxRel(answers[i].json.logProbs, want.logProbs[0])).toBeLessThan(1e-5);
      if (typeof r.choices[0] === 'string') expect(answers[i].json.label).toBe(r.choices[want.predictions[0]]);
    }
  });

  test('a body of several requests: each answered on its own, a bad one as an error entry', async () => {
    const { status, json } = await post(base, {
      requests: [
        { input: 'loved it', choices: ['yes', 'no'], adapter: 'sentiment' },
        { input: 'loved it', choices: ['yes', 'no'], adapter: 'nope' },
        { input: [5, 1000, 1], choices: [[4, 1]] },
      ],
    });
    expect(status).toBe(200);
    expect(json.results[0].scores).toHaveLength(2);
    expect(json.results[1].error.code).toBe('E_UNKNOWN_ADAPTER');
    expect(json.results[2].error.code).toBe('E_INVALID_ARGUMENT');
  });

  test('errors: statuses and typed codes', async () => {
    expect((await post(base, undefined, '{ not json')).json.error.code).toBe('E_INVALID_ARGUMENT');
    const unknown = await post(base, { input: 'x', choices: ['yes'], adapter: 'nope' });
    expect(unknown.status).toBe(400);
    expect(unknown.json.error.message).toMatch(/no adapter named "nope" \(loaded: sentiment, topic\)/);
    expect((await post(base, { input: 'x', choices: [] })).status).toBe(400);
    expect((await post(base, { input: [3, 99999, 1], choices: [[4, 1]] })).json.error.code).toBe('E_INVALID_ARGUMENT');
    const big = await post(base, { input: 'x '.repeat(5000), choices: ['yes'] });
    expect(big.status).toBe(413);
    expect(big.json.error.code).toBe('E_TOO_LARGE');
    expect((await fetch(`${base}/classify`)).status).toBe(405);
    expect((await fetch(`${base}/nowhere`)).status).toBe(404);
    const health = await getJson(`${base}/health`);
    expect(health).toMatchObject({ status: 'ok', device: 'cpu', adapters: ['sentiment', 'topic'] });
    expect(health.stats.requests).toBeGreaterThan(0);
    expect(health.graphs).toEqual({ enabled: false, offReason: '', buckets: false, replays: 0, captures: 0, eager: 0, captureFailures: 0, cached: 0, graphLimit: 0, arenaBytes: 0, arenaGrowths: 0, last: null });  // CPU
  });

  // Seeded random bodies: JSON values of every type in every field (nested, negative, fractional, huge, unicode,
  // missing), and valid bodies with bytes changed. Each answer is a result or a 4xx with a typed error code, never a
  // 500, a dropped connection or a hung request; the server answers a valid request after.
  test('random and damaged bodies: a result or a 4xx with a typed code, and the server goes on', async () => {
    const r = seededRandom(77);
    const pick = <T>(xs: T[]): T => xs[Math.floor(r() * xs.length)];
    const value = (depth: number): unknown => {
      const kind = Math.floor(r() * (depth > 2 ? 6 : 9));
      switch (kind) {
        case 0: return pick([0, 1, -1, 3, 1.5, 1e300, -0, 2 ** 53, 24, 25, NaN]);
        case 1: return pick(['', 'great film', 'é\u0000😀', 'x '.repeat(50), 'sentiment', 'topic', '1']);
        case 2: return pick([null, true, false]);
        case 3: return [];
        case 4: return {};
        case 5: return pick([[4, 1], [3, 99999, 1], [-2, 1], [0]]);
        default: {
          if (r() < 0.5) return Array.from({ length: Math.floor(r() * 4) }, () => value(depth + 1));
          const o: Record<string, unknown> = {};
          for (const k of ['input', 'choices', 'adapter', 'requests', 'lengthNormalize', 'id', 'extra']) if (r() < 0.5) o[k] = value(depth + 1);
          return o;
        }
      }
    };
    const valid = JSON.stringify({ requests: [{ input: 'great film', choices: ['yes', 'no'], adapter: 'sentiment' }, { input: [5, 6, 1], choices: [[4, 1], [7, 1]] }] });
    const statuses = new Map<number, number>();
    for (let k = 0; k < (Number(process.env.TFEW_FUZZ_CASES) || 150); k++) {
      let body: string;
      if (k % 3 === 2) {  // a valid body with a few bytes changed
        const b = Buffer.from(valid);
        for (let i = 0; i < 1 + Math.floor(r() * 4); i++) b[Math.floor(r() * b.length)] = pick([...Buffer.from('{}[]",:0123456789-.enull')]);
        body = b.toString('latin1');
      } else {
        const o: Record<string, unknown> = { input: value(1), choices: value(1) };
        if (r() < 0.3) o.adapter = value(2);
        if (r() < 0.2) o.lengthNormalize = value(2);
        body = JSON.stringify(k % 3 === 1 ? { requests: [o, value(1)] } : o);
      }
      const res = await post(base, undefined, body);
      statuses.set(res.status, (statuses.get(res.status) ?? 0) + 1);
      if (res.status === 200) {
        // one answer, or a list of answers each a result or a typed error
        for (const a of Array.isArray(res.json.results) ? res.json.results : [res.json]) {
          if (a.error) expect(a.error.code).toMatch(/^E_[A-Z_]+$/);
          else expect(a.scores.every((x: unknown) => typeof x === 'number')).toBe(true);
        }
      } else {
        expect([400, 413]).toContain(res.status);
        expect(res.json.error.code).toMatch(/^E_[A-Z_]+$/);
        expect(typeof res.json.error.message).toBe('string');
      }
    }
    expect(statuses.get(400)).toBeGreaterThan(0);
    expect(statuses.get(200)).toBeGreaterThan(0);
    const after = await post(base, undefined, valid);
    expect(after.status).toBe(200);
    expect(after.json.results).toHaveLength(2);
  });

  test('token ids beyond maxInputLength, a non-array "requests": 400 with the reason', async () => {
    const long = await post(base, { input: [...new Array(300).fill(5), 1], choices: [[4, 1]] });
    expect(long.status).toBe(400);
    expect(long.json.error.message).toMatch(/301 tokens; this batcher takes at most 256/);
    const bad = await post(base, { requests: 'x' });
    expect(bad.status).toBe(400);
    expect(bad.json.error.message).toMatch(/"requests" must be an array/);
  });

  test('a client that disconnects while its request waits takes it out of the queue', async () => {
    const slow = new RankServer(model, adapters, { maxDelayMs: 1500 });
    const a = await slow.listen(0);
    try {
      const req = http.request({ port: a.port, host: '127.0.0.1', method: 'POST', path: '/classify', headers: { 'content-type': 'application/json' } });
      req.on('error', () => undefined);
      req.end(JSON.stringify({ input: [5, 1], choices: [[4, 1]] }));
      for (let i = 0; i < 100 && slow.batcher.pending === 0; i++) await new Promise((r) => setTimeout(r, 5));
      expect(slow.batcher.pending).toBe(1);
      req.destroy();
      for (let i = 0; i < 100 && slow.batcher.pending === 1; i++) await new Promise((r) => setTimeout(r, 5));
      expect(slow.batcher.pending).toBe(0);
      await new Promise((r) => setTimeout(r, 1600));  // (past the batch it would have gone in)
      expect(slow.batcher.stats.batchedExamples).toBe(0);
    } finally {
      await slow.close();
    }
  });

  test('close() does not wait on a client that never finishes its request (grace period), and a second close() shares it', async () => {
    const s2 = new RankServer(model, adapters);
    const a = await s2.listen(0);
    const sock = net.connect(a.port, '127.0.0.1');
    sock.on('error', () => undefined);
    await new Promise<void>((r) => sock.once('connect', () => r()));
    sock.write('POST /classify HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{"inp');
    await new Promise((r) => setTimeout(r, 50));
    const t0 = Date.now();
    const first = s2.close(200);
    expect(s2.close()).toBe(first);
    await first;
    expect(Date.now() - t0).toBeLessThan(3000);
    sock.destroy();
    await expect(s2.listen(0)).rejects.toMatchObject({ code: 'E_LISTEN' });
  });

  test('close() while listen() is still binding closes the server it binds', async () => {
    const s4 = new RankServer(model, adapters);
    const bound = s4.listen(0);
    await s4.close();
    await bound.catch(() => undefined);
    expect(s4.server.listening).toBe(false);
    await expect(s4.close(Number.POSITIVE_INFINITY)).resolves.toBeUndefined();  // (closed already: same promise)
    await expect(new RankServer(model, adapters).close(-1)).rejects.toBeInstanceOf(InvalidArgumentError);
  });

  test('listening on a port in use: TfewError E_LISTEN', async () => {
    const other = new RankServer(model, adapters);
    const port = Number(new URL(base).port);
    const err = await other.listen(port).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(TfewError);
    expect(err).toMatchObject({ code: 'E_LISTEN' });
    await other.close();
  });

  test('options and adapters are checked when the server is made; /health says when the model is gone', async () => {
    expect(() => new RankServer(model, adapters, { maxBodyBytes: NaN })).toThrow(InvalidArgumentError);
    expect(() => new RankServer(model, adapters, { maxRequestsPerBody: 0 })).toThrow(InvalidArgumentError);
    expect(() => new RankServer(model, null as unknown as Map<string, IA3Adapter>)).toThrow(InvalidArgumentError);
    const own = await T5Model.load(path.join(dir, 'model'), { device: 'cpu', threads: 1 });
    const s3 = new RankServer(own, { sentiment: adapters.get('sentiment')! });  // a plain object of adapters
    const a = await s3.listen(0);
    try {
      const url = `http://127.0.0.1:${a.port}/health`;
      expect((await getJson(url)).adapters).toEqual(['sentiment']);
      await own.dispose();
      const res = await fetch(url);
      expect(res.status).toBe(503);
      expect(((await res.json()) as { status: string }).status).toBe('disposed');
      expect(() => new RankServer(own, adapters)).toThrow(InvalidArgumentError);
    } finally {
      await s3.close();
    }
  });

  test('an adapter that does not fit the model is refused when the server is made', () => {
    const foreign = IA3Adapter.create({ numLayers: 1, numDecoderLayers: 1, innerDim: 8, dFf: 8 });
    expect(() => new RankServer(model, new Map([['x', foreign]]))).toThrow(/does not fit the model/);
  });
});

describe('tfew serve', () => {
  test('loads named adapters (name=path and a directory of them), serves, and stops on SIGTERM', async () => {
    const lines: string[] = [];
    let started!: (line: string) => void;
    const ready = new Promise<string>((resolve) => { started = resolve; });
    const io = {
      out: (l: string) => { lines.push(l); if (l.startsWith('tfew serve:')) started(l); },
      err: (l: string) => lines.push(`ERR ${l}`),
      interactive: false,
    };
    const exit = main(['node', 'tfew', 'serve', '--model', path.join(dir, 'model'), '--device', 'cpu', '--threads', '1', '--port', '0',
      '--adapter', `s2=${path.join(dir, 'adapters', 'sentiment')}`, '--adapter', path.join(dir, 'adapters'), '--max-delay-ms', '1',
      '--warm-up', '2,3'], io);
    const line = await ready;
    expect(lines).toContain('ERR [tfew] --warm-up: nothing to warm on cpu (no CUDA graphs)');
    expect(line).toMatch(/adapters: s2, sentiment, topic/);
    const base = /http:\/\/[^ ]+/.exec(line)![0];
    const r = await post(base, { input: 'loved the acting', choices: ['positive', 'negative'], adapter: 's2' });
    expect(r.status).toBe(200);
    const want = await model.rankClassify(['loved the acting'], [['positive', 'negative']], { adapter: adapters.get('sentiment') });
    expect(maxRel(r.json.logProbs, want.logProbs[0])).toBeLessThan(1e-5);
    process.emit('SIGTERM');
    expect(await exit).toBe(0);
    expect(lines.some((l) => /stopped: .*"requests":1/.test(l))).toBe(true);
  });

  test('tfew serve --no-group-by-length --max-batch 4: the batcher takes them (/health batching)', async () => {
    const lines: string[] = [];
    let started!: (line: string) => void;
    const ready = new Promise<string>((resolve) => { started = resolve; });
    const io = { out: (l: string) => { lines.push(l); if (l.startsWith('tfew serve:')) started(l); }, err: (l: string) => lines.push(`ERR ${l}`), interactive: false };
    const serve = async (flags: string[]) => {
      const exit = main(['node', 'tfew', 'serve', '--model', path.join(dir, 'model'), '--device', 'cpu', '--threads', '1', '--port', '0',
        '--adapter', path.join(dir, 'adapters'), ...flags], io);
      const base = /http:\/\/[^ ]+/.exec(await ready)![0];
      const health = await getJson(`${base}/health`);
      process.emit('SIGTERM');
      expect(await exit).toBe(0);
      return health.batching;
    };
    expect(await serve(['--no-group-by-length', '--max-batch', '4'])).toMatchObject({ groupByLength: false, maxBatch: 4 });
  });

  test('replicas: one server over two copies of the model (as on two GPUs); /health reports each', async () => {
    const second = await T5Model.load(path.join(dir, 'model'), { device: 'cpu', threads: 1 });
    const two = new RankServer([model, second], adapters, { maxBatch: 2, maxDelayMs: 1 });
    try {
      const a = await two.listen(0);
      const url = `http://127.0.0.1:${a.port}`;
      const texts = ['loved the acting', 'boring plot', 'great film', 'awful waste', 'superb', 'terrible'];
      const answers = await Promise.all(texts.map((t) => post(url, { input: t, choices: ['positive', 'negative'], adapter: 'topic' })));
      for (let i = 0; i < texts.length; i++) {
        expect(answers[i].status).toBe(200);
        const want = await model.rankClassify([texts[i]], [['positive', 'negative']], { adapter: adapters.get('topic') });
        expect(maxRel(answers[i].json.logProbs, want.logProbs[0])).toBeLessThan(1e-5);
      }
      const health = await getJson(`${url}/health`);
      expect(health.replicas).toHaveLength(2);
      expect(health.stats.replicas.map((r: { batches: number }) => r.batches).reduce((x: number, y: number) => x + y)).toBe(health.stats.batches);
    } finally {
      await two.close();
      await second.dispose();
    }
    expect(() => new RankServer([], adapters)).toThrow(InvalidArgumentError);
  });

  test('tfew serve --cuda-devices: checked before loading', async () => {
    const lines: string[] = [];
    const io = { out: (l: string) => lines.push(l), err: (l: string) => lines.push(`ERR ${l}`), interactive: false };
    const serve = (...flags: string[]) => main(['node', 'tfew', 'serve', '--model', path.join(dir, 'model'), '--port', '0', ...flags], io);
    expect(await serve('--device', 'cpu', '--cuda-devices', '0,1')).toBe(1);
    expect(await serve('--cuda-devices', '0', '--cuda-device', '1')).toBe(1);
    expect(await serve('--cuda-devices', '0,x')).toBe(1);
    expect(await serve('--cuda-devices', '1,1')).toBe(1);
    expect(lines).toEqual([
      'ERR tfew: --cuda-devices needs --device cuda or auto [E_INVALID_ARGUMENT]',
      'ERR tfew: --cuda-devices and --cuda-device exclude each other [E_INVALID_ARGUMENT]',
      'ERR tfew: --cuda-devices takes GPU indices (e.g. 0,1) or "all"; got "0,x" [E_INVALID_ARGUMENT]',
      'ERR tfew: --cuda-devices "1,1" names a GPU twice [E_INVALID_ARGUMENT]',
    ]);
  });

  test('tfew serve --warm-up with something other than token counts: refused before loading', async () => {
    const lines: string[] = [];
    const io = { out: (l: string) => lines.push(l), err: (l: string) => lines.push(`ERR ${l}`), interactive: false };
    const code = await main(['node', 'tfew', 'serve', '--model', path.join(dir, 'model'), '--device', 'cpu', '--port', '0',
      '--warm-up', '2,x'], io);
    expect(code).not.toBe(0);
    expect(lines.join('\n')).toMatch(/--warm-up takes the token counts of a task's choices, e\.g\. 2,2; got "2,x"/);
  });
});
