// Malformed calls on the CUDA backend (the emulator, or a GPU): the same seeded random arguments as
// test/fuzz-api.test.ts, in both precisions. Each call resolves or rejects with a typed error, with no CUDA error
// left behind: the model answers a valid call after with the same result as before.
import { fuzzCalls } from '../helpers/fuzz-calls';
import { loadFixture } from '../helpers/reference';
import { describeCuda, loadCuda, Precision } from './helpers';

jest.setTimeout(600_000);

const CASES = Number(process.env.TFEW_FUZZ_CASES) || 150;

describeCuda('malformed calls on CUDA', () => {
  test.each(['fp32', 'bf16'] as Precision[])('%s: a result or a typed error, and the model unharmed', async (precision) => {
    const fx = loadFixture('tiny-gated-gelu-untied');
    const model = await loadCuda(fx.dir, precision);
    try {
      await fuzzCalls(model, fx, CASES);
    } finally {
      await model.dispose();
    }
  });
});
