// `tfew demo`: the whole recipe in well under a minute on a laptop CPU, with nothing to download.
// Builds a tiny random T5 (lib/tiny.ts), makes a small synthetic few-shot task (movie-review sentiment),
// measures accuracy, trains (IA)3 with the T-Few losses through the Trainer, measures again and classifies
// a few new reviews. A random tiny model knows nothing, so the gain comes from the (IA)3 vectors alone.
import * as os from 'os';
import * as path from 'path';
import { T5Model, type DeviceOption, type Recompute } from '../model';
import type { CudaOptions } from '../native';
import type { Task } from '../tasks/registry';
import type { Example } from '../tasks/types';
import { seededRandom } from '../random';
import { buildTinyT5 } from '../tiny';
import { TextTemplate, type Template } from '../templates/engine';
import { classify } from './classify';
import { ia3ParameterCount, parameterCount } from './cost';
import { evaluate } from './evaluate';
import { trainAdapter } from './fewshot';

const POSITIVE = ['great', 'wonderful', 'delightful', 'superb', 'charming', 'brilliant', 'lovely', 'excellent'];
const NEGATIVE = ['awful', 'boring', 'dreadful', 'terrible', 'dull', 'clumsy', 'painful', 'weak'];
const SUBJECTS = ['movie', 'film', 'plot', 'cast', 'story', 'ending', 'script', 'soundtrack'];

/** The demo's prompts; every word in them is in the tiny model's vocabulary. */
export const DEMO_TEMPLATES: Template[] = [
  new TextTemplate({ name: 'good-or-bad', input: 'review : {{text}} . is this review good or bad ?', choices: ['bad', 'good'] }),
  new TextTemplate({ name: 'liked-it', input: '{{text}} . did the writer like it ? yes or no', choices: ['no', 'yes'] }),
];

/**
 * Reviews "the <subject> was <adjective>", label 1 when the adjective is positive. With `coverAll`, the
 * adjectives are dealt round-robin so a small training set still shows every one of them.
 */
export function syntheticReviews(count: number, seed: number, coverAll = false): Example[] {
  const r = seededRandom(seed);
  const pick = (xs: string[]) => xs[Math.floor(r() * xs.length)];
  const adjectives = [...POSITIVE, ...NEGATIVE];
  const out = Array.from({ length: count }, (_, i) => {
    const adjective = coverAll ? adjectives[i % adjectives.length] : '';
    const label = coverAll ? (POSITIVE.includes(adjective) ? 1 : 0) : r() < 0.5 ? 1 : 0;
    const text = `the ${pick(SUBJECTS)} was ${adjective || pick(label ? POSITIVE : NEGATIVE)}`;
    return { id: String(i), fields: { text }, label };
  });
  if (coverAll) {
    for (let i = out.length - 1; i > 0; i--) {
      const j = Math.floor(r() * (i + 1));
      [out[i], out[j]] = [out[j], out[i]];
    }
    out.forEach((e, i) => (e.id = String(i)));
  }
  return out;
}

/** The synthetic task: `shots` training reviews, `testSize` held-out ones. */
export function syntheticSentimentTask(shots = 32, testSize = 200): Task {
  const train = syntheticReviews(shots, 7, true);
  const test = syntheticReviews(testSize, 99);
  return {
    name: 'demo-sentiment',
    kind: 'custom',
    numShots: shots,
    seeds: [42],
    labelNames: ['negative', 'positive'],
    recipe: {},
    templates: () => DEMO_TEMPLATES,
    trainExamples: () => train,
    evalExamples: () => test,
    testExamples: () => test,
  };
}

/** Every word the demo's prompts use (the tiny model's vocabulary). */
export function demoVocabulary(): string[] {
  const words = [...POSITIVE, ...NEGATIVE, ...SUBJECTS, 'the', 'was'];
  for (const t of DEMO_TEMPLATES) {
    const r = t.render({ id: 'v', fields: { text: '' }, label: 0 });
    words.push(...r.input, ...r.choices);
  }
  return words;
}

export interface DemoOptions {
  /** Where the tiny model is written (default: $XDG_CACHE_HOME or ~/.cache, under tfew/demo-tiny-t5). */
  modelDir?: string;
  device?: DeviceOption;
  /** CPU backend threads (default: all cores). */
  threads?: number;
  /** CUDA backend switches (T5Model.load) and the training's recompute level (Trainer); both CUDA only. */
  cuda?: CudaOptions;
  recompute?: Recompute;
  /** Training steps (default 300) and learning rate (default 0.1: a random tiny model needs far more than T0's 3e-3). */
  steps?: number;
  lr?: number;
  /** Print a progress line every this many steps (default 25). */
  logEvery?: number;
  /** Seed of the tiny model's random weights (default 1). */
  modelSeed?: number;
  log?: (line: string) => void;
}

export interface DemoResult {
  modelDir: string;
  device: string;
  accuracyBefore: number;
  accuracyAfter: number;
  trainSeconds: number;
  finalLoss: number;
  predictions: { text: string; label: string; confidence: number }[];
}

export function defaultDemoDir(): string {
  const cache = process.env.XDG_CACHE_HOME ?? path.join(os.homedir(), '.cache');
  return path.join(cache, 'tfew', 'demo-tiny-t5');
}

const pct = (x: number) => `${(100 * x).toFixed(1)}%`;

function softmax(xs: number[]): number[] {
  const m = Math.max(...xs);
  const e = xs.map((x) => Math.exp(x - m));
  const s = e.reduce((a, b) => a + b, 0);
  return e.map((x) => x / s);
}

export async function runDemo(options: DemoOptions = {}): Promise<DemoResult> {
  const log = options.log ?? ((line: string) => console.log(line));
  const modelDir = options.modelDir ?? defaultDemoDir();
  const steps = options.steps ?? 300;
  const lr = options.lr ?? 0.1;
  const logEvery = options.logEvery ?? 25;

  log('T-Few demo: few-shot fine-tuning of (IA)3 vectors on a tiny T5 built on the spot (nothing is downloaded).');
  // Rebuilt every time (it takes milliseconds), so a cache left by another version never goes stale.
  buildTinyT5(modelDir, { words: demoVocabulary(), seed: options.modelSeed ?? 1, dModel: 64, dFf: 128, numHeads: 4, dKv: 16, numLayers: 2 });
  const model = await T5Model.load(modelDir, { device: options.device ?? 'auto', threads: options.threads, cuda: options.cuda });
  try {
    const task = syntheticSentimentTask();
    const c = model.config;
    log(`  model   tiny T5, ${c.numLayers}+${c.numDecoderLayers} layers, d_model ${c.dModel}, ${c.vocabSize} words, random weights: ${modelDir}`);
    log(`  device  ${model.device} (${model.deviceReason})`);
    log(`  task    movie-review sentiment ("the plot was superb" -> good): ${task.trainExamples().length} labelled reviews to learn from, ${task.evalExamples().length} held out`);
    log(`  (IA)3   ${ia3ParameterCount(c).toLocaleString('en-US')} trainable values; the model's ${parameterCount(c).toLocaleString('en-US')} weights stay frozen`);
    log('');

    const before = await evaluate(model, { task, adapter: null, method: 'before' });
    log(`Before training: accuracy ${pct(before.summary.median)} on the held-out reviews (chance is 50%).`);
    log(`Training ${steps} steps, batch 8, lr ${lr}, loss = LM + unlikelihood + length-normalised (the T-Few losses):`);
    const { adapter, run } = await trainAdapter(model, {
      task, steps, lr, batchSize: 8, trainerSeed: 1, recompute: options.recompute,
      onStep: (e) => {
        if (e.step % logEvery === 0 || e.step === e.totalSteps) {
          log(`  step ${String(e.step).padStart(4)}/${e.totalSteps}  loss ${e.totalLoss.toFixed(3)}  (lm ${e.lmLoss.toFixed(3)}, ul ${e.ulLoss.toFixed(3)}, ln ${e.lnLoss.toFixed(3)})`);
        }
      },
    });
    const after = await evaluate(model, { task, adapter, method: 'after' });
    const gain = 100 * (after.summary.median - before.summary.median);
    log(`After training:  accuracy ${pct(after.summary.median)} (${gain >= 0 ? '+' : ''}${gain.toFixed(1)} points) after ${run.seconds.toFixed(1)} s of training.`);
    log('');

    const fresh = ['the soundtrack was wonderful', 'the ending was painful', 'the cast was charming', 'the script was dull'];
    const examples = fresh.map((text, i) => ({ id: String(i), fields: { text }, label: -1 }));
    const preds = await classify(model, examples, { template: DEMO_TEMPLATES[0], adapter });
    log('Classifying new reviews with the trained adapter:');
    const predictions = preds.map((p, i) => {
      const confidence = softmax(p.scores)[p.prediction];
      log(`  "${fresh[i]}"  ->  ${p.label}  (${pct(confidence)})`);
      return { text: fresh[i], label: p.label, confidence };
    });
    log('');
    log('Next: train on a real task with a real model, e.g.');
    log('  tfew train --model ./T0_3B --task rte --seed 42 --out adapters/rte-42');
    log('  tfew eval  --model ./T0_3B --task rte --adapter adapters/rte-42');
    return {
      modelDir, device: model.device, accuracyBefore: before.summary.median, accuracyAfter: after.summary.median,
      trainSeconds: run.seconds, finalLoss: run.finalLoss, predictions,
    };
  } finally {
    await model.dispose();
  }
}
