#!/usr/bin/env node
// The `tfew` command line: demo, train, eval, classify, icl [--compare], bench, doctor.
// Every command is a thin layer over lib/pipeline (the same functions the API exports).
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { Command, InvalidArgumentError as CommanderArgumentError, Option } from 'commander';
import { IA3Adapter } from '../adapter';
import { DeviceUnavailableError, InvalidArgumentError, TfewError } from '../errors';
import { CUDA_CROSS_ATTENTION, CUDA_PRECISIONS, graphBucketLengths, RECOMPUTE_LEVELS, T5Model, type DeviceOption, type GraphWarmUpShape, type RecomputeLevel } from '../model';
import { native, type CudaOptions, type CudaProbe, type ReserveShape } from '../native';
import { shareOut } from '../replicas';
import { classify } from '../pipeline/classify';
import { comparisonJson, comparisonReport, compareWithIcl } from '../pipeline/compare';
import { formatBytes, formatFlops, ia3ParameterCount, parameterCount } from '../pipeline/cost';
import { runDemo } from '../pipeline/demo';
import { evaluate, withoutPredictions, type EvaluationReport } from '../pipeline/evaluate';
import { trainAdapter, type RecipeOptions, type TrainingRun } from '../pipeline/fewshot';
import { evaluateIcl } from '../pipeline/icl';
import { markdownReport, writeReport } from '../pipeline/report';
import { writeRaftSubmission } from '../pipeline/raft-submission';
import { benchmark } from '../pipeline/bench';
import { createCustomTask, getTask, type Task } from '../tasks/registry';
import { resolveDataDir } from '../tasks/files';
import { readUserData } from '../tasks/custom';
import type { Template } from '../templates/engine';
import { loadTemplateFile } from '../templates/user';
import type { StepEvent } from '../trainer';
import { RankServer } from '../serve-http';

export interface CliIO {
  out: (line: string) => void;
  err: (line: string) => void;
  /** Whether stderr is a terminal (progress bars) or a log (progress lines). */
  interactive: boolean;
}

const defaultIO: CliIO = {
  out: (l) => process.stdout.write(`${l}\n`),
  err: (l) => process.stderr.write(`${l}\n`),
  interactive: Boolean(process.stderr.isTTY),
};

// ---------------------------------------------------------------------------------------------------
// Option parsing helpers

function int(name: string) {
  return (v: string): number => {
    const n = Number(v);
    if (!Number.isInteger(n)) throw new CommanderArgumentError(`${name} must be an integer`);
    return n;
  };
}
function num(name: string) {
  return (v: string): number => {
    const n = Number(v);
    if (!Number.isFinite(n)) throw new CommanderArgumentError(`${name} must be a number`);
    return n;
  };
}
const list = (v: string): string[] => v.split(',').map((s) => s.trim()).filter(Boolean);

interface CudaOpts {
  cudaDevice?: number; cudaPrecision?: CudaOptions['precision']; cudaCrossAttention?: CudaOptions['crossAttention'];
  cudaFusedAttention?: boolean; cudaFusedBackward?: boolean; cudaFewRowLinears?: boolean; cudaGemmTuning?: boolean;
  cudaProgrammaticLaunch?: boolean;
  cudaAttentionOccupancy?: boolean;
  cudaEncoderChunkRows?: number;
  cudaGraphs?: boolean;
  cudaGraphBuckets?: boolean;
}
interface ModelOpts extends CudaOpts { model: string; device: DeviceOption; threads?: number }
interface TaskOpts {
  task?: string; dataDir?: string; trainFile?: string; evalFile?: string; testFile?: string; labelColumn?: string;
  labels?: string[]; templateFile?: string; templates?: string[]; instruction?: string; sample?: number;
  raftLabels?: 'comma' | 'newline' | 'none'; cleanLabels?: boolean;
}
interface RecipeOpts {
  steps?: number; batchSize?: number; lr?: number; lmWeight?: number; ulWeight?: number; lnWeight?: number;
  dropout: boolean; maxInputLength?: number; recompute?: RecomputeLevel;
}

// T5Model.load's `cuda` switches. The choices are the library's own lists, so the CLI accepts exactly what it does.
function addCudaOptions(cmd: Command): Command {
  return cmd
    .option('--cuda-device <n>', 'CUDA: which GPU, an index among the visible ones (default: $TFEW_CUDA_DEVICE, else 0)', int('--cuda-device'))
    .addOption(new Option('--cuda-precision <precision>', 'CUDA: bf16 (default), or fp32 everywhere to verify against the CPU backend').choices(CUDA_PRECISIONS))
    .addOption(new Option('--cuda-cross-attention <mode>', 'CUDA: the decoder\'s cross-attention, folded or with precomputed keys/values (default auto: folded where it pays)').choices(CUDA_CROSS_ATTENTION))
    .option('--no-cuda-fused-attention', 'CUDA: the unfused encoder attention instead of the fused tensor-core kernel')
    .option('--cuda-fused-backward', 'CUDA training: the fused encoder attention backward kernels (the default)')
    .option('--no-cuda-fused-backward', 'CUDA training: the cuBLAS encoder attention backward instead of the fused kernels')
    .option('--cuda-few-row-linears', 'CUDA: the decoder\'s linear layers of small calls in kernels with their norm and activation folded in')
    .option('--no-cuda-few-row-linears', 'CUDA: the decoder\'s linear layers on cuBLAS at every size (the default)')
    .option('--cuda-gemm-tuning', 'CUDA: time each GEMM shape\'s cuBLAS/cuBLASLt algorithms on its first call and keep the fastest')
    .option('--no-cuda-gemm-tuning', 'CUDA: cuBLAS\'s own choice of GEMM algorithm (the default)')
    .option('--cuda-programmatic-launch', 'CUDA (cc 9.0+): each kernel may be scheduled while the one before it finishes (programmatic dependent launch)')
    .option('--no-cuda-programmatic-launch', 'CUDA: each kernel starts after the one before it has ended (the default)')
    .option('--cuda-attention-occupancy', "CUDA bf16, d_kv 64: the fused encoder attention's kernels compiled for one more block per SM")
    .option('--no-cuda-attention-occupancy', "CUDA: the fused encoder attention's kernels at their own register counts (the default)")
    .option('--cuda-encoder-chunk-rows <n>', 'CUDA inference: run the encoder over chunks of about n rows (whole examples) so its temporaries stay in L2 (default 0: off)', int('--cuda-encoder-chunk-rows'))
    .option('--no-cuda-graphs', 'CUDA: launch kernels one by one instead of replaying CUDA graphs')
    .option('--no-cuda-graph-buckets', 'CUDA: run every call at its exact lengths (not padded to a shared CUDA graph\'s)');
}

/** The `cuda` load option from the flags; flags not given stay unset, so the TFEW_CUDA_* variables still apply. */
function cudaOptions(o: CudaOpts): CudaOptions | undefined {
  const c: CudaOptions = {};
  if (o.cudaDevice !== undefined) c.device = o.cudaDevice;
  if (o.cudaPrecision !== undefined) c.precision = o.cudaPrecision;
  if (o.cudaCrossAttention !== undefined) c.crossAttention = o.cudaCrossAttention;
  // commander defaults a --no-x flag to true: only an explicit --no-x (false) is passed on
  if (o.cudaFusedAttention === false) c.fusedAttention = false;
  if (o.cudaFusedBackward !== undefined) c.fusedBackward = o.cudaFusedBackward;  // (both forms defined: no default)
  if (o.cudaFewRowLinears !== undefined) c.fewRowLinears = o.cudaFewRowLinears;  // (the same)
  if (o.cudaGemmTuning !== undefined) c.gemmTuning = o.cudaGemmTuning;  // (the same)
  if (o.cudaProgrammaticLaunch !== undefined) c.programmaticLaunch = o.cudaProgrammaticLaunch;  // (the same)
  if (o.cudaAttentionOccupancy !== undefined) c.attentionOccupancy = o.cudaAttentionOccupancy;  // (the same)
  if (o.cudaEncoderChunkRows !== undefined) c.encoderChunkRows = o.cudaEncoderChunkRows;
  if (o.cudaGraphs === false) c.graphs = false;
  if (o.cudaGraphBuckets === false) c.graphBuckets = false;
  return Object.keys(c).length > 0 ? c : undefined;
}

/** --recompute for the commands that train (a fresh Option each: commander options belong to one command). */
function recomputeOption(): Option {
  return new Option('--recompute <level>', 'CUDA training: what the backward recomputes to save device memory (default auto)').choices(RECOMPUTE_LEVELS);
}

function addModelOptions(cmd: Command): Command {
  return addCudaOptions(cmd
    .requiredOption('-m, --model <dir>', 'Hugging Face T5/T0 directory (config.json, *.safetensors, tokenizer.json)')
    .addOption(new Option('--device <device>', 'backend').choices(['auto', 'cpu', 'cuda']).default('auto'))
    .option('--threads <n>', 'CPU backend threads (default: all cores)', int('--threads')));
}

function addTaskOptions(cmd: Command): Command {
  return cmd
    .option('-t, --task <name>', 'rte, cb, copa, wic, wsc, anli-r1..3, h-swag, storycloze, winogrande, a RAFT task, or "custom"')
    .option('--data-dir <dir>', 'data directory (default: $TFEW_DATA_DIR, else ../shared/data)')
    .option('--train-file <file>', 'custom task: labelled CSV/TSV/JSONL')
    .option('--eval-file <file>', 'custom task: labelled evaluation file')
    .option('--test-file <file>', 'custom task: unlabelled file for classify')
    .option('--label-column <name>', 'custom task: the label column', 'label')
    .option('--labels <names>', 'custom task: label names in answer-choice order (comma-separated)', list)
    .option('--template-file <file>', 'JSON templates (see docs/pipeline.md); replaces the built-in ones')
    .option('--templates <names>', 'only these templates (comma-separated names)', list)
    .option('--instruction <text>', 'custom task: an instruction line for the default template')
    .option('--sample <k>', 'custom task: draw k training examples per seed (T-Few\'s sampler); default all rows', int('--sample'))
    .addOption(new Option('--raft-labels <mode>', 'RAFT: how labels appear in the prompt').choices(['comma', 'newline', 'none']))
    .option('--clean-labels', 'RAFT banking_77: "card_arrival" -> "card arrival" in the answer choices');
}

function addRecipeOptions(cmd: Command): Command {
  return cmd
    .option('--steps <n>', 'optimizer steps (T-Few: 1000)', int('--steps'))
    .option('--batch-size <n>', 'examples per step (T-Few: 8)', int('--batch-size'))
    .option('--lr <x>', 'peak learning rate (T-Few: 3e-3)', num('--lr'))
    .option('--lm-weight <x>', 'LM loss weight (1)', num('--lm-weight'))
    .option('--ul-weight <x>', 'unlikelihood loss weight (1)', num('--ul-weight'))
    .option('--ln-weight <x>', 'length-normalised loss weight (1)', num('--ln-weight'))
    .option('--no-dropout', 'train without dropout (T-Few trains with 0.1)')
    .option('--max-input-length <n>', 'truncate inputs to this many tokens (256)', int('--max-input-length'))
    .addOption(recomputeOption());
}

function recipe(o: RecipeOpts): RecipeOptions {
  return {
    steps: o.steps, batchSize: o.batchSize, lr: o.lr, lmWeight: o.lmWeight, ulWeight: o.ulWeight, lnWeight: o.lnWeight,
    dropout: o.dropout === false ? false : undefined, maxInputLength: o.maxInputLength, recompute: o.recompute,
  };
}

function resolveTask(o: TaskOpts): Task {
  if (o.trainFile || o.task === 'custom') {
    if (!o.trainFile) throw new InvalidArgumentError('--task custom needs --train-file');
    return createCustomTask({
      name: path.basename(o.trainFile).replace(/\.[^.]+$/, ''),
      trainFile: o.trainFile, evalFile: o.evalFile, testFile: o.testFile, labelColumn: o.labelColumn,
      labelNames: o.labels, templateFile: o.templateFile, instruction: o.instruction, numShots: o.sample,
    });
  }
  if (!o.task) throw new InvalidArgumentError('give --task NAME (or --train-file for your own data)');
  return getTask(o.task, { dataDir: o.dataDir, labelsInInput: o.raftLabels, cleanLabelNames: o.cleanLabels });
}

function resolveTemplates(task: Task, o: TaskOpts): Template[] {
  let templates = o.templateFile && task.kind !== 'custom' ? loadTemplateFile(o.templateFile, task.labelNames.slice()) : task.templates();
  if (o.templates) {
    const missing = o.templates.filter((n) => !templates.some((t) => t.name === n));
    if (missing.length > 0) {
      throw new InvalidArgumentError(`unknown template(s) ${missing.join(', ')}; ${task.name} has ${templates.map((t) => t.name).join(', ')}`);
    }
    templates = templates.filter((t) => o.templates?.includes(t.name));
  }
  return templates;
}

function parseSeeds(value: string | undefined, task: Task): number[] {
  if (value === undefined || value === 'all') return [...task.seeds];
  return list(value).map((s) => {
    const n = Number(s);
    if (!Number.isInteger(n)) throw new InvalidArgumentError(`--seeds: "${s}" is not an integer`);
    return n;
  });
}

async function loadModel(o: ModelOpts, io: CliIO): Promise<T5Model> {
  const model = await T5Model.load(o.model, { device: o.device, threads: o.threads, cuda: cudaOptions(o) });
  io.err(`[tfew] ${o.model} on ${model.device} (${model.deviceReason})`);
  return model;
}

/** How a replica is named in messages: its GPU, or (a replica on the CPU) its number. */
function replicaName(models: T5Model[], model: T5Model): string {
  return model.gpuIndex === null ? `replica ${models.indexOf(model)}` : `GPU ${model.gpuIndex}`;
}

/** The model, or with --cuda-devices a replica of it on each of those GPUs (checked first, then loaded one after another). */
async function loadReplicas(o: ModelOpts & { cudaDevices?: string }, io: CliIO): Promise<T5Model[]> {
  const gpus = o.cudaDevices === undefined ? undefined : replicaGpus(o);
  const models: T5Model[] = [];
  try {
    // (each replica on its GPU or not at all: a GPU that cannot be used is an error, not a CPU replica)
    if (gpus === undefined) models.push(await loadModel(o, io));
    else for (const gpu of gpus) models.push(await loadModel({ ...o, device: 'cuda', cudaDevice: gpu }, io));
  } catch (e) {
    for (const m of models) await m.dispose();
    throw e;
  }
  return models;
}

/** `--cuda-devices`: the GPU indices, checked ("all": every visible GPU). */
function replicaGpus(o: ModelOpts & { cudaDevices?: string }): number[] {
  if (o.cudaDevice !== undefined) throw new InvalidArgumentError('--cuda-devices and --cuda-device exclude each other');
  if (o.device === 'cpu') throw new InvalidArgumentError('--cuda-devices needs --device cuda or auto');
  const spec = (o.cudaDevices ?? '').trim();
  const gpus = spec === 'all'
    ? Array.from({ length: native().probeCuda().deviceCount }, (_, i) => i).filter((i) => native().probeCuda(i).usable)
    : list(spec).map((v) => {
      const n = Number(v);
      if (!Number.isInteger(n) || n < 0) throw new InvalidArgumentError(`--cuda-devices takes GPU indices (e.g. 0,1) or "all"; got "${spec}"`);
      return n;
    });
  if (gpus.length === 0) {
    if (spec === 'all') throw new DeviceUnavailableError(`--cuda-devices all: no usable GPU (${native().probeCuda().reason || 'none is visible'})`);
    throw new InvalidArgumentError('--cuda-devices: no GPU index given');
  }
  if (new Set(gpus).size !== gpus.length) throw new InvalidArgumentError(`--cuda-devices "${spec}" names a GPU twice`);
  // Each native call holds one of libuv's threads while it runs (4 unless UV_THREADPOOL_SIZE says otherwise, read
  // when the pool starts: the first native call, after this): one per replica, and the usual 4 for the rest.
  if (process.env.UV_THREADPOOL_SIZE === undefined && gpus.length > 2) process.env.UV_THREADPOOL_SIZE = String(gpus.length + 4);
  return gpus;
}

/** Adapters for evaluation: a PEFT dir / file / T-Few .pt, or a directory of seed-<n>/ adapters. */
async function loadAdapters(file: string, model: T5Model): Promise<Map<number, IA3Adapter> | IA3Adapter> {
  if (fs.existsSync(file) && fs.statSync(file).isDirectory()) {
    const seeds = fs.readdirSync(file).map((d) => /^seed-(-?\d+)$/.exec(d)).filter((m): m is RegExpExecArray => m !== null);
    if (seeds.length > 0) {
      const out = new Map<number, IA3Adapter>();
      for (const m of seeds) out.set(Number(m[1]), await IA3Adapter.load(path.join(file, m[0]), { config: model.config }));
      return new Map([...out].sort((a, b) => a[0] - b[0]));
    }
  }
  return IA3Adapter.load(file, { config: model.config });
}

function port(v: string): number {
  const n = Number(v);
  if (!Number.isInteger(n) || n < 0 || n > 65535) throw new CommanderArgumentError('--port must be an integer in [0, 65535]');
  return n;
}

function collect(value: string, previous: string[]): string[] {
  return [...previous, value];
}

/** `tfew serve --adapter`: name=path pairs, or directories whose subdirectories are adapters (named after them). */
async function loadNamedAdapters(specs: string[], model: T5Model): Promise<Map<string, IA3Adapter>> {
  const out = new Map<string, IA3Adapter>();
  const add = async (name: string, file: string) => {
    if (!name) throw new InvalidArgumentError(`--adapter ${file}: empty name`);
    if (out.has(name)) throw new InvalidArgumentError(`--adapter: two adapters named "${name}"`);
    out.set(name, await IA3Adapter.load(file, { config: model.config }));
  };
  for (const spec of specs) {
    const eq = spec.indexOf('=');
    if (eq > 0 && /^[\w.-]+$/.test(spec.slice(0, eq))) {  // name=path (a path with '=' in it stays a path)
      await add(spec.slice(0, eq), spec.slice(eq + 1));
      continue;
    }
    const isAdapter = (d: string) => fs.existsSync(path.join(d, 'adapter_model.safetensors'));
    if (!fs.existsSync(spec) || !fs.statSync(spec).isDirectory() || isAdapter(spec)) {
      await add(path.basename(spec).replace(/\.(pt|safetensors)$/, ''), spec);
      continue;
    }
    const subdirs = fs.readdirSync(spec).filter((d) => isAdapter(path.join(spec, d))).sort();
    if (subdirs.length === 0) throw new InvalidArgumentError(`--adapter ${spec}: no adapter in it (nor in its subdirectories)`);
    for (const d of subdirs) await add(d, path.join(spec, d));
  }
  return out;
}

/** The seed recorded by `tfew train` next to an adapter (run.json), if any. */
function recordedSeed(adapterDir: string): number | undefined {
  const file = path.join(adapterDir, 'run.json');
  if (!fs.existsSync(file)) return undefined;
  try {
    const seed = JSON.parse(fs.readFileSync(file, 'utf8')).seed;
    return Number.isInteger(seed) && seed >= 0 ? seed : undefined;
  } catch {
    return undefined;
  }
}

function progressReporter(io: CliIO, label: string, total: number, every: number): { step: (e: StepEvent) => void; stop: () => void } {
  if (io.interactive) {
    // eslint-disable-next-line @typescript-eslint/no-var-requires
    const { SingleBar, Presets } = require('cli-progress') as typeof import('cli-progress');
    const bar = new SingleBar({ format: `${label} [{bar}] {value}/{total} steps | loss {loss} | {eps} ex/s | ETA {eta_formatted}`, stream: process.stderr, hideCursor: true }, Presets.shades_classic);
    bar.start(total, 0, { loss: '-', eps: '-' });
    return {
      step: (e) => bar.update(e.step, { loss: e.totalLoss.toFixed(4), eps: e.examplesPerSecond.toFixed(1) }),
      stop: () => bar.stop(),
    };
  }
  return {
    step: (e) => {
      if (e.step % every === 0 || e.step === e.totalSteps) {
        io.err(`${label} step ${e.step}/${e.totalSteps} loss ${e.totalLoss.toFixed(4)} (lm ${e.lmLoss.toFixed(4)} ul ${e.ulLoss.toFixed(4)} ln ${e.lnLoss.toFixed(4)}) lr ${e.lr.toExponential(2)} ${e.examplesPerSecond.toFixed(1)} ex/s`);
      }
    },
    stop: () => undefined,
  };
}

const pct = (x: number) => `${(100 * x).toFixed(1)}%`;

function printEvaluation(io: CliIO, r: EvaluationReport): void {
  io.out(`${r.task} ${r.method}: median accuracy ${pct(r.summary.median)}, IQR ${pct(r.summary.iqr)} (${r.summary.count} runs = templates x seeds)`);
  for (const [name, s] of Object.entries(r.summary.perTemplate)) {
    io.out(`  ${name.padEnd(32)} ${pct(s.median).padStart(6)}${s.count > 1 ? `  (seeds: ${pct(s.min)}-${pct(s.max)})` : ''}`);
  }
}

function writeJson(file: string, value: unknown): void {
  fs.mkdirSync(path.dirname(path.resolve(file)), { recursive: true });
  fs.writeFileSync(file, `${JSON.stringify(value, null, 2)}\n`);
}

function setupLines(model: T5Model, task: Task, extra: string[] = []): string[] {
  const c = model.config;
  return [
    `Model: ${model.dir} (${c.numLayers}+${c.numDecoderLayers} layers, d_model ${c.dModel}, ${parameterCount(c).toLocaleString('en-US')} parameters, ${ia3ParameterCount(c).toLocaleString('en-US')} (IA)3 values)`,
    `Device: ${model.device} (${model.deviceReason})`,
    `Task: ${task.name} (${task.kind}), ${task.numShots} shots`,
    `Host: ${os.cpus().length} CPU cores, Node ${process.version}, ${new Date().toISOString()}`,
    ...extra,
  ];
}

// ---------------------------------------------------------------------------------------------------
// Commands

/** `status.exitCode` is what a command wants the process to exit with (0 unless set). */
export function createProgram(io: CliIO = defaultIO, status: { exitCode: number } = { exitCode: 0 }): Command {
  const program = new Command('tfew')
    .description('T-Few: (IA)3 few-shot fine-tuning of T0/T5 with rank classification, on CUDA or CPU')
    .showHelpAfterError()
    // Throw instead of exiting (inherited by the subcommands below), so main() decides the exit code.
    .exitOverride()
    .configureOutput({ writeOut: (s) => io.out(s.replace(/\n$/, '')), writeErr: (s) => io.err(s.replace(/\n$/, '')) });

  addCudaOptions(program
    .command('demo')
    .description('build a tiny T5, train (IA)3 on a synthetic few-shot task, and show accuracy before/after (under a minute on CPU)')
    .option('--model-dir <dir>', 'where to write the tiny model (default: ~/.cache/tfew/demo-tiny-t5)')
    .addOption(new Option('--device <device>', 'backend').choices(['auto', 'cpu', 'cuda']).default('auto'))
    .option('--threads <n>', 'CPU backend threads (default: all cores)', int('--threads'))
    .option('--steps <n>', 'training steps (300)', int('--steps')))
    .addOption(recomputeOption())
    .action(async (o: CudaOpts & { modelDir?: string; device: DeviceOption; threads?: number; steps?: number; recompute?: RecomputeLevel }) => {
      await runDemo({ modelDir: o.modelDir, device: o.device, threads: o.threads, steps: o.steps, cuda: cudaOptions(o), recompute: o.recompute, log: io.out });
    });

  addRecipeOptions(addTaskOptions(addModelOptions(program.command('train'))))
    .description('train (IA)3 on a task\'s few-shot set with the T-Few recipe and save the adapter (PEFT format)')
    .requiredOption('-o, --out <dir>', 'adapter directory (with several seeds: <dir>/seed-<n>/)')
    .option('--seed <n>', 'few-shot subset (T-Few seeds 42, 1024, 0, 1, 32; RAFT: fold start, omit to use all 50)', int('--seed'))
    .option('--seeds <list>', 'several subsets, comma-separated, or "all"')
    .option('--init-adapter <path>', 'start from these vectors (e.g. T-Few\'s pre-trained t03b_ia3_finish.pt)')
    .option('--trainer-seed <n>', 'seed of the batch order and dropout (default: the subset seed)', int('--trainer-seed'))
    .option('--cuda-devices <list>', 'CUDA: a replica of the model on each of these GPUs (comma-separated indices, or "all"): the seeds train in parallel, one per GPU at a time')
    .action(async (o: ModelOpts & TaskOpts & RecipeOpts & { out: string; seed?: number; seeds?: string; initAdapter?: string; trainerSeed?: number; cudaDevices?: string }) => {
      const task = resolveTask(o);
      const templates = resolveTemplates(task, o);
      const seeds: (number | undefined)[] = o.seeds ? parseSeeds(o.seeds, task)
        : [o.seed ?? (task.kind === 'raft' ? undefined : task.seeds[0])];
      const models = await loadReplicas(o, io);
      // Ctrl-C stops every run after the step in flight; their adapters are then not saved.
      const stop = new AbortController();
      const onSigint = () => {
        io.err('[tfew] interrupted: stopping after this step (the adapter will not be saved)');
        status.exitCode = 130;
        stop.abort();
      };
      process.once('SIGINT', onSigint);
      try {
        const init = o.initAdapter ? await IA3Adapter.load(o.initAdapter, { config: models[0].config }) : undefined;
        const trainSeed = async (model: T5Model, seed: number | undefined) => {
          const out = seeds.length > 1 ? path.join(o.out, `seed-${seed}`) : o.out;
          const label = `${task.name}${seed === undefined ? '' : ` seed ${seed}`}${models.length > 1 ? ` (${replicaName(models, model)})` : ''}`;
          const steps = o.steps ?? 1000;
          // (several runs at once: progress as lines, not bars drawn over each other)
          const progress = progressReporter(models.length > 1 ? { ...io, interactive: false } : io, label, steps, Math.max(1, Math.round(steps / 20)));
          let run: TrainingRun;
          try {
            ({ run } = await trainAdapter(model, { ...recipe(o), task, seed, templates, initAdapter: init, saveTo: out, trainerSeed: o.trainerSeed, onStep: progress.step, signal: stop.signal }));
          } finally {
            progress.stop();
          }
          if (run.aborted) {
            status.exitCode = 130;
            return;
          }
          writeJson(path.join(out, 'run.json'), {
            task: task.name, seed: seed ?? null, templates: templates.map((t) => t.name), model: path.resolve(o.model), training: run,
            // (its time and host memory were measured beside the other replicas' runs)
            ...(models.length > 1 ? { replicas: models.length, gpu: model.gpuIndex } : {}),
          });
          io.out(`${label}: ${run.steps} steps in ${run.seconds.toFixed(1)} s, loss ${run.firstLoss.toFixed(4)} -> ${run.finalLoss.toFixed(4)}, ` +
            `${formatFlops(run.flops)} training FLOPs; adapter saved to ${out}`);
        };
        // each replica takes the next seed as it finishes one (one replica: the seeds in order); after a run fails no
        // new seed starts, the runs in flight finish (and are saved), then the error is reported
        await shareOut(models, seeds.length, (model, k) => trainSeed(model, seeds[k]), () => stop.signal.aborted);
      } finally {
        process.removeListener('SIGINT', onSigint);
        for (const m of models) await m.dispose();
      }
    });

  addTaskOptions(addModelOptions(program.command('eval')))
    .description('accuracy per template and seed, median and IQR (the paper\'s protocol)')
    .option('-a, --adapter <path>', 'adapter dir/file, or a directory of seed-<n>/ adapters from `tfew train --seeds`; none = zero-shot')
    .option('--seeds <list>', 'seeds to evaluate (default: the adapters\' seeds, or the task\'s)')
    .option('--limit <n>', 'evaluate only the first n examples', int('--limit'))
    .option('--batch-size <n>', 'examples per forward pass', int('--batch-size'))
    .option('--max-input-length <n>', 'truncate inputs to this many tokens (256)', int('--max-input-length'))
    .option('--json <file>', 'write the results as JSON')
    .option('--report <base>', 'write <base>.md, <base>.json and a plot <base>.png/.svg')
    .option('--cuda-devices <list>', 'CUDA: a replica of the model on each of these GPUs (comma-separated indices, or "all"): the template x seed runs share them')
    .action(async (o: ModelOpts & TaskOpts & { adapter?: string; seeds?: string; limit?: number; batchSize?: number; maxInputLength?: number; json?: string; report?: string; cudaDevices?: string }) => {
      const task = resolveTask(o);
      const templates = resolveTemplates(task, o);
      const models = await loadReplicas(o, io);
      const model = models[0];
      try {
        const loaded = o.adapter ? await loadAdapters(o.adapter, model) : null;
        let seeds: number[];
        if (o.seeds) seeds = parseSeeds(o.seeds, task);
        else if (loaded instanceof Map) seeds = [...loaded.keys()];
        else if (loaded && o.adapter) seeds = [recordedSeed(o.adapter) ?? task.seeds[0]];
        else seeds = task.kind === 'raft' ? [...task.seeds] : [task.seeds[0]];
        // An adapter answers for the seed it was trained on, never silently for another (nor zero-shot for a
        // seed the directory lacks).
        if (o.seeds && loaded instanceof Map) {
          const missing = seeds.filter((s) => !loaded.has(s));
          if (missing.length > 0) {
            throw new InvalidArgumentError(`--seeds ${missing.join(', ')}: ${o.adapter} has adapters for seeds ${[...loaded.keys()].join(', ')} only`);
          }
        } else if (o.seeds && loaded && o.adapter) {
          const trained = recordedSeed(o.adapter);
          if (trained !== undefined && (seeds.length !== 1 || seeds[0] !== trained)) {
            throw new InvalidArgumentError(`--seeds ${seeds.join(', ')}: the adapter ${o.adapter} was trained on seed ${trained} (its run.json); ` +
                                           'omit --seeds, or give a directory of seed-<n>/ adapters');
          }
        }
        const r = await evaluate(models, {
          task, templates, seeds, limit: o.limit, batchSize: o.batchSize, maxInputLength: o.maxInputLength,
          adapter: loaded instanceof Map ? (s) => loaded.get(s) ?? null : loaded,
          onRun: (run) => io.err(`[tfew] ${run.template} seed ${run.seed}: ${pct(run.accuracy)} (${run.count} examples, ${run.seconds.toFixed(1)} s)`),
        });
        printEvaluation(io, r);
        if (o.json) writeJson(o.json, withoutPredictions(r));
        if (o.report) {
          const files = await writeReport(o.report, { title: `Evaluation: ${task.name}`, setup: setupLines(model, task), results: [r] }, withoutPredictions(r));
          io.out(`report: ${files.markdown}`);
        }
      } finally {
        for (const m of models) await m.dispose();
      }
    });

  addTaskOptions(addModelOptions(program.command('classify')))
    .description('predict labels: JSONL in, JSONL predictions out; RAFT test sets to RAFT\'s submission CSV (ID,Label)')
    .option('-a, --adapter <path>', 'trained adapter (none = zero-shot)')
    .option('-i, --input <file>', 'examples to classify (JSONL/CSV with the task\'s fields); default: the task\'s test set')
    .option('-o, --out <file>', 'output: .jsonl predictions, or .csv = RAFT submission (ID,Label)', '-')
    .option('--template <name>', 'which template to use (default: the first)')
    .option('--max-input-length <n>', 'truncate inputs to this many tokens (256)', int('--max-input-length'))
    .option('--batch-size <n>', 'examples per forward pass', int('--batch-size'))
    .option('--cuda-devices <list>', 'CUDA: a replica of the model on each of these GPUs (comma-separated indices, or "all"): the batches share them')
    .action(async (o: ModelOpts & TaskOpts & { adapter?: string; input?: string; out: string; template?: string; maxInputLength?: number; batchSize?: number; cudaDevices?: string }) => {
      const task = resolveTask(o);
      const templates = resolveTemplates(task, o);
      const template = o.template ? templates.find((t) => t.name === o.template) : templates[0];
      if (!template) throw new InvalidArgumentError(`unknown template "${o.template}"`);
      const examples = o.input
        ? readUserData(o.input, { labelColumn: o.labelColumn, labelNames: task.labelNames.slice() }).examples
        : task.testExamples();
      const models = await loadReplicas(o, io);
      try {
        const adapter = o.adapter ? await IA3Adapter.load(o.adapter, { config: models[0].config }) : null;
        const labelNames = task.kind === 'tfew' ? undefined : task.labelNames;
        const preds = await classify(models, examples, {
          template, adapter, labelNames, maxInputLength: o.maxInputLength ?? task.recipe.maxInputLength, batchSize: o.batchSize,
          onProgress: (done, total) => { if (!io.interactive && done % 512 < (o.batchSize ?? 32)) io.err(`[tfew] ${done}/${total}`); },
        });
        if (o.out.endsWith('.csv')) {
          writeRaftSubmission(o.out, preds.map((p) => p.id), preds.map((p) => p.prediction), task.labelNames);
          io.out(`wrote ${preds.length} predictions to ${o.out} (ID,Label)`);
        } else {
          const lines = preds.map((p) => JSON.stringify(p)).join('\n');
          if (o.out === '-') io.out(lines);
          else {
            fs.mkdirSync(path.dirname(path.resolve(o.out)), { recursive: true });
            fs.writeFileSync(o.out, `${lines}\n`);
            io.out(`wrote ${preds.length} predictions to ${o.out}`);
          }
        }
      } finally {
        for (const m of models) await m.dispose();
      }
    });

  addRecipeOptions(addTaskOptions(addModelOptions(program.command('icl'))))
    .description('in-context learning baseline (k demonstrations in the encoder input); --compare: against T-Few with costs')
    .option('-k, --shots <k>', 'demonstrations per query (default: the whole few-shot set, as many as fit)', int('--shots'))
    .option('--icl-max-input-length <n>', 'encoder budget for demonstrations + query (1024)', int('--icl-max-input-length'))
    .option('--seeds <list>', 'seeds (default: the task\'s five; comma-separated)')
    .option('--limit <n>', 'evaluate only the first n examples', int('--limit'))
    .option('--compare', 'also train/evaluate T-Few (and zero-shot) and report accuracy and cost side by side')
    .option('-a, --adapter <path>', 'with --compare: use these trained adapters (dir of seed-<n>/) instead of training')
    .option('--no-zero-shot', 'with --compare: skip the zero-shot row')
    .option('--json <file>', 'write the results as JSON')
    .option('--report <base>', 'write <base>.md, <base>.json and a plot <base>.png/.svg')
    .action(async (o: ModelOpts & TaskOpts & RecipeOpts & { shots?: number; iclMaxInputLength?: number; seeds?: string; limit?: number; compare?: boolean; adapter?: string; zeroShot: boolean; json?: string; report?: string }) => {
      const task = resolveTask(o);
      const templates = resolveTemplates(task, o);
      const seeds = parseSeeds(o.seeds, task);
      const model = await loadModel(o, io);
      try {
        if (!o.compare) {
          const r = await evaluateIcl(model, {
            task, templates, seeds, shots: o.shots, maxInputLength: o.iclMaxInputLength, limit: o.limit,
            onRun: (run) => io.err(`[tfew] ICL ${run.template} seed ${run.seed}: ${pct(run.accuracy)} with ${run.demonstrationsUsed}+ demonstrations`),
          });
          printEvaluation(io, r);
          io.out(`  cost: ${formatFlops(r.cost.flopsPerExample)} FLOPs and ${r.cost.msPerExample.toFixed(2)} ms per example, ${r.cost.meanInputTokens.toFixed(0)} input tokens`);
          if (o.json) writeJson(o.json, withoutPredictions(r));
          if (o.report) await writeReport(o.report, { title: `ICL: ${task.name}`, setup: setupLines(model, task), results: [r] }, withoutPredictions(r));
          return;
        }
        const loaded = o.adapter ? await loadAdapters(o.adapter, model) : undefined;
        const adapters = loaded instanceof IA3Adapter ? new Map([[recordedSeed(o.adapter as string) ?? seeds[0], loaded]]) : loaded;
        const steps = o.steps ?? 1000;
        let progress: ReturnType<typeof progressReporter> | undefined;
        const usedSeeds = adapters ? [...adapters.keys()] : seeds;  // (given adapters: their seeds)
        const c = await compareWithIcl(model, {
          ...recipe(o), task, templates, seeds: usedSeeds, adapters,
          iclShots: o.shots, iclMaxInputLength: o.iclMaxInputLength, evalLimit: o.limit, zeroShot: o.zeroShot,
          onStep: (seed, e) => {
            if (e.step === 1) progress = progressReporter(io, `${task.name} seed ${seed}`, steps, Math.max(1, Math.round(steps / 10)));
            progress?.step(e);
            if (e.step === e.totalSteps) progress?.stop();
          },
        });
        for (const r of [c.tfew, c.zeroShot, c.icl]) if (r) printEvaluation(io, r);
        io.out('');
        io.out('method      inference FLOPs/ex  training FLOPs  disk       accuracy  ms/ex    peak RSS    peak GPU');
        for (const row of c.costs) {
          io.out(`${row.method.padEnd(11)} ${formatFlops(row.inferenceFlopsPerExample).padStart(18)}  ${formatFlops(row.trainingFlops).padStart(14)}  ` +
            `${formatBytes(row.diskBytes).padEnd(9)}  ${pct(row.accuracy).padStart(8)}  ${row.msPerExample.toFixed(2).padStart(7)}  ${formatBytes(row.peakRssBytes).padEnd(10)}  ${formatBytes(row.peakDeviceBytes)}`);
        }
        if (o.json) writeJson(o.json, comparisonJson(c));
        if (o.report) {
          const files = await writeReport(o.report, comparisonReport(c, setupLines(model, task, [`Seeds: ${usedSeeds.join(', ')}`])), comparisonJson(c));
          io.out(`report: ${files.markdown} (plot ${files.png})`);
        }
      } finally {
        await model.dispose();
      }
    });

  addTaskOptions(addModelOptions(program.command('bench')))
    .description('cost accounting: per-example FLOPs, wall time and peak memory of T-Few vs ICL inference, and a training step')
    .option('-n, --examples <n>', 'evaluation examples to time (64)', int('--examples'))
    .option('-k, --shots <k>', 'ICL demonstrations per query (default: the few-shot set)', int('--shots'))
    .option('--train-steps <n>', 'training steps to time (10); the 1000-step cost is extrapolated', int('--train-steps'))
    .option('--icl-max-input-length <n>', 'ICL encoder budget (1024)', int('--icl-max-input-length'))
    .addOption(recomputeOption())
    .option('--json <file>', 'write the results as JSON')
    .action(async (o: ModelOpts & TaskOpts & { examples?: number; shots?: number; trainSteps?: number; iclMaxInputLength?: number; recompute?: RecomputeLevel; json?: string }) => {
      const task = resolveTask(o);
      const templates = resolveTemplates(task, o).slice(0, 1);
      const model = await loadModel(o, io);
      try {
        const b = await benchmark(model, { task, template: templates[0], examples: o.examples, shots: o.shots, trainSteps: o.trainSteps, iclMaxInputLength: o.iclMaxInputLength, recompute: o.recompute });
        io.out(markdownReport({ title: `Cost: ${task.name}`, setup: setupLines(model, task, b.notes), results: [], costs: b.rows }));
        if (o.json) writeJson(o.json, b);
      } finally {
        await model.dispose();
      }
    });

  addModelOptions(program.command('serve'))
    .description('serve rank classification over HTTP: named (IA)3 adapters, requests of different tasks batched together')
    .option('-a, --adapter <name=path>', 'a named adapter, repeatable (path: PEFT dir/file or T-Few .pt); or a directory whose subdirectories are adapters, named after them', collect, [])
    .option('--port <n>', 'port (8080; 0 picks a free one)', port, 8080)
    .option('--host <host>', 'interface to listen on', '127.0.0.1')
    .option('--max-batch <n>', 'examples per engine call (32)', int('--max-batch'))
    .option('--max-delay-ms <ms>', 'how long a request waits for company while the model is idle (2)', num('--max-delay-ms'))
    .option('--max-queue <n>', 'waiting requests before 429 (4096)', int('--max-queue'))
    .option('--max-input-length <n>', 'input tokens: text is truncated to it, longer token-id inputs are refused (256)', int('--max-input-length'))
    .option('--no-group-by-length', 'under a backlog, batches in arrival order instead of the oldest request with those nearest it in number of choices and input length')
    .option('--cuda-devices <list>', 'CUDA: a replica of the model on each of these GPUs (comma-separated indices, or "all"): batches run on all of them at once')
    .option('--warm-up <lengths>', 'CUDA: before listening, capture the graphs of single requests of every input length bucket up to --max-input-length (that such a request runs padded at) whose choices have these token counts (eos included), e.g. 2,2 (with adapters loaded: requests that name one); repeatable, one per task; first the device memory of the largest batch of such requests is reserved (T5Model.reserveMemory), so that no batch up to it drops the graphs', collect, [])
    .action(async (o: ModelOpts & { adapter: string[]; port: number; host: string; maxBatch?: number; maxDelayMs?: number; maxQueue?: number; maxInputLength?: number; groupByLength: boolean; warmUp: string[]; cudaDevices?: string }) => {
      const warmUp = o.warmUp.map((spec) => {
        const lengths = list(spec).map(Number);
        if (lengths.length === 0 || !lengths.every((n) => Number.isInteger(n) && n >= 1)) {
          throw new InvalidArgumentError(`--warm-up takes the token counts of a task's choices, e.g. 2,2; got "${spec}"`);
        }
        // (the server's limits: RankBatcher's maxChoices and maxChoiceLength)
        if (lengths.length > 128 || lengths.some((n) => n > 128)) {
          throw new InvalidArgumentError(`--warm-up "${spec}": the server takes at most 128 choices of at most 128 tokens`);
        }
        return lengths;
      });
      const models = await loadReplicas(o, io);
      try {
        const model = models[0];
        const adapters = await loadNamedAdapters(o.adapter, model);
        const server = new RankServer(models, adapters, { maxBatch: o.maxBatch, maxDelayMs: o.maxDelayMs, maxQueue: o.maxQueue, maxInputLength: o.maxInputLength, groupByLength: o.groupByLength });
        for (const model of warmUp.length > 0 ? models : []) {
          const t0 = Date.now();
          const label = models.length > 1 ? ` (${replicaName(models, model)})` : '';
          const maxInputLength = o.maxInputLength ?? 256;
          const adapter = adapters.size > 0;
          // (only the lengths a single request runs padded at: a longer one runs at its exact length, bound by the
          // GPU's work rather than by launches, where a graph warmed for it would serve that one length alone)
          const shapes: GraphWarmUpShape[] = warmUp.flatMap((choiceLengths) =>
            graphBucketLengths(maxInputLength, { config: model.config, choiceLengths }).map((inputLength) => ({ inputLength, choiceLengths, adapter })));
          // the memory of the largest batch the server makes of such requests, first: a batch that had to grow it
          // would drop every graph captured before
          const maxBatch = o.maxBatch ?? 32;
          const largest: ReserveShape = {
            batchSize: maxBatch, inputLength: maxInputLength,
            choices: Math.max(...warmUp.map((c) => c.length)), choiceLength: Math.max(...warmUp.flat()),
            adapters: Math.min(adapters.size, maxBatch),
          };
          try {
            const reserved = await model.reserveMemory(largest);
            if (model.device === 'cuda') io.err(`[tfew] --warm-up${label}: ${(reserved / 2 ** 20).toFixed(0)} MiB of activation memory reserved for ${maxBatch} requests of ${maxInputLength} tokens`);
            const captured = await model.warmUpGraphs(shapes);
            const stats = model.graphStats();
            if (model.device !== 'cuda' || !stats.enabled) {
              io.err(`[tfew] --warm-up${label}: nothing to warm on ${model.device} (${model.device === 'cuda' ? stats.offReason : 'no CUDA graphs'})`);
            } else {
              const longest = Math.max(0, ...shapes.map((sh) => sh.inputLength));
              io.err(`[tfew] --warm-up${label}: ${captured} CUDA graphs captured in ${((Date.now() - t0) / 1000).toFixed(1)} s, ${stats.cached} held` +
                     (stats.buckets ? '' : ' (graph buckets are off: only calls of exactly these lengths replay them)') +
                     (longest < maxInputLength ? `; requests longer than ${longest} tokens run at their exact length, without a warmed graph` : ''));
            }
          } catch (e) {
            io.err(`[tfew] --warm-up failed, serving without it: ${(e as Error).message}`);
          }
        }
        const address = await server.listen(o.port, o.host);
        const on = models.length === 1 ? model.device
          : model.device === 'cuda' ? `${models.length} GPUs (${models.map((m) => m.gpuIndex).join(', ')})` : `${models.length} replicas on the CPU`;
        io.out(`tfew serve: http://${address.address}:${address.port} on ${on}; adapters: ${[...adapters.keys()].join(', ') || 'none'} ` +
               '(POST /classify, GET /health; Ctrl-C stops, twice cuts the connections)');
        // The first SIGINT or SIGTERM stops gracefully (answers what was accepted); a second one cuts every connection.
        let signals = 0;
        let stop!: () => void;
        const stopped = new Promise<void>((resolve) => { stop = resolve; });
        const onSignal = () => {
          if (++signals === 1) {
            io.err('[tfew] stopping: answering the accepted requests (again to cut the connections)');
            stop();
          } else {
            io.err('[tfew] cutting the connections');
            server.closeNow();
          }
        };
        process.on('SIGINT', onSignal);
        process.on('SIGTERM', onSignal);
        try {
          await stopped;
          await server.close();
        } finally {
          process.off('SIGINT', onSignal);
          process.off('SIGTERM', onSignal);
        }
        io.err(`[tfew] stopped: ${JSON.stringify(server.batcher.stats)}`);
      } finally {
        for (const m of models) await m.dispose();
      }
    });

  program
    .command('doctor')
    .description('device, driver, CUDA, cuBLAS and build information, and where data is looked for')
    .option('--json', 'print as JSON')
    .action((o: { json?: boolean }) => {
      const info: Record<string, unknown> = { node: process.version, platform: `${process.platform}-${process.arch}`, cpus: os.cpus().length };
      let ok = true;
      try {
        const addon = native();
        const cuda = addon.probeCuda();
        info.addon = { version: addon.version, ...addon.buildInfo };
        info.cuda = cuda;
        // every visible GPU, when there are several (models pick one with cuda.device / --cuda-device)
        if (cuda.deviceCount > 1) info.gpus = Array.from({ length: cuda.deviceCount }, (_, i) => addon.probeCuda(i));
        info.defaultDevice = cuda.usable ? 'cuda' : 'cpu';
      } catch (e) {
        ok = false;
        info.addon = { error: (e as Error).message };
      }
      const dataDir = resolveDataDir({});
      info.dataDir = { path: dataDir, present: fs.existsSync(dataDir) };
      if (o.json) {
        io.out(JSON.stringify(info, null, 2));
      } else {
        io.out(`node         ${info.node} on ${info.platform}, ${info.cpus} CPU cores`);
        const addon = info.addon as Record<string, unknown>;
        if (addon.error) io.out(`addon        NOT LOADED: ${addon.error}`);
        else io.out(`addon        ${addon.version}, CUDA compiled: ${addon.cudaCompiled ? 'yes' : 'no'}, compiler ${addon.compiler}, N-API ${addon.napiVersion}`);
        const cuda = info.cuda as Record<string, unknown> | undefined;
        if (cuda) {
          io.out(`cuda usable  ${cuda.usable ? 'yes' : 'no'}${cuda.reason ? ` (${cuda.reason})` : ''}`);
          const gpus = (info.gpus as CudaProbe[] | undefined) ?? (cuda.deviceName ? [cuda as unknown as CudaProbe] : []);
          for (const g of gpus) {
            io.out(`gpu ${String(g.deviceIndex).padEnd(9)}${g.deviceName}, compute capability ${g.computeCapability}, ${formatBytes(Number(g.totalMemory))}` +
                   `${g.usable ? '' : ` (not usable: ${g.reason})`}${gpus.length > 1 && g.deviceIndex === cuda.deviceIndex ? ' (default)' : ''}`);
          }
          io.out(`cublas       ${cuda.cublasLibrary || 'not found'}`);
          io.out(`device       models load on ${info.defaultDevice} with device: 'auto'`);
        }
        io.out(`data dir     ${dataDir} (${fs.existsSync(dataDir) ? 'present' : 'absent: set TFEW_DATA_DIR or pass --data-dir'})`);
      }
      if (!ok) status.exitCode = 1;
    });

  return program;
}

/** Runs the CLI; errors print as one line (typed errors with their code) and set the exit code. */
export async function main(argv: string[] = process.argv, io: CliIO = defaultIO): Promise<number> {
  const status = { exitCode: 0 };
  const program = createProgram(io, status);
  try {
    await program.parseAsync(argv);
    return status.exitCode;
  } catch (e) {
    const err = e as { code?: string; exitCode?: number; message?: string };
    if (typeof err.code === 'string' && err.code.startsWith('commander.')) {
      return err.exitCode ?? 1; // commander already printed the message or help
    }
    if (e instanceof TfewError) io.err(`tfew: ${e.message} [${e.code}]`);
    else io.err(`tfew: ${(e as Error).stack ?? String(e)}`);
    return 1;
  }
}

if (require.main === module) {
  main().then((code) => {
    process.exitCode = code;
  });
}
