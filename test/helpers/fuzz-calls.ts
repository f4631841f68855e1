// Seeded malformed calls to a model's scoring and training entry points (test/fuzz-api.test.ts on the CPU
// backend, test/gpu/cuda-fuzz-api.test.ts on CUDA): each must resolve or reject with a TfewError, and the model must
// answer a valid call after with the same result as before.
import { IA3Adapter, T5Model, TfewError } from '../../lib';
import { seededRandom } from '../../lib/random';
import { FixtureBatch, loadFixture } from './reference';

/** Runs `cases` random calls on `model` (the fixture tiny-gated-gelu-untied); returns the outcomes counted. */
export async function fuzzCalls(model: T5Model, fx: FixtureBatch, cases: number): Promise<Record<string, number>> {
  const other = await T5Model.load(loadFixture('tiny-relu-tied').dir, { device: 'cpu', threads: 1 });
  try {
    const V = model.config.vocabSize;
    const r = seededRandom(4242);
    const pick = <T>(xs: readonly T[]): T => xs[Math.floor(r() * xs.length)];
    const id = (): unknown => pick([1, 2, 5, V - 1, V, -1, 0, 1.5, NaN, 2 ** 40, '3', null]);
    const ids = (): unknown => (r() < 0.04 ? pick([[], null, 'text', 7, {}]) : [...Array.from({ length: Math.floor(r() * 6) }, () => (r() < 0.97 ? 2 + Math.floor(r() * (V - 2)) : id())), 1]);
    const list = <T>(f: () => T, n = 3): unknown => (r() < 0.04 ? pick([null, [], 'x', 3]) : Array.from({ length: Math.floor(r() * n) + 1 }, f));
    const adapters = [null, IA3Adapter.create(model, 1.1), IA3Adapter.create(other, 1.1), 'adapter', 3, {}];
    const adapter = (): unknown => (r() < 0.2 ? list(() => pick(adapters), 4) : r() < 0.5 ? adapters[1] : pick(adapters));
    const options = (): Record<string, unknown> => {
      const o: Record<string, unknown> = {};
      if (r() < 0.4) o.adapter = adapter();
      if (r() < 0.15) o.batchSize = pick([0, -1, 1, 2.5, NaN, 1e9, '2']);
      if (r() < 0.15) o.maxInputLength = pick([0, 1, 3, 2.5, -4]);
      if (r() < 0.15) o.lengthNormalize = pick([true, false, 'yes', 0]);
      if (r() < 0.15) o.dropout = pick([true, false, 1]);
      if (r() < 0.15) o.seed = pick([0, 7, -1, 0.5, 2 ** 60]);
      if (r() < 0.1) o.lmWeight = pick([1, 0, -1, NaN, Infinity]);
      if (r() < 0.1) o.recompute = pick(['all', 'nope', true]);
      return o;
    };
    const valid = { inputIds: fx.inputIds, choices: fx.choices, labels: fx.labels };
    const before = await model.lossAndGradients(valid);
    const beforeScores = (await model.rankClassify(fx.inputIds, fx.choices)).scores;
    const calls: Record<string, number> = {};
    for (let k = 0; k < cases; k++) {
      const n = Math.floor(r() * 3) + 1;
      const inputs = list(ids, n);
      const choices = list(() => list(ids, 3), n);
      const which = pick(['rankClassify', 'lossAndGradients', 'encode', 'choiceLogits'] as const);
      let call: () => Promise<unknown>;
      if (which === 'lossAndGradients') {
        const labels = list(() => (r() < 0.9 ? 0 : pick([1, 2, -1, 0.5, NaN, 9])), n);
        call = () => model.lossAndGradients({ inputIds: inputs, choices, labels } as never, options() as never);
      } else if (which === 'encode') {
        call = () => model.encode(inputs as never, options() as never);
      } else {
        call = () => (model[which] as (a: unknown, b: unknown, c: unknown) => Promise<unknown>)(inputs, choices, options());
      }
      try {
        await call();
        calls[`${which} ok`] = (calls[`${which} ok`] ?? 0) + 1;
      } catch (e) {
        if (!(e instanceof TfewError)) throw new Error(`case ${k} (${which}): ${(e as Error)?.constructor?.name}: ${(e as Error)?.message ?? e}`);
        calls[`${which} ${e.code}`] = (calls[`${which} ${e.code}`] ?? 0) + 1;
      }
    }
    // both outcomes were reached for the scoring and training calls
    for (const which of ['rankClassify', 'lossAndGradients']) {
      expect(calls[`${which} ok`]).toBeGreaterThan(0);
      expect(calls[`${which} E_INVALID_ARGUMENT`] ?? 0).toBeGreaterThan(0);
    }
    const after = await model.lossAndGradients(valid);
    expect(after.totalLoss).toBe(before.totalLoss);
    expect((await model.rankClassify(fx.inputIds, fx.choices)).scores).toEqual(beforeScores);
    return calls;
  } finally {
    await other.dispose();
  }
}
