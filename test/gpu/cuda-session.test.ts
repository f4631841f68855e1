// Training sessions on the CUDA backend (gpu/cuda_session.cc + kernels/adafactor.cu): vectors, gradients and
// Adafactor state in device memory. Checked against the same steps with the gradients copied to the host and
// lib/optim.ts applied there (identical gradients on the first step, so the updates must agree to fp32
// rounding), and against the fixtures' T-Few optimizer steps in the fp32 verification mode.
// Skipped when CUDA is not usable.
import * as path from 'path';
import { IA3Adapter, T5Model, TfewOptimizer } from '../../lib';
import { readSafetensorsF64 } from '../../lib/safetensors';
import { loadFixture, relError } from '../helpers/reference';
import { describeCuda, loadCuda } from './helpers';

jest.setTimeout(300_000);

describeCuda('CUDA training sessions', () => {
  const fx = loadFixture('tiny-gated-gelu-untied');
  const batch = () => ({ inputIds: fx.inputIds, choices: fx.choices, labels: fx.labels });

  test('one step: device Adafactor == host Adafactor on the same CUDA gradients (mixed adapters)', async () => {
    const model = await loadCuda(fx.dir, 'bf16');
    try {
      const a = await IA3Adapter.load(path.join(fx.dir, 'adapter_a'));
      const b = await IA3Adapter.load(path.join(fx.dir, 'adapter_b'));
      const per = [a, b, a];
      const options = { lr: 3e-3, totalSteps: 1000, warmupRatio: 0.06, clipNorm: 1.0, scaleParameter: true };
      const g = await model.lossAndGradients(batch(), { adapter: per, dropout: true, seed: 5 });
      const expected = new Map<IA3Adapter, Float32Array>();
      for (const x of [a, b]) {
        const v = Float32Array.from(x.data);
        new TfewOptimizer(x.modules, options).step(v, g.adapterGradients.get(x) as Float32Array, { scheduleStep: 30 });
        expected.set(x, v);
      }
      const before = new Map([a, b].map((x) => [x, Float32Array.from(x.data)] as const));
      const session = await model.createTrainingSession([a, b], options);
      const r = await session.step(batch(), { adapter: per, dropout: true, seed: 5, scheduleStep: 30 });
      await session.sync();
      await session.dispose();
      expect(Math.abs(r.totalLoss - g.totalLoss)).toBeLessThan(1e-6 * Math.abs(g.totalLoss));
      for (const x of [a, b]) {
        const b0 = before.get(x) as Float32Array;
        const got = Float64Array.from(x.data, (v, i) => v - b0[i]);
        const want = Float64Array.from(expected.get(x) as Float32Array, (v, i) => v - b0[i]);
        expect(relError(got, want)).toBeLessThan(1e-4);
      }
    } finally {
      await model.dispose();
    }
  });

  test('fp32 mode: three T-Few steps (schedule 30, 31, 61) follow tfew_opt.*', async () => {
    const model: T5Model = await loadCuda(fx.dir, 'fp32');
    try {
      const opt = readSafetensorsF64(path.join(fx.dir, 'optimizer.safetensors'));
      const adapter = IA3Adapter.create(model);
      for (const m of adapter.modules) adapter.set(m.name, fx.get(`ia3.value.${m.name}`));
      const session = await model.createTrainingSession([adapter], { lr: 3e-3, totalSteps: 1000, warmupRatio: 0.06, clipNorm: 1.0 });
      let previous = Float64Array.from(adapter.data);
      let mine = Float64Array.from(adapter.data);
      for (const [k, scheduleStep] of [[1, 30], [2, 31], [3, 61]] as const) {
        await session.step(batch(), { adapter, scheduleStep });
        await session.sync();
        const expected = Float64Array.from(adapter.modules.flatMap((m) => Array.from((opt.get(`tfew_opt.step${k}.${m.name}`) as { data: Float64Array }).data)));
        const update = Float64Array.from(adapter.data, (v, i) => v - mine[i]);
        expect(relError(update, expected.map((v, i) => v - previous[i]))).toBeLessThan(1e-3);
        previous = expected;
        mine = Float64Array.from(adapter.data);
      }
      await session.dispose();
    } finally {
      await model.dispose();
    }
  });
});
