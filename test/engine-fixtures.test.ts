// The CPU backend through the public API against the float64 golden outputs of HF transformers T5 + PEFT IA3
// (test/fixtures, README there), for both tiny checkpoints: the T0 layout (gated-gelu, untied head) and the
// original T5 layout (relu, tied and rescaled head). Tolerance: relative error <= 1e-4.
import * as path from 'path';
import { IA3Adapter, T5Model } from '../lib';
import { CHECKPOINTS, loadFixture, maxRelError, relError } from './helpers/reference';

const TOL = 1e-4;

describe.each(CHECKPOINTS)('%s on the CPU backend', (name) => {
  const fx = loadFixture(name);
  let model: T5Model;
  let adapterA: IA3Adapter;
  let adapterB: IA3Adapter;

  beforeAll(async () => {
    model = await T5Model.load(fx.dir, { device: 'cpu', threads: 2 });
    adapterA = await IA3Adapter.load(path.join(fx.dir, 'adapter_a'));
    adapterB = await IA3Adapter.load(path.join(fx.dir, 'adapter_b'));
  });
  afterAll(async () => {
    await model.dispose();
  });

  const B = 3;
  const Le = 12;
  const Lc = 5;
  const V = 128;
  const d = 64;

  // The fixture tensors hold pad positions too; compare the real positions of each example / choice.
  function encoderReference(key: string, b: number): Float64Array {
    return fx.get(key).subarray(b * Le * d, (b * Le + fx.inputIds[b].length) * d);
  }
  function logitsReference(key: string, b: number, c: number): Float64Array {
    const start = ((b * 3 + c) * Lc) * V;
    return fx.get(key).subarray(start, start + fx.choices[b][c].length * V);
  }

  for (const variant of ['base', 'ia3'] as const) {
    const adapter = () => (variant === 'ia3' ? adapterA : undefined);

    test(`${variant}: encoder states`, async () => {
      const enc = await model.encode(fx.inputIds, { adapter: adapter() });
      for (let b = 0; b < B; b++) expect(relError(enc[b], encoderReference(`${variant}.encoder_hidden`, b))).toBeLessThan(TOL);
    });

    test(`${variant}: logits`, async () => {
      const logits = await model.choiceLogits(fx.inputIds, fx.choices, { adapter: adapter() });
      for (let b = 0; b < B; b++)
        for (let c = 0; c < 3; c++) expect(relError(logits[b][c], logitsReference(`${variant}.logits`, b, c))).toBeLessThan(TOL);
    });

    test(`${variant}: token log-probs, sums, scores and predictions (rank classification)`, async () => {
      const r = await model.rankClassify(fx.inputIds, fx.choices, { adapter: adapter() });
      expect(maxRelError(r.logProbs.flat(), fx.get(`${variant}.sum_logp`))).toBeLessThan(TOL);
      expect(maxRelError(r.scores.flat(), fx.get(`${variant}.scores`))).toBeLessThan(TOL);
      expect(r.predictions).toEqual(Array.from(fx.get(`${variant}.pred`)));
      // per-token log-probs: scores * length == sums, and the length is the non-pad count (eos counted)
      r.scores.forEach((row, b) => row.forEach((s, c) => expect(s * fx.choices[b][c].length).toBeCloseTo(r.logProbs[b][c], 4)));
    });

    test(`${variant}: the three losses and their total`, async () => {
      const g = await model.lossAndGradients({ inputIds: fx.inputIds, choices: fx.choices, labels: fx.labels },
        { adapter: adapter() ?? IA3Adapter.create(model) });
      // (a ones-adapter changes nothing in the forward, so base losses are checked through it)
      expect(maxRelError([g.lmLoss], fx.get(`${variant}.lm_loss`))).toBeLessThan(TOL);
      expect(maxRelError([g.ulLoss], fx.get(`${variant}.ul_loss`))).toBeLessThan(TOL);
      expect(maxRelError([g.lnLoss], fx.get(`${variant}.ln_loss`))).toBeLessThan(TOL);
      expect(maxRelError([g.totalLoss], fx.get(`${variant}.total_loss`))).toBeLessThan(TOL);
    });
  }

  test('ia3: adapter_a loaded from PEFT files equals ia3.value.*', () => {
    for (const m of adapterA.modules) expect(relError(adapterA.get(m.name), fx.get(`ia3.value.${m.name}`))).toBeLessThan(1e-7);
  });

  test.each([
    ['grad', { lmWeight: 1, ulWeight: 1, lnWeight: 1 }],
    ['grad_lm_loss', { lmWeight: 1, ulWeight: 0, lnWeight: 0 }],
    ['grad_ul_loss', { lmWeight: 0, ulWeight: 1, lnWeight: 0 }],
    ['grad_ln_loss', { lmWeight: 0, ulWeight: 0, lnWeight: 1 }],
  ])('ia3.%s.*: gradients of every (IA)3 vector', async (key, weights) => {
    const g = await model.lossAndGradients({ inputIds: fx.inputIds, choices: fx.choices, labels: fx.labels }, { adapter: adapterA, ...weights });
    expect(Object.keys(g.gradients).sort()).toEqual(adapterA.modules.map((m) => m.name).sort());
    for (const m of adapterA.modules) {
      const err = relError(g.gradients[m.name], fx.get(`ia3.${key}.${m.name}`));
      if (err >= TOL) throw new Error(`${key} ${m.name}: relative error ${err}`);
    }
  });

  test('mixed-task batch: adapters [a, b, a] in one pass give mixed.scores', async () => {
    expect(Array.from(fx.get('mixed.adapter_of_example'))).toEqual([0, 1, 0]);
    const r = await model.rankClassify(fx.inputIds, fx.choices, { adapter: [adapterA, adapterB, adapterA] });
    expect(maxRelError(r.scores.flat(), fx.get('mixed.scores'))).toBeLessThan(TOL);
    expect(maxRelError(r.logProbs.flat(), fx.get('mixed.sum_logp'))).toBeLessThan(TOL);
  });

  test('merging adapter_a into a copy of the weights equals the unmerged path', async () => {
    const merged = await model.withMergedAdapter(adapterA);
    try {
      const a = await merged.rankClassify(fx.inputIds, fx.choices);
      const b = await model.rankClassify(fx.inputIds, fx.choices, { adapter: adapterA });
      expect(maxRelError(a.scores.flat(), b.scores.flat())).toBeLessThan(1e-5);
      expect(a.predictions).toEqual(b.predictions);
      // the original model is unchanged
      const base = await model.rankClassify(fx.inputIds, fx.choices);
      expect(maxRelError(base.scores.flat(), fx.get('base.scores'))).toBeLessThan(TOL);
    } finally {
      await merged.dispose();
    }
  });
});
