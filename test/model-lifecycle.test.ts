// The model's lifecycle and misuse from plain JavaScript: dispose() lets the calls made before it finish,
// merged adapters compose, and wrong arguments, unwritable adapter paths and the Trainer's saveTo give typed
// errors (the last before any training step).
import { spawnSync } from 'child_process';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { AbortError, DisposedError, FileFormatError, graphBucketLengths, IA3Adapter, InvalidArgumentError, T5Model, Trainer } from '../lib';
import { checkAdapterSnapshots } from './helpers/adapter-snapshots';
import { loadFixture } from './helpers/reference';
import { t0_3bConfigJson } from '../benchmarks/random-t5';
import { parseT5Config } from '../lib/config';
import { native } from '../lib/native';
import { buildTinyT5 } from '../lib/tiny';

const fx = loadFixture('tiny-gated-gelu-untied');
const inputs = [[5, 6, 7, 8, 1], [9, 10, 1], [11, 12, 13, 1], [14, 1]];
const choices = [[[4, 1], [5, 6, 1]], [[7, 1], [8, 1], [9, 1]], [[10, 1], [11, 1]], [[12, 1], [13, 14, 1]]];
const maxRel = (a: number[], b: number[]) => Math.max(...a.map((x, i) => Math.abs(x - b[i]) / Math.max(Math.abs(b[i]), 1e-6)));

let tmp: string;
let a: IA3Adapter;
let b: IA3Adapter;
beforeAll(async () => {
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tfew-lifecycle-'));
  a = await IA3Adapter.load(path.join(fx.dir, 'adapter_a'));
  b = await IA3Adapter.load(path.join(fx.dir, 'adapter_b'));
});
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

// The CPU backend keeps freed large buffers for the next call (cuda/cpu/scratch.h): reused memory must not change
// a result, the cache must not grow call after call of one shape, and dispose() must give it all back.
describe('the CPU backend\'s buffer cache', () => {
  test('calls on reused buffers give the results of fresh ones; dispose() empties the cache', async () => {
    const cached = () => (native()._testing as unknown as { cpuScratchCachedBytes(): number }).cpuScratchCachedBytes();
    const dir = fs.mkdtempSync(path.join(tmp, 'scratch-'));
    buildTinyT5(dir, { words: ['alpha', 'beta', 'gamma'], dModel: 128, dFf: 512, numLayers: 2, numHeads: 4, dKv: 32, seed: 5 });
    const m = await T5Model.load(dir, { device: 'cpu', threads: 2 });
    try {
      // 3 x 300 tokens: activations of 300 x 512 floats and attention rows of 300 x 300, above the cache's 256 KiB
      const ids = (n: number, k: number) => [...Array.from({ length: n - 1 }, (_, i) => 2 + ((i * 7 + k) % 4)), 1];  // (a vocabulary of 6)
      const batch = { inputIds: [ids(300, 1), ids(280, 2), ids(300, 3)], choices: [[ids(3, 1), ids(4, 2)], [ids(2, 3), ids(5, 4)], [ids(3, 5), ids(3, 6)]], labels: [0, 1, 0] };
      const adapter = IA3Adapter.create(m, 1.1);
      const first = await m.lossAndGradients(batch, { adapter, dropout: true, seed: 3 });
      const afterFirst = cached();
      expect(afterFirst).toBeGreaterThan(1 << 20);
      const scoresFresh = await m.rankClassify(batch.inputIds, batch.choices);
      const second = await m.lossAndGradients(batch, { adapter, dropout: true, seed: 3 });
      expect(second.totalLoss).toBe(first.totalLoss);
      expect(Array.from(second.adapterGradients.get(adapter)!)).toEqual(Array.from(first.adapterGradients.get(adapter)!));
      expect(cached()).toBe(afterFirst);  // the same shapes: the same blocks again, nothing more kept
      expect((await m.rankClassify(batch.inputIds, batch.choices)).scores).toEqual(scoresFresh.scores);
      // then smaller calls only: the large call's blocks go back to the system after two calls that did not use them
      const small = { inputIds: [ids(90, 1), ids(80, 2)], choices: [[ids(3, 1), ids(4, 2)], [ids(2, 3), ids(5, 4)]], labels: [0, 1] };
      const kept: number[] = [];
      for (let k = 0; k < 4; k++) {
        await m.lossAndGradients(small, { adapter });
        kept.push(cached());
      }
      expect(kept[3]).toBeLessThan(afterFirst / 4);
      expect(kept[3]).toBe(kept[2]);  // (the small calls' own blocks, reused)
    } finally {
      await m.dispose();
    }
    expect(cached()).toBe(0);
  });

  // Out of memory for a fresh block (cuda/cpu/scratch.cc fresh_block; failures injected by
  // _testing.cpuScratchFailFreshBlocks, which returns how many were still pending): the cache's idle blocks go back to
  // the system and the request is tried once more; a second failure is E_OUT_OF_MEMORY for that call alone, and the
  // model goes on working. Each injected call is of a size no cached block fits (a block serves requests of 4/5 of
  // its size and more), so that it asks the system for fresh blocks.
  test('out of memory for a fresh block: the cache is emptied and the block tried again; else a typed error, the model intact', async () => {
    const hooks = native()._testing as unknown as { cpuScratchCachedBytes(): number; cpuScratchFailFreshBlocks(n: number): number };
    const dir = fs.mkdtempSync(path.join(tmp, 'scratch-oom-'));
    buildTinyT5(dir, { words: ['alpha', 'beta', 'gamma'], dModel: 128, dFf: 512, numLayers: 2, numHeads: 4, dKv: 32, seed: 6 });
    const ids = (n: number, k: number) => [...Array.from({ length: n - 1 }, (_, i) => 2 + ((i * 7 + k) % 4)), 1];
    const call = (m: T5Model, lengths: number[]) =>
      m.rankClassify(lengths.map((n, k) => ids(n, k)), lengths.map((_, k) => [ids(3, k), ids(4, k + 1)]));
    const [smallCall, largeCall, largerCall] = [[160], [300, 290], [500, 480, 470]];  // (160 x d_ff 512 floats: a cached block)
    const reference = await T5Model.load(dir, { device: 'cpu', threads: 2 });
    const [wantLarge, wantLarger] = [(await call(reference, largeCall)).scores, (await call(reference, largerCall)).scores];
    await reference.dispose();  // (the last CPU engine: the cache is emptied)
    expect(hooks.cpuScratchCachedBytes()).toBe(0);
    const m = await T5Model.load(dir, { device: 'cpu', threads: 2 });
    try {
      await call(m, smallCall);
      expect(hooks.cpuScratchCachedBytes()).toBeGreaterThan(0);  // small blocks wait
      hooks.cpuScratchFailFreshBlocks(1);
      expect((await call(m, largeCall)).scores).toEqual(wantLarge);
      expect(hooks.cpuScratchFailFreshBlocks(0)).toBe(0);  // the failure happened (and the retry after emptying worked)
      hooks.cpuScratchFailFreshBlocks(2);
      await expect(call(m, largerCall)).rejects.toMatchObject({ code: 'E_OUT_OF_MEMORY' });
      expect(hooks.cpuScratchFailFreshBlocks(0)).toBe(0);
      expect((await call(m, largerCall)).scores).toEqual(wantLarger);
      expect((await call(m, largeCall)).scores).toEqual(wantLarge);
    } finally {
      hooks.cpuScratchFailFreshBlocks(0);
      await m.dispose();
    }
  });

  test('TFEW_CPU_BUFFER_CACHE_MB=0 turns the cache off', () => {
    const script = `const { T5Model, IA3Adapter } = require(${JSON.stringify(path.join(__dirname, '..', 'dist', 'lib'))});
      const { native } = require(${JSON.stringify(path.join(__dirname, '..', 'dist', 'lib', 'native'))});
      (async () => {
        const m = await T5Model.load(${JSON.stringify(fx.dir)}, { device: 'cpu', threads: 1 });
        const ids = Array.from({ length: 299 }, (_, i) => 5 + (i % 20)).concat([1]);
        await m.rankClassify([ids, ids], [[[4, 1], [5, 1]], [[6, 1], [7, 1]]]);
        console.log(native()._testing.cpuScratchCachedBytes());
        await m.dispose();
      })();`;
    const run = (mb: string | undefined) => {
      const env = { ...process.env };
      if (mb === undefined) delete env.TFEW_CPU_BUFFER_CACHE_MB; else env.TFEW_CPU_BUFFER_CACHE_MB = mb;
      const r = spawnSync(process.execPath, ['-e', script], { env, encoding: 'utf8' });
      expect(r.stderr).toBe('');
      return Number(r.stdout.trim());
    };
    expect(run(undefined)).toBeGreaterThan(0);
    expect(run('0')).toBe(0);
  });
});

describe('dispose()', () => {
  test('calls made before dispose() complete (several chunks each); calls after it reject with DisposedError', async () => {
    const ref = await T5Model.load(fx.dir, { device: 'cpu', threads: 1 });
    const want = await ref.rankClassify(inputs, choices, { adapter: a });
    const wantEncoded = await ref.encode(inputs);
    await ref.dispose();

    const m = await T5Model.load(fx.dir, { device: 'cpu', threads: 1 });
    const p1 = m.rankClassify(inputs, choices, { adapter: a, batchSize: 1 });  // four native calls in turn
    const p2 = m.rankClassify(inputs, choices, { adapter: a, batchSize: 3 });
    const p3 = m.encode(inputs);
    const disposed = m.dispose();
    const late = m.rankClassify(inputs, choices);
    await expect(late).rejects.toBeInstanceOf(DisposedError);
    const [r1, r2, r3] = await Promise.all([p1, p2, p3]);
    expect(maxRel(r1.logProbs.flat(), want.logProbs.flat())).toBeLessThan(1e-5);
    expect(maxRel(r2.logProbs.flat(), want.logProbs.flat())).toBeLessThan(1e-5);
    expect(r3).toHaveLength(4);
    r3.forEach((e, i) => expect(Array.from(e)).toEqual(Array.from(wantEncoded[i])));  // (weights still live as it ran)
    await disposed;
    expect(m.disposed).toBe(true);
    await m.dispose();  // twice: nothing happens
  });
});

describe('warmUpGraphs() and graphBucketLengths()', () => {
  test('the CPU backend has no graphs to warm: no call is made; bad shapes are refused', async () => {
    const m = await T5Model.load(fx.dir, { device: 'cpu', threads: 1 });
    try {
      expect(await m.warmUpGraphs([{ inputLength: 40, choiceLengths: [2, 3] }])).toBe(0);
      // at most 64 graphs are kept: more distinct shapes are refused (the same shape twice counts once)
      const many = Array.from({ length: 65 }, (_, i) => ({ inputLength: i + 1, choiceLengths: [2] }));
      await expect(m.warmUpGraphs(many)).rejects.toThrow(/65 distinct shapes, but at most 64/);
      expect(await m.warmUpGraphs([...many.slice(0, 64), many[0]])).toBe(0);
      for (const bad of [[{ inputLength: 0, choiceLengths: [2] }], [{ inputLength: 4, choiceLengths: [] }],
        [{ inputLength: 4, choiceLengths: [2], batchSize: 0 }], [{ inputLength: 4, choiceLengths: [2], adapter: 1 }], 'x',
        [{ inputLength: 8, choiceLengths: [2], batchSize: 1e9 }], [{ inputLength: 1e7, choiceLengths: [2] }]]) {
        await expect(m.warmUpGraphs(bad as never)).rejects.toBeInstanceOf(InvalidArgumentError);
      }
    } finally {
      await m.dispose();
    }
    await expect(m.warmUpGraphs([])).rejects.toBeInstanceOf(DisposedError);
  });

  test('graphBucketLengths: one length per bucket, the last one the maximum', () => {
    expect(graphBucketLengths(20)).toEqual([8, 16, 20]);
    expect(graphBucketLengths(64)).toEqual([8, 16, 24, 32, 40, 48, 56, 64]);
    const to512 = graphBucketLengths(512);
    expect(to512).toHaveLength(32);  // 8 per doubling above 64
    expect(to512.slice(-9)).toEqual([256, 288, 320, 352, 384, 416, 448, 480, 512]);
    // at most 12.5% padding above 64: each bucket ends within 1/8 of where it starts
    for (let i = 8; i < to512.length; i++) expect(to512[i] / (to512[i - 1] + 1)).toBeLessThanOrEqual(1.125);
    expect(() => graphBucketLengths(0)).toThrow(InvalidArgumentError);
  });

  test("graphBucketLengths for a model's single requests: only the lengths that run padded", () => {
    // T0-3B: 2 x 24 layers x (4 d inner + 3 d ff) GEMM FLOPs per encoder token; padded calls do at most 2.5 TFLOP
    const t0 = parseT5Config(t0_3bConfigJson(24), 'config.json');
    const inner = t0.numHeads * t0.dKv;
    const perToken = 2 * t0.numLayers * (4 * t0.dModel * inner + 3 * t0.dModel * t0.dFf);
    const all = graphBucketLengths(4096);
    const padded = all.filter((b) => b * perToken <= 2.5e12);
    expect(padded[padded.length - 1]).toBe(1024);  // (about 1,000 tokens of T0-3B)
    expect(graphBucketLengths(2048, { config: t0, choiceLengths: [2, 2] })).toEqual(padded);
    expect(graphBucketLengths(300, { config: t0, choiceLengths: [2, 2] })).toEqual(graphBucketLengths(300));
    // a tiny model: at most 4096 encoder tokens; 128 choices of 8 tokens are more than 512 decoder tokens: none
    const tiny = parseT5Config(JSON.parse(fs.readFileSync(path.join(fx.dir, 'config.json'), 'utf8')), 'config.json');
    expect(graphBucketLengths(5000, { config: tiny, choiceLengths: [3, 3] }).slice(-1)).toEqual([4096]);
    expect(graphBucketLengths(256, { config: t0, choiceLengths: new Array(128).fill(8) })).toEqual([]);
    expect(() => graphBucketLengths(256, { config: t0, choiceLengths: [] })).toThrow(InvalidArgumentError);
    expect(() => graphBucketLengths(256, { config: t0, choiceLengths: [2 ** 21] })).toThrow(InvalidArgumentError);
    expect(() => graphBucketLengths(256, null as never)).toThrow(InvalidArgumentError);
    expect(() => graphBucketLengths(256, { config: {} as never, choiceLengths: [2] })).toThrow(InvalidArgumentError);
    expect(() => graphBucketLengths(2 ** 21)).toThrow(InvalidArgumentError);
  });
});

describe('graphStats()', () => {
  test('the CPU backend has no graphs (all zero); a disposed model throws DisposedError', async () => {
    const m = await T5Model.load(fx.dir, { device: 'cpu', threads: 1 });
    await m.rankClassify(inputs, choices);
    expect(m.graphStats()).toEqual({ enabled: false, offReason: '', buckets: false, replays: 0, captures: 0, eager: 0, captureFailures: 0, cached: 0, graphLimit: 0,
      arenaBytes: 0, arenaGrowths: 0, last: null });
    await m.dispose();
    expect(() => m.graphStats()).toThrow(DisposedError);
  });
});

describe('cuda.reserve and reserveMemory()', () => {
  const shape = { batchSize: 4, inputLength: 64, choices: 2, choiceLength: 4 };
  test('the CPU backend checks the shapes and holds nothing; the model works as before', async () => {
    const m = await T5Model.load(fx.dir, { device: 'cpu', threads: 1, cuda: { reserve: [shape, { ...shape, training: true, recompute: 'attention', adapters: 3 }] } });
    try {
      expect(await m.reserveMemory(shape)).toBe(0);
      expect(await m.reserveMemory({ batchSize: 2, inputLength: 8, choices: 0 })).toBe(0);  // encode() only
      expect(m.graphStats()).toMatchObject({ arenaBytes: 0, arenaGrowths: 0 });
      const r = await m.rankClassify(inputs, choices);
      expect(r.predictions).toHaveLength(inputs.length);
    } finally {
      await m.dispose();
    }
    await expect(m.reserveMemory(shape)).rejects.toThrow(DisposedError);
  });

  test.each([
    [{ ...shape, batchSize: 0 }, /batchSize must be an integer/],
    [{ ...shape, inputLength: 1.5 }, /inputLength must be an integer/],
    [{ ...shape, choices: -1 }, /choices must be an integer/],
    [{ ...shape, choiceLength: 0 }, /choiceLength must be an integer in \[1,/],
    [{ batchSize: 1, inputLength: 8, choices: 2 }, /choiceLength must be an integer in \[1, .*got undefined/],
    [{ ...shape, adapters: 70000 }, /adapters must be an integer/],
    [{ ...shape, training: true, choices: 0 }, /choices must be an integer in \[1,/],
    [{ ...shape, recompute: 'all' }, /recompute applies to training shapes only/],
    [{ ...shape, training: true, recompute: 'some' }, /^(reserveMemory|cuda\.reserve)\.recompute must be/],
    [{ ...shape, training: 'yes' }, /training must be a boolean/],
    [{ ...shape, adapter: 8 }, /unknown field 'adapter'/],
    [{ ...shape, batchSize: '32' }, /batchSize must be an integer in \[1, \d+\], got "32"/],
    [{ ...shape, batchSize: 8192, inputLength: 4096 }, /more than 16777216 input or choice tokens/],
    [[], /1 to 64 shapes/],
    [null, /must be an object/],
  ])('bad shape %j: InvalidArgumentError at load, before anything loads, and from reserveMemory', async (bad, message) => {
    const load = T5Model.load(fx.dir, { device: 'cpu', threads: 1, cuda: { reserve: bad as never } });
    await expect(load).rejects.toThrow(InvalidArgumentError);
    await expect(T5Model.load(fx.dir, { device: 'cpu', threads: 1, cuda: { reserve: bad as never } })).rejects.toThrow(message);
    const m = await T5Model.load(fx.dir, { device: 'cpu', threads: 1 });
    try {
      await expect(m.reserveMemory(bad as never)).rejects.toThrow(message);
    } finally {
      await m.dispose();
    }
  });
});

describe('dispose() twice, and a training session', () => {
  test('a second dispose() resolves only once the first has freed the model', async () => {
    const m = await T5Model.load(fx.dir, { device: 'cpu', threads: 1 });
    const order: string[] = [];
    const running = m.rankClassify(inputs, choices, { batchSize: 1 }).then(() => order.push('call'));
    const first = m.dispose().then(() => order.push('first dispose'));
    const second = m.dispose().then(() => order.push('second dispose'));
    await Promise.all([running, first, second]);
    expect(order).toEqual(['call', 'first dispose', 'second dispose']);
  });

  test('a session step issued before session.dispose() completes; later ones reject with DisposedError', async () => {
    const m = await T5Model.load(fx.dir, { device: 'cpu', threads: 1 });
    try {
      const a = IA3Adapter.create(m);
      const session = await m.createTrainingSession([a], { totalSteps: 10 });
      const batch = { inputIds: inputs, choices, labels: [0, 1, 0, 1] };
      const step1 = session.step(batch, { adapter: a });
      const step2 = session.step(batch, { adapter: a });
      const disposed = session.dispose();
      await expect(session.step(batch, { adapter: a })).rejects.toBeInstanceOf(DisposedError);
      expect((await step1).totalLoss).toBeGreaterThan(0);
      expect((await step2).totalLoss).toBeGreaterThan(0);
      await disposed;
    } finally {
      await m.dispose();
    }
  });
});

describe('rankClassify with an AbortSignal', () => {
  test('stops between batches with AbortError; an unaborted signal changes nothing', async () => {
    const m = await T5Model.load(fx.dir, { device: 'cpu', threads: 1 });
    try {
      const many = Array.from({ length: 40 }, (_, i) => inputs[i % 4]);
      const manyChoices = Array.from({ length: 40 }, (_, i) => choices[i % 4]);
      const ctl = new AbortController();
      const running = m.rankClassify(many, manyChoices, { batchSize: 1, signal: ctl.signal });
      setImmediate(() => ctl.abort());
      await expect(running).rejects.toBeInstanceOf(AbortError);
      await expect(running).rejects.toThrow(/aborted after [1-9]\d* of 40 examples/);
      const fine = await m.rankClassify(inputs, choices, { signal: new AbortController().signal });
      expect(fine.predictions).toHaveLength(4);
    } finally {
      await m.dispose();
    }
  });
});

describe('Symbol.asyncDispose', () => {
  // (jest runs tests in a vm realm without Node's Symbol.asyncDispose; Node's main realm has this very symbol)
  (Symbol as { asyncDispose?: symbol }).asyncDispose ??= Symbol.for('nodejs.asyncDispose');
  test('`await using` disposes the model at the end of the scope', async () => {
    let escaped: T5Model | undefined;
    {
      await using m = await T5Model.load(fx.dir, { device: 'cpu', threads: 1 });
      escaped = m;
      expect((await m.rankClassify(inputs, choices)).predictions).toHaveLength(4);
    }
    expect(escaped.disposed).toBe(true);
    await expect(escaped.rankClassify(inputs, choices)).rejects.toBeInstanceOf(DisposedError);
  });
});

describe('adapter snapshots', () => {
  test('slots swapped between calls, in-place edits seen after markChanged(), more adapters than the table holds', async () => {
    const m = await T5Model.load(fx.dir, { device: 'cpu', threads: 1 });
    try {
      await checkAdapterSnapshots(m, inputs, choices, 1e-6);
    } finally {
      await m.dispose();
    }
  });
});

describe('withMergedAdapter', () => {
  test('on a model with an adapter merged, merges both (their elementwise product)', async () => {
    const base = await T5Model.load(fx.dir, { device: 'cpu', threads: 1 });
    const mergedA = await T5Model.load(fx.dir, { device: 'cpu', threads: 1, mergeAdapter: a });
    const mergedAB = await mergedA.withMergedAdapter(b);
    const product = IA3Adapter.fromFlat(base.config, a.data.map((x, i) => x * b.data[i]));
    const want = await base.rankClassify(inputs, choices, { adapter: product });
    const onlyB = await base.rankClassify(inputs, choices, { adapter: b });
    const got = await mergedAB.rankClassify(inputs, choices);
    expect(maxRel(got.logProbs.flat(), want.logProbs.flat())).toBeLessThan(1e-4);
    expect(maxRel(got.logProbs.flat(), onlyB.logProbs.flat())).toBeGreaterThan(1e-3);  // a is not dropped
    // the first merged model is unchanged
    const stillA = await mergedA.rankClassify(inputs, choices);
    const wantA = await base.rankClassify(inputs, choices, { adapter: a });
    expect(maxRel(stillA.logProbs.flat(), wantA.logProbs.flat())).toBeLessThan(1e-4);
    await Promise.all([base.dispose(), mergedA.dispose(), mergedAB.dispose()]);
  });
});

describe('misuse from plain JavaScript gives typed errors', () => {
  const anyLoad = T5Model.load as unknown as (...args: unknown[]) => Promise<T5Model>;
  test.each([
    ['a number as cuda.graphBuckets', [fx.dir, { cuda: { graphBuckets: 1 } }]],
    ['no directory', [undefined]],
    ['null options', [fx.dir, null]],
    ['a path as mergeAdapter', [fx.dir, { mergeAdapter: path.join(fx.dir, 'adapter_a') }]],
  ])('T5Model.load with %s: InvalidArgumentError', async (_name, args) => {
    await expect(anyLoad(...args)).rejects.toBeInstanceOf(InvalidArgumentError);
  });

  test('a misspelt Trainer option is refused, not ignored', async () => {
    const m = await T5Model.load(fx.dir, { device: 'cpu', threads: 1 });
    try {
      const make = (o: unknown) => () => new Trainer(m, IA3Adapter.create(m), o as Record<string, never>);
      expect(make({ learningRate: 1e-2 })).toThrow(/unknown Trainer option\(s\) learningRate/);
      expect(make({ learningRate: 1e-2 })).toThrow(InvalidArgumentError);
      expect(make(null)).toThrow(InvalidArgumentError);
      expect(make({ lr: 1e-2, steps: 3, saveTo: undefined })).not.toThrow();
    } finally {
      await m.dispose();
    }
  });

  test('Trainer saveTo that is not a path is refused when the Trainer is made', async () => {
    const m = await T5Model.load(fx.dir, { device: 'cpu', threads: 1 });
    try {
      for (const saveTo of ['', 5, {}, null, 'a\0b']) {
        expect(() => new Trainer(m, IA3Adapter.create(m), { saveTo } as unknown as Record<string, never>)).toThrow(InvalidArgumentError);
      }
      expect(() => new Trainer(m, IA3Adapter.create(m), { dropout: 'false' } as unknown as Record<string, never>)).toThrow(InvalidArgumentError);
    } finally {
      await m.dispose();
    }
  });

  test('IA3Adapter.create without a model: InvalidArgumentError', () => {
    expect(() => IA3Adapter.create(undefined as unknown as T5Model)).toThrow(InvalidArgumentError);
  });

  test('saving an adapter where a file is in the way: FileFormatError naming the path', async () => {
    const file = path.join(tmp, 'a-file');
    fs.writeFileSync(file, 'x');
    const err = await a.save(path.join(file, 'adapter')).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(FileFormatError);
    expect((err as Error).message).toContain(path.join(file, 'adapter'));
  });

  test('Trainer saveTo that cannot be written: FileFormatError before the first step', async () => {
    const m = await T5Model.load(fx.dir, { device: 'cpu', threads: 1 });
    try {
      const file = path.join(tmp, 'blocker');
      fs.writeFileSync(file, 'x');
      const adapter = IA3Adapter.create(m);
      const trainer = new Trainer(m, adapter, { steps: 3, batchSize: 2, saveTo: path.join(file, 'out') });
      let steps = 0;
      trainer.on('step', () => steps++);
      const examples = inputs.map((input, i) => ({ input, choices: choices[i], label: 0 }));
      await expect(trainer.train(examples)).rejects.toBeInstanceOf(FileFormatError);
      expect(steps).toBe(0);
      // a writable saveTo trains and saves
      const ok = new Trainer(m, adapter, { steps: 2, batchSize: 2, saveTo: path.join(tmp, 'saved', 'adapter') });
      await ok.train(examples);
      expect(fs.existsSync(path.join(tmp, 'saved', 'adapter', 'adapter_model.safetensors'))).toBe(true);
    } finally {
      await m.dispose();
    }
  });
});

describe('a model directory without a usable tokenizer', () => {
  test('no tokenizer.json and an unusable spiece.model (a Git LFS pointer): the model loads, text is refused with the reason', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tfew-no-tokenizer-'));
    try {
      for (const f of ['config.json', 'model.safetensors']) fs.copyFileSync(path.join(fx.dir, f), path.join(dir, f));
      const load = () => T5Model.load(dir, { device: 'cpu', threads: 1 });
      let m = await load();
      expect(m.tokenizer).toBeUndefined();
      expect(() => m.tokenize('hello')).toThrow(`${dir} has no tokenizer.json or spiece.model: pass token ids instead of strings`);
      await m.dispose();
      fs.writeFileSync(path.join(dir, 'spiece.model'), 'version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 791656\n');
      m = await load();
      try {
        expect(m.tokenizer).toBeUndefined();
        expect(() => m.tokenize('hello')).toThrow(InvalidArgumentError);
        expect(() => m.tokenize('hello')).toThrow(/has no tokenizer\.json, and its spiece\.model is not usable \(.*spiece\.model: not a SentencePiece model/);
        expect((await m.rankClassify([[5, 1]], [[[6, 1], [7, 1]]])).scores[0]).toHaveLength(2);  // (ids work)
      } finally {
        await m.dispose();
      }
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
