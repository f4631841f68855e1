// Programmatic dependent launch (cuda.programmaticLaunch; cuda/kernels/launch.cuh): each of our kernels may be
// scheduled while the kernel before it finishes and waits for it on the GPU. It must change no result: rank
// classification and training steps (dropout on, mixed adapters) give the bits of ordinary launches, eager, captured
// and replayed, on both fixture checkpoints and with the few-row decoder linears (which request their first weight
// chunks before the wait). On the emulator every kernel of a call must be launched programmatically (the counts),
// and the emulator faults any thread of such a launch that ends without the wait (cuda-emulator-selftest).
import * as path from 'path';
import { IA3Adapter, T5Model } from '../../lib';
import { native } from '../../lib/native';
import { randomBatch } from '../../benchmarks/random-t5';
import { CHECKPOINTS, loadFixture } from '../helpers/reference';
import { describeCuda, emulated, loadCuda, randomAdapter, randomCheckpoint } from './helpers';

jest.setTimeout(600_000);

// The compute capability describe() names ("(cc 9.0, ..."): programmatic launch needs 9.0.
const computeCapability = (model: T5Model): number => Number(/\(cc (\d+\.\d+)/.exec(model.describe())![1]);

describeCuda('programmatic dependent launch (cuda.programmaticLaunch)', () => {
  describe.each(CHECKPOINTS)('%s', (name) => {
    const fx = loadFixture(name);
    let pdl: T5Model;
    let plain: T5Model;
    let adapters: (IA3Adapter | null)[];

    beforeAll(async () => {
      pdl = await loadCuda(fx.dir, 'bf16', {}, { programmaticLaunch: true });
      plain = await loadCuda(fx.dir, 'bf16', {}, { programmaticLaunch: false });
      const a = await IA3Adapter.load(path.join(fx.dir, 'adapter_a'));
      const b = await IA3Adapter.load(path.join(fx.dir, 'adapter_b'));
      adapters = fx.inputIds.map((_, i) => [a, b, null][i % 3]);
    });
    afterAll(async () => {
      await pdl?.dispose();
      await plain?.dispose();
    });

    test('the engine says whether its launches overlap', () => {
      if (computeCapability(pdl) >= 9) expect(pdl.describe()).toMatch(/programmatic dependent launch on/);
      else expect(pdl.describe()).toMatch(/programmatic dependent launch off \(it needs compute capability 9\.0\)/);
      expect(plain.describe()).not.toMatch(/programmatic/);
    });

    test('rank classification: the bits of ordinary launches, eager, captured and replayed', async () => {
      for (let round = 0; round < 3; round++) {
        const r = await pdl.rankClassify(fx.inputIds, fx.choices, { adapter: adapters });
        const p = await plain.rankClassify(fx.inputIds, fx.choices, { adapter: adapters });
        expect([round, r.logProbs]).toEqual([round, p.logProbs]);
        expect([round, r.scores]).toEqual([round, p.scores]);
      }
      // the launches were captured into graphs, programmatic edges and all (a capture that failed would turn graphs off)
      expect(pdl.describe()).toMatch(/CUDA graphs on/);
      expect(pdl.graphStats().replays).toBeGreaterThan(0);
    });

    test('training with dropout and mixed adapters: the bits of ordinary launches, eager, captured and replayed', async () => {
      const batch = { inputIds: fx.inputIds, choices: fx.choices, labels: fx.labels };
      const opts = { adapter: adapters.map((a, i) => a ?? adapters[(i + 1) % adapters.length]!), dropout: true, seed: 11 };
      for (let round = 0; round < 3; round++) {
        const g = await pdl.lossAndGradients(batch, opts);
        const p = await plain.lossAndGradients(batch, opts);
        expect([round, g.totalLoss, g.lmLoss, g.ulLoss, g.lnLoss]).toEqual([round, p.totalLoss, p.lmLoss, p.ulLoss, p.lnLoss]);
        for (const m of Object.keys(p.gradients)) expect([round, m, g.gradients[m]]).toEqual([round, m, p.gradients[m]]);
      }
    });
  });

  test('the few-row decoder linears (weights requested before the wait): the bits of ordinary launches', async () => {
    const dir = randomCheckpoint().dir;
    const pdl = await loadCuda(dir, 'bf16', {}, { programmaticLaunch: true, fewRowLinears: true });
    const plain = await loadCuda(dir, 'bf16', {}, { programmaticLaunch: false, fewRowLinears: true });
    try {
      expect(pdl.describe()).toMatch(/few-row decoder linears fused/);
      const adapter = randomAdapter(pdl, 41);
      const b = randomBatch(pdl.config.vocabSize, [73], [[7, 4]], 21);  // one example: 16 decoder rows
      for (let round = 0; round < 3; round++) {
        const r = await pdl.rankClassify(b.inputIds, b.choices, { adapter: [adapter] });
        const p = await plain.rankClassify(b.inputIds, b.choices, { adapter: [adapter] });
        expect([round, r.logProbs]).toEqual([round, p.logProbs]);
      }
    } finally {
      await pdl.dispose();
      await plain.dispose();
    }
  });

  // Every kernel of ours goes through TFEW_LAUNCH: with the option on, no kernel of a call is launched the ordinary
  // way (cuBLAS's GEMMs are not kernels on the emulator); with it off, none programmatically. The T0-layout random
  // checkpoint (d_model 512 on the emulator: the warp-per-row norms, the vectorised activations, the few-row linears)
  // at exact odd lengths, so that grids end in partly idle blocks (whose threads must wait too before they return).
  (emulated() ? test : test.skip)('every kernel of a call is launched programmatically with the option, none without (emulator counts)', async () => {
    const dir = randomCheckpoint().dir;
    const counts = native()._testing.emulatorLaunchCounts!;
    for (const on of [true, false]) {
      const model = await loadCuda(dir, 'bf16', {}, { programmaticLaunch: on, fewRowLinears: true, graphs: false, graphBuckets: false });
      try {
        const adapter = randomAdapter(model, 43);
        const one = randomBatch(model.config.vocabSize, [73], [[7, 5]], 22);  // few-row decoder
        const two = randomBatch(model.config.vocabSize, [37, 51], [[3, 7, 5], [6, 2, 7]], 23);  // 42 decoder rows: cuBLAS
        counts(true);
        await model.rankClassify(one.inputIds, one.choices, { adapter: [adapter] });
        await model.rankClassify(two.inputIds, two.choices, { adapter: [adapter, null] });
        await model.lossAndGradients({ ...two, labels: [1, 2] }, { adapter: [adapter, adapter], dropout: true, seed: 3 });
        const c = counts(true);
        expect([on, c.programmatic > 100, on ? c.ordinary : c.programmatic]).toEqual([on, on, 0]);
        if (!on) expect(c.ordinary).toBeGreaterThan(100);
      } finally {
        await model.dispose();
      }
    }
  });

  test('cuda.programmaticLaunch must be a boolean', async () => {
    await expect(loadCuda(randomCheckpoint().dir, 'bf16', {}, { programmaticLaunch: 'on' as unknown as boolean }))
      .rejects.toThrow(/cuda.programmaticLaunch must be a boolean/);
  });
});
