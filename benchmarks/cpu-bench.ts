// CPU reference backend benchmark (JSON out, medians): rank classification and one T-Few training step
// (losses + backward to the (IA)3 vectors + the host Adafactor update) on a T5-small-sized random model.
// The CPU backend is the oracle, not the fast path; this tracks that it stays usable for small models.
// EVAL-RTE: rank classification of RTE's validation prompts (real lengths: the T5 tokenizer and the data from
// TFEW_DATA_DIR; skipped without them) in calls of 32 grouped by length (rankClassify's default) and in the
// order given, with the encoder tokens each way pads to.
//
//   node dist/benchmarks/cpu-bench.js [--layers 6] [--d-model 512] [--repeats 5] [--threads N] [--out FILE.json]
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { IA3Adapter, T5Model, TfewOptimizer } from '../lib';
import { callGroups } from '../lib/batch';
import { encodeExamples } from '../lib/pipeline';
import { dataAvailable, getTask, resolveDataDir } from '../lib/tasks';
import { T5Tokenizer } from '../lib/tokenizer';
import { randomBatch, writeRandomT5 } from './random-t5';

function arg(name: string, fallback: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1] : fallback;
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
}

async function timeIt(repeats: number, f: () => Promise<unknown>): Promise<number[]> {
  await f(); // warm-up
  const out: number[] = [];
  for (let i = 0; i < repeats; i++) {
    const t = process.hrtime.bigint();
    await f();
    out.push(Number(process.hrtime.bigint() - t) / 1e6);
  }
  return out;
}

async function main(): Promise<void> {
  const layers = Number(arg('layers', '6'));
  const dModel = Number(arg('d-model', '512'));
  const repeats = Number(arg('repeats', '5'));
  const threads = Number(arg('threads', String(os.cpus().length)));
  const configJson = {
    architectures: ['T5ForConditionalGeneration'], model_type: 't5', vocab_size: 32128, d_model: dModel,
    d_ff: Math.round(dModel * 2.5), d_kv: 64, num_heads: dModel / 64, num_layers: layers, num_decoder_layers: layers,
    feed_forward_proj: 'gated-gelu', tie_word_embeddings: false, dropout_rate: 0.1, layer_norm_epsilon: 1e-6,
    relative_attention_num_buckets: 32, relative_attention_max_distance: 128,
    pad_token_id: 0, eos_token_id: 1, decoder_start_token_id: 0,
  };
  const dir = path.join(os.tmpdir(), `tfew-cpu-bench-${layers}x${dModel}`);
  writeRandomT5(dir, { configJson, seed: 11 });
  const model = await T5Model.load(dir, { device: 'cpu', threads });
  const adapter = IA3Adapter.create(model);
  const rank = (b: number) => randomBatch(32128, Array(b).fill(256), Array.from({ length: b }, () => [8, 8]), 3);
  const results: Record<string, unknown> = {};
  for (const [name, b] of [['RANK-B8', 8], ['RANK-B1', 1]] as const) {
    const batch = rank(b);
    const ms = await timeIt(repeats, () => model.rankClassify(batch.inputIds, batch.choices, { adapter }));
    results[name] = { examples: b, encoderLength: 256, choices: '2 x 8 tokens', medianMs: median(ms), examplesPerSecond: (b * 1000) / median(ms), runsMs: ms };
  }
  {
    const batch = rank(8);
    const optimizer = new TfewOptimizer(adapter.modules, { totalSteps: 1000 });
    const ms = await timeIt(repeats, async () => {
      const g = await model.lossAndGradients({ inputIds: batch.inputIds, choices: batch.choices, labels: batch.labels }, { adapter, dropout: true, seed: 1 });
      optimizer.step(adapter.data, g.adapterGradients.get(adapter) as Float32Array);
      adapter.markChanged();
    });
    results['TRAIN-B8'] = { examples: 8, encoderLength: 256, choices: '2 x 8 tokens', medianMs: median(ms), runsMs: ms, includes: 'forward, LM+UL+LN, backward to (IA)3, Adafactor (host)' };
  }
  results['EVAL-RTE'] = await evalRealLengths(model, adapter, repeats);
  const backend = model.describe();  // (before dispose: afterwards it says 'disposed')
  await model.dispose();
  const out = {
    date: new Date().toISOString(), backend, cpu: os.cpus()[0]?.model, cores: os.cpus().length, threads,
    model: `random T5, ${layers}+${layers} layers, d_model ${dModel}, d_ff ${configJson.d_ff}, vocab 32128, gated-gelu`, repeats,
    workloads: results,
  };
  const json = JSON.stringify(out, null, 2);
  const file = process.argv.includes('--out') ? arg('out', '') : '';
  if (file) fs.writeFileSync(file, json + '\n');
  console.log(json);
}

// RTE's validation set through its first template, tokenized as the pipeline does: calls of 32 grouped by length vs
// in the order given. Encoder tokens: what the calls compute (each call pads its inputs to its longest).
async function evalRealLengths(model: T5Model, adapter: IA3Adapter, repeats: number): Promise<Record<string, unknown>> {
  const tokenizerFile = path.join(resolveDataDir(), 't5-tokenizer', 'tokenizer.json');
  if (!dataAvailable() || !fs.existsSync(tokenizerFile)) {
    return { skipped: `no data: RTE and the T5 tokenizer are read from TFEW_DATA_DIR (${resolveDataDir()})` };
  }
  const task = getTask('rte');
  let encoded;
  try {
    encoded = encodeExamples(T5Tokenizer.fromFile(tokenizerFile), task.templates()[0], task.evalExamples());
  } catch (e) {
    return { skipped: `RTE could not be read from ${resolveDataDir()}: ${(e as Error).message}` };
  }
  const inputs = encoded.map((e) => e.inputIds);
  const choices = encoded.map((e) => e.choiceIds);
  const batchSize = 32;
  // (the calls rankClassify makes: lib/batch.ts callGroups)
  const encoderTokens = (groupByLength: boolean) => callGroups(encoded.map((e) => ({ inputIds: e.inputIds, choices: e.choiceIds })),
    batchSize, groupByLength).reduce((sum, call) => sum + call.length * Math.max(...call.map((i) => inputs[i].length)), 0);
  const row = async (groupByLength: boolean) => {
    const ms = await timeIt(repeats, () => model.rankClassify(inputs, choices, { adapter, batchSize, groupByLength }));
    return { medianMs: median(ms), examplesPerSecond: (inputs.length * 1000) / median(ms), runsMs: ms };
  };
  const grouped = await row(true);
  const inOrder = await row(false);
  return {
    examples: inputs.length, template: task.templates()[0].name, batchSize,
    realInputTokens: inputs.reduce((n, x) => n + x.length, 0),
    grouped: { ...grouped, encoderTokens: encoderTokens(true) },
    inOrder: { ...inOrder, encoderTokens: encoderTokens(false) },
    speedup: inOrder.medianMs / grouped.medianMs,
  };
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
