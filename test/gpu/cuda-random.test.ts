// The CUDA backend against the CPU reference backend on a random checkpoint of the T0-3B width (d_model 2048,
// d_ff 5120, 32 heads, vocab 32128; 2 + 2 layers), with long, unevenly padded inputs (300, 37, 128, 255 tokens),
// different numbers and lengths of choices, and a mixed batch of adapters.
//   fp32 mode: relative error <= 1e-4. bf16: twice PyTorch's bf16 error (bf16 vs fp32 HF on the same
//   checkpoint and batch, TFEW_BF16_ERRORS "random"), measured by benchmarks/pytorch_baseline.py.
// The checkpoint is TFEW_RANDOM_T5_DIR (written by benchmarks/device-check.sh) or written here to a temp dir.
// Skipped when CUDA is not usable here.
import { spawnSync } from 'child_process';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { IA3Adapter, T5Model } from '../../lib';
import { native } from '../../lib/native';
import { randomBatch, RandomBatch } from '../../benchmarks/random-t5';
import { maxRelError, relError } from '../helpers/reference';
import { argmaxRows, bf16Tolerance, clearWinners, describeCuda, loadCuda, Precision, randomAdapter, randomCheckpoint } from './helpers';

jest.setTimeout(600_000);

const FP32_TOL = 1e-4;

function checkpointDir(): string {
  return randomCheckpoint().dir; // T0-3B width on a GPU, a quarter of it on the emulator
}

function parityBatch(dir: string, vocab: number): RandomBatch {
  const file = path.join(dir, 'batch.json');
  if (fs.existsSync(file)) return JSON.parse(fs.readFileSync(file, 'utf8')) as RandomBatch;
  // the same batch benchmarks/random-t5.ts --batch-json writes (seed 1234 + 1)
  return randomBatch(vocab, [300, 37, 128, 255], [[3, 8], [5, 1, 7], [8, 8], [2, 6, 4, 3]], 1235);
}

describeCuda('CUDA vs CPU backend on a T0-3B-width random checkpoint', () => {
  let dir: string;
  let batch: RandomBatch;
  let cpu: T5Model;
  let adapters: IA3Adapter[];
  let perExample: (IA3Adapter | null)[];
  let cpuPlain: { logProbs: number[][]; scores: number[][] };
  let cpuMixed: { logProbs: number[][]; scores: number[][] };
  let cpuEncoder: Float32Array[];
  let cpuEncoderA: Float32Array[];  // with adapters[0]
  let uniform: RandomBatch;  // two choices per example (of different lengths): the folded cross-attention applies
  let cpuUniform: { logProbs: number[][]; scores: number[][] };
  let trainBatch: { inputIds: number[][]; choices: number[][][]; labels: number[] };
  let cpuTrain: Awaited<ReturnType<T5Model['lossAndGradients']>>;
  let uniformTrain: { inputIds: number[][]; choices: number[][][]; labels: number[] };
  let cpuUniformTrain: Awaited<ReturnType<T5Model['lossAndGradients']>>;
  let dModel: number;

  beforeAll(async () => {
    dir = checkpointDir();
    cpu = await T5Model.load(dir, { device: 'cpu' });
    batch = parityBatch(dir, cpu.config.vocabSize);
    adapters = [randomAdapter(cpu, 21), randomAdapter(cpu, 22)];
    perExample = [adapters[0], null, adapters[1], adapters[0]];
    cpuPlain = await cpu.rankClassify(batch.inputIds, batch.choices);
    cpuMixed = await cpu.rankClassify(batch.inputIds, batch.choices, { adapter: perExample });
    cpuEncoder = await cpu.encode(batch.inputIds);
    cpuEncoderA = await cpu.encode(batch.inputIds, { adapter: adapters[0] });
    uniform = randomBatch(cpu.config.vocabSize, [300, 37, 128, 255], [[3, 8], [5, 1], [8, 8], [2, 6]], 1236);
    cpuUniform = await cpu.rankClassify(uniform.inputIds, uniform.choices, { adapter: perExample });
    trainBatch = { inputIds: batch.inputIds, choices: batch.choices, labels: batch.choices.map((c, i) => (i + 1) % c.length) };
    cpuTrain = await cpu.lossAndGradients(trainBatch, { adapter: perExample });
    uniformTrain = { inputIds: uniform.inputIds, choices: uniform.choices, labels: [1, 0, 1, 0] };
    cpuUniformTrain = await cpu.lossAndGradients(uniformTrain, { adapter: perExample, dropout: true, seed: 3 });
    dModel = cpu.config.dModel;
    await cpu.dispose();
  });

  describe.each(['fp32', 'bf16'] as Precision[])('%s', (precision) => {
    let gpu: T5Model;
    beforeAll(async () => {
      gpu = await loadCuda(dir, precision);
    });
    afterAll(async () => {
      await gpu?.dispose();
    });
    const tol = (quantity: string) => (precision === 'fp32' ? FP32_TOL : bf16Tolerance(['random', quantity]));

    test('encoder states of every example (padding must not leak into real positions)', async () => {
      const enc = await gpu.encode(batch.inputIds);
      enc.forEach((e, b) => expect(relError(e, cpuEncoder[b])).toBeLessThan(tol('encoder_hidden')));
    });

    test('rank classification without adapters', async () => {
      const r = await gpu.rankClassify(batch.inputIds, batch.choices);
      expect(maxRelError(r.logProbs.flat(), cpuPlain.logProbs.flat())).toBeLessThan(tol('sum_logp'));
      expect(maxRelError(r.scores.flat(), cpuPlain.scores.flat())).toBeLessThan(tol('scores'));
      const expected = argmaxRows(cpuPlain.scores);
      expect(r.predictions).toEqual(argmaxRows(r.scores));
      const clear = clearWinners(cpuPlain.scores, 2 * tol('scores'));
      expect(clear.length).toBeGreaterThan(0);
      for (const b of clear) expect(r.predictions[b]).toBe(expected[b]);
    });

    let firstMixed: number[] | undefined; // the first call of this shape runs eagerly (no graph yet)

    test('mixed-task batch (two adapters and none)', async () => {
      const r = await gpu.rankClassify(batch.inputIds, batch.choices, { adapter: perExample });
      firstMixed = r.logProbs.flat();
      expect(maxRelError(r.logProbs.flat(), cpuMixed.logProbs.flat())).toBeLessThan(tol('sum_logp'));
      expect(maxRelError(r.scores.flat(), cpuMixed.scores.flat())).toBeLessThan(tol('scores'));
    });

    test('repeated calls of one shape (graph capture, then replays) give the eager result', async () => {
      const eager = firstMixed ?? (await gpu.rankClassify(batch.inputIds, batch.choices, { adapter: perExample })).logProbs.flat();
      for (let i = 0; i < 3; i++) {
        const again = await gpu.rankClassify(batch.inputIds, batch.choices, { adapter: perExample });
        expect(maxRelError(again.logProbs.flat(), eager)).toBeLessThan(1e-6);
      }
    });

    if (precision === 'bf16') {
      test('the fused encoder attention kernel agrees with the cuBLAS path (with adapters)', async () => {
        const unfused = await loadCuda(dir, 'bf16', {}, { fusedAttention: false, graphs: false });
        try {
          expect(gpu.describe()).toMatch(/encoder attention fused/);
          expect(unfused.describe()).toMatch(/encoder attention cuBLAS/);
          const a = await gpu.encode(batch.inputIds, { adapter: perExample });
          const b = await unfused.encode(batch.inputIds, { adapter: perExample });
          a.forEach((e, i) => expect(relError(e, b[i])).toBeLessThan(tol('encoder_hidden')));
          const ra = await gpu.rankClassify(batch.inputIds, batch.choices, { adapter: perExample });
          const rb = await unfused.rankClassify(batch.inputIds, batch.choices, { adapter: perExample });
          expect(maxRelError(ra.logProbs.flat(), rb.logProbs.flat())).toBeLessThan(tol('sum_logp'));
        } finally {
          await unfused.dispose();
        }
      });

      test('the first (WMMA) fused attention forward agrees with the mma.sync one (TFEW_CUDA_ATTENTION_KERNEL=wmma, a child process)', async () => {
        // The switch is read once per process, so the WMMA kernel runs in a child; same checkpoint, inputs, adapter.
        const work = fs.mkdtempSync(path.join(os.tmpdir(), 'tfew-wmma-'));
        try {
          await adapters[0].save(path.join(work, 'adapter'));
          const root = path.resolve(__dirname, '..', '..');
          const script = `
            const { T5Model, IA3Adapter } = require(${JSON.stringify(path.join(root, 'dist', 'lib'))});
            (async () => {
              const m = await T5Model.load(${JSON.stringify(dir)}, { device: 'cuda', cuda: { precision: 'bf16', graphs: false } });
              const a = await IA3Adapter.load(${JSON.stringify(path.join(work, 'adapter'))});
              const states = await m.encode(${JSON.stringify(batch.inputIds)}, { adapter: a });
              const out = { describe: m.describe(), states: states.map((e) => Array.from(e)) };
              await m.dispose();
              process.stdout.write(JSON.stringify(out));
            })().catch((e) => { process.stdout.write(JSON.stringify({ fatal: String(e) })); });`;
          const child = spawnSync(process.execPath, ['-e', script],
                                  { env: { ...process.env, TFEW_CUDA_ATTENTION_KERNEL: 'wmma' }, encoding: 'utf8', timeout: 600_000, maxBuffer: 1 << 30 });
          expect(child.status).toBe(0);
          const out = JSON.parse(child.stdout) as { describe?: string; states?: number[][]; fatal?: string };
          expect(out.fatal).toBeUndefined();
          expect(out.describe).toMatch(/encoder attention fused \(WMMA kernel\)/);
          expect(gpu.describe()).not.toMatch(/WMMA/);
          const mine = await gpu.encode(batch.inputIds, { adapter: adapters[0] });
          mine.forEach((e, i) => {
            const wmma = Float32Array.from(out.states![i]);
            // the two kernels differ only in summation order and roundings: each within the bf16 bound of the CPU
            expect(relError(wmma, cpuEncoderA[i])).toBeLessThan(tol('encoder_hidden'));
            expect(relError(e, cpuEncoderA[i])).toBeLessThan(tol('encoder_hidden'));
            expect(relError(e, wmma)).toBeLessThan(tol('encoder_hidden'));
          });
        } finally {
          fs.rmSync(work, { recursive: true, force: true });
        }
      });
    }

    test('folded cross-attention equals the CPU backend and the precomputed path; other batches fall back', async () => {
      const folded = await loadCuda(dir, precision, {}, { crossAttention: 'folded' });
      const precomputed = await loadCuda(dir, precision, {}, { crossAttention: 'precomputed' });
      try {
        expect(folded.describe()).toMatch(/cross-attention folded/);
        const rf = await folded.rankClassify(uniform.inputIds, uniform.choices, { adapter: perExample });
        const rp = await precomputed.rankClassify(uniform.inputIds, uniform.choices, { adapter: perExample });
        expect(maxRelError(rf.logProbs.flat(), cpuUniform.logProbs.flat())).toBeLessThan(tol('sum_logp'));
        expect(maxRelError(rf.scores.flat(), cpuUniform.scores.flat())).toBeLessThan(tol('scores'));
        expect(maxRelError(rp.logProbs.flat(), cpuUniform.logProbs.flat())).toBeLessThan(tol('sum_logp'));
        // a different number of choices per example cannot fold: the precomputed path, the same results
        const mixed = await folded.rankClassify(batch.inputIds, batch.choices, { adapter: perExample });
        expect(maxRelError(mixed.logProbs.flat(), cpuMixed.logProbs.flat())).toBeLessThan(tol('sum_logp'));
        // training folds too (long padded inputs, dropout, two adapters and an example without)
        const g = await folded.lossAndGradients(uniformTrain, { adapter: perExample, dropout: true, seed: 3 });
        const c = cpuUniformTrain;
        expect(maxRelError([g.lmLoss, g.ulLoss, g.lnLoss], [c.lmLoss, c.ulLoss, c.lnLoss]))
          .toBeLessThan(precision === 'fp32' ? FP32_TOL : 4 * tol('sum_logp'));
        for (const a of adapters)
          expect(relError(g.adapterGradients.get(a) as Float32Array, c.adapterGradients.get(a) as Float32Array)).toBeLessThan(precision === 'fp32' ? FP32_TOL : 0.1);
      } finally {
        await folded.dispose();
        await precomputed.dispose();
      }
    });

    if (precision === 'fp32') {
      test('every form of the norms (1, 2, 4 or 8 warps a row: _testing.normWarpsPerRow) agrees with the CPU backend', async () => {
        // The default picks the warps per row from the rows (rmsnorm.cu, norm_split): few rows (this batch, a
        // decoder) take several, many rows (RANK-3B-B32's encoder) one. Each form here, forward and backward, in
        // rank classification and in a training step with dropout (the fused residual add, the recomputed norm).
        const widths = [1, 2, 4, 8].filter((w) => (dModel / 128) % w === 0);
        expect(widths.length).toBeGreaterThanOrEqual(3);
        const seen = new Set<string>();
        try {
          for (const w of widths) {
            native()._testing.normWarpsPerRow!(w);
            const m = await loadCuda(dir, 'fp32', {}, { graphs: false });
            try {
              const r = await m.rankClassify(batch.inputIds, batch.choices, { adapter: perExample });
              expect([w, maxRelError(r.logProbs.flat(), cpuMixed.logProbs.flat()) < FP32_TOL]).toEqual([w, true]);
              seen.add(JSON.stringify(r.logProbs));
              const g = await m.lossAndGradients(uniformTrain, { adapter: perExample, dropout: true, seed: 3 });
              expect([w, maxRelError([g.totalLoss, g.lmLoss], [cpuUniformTrain.totalLoss, cpuUniformTrain.lmLoss]) < FP32_TOL]).toEqual([w, true]);
              for (const a of adapters)
                expect([w, relError(g.adapterGradients.get(a) as Float32Array, cpuUniformTrain.adapterGradients.get(a) as Float32Array) < FP32_TOL])
                  .toEqual([w, true]);
            } finally {
              await m.dispose();
            }
          }
        } finally {
          native()._testing.normWarpsPerRow!(0);
        }
        // the forms did run: their sums of squares in other orders give other bits somewhere
        expect(seen.size).toBeGreaterThan(1);
      });
    }

    test('training at this width: the T-Few losses and every adapter\'s (IA)3 gradient against the CPU backend', async () => {
      // long, unevenly padded inputs, 2-4 choices of different lengths, two adapters and an example without
      const g = await gpu.lossAndGradients(trainBatch, { adapter: perExample });
      const lossTol = precision === 'fp32' ? FP32_TOL : 4 * tol('sum_logp');
      expect(maxRelError([g.lmLoss, g.ulLoss, g.lnLoss, g.totalLoss], [cpuTrain.lmLoss, cpuTrain.ulLoss, cpuTrain.lnLoss, cpuTrain.totalLoss]))
        .toBeLessThan(lossTol);
      // bf16: a bound only a wrong kernel exceeds (the gradient tolerances proper are cuda-training's)
      const gradTol = precision === 'fp32' ? FP32_TOL : 0.1;
      for (const a of adapters) expect(relError(g.adapterGradients.get(a) as Float32Array, cpuTrain.adapterGradients.get(a) as Float32Array)).toBeLessThan(gradTol);
    });

    if (precision === 'bf16') {
      test('training: the fused encoder attention backward agrees with the cuBLAS one (long padded inputs, dropout)', async () => {
        // several 64-token tiles, an example of 37 tokens (its padded query tiles skipped), dropout on
        const fused = gpu;  // (the default since session 18)
        const cublas = await loadCuda(dir, 'bf16', {}, { fusedBackward: false });
        try {
          expect(fused.describe()).toMatch(/backward fused/);
          expect(cublas.describe()).toMatch(/backward cuBLAS/);
          const opts = { adapter: perExample, dropout: true, seed: 3, recompute: 'none' as const };
          const [f, c] = [await fused.lossAndGradients(uniformTrain, opts), await cublas.lossAndGradients(uniformTrain, opts)];
          expect(maxRelError([f.totalLoss], [c.totalLoss])).toBeLessThan(1e-2);
          // deterministic: each gradient element is summed by one block in a fixed order (no atomics)
          const again = await fused.lossAndGradients(uniformTrain, opts);
          expect(again.totalLoss).toBe(f.totalLoss);
          for (const a of adapters)
            expect(Array.from(again.adapterGradients.get(a) as Float32Array)).toEqual(Array.from(f.adapterGradients.get(a) as Float32Array));
          // 'none' reads each layer's attention output and softmax statistics as the forward kept them; 'attention'
          // runs the attention forward again in the backward: the same kernel on the same inputs, the same bits
          const rerun = await fused.lossAndGradients(uniformTrain, { ...opts, recompute: 'attention' });
          expect(rerun.totalLoss).toBe(f.totalLoss);
          for (const a of adapters)
            expect(Array.from(rerun.adapterGradients.get(a) as Float32Array)).toEqual(Array.from(f.adapterGradients.get(a) as Float32Array));
          // Both paths share the forward's bf16 activations and differ only in this backward's rounding: on the
          // emulator 1.9e-4 and 3.7e-4 over all vectors, at most 4.4e-3 on one encoder self-attention vector. A dq
          // kernel that forgets l_v on V (a mutation the earlier 2e-2 / 5e-2 bounds passed) gives 1.4e-3 and 1.2e-2;
          // a dkv kernel that forgets l_k on K, 6.2e-3 and 0.13.
          for (const a of adapters) {
            const fa = f.adapterGradients.get(a) as Float32Array;
            const ca = c.adapterGradients.get(a) as Float32Array;
            expect(relError(fa, ca)).toBeLessThan(1e-3);
            // the encoder's self-attention vectors, which only this backward produces
            for (const m of a.modules.filter((mm) => /^encoder\..*SelfAttention/.test(mm.name)))
              expect(relError(fa.subarray(m.offset, m.offset + m.length), ca.subarray(m.offset, m.offset + m.length))).toBeLessThan(1e-2);
          }
        } finally {
          await cublas.dispose();
        }
      });
    }

    if (precision === 'bf16') {
      test('the higher-occupancy attention kernels (cuda.attentionOccupancy) give the default kernels\' bits', async () => {
        // the same arithmetic compiled for one more block per SM (fewer registers, a few spilled): rank classification,
        // and training with dropout through the forward, its saved statistics and both backward kernels
        const high = await loadCuda(dir, 'bf16', {}, { attentionOccupancy: true });
        try {
          expect(high.describe()).toMatch(/higher-occupancy kernels/);
          expect(gpu.describe()).not.toMatch(/higher-occupancy/);
          const [h, d] = [await high.rankClassify(uniform.inputIds, uniform.choices, { adapter: perExample }),
            await gpu.rankClassify(uniform.inputIds, uniform.choices, { adapter: perExample })];
          expect(h.logProbs).toEqual(d.logProbs);
          const opts = { adapter: perExample, dropout: true, seed: 5, recompute: 'none' as const };
          const [ht, dt] = [await high.lossAndGradients(uniformTrain, opts), await gpu.lossAndGradients(uniformTrain, opts)];
          expect(ht.totalLoss).toBe(dt.totalLoss);
          for (const a of adapters)
            expect(Array.from(ht.adapterGradients.get(a) as Float32Array)).toEqual(Array.from(dt.adapterGradients.get(a) as Float32Array));
        } finally {
          await high.dispose();
        }
      });
    }

    test('editing an adapter in place is seen by the next call', async () => {
      const a = randomAdapter(gpu, 31);
      const before = await gpu.rankClassify(batch.inputIds, batch.choices, { adapter: a });
      a.data.fill(1);
      a.markChanged();
      const ones = await gpu.rankClassify(batch.inputIds, batch.choices, { adapter: a });
      const plain = await gpu.rankClassify(batch.inputIds, batch.choices);
      // scaling by exactly 1 is exact in any precision
      expect(maxRelError(ones.logProbs.flat(), plain.logProbs.flat())).toBeLessThan(1e-5);
      expect(maxRelError(before.logProbs.flat(), plain.logProbs.flat())).toBeGreaterThan(1e-4);
    });
  });
});
