// Regression tests of the core review: the thread pool's failure handling, the addon's argument checks (each
// case here used to crash the process, hang, block the event loop or give a silent wrong answer), and edge
// cases of the public API.
import { spawnSync } from 'child_process';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import {
  DisposedError, IA3Adapter, InvalidAdapterError, InvalidArgumentError, OutOfMemoryError, resolveCheckpoint, T5Model,
  TfewError, Trainer,
} from '../lib';
import { fromNative } from '../lib/errors';
import { native, NativeBatch, NativeConfig, NativeTensorSpec, packageRoot } from '../lib/native';
import type { TrainableModel, TrainingSessionLike } from '../lib/trainer';
import { buildTinyT5 } from '../lib/tiny';
import { loadFixture } from './helpers/reference';

const fx = loadFixture('tiny-relu-tied');

/** A native rejection: the promise must reject (never throw synchronously) with this code. */
async function rejectsWith(call: () => Promise<unknown>, code: string, message?: RegExp): Promise<void> {
  let promise: Promise<unknown>;
  try {
    promise = call();
  } catch (e) {
    throw new Error(`threw synchronously instead of rejecting: ${(e as Error).message}`);
  }
  const err = await promise.then(() => undefined, (e: unknown) => e);
  expect(err).toBeDefined();
  expect((err as { code?: string }).code).toBe(code);
  if (message) expect((err as Error).message).toMatch(message);
}

function smallBatch(overrides: Partial<NativeBatch> = {}): NativeBatch {
  return {
    batchSize: 1, encLen: 2, inputIds: Int32Array.from([5, 1]), encLengths: Int32Array.from([2]),
    numRows: 2, decLen: 2, choiceIds: Int32Array.from([3, 1, 4, 1]), rowStart: Int32Array.from([0, 2]),
    adapterOfExample: Int32Array.from([-1]), labels: Int32Array.from([0]), ...overrides,
  };
}

// A machine where the addon was never built (npm skipped the install script, or the build failed): the first
// call is a typed NativeLoadError that says how to build it, and T5Model.load rejects with it.
test('no native addon: NativeLoadError naming the way to build it', () => {
  const lib = JSON.stringify(path.join(packageRoot(), 'dist', 'lib'));
  const script = `const t = require(${lib});
    try { t.backendInfo(); console.log('loaded'); } catch (e) { console.log(JSON.stringify({ name: e.constructor.name, code: e.code, message: e.message })); }
    t.T5Model.load(${JSON.stringify(loadFixture('tiny-relu-tied').dir)}, { device: 'cpu' })
      .then(() => console.log('loaded'), (e) => console.log(JSON.stringify({ load: e.constructor.name })));`;
  const r = spawnSync(process.execPath, ['-e', script], { env: { ...process.env, TFEW_NATIVE_ADDON: path.join(os.tmpdir(), 'no-such-addon.node') }, encoding: 'utf8' });
  const [first, second] = r.stdout.trim().split('\n').map((l) => JSON.parse(l));
  expect(first).toMatchObject({ name: 'NativeLoadError', code: 'E_NATIVE_LOAD' });
  expect(first.message).toMatch(/could not be loaded: .*no-such-addon\.node[\s\S]*npm rebuild @tfew\/cuda.*npm install-scripts approve @tfew\/cuda/);
  expect(second).toEqual({ load: 'NativeLoadError' });
});

// An addon built from older sources (a stale build/ or prebuild) lacks what lib reads from it now: refused at load
// with a NativeLoadError that says so, not used to pad training batches to an undefined multiple.
test('a stale native addon: NativeLoadError saying it is older than lib', () => {
  const lib = JSON.stringify(path.join(packageRoot(), 'dist', 'lib'));
  const stale = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'tfew-stale-')), 'stale-addon.js');
  fs.writeFileSync(stale, "module.exports = { version: '0.0.0', buildInfo: { cudaCompiled: false, compiler: 'x', napiVersion: 8 } };\n");
  const script = `const t = require(${lib});
    try { t.backendInfo(); console.log('loaded'); } catch (e) { console.log(JSON.stringify({ name: e.constructor.name, code: e.code, message: e.message })); }`;
  const r = spawnSync(process.execPath, ['-e', script], { env: { ...process.env, TFEW_NATIVE_ADDON: stale }, encoding: 'utf8' });
  const first = JSON.parse(r.stdout.trim().split('\n')[0]);
  expect(first).toMatchObject({ name: 'NativeLoadError', code: 'E_NATIVE_LOAD' });
  expect(first.message).toMatch(/built from older sources than this lib[\s\S]*npm rebuild @tfew\/cuda/);
});

describe('thread pool: exceptions inside parallel_for', () => {
  const pool = native()._testing;
  const run = (o: Partial<Parameters<typeof pool.parallelFor>[0]>) =>
    pool.parallelFor({ threads: 4, n: 64, nested: false, throwIn: 'none', kind: 'runtime', ...o });

  test('every index is visited exactly once; nested calls run inline instead of overwriting the running job', async () => {
    expect(await run({})).toEqual(new Array(64).fill(1));
    expect(await run({ n: 1000, threads: 3 })).toEqual(new Array(1000).fill(1));
    expect(await run({ nested: true })).toEqual(new Array(64).fill(4)); // 4 inner indices per outer index
    expect(await run({ threads: 1 })).toEqual(new Array(64).fill(1));
  });

  test.each([
    ['worker', 'runtime', 'E_INTERNAL'],
    ['worker', 'bad_alloc', 'E_OUT_OF_MEMORY'],
    ['worker', 'tfew', 'E_INVALID_ARGUMENT'],
    ['caller', 'runtime', 'E_INTERNAL'],
    ['caller', 'bad_alloc', 'E_OUT_OF_MEMORY'],
  ] as const)('a throw on the %s thread (%s) reaches the promise as %s and the pool stays usable', async (throwIn, kind, code) => {
    // the native side re-runs the loop on the same pool first and reports "the pool is broken" if it is
    const message = kind === 'bad_alloc' ? /^out of host memory$/ : /^chunk \d+ failed$/;
    await rejectsWith(() => run({ throwIn, kind }), code, message);
    await rejectsWith(() => run({ throwIn, kind, nested: true }), code, message);
  });

  test('out of memory on a pool thread becomes OutOfMemoryError', async () => {
    const err = fromNative(await run({ throwIn: 'worker', kind: 'bad_alloc' }).catch((e) => e));
    expect(err).toBeInstanceOf(OutOfMemoryError);
  });

  (process.platform === 'linux' ? test : test.skip)('a thread that cannot be started is a rejection, not an abort', async () => {
    // A child process whose address space has room for a few dozen 8 MiB thread stacks asks for 256 threads.
    // Before the fix the half-built pool destroyed joinable std::threads: std::terminate.
    const { config, tensors } = await resolveCheckpoint(fx.dir);
    const root = JSON.stringify(packageRoot());
    const script = `
      const addon = require('node-gyp-build')(${root});
      const { config, tensors } = JSON.parse(process.argv[1]);
      addon.loadModel(config, tensors, { device: 'cpu', threads: 256 }).then(
        (m) => { console.log('loaded ' + m.describe()); return m.dispose(); },
        (e) => console.log('rejected ' + e.code + ' ' + e.message));`;
    // room above what node itself maps at start-up: a few dozen stacks, not 255
    const probe = spawnSync(process.execPath, ['-e', `require('node-gyp-build')(${root});
      console.log(/VmSize:\\s+(\\d+)/.exec(require('fs').readFileSync('/proc/self/status', 'utf8'))[1])`],
    { cwd: packageRoot(), encoding: 'utf8' });
    const baseKb = Number(probe.stdout.trim());
    expect(baseKb).toBeGreaterThan(0);
    const r = spawnSync('sh', ['-c', `ulimit -v ${baseKb + 600 * 1024} && exec "$0" -e "$1" "$2"`, process.execPath, script,
      JSON.stringify({ config, tensors })], { cwd: packageRoot(), encoding: 'utf8' });
    expect(r.signal).toBeNull();
    expect(r.status).toBe(0);
    expect(r.stdout).toMatch(/^rejected E_INTERNAL cannot start CPU worker thread \d+ of 255: /m);
  });
});

describe('the addon in several environments', () => {
  test('a worker_thread that loaded the addon and exited leaves the main thread working (a segfault before)', async () => {
    // In a child process, so a crash is a test failure and not the end of the test run.
    const { config, tensors } = await resolveCheckpoint(fx.dir);
    const gypBuild = JSON.stringify(require.resolve('node-gyp-build', { paths: [packageRoot()] }));
    const root = JSON.stringify(packageRoot());
    const script = `
      const { Worker } = require('worker_threads');
      const { config, tensors } = JSON.parse(process.argv[1]);
      const addon = require(${gypBuild})(${root});
      const batch = () => ({ batchSize: 1, encLen: 2, inputIds: Int32Array.from([5, 1]), encLengths: Int32Array.from([2]),
        numRows: 1, decLen: 2, choiceIds: Int32Array.from([3, 1]), rowStart: Int32Array.from([0, 1]),
        adapterOfExample: Int32Array.from([-1]) });
      const inWorker = \`
        const { parentPort, workerData } = require('worker_threads');
        const addon = require(${gypBuild.replace(/"/g, "'")})(${root.replace(/"/g, "'")});
        addon.loadModel(workerData.config, workerData.tensors, { device: 'cpu', threads: 1 })
          .then(async (m) => { await m.dispose(); parentPort.postMessage('worker ok'); });\`;
      const w = new Worker(inWorker, { eval: true, workerData: { config, tensors } });
      w.on('message', async (m) => {
        console.log(m);
        await w.terminate();
        const nm = await addon.loadModel(config, tensors, { device: 'cpu', threads: 1 });
        const r = await nm.score(batch(), [], false, false);
        console.log('main ok ' + r.tokenLogp.length);
        await nm.dispose();
      });`;
    const r = spawnSync(process.execPath, ['-e', script, JSON.stringify({ config, tensors })], { cwd: packageRoot(), encoding: 'utf8' });
    expect(r.stderr).toBe('');
    expect(r.signal).toBeNull();
    expect(r.status).toBe(0);
    expect(r.stdout).toBe('worker ok\nmain ok 2\n');
  });
});

describe('native argument checks (calls straight to the addon)', () => {
  let config: NativeConfig;
  let tensors: NativeTensorSpec[];
  beforeAll(async () => {
    ({ config, tensors } = await resolveCheckpoint(fx.dir));
  });
  const load = (c: Partial<NativeConfig>, t?: (specs: NativeTensorSpec[]) => unknown[], threads = 2) =>
    native().loadModel({ ...config, ...c }, (t ? t(tensors.map((s) => ({ ...s, shape: [...s.shape] }))) : tensors) as NativeTensorSpec[],
      { device: 'cpu', threads });

  test('config: token ids outside the vocabulary (a segfault before), dropout and eps out of range', async () => {
    await rejectsWith(() => load({ decoderStartTokenId: 1_000_000 }), 'E_INVALID_MODEL', /decoder_start_token_id/);
    await rejectsWith(() => load({ padTokenId: -1 }), 'E_INVALID_MODEL', /pad_token_id/);
    await rejectsWith(() => load({ eosTokenId: config.vocabSize }), 'E_INVALID_MODEL', /eos_token_id/);
    await rejectsWith(() => load({ dropoutRate: 1 }), 'E_INVALID_MODEL', /dropout_rate/);
    await rejectsWith(() => load({ layerNormEps: 0 }), 'E_INVALID_MODEL', /layer_norm_epsilon/);
    // position buckets that would index outside the bias table
    await rejectsWith(() => load({ numBuckets: 32, maxDistance: 16 }), 'E_INVALID_MODEL', /position buckets/);
    await rejectsWith(() => load({ numBuckets: 2 }), 'E_INVALID_MODEL', /position buckets/);
    await rejectsWith(() => load({ dModel: 64.5 }), 'E_INVALID_ARGUMENT', /dModel/);
    await rejectsWith(() => load({ numHeads: NaN }), 'E_INVALID_ARGUMENT', /numHeads/);
  });

  test('tensor specs: offsets past 2^53 (a segfault before), negative or fractional sizes, wrong types', async () => {
    const big = (specs: NativeTensorSpec[]) => specs.map((s) => (s.name === 'shared.weight' ? { ...s, offset: 2 ** 63 - 2048 } : s));
    await rejectsWith(() => load({}, big), 'E_INVALID_MODEL', /offset of tensor shared.weight/);
    await rejectsWith(() => load({}, (s) => { s[0].offset = -8; return s; }), 'E_INVALID_MODEL', /offset/);
    await rejectsWith(() => load({}, (s) => { s[0].byteLength = 1.5; return s; }), 'E_INVALID_MODEL', /byteLength/);
    await rejectsWith(() => load({}, (s) => { s[0].shape[0] = NaN; return s; }), 'E_INVALID_MODEL', /dimension/);
    await rejectsWith(() => load({}, (s) => [...s, 42]), 'E_INVALID_ARGUMENT', /tensor spec/);
    await rejectsWith(() => load({}, (s) => { (s[0] as unknown as { name: number }).name = 7; return s; }), 'E_INVALID_ARGUMENT', /'name'/);
    await rejectsWith(() => load({}, (s) => { (s[0] as unknown as { shape: string }).shape = '64'; return s; }), 'E_INVALID_ARGUMENT', /shape/);
    // an offset inside 2^53 but past the end of the file stays an I/O error
    await rejectsWith(() => load({}, (s) => { s[0].offset = 2 ** 52; return s; }), 'E_IO', /beyond the end/);
  });

  test('threads: far too many is clamped, not millions of threads', async () => {
    const nm = await load({}, undefined, 1e9);
    expect(nm.describe()).toMatch(/256 threads/);
    await nm.dispose();
  });

  describe('calls on a loaded model', () => {
    let nm: Awaited<ReturnType<typeof load>>;
    beforeAll(async () => {
      nm = await load({});
    });
    afterAll(async () => {
      await nm.dispose();
    });
    const opts = { lmWeight: 1, ulWeight: 1, lnWeight: 1, dropout: true, seed: 3 };

    test('loss options: seeds that are negative, fractional or too big; non-finite weights', async () => {
      for (const seed of [-1, 1.5, NaN, 2 ** 64]) {
        await rejectsWith(() => nm.lossAndGradients(smallBatch(), [], { ...opts, seed }), 'E_INVALID_ARGUMENT', /seed/);
      }
      await rejectsWith(() => nm.lossAndGradients(smallBatch(), [], { ...opts, ulWeight: NaN }), 'E_INVALID_ARGUMENT', /ulWeight/);
      const ok = await nm.lossAndGradients(smallBatch(), [], opts);
      expect(Number.isFinite(ok.totalLoss)).toBe(true);
    });

    test('batch numbers must be 32-bit integers; typed arrays must be Int32Array', async () => {
      await rejectsWith(() => nm.score(smallBatch({ batchSize: 1.5 }), [], false, false), 'E_INVALID_ARGUMENT', /batchSize/);
      await rejectsWith(() => nm.score(smallBatch({ decLen: 2 ** 40 }), [], false, false), 'E_INVALID_ARGUMENT', /decLen/);
      const wrongType = { ...smallBatch(), inputIds: Float64Array.from([5, 1]) } as unknown as NativeBatch;
      await rejectsWith(() => nm.score(wrongType, [], false, false), 'E_INVALID_ARGUMENT', /inputIds/);
    });

    test('missing or wrong arguments reject (they never throw into JS)', async () => {
      const anyNm = nm as unknown as Record<string, (...a: unknown[]) => Promise<unknown>>;
      await rejectsWith(() => anyNm.score(), 'E_INVALID_ARGUMENT');
      await rejectsWith(() => anyNm.lossAndGradients(smallBatch(), []), 'E_INVALID_ARGUMENT');
      await rejectsWith(() => anyNm.mergeAdapter(), 'E_INVALID_ADAPTER');
      await rejectsWith(() => anyNm.createTrainingSession([]), 'E_INVALID_ARGUMENT');
      const good = { lr: 3e-3, totalSteps: 10, warmupRatio: 0.06, clipNorm: 1, scaleParameter: true, weightDecay: 0 };
      await rejectsWith(() => nm.createTrainingSession([], { ...good, lr: NaN }), 'E_INVALID_ARGUMENT', /lr/);
      await rejectsWith(() => nm.createTrainingSession([], { ...good, warmupRatio: 2 }), 'E_INVALID_ARGUMENT', /warmupRatio/);
      await rejectsWith(() => nm.createTrainingSession([], { ...good, totalSteps: 0.5 }), 'E_INVALID_ARGUMENT', /totalSteps/);
      const size = IA3Adapter.create(config).data.length;
      const session = await nm.createTrainingSession([new Float32Array(size).fill(1)], good);
      const anySession = session as unknown as Record<string, (...a: unknown[]) => Promise<unknown>>;
      await rejectsWith(() => anySession.step(smallBatch({ adapterOfExample: Int32Array.from([0]) }), opts, 1.5), 'E_INVALID_ARGUMENT', /scheduleStep/);
      await rejectsWith(() => anySession.step(), 'E_INVALID_ARGUMENT');
      await rejectsWith(() => anySession.read('first'), 'E_INVALID_ARGUMENT', /adapter index/);
      await rejectsWith(() => anySession.read(1), 'E_INVALID_ARGUMENT', /out of range/);
      expect((await session.read(0)).length).toBe(size);
      await session.dispose();
    });
  });
});

describe('a model busy with a long call', () => {
  let dir: string;
  let model: T5Model;
  let long: { inputIds: number[][]; choices: number[][][]; labels: number[] };
  beforeAll(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tfew-busy-'));
    buildTinyT5(dir, { words: ['alpha', 'beta'], dModel: 128, dFf: 256, numLayers: 2, numHeads: 4, dKv: 32, seed: 3 });
    model = await T5Model.load(dir, { device: 'cpu', threads: 1 });
    const inputIds = Array.from({ length: 12 }, (_, i) => Array.from({ length: 160 }, (_, t) => 3 + ((i + t) % 2)).concat([1]));
    long = { inputIds, choices: inputIds.map(() => [[3, 1], [4, 1]]), labels: inputIds.map(() => 0) };
  });
  afterAll(async () => {
    await model.dispose();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  test('describe() returns at once instead of waiting for the model lock (it blocked the event loop before)', async () => {
    const before = model.describe();
    let settled = false;
    const call = model.lossAndGradients(long, { adapter: IA3Adapter.create(model) }).then(() => { settled = true; });
    await new Promise((r) => setTimeout(r, 30)); // the worker holds the model's lock by now
    const started = process.hrtime.bigint();
    const during = model.describe();
    const ms = Number(process.hrtime.bigint() - started) / 1e6;
    const stillRunning = !settled;
    await call;
    expect(stillRunning).toBe(true); // else the workload is too small to show anything
    expect(ms).toBeLessThan(20);
    expect(during).toBe(before);
  });

  test('calls queued on a busy model do not hold libuv threads: file reads still complete', async () => {
    // Before, every queued call sat on one of libuv's 4 threads waiting for the model's mutex, so a file read
    // issued after 8 calls waited for most of them.
    const part = { inputIds: long.inputIds.slice(0, 4), choices: long.choices.slice(0, 4), labels: long.labels.slice(0, 4) };
    let finished = 0;
    const calls = Array.from({ length: 8 }, () => model.lossAndGradients(part).then(() => { finished++; }));
    await new Promise((r) => setTimeout(r, 10));
    await fs.promises.readFile(__filename);
    const finishedAtRead = finished;
    await Promise.all(calls);
    expect(finished).toBe(8);
    expect(finishedAtRead).toBeLessThanOrEqual(1);
  });

  test('queued calls keep their order and give the serial results', async () => {
    const one = { inputIds: long.inputIds.slice(0, 2), choices: long.choices.slice(0, 2), labels: long.labels.slice(0, 2) };
    const serial = await model.lossAndGradients(one, { dropout: true, seed: 9 });
    const order: number[] = [];
    const all = await Promise.all(Array.from({ length: 4 }, (_, i) =>
      model.lossAndGradients(one, { dropout: true, seed: 9 }).then((r) => { order.push(i); return r; })));
    expect(order).toEqual([0, 1, 2, 3]);
    for (const r of all) expect(r.totalLoss).toBe(serial.totalLoss);
  });
});

describe('T5Model edge cases', () => {
  let model: T5Model;
  beforeAll(async () => {
    model = await T5Model.load(fx.dir, { device: 'cpu', threads: 2 });
  });
  afterAll(async () => {
    await model.dispose();
  });

  test('load: threads must be an integer in [1, 256]', async () => {
    for (const threads of [0, -1, 1.5, NaN, 257, 1e6]) {
      await expect(T5Model.load(fx.dir, { device: 'cpu', threads })).rejects.toBeInstanceOf(InvalidArgumentError);
    }
  });

  test('load: an adapter that does not fit is rejected before the weights are loaded', async () => {
    const wrong = IA3Adapter.create({ numLayers: 1, numDecoderLayers: 1, innerDim: 64, dFf: 96 });
    await expect(T5Model.load(fx.dir, { device: 'cpu', mergeAdapter: wrong })).rejects.toBeInstanceOf(InvalidAdapterError);
  });

  test('batchSize: any integer >= 1 gives the same results (also larger than the input); others are errors', async () => {
    const all = await model.rankClassify(fx.inputIds, fx.choices);
    for (const batchSize of [1, 2, 100]) expect(await model.rankClassify(fx.inputIds, fx.choices, { batchSize })).toEqual(all);
    for (const batchSize of [0, -3, 1.5, NaN]) {
      await expect(model.rankClassify(fx.inputIds, fx.choices, { batchSize })).rejects.toBeInstanceOf(InvalidArgumentError);
    }
  });

  describe('rankClassify groups examples into native calls by length', () => {
    // inputs of alternating long and short lengths with 2 or 3 choices: in the order given every call of 2 would
    // pad a short input to a long one
    const lengths = [3, 12, 4, 11, 5, 10, 2, 9, 6];
    let seed = 7;
    const rand = (n: number) => { seed = (seed * 1103515245 + 12345) % 2147483648; return 2 + (seed % (n - 2)); };
    const inputs = lengths.map((n) => [...Array.from({ length: n - 1 }, () => rand(100)), 1]);
    const choices = lengths.map((n, b) => Array.from({ length: b % 3 === 0 ? 3 : 2 }, (_, j) => [rand(100), ...(j === 1 ? [rand(100)] : []), 1]));
    type ScoreBatch = { batchSize: number; encLen: number; encLengths: Int32Array; rowStart: Int32Array };
    // the batches of the native score calls, seen through a proxy in front of the native model (its methods are
    // read-only properties: jest.spyOn cannot replace them)
    const spyOnScore = (m: T5Model) => {
      const holder = m as unknown as { nativeModel: object };
      const nm = holder.nativeModel as Record<string | symbol, unknown>;
      const batches: ScoreBatch[] = [];
      holder.nativeModel = new Proxy(nm, {
        get(target, prop) {
          const value = target[prop];
          if (typeof value !== 'function') return value;
          return (...args: unknown[]) => {
            if (prop === 'score') batches.push(args[0] as ScoreBatch);
            return (value as (...a: unknown[]) => unknown).apply(target, args);
          };
        },
      });
      return { batches, mockClear: () => { batches.length = 0; }, mockRestore: () => { holder.nativeModel = nm; } };
    };
    const batchesOf = (spy: ReturnType<typeof spyOnScore>) => spy.batches.slice();
    const paddedTokens = (batches: ScoreBatch[]) => batches.reduce((sum, b) => sum + b.batchSize * b.encLen, 0);

    test('results in the order given, bit for bit those of one call per example; calls pad less, longest first', async () => {
      const alone = await model.rankClassify(inputs, choices, { batchSize: 1 });
      const spy = spyOnScore(model);
      try {
        const grouped = await model.rankClassify(inputs, choices, { batchSize: 2 });
        const groupedBatches = batchesOf(spy);
        spy.mockClear();
        const inOrder = await model.rankClassify(inputs, choices, { batchSize: 2, groupByLength: false });
        const inOrderBatches = batchesOf(spy);
        expect(grouped).toEqual(alone);
        expect(inOrder).toEqual(alone);
        expect(groupedBatches).toHaveLength(5);
        expect(inOrderBatches.map((b) => b.encLen)).toEqual([12, 11, 10, 9, 6]);
        // 3-choice examples (lengths 3, 11, 2) first, then the 2-choice ones, each group longest first
        expect(groupedBatches.map((b) => Array.from(b.encLengths))).toEqual([[11, 3], [2, 12], [10, 9], [6, 5], [4]]);
        expect(groupedBatches.map((b) => b.rowStart[b.batchSize] / b.batchSize)).toEqual([3, 2.5, 2, 2, 2]);
        expect(paddedTokens(groupedBatches)).toBeLessThan(paddedTokens(inOrderBatches));
      } finally {
        spy.mockRestore();
      }
    });

    test('encode: calls of batchSize grouped by length too, states in the order given, bit for bit', async () => {
      const alone = await Promise.all(inputs.map((x) => model.encode([x]).then((r) => r[0])));
      const spy = spyOnScore(model);
      try {
        const grouped = await model.encode(inputs, { batchSize: 4 });
        expect(batchesOf(spy).map((b) => Array.from(b.encLengths))).toEqual([[12, 11, 10, 9], [6, 5, 4, 3], [2]]);
        spy.mockClear();
        const inOrder = await model.encode(inputs, { batchSize: 4, groupByLength: false });
        expect(batchesOf(spy).map((b) => b.encLen)).toEqual([12, 10, 6]);
        grouped.forEach((h, b) => {
          expect(h.length).toBe(lengths[b] * model.config.dModel);
          expect(Array.from(h)).toEqual(Array.from(alone[b]));
          expect(Array.from(inOrder[b])).toEqual(Array.from(alone[b]));
        });
        for (const batchSize of [0, 1.5]) await expect(model.encode(inputs, { batchSize })).rejects.toBeInstanceOf(InvalidArgumentError);
      } finally {
        spy.mockRestore();
      }
    });

    test('choiceLogits: calls of batchSize (default 8) grouped by length, logits in the order given, bit for bit', async () => {
      const alone = await Promise.all(inputs.map((x, b) => model.choiceLogits([x], [choices[b]]).then((r) => r[0])));
      const spy = spyOnScore(model);
      try {
        const grouped = await model.choiceLogits(inputs, choices, { batchSize: 4 });
        // (3-choice examples first, each group longest first)
        expect(batchesOf(spy).map((b) => Array.from(b.encLengths))).toEqual([[11, 3, 2, 12], [10, 9, 6, 5], [4]]);
        spy.mockClear();
        const byDefault = await model.choiceLogits(inputs, choices);
        expect(batchesOf(spy).map((b) => b.batchSize)).toEqual([8, 1]);
        spy.mockClear();
        const inOrder = await model.choiceLogits(inputs, choices, { batchSize: 4, groupByLength: false });
        expect(batchesOf(spy).map((b) => b.encLen)).toEqual([12, 10, 6]);
        for (const result of [grouped, byDefault, inOrder]) {
          result.forEach((perChoice, b) => {
            expect(perChoice.map((l) => l.length)).toEqual(choices[b].map((c) => c.length * model.config.vocabSize));
            perChoice.forEach((l, j) => expect(Array.from(l)).toEqual(Array.from(alone[b][j])));
          });
        }
        for (const batchSize of [0, 1.5]) await expect(model.choiceLogits(inputs, choices, { batchSize })).rejects.toBeInstanceOf(InvalidArgumentError);
        // a bad example anywhere fails before any call
        spy.mockClear();
        const bad = choices.map((c, b) => (b === 7 ? [[100000, 1]] : c));
        await expect(model.choiceLogits(inputs, bad, { batchSize: 2 })).rejects.toThrow(/example 7/);
        expect(batchesOf(spy)).toHaveLength(0);
      } finally {
        spy.mockRestore();
      }
    });

    test('per-example adapters go with their examples', async () => {
      const a = IA3Adapter.create(model);
      a.data.forEach((_, i) => { a.data[i] = 1 + 0.3 * Math.sin(i); });
      a.markChanged();
      const perExample = inputs.map((_, b) => (b % 2 ? a : null));
      const grouped = await model.rankClassify(inputs, choices, { batchSize: 4, adapter: perExample });
      for (const b of [0, 1, 3, 6]) {
        const one = await model.rankClassify([inputs[b]], [choices[b]], { adapter: perExample[b] });
        expect(grouped.scores[b]).toEqual(one.scores[0]);
      }
      const none = await model.rankClassify(inputs, choices, { batchSize: 4 });
      expect(grouped.scores[1]).not.toEqual(none.scores[1]);
      expect(grouped.scores[0]).toEqual(none.scores[0]);
    });

    test('a bad example or adapter anywhere in the list fails before any native call, named by its index', async () => {
      const spy = spyOnScore(model);
      try {
        const bad = inputs.map((x, b) => (b === 7 ? [5, 100000, 1] : x));
        await expect(model.rankClassify(bad, choices, { batchSize: 2 })).rejects.toThrow(/input 7: token id 100000/);
        const badChoices = choices.map((c, b) => (b === 8 ? [[0], [3, 1]] : c));
        await expect(model.rankClassify(inputs, badChoices, { batchSize: 2 })).rejects.toThrow(/choice 0 of example 8 has only pad/);
        const wrong = IA3Adapter.create({ numLayers: 1, numDecoderLayers: 1, innerDim: 64, dFf: 96 });
        const adapters = inputs.map((_, b) => (b === 5 ? wrong : null));
        await expect(model.rankClassify(inputs, choices, { batchSize: 2, adapter: adapters })).rejects.toBeInstanceOf(InvalidAdapterError);
        expect(spy.batches).toHaveLength(0);
        for (const groupByLength of [1, 'yes', 0]) {
          await expect(model.rankClassify(inputs, choices, { groupByLength: groupByLength as unknown as boolean }))
            .rejects.toBeInstanceOf(InvalidArgumentError);
        }
      } finally {
        spy.mockRestore();
      }
    });
  });

  test('empty inputs: empty results from rankClassify, encode and choiceLogits', async () => {
    expect(await model.rankClassify([], [])).toEqual({ predictions: [], scores: [], logProbs: [] });
    expect(await model.encode([])).toEqual([]);
    expect(await model.choiceLogits([], [])).toEqual([]);
    await expect(model.choiceLogits(fx.inputIds, fx.choices.slice(0, 1))).rejects.toBeInstanceOf(InvalidArgumentError);
    await expect(model.lossAndGradients({ inputIds: [], choices: [], labels: [] })).rejects.toBeInstanceOf(InvalidArgumentError);
  });

  test('maxInputLength must be an integer >= 1, also when inputs are token ids', async () => {
    for (const maxInputLength of [0, -1, 2.5, NaN]) {
      await expect(model.rankClassify(fx.inputIds, fx.choices, { maxInputLength })).rejects.toBeInstanceOf(InvalidArgumentError);
      await expect(model.encode(fx.inputIds, { maxInputLength })).rejects.toBeInstanceOf(InvalidArgumentError);
    }
  });

  test('a choice made only of pad tokens is an error (its score was 0 / 0 = NaN)', async () => {
    const choices = [[[3, 1], [0]], ...fx.choices.slice(1)];
    await expect(model.rankClassify(fx.inputIds, choices)).rejects.toThrow(/only pad tokens/);
    await expect(model.lossAndGradients({ inputIds: fx.inputIds, choices, labels: fx.labels })).rejects.toBeInstanceOf(InvalidArgumentError);
    // a pad inside a choice is masked like T-Few does (the decoder still reads it as the next input); the choice
    // keeps its other tokens: its sum and score are those of tokens 3 and 1 alone, from the logits at their positions
    const r = await model.rankClassify([fx.inputIds[0]], [[[3, 0, 1], [4, 1]]]);
    const logits = (await model.choiceLogits([fx.inputIds[0]], [[[3, 0, 1], [4, 1]]]))[0][0];
    const V = model.config.vocabSize;
    const logSoftmax = (t: number, token: number) => {
      const row = Array.from(logits.subarray(t * V, (t + 1) * V));
      const max = Math.max(...row);
      return row[token] - max - Math.log(row.reduce((acc, x) => acc + Math.exp(x - max), 0));
    };
    const kept = logSoftmax(0, 3) + logSoftmax(2, 1);
    expect(r.logProbs[0][0]).toBeCloseTo(kept, 4);
    expect(r.scores[0][0]).toBeCloseTo(kept / 2, 4);
  });

  test('seed and scheduleStep must be non-negative integers', async () => {
    const batch = { inputIds: fx.inputIds, choices: fx.choices, labels: fx.labels };
    for (const seed of [-1, 0.5, 2 ** 60]) {
      await expect(model.lossAndGradients(batch, { dropout: true, seed })).rejects.toBeInstanceOf(InvalidArgumentError);
    }
    const a = IA3Adapter.create(model);
    const session = await model.createTrainingSession([a], { totalSteps: 10 });
    try {
      for (const scheduleStep of [-1, 1.5, NaN]) {
        await expect(session.step(batch, { scheduleStep })).rejects.toBeInstanceOf(InvalidArgumentError);
      }
      const s = await session.step(batch, { scheduleStep: 5 });
      expect(s.lr).toBeGreaterThan(0);
    } finally {
      await session.dispose();
    }
  });

  test('dispose while a rankClassify runs its chunks: the call completes, then the model is freed', async () => {
    const m = await T5Model.load(fx.dir, { device: 'cpu', threads: 1 });
    const inputs = Array.from({ length: 12 }, (_, i) => fx.inputIds[i % 3]);
    const choices = Array.from({ length: 12 }, (_, i) => fx.choices[i % 3]);
    const running = m.rankClassify(inputs, choices, { batchSize: 1 });
    const disposing = m.dispose();
    expect(m.describe()).toBe('disposed');  // at once: no new call starts
    await expect(m.rankClassify(inputs, choices)).rejects.toBeInstanceOf(DisposedError);
    const r = await running;
    expect(r.predictions).toHaveLength(12);
    expect(r.logProbs[3]).toEqual(r.logProbs[0]);  // the same example, all chunks scored
    await disposing;
  });

  test('strings without a tokenizer are an InvalidArgumentError naming the directory', async () => {
    await expect(model.encode(['some text'])).rejects.toThrow(new RegExp(`${fx.dir}.*tokenizer`));
  });
});

describe('Trainer clean-up after a failed step', () => {
  const config: NativeConfig = {
    vocabSize: 32, dModel: 4, dFf: 3, dKv: 2, numHeads: 2, numLayers: 1, numDecoderLayers: 1, numBuckets: 32,
    maxDistance: 128, layerNormEps: 1e-6, gatedGelu: true, tiedHead: false, scaleDecoderOutputs: false, dropoutRate: 0.1,
    padTokenId: 0, eosTokenId: 1, decoderStartTokenId: 0,
  };

  test('the session is disposed and the step error is the one reported, even when sync fails too', async () => {
    const calls: string[] = [];
    const session: TrainingSessionLike = {
      async step() { calls.push('step'); throw new TfewError('E_CUDA', 'the step failed'); },
      async sync() { calls.push('sync'); throw new DisposedError('sync after the model went away'); },
      async dispose() { calls.push('dispose'); },
    };
    const model: TrainableModel = {
      config, tokenizer: undefined, disposed: false,
      lossAndGradients: async () => { throw new Error('not used'); },
      rankClassify: async () => ({ predictions: [] }),
      createTrainingSession: async () => session,
    };
    const trainer = new Trainer(model, IA3Adapter.create(config), { steps: 3, batchSize: 1 });
    await expect(trainer.train([{ input: [5, 1], choices: [[3, 1], [4, 1]], label: 0 }])).rejects.toThrow('the step failed');
    expect(calls).toEqual(['step', 'sync', 'dispose']);
    // the trainer can run again
    await expect(trainer.train([{ input: [5, 1], choices: [[3, 1], [4, 1]], label: 0 }])).rejects.toThrow('the step failed');
  });

  test('without a step error, a failing sync is reported and the session still disposed', async () => {
    const calls: string[] = [];
    const session: TrainingSessionLike = {
      async step() { calls.push('step'); return { totalLoss: 1, lmLoss: 1, ulLoss: 0, lnLoss: 0, lr: 0.1, gradNorms: new Map() }; },
      async sync() { calls.push('sync'); throw new DisposedError('sync failed'); },
      async dispose() { calls.push('dispose'); },
    };
    const model: TrainableModel = {
      config, tokenizer: undefined, disposed: false,
      lossAndGradients: async () => { throw new Error('not used'); },
      rankClassify: async () => ({ predictions: [] }),
      createTrainingSession: async () => session,
    };
    const trainer = new Trainer(model, IA3Adapter.create(config), { steps: 1, batchSize: 1 });
    await expect(trainer.train([{ input: [5, 1], choices: [[3, 1], [4, 1]], label: 0 }])).rejects.toThrow('sync failed');
    expect(calls).toEqual(['step', 'sync', 'dispose']);
  });
});
