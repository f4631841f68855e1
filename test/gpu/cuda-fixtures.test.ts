// The CUDA backend against the float64 golden outputs of HF transformers T5 + PEFT IA3 (test/fixtures), for
// both tiny checkpoints (T0 layout: gated-gelu, untied head; T5 v1.0 layout: relu, tied rescaled head), with
// and without adapters, and a mixed-task batch.
//   fp32 mode (cuda: { precision: 'fp32' }): relative error <= 1e-4, like the CPU backend.
//   bf16 (the default): no worse than twice PyTorch's own bf16 error on the same fixtures
//   (TFEW_BF16_ERRORS, measured by benchmarks/pytorch_baseline.py in the same device run).
// Skipped when CUDA is not usable here.
import * as path from 'path';
import { IA3Adapter, T5Model } from '../../lib';
import { CHECKPOINTS, loadFixture, maxRelError, relError } from '../helpers/reference';
import { argmaxRows, bf16Tolerance, clearWinners, describeCuda, loadCuda, Precision } from './helpers';

const FP32_TOL = 1e-4;

describeCuda('CUDA backend vs golden fixtures', () => {
  describe.each(CHECKPOINTS.flatMap((c) => (['fp32', 'bf16'] as Precision[]).map((p) => [c, p] as const)))('%s, %s', (name, precision) => {
    const fx = loadFixture(name);
    const B = 3;
    const C = 3;
    const Le = 12;
    const Lc = 5;
    const V = 128;
    const d = 64;
    let model: T5Model;
    let adapterA: IA3Adapter;
    let adapterB: IA3Adapter;

    beforeAll(async () => {
      model = await loadCuda(fx.dir, precision);
      adapterA = await IA3Adapter.load(path.join(fx.dir, 'adapter_a'));
      adapterB = await IA3Adapter.load(path.join(fx.dir, 'adapter_b'));
    });
    afterAll(async () => {
      await model?.dispose();
    });

    const tol = (variant: string, quantity: string) =>
      precision === 'fp32' ? FP32_TOL : bf16Tolerance(['fixtures', name, variant, quantity]);

    test('runs on the GPU', () => {
      expect(model.device).toBe('cuda');
      expect(model.describe()).toMatch(precision === 'fp32' ? /fp32 weights/ : /bf16 weights/);
    });

    for (const variant of ['base', 'ia3'] as const) {
      const adapter = () => (variant === 'ia3' ? adapterA : undefined);

      test(`${variant}: encoder states (real positions)`, async () => {
        const enc = await model.encode(fx.inputIds, { adapter: adapter() });
        const ref = fx.get(`${variant}.encoder_hidden`);
        for (let b = 0; b < B; b++) {
          const expected = ref.subarray(b * Le * d, (b * Le + fx.inputIds[b].length) * d);
          expect(relError(enc[b], expected)).toBeLessThan(tol(variant, 'encoder_hidden'));
        }
      });

      test(`${variant}: logits of every choice`, async () => {
        const logits = await model.choiceLogits(fx.inputIds, fx.choices, { adapter: adapter() });
        const ref = fx.get(`${variant}.logits`);
        for (let b = 0; b < B; b++)
          for (let c = 0; c < C; c++) {
            const start = (b * C + c) * Lc * V;
            expect(relError(logits[b][c], ref.subarray(start, start + fx.choices[b][c].length * V))).toBeLessThan(tol(variant, 'logits'));
          }
      });

      test(`${variant}: rank classification (sums, scores, predictions)`, async () => {
        const r = await model.rankClassify(fx.inputIds, fx.choices, { adapter: adapter() });
        expect(maxRelError(r.logProbs.flat(), fx.get(`${variant}.sum_logp`))).toBeLessThan(tol(variant, 'sum_logp'));
        const scoreTol = tol(variant, 'scores');
        expect(maxRelError(r.scores.flat(), fx.get(`${variant}.scores`))).toBeLessThan(scoreTol);
        const refScores = [0, 1, 2].map((b) => fx.get(`${variant}.scores`).subarray(b * C, (b + 1) * C));
        const expectedPred = Array.from(fx.get(`${variant}.pred`));
        expect(argmaxRows(refScores)).toEqual(expectedPred);
        // The predictions are the scores' argmax; with the scores within scoreTol, a prediction can only differ
        // from the reference's where its margin is within 2 x scoreTol (every example here has a wider one).
        expect(r.predictions).toEqual(argmaxRows(r.scores));
        const clear = clearWinners(refScores, 2 * scoreTol);
        expect(clear.length).toBeGreaterThan(0);
        for (const b of clear) expect(r.predictions[b]).toBe(expectedPred[b]);
      });
    }

    test('mixed-task batch: each example with its own adapter in one call', async () => {
      const which = Array.from(fx.get('mixed.adapter_of_example'));
      const perExample = which.map((a) => (a === 0 ? adapterA : adapterB));
      const r = await model.rankClassify(fx.inputIds, fx.choices, { adapter: perExample });
      // mixed has no PyTorch measurement of its own (PEFT cannot mix); the ia3 tolerance is the closest.
      expect(maxRelError(r.logProbs.flat(), fx.get('mixed.sum_logp'))).toBeLessThan(tol('ia3', 'sum_logp'));
      expect(maxRelError(r.scores.flat(), fx.get('mixed.scores'))).toBeLessThan(tol('ia3', 'scores'));
    });

    test('mixed-task batch equals running each example alone with its adapter', async () => {
      const perExample = [adapterA, null, adapterB];
      const mixed = await model.rankClassify(fx.inputIds, fx.choices, { adapter: perExample });
      for (let b = 0; b < B; b++) {
        const alone = await model.rankClassify([fx.inputIds[b]], [fx.choices[b]], { adapter: perExample[b] ?? undefined });
        // same kernels, different batch shape: only GEMM blocking may differ
        expect(maxRelError(mixed.logProbs[b], alone.logProbs[0])).toBeLessThan(precision === 'fp32' ? 1e-5 : 1e-2);
      }
    });
  });

  describe.each(CHECKPOINTS)('%s: merged adapter', (name) => {
    test('a model with adapter_a merged scores like the unmerged model with adapter_a (fp32 mode)', async () => {
      const fx = loadFixture(name);
      const adapterA = await IA3Adapter.load(path.join(fx.dir, 'adapter_a'));
      const merged = await loadCuda(fx.dir, 'fp32', { mergeAdapter: adapterA });
      try {
        const r = await merged.rankClassify(fx.inputIds, fx.choices);
        expect(maxRelError(r.logProbs.flat(), fx.get('ia3.sum_logp'))).toBeLessThan(1e-4);
        expect(r.predictions).toEqual(Array.from(fx.get('ia3.pred')));
      } finally {
        await merged.dispose();
      }
    });
  });
});
