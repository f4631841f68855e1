// Malformed calls on the CPU backend: seeded random arguments to every scoring and training entry point (wrong
// types, empty and ragged lists, ids out of the vocabulary, labels out of range, NaN and huge numbers, adapters of
// another shape, unknown options). Each call must resolve or reject with a typed error (a TfewError), never a
// TypeError or a crash, and the model must answer a valid call after with the same result as before
// (test/helpers/fuzz-calls.ts; test/gpu/cuda-fuzz-api.test.ts does the same on CUDA).
import { T5Model } from '../lib';
import { fuzzCalls } from './helpers/fuzz-calls';
import { loadFixture } from './helpers/reference';

jest.setTimeout(300_000);

// 300 cases in the suite; TFEW_FUZZ_CASES=20000 for a longer hunt (session 11: no failure)
const CASES = Number(process.env.TFEW_FUZZ_CASES) || 300;

test('random malformed arguments: a result or a typed error, and the model unharmed', async () => {
  const fx = loadFixture('tiny-gated-gelu-untied');
  const model = await T5Model.load(fx.dir, { device: 'cpu', threads: 2 });
  try {
    const calls = await fuzzCalls(model, fx, CASES);
    // eslint-disable-next-line no-console
    if (process.env.TFEW_FUZZ_CASES) console.log(JSON.stringify(calls));
  } finally {
    await model.dispose();
  }
});
