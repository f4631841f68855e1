// What one call of each standard workload launches on the device: kernels and cuBLAS calls per TRAIN-3B step,
// RANK-3B-B32 and RANK-3B-B1 batch, counted on the CUDA emulator (no GPU) with the T0-3B layout (24 + 24
// layers, the workloads' batch and lengths) at a tiny width. Each launch costs the device a few microseconds of
// scheduling even inside a CUDA graph, so the count bounds what the launches alone cost a step.
//
//   npm run build:emu && npx tsc -p . &&
//   TFEW_NATIVE_ADDON=build-emu/Release/tfew.node node dist/benchmarks/launch-count.js [--layers 24] [--json FILE]
//     [--only NAME,NAME]   (only these workloads, e.g. --only RANK-3B-B1-FEW-ROWS)
//
// The emulator appends each launch it runs to TFEW_EMU_TRACE (cuda/emu/emu_runtime.h); this script sets it,
// runs each workload until its CUDA graph replays, and tallies the replay's launches by kernel.
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { CudaOptions, IA3Adapter, T5Model } from '../lib';
import { native } from '../lib/native';
import { randomBatch, t0_3bConfigJson, writeRandomT5 } from './random-t5';

interface Tally {
  kernels: number;
  gemms: number;
  byName: Record<string, number>;
}

function tally(lines: string[]): Tally {
  const byName: Record<string, number> = {};
  let kernels = 0;
  let gemms = 0;
  for (const line of lines) {
    const [kind, name] = line.split(' ');
    if (kind === 'kernel') kernels++;
    else if (kind === 'gemm') gemms++;
    else continue;
    const key = kind === 'gemm' ? `gemm:${name}` : name;
    byName[key] = (byName[key] ?? 0) + 1;
  }
  return { kernels, gemms, byName };
}

async function main(): Promise<void> {
  const args = process.argv.slice(2);
  const opt = (name: string, fallback: string): string => {
    const i = args.indexOf(`--${name}`);
    return i >= 0 ? args[i + 1] : fallback;
  };
  const layers = Number(opt('layers', '24'));
  const only = opt('only', '').split(',').filter(Boolean);
  const want = (name: string): boolean => only.length === 0 || only.includes(name);
  if (!native().buildInfo.cudaEmulated) throw new Error('launch-count needs the emulation addon: TFEW_NATIVE_ADDON=build-emu/Release/tfew.node');
  const trace = path.join(os.tmpdir(), `tfew-launches-${process.pid}.txt`);
  process.env.TFEW_EMU_TRACE = trace;  // read by the addon at its first launch
  fs.writeFileSync(trace, '');

  // the T0 layout (gated-gelu, untied head, 32 buckets) at a width the emulator runs quickly; d_kv 64 as T0-3B,
  // since the engine's choices (fused attention, folded cross-attention) depend on it and on the lengths
  const dir = path.join(os.tmpdir(), `tfew-launch-count-${layers}l`);
  const configJson = { ...t0_3bConfigJson(layers), d_model: 32, d_ff: 64, num_heads: 1, d_kv: 64, vocab_size: 128 };
  writeRandomT5(dir, { configJson, seed: 5 });
  const model = await T5Model.load(dir, { device: 'cuda' });
  const adapter = IA3Adapter.create(model);
  const V = model.config.vocabSize;
  const results: Record<string, Tally> = {};
  // Runs `call` until the CUDA graph replays (the third call of a shape), then counts one more call.
  const count = async (name: string, call: () => Promise<unknown>) => {
    if (!want(name)) return;
    for (let i = 0; i < 3; i++) await call();
    fs.writeFileSync(trace, '');
    await call();
    results[name] = tally(fs.readFileSync(trace, 'utf8').split('\n'));
  };
  const b32 = randomBatch(V, new Array(32).fill(256), new Array(32).fill([8, 8]), 11);
  const b1 = randomBatch(V, [256], [[8, 8]], 12);
  await count('RANK-3B-B32', () => model.rankClassify(b32.inputIds, b32.choices, { adapter }));
  await count('RANK-3B-B1', () => model.rankClassify(b1.inputIds, b1.choices, { adapter }));
  for (const [name, choices] of [['TRAIN-3B', 2], ['TRAIN-3B-C4', 4]] as const) {
    if (!want(name)) continue;
    const batch = randomBatch(V, new Array(8).fill(256), new Array(8).fill(new Array(choices).fill(8)), 13 + choices);
    const session = await model.createTrainingSession([adapter], { totalSteps: 1000 });
    try {
      await count(name, async () => {
        await session.step({ inputIds: batch.inputIds, choices: batch.choices, labels: batch.labels },
                           { adapter, dropout: true, seed: 1, recompute: 'none' });
        await session.sync();
      });
    } finally {
      await session.dispose();
    }
  }
  const describe = model.describe();
  await model.dispose();
  // the cuBLAS encoder attention backward (cuda.fusedBackward false; the fused kernels are the default)
  const cublas = want('TRAIN-3B-CUBLAS-BACKWARD') ? await T5Model.load(dir, { device: 'cuda', cuda: { fusedBackward: false } }) : undefined;
  if (cublas) {
    try {
      const cublasAdapter = IA3Adapter.create(cublas);
      const batch = randomBatch(V, new Array(8).fill(256), new Array(8).fill([8, 8]), 15);
      const session = await cublas.createTrainingSession([cublasAdapter], { totalSteps: 1000 });
      try {
        await count('TRAIN-3B-CUBLAS-BACKWARD', async () => {
          await session.step({ inputIds: batch.inputIds, choices: batch.choices, labels: batch.labels },
                             { adapter: cublasAdapter, dropout: true, seed: 1, recompute: 'none' });
          await session.sync();
        });
      } finally {
        await session.dispose();
      }
    } finally {
      await cublas.dispose();
    }
  }
  // RANK-3B-B1 with the few-row decoder linears (cuda.fewRowLinears, off by default), which need a width they have
  // an instance for: the same layout at d_model 512 (the launches do not depend on the width otherwise); with the
  // precomputed cross-attention too, and that alone
  const wideRuns: [string, CudaOptions][] = [['RANK-3B-B1-FEW-ROWS', { fewRowLinears: true }],
    ['RANK-3B-B1-PRECOMPUTED-FEW-ROWS', { fewRowLinears: true, crossAttention: 'precomputed' }],
    ['RANK-3B-B1-PRECOMPUTED', { crossAttention: 'precomputed' }]];
  const wideDir = path.join(os.tmpdir(), `tfew-launch-count-512-${layers}l`);
  for (const [name, cuda] of wideRuns) {
    if (!want(name)) continue;
    writeRandomT5(wideDir, { configJson: { ...configJson, d_model: 512, d_ff: 1024, num_heads: 8 }, seed: 5 });
    const wide = await T5Model.load(wideDir, { device: 'cuda', cuda });
    try {
      const wideAdapter = IA3Adapter.create(wide);
      const b = randomBatch(V, [256], [[8, 8]], 12);
      await count(name, () => wide.rankClassify(b.inputIds, b.choices, { adapter: wideAdapter }));
    } finally {
      await wide.dispose();
    }
  }
  fs.rmSync(trace, { force: true });

  for (const [name, t] of Object.entries(results)) {
    console.log(`[launch-count] ${name}: ${t.kernels + t.gemms} launches (${t.kernels} kernels, ${t.gemms} cuBLAS calls)`);
    const top = Object.entries(t.byName).sort((a, b) => b[1] - a[1]);
    for (const [k, n] of top) console.log(`    ${String(n).padStart(5)}  ${k}`);
  }
  const json = opt('json', '');
  if (json) fs.writeFileSync(json, JSON.stringify({ layers, describe, workloads: results }, null, 2));
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
