// The native training session (cuda/model/host_training.cc: clipping, schedule and HF Adafactor in C++, the
// path a backend runs without JavaScript in the loop) against the float64 fixtures and against lib/optim.ts.
// Updates (after minus before) are compared, not raw vectors, which sit near 1 and would hide a wrong update.
import * as path from 'path';
import { DisposedError, IA3Adapter, InvalidArgumentError, T5Model, Trainer } from '../lib';
import { readSafetensorsF64 } from '../lib/safetensors';
import { CHECKPOINTS, loadFixture, relError } from './helpers/reference';

describe.each(CHECKPOINTS)('%s: native training session', (name) => {
  const fx = loadFixture(name);
  const opt = readSafetensorsF64(path.join(fx.dir, 'optimizer.safetensors'));
  let model: T5Model;
  beforeAll(async () => {
    model = await T5Model.load(fx.dir, { device: 'cpu', threads: 2 });
  });
  afterAll(async () => {
    await model.dispose();
  });

  const batch = () => ({ inputIds: fx.inputIds, choices: fx.choices, labels: fx.labels });
  const fixtureAdapter = (prefix: string, from: Map<string, { data: Float64Array }>): IA3Adapter => {
    const a = IA3Adapter.create(model);
    for (const m of a.modules) a.set(m.name, (from.get(prefix + m.name) as { data: Float64Array }).data);
    return a;
  };

  test('the T-Few optimizer (clipping, schedule steps 30, 31, 61, Adafactor with scale_parameter) matches tfew_opt.*', async () => {
    const adapter = fixtureAdapter('ia3.value.', fx.ref as never);
    const session = await model.createTrainingSession([adapter], { lr: 3e-3, totalSteps: 1000, warmupRatio: 0.06, clipNorm: 1.0, scaleParameter: true });
    let before = Float64Array.from(adapter.data);
    // one optimizer (its state carries over), schedule positions 30, 31, 61 as the fixture took them
    let previous = Float64Array.from(adapter.data);
    for (const [k, scheduleStep] of [[1, 30], [2, 31], [3, 61]] as const) {
      const r = await session.step(batch(), { adapter, scheduleStep });
      await session.sync();
      const expected = fixtureAdapter(`tfew_opt.step${k}.`, opt as never);
      const update = adapter.data.map((v, i) => v - before[i]);
      const expectedUpdate = Float64Array.from(expected.data, (v, i) => v - previous[i]);
      previous = Float64Array.from(expected.data);
      expect(relError(update, expectedUpdate)).toBeLessThan(1e-4);
      expect(r.lr).toBeCloseTo((opt.get(`tfew_opt.step${k}.lr`) as { data: Float64Array }).data[0], 12);
      const norm = (opt.get(`tfew_opt.step${k}.grad_norm_before_clip`) as { data: Float64Array }).data[0];
      expect(Math.abs((r.gradNorms.get(adapter) as number) - norm) / norm).toBeLessThan(1e-4);
      before = Float64Array.from(adapter.data);
    }
    await session.dispose();
  });

  test('plain Adafactor (scale_parameter false, constant lr) matches adafactor.step1/2', async () => {
    const adapter = fixtureAdapter('ia3.value.', fx.ref as never);
    // a schedule so long that its factor stays 1 to 1e-9, and no clipping: HF Adafactor alone
    const session = await model.createTrainingSession([adapter], { lr: 3e-3, totalSteps: 1e9, warmupRatio: 0, clipNorm: 0, scaleParameter: false });
    let before = Float64Array.from(adapter.data);
    for (const k of [1, 2]) {
      await session.step(batch(), { adapter });
      await session.sync();
      const expected = fixtureAdapter(`adafactor.step${k}.`, fx.ref as never);
      const update = adapter.data.map((v, i) => v - before[i]);
      expect(relError(update, Float64Array.from(expected.data, (v, i) => v - before[i]))).toBeLessThan(1e-4);
      before = Float64Array.from(adapter.data);
    }
    await session.dispose();
  });

  test('Trainer: the native optimizer and lib/optim.ts give the same run (mixed adapters, dropout)', async () => {
    const examples = fx.inputIds.flatMap((input, b) => [0, 1].map((k) => ({ input, choices: fx.choices[b], label: (fx.labels[b] + k) % 3 })));
    const run = async (nativeOptimizer: boolean) => {
      const a = IA3Adapter.create(model);
      const b = IA3Adapter.create(model);
      const trainer = new Trainer(model, a, { steps: 6, batchSize: 4, lr: 0.05, seed: 3, nativeOptimizer });
      const result = await trainer.train(examples.map((e, i) => ({ ...e, adapter: i % 2 ? b : a })));
      return { a, b, losses: result.losses };
    };
    const host = await run(false);
    const nat = await run(true);
    nat.losses.forEach((l, i) => expect(Math.abs(l - host.losses[i])).toBeLessThan(1e-5 * Math.abs(host.losses[i])));
    const delta = (x: IA3Adapter) => Float64Array.from(x.data, (v) => v - 1);
    expect(relError(delta(nat.a), delta(host.a))).toBeLessThan(1e-4);
    expect(relError(delta(nat.b), delta(host.b))).toBeLessThan(1e-4);
    expect(Math.max(...delta(nat.b).map(Math.abs))).toBeGreaterThan(1e-3); // b really trained
  });

  test('disposing the model ends its sessions', async () => {
    const m = await T5Model.load(fx.dir, { device: 'cpu' });
    const a = IA3Adapter.create(m);
    const session = await m.createTrainingSession([a]);
    await session.step(batch(), { adapter: a });
    await m.dispose();
    await expect(session.step(batch(), { adapter: a })).rejects.toBeInstanceOf(DisposedError);
    await expect(session.sync()).rejects.toBeInstanceOf(DisposedError);
    await session.dispose(); // still fine
  });

  test('bad use is a typed error', async () => {
    const a = IA3Adapter.create(model);
    const other = IA3Adapter.create(model);
    await expect(model.createTrainingSession([])).rejects.toBeInstanceOf(InvalidArgumentError);
    await expect(model.createTrainingSession([a, a])).rejects.toBeInstanceOf(InvalidArgumentError);
    await expect(model.createTrainingSession([a], { lr: -1 })).rejects.toBeInstanceOf(InvalidArgumentError);
    const session = await model.createTrainingSession([a]);
    await expect(session.step(batch(), { adapter: other })).rejects.toBeInstanceOf(InvalidArgumentError);
    await session.dispose();
    await expect(session.step(batch(), { adapter: a })).rejects.toBeInstanceOf(DisposedError);
  });
});
