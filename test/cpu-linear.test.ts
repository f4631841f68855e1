// The CPU backend's linear kernels (cuda/cpu/linear.cc) against a float64 computation, at sizes that hit every
// edge of their register blocks and job panels (rows not a multiple of 4, widths not a multiple of the vector
// width, one row, one column), with and without accumulation into dx and on 1 and 3 threads; once with the kernels
// this CPU gets (AVX2 + FMA where it has them) and once, in a child process, with TFEW_CPU_SIMD=baseline.
import { spawnSync } from 'child_process';
import * as path from 'path';
import { native } from '../lib/native';

// (70 x 40 x 1100: two 64-row blocks and two 1024-output chunks of the input gradient; 400 x 24 x 70: several row
// blocks of the forward, the last one short: three on one thread, six on three)
const SIZES: [number, number, number][] = [[1, 1, 1], [5, 17, 3], [9, 64, 130], [13, 96, 70], [4, 16, 16], [3, 200, 33], [70, 40, 1100], [400, 24, 70]];

// A deterministic generator shared by this file and the child process's script (below).
const GEN = `function gen(seed, len) { let s = seed >>> 0; const a = new Float32Array(len);
  for (let i = 0; i < len; i++) { s = (Math.imul(s, 1664525) + 1013904223) >>> 0; a[i] = s / 4294967296 - 0.5; } return a; }`;
// eslint-disable-next-line no-new-func
const gen = new Function(`${GEN}; return gen;`)() as (seed: number, len: number) => Float32Array;

interface Out { y: Float32Array | number[]; dx: Float32Array | number[]; simd: string }

function inputs(n: number, inDim: number, out: number, k: number) {
  return { x: gen(11 + k, n * inDim), w: gen(23 + k, out * inDim), dy: gen(37 + k, n * out), dx0: gen(41 + k, n * inDim) };
}

/** Relative error (max over elements, against the largest magnitude) of y and dx against float64 sums. */
function error(n: number, inDim: number, out: number, k: number, accumulate: boolean, got: Out): number {
  const { x, w, dy, dx0 } = inputs(n, inDim, out, k);
  let worst = 0;
  const cmp = (a: number, b: number, scale: number) => { worst = Math.max(worst, Math.abs(a - b) / scale); };
  for (let r = 0; r < n; r++)
    for (let o = 0; o < out; o++) {
      let s = 0, m = 0;
      for (let i = 0; i < inDim; i++) { s += x[r * inDim + i] * w[o * inDim + i]; m += Math.abs(x[r * inDim + i] * w[o * inDim + i]); }
      cmp(got.y[r * out + o], s, Math.max(m, 1e-6));
    }
  for (let r = 0; r < n; r++)
    for (let i = 0; i < inDim; i++) {
      let s = accumulate ? dx0[r * inDim + i] : 0, m = Math.abs(s);
      for (let o = 0; o < out; o++) { s += dy[r * out + o] * w[o * inDim + i]; m += Math.abs(dy[r * out + o] * w[o * inDim + i]); }
      cmp(got.dx[r * inDim + i], s, Math.max(m, 1e-6));
    }
  return worst;
}

type Runner = (n: number, inDim: number, out: number, k: number, accumulate: boolean, threads: number) => Promise<Out>;

async function worstOver(run: Runner): Promise<{ worst: number; simd: Set<string> }> {
  let worst = 0;
  const simd = new Set<string>();
  for (const [k, [n, inDim, out]] of SIZES.entries())
    for (const accumulate of [false, true])
      for (const threads of [1, 3]) {
        const got = await run(n, inDim, out, k, accumulate, threads);
        simd.add(got.simd);
        worst = Math.max(worst, error(n, inDim, out, k, accumulate, got));
      }
  return { worst, simd };
}

describe('CPU linear kernels', () => {
  test('the kernels this CPU gets: y = x W^T and dx (+)= dy W within 1e-6 of float64', async () => {
    const t = native()._testing;
    const { worst, simd } = await worstOver(async (n, inDim, out, k, accumulate, threads) => {
      const { x, w, dy, dx0 } = inputs(n, inDim, out, k);
      return t.cpuLinear(x, w, dy, accumulate ? dx0 : null, n, inDim, out, threads);
    });
    expect(simd.size).toBe(1);
    expect(['avx2+fma', 'baseline']).toContain([...simd][0]);
    expect(worst).toBeLessThan(1e-6);
  });

  test('TFEW_CPU_SIMD=baseline (in a child process): the baseline kernels, equally close', async () => {
    const root = path.resolve(__dirname, '..');
    const addon = process.env.TFEW_NATIVE_ADDON ?? '';
    const script = `${GEN}
      const addon = ${JSON.stringify(addon)} ? require(${JSON.stringify(addon)}) : require('node-gyp-build')(${JSON.stringify(root)});
      const sizes = ${JSON.stringify(SIZES)}; const out = [];
      (async () => {
        for (const [k, [n, i, o]] of sizes.entries()) for (const acc of [false, true]) for (const threads of [1, 3]) {
          const r = await addon._testing.cpuLinear(gen(11 + k, n * i), gen(23 + k, o * i), gen(37 + k, n * o), acc ? gen(41 + k, n * i) : null, n, i, o, threads);
          out.push({ y: Array.from(r.y), dx: Array.from(r.dx), simd: r.simd });
        }
        process.stdout.write(JSON.stringify(out));
      })();`;
    const child = spawnSync(process.execPath, ['-e', script], { env: { ...process.env, TFEW_CPU_SIMD: 'baseline' }, encoding: 'utf8', maxBuffer: 256 << 20 });
    expect(child.stderr).toBe('');
    const results = JSON.parse(child.stdout) as Out[];
    let next = 0;
    const { worst, simd } = await worstOver(async () => results[next++]);
    expect([...simd]).toEqual(['baseline']);
    expect(worst).toBeLessThan(1e-6);
  });
});
