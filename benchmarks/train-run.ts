// A whole T-Few training run end to end through the public API (Trainer -> native training session): the
// T-Few recipe (1000 steps, batch 8, Adafactor lr 3e-3, warmup 6%, clipping 1.0, LM + UL + LN, dropout) on
// the T0-3B architecture with random weights (benchmarks/random-t5.ts), on synthetic examples of encoder
// length 256 with 2 choices of 8 tokens. Prints JSON: total seconds, ms per step (median), device memory.
//
//   node dist/benchmarks/train-run.js [--layers 24] [--steps 1000] [--device cuda|cpu] [--lengths fixed|varied]
//                                     [--cuda JSON] [--out FILE.json] [--dry]
// --cuda: the CUDA switches to load with (CudaOptions as JSON, e.g. the TRAIN-3B best combination rank-bench found:
// device-check.sh runs it as train-run-best).
// --lengths varied: inputs of 64-256 tokens (seeded), as real few-shot data has, so batches differ in length
// from step to step (graphs: a training step is captured only right after one of the same shape) instead of
// all being 256 tokens long. graphStats in the JSON says how the steps ran.
// --dry: the same run on a small model (an eighth of the width, 1 + 1 layers, 32 tokens, 4 steps), to check
// the script on the CUDA emulator before a GPU run. Its numbers mean nothing.
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { CudaOptions, IA3Adapter, T5Model, Trainer } from '../lib';
import { native } from '../lib/native';
import { mulberry32, randomBatch, t0_3bConfigJson, writeRandomT5 } from './random-t5';

function arg(name: string, fallback: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1] : fallback;
}

async function main(): Promise<void> {
  const dry = process.argv.includes('--dry');
  const layers = Number(arg('layers', dry ? '1' : '24'));
  const steps = Number(arg('steps', dry ? '4' : '1000'));
  const device = arg('device', 'cuda') as 'cuda' | 'cpu';
  const lengths = arg('lengths', 'fixed');
  if (lengths !== 'fixed' && lengths !== 'varied') throw new Error(`--lengths must be fixed or varied, got ${lengths}`);
  const dir = arg('model-dir', path.join(os.tmpdir(), `tfew-bench-t0-3b-${layers}l${dry ? '-dry' : ''}`));
  const configJson = t0_3bConfigJson(layers);
  if (dry) Object.assign(configJson, { d_model: 256, d_ff: 640, num_heads: 4 });
  const config = writeRandomT5(dir, { configJson });
  const usedMiB = (): number => {
    const m = native().cudaMemoryInfo();
    return m ? (m.total - m.free) / (1 << 20) : NaN;
  };
  const baseline = usedMiB();
  const cuda = JSON.parse(arg('cuda', '{}')) as CudaOptions;
  if (typeof cuda !== 'object' || cuda === null || Array.isArray(cuda)) throw new Error('--cuda must be a JSON object of CUDA switches');
  const model = await T5Model.load(dir, { device, cuda });
  const adapter = IA3Adapter.create(model);
  // 32 few-shot examples, as RTE's split: 4 epochs of 8 per 32 steps
  const maxLen = dry ? 32 : 256;
  const lengthOf = mulberry32(5);
  const inputLengths = Array.from({ length: 32 }, () => (lengths === 'fixed' ? maxLen : maxLen / 4 + Math.floor(lengthOf() * (0.75 * maxLen + 1))));
  const data = randomBatch(config.vocabSize, inputLengths, new Array(32).fill([8, 8]), 21);
  const examples = data.inputIds.map((input, i) => ({ input, choices: data.choices[i], label: data.labels[i] }));
  const trainer = new Trainer(model, adapter, { steps, batchSize: 8, seed: 42 });
  const stepMs: number[] = [];
  trainer.on('step', (e) => stepMs.push(8000 / e.examplesPerSecond));
  const t0 = process.hrtime.bigint();
  const result = await trainer.train(examples);
  const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
  const sorted = [...stepMs].sort((a, b) => a - b);
  const out = {
    date: new Date().toISOString(), backend: model.describe(), cuda, layers, lengths, steps: result.steps, seconds,
    medianStepMs: sorted[Math.floor(sorted.length / 2)], firstLoss: result.losses[0], lastLoss: result.losses[result.losses.length - 1],
    deviceMiB: usedMiB() - baseline, graphStats: model.graphStats(),
  };
  await model.dispose();
  const json = JSON.stringify(out, null, 2);
  if (process.argv.includes('--out')) fs.writeFileSync(arg('out', ''), json + '\n');
  console.log(json);
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
