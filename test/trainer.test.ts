// The Trainer: its mechanics against a small analytic model (losses with known gradients), then a real
// few-shot run on the project's tiny T5 that must lower the loss and raise the accuracy.
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { IA3Adapter } from '../lib/adapter';
import { DisposedError, InvalidAdapterError, InvalidArgumentError } from '../lib/errors';
import type { NativeConfig } from '../lib/native';
import { RECOMPUTE_LEVELS } from '../lib/model';
import { linearWarmupDecay } from '../lib/optim';
import { Trainer, type DoneEvent, type EvalEvent, type StepEvent, type TrainableModel, type TrainExample } from '../lib/trainer';

const SMALL_CONFIG: NativeConfig = {
  vocabSize: 32,
  dModel: 4,
  dFf: 3,
  dKv: 2,
  numHeads: 2,
  numLayers: 1,
  numDecoderLayers: 1,
  numBuckets: 32,
  maxDistance: 128,
  layerNormEps: 1e-6,
  gatedGelu: true,
  tiedHead: false,
  scaleDecoderOutputs: false,
  dropoutRate: 0.1,
  padTokenId: 0,
  eosTokenId: 1,
  decoderStartTokenId: 0,
};

type LossCall = {
  inputIds: (number[] | string)[];
  labels: number[];
  adapters: IA3Adapter[];
  seed?: number;
  dropout?: boolean;
  weights: [number?, number?, number?];
};

/**
 * A stand-in with a loss whose gradient is known exactly: example e pulls every value of its adapter
 * towards target(e) = input[0] / 10, loss = mean over the batch of mean((x - target)^2). Records each call.
 */
class QuadraticModel implements TrainableModel {
  readonly config = SMALL_CONFIG;
  readonly tokenizer = undefined;
  disposed = false;
  calls: LossCall[] = [];
  fixedPrediction = 0;
  /** Multiplies the loss (and gradient): large values make gradient clipping act. */
  lossScale = 1;

  async lossAndGradients(
    batch: { inputIds: (number[] | string)[]; choices: (number[][] | string[])[]; labels: number[] },
    options: Parameters<TrainableModel['lossAndGradients']>[1] = {},
  ) {
    const adapters = options.adapter as IA3Adapter[];
    this.calls.push({
      inputIds: batch.inputIds,
      labels: batch.labels,
      adapters,
      seed: options.seed,
      dropout: options.dropout,
      weights: [options.lmWeight, options.ulWeight, options.lnWeight],
    });
    const grads = new Map<IA3Adapter, Float32Array>();
    const n = batch.inputIds.length;
    let loss = 0;
    batch.inputIds.forEach((ids, b) => {
      const target = (ids as number[])[0] / 10;
      const a = adapters[b];
      let g = grads.get(a);
      if (!g) grads.set(a, (g = new Float32Array(a.data.length)));
      for (let i = 0; i < a.data.length; i++) {
        const d = a.data[i] - target;
        loss += (this.lossScale * d * d) / a.data.length / n;
        g[i] += (this.lossScale * 2 * d) / a.data.length / n;
      }
    });
    return { totalLoss: loss, lmLoss: loss, ulLoss: 0, lnLoss: 0, adapterGradients: grads };
  }

  async rankClassify(inputs: string[] | number[][]) {
    return { predictions: inputs.map(() => this.fixedPrediction) };
  }
}

function examplesFor(targets: number[], adapter?: IA3Adapter): TrainExample[] {
  return targets.map((t, i) => ({ input: [t, 5, 1], choices: [[3, 1], [4, 1]], label: i % 2, ...(adapter ? { adapter } : {}) }));
}

describe('Trainer mechanics (analytic model)', () => {
  test('the loss falls and the adapter moves towards the optimum; steps call lossAndGradients as specified', async () => {
    const model = new QuadraticModel();
    const adapter = IA3Adapter.create(SMALL_CONFIG);
    const version = adapter.version;
    const trainer = new Trainer(model, adapter, { steps: 40, batchSize: 4, lr: 0.05, seed: 7, dropout: true, ulWeight: 0.5 });
    const result = await trainer.train(examplesFor([5, 5, 5, 5, 5, 5, 5, 5]));
    expect(result.aborted).toBe(false);
    expect(result.steps).toBe(40);
    expect(result.losses).toHaveLength(40);
    expect(result.losses[39]).toBeLessThan(result.losses[0] * 0.1);
    // Every value moved from 1 towards 0.5.
    for (const x of adapter.data) expect(Math.abs(x - 0.5)).toBeLessThan(0.5 * 0.35);
    expect(adapter.version).toBeGreaterThan(version);
    model.calls.forEach((c, step) => {
      expect(c.seed).toBe(7 + step);
      expect(c.dropout).toBe(true);
      expect(c.weights).toEqual([1, 0.5, 1]);
      expect(c.inputIds).toHaveLength(4);
      expect(c.adapters.every((a) => a === adapter)).toBe(true);
    });
  });

  test('each epoch visits every example once in a seeded order; the same seed gives the same run', async () => {
    const targets = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];
    const run = async (seed: number) => {
      const model = new QuadraticModel();
      const trainer = new Trainer(model, IA3Adapter.create(SMALL_CONFIG), { steps: 9, batchSize: 4, seed });
      const result = await trainer.train(examplesFor(targets));
      return { result, order: model.calls.map((c) => c.inputIds.map((ids) => (ids as number[])[0])) };
    };
    const a = await run(3);
    const b = await run(3);
    const c = await run(4);
    expect(b.order).toEqual(a.order);
    expect(b.result.losses).toEqual(a.result.losses);
    expect(c.order).not.toEqual(a.order);
    for (let epoch = 0; epoch < 3; epoch++) {
      const seen = a.order.slice(epoch * 3, epoch * 3 + 3).flat().sort((x, y) => x - y);
      expect(seen).toEqual(targets);
    }
    // Reshuffled between epochs.
    expect(a.order.slice(3, 6)).not.toEqual(a.order.slice(0, 3));
  });

  test("step events carry the fields, with the schedule's lr and the pre-clipping gradient norm", async () => {
    const model = new QuadraticModel();
    const trainer = new Trainer(model, IA3Adapter.create(SMALL_CONFIG), { steps: 10, batchSize: 2, lr: 0.01, warmupRatio: 0.2 });
    const events: StepEvent[] = [];
    const done: DoneEvent[] = [];
    trainer.on('step', (e) => events.push(e));
    trainer.on('done', (e) => done.push(e));
    const norms: number[] = [];
    const original = model.lossAndGradients.bind(model);
    model.lossAndGradients = async (batch, options) => {
      const r = await original(batch, options);
      let s = 0;
      for (const g of r.adapterGradients.values()) for (const x of g) s += x * x;
      norms.push(Math.sqrt(s));
      return r;
    };
    const result = await trainer.train(examplesFor([2, 4, 6, 8]));
    expect(events.map((e) => e.step)).toEqual([1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
    events.forEach((e, i) => {
      expect(e.totalSteps).toBe(10);
      expect(e.lr).toBeCloseTo(0.01 * linearWarmupDecay(i, 10, 2), 14);
      expect(e.totalLoss).toBeCloseTo(result.losses[i], 14);
      expect(e.lmLoss).toBe(e.totalLoss);
      expect(e.ulLoss).toBe(0);
      expect(e.lnLoss).toBe(0);
      expect(e.gradNorm).toBeCloseTo(norms[i], 6);
      expect(e.examplesPerSecond).toBeGreaterThan(0);
    });
    expect(events[0].lr).toBe(0);
    expect(done).toHaveLength(1);
    expect(done[0]).toMatchObject({ steps: 10, aborted: false });
    expect(done[0].seconds).toBeGreaterThanOrEqual(0);
    expect(done[0].adapterPath).toBeUndefined();
  });

  test('an AbortSignal stops between steps and resolves with aborted: true', async () => {
    const model = new QuadraticModel();
    const trainer = new Trainer(model, IA3Adapter.create(SMALL_CONFIG), { steps: 50, batchSize: 2 });
    const controller = new AbortController();
    const done: DoneEvent[] = [];
    trainer.on('step', (e) => {
      if (e.step === 3) controller.abort();
    });
    trainer.on('done', (e) => done.push(e));
    const result = await trainer.train(examplesFor([1, 2, 3, 4]), { signal: controller.signal });
    expect(result).toMatchObject({ steps: 3, aborted: true });
    expect(result.losses).toHaveLength(3);
    expect(model.calls).toHaveLength(3);
    expect(done).toEqual([expect.objectContaining({ steps: 3, aborted: true })]);

    const early = new AbortController();
    early.abort();
    const none = await trainer.train(examplesFor([1, 2]), { signal: early.signal });
    expect(none).toMatchObject({ steps: 0, aborted: true, losses: [] });
    expect(model.calls).toHaveLength(3);
  });

  test('mixed-task batches: each adapter gets its own gradient, optimizer state and clipping', async () => {
    // Gradient norms well above clipNorm, so that clipping acts at every step.
    const model = new QuadraticModel();
    model.lossScale = 1e6;
    const a = IA3Adapter.create(SMALL_CONFIG);
    const b = IA3Adapter.create(SMALL_CONFIG);
    const examples = [...examplesFor([2, 2, 2, 2]), ...examplesFor([9, 9, 9, 9], b)];
    const trainer = new Trainer(model, a, { steps: 30, batchSize: 8, lr: 0.05 });
    const norms: number[] = [];
    trainer.on('step', (e) => norms.push(e.gradNorm));
    await trainer.train(examples);
    expect(Math.min(...norms)).toBeGreaterThan(1);
    // One engine call per step, each example with its own adapter.
    for (const call of model.calls) {
      call.inputIds.forEach((ids, i) => expect(call.adapters[i]).toBe((ids as number[])[0] === 2 ? a : b));
    }
    // a is pulled towards 0.2 and b towards 0.9, each only by its own examples.
    const meanOf = (x: Float32Array) => x.reduce((s, v) => s + v, 0) / x.length;
    expect(meanOf(a.data)).toBeLessThan(0.7);
    expect(Math.abs(meanOf(b.data) - 0.9)).toBeLessThan(0.05);
    // Training b alone on its own examples gives the same result: its optimizer state and its clipping
    // norm are independent of a's (its gradient here is twice as large, which clipping removes).
    const bAlone = IA3Adapter.create(SMALL_CONFIG);
    const aloneModel = new QuadraticModel();
    aloneModel.lossScale = 1e6;
    const alone = new Trainer(aloneModel, bAlone, { steps: 30, batchSize: 4, lr: 0.05 });
    await alone.train(examplesFor([9, 9, 9, 9]));
    for (let i = 0; i < b.data.length; i++) expect(b.data[i]).toBeCloseTo(bAlone.data[i], 6);
  });

  test('reserves memory for the run\'s largest step before the first step, and fails there when it does not fit', async () => {
    const model = new QuadraticModel() as QuadraticModel & { reserveMemory: jest.Mock };
    const order: string[] = [];
    model.reserveMemory = jest.fn(async () => {
      order.push('reserve');
      return 0;
    });
    const spy = jest.spyOn(model, 'lossAndGradients').mockImplementation(async function (this: QuadraticModel, ...args) {
      order.push('step');
      return QuadraticModel.prototype.lossAndGradients.apply(this, args);
    });
    const a = IA3Adapter.create(SMALL_CONFIG);
    const b = IA3Adapter.create(SMALL_CONFIG);
    const examples: TrainExample[] = [
      { input: [2, 5, 1], choices: [[3, 1], [4, 1]], label: 0 },
      { input: [2, 5, 6, 7, 8, 1], choices: [[3, 1], [4, 4, 4, 1], [5, 1]], label: 2, adapter: b },
      { input: [9, 1], choices: [[3, 1]], label: 0 },
    ];
    await new Trainer(model, a, { steps: 2, batchSize: 8, recompute: 'attention' }).train(examples);
    expect(model.reserveMemory).toHaveBeenCalledTimes(1);
    expect(model.reserveMemory).toHaveBeenCalledWith([{
      batchSize: 3, inputLength: 6, choices: 3, choiceLength: 4, adapters: 2, training: true, recompute: 'attention',
    }]);
    expect(order).toEqual(['reserve', 'step', 'step']);
    // with evaluation during the run: evaluate()'s rank classification too (batches of up to 32, its own lengths)
    const evalSet: TrainExample[] = [
      { input: [3, 3, 3, 3, 3, 3, 3, 3, 1], choices: [[3, 1], [4, 1]], label: 0 },
      { input: [4, 1], choices: [[3, 3, 3, 3, 3, 1], [4, 1]], label: 1, adapter: b },
    ];
    model.reserveMemory.mockClear();
    await new Trainer(model, a, { steps: 2, batchSize: 2, evalEvery: 1, evalSet }).train(examples);
    expect(model.reserveMemory).toHaveBeenCalledWith([
      { batchSize: 2, inputLength: 6, choices: 3, choiceLength: 4, adapters: 2, training: true, recompute: 'auto' },
      { batchSize: 2, inputLength: 9, choices: 2, choiceLength: 6, adapters: 2 },
    ]);
    spy.mockRestore();

    // an empty choice: nothing reserved (the step rejects the example with its own message)
    model.reserveMemory.mockClear();
    await new Trainer(model, a, { steps: 1, batchSize: 1 }).train([{ input: [2, 1], choices: [[], [4, 1]], label: 1 }]);
    expect(model.reserveMemory).not.toHaveBeenCalled();

    model.reserveMemory = jest.fn(async () => {
      throw new InvalidArgumentError('no room');
    });
    const before = model.calls.length;
    await expect(new Trainer(model, a, { steps: 2 }).train(examples)).rejects.toThrow('no room');
    expect(model.calls.length).toBe(before);  // no step ran
  });

  test('evaluate() and eval events report accuracy against the labels', async () => {
    const model = new QuadraticModel();
    model.fixedPrediction = 1;
    const evalSet = examplesFor([1, 2, 3, 4, 5]); // labels 0,1,0,1,0
    const trainer = new Trainer(model, IA3Adapter.create(SMALL_CONFIG), { steps: 5, batchSize: 2, evalEvery: 2, evalSet });
    const evals: EvalEvent[] = [];
    trainer.on('eval', (e) => evals.push(e));
    await trainer.train(examplesFor([1, 2]));
    expect(evals.map((e) => e.step)).toEqual([2, 4, 5]);
    for (const e of evals) {
      expect(e.accuracy).toBeCloseTo(2 / 5, 12);
      expect(e.predictions).toEqual([1, 1, 1, 1, 1]);
    }
    expect((await trainer.evaluate(examplesFor([1, 2]))).accuracy).toBeCloseTo(0.5, 12);
  });

  test('saveTo writes the trained adapter in PEFT format and reports its path', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tfew-trainer-save-'));
    try {
      const out = path.join(dir, 'adapter');
      const adapter = IA3Adapter.create(SMALL_CONFIG);
      const trainer = new Trainer(new QuadraticModel(), adapter, { steps: 5, batchSize: 2, lr: 0.05, saveTo: out });
      const done: DoneEvent[] = [];
      trainer.on('done', (e) => done.push(e));
      const result = await trainer.train(examplesFor([3, 4]));
      expect(result.adapterPath).toBe(out);
      expect(done[0].adapterPath).toBe(out);
      const loaded = await IA3Adapter.load(out, { config: SMALL_CONFIG });
      expect(Array.from(loaded.data)).toEqual(Array.from(adapter.data));
      expect(Array.from(adapter.data).some((x) => x !== 1)).toBe(true);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  test('bad options, examples and a disposed model are typed errors', async () => {
    const model = new QuadraticModel();
    const adapter = IA3Adapter.create(SMALL_CONFIG);
    expect(() => new Trainer(model, adapter, { steps: 0 })).toThrow(InvalidArgumentError);
    expect(() => new Trainer(model, adapter, { lr: -1 })).toThrow(InvalidArgumentError);
    expect(() => new Trainer(model, adapter, { evalEvery: 5 })).toThrow(InvalidArgumentError);
    expect(() => new Trainer(model, adapter, { lmWeight: 0, ulWeight: 0, lnWeight: 0 })).toThrow(InvalidArgumentError);
    // recompute: the values (and the error) of lib/model.ts's recomputeLevel, which LossOptions checks too
    for (const recompute of [true, false, ...RECOMPUTE_LEVELS]) expect(new Trainer(model, adapter, { recompute }).options.recompute).toBe(recompute);
    expect(() => new Trainer(model, adapter, { recompute: 'ffn' as 'all' })).toThrow(InvalidArgumentError);
    expect(() => new Trainer(model, adapter, { recompute: 'ffn' as 'all' })).toThrow(/^recompute must be a boolean, 'auto', 'none', 'attention' or 'all', got "ffn"$/);
    const other = IA3Adapter.create({ ...SMALL_CONFIG, dFf: 5 });
    expect(() => new Trainer(model, other)).toThrow(InvalidAdapterError);
    const trainer = new Trainer(model, adapter, { steps: 2 });
    await expect(trainer.train([])).rejects.toThrow(InvalidArgumentError);
    await expect(trainer.train([{ input: [3, 1], choices: [[1]], label: 1 }])).rejects.toThrow(InvalidArgumentError);
    // Mixed text and token-id choices need a tokenizer, which this model lacks.
    await expect(trainer.train([{ input: [3, 1], choices: ['yes', [2, 1]], label: 0 }])).rejects.toThrow(InvalidArgumentError);
    model.disposed = true;
    await expect(trainer.train(examplesFor([1]))).rejects.toThrow(DisposedError);
  });
});

// A few-shot task on the embedded tiny model: the word in the prompt decides the answer.
describe('few-shot training on the tiny T5', () => {
  const WARM = ['red', 'orange', 'yellow', 'amber', 'crimson', 'gold'];
  const COOL = ['blue', 'green', 'teal', 'cyan', 'navy', 'violet'];
  const ANSWERS = ['hot', 'cold'];
  let dir: string;

  beforeAll(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tfew-trainer-tiny-'));
  });
  afterAll(() => {
    fs.rmSync(dir, { recursive: true, force: true });
  });

  async function loadTiny() {
    const { buildTinyT5 } = require('../lib/tiny') as typeof import('../lib/tiny');
    const { T5Model } = require('../lib/model') as typeof import('../lib/model');
    const modelDir = path.join(dir, 'model');
    if (!fs.existsSync(path.join(modelDir, 'config.json'))) {
      buildTinyT5(modelDir, { words: ['the', 'color', 'is', 'feels', ...WARM, ...COOL, ...ANSWERS], seed: 11 });
    }
    return T5Model.load(modelDir, { device: 'cpu', threads: 1 });
  }

  function task(adapter?: IA3Adapter, inverted = false): TrainExample[] {
    const words = [...WARM.map((w) => [w, 0] as const), ...COOL.map((w) => [w, 1] as const)];
    return words.map(([w, label]) => ({
      input: `the color ${w} feels`,
      choices: ANSWERS,
      label: inverted ? 1 - label : label,
      ...(adapter ? { adapter } : {}),
    }));
  }

  const mean = (xs: number[]) => xs.reduce((s, x) => s + x, 0) / xs.length;

  // The tiny model is random (it knows nothing), so these runs use a larger lr than T-Few's 3e-3.
  test('training lowers the loss and raises the accuracy; the same seed reproduces the losses', async () => {
    const model = await loadTiny();
    try {
      const examples = task();
      const run = async (seed = 5) => {
        const adapter = IA3Adapter.create(model);
        const trainer = new Trainer(model, adapter, { steps: 150, batchSize: 4, lr: 0.1, seed });
        const before = await trainer.evaluate(examples);
        const result = await trainer.train(examples);
        const after = await trainer.evaluate(examples);
        return { before, after, result };
      };
      const first = await run();
      expect(first.result.steps).toBe(150);
      expect(mean(first.result.losses.slice(-10))).toBeLessThan(0.5 * mean(first.result.losses.slice(0, 10)));
      expect(first.after.accuracy).toBeGreaterThan(first.before.accuracy);
      expect(first.after.accuracy).toBeGreaterThanOrEqual(0.9);

      // Dropout is on (rate 0.1), seeded by seed + step, so a second run repeats the first exactly.
      const second = await run();
      expect(second.result.losses).toEqual(first.result.losses);
      const otherSeed = await run(6);
      expect(otherSeed.result.losses).not.toEqual(first.result.losses);
    } finally {
      await model.dispose();
    }
  });

  test('text is tokenized once per run, not at every step; the same losses as token ids', async () => {
    const model = await loadTiny();
    try {
      const examples = task();
      const tokenizer = model.tokenizer!;
      const encode = tokenizer.encode.bind(tokenizer);
      let calls = 0;
      tokenizer.encode = (text, options) => {
        calls++;
        return encode(text, options);
      };
      const options = { steps: 20, batchSize: 4, lr: 0.1, seed: 3 };
      const fromText = await new Trainer(model, IA3Adapter.create(model), options).train(examples);
      tokenizer.encode = encode;
      expect(calls).toBe(examples.length * (1 + ANSWERS.length));  // 20 steps x 4 examples drawn: 240 before
      const asIds = examples.map((e) => ({ ...e, input: model.tokenize(e.input as string, 256), choices: ANSWERS.map((c) => model.tokenize(c)) }));
      const fromIds = await new Trainer(model, IA3Adapter.create(model), options).train(asIds);
      expect(fromIds.losses).toEqual(fromText.losses);
    } finally {
      await model.dispose();
    }
  });

  test('mixed-task training: two adapters learn opposite labels for the same inputs in shared batches', async () => {
    const model = await loadTiny();
    try {
      const a = IA3Adapter.create(model);
      const b = IA3Adapter.create(model);
      const taskA = task(a);
      const taskB = task(b, true);
      const trainer = new Trainer(model, a, { steps: 150, batchSize: 8, lr: 0.1, seed: 5 });
      const result = await trainer.train([...taskA, ...taskB]);
      expect(mean(result.losses.slice(-10))).toBeLessThan(0.5 * mean(result.losses.slice(0, 10)));
      // One adapter could not fit both: the inputs are identical and the labels opposite.
      expect((await trainer.evaluate(taskA)).accuracy).toBeGreaterThanOrEqual(0.9);
      expect((await trainer.evaluate(taskB)).accuracy).toBeGreaterThanOrEqual(0.9);
    } finally {
      await model.dispose();
    }
  });
});
