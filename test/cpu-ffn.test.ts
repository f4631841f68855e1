// The CPU backend's FFN activation (cuda/cpu/ffn.cc) through the _testing.cpuFfnActivation hook, against a float64
// computation written here from Hugging Face's definitions: gated-gelu hidden = gelu_new(h0) * h1 with
// gelu_new(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), relu hidden = max(h0, 0), and their gradients.
// The range covers pre-activations far below zero: before session 20 the gated backward returned NaN below
// x ~ -10.05 (exp(-2u) overflowed and 1 - s was taken as inf * 0), which T5 v1.1's large activations can reach.
import * as fs from 'fs';
import { IA3Adapter, T5Model } from '../lib';
import { native } from '../lib/native';
import { loadFixture, scaledFfnNormCopy } from './helpers/reference';

interface FfnResult { hidden: Float32Array; dh0: Float32Array; dh1: Float32Array }
interface Hooks {
  cpuFfnActivation(o: { h0: Float32Array; h1?: Float32Array; dhidden: Float32Array; gated: boolean; n: number; dFf: number }): Promise<FfnResult>;
}
const hooks = (): Hooks => native()._testing as unknown as Hooks;

const K = Math.sqrt(2 / Math.PI);
const gelu = (x: number): number => 0.5 * x * (1 + Math.tanh(K * (x + 0.044715 * x ** 3)));
const geluGrad = (x: number): number => {
  const t = Math.tanh(K * (x + 0.044715 * x ** 3));
  return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * K * (1 + 3 * 0.044715 * x * x);
};

// pre-activations from -40 to 40, dense around the region where the old form overflowed
const xs = Float32Array.from([
  ...Array.from({ length: 161 }, (_, i) => -40 + i * 0.5),
  -10.2, -10.1, -10.06, -10.05, -10.04, -10.0, -9.9, -1e-3, 1e-3, -0.0,
]);
const n = xs.length;

describe('CPU FFN activation (gelu_new, relu) and its backward', () => {
  test('gated-gelu: values and gradients match float64, finite everywhere (no NaN far below zero)', async () => {
    const h1 = Float32Array.from(xs, (_, i) => 0.5 + 0.01 * (i % 7));
    const dhidden = Float32Array.from(xs, (_, i) => 1 - 0.02 * (i % 5));
    const r = await hooks().cpuFfnActivation({ h0: xs, h1, dhidden, gated: true, n, dFf: 1 });
    for (let i = 0; i < n; ++i) {
      const x = xs[i];
      const scale = Math.max(1, Math.abs(x));
      expect(Math.abs(r.hidden[i] - gelu(x) * h1[i])).toBeLessThanOrEqual(2e-6 * scale);
      expect(Math.abs(r.dh1[i] - dhidden[i] * gelu(x))).toBeLessThanOrEqual(2e-6 * scale);
      expect(Math.abs(r.dh0[i] - dhidden[i] * h1[i] * geluGrad(x))).toBeLessThanOrEqual(2e-6 * scale);
    }
    // far below zero the activation and both gradients are (signed) zeros, not NaN
    const at = (x: number) => xs.indexOf(Math.fround(x));
    for (const x of [-10.1, -12, -30, -40]) {
      expect(Number.isNaN(r.dh0[at(x)])).toBe(false);
      expect(Math.abs(r.dh0[at(x)])).toBe(0);
      expect(Math.abs(r.hidden[at(x)])).toBe(0);
    }
  });

  test('relu: max(x, 0) and a gradient passed through where x > 0 only', async () => {
    const dhidden = Float32Array.from(xs, (_, i) => 1 + 0.1 * (i % 3));
    const r = await hooks().cpuFfnActivation({ h0: xs, dhidden, gated: false, n, dFf: 1 });
    expect(r.dh1.length).toBe(0);
    for (let i = 0; i < n; ++i) {
      expect(r.hidden[i]).toBe(xs[i] > 0 ? xs[i] : 0);
      expect(r.dh0[i]).toBe(xs[i] > 0 ? dhidden[i] : 0);
    }
  });

  test('argument errors are typed', async () => {
    await expect(hooks().cpuFfnActivation({ h0: xs, dhidden: xs, gated: true, n, dFf: 1 })).rejects.toThrow(/'h1' must be a Float32Array/);
    await expect(hooks().cpuFfnActivation({ h0: xs, h1: xs, dhidden: xs, gated: true, n: n + 1, dFf: 1 })).rejects.toThrow(/'h0' must be a Float32Array/);
  });

  test('a model whose FFN pre-activations reach far below zero trains with finite losses and gradients', async () => {
    // the gated-gelu fixture with its FFN norms x40 (pre-activations down to about -30); before session 20 every
    // (IA)3 gradient below the first such FFN was NaN
    const fx = loadFixture('tiny-gated-gelu-untied');
    const dir = scaledFfnNormCopy(fx.dir, 40);
    const model = await T5Model.load(dir, { device: 'cpu', threads: 2 });
    try {
      const adapter = await IA3Adapter.load(`${fx.dir}/adapter_a`);
      const g = await model.lossAndGradients({ inputIds: fx.inputIds, choices: fx.choices, labels: fx.labels }, { adapter });
      expect(Number.isFinite(g.totalLoss)).toBe(true);
      let norm = 0;
      for (const m of adapter.modules) for (const v of g.gradients[m.name]) norm += v * v;
      expect(Number.isFinite(norm)).toBe(true);
      expect(norm).toBeGreaterThan(0);
    } finally {
      await model.dispose();
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});

