// Behaviour of the engine beyond the fixtures: gradients by finite differences (with dropout on), mixed-task
// gradients, determinism, bad input, dispose, concurrency, the event loop, and backend selection.
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import {
  DeviceUnavailableError, DisposedError, IA3Adapter, InvalidAdapterError, InvalidArgumentError, T5Model, Trainer,
} from '../lib';
import { buildBatch, trainingLengthMultiple } from '../lib/batch';
import { native } from '../lib/native';
import { buildTinyT5 } from '../lib/tiny';
import { normalFrom, seededRandom } from '../lib/random';
import { loadFixture, maxRelError } from './helpers/reference';

const rng = seededRandom;
const randn = normalFrom;
function randomBatch(r: () => number, n: number, vocab: number) {
  const ids = (len: number) => [...Array.from({ length: len - 1 }, () => 3 + Math.floor(r() * (vocab - 3))), 1];
  const inputIds = Array.from({ length: n }, () => ids(3 + Math.floor(r() * 10)));
  const choices = Array.from({ length: n }, () => Array.from({ length: 2 + Math.floor(r() * 3) }, () => ids(1 + Math.floor(r() * 5))));
  const labels = choices.map((c) => Math.floor(r() * c.length));
  return { inputIds, choices, labels };
}
function randomAdapter(model: T5Model, r: () => number, spread = 0.2): IA3Adapter {
  const a = IA3Adapter.create(model);
  for (let i = 0; i < a.data.length; i++) a.data[i] = 1 + spread * randn(r);
  a.markChanged();
  return a;
}

describe('gradients by finite differences', () => {
  let dir: string;
  let model: T5Model;
  beforeAll(async () => {
    // the fixture checkpoints with dropout switched on (rate 0.1)
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tfew-fd-'));
    for (const name of ['tiny-gated-gelu-untied', 'tiny-relu-tied']) {
      const src = loadFixture(name).dir;
      fs.mkdirSync(path.join(dir, name));
      fs.copyFileSync(path.join(src, 'model.safetensors'), path.join(dir, name, 'model.safetensors'));
      const cfg = JSON.parse(fs.readFileSync(path.join(src, 'config.json'), 'utf8'));
      cfg.dropout_rate = 0.1;
      fs.writeFileSync(path.join(dir, name, 'config.json'), JSON.stringify(cfg));
    }
  });
  afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

  test.each(['tiny-gated-gelu-untied', 'tiny-relu-tied'])('%s: directional derivatives match, dropout on, mixed adapters', async (name) => {
    model = await T5Model.load(path.join(dir, name), { device: 'cpu' });
    try {
      const r = rng(name.length * 7919);
      const batch = randomBatch(r, 4, model.config.vocabSize);
      const a = randomAdapter(model, r);
      const b = randomAdapter(model, r);
      const adapters = [a, b, a, b];
      const opts = { adapter: adapters, dropout: true, seed: 1234 };
      const g = await model.lossAndGradients(batch, opts);
      expect(g.adapterGradients.size).toBe(2);
      const loss = async () => (await model.lossAndGradients(batch, opts)).totalLoss;
      let worst = 0;
      for (const target of [a, b]) {
        const grad = g.adapterGradients.get(target) as Float32Array;
        // unit directions: along the gradient (the largest signal), then a random one within each module, so that a
        // part of the gradient that is missing or wrong shows in its own module's derivative
        const directions: Float32Array[] = [Float32Array.from(grad)];
        for (const m of target.modules) {
          directions.push(Float32Array.from({ length: target.data.length }, (_, i) => (i >= m.offset && i < m.offset + m.length ? randn(r) : 0)));
        }
        for (const v of directions) {
          const norm = Math.hypot(...v);
          for (let i = 0; i < v.length; i++) v[i] /= norm;
          let dot = 0;
          for (let i = 0; i < v.length; i++) dot += grad[i] * v[i];
          const eps = 1e-2;
          const saved = Float32Array.from(target.data);
          for (let i = 0; i < v.length; i++) target.data[i] = saved[i] + eps * v[i];
          target.markChanged();
          const up = await loss();
          for (let i = 0; i < v.length; i++) target.data[i] = saved[i] - eps * v[i];
          target.markChanged();
          const down = await loss();
          target.data.set(saved);
          target.markChanged();
          const fd = (up - down) / (2 * eps);
          // float32 activations put ~1e-5 of noise on a loss of ~30; central differences then agree to ~1e-4
          expect(Math.abs(fd - dot)).toBeLessThan(1e-2 * Math.abs(dot) + 5e-4);
          worst = Math.max(worst, Math.abs(fd - dot) / (1e-2 * Math.abs(dot) + 5e-4));
        }
      }
      // eslint-disable-next-line no-console
      console.log(`${name}: finite differences use ${(100 * worst).toFixed(0)}% of their tolerance at worst`);
    } finally {
      await model.dispose();
    }
  });

  test('dropout: deterministic under a seed, different across seeds, off by default', async () => {
    model = await T5Model.load(path.join(dir, 'tiny-gated-gelu-untied'), { device: 'cpu' });
    try {
      const batch = randomBatch(rng(5), 3, model.config.vocabSize);
      const a = IA3Adapter.create(model);
      const run = (o: object) => model.lossAndGradients(batch, { adapter: a, ...o });
      const s1 = await run({ dropout: true, seed: 1 });
      const s1b = await run({ dropout: true, seed: 1 });
      const s2 = await run({ dropout: true, seed: 2 });
      const off = await run({});
      const off2 = await run({ dropout: false, seed: 99 });
      expect(s1b.totalLoss).toBe(s1.totalLoss);
      expect(Array.from(s1b.adapterGradients.get(a) as Float32Array)).toEqual(Array.from(s1.adapterGradients.get(a) as Float32Array));
      expect(s2.totalLoss).not.toBe(s1.totalLoss);
      expect(off.totalLoss).not.toBe(s1.totalLoss);
      expect(off2.totalLoss).toBe(off.totalLoss);
    } finally {
      await model.dispose();
    }
  });
});

describe('API behaviour on the CPU backend', () => {
  const fx = loadFixture('tiny-gated-gelu-untied');
  let model: T5Model;
  beforeAll(async () => {
    model = await T5Model.load(fx.dir, { device: 'cpu', threads: 2 });
  });
  afterAll(async () => {
    await model.dispose();
  });

  test('reports the backend it runs on and why', () => {
    expect(model.device).toBe('cpu');
    expect(model.deviceReason).toMatch(/cpu/);
    expect(model.describe()).toMatch(/^cpu/);
  });

  test('choices may differ in number and length per example; lengthNormalize false gives the sums', async () => {
    const choices = [fx.choices[0].slice(0, 2), fx.choices[1], [fx.choices[2][0], [5, 6, 7, 8, 9, 10, 1]]];
    const r = await model.rankClassify(fx.inputIds, choices, { lengthNormalize: false });
    expect(r.scores.map((s) => s.length)).toEqual([2, 3, 2]);
    expect(r.scores).toEqual(r.logProbs);
    // the same example scored alone gives the same numbers (padding does not leak)
    const alone = await model.rankClassify([fx.inputIds[2]], [choices[2]], { lengthNormalize: false });
    alone.logProbs[0].forEach((v, j) => expect(v).toBeCloseTo(r.logProbs[2][j], 5));
  });

  test('bad input is a typed error and the model keeps working', async () => {
    await expect(model.rankClassify([[5, 999, 1]], [[[3, 1]]])).rejects.toBeInstanceOf(InvalidArgumentError);
    await expect(model.rankClassify([[5, -1, 1]], [[[3, 1]]])).rejects.toThrow(/vocabulary/);
    await expect(model.rankClassify([[5, 1]], [[]])).rejects.toBeInstanceOf(InvalidArgumentError);
    await expect(model.rankClassify([[]], [[[3, 1]]])).rejects.toBeInstanceOf(InvalidArgumentError);
    await expect(model.rankClassify([[5, 1], [6, 1]], [[[3, 1]]])).rejects.toBeInstanceOf(InvalidArgumentError);
    await expect(model.rankClassify(['text'], [['a']])).rejects.toThrow(/tokenizer/);
    await expect(model.lossAndGradients({ inputIds: [[5, 1]], choices: [[[3, 1], [4, 1]]], labels: [2] })).rejects.toBeInstanceOf(InvalidArgumentError);
    const wrong = IA3Adapter.create({ numLayers: 1, numDecoderLayers: 1, innerDim: 64, dFf: 96 });
    await expect(model.rankClassify([[5, 1]], [[[3, 1]]], { adapter: wrong })).rejects.toBeInstanceOf(InvalidAdapterError);
    await expect(model.rankClassify([[5, 1]], [[[3, 1]]], { adapter: [null, null] })).rejects.toBeInstanceOf(InvalidArgumentError);
    const ok = await model.rankClassify(fx.inputIds, fx.choices);
    expect(ok.predictions).toEqual(Array.from(fx.get('base.pred')));
  });

  test('bad CUDA options are typed errors, whatever the backend', async () => {
    const bad = [{ precision: 'fp16' }, { graphs: 'yes' }, { fusedAttention: 1 }, { fusedBackward: 'no' }, { fewRowLinears: 'on' }, { gemmTuning: 1 }, { programmaticLaunch: 'yes' }, { encoderChunkRows: -1 }, { encoderChunkRows: 2.5 }, { crossAttention: 'fast' }] as unknown as object[];
    for (const cuda of bad) await expect(T5Model.load(fx.dir, { device: 'cpu', threads: 1, cuda })).rejects.toBeInstanceOf(InvalidArgumentError);
    const batch = { inputIds: [[5, 1]], choices: [[[3, 1], [4, 1]]], labels: [0] };
    for (const recompute of ['yes', 'ffn', 1, null]) {
      await expect(model.lossAndGradients(batch, { recompute: recompute as unknown as boolean })).rejects.toBeInstanceOf(InvalidArgumentError);
      expect(() => new Trainer(model, IA3Adapter.create(model), { recompute: recompute as unknown as boolean })).toThrow(InvalidArgumentError);
    }
    // recompute is a CUDA memory option: the CPU backend gives the same result at every level
    const a = await model.lossAndGradients(batch, { adapter: IA3Adapter.create(model) });
    for (const recompute of [true, 'attention', 'all', 'none', 'auto'] as const) {
      const b = await model.lossAndGradients(batch, { adapter: IA3Adapter.create(model), recompute });
      expect(b.totalLoss).toBe(a.totalLoss);
    }
  });

  test('concurrent calls are safe and give the serial results', async () => {
    const serial = await model.rankClassify(fx.inputIds, fx.choices);
    const many = await Promise.all(Array.from({ length: 8 }, () => model.rankClassify(fx.inputIds, fx.choices)));
    for (const r of many) expect(r.scores).toEqual(serial.scores);
  });
});

// Two CPU models run at once (each call on its own libuv thread, each model with its own worker threads), sharing
// the process-wide buffer cache (cuda/cpu/scratch.h) with calls of different shapes: every result must equal the
// same call run alone.
test('two CPU models running at once, calls of mixed shapes: the results of calls run alone', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tfew-two-'));
  try {
    buildTinyT5(dir, { words: ['alpha', 'beta', 'gamma'], dModel: 96, dFf: 256, numLayers: 2, numHeads: 4, dKv: 24, seed: 9 });
    const [a, b] = await Promise.all([T5Model.load(dir, { device: 'cpu', threads: 2 }), T5Model.load(dir, { device: 'cpu', threads: 2 })]);
    try {
      const ids = (n: number, k: number) => [...Array.from({ length: n - 1 }, (_, i) => 2 + ((i * 5 + k) % 4)), 1];
      const batch = (n: number, k: number) => ({ inputIds: [ids(n, k), ids(n - 7, k + 1)], choices: [[ids(3, k), ids(2, k)], [ids(4, k), ids(2, k + 1)]], labels: [0, 1] });
      const adapter = IA3Adapter.create(a, 1.05);
      const jobs = [300, 260, 180, 300, 120, 240].map((n, k) => ({ n, k, train: k % 2 === 0 }));
      const run = (m: T5Model, j: { n: number; k: number; train: boolean }) => (j.train
        ? m.lossAndGradients(batch(j.n, j.k), { adapter, dropout: true, seed: j.k }).then((g) => [g.totalLoss, ...g.adapterGradients.get(adapter)!])
        : m.rankClassify(batch(j.n, j.k).inputIds, batch(j.n, j.k).choices, { adapter }).then((r) => r.scores.flat()));
      const alone: number[][] = [];
      for (const j of jobs) alone.push(await run(a, j));
      const together = await Promise.all(jobs.flatMap((j) => [run(a, j), run(b, j)]));
      jobs.forEach((_, i) => {
        expect(together[2 * i]).toEqual(alone[i]);
        expect(together[2 * i + 1]).toEqual(alone[i]);
      });
    } finally {
      await a.dispose();
      await b.dispose();
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

describe('lifecycle and the event loop', () => {
  test('dispose: later calls reject with DisposedError, dispose twice is fine, in-flight calls finish', async () => {
    const fx = loadFixture('tiny-relu-tied');
    const model = await T5Model.load(fx.dir, { device: 'cpu' });
    const inFlight = model.rankClassify(fx.inputIds, fx.choices);
    const disposing = model.dispose();
    // (the call in flight ran on live weights: the fixture's scores)
    expect(maxRelError((await inFlight).scores.flat(), fx.get('base.scores'))).toBeLessThan(1e-4);
    await disposing;
    expect(model.disposed).toBe(true);
    await expect(model.rankClassify(fx.inputIds, fx.choices)).rejects.toBeInstanceOf(DisposedError);
    await expect(model.lossAndGradients({ inputIds: fx.inputIds, choices: fx.choices, labels: fx.labels })).rejects.toBeInstanceOf(DisposedError);
    await model.dispose();
  });

  test('native work runs off the event loop', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tfew-loop-'));
    try {
      buildTinyT5(dir, { words: ['alpha', 'beta'], dModel: 128, dFf: 256, numLayers: 2, numHeads: 4, dKv: 32, seed: 3 });
      const model = await T5Model.load(dir, { device: 'cpu', threads: 1 });
      // (long enough to take well over 20 ms on a fast CPU: 16 examples of 256 tokens)
      const long = Array.from({ length: 16 }, (_, i) => Array.from({ length: 256 }, (_, t) => 3 + ((i + t) % 2)).concat([1]));
      const choices = long.map(() => [[3, 1], [4, 1]]);
      let ticks = 0;
      const timer = setInterval(() => ticks++, 1);
      const started = Date.now();
      await model.lossAndGradients({ inputIds: long, choices, labels: long.map(() => 0) }, { adapter: IA3Adapter.create(model) });
      const elapsed = Date.now() - started;
      clearInterval(timer);
      await model.dispose();
      expect(elapsed).toBeGreaterThan(20);
      expect(ticks).toBeGreaterThan(2);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('backend selection', () => {
  const probe = native().probeCuda();
  test('probeCuda says whether CUDA is usable and why not', () => {
    expect(typeof probe.usable).toBe('boolean');
    if (!probe.usable) expect(probe.reason.length).toBeGreaterThan(10);
  });
  (probe.usable ? test.skip : test)('without a usable GPU: auto falls back to the CPU with the reason, cuda is a typed error', async () => {
    const fx = loadFixture('tiny-relu-tied');
    const model = await T5Model.load(fx.dir);
    expect(model.device).toBe('cpu');
    expect(model.deviceReason).toContain(probe.reason);
    await model.dispose();
    await expect(T5Model.load(fx.dir, { device: 'cuda' })).rejects.toBeInstanceOf(DeviceUnavailableError);
    await expect(T5Model.load(fx.dir, { device: 'tpu' as never })).rejects.toBeInstanceOf(InvalidArgumentError);
    if (probe.deviceCount === 0) expect(probe.deviceIndex).toBe(-1);
    expect(model.gpuIndex).toBeNull();
  });
  test('a GPU index is checked on every backend: an integer >= 0', async () => {
    const fx = loadFixture('tiny-relu-tied');
    for (const device of [-1, 1.5, '1' as never, NaN]) {
      await expect(T5Model.load(fx.dir, { device: 'cpu', cuda: { device } })).rejects.toThrow(/cuda.device must be an integer >= 0/);
    }
    expect(() => T5Model.selectDevice('auto', -2)).toThrow(InvalidArgumentError);
    expect(() => native().probeCuda(-3)).toThrow(/probeCuda's device must be an integer >= 0/);
    expect(() => native().cudaMemoryInfo(0.5 as never)).toThrow(/cudaMemoryInfo's device must be an integer >= 0/);
    expect(native().probeCuda(7).usable).toBe(probe.usable && probe.deviceCount > 7);
  });
});

describe('training batches and the engines\' call limits', () => {
  test('buildInfo gives the limits of model/graph_buckets.h; a training batch pads its encoder length to the alignment', () => {
    const { encoderLengthAlignment, maxCallTokens } = native().buildInfo;
    expect(encoderLengthAlignment).toBe(8);
    expect(maxCallTokens).toBe(2 ** 24);
    expect(trainingLengthMultiple()).toBe(encoderLengthAlignment);
    const ex = (n: number) => ({ inputIds: Array.from({ length: n }, (_, i) => 2 + (i % 20)), choices: [[3, 1], [4, 5, 1]], label: 1, adapterIndex: -1 });
    const b = buildBatch([ex(25), ex(9)], 32, { withLabels: true, lengthMultiple: trainingLengthMultiple() });
    expect(b.encLen).toBe(32);
    expect(Array.from(b.encLengths)).toEqual([25, 9]);
    expect(Array.from(b.inputIds.subarray(25, 32))).toEqual(new Array(7).fill(0));  // masked padding
    // where rounding up would pass the positions one call may have, the exact length stays
    const long = Math.floor(maxCallTokens / 3) - 1;  // 3 examples: 3 x long fits, 3 x rounded does not
    const rounded = Math.ceil(long / 8) * 8;
    expect(3 * long).toBeLessThanOrEqual(maxCallTokens);
    expect(3 * rounded).toBeGreaterThan(maxCallTokens);
    expect(buildBatch([ex(long), ex(4), ex(4)], 32, { withLabels: true, lengthMultiple: 8 }).encLen).toBe(long);
  });
});
