// The CLI's CUDA switches (--cuda-*) and --recompute: parsed into T5Model.load's `cuda` option and the
// Trainer's `recompute`, bad values refused before anything loads. Runs on the CPU backend (which accepts and
// ignores both), so it checks the plumbing, not what CUDA does with them.
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { main } from '../lib/cli/main';
import { CUDA_CROSS_ATTENTION, CUDA_PRECISIONS, RECOMPUTE_LEVELS, T5Model, type LoadOptions } from '../lib/model';
import { CudaError } from '../lib/errors';
import { native } from '../lib/native';
import { buildTinyT5 } from '../lib/tiny';
import { Trainer } from '../lib/trainer';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tfew-cli-flags-'));
const modelDir = path.join(tmp, 'tiny');
const trainFile = path.join(tmp, 'reviews.csv');

const REVIEWS = [
  ['the plot was superb', 'good'], ['the acting was dreadful', 'bad'], ['the music was lovely', 'good'],
  ['the pacing was tedious', 'bad'], ['the cast was brilliant', 'good'], ['the script was awful', 'bad'],
  ['the ending was moving', 'good'], ['the dialogue was clumsy', 'bad'], ['the camera work was superb', 'good'],
  ['the story was boring', 'bad'], ['the score was lovely', 'good'], ['the jokes were awful', 'bad'],
];

let lines: string[];
const io = { out: (l: string) => lines.push(l), err: (l: string) => lines.push(`ERR ${l}`), interactive: false };
const run = (...args: string[]) => main(['node', 'tfew', ...args], io);
// A custom task over the CSV: 4 shots per seed, the other 8 rows evaluate.
const model = ['--model', modelDir, '--device', 'cpu', '--threads', '2'];
const task = ['--task', 'custom', '--train-file', trainFile, '--sample', '4'];

let load: jest.SpyInstance<Promise<T5Model>, [string, LoadOptions?]>;
let train: jest.SpyInstance;

beforeAll(() => {
  fs.writeFileSync(trainFile, `text,label\n${REVIEWS.map(([t, l]) => `${t},${l}`).join('\n')}\n`);
  buildTinyT5(modelDir, { words: ['text', 'label', ...REVIEWS.flat().join(' ').split(' ')], seed: 3, dModel: 16, dFf: 32, numHeads: 2, dKv: 8, numLayers: 1 });
});
beforeEach(() => {
  lines = [];
  // call through: the real model loads and trains, the spies only record what they were given
  load = jest.spyOn(T5Model, 'load');
  train = jest.spyOn(Trainer.prototype, 'train');
});
afterEach(() => jest.restoreAllMocks());
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

/** The `cuda` option of the only T5Model.load call. */
function loadedCuda(): unknown {
  expect(load).toHaveBeenCalledTimes(1);
  expect(load.mock.calls[0][0]).toBe(modelDir);
  return load.mock.calls[0][1]?.cuda;
}
/** The recompute option of every Trainer that trained. */
const trainedRecompute = (): unknown[] => (train.mock.contexts as Trainer[]).map((t) => t.options.recompute);

describe('tfew CUDA flags', () => {
  test('train: every --cuda-* flag reaches T5Model.load, --recompute the Trainer (and run.json)', async () => {
    const out = path.join(tmp, 'all-flags');
    const code = await run('train', ...model, ...task, '--seed', '42', '--steps', '2', '--batch-size', '2', '--out', out,
      '--cuda-device', '0', '--cuda-precision', 'fp32', '--cuda-cross-attention', 'folded', '--no-cuda-fused-attention', '--no-cuda-fused-backward',
      '--cuda-few-row-linears', '--cuda-gemm-tuning', '--cuda-programmatic-launch', '--cuda-attention-occupancy',
      '--cuda-encoder-chunk-rows', '1024', '--no-cuda-graphs', '--no-cuda-graph-buckets',
      '--recompute', 'attention');
    expect(lines.filter((l) => l.startsWith('ERR tfew:'))).toEqual([]);
    expect(code).toBe(0);
    expect(load.mock.calls[0][1]).toMatchObject({ device: 'cpu', threads: 2 });
    expect(loadedCuda()).toStrictEqual({ device: 0, precision: 'fp32', crossAttention: 'folded', fusedAttention: false, fusedBackward: false,
      fewRowLinears: true, gemmTuning: true, programmaticLaunch: true, attentionOccupancy: true, encoderChunkRows: 1024, graphs: false,
      graphBuckets: false });
    expect(trainedRecompute()).toEqual(['attention']);
    expect(JSON.parse(fs.readFileSync(path.join(out, 'run.json'), 'utf8')).training.recipe.recompute).toBe('attention');
  });

  test('train without the flags: no cuda option (the TFEW_CUDA_* variables decide) and the default recompute', async () => {
    const out = path.join(tmp, 'no-flags');
    expect(await run('train', ...model, ...task, '--seed', '42', '--steps', '1', '--batch-size', '2', '--out', out)).toBe(0);
    expect(loadedCuda()).toBeUndefined();
    expect(trainedRecompute()).toEqual(['auto']);
    expect(JSON.parse(fs.readFileSync(path.join(out, 'run.json'), 'utf8')).training.recipe.recompute).toBe('auto');
  });

  test('one --no-cuda-* flag sets only its own switch', async () => {
    expect(await run('train', ...model, ...task, '--seed', '42', '--steps', '1', '--out', path.join(tmp, 'graphs'), '--no-cuda-graphs')).toBe(0);
    expect(loadedCuda()).toStrictEqual({ graphs: false });
  });

  test('eval and classify load with the CUDA flags; they do not train, so they take no --recompute', async () => {
    expect(await run('eval', ...model, ...task, '--limit', '2', '--cuda-cross-attention', 'precomputed', '--cuda-precision', 'bf16')).toBe(0);
    expect(loadedCuda()).toStrictEqual({ crossAttention: 'precomputed', precision: 'bf16' });
    expect(train).not.toHaveBeenCalled();

    load.mockClear();
    const input = path.join(tmp, 'classify.csv');
    fs.writeFileSync(input, 'text\nthe plot was lovely\n');
    expect(await run('classify', ...model, ...task, '--input', input, '--no-cuda-fused-attention')).toBe(0);
    expect(loadedCuda()).toStrictEqual({ fusedAttention: false });
    expect(JSON.parse(lines[lines.length - 1]).label).toMatch(/^(good|bad)$/);

    load.mockClear();
    expect(await run('classify', ...model, ...task, '--input', input, '--cuda-fused-backward')).toBe(0);
    expect(loadedCuda()).toStrictEqual({ fusedBackward: true });  // the explicit form of a switch that is on by default

    load.mockClear();
    expect(await run('eval', ...model, ...task, '--recompute', 'all')).toBe(1);
    expect(lines).toContain("ERR error: unknown option '--recompute'");
    expect(load).not.toHaveBeenCalled();
  });

  test('icl --compare and bench train with --recompute; demo takes both kinds of flag', async () => {
    expect(await run('icl', ...model, ...task, '--compare', '--seeds', '42', '--steps', '1', '--batch-size', '2', '--limit', '2', '--shots', '1',
      '--no-zero-shot', '--recompute', 'none', '--cuda-precision', 'fp32')).toBe(0);
    expect(loadedCuda()).toStrictEqual({ precision: 'fp32' });
    expect(trainedRecompute()).toEqual(['none']);

    load.mockClear();
    train.mockClear();
    expect(await run('bench', ...model, ...task, '--examples', '2', '--train-steps', '1', '--shots', '1', '--recompute', 'all')).toBe(0);
    expect(loadedCuda()).toBeUndefined();
    expect(trainedRecompute()).toEqual(['all']);

    load.mockClear();
    train.mockClear();
    expect(await run('demo', '--model-dir', path.join(tmp, 'demo'), '--device', 'cpu', '--threads', '1', '--steps', '2',
      '--cuda-cross-attention', 'auto', '--no-cuda-graphs', '--recompute', 'attention')).toBe(0);
    expect(load.mock.calls[0][1]?.cuda).toStrictEqual({ crossAttention: 'auto', graphs: false });
    expect(load.mock.calls[0][1]?.threads).toBe(1);
    expect(trainedRecompute()).toEqual(['attention']);
  });

  test('an adapter is evaluated under the seed it was trained on: eval refuses another --seeds; icl --compare reports its seed', async () => {
    const out = path.join(tmp, 'seed-42-adapter');
    expect(await run('train', ...model, ...task, '--seed', '42', '--steps', '1', '--batch-size', '2', '--out', out)).toBe(0);
    lines = [];
    expect(await run('eval', ...model, ...task, '--adapter', out, '--seeds', '7', '--limit', '2')).toBe(1);
    expect(lines.join('\n')).toMatch(/--seeds 7: the adapter .* was trained on seed 42/);
    lines = [];
    expect(await run('eval', ...model, ...task, '--adapter', out, '--limit', '2')).toBe(0);
    expect(lines.join('\n')).toMatch(/seeds: 42|seed 42/);
    const report = path.join(tmp, 'icl-report');
    expect(await run('icl', ...model, ...task, '--compare', '--adapter', out, '--limit', '2', '--shots', '1', '--no-zero-shot',
      '--report', report)).toBe(0);
    const md = fs.readFileSync(`${report}.md`, 'utf8');
    expect(md).toMatch(/Seeds: 42\b/);
    expect(md).not.toMatch(/Seeds: 42, /);
  });

  test.each([
    ['--cuda-precision', 'fp16', `option '--cuda-precision <precision>' argument 'fp16' is invalid. Allowed choices are ${CUDA_PRECISIONS.join(', ')}.`],
    ['--cuda-cross-attention', 'fused', `option '--cuda-cross-attention <mode>' argument 'fused' is invalid. Allowed choices are ${CUDA_CROSS_ATTENTION.join(', ')}.`],
    ['--recompute', 'true', `option '--recompute <level>' argument 'true' is invalid. Allowed choices are ${RECOMPUTE_LEVELS.join(', ')}.`],
  ])('%s %s: a one-line error naming the allowed values, exit 1, nothing loaded', async (flag, value, message) => {
    expect(await run('train', ...model, ...task, '--out', path.join(tmp, 'bad'), flag, value)).toBe(1);
    expect(lines[0]).toBe(`ERR error: ${message}`);
    expect(load).not.toHaveBeenCalled();
    expect(fs.existsSync(path.join(tmp, 'bad'))).toBe(false);
  });

  test('train --seeds with --cuda-devices: a replica per device, seeds in parallel, the same adapters as one after another', async () => {
    // --cuda-devices loads each replica with device 'cuda' on its GPU; here T5Model.load puts them on the CPU instead
    // (which runs them at once just as well), so that the plumbing is tested on any machine
    load.mockRestore();
    const realLoad = T5Model.load.bind(T5Model);
    load = jest.spyOn(T5Model, 'load').mockImplementation((d, opts) => realLoad(d, { ...opts, device: 'cpu' }));
    const auto = ['--model', modelDir, '--device', 'auto', '--threads', '1'];
    const seq = path.join(tmp, 'seeds-seq'), par = path.join(tmp, 'seeds-par');
    expect(await run('train', ...auto, ...task, '--seeds', '42,1024,0', '--steps', '3', '--batch-size', '2', '--out', seq)).toBe(0);
    expect(load).toHaveBeenCalledTimes(1);
    load.mockClear();
    expect(await run('train', ...auto, ...task, '--seeds', '42,1024,0', '--steps', '3', '--batch-size', '2', '--out', par,
      '--cuda-devices', '0,1')).toBe(0);
    expect(load.mock.calls.map((c) => [c[1]?.device, c[1]?.cuda?.device])).toEqual([['cuda', 0], ['cuda', 1]]);
    expect(JSON.parse(fs.readFileSync(path.join(par, 'seed-0', 'run.json'), 'utf8'))).toMatchObject({ replicas: 2 });
    for (const seed of [42, 1024, 0]) {
      const file = (dir: string) => fs.readFileSync(path.join(dir, `seed-${seed}`, 'adapter_model.safetensors'));
      expect(file(par).equals(file(seq))).toBe(true);
    }
    expect(lines.filter((l) => / seed \d+.*: 3 steps/.test(l))).toHaveLength(6);
    for (const r of [0, 1]) expect(lines.some((l) => new RegExp(`seed \\d+ \\((replica|GPU) ${r}\\): 3 steps`).test(l))).toBe(true);  // both trained
    // eval shares its template x seed runs out among the replicas: the same report
    const evalJson = async (name: string, ...flags: string[]) => {
      const file = path.join(tmp, name);
      expect(await run('eval', ...auto, ...task, '--adapter', seq, '--json', file, ...flags)).toBe(0);
      const r = JSON.parse(fs.readFileSync(file, 'utf8'));
      return { summary: r.summary, runs: r.runs.map((x: Record<string, unknown>) => [x.template, x.seed, x.accuracy, x.count]) };
    };
    const one = await evalJson('eval-one.json');
    expect(one.runs.length).toBeGreaterThan(2);
    expect(await evalJson('eval-two.json', '--cuda-devices', '0,1')).toEqual(one);
    // classify shares its batches out: the same predictions, in input order
    const input = path.join(tmp, 'classify-many.csv');
    fs.writeFileSync(input, `text\n${REVIEWS.map(([t]) => t).join('\n')}\n`);
    const predictions = async (...flags: string[]) => {
      const file = path.join(tmp, `classify-${flags.length}.jsonl`);
      expect(await run('classify', ...auto, ...task, '--input', input, '--adapter', path.join(seq, 'seed-42'), '--batch-size', '3', '--out', file, ...flags)).toBe(0);
      return fs.readFileSync(file, 'utf8').trim().split('\n').map((l) => JSON.parse(l));
    };
    const single = await predictions();
    expect(single).toHaveLength(REVIEWS.length);
    expect(await predictions('--cuda-devices', '0,1')).toEqual(single);
    expect(await run('train', ...model, ...task, '--seeds', '42', '--out', path.join(tmp, 'bad-devices'), '--cuda-devices', '0')).toBe(1);
    expect(lines.at(-1)).toBe('ERR tfew: --cuda-devices needs --device cuda or auto [E_INVALID_ARGUMENT]');
    // without a usable GPU, --cuda-devices is an error, never a CPU replica
    load.mockRestore();
    load = jest.spyOn(T5Model, 'load');
    if (!native().probeCuda().usable) {
      expect(await run('train', ...auto, ...task, '--seeds', '42', '--out', path.join(tmp, 'no-gpu'), '--cuda-devices', '0')).toBe(1);
      expect(lines.at(-1)).toMatch(/^ERR tfew: device 'cuda' is not available: .* \[E_DEVICE_UNAVAILABLE\]$/);
      expect(await run('train', ...auto, ...task, '--seeds', '42', '--out', path.join(tmp, 'no-gpu'), '--cuda-devices', 'all')).toBe(1);
      expect(lines.at(-1)).toMatch(/^ERR tfew: --cuda-devices all: no usable GPU .* \[E_DEVICE_UNAVAILABLE\]$/);
    }
  });

  describe('train --seeds across replicas when a run fails or Ctrl-C comes', () => {
    // Replicas as above: CPU models standing in for GPUs. Seeds 42 and 1024 start at once, one per replica.
    let replicas: T5Model[];
    beforeEach(() => {
      load.mockRestore();
      const realLoad = T5Model.load.bind(T5Model);
      replicas = [];
      load = jest.spyOn(T5Model, 'load').mockImplementation(async (d, opts) => {
        const m = await realLoad(d, { ...opts, device: 'cpu' });
        replicas.push(m);
        return m;
      });
    });
    const parallel = (out: string, steps: number) => run('train', '--model', modelDir, '--device', 'auto', '--threads', '1', ...task,
      '--seeds', '42,1024,0', '--steps', String(steps), '--batch-size', '2', '--out', out, '--cuda-devices', '0,1');
    const saved = (out: string) => [42, 1024, 0].filter((seed) => fs.existsSync(path.join(out, `seed-${seed}`, 'adapter_model.safetensors')));

    test('a run that fails on one replica: no new seed starts, the run in flight finishes and is saved, the error is reported', async () => {
      train.mockRestore();
      const original = Trainer.prototype.train;
      train = jest.spyOn(Trainer.prototype, 'train').mockImplementation(async function (this: Trainer, ...args) {
        if (this.model === replicas[1]) {
          await new Promise((resolve) => setImmediate(resolve));
          throw new CudaError('an illegal memory access was encountered (simulated)');
        }
        return original.apply(this, args);
      });
      const out = path.join(tmp, 'seeds-fail');
      expect(await parallel(out, 10)).toBe(1);
      expect(train).toHaveBeenCalledTimes(2);  // seed 0 never started
      expect(saved(out)).toEqual([42]);
      expect(JSON.parse(fs.readFileSync(path.join(out, 'seed-42', 'run.json'), 'utf8'))).toMatchObject({ seed: 42, replicas: 2, training: { steps: 10 } });
      expect(lines.some((l) => /seed 42 \((replica|GPU) 0\): 10 steps/.test(l))).toBe(true);
      expect(lines.at(-1)).toMatch(/^ERR tfew: .*illegal memory access was encountered \(simulated\)/);
      expect(replicas.every((m) => m.disposed)).toBe(true);
    });

    test('Ctrl-C: every run in flight stops after its step, nothing is saved, no new seed starts, exit code 130', async () => {
      const handlers: (() => void)[] = [];
      const once = process.once.bind(process);
      jest.spyOn(process, 'once').mockImplementation(((event: string, listener: () => void) => {
        if (event !== 'SIGINT') return once(event, listener);
        handlers.push(listener);  // (not the real signal: jest's own handlers stay out of it)
        return process;
      }) as typeof process.once);
      train.mockRestore();
      const original = Trainer.prototype.train;
      train = jest.spyOn(Trainer.prototype, 'train').mockImplementation(async function (this: Trainer, examples, options) {
        // Ctrl-C once both runs have taken a step (of 200)
        this.once('step', () => {
          if (++stepping === 2) handlers.forEach((h) => h());
        });
        return original.call(this, examples, options);
      });
      let stepping = 0;
      const out = path.join(tmp, 'seeds-sigint');
      expect(await parallel(out, 200)).toBe(130);
      expect(handlers).toHaveLength(1);
      expect(train).toHaveBeenCalledTimes(2);
      expect(saved(out)).toEqual([]);
      expect(lines).toContain('ERR [tfew] interrupted: stopping after this step (the adapter will not be saved)');
      expect(lines.some((l) => / steps in /.test(l))).toBe(false);
      expect(replicas.every((m) => m.disposed)).toBe(true);
    });
  });

  test('doctor: the GPUs it sees (none here: the reason), as text and JSON', async () => {
    const probe = native().probeCuda();
    expect(await run('doctor', '--json')).toBe(0);
    const info = JSON.parse(lines.join('\n'));
    expect(info.cuda).toMatchObject({ usable: probe.usable, deviceCount: probe.deviceCount, deviceIndex: probe.deviceIndex });
    expect(info.defaultDevice).toBe(probe.usable ? 'cuda' : 'cpu');
    lines = [];
    expect(await run('doctor')).toBe(0);
    expect(lines.some((l) => l.startsWith('cuda usable  ' + (probe.usable ? 'yes' : 'no')))).toBe(true);
    expect(lines.filter((l) => l.startsWith('gpu ')).length).toBe(probe.deviceName ? Math.max(1, probe.deviceCount) : 0);
  });

  test('--help lists the flags', async () => {
    expect(await run('train', '--help')).toBe(0);
    const help = lines.join('\n');
    for (const flag of ['--cuda-device <n>', '--cuda-precision <precision>', '--cuda-cross-attention <mode>', '--no-cuda-fused-attention', '--cuda-fused-backward', '--no-cuda-fused-backward',
      '--cuda-few-row-linears', '--no-cuda-few-row-linears', '--cuda-gemm-tuning', '--no-cuda-gemm-tuning',
      '--cuda-programmatic-launch', '--no-cuda-programmatic-launch', '--cuda-attention-occupancy', '--no-cuda-attention-occupancy',
      '--cuda-encoder-chunk-rows <n>', '--no-cuda-graphs', '--no-cuda-graph-buckets', '--recompute <level>']) {
      expect(help).toContain(flag);
    }
    lines = [];
    expect(await run('serve', '--help')).toBe(0);
    expect(lines.join('\n')).toContain('--no-group-by-length');
  });
});
