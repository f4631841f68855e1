// Training sessions on the CUDA backend (gpu/cuda_session.cc + kernels/adafactor.cu): vectors, gradients and
// Adafactor state in device memory. Checked against the same steps with the gradients copied to the host and
// lib/optim.ts applied there (identical gradients, so the updates must agree to fp32 rounding), and against the
// fixtures' T-Few optimizer steps (updates, learning rates, gradient norms) in the fp32 verification mode.
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

  // Two steps, so that clipping and Adafactor's second-moment state count (at step 1 Adafactor's update is about
  // sign(g), whatever the clipping): each adapter clipped by its own gradient norm, with its own optimizer state.
  test('two steps: device Adafactor == host Adafactor on the same CUDA gradients (mixed adapters)', async () => {
    const model = await loadCuda(fx.dir, 'bf16');
    try {
      const a = await IA3Adapter.load(path.join(fx.dir, 'adapter_a'));
      const b = await IA3Adapter.load(path.join(fx.dir, 'adapter_b'));
      const per = [a, b, a];
      const options = { lr: 3e-3, totalSteps: 1000, warmupRatio: 0.06, clipNorm: 1.0, scaleParameter: true };
      // the host's copies of the vectors and optimizers, stepped with the gradients the engine gives at them
      const host = new Map([a, b].map((x) => [x, { v: Float32Array.from(x.data), opt: new TfewOptimizer(x.modules, options) }] as const));
      const session = await model.createTrainingSession([a, b], options);
      for (const [seed, scheduleStep] of [[5, 30], [6, 31]] as const) {
        // (a.data and b.data hold the vectors the session starts this step from: synced after the previous one)
        const g = await model.lossAndGradients(batch(), { adapter: per, dropout: true, seed });
        const before = new Map([a, b].map((x) => [x, Float32Array.from(x.data)] as const));
        const infos = new Map([a, b].map((x) => {
          const h = host.get(x)!;
          expect(h.v).toEqual(x.data);
          return [x, h.opt.step(h.v, g.adapterGradients.get(x) as Float32Array, { scheduleStep })] as const;
        }));
        const r = await session.step(batch(), { adapter: per, dropout: true, seed, scheduleStep });
        await session.sync();
        expect(Math.abs(r.totalLoss - g.totalLoss)).toBeLessThan(1e-6 * Math.abs(g.totalLoss));
        expect(Math.abs(r.lr - infos.get(a)!.lr)).toBeLessThan(1e-9 * infos.get(a)!.lr);
        for (const x of [a, b]) {
          const norm = infos.get(x)!.gradNorm;
          expect(norm).toBeGreaterThan(1);  // (clipped)
          expect(Math.abs(r.gradNorms.get(x)! - norm) / norm).toBeLessThan(1e-4);
          const b0 = before.get(x) as Float32Array;
          const got = Float64Array.from(x.data, (v, i) => v - b0[i]);
          const want = Float64Array.from(host.get(x)!.v, (v, i) => v - b0[i]);
          expect(relError(got, want)).toBeLessThan(1e-4);
          host.get(x)!.v.set(x.data);  // (the next step starts from the device's vectors, as the session does)
        }
      }
      await session.dispose();
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
      const scalar = (key: string) => (opt.get(key) as { data: Float64Array }).data[0];
      for (const [k, scheduleStep] of [[1, 30], [2, 31], [3, 61]] as const) {
        const r = await session.step(batch(), { adapter, scheduleStep });
        await session.sync();
        expect(Math.abs(r.lr - scalar(`tfew_opt.step${k}.lr`))).toBeLessThan(1e-9 * scalar(`tfew_opt.step${k}.lr`));
        const norm = scalar(`tfew_opt.step${k}.grad_norm_before_clip`);
        expect(Math.abs(r.gradNorms.get(adapter)! - norm) / norm).toBeLessThan(1e-4);
        const expected = Float64Array.from(adapter.modules.flatMap((m) => Array.from((opt.get(`tfew_opt.step${k}.${m.name}`) as { data: Float64Array }).data)));
        const update = Float64Array.from(adapter.data, (v, i) => v - mine[i]);
        expect(relError(update, expected.map((v, i) => v - previous[i]))).toBeLessThan(1e-4);
        previous = expected;
        mine = Float64Array.from(adapter.data);
      }
      await session.dispose();
    } finally {
      await model.dispose();
    }
  });
});
