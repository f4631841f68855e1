// The T-Few optimizer (lib/optim.ts) against the float64 golden fixtures (HF Adafactor + clip_grad_norm_ +
// LambdaLR, see test/fixtures/README.md) and against independent formulations of the same maths.
// Optimizer steps are compared by their UPDATE (vector after minus before): the vectors sit near 1 and
// would hide a wrong update.
import * as path from 'path';
import { IA3Adapter, ia3Modules, type IA3Module } from '../lib/adapter';
import { readT5Config } from '../lib/config';
import { InvalidArgumentError } from '../lib/errors';
import { Adafactor, clipGradNorm, linearWarmupDecay, TfewOptimizer, warmupSteps, type FloatArray } from '../lib/optim';
import { readSafetensorsF64 } from '../lib/safetensors';
import { fixturesDir } from './helpers/paths';

const CHECKPOINTS = ['tiny-gated-gelu-untied', 'tiny-relu-tied'];
const TOLERANCE = 1e-4;

type TensorMap = Map<string, { shape: number[]; dtype: string; data: Float64Array }>;

interface Fixture {
  dir: string;
  modules: IA3Module[];
  size: number;
  ref: TensorMap;
  opt: TensorMap;
  /** The fixture tensors `<prefix><module name>` laid out flat in module order. */
  flat(map: TensorMap, prefix: string): Float64Array;
  scalar(map: TensorMap, key: string): number;
}

function loadFixture(name: string): Fixture {
  const dir = path.join(fixturesDir(), name);
  const modules = ia3Modules(readT5Config(dir));
  const size = modules.reduce((n, m) => Math.max(n, m.offset + m.length), 0);
  const ref = readSafetensorsF64(path.join(dir, 'reference.safetensors'));
  const opt = readSafetensorsF64(path.join(dir, 'optimizer.safetensors'));
  const get = (map: TensorMap, key: string) => {
    const t = map.get(key);
    if (!t) throw new Error(`fixture ${name} has no tensor ${key}`);
    return t;
  };
  return {
    dir,
    modules,
    size,
    ref,
    opt,
    flat(map, prefix) {
      const out = new Float64Array(size);
      for (const m of modules) {
        const t = get(map, prefix + m.name);
        expect(t.shape).toEqual(m.peftShape);
        out.set(t.data, m.offset);
      }
      return out;
    },
    scalar(map, key) {
      return get(map, key).data[0];
    },
  };
}

function diff(after: ArrayLike<number>, before: ArrayLike<number>): Float64Array {
  const out = new Float64Array(after.length);
  for (let i = 0; i < after.length; i++) out[i] = after[i] - before[i];
  return out;
}

/** Norm-based relative error ||actual - expected|| / ||expected||. */
function relErr(actual: ArrayLike<number>, expected: ArrayLike<number>): number {
  let num = 0;
  let den = 0;
  for (let i = 0; i < expected.length; i++) {
    num += (actual[i] - expected[i]) ** 2;
    den += expected[i] ** 2;
  }
  return Math.sqrt(num / den);
}

function norm(v: ArrayLike<number>): number {
  let s = 0;
  for (let i = 0; i < v.length; i++) s += v[i] * v[i];
  return Math.sqrt(s);
}

/** A deterministic pseudo-random vector (not Math.random: failures must reproduce). */
function randomVector(n: number, seed: number, scale = 1): Float64Array {
  let s = seed >>> 0;
  const out = new Float64Array(n);
  for (let i = 0; i < n; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    out[i] = ((s / 4294967296) * 2 - 1) * scale;
  }
  return out;
}

describe.each(CHECKPOINTS)('T-Few optimizer vs the fixtures of %s', (ckpt) => {
  const fx = loadFixture(ckpt);

  test('the module list covers exactly the fixture vectors', () => {
    const fixtureNames = [...fx.ref.keys()].filter((k) => k.startsWith('ia3.value.')).map((k) => k.slice('ia3.value.'.length));
    expect(fx.modules.map((m) => m.name).sort()).toEqual(fixtureNames.sort());
  });

  test('Adafactor step 1 (scale_parameter=false, lr 3e-3) from ia3.value with ia3.grad', () => {
    const before = fx.flat(fx.ref, 'ia3.value.');
    const params = before.slice();
    new Adafactor(fx.modules, { lr: 3e-3, scaleParameter: false }).step(params, fx.flat(fx.ref, 'ia3.grad.'));
    const expected = diff(fx.flat(fx.ref, 'adafactor.step1.'), before);
    expect(norm(expected)).toBeGreaterThan(0);
    expect(relErr(diff(params, before), expected)).toBeLessThan(TOLERANCE);
  });

  test('Adafactor step 1 on float32 parameters (the adapter storage) stays within tolerance', () => {
    const before = Float32Array.from(fx.flat(fx.ref, 'ia3.value.'));
    const params = before.slice();
    new Adafactor(fx.modules, { lr: 3e-3, scaleParameter: false }).step(params, fx.flat(fx.ref, 'ia3.grad.'));
    const expected = diff(fx.flat(fx.ref, 'adafactor.step1.'), fx.flat(fx.ref, 'ia3.value.'));
    expect(relErr(diff(params, before), expected)).toBeLessThan(TOLERANCE);
  });

  test('T-Few step 1 (scale_parameter, clipping, schedule step 30): lr, grad norm and update', () => {
    const before = fx.flat(fx.ref, 'ia3.value.');
    const params = before.slice();
    const grads = fx.flat(fx.ref, 'ia3.grad.');
    const gradsCopy = grads.slice();
    const opt = new TfewOptimizer(fx.modules, { lr: 3e-3, totalSteps: 1000, warmupRatio: 0.06, clipNorm: 1.0 });
    const info = opt.step(params, grads, { scheduleStep: 30 });
    expect(grads).toEqual(gradsCopy); // the caller's gradient is not clipped in place
    expect(Math.abs(info.lr - fx.scalar(fx.opt, 'tfew_opt.step1.lr'))).toBeLessThan(1e-12);
    const expectedNorm = fx.scalar(fx.opt, 'tfew_opt.step1.grad_norm_before_clip');
    expect(Math.abs(info.gradNorm - expectedNorm) / expectedNorm).toBeLessThan(TOLERANCE);
    expect(relErr(diff(params, before), diff(fx.flat(fx.opt, 'tfew_opt.step1.'), before))).toBeLessThan(TOLERANCE);
    expect(opt.scheduleStep).toBe(31);
  });

  // At step 1 Adafactor's update is about sign(g) whatever g's scale, so the test above cannot see the clipping.
  // Over two steps of different gradient norms it shows: clipping at 1 must equal feeding the gradients scaled to
  // norm 1 / (norm + 1e-6) (torch.nn.utils.clip_grad_norm_'s coefficient) with clipping off, and differ from no clip.
  test('clipping over two steps equals pre-scaling each gradient to the clip norm', () => {
    const before = fx.flat(fx.ref, 'ia3.value.');
    const norm = (g: ArrayLike<number>) => Math.sqrt(Array.from(g).reduce((a, x) => a + x * x, 0));
    const grad = fx.flat(fx.ref, 'ia3.grad.');
    const g1 = grad.map((x) => (5 * x) / norm(grad));  // norm 5
    const g2 = g1.map((x, i) => (i % 3 === 0 ? 7 * x : -0.5 * x));  // another direction and norm
    expect(Math.min(norm(g1), norm(g2))).toBeGreaterThan(1);  // (both clipped)
    const run = (clipNorm: number, grads: number[][]) => {
      const params = before.slice();
      const opt = new TfewOptimizer(fx.modules, { lr: 3e-3, totalSteps: 1000, warmupRatio: 0.06, clipNorm });
      grads.forEach((g) => opt.step(params, Float64Array.from(g), { scheduleStep: 30 }));
      return diff(params, before);
    };
    const scaled = (g: ArrayLike<number>) => Array.from(g, (x) => x / (norm(g) + 1e-6));
    const clipped = run(1, [Array.from(g1), Array.from(g2)]);
    expect(relErr(clipped, run(0, [scaled(g1), scaled(g2)]))).toBeLessThan(1e-12);
    expect(relErr(clipped, run(0, [Array.from(g1), Array.from(g2)]))).toBeGreaterThan(1e-2);
  });

  test('the schedule gives the fixture learning rates of steps 2 and 3 (schedule steps 31 and 61)', () => {
    const opt = new TfewOptimizer(fx.modules, {});
    expect(Math.abs(opt.lrAt(31) - fx.scalar(fx.opt, 'tfew_opt.step2.lr'))).toBeLessThan(1e-12);
    expect(Math.abs(opt.lrAt(61) - fx.scalar(fx.opt, 'tfew_opt.step3.lr'))).toBeLessThan(1e-12);
  });
});

// Steps 2 and 3 need the gradient at the vectors after the previous step: the engine computes it on the
// fixture batch (dropout off; the fixture configs have dropout 0).
describe.each(CHECKPOINTS)('optimizer steps 2-3 with engine gradients on %s', (ckpt) => {
  const fx = loadFixture(ckpt);
  // Loaded lazily so the fixture-only tests above run even while the engine is unavailable.
  // eslint-disable-next-line @typescript-eslint/no-var-requires
  const loadModel = () => (require('../lib/model') as typeof import('../lib/model')).T5Model.load(fx.dir, { device: 'cpu' });

  function fixtureBatch() {
    const ids = fx.ref.get('input_ids')!;
    const mask = fx.ref.get('attention_mask')!;
    const choices = fx.ref.get('choices')!;
    const labels = fx.ref.get('labels')!;
    const [batch, encLen] = ids.shape;
    const [, numChoices, decLen] = choices.shape;
    const inputIds: number[][] = [];
    const choiceIds: number[][][] = [];
    for (let b = 0; b < batch; b++) {
      const row: number[] = [];
      for (let t = 0; t < encLen; t++) if (mask.data[b * encLen + t] !== 0) row.push(ids.data[b * encLen + t]);
      inputIds.push(row);
      const cs: number[][] = [];
      for (let c = 0; c < numChoices; c++) {
        const tokens = Array.from(choices.data.subarray((b * numChoices + c) * decLen, (b * numChoices + c + 1) * decLen));
        while (tokens.length > 0 && tokens[tokens.length - 1] === 0) tokens.pop();
        cs.push(tokens);
      }
      choiceIds.push(cs);
    }
    return { inputIds, choices: choiceIds, labels: Array.from(labels.data) };
  }

  /** d total_loss / d vectors at `params` (float64, rounded to the adapter's float32). */
  async function engineGradient(model: import('../lib/model').T5Model, adapter: IA3Adapter, params: FloatArray) {
    adapter.data.set(params);
    adapter.markChanged();
    const g = await model.lossAndGradients(fixtureBatch(), { adapter, dropout: false });
    const grad = g.adapterGradients.get(adapter);
    if (!grad) throw new Error('no gradient for the adapter');
    return grad;
  }

  test('Adafactor step 2 (scale_parameter=false)', async () => {
    const model = await loadModel();
    try {
      const adapter = await IA3Adapter.load(path.join(fx.dir, 'adapter_a'));
      const adafactor = new Adafactor(fx.modules, { lr: 3e-3, scaleParameter: false });
      const params = fx.flat(fx.ref, 'ia3.value.');
      adafactor.step(params, fx.flat(fx.ref, 'ia3.grad.'));
      const afterStep1 = params.slice();
      adafactor.step(params, await engineGradient(model, adapter, afterStep1));
      const expected = diff(fx.flat(fx.ref, 'adafactor.step2.'), fx.flat(fx.ref, 'adafactor.step1.'));
      expect(relErr(diff(params, afterStep1), expected)).toBeLessThan(TOLERANCE);
    } finally {
      await model.dispose();
    }
  });

  test('T-Few optimizer steps 2 and 3 (schedule steps 31 and 61): lr, grad norm and update', async () => {
    const model = await loadModel();
    try {
      const adapter = await IA3Adapter.load(path.join(fx.dir, 'adapter_a'));
      const opt = new TfewOptimizer(fx.modules, {});
      const params = fx.flat(fx.ref, 'ia3.value.');
      opt.step(params, fx.flat(fx.ref, 'ia3.grad.'), { scheduleStep: 30 });
      for (const [k, scheduleStep] of [[2, 31], [3, 61]] as const) {
        const before = params.slice();
        const grad = await engineGradient(model, adapter, before);
        const info = opt.step(params, grad, { scheduleStep });
        expect(Math.abs(info.lr - fx.scalar(fx.opt, `tfew_opt.step${k}.lr`))).toBeLessThan(1e-12);
        const expectedNorm = fx.scalar(fx.opt, `tfew_opt.step${k}.grad_norm_before_clip`);
        expect(Math.abs(info.gradNorm - expectedNorm) / expectedNorm).toBeLessThan(TOLERANCE);
        // The fixture's update from its own previous vector (ours started from our previous vector).
        const fixtureBefore = fx.flat(fx.opt, `tfew_opt.step${k - 1}.`);
        const expected = diff(fx.flat(fx.opt, `tfew_opt.step${k}.`), fixtureBefore);
        expect(relErr(diff(params, before), expected)).toBeLessThan(TOLERANCE);
      }
    } finally {
      await model.dispose();
    }
  });
});

describe('Adafactor maths (independent formulations)', () => {
  const modules: IA3Module[] = [
    { name: 'col', offset: 0, length: 6, peftShape: [6, 1] },
    { name: 'row', offset: 6, length: 5, peftShape: [1, 5] },
  ];

  test('for [n,1] and [1,n] tensors the factored second moment equals a per-element running mean', () => {
    const opt = new Adafactor(modules, { lr: 1e-2, scaleParameter: true });
    const start = Float64Array.from({ length: 11 }, (_, i) => 1 + 0.05 * i);
    const params = start.slice();
    const ref = start.slice();
    const v = new Float64Array(11);
    for (let t = 1; t <= 4; t++) {
      const g = randomVector(11, 17 * t, 0.3);
      opt.step(params, g);
      // Per-element Adafactor, written out directly: v = EMA(g^2 + eps1), u = g / sqrt(v), clip, scale.
      const beta2 = 1 - Math.pow(t, -0.8);
      for (const m of modules) {
        const slice = ref.subarray(m.offset, m.offset + m.length);
        const lrT = 1e-2 * Math.max(1e-3, norm(slice) / Math.sqrt(m.length));
        const u = new Float64Array(m.length);
        for (let k = 0; k < m.length; k++) {
          const i = m.offset + k;
          v[i] = beta2 * v[i] + (1 - beta2) * (g[i] * g[i] + 1e-30);
          u[k] = g[i] / Math.sqrt(v[i]);
        }
        const clip = Math.max(1, norm(u) / Math.sqrt(m.length));
        for (let k = 0; k < m.length; k++) slice[k] -= (lrT * u[k]) / clip;
      }
      expect(relErr(diff(params, start), diff(ref, start))).toBeLessThan(1e-12);
    }
    expect(opt.stepCount).toBe(4);
  });

  test('a rank-1 squared gradient of a 2-D tensor is factored exactly: step 1 moves every value by lr * sign(g)', () => {
    const mod: IA3Module[] = [{ name: 'matrix', offset: 0, length: 12, peftShape: [3, 4] }];
    const a = [0.5, -2, 1.5];
    const b = [1, -0.25, 3, 0.75];
    const grads = new Float64Array(12);
    for (let i = 0; i < 3; i++) for (let j = 0; j < 4; j++) grads[i * 4 + j] = a[i] * b[j];
    const params = new Float64Array(12).fill(2);
    new Adafactor(mod, { lr: 0.1, scaleParameter: false }).step(params, grads);
    for (let k = 0; k < 12; k++) expect(params[k]).toBeCloseTo(2 - 0.1 * Math.sign(grads[k]), 10);
  });

  test('weight decay shrinks the parameter by weightDecay * lr_t before the update', () => {
    const g = randomVector(11, 5, 0.2);
    const p0 = Float64Array.from({ length: 11 }, (_, i) => 0.8 + 0.03 * i);
    const plain = p0.slice();
    const decayed = p0.slice();
    new Adafactor(modules, { lr: 1e-2 }).step(plain, g);
    new Adafactor(modules, { lr: 1e-2, weightDecay: 0.5 }).step(decayed, g);
    for (const m of modules) {
      const lrT = 1e-2 * Math.max(1e-3, norm(p0.subarray(m.offset, m.offset + m.length)) / Math.sqrt(m.length));
      for (let k = m.offset; k < m.offset + m.length; k++) {
        expect(decayed[k]).toBeCloseTo(plain[k] - 0.5 * lrT * p0[k], 12);
      }
    }
  });

  test('relative_step uses min(1e-2, 1/sqrt(t)) (and 1e-6 t with warmup_init) instead of lr', () => {
    const opt = new Adafactor(modules, { relativeStep: true, scaleParameter: false });
    expect(opt.effectiveLr(123, 1, 1)).toBeCloseTo(1e-2, 15);
    const warm = new Adafactor(modules, { relativeStep: true, warmupInit: true, scaleParameter: true });
    expect(warm.effectiveLr(123, 4, 0.5)).toBeCloseTo(0.5 * 4e-6, 15);
    expect(warm.effectiveLr(123, 4, 1e-5)).toBeCloseTo(1e-3 * 4e-6, 18);
  });

  test('bad shapes, lengths and options are InvalidArgumentError', () => {
    expect(() => new Adafactor([{ name: 'x', offset: 0, length: 5, peftShape: [2, 2] }])).toThrow(InvalidArgumentError);
    expect(() => new Adafactor(modules, { lr: 0 })).toThrow(InvalidArgumentError);
    expect(() => new Adafactor(modules, { decayRate: 0.5 })).toThrow(InvalidArgumentError);
    const opt = new Adafactor(modules);
    expect(() => opt.step(new Float64Array(10), new Float64Array(10))).toThrow(InvalidArgumentError);
    expect(() => new TfewOptimizer(modules, { totalSteps: 0 })).toThrow(InvalidArgumentError);
    expect(() => new TfewOptimizer(modules, {}).step(new Float64Array(11), new Float64Array(11), { scheduleStep: -1 })).toThrow(
      InvalidArgumentError,
    );
  });
});

describe('gradient clipping and schedule', () => {
  test('clipGradNorm scales to maxNorm / (norm + 1e-6) only when the norm exceeds maxNorm', () => {
    const big = randomVector(50, 3, 1);
    const before = big.slice();
    const n = clipGradNorm(big, 1.0);
    expect(n).toBeCloseTo(norm(before), 12);
    expect(n).toBeGreaterThan(1);
    for (let i = 0; i < 50; i++) expect(big[i]).toBeCloseTo((before[i] * 1.0) / (n + 1e-6), 14);
    expect(norm(big)).toBeLessThan(1);

    const small = randomVector(50, 4, 0.01);
    const smallBefore = small.slice();
    expect(clipGradNorm(small, 1.0)).toBeCloseTo(norm(smallBefore), 14);
    expect(small).toEqual(smallBefore);

    const off = big.slice();
    clipGradNorm(off, 0);
    expect(off).toEqual(big);
  });

  test('linear warmup from 0 then linear decay to 0 (T-Few: 60 of 1000 steps)', () => {
    const w = warmupSteps(1000, 0.06);
    expect(w).toBeCloseTo(60, 12);
    expect(linearWarmupDecay(0, 1000, w)).toBe(0);
    expect(linearWarmupDecay(60, 1000, w)).toBeCloseTo(1, 12);
    expect(linearWarmupDecay(1000, 1000, w)).toBe(0);
    expect(linearWarmupDecay(1200, 1000, w)).toBe(0);
    // Piecewise linear: midpoints of each segment are the means of its ends.
    expect(linearWarmupDecay(30, 1000, w)).toBeCloseTo(0.5, 12);
    expect(linearWarmupDecay(530, 1000, w)).toBeCloseTo(0.5, 12);
    // No warmup: starts at 1.
    expect(linearWarmupDecay(0, 10, 0)).toBe(1);
  });

  test('TfewOptimizer advances its own schedule one step per call', () => {
    const modules: IA3Module[] = [{ name: 'v', offset: 0, length: 4, peftShape: [4, 1] }];
    const opt = new TfewOptimizer(modules, { lr: 1e-2, totalSteps: 10, warmupRatio: 0.2 });
    const params = new Float64Array(4).fill(1);
    const lrs = [];
    for (let s = 0; s < 4; s++) lrs.push(opt.step(params, randomVector(4, s + 1, 0.1)).lr);
    expect(lrs.map((x) => x / 1e-2)).toEqual([0, 0.5, 1, 7 / 8].map((x) => expect.closeTo(x, 12)));
    // The first step has lr 0 in T-Few's schedule but still records Adafactor state.
    expect(opt.adafactor.stepCount).toBe(4);
  });
});
