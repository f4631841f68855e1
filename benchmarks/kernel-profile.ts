// The workload for device-check's "ncu" step: Nsight Compute reads the hardware counters of our own kernels (the
// encoder attention forward and backward, the norms, the FFN activation, the softmaxes) at the standard workloads'
// shapes, where CUDA events only give their times. One RANK-3B-B32-shaped call (32 x 256 tokens, 2 choices of 8)
// and one TRAIN-3B-shaped training step (8 x 256, dropout on, nothing recomputed) on a checkpoint of T0-3B's width
// with few layers (every layer launches the same kernels), CUDA graphs off so that ncu sees each launch.
//
//   node dist/benchmarks/kernel-profile.js <checkpoint dir>   (device-check.sh runs it under ncu; alone it just runs)
import { IA3Adapter, T5Model } from '../lib';
import { normalFrom, seededRandom } from '../lib/random';
import { randomBatch } from './random-t5';

async function main(): Promise<void> {
  const dir = process.argv[2];
  if (!dir) throw new Error('usage: kernel-profile.js <checkpoint dir>');
  const model = await T5Model.load(dir, { device: 'cuda', cuda: { graphs: false } });
  try {
    const V = model.config.vocabSize;
    const adapter = IA3Adapter.create(model);
    const r = seededRandom(3);
    for (let i = 0; i < adapter.data.length; i++) adapter.data[i] = 1 + 0.2 * normalFrom(r);
    adapter.markChanged();
    const b32 = randomBatch(V, new Array(32).fill(256), new Array(32).fill([8, 8]), 11);
    const t0 = Date.now();
    await model.rankClassify(b32.inputIds, b32.choices, { adapter, batchSize: 32 });
    const t1 = Date.now();
    const train = randomBatch(V, new Array(8).fill(256), new Array(8).fill([8, 8]), 15);
    await model.lossAndGradients({ inputIds: train.inputIds, choices: train.choices, labels: train.labels },
                                 { adapter, dropout: true, seed: 1, recompute: 'none' });
    console.log(`[kernel-profile] ${model.describe()}`);
    console.log(`[kernel-profile] rank call ${t1 - t0} ms, training step ${Date.now() - t1} ms (under ncu: replays included)`);
  } finally {
    await model.dispose();
  }
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
