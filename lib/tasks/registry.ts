// The tasks T-Few evaluates on, RAFT's 11 tasks and user tasks, behind one interface.
import { InvalidArgumentError } from '../errors';
import { BUILTIN_TEMPLATES } from '../templates/builtin';
import { TextTemplate, type Template } from '../templates/engine';
import { RaftTemplate, readRaftPromptSettings, type RaftLabelsInInput } from '../templates/raft';
import { defaultTemplateFor, loadTemplateFile } from '../templates/user';
import { readUserData, type UserDataOptions } from './custom';
import { sampleFewShot } from './numpy-random';
import {
  readAnli, readFewShotSplit, readHellaSwag, readRaft, readRaftInfo, readSst2, readStoryCloze, readSuperGlue,
  readWinogrande,
} from './readers';
import type { DataOptions, Example } from './types';

/** Training-recipe settings a task changes from the T-Few defaults. */
export interface TaskRecipe {
  lmWeight?: number;
  ulWeight?: number;
  lnWeight?: number;
  maxInputLength?: number;
  batchSize?: number;
}

export interface Task {
  readonly name: string;
  readonly kind: 'tfew' | 'raft' | 'custom';
  /** Few-shot training set size (T-Few's k); RAFT trains on all 50 (40 in a cross-validation fold). */
  readonly numShots: number;
  /**
   * The runs the paper aggregates over. T-Few tasks: the few-shot sampling seeds. RAFT: the start of the
   * 10-example held-out fold (T-Few's raft_validation_start: 0, 10, ..., 40), RAFT having no labelled
   * validation set.
   */
  readonly seeds: readonly number[];
  readonly labelNames: readonly string[];
  readonly recipe: TaskRecipe;
  /** The evaluation templates (for T-Few tasks: every original-task template). */
  templates(): Template[];
  /** The few-shot training examples for `seed` (RAFT: without the seed's fold; no seed: all 50). */
  trainExamples(seed?: number): Example[];
  /** The labelled evaluation examples (RAFT: the seed's held-out fold). */
  evalExamples(seed?: number): Example[];
  /** Unlabelled test examples (RAFT's test sets, a custom task's test file). */
  testExamples(): Example[];
}

interface TfewTaskDef {
  numShots: number;
  seeds: number[];
  labelNames: string[];
  evalSet: (o: DataOptions) => Example[];
  recipe?: TaskRecipe;
}

/** The paper's five seeds (bin/few-shot-*.sh). */
export const TFEW_SEEDS = [42, 1024, 0, 1, 32] as const;

const TFEW_TASKS: Record<string, TfewTaskDef> = {
  rte: { numShots: 32, seeds: [...TFEW_SEEDS], labelNames: ['entailment', 'not_entailment'], evalSet: (o) => readSuperGlue('rte', 'val', o) },
  cb: { numShots: 32, seeds: [...TFEW_SEEDS], labelNames: ['entailment', 'contradiction', 'neutral'], evalSet: (o) => readSuperGlue('cb', 'val', o) },
  copa: { numShots: 32, seeds: [...TFEW_SEEDS], labelNames: ['choice1', 'choice2'], evalSet: (o) => readSuperGlue('copa', 'val', o) },
  wic: { numShots: 32, seeds: [...TFEW_SEEDS], labelNames: ['different', 'same'], evalSet: (o) => readSuperGlue('wic', 'val', o) },
  wsc: { numShots: 32, seeds: [...TFEW_SEEDS], labelNames: ['false', 'true'], evalSet: (o) => readSuperGlue('wsc', 'val', o) },
  'anli-r1': { numShots: 50, seeds: [...TFEW_SEEDS], labelNames: ['entailment', 'neutral', 'contradiction'], evalSet: (o) => readAnli(1, 'test', o) },
  'anli-r2': { numShots: 50, seeds: [...TFEW_SEEDS], labelNames: ['entailment', 'neutral', 'contradiction'], evalSet: (o) => readAnli(2, 'test', o) },
  'anli-r3': { numShots: 50, seeds: [...TFEW_SEEDS], labelNames: ['entailment', 'neutral', 'contradiction'], evalSet: (o) => readAnli(3, 'test', o) },
  // T-Few runs HellaSwag as 4 x 2 gradient accumulation; the effective batch is still 8.
  'h-swag': { numShots: 20, seeds: [...TFEW_SEEDS], labelNames: ['ending0', 'ending1', 'ending2', 'ending3'], evalSet: (o) => readHellaSwag(o) },
  storycloze: { numShots: 70, seeds: [...TFEW_SEEDS], labelNames: ['quiz1', 'quiz2'], evalSet: (o) => readStoryCloze('test', o) },
  winogrande: { numShots: 50, seeds: [...TFEW_SEEDS], labelNames: ['option1', 'option2'], evalSet: (o) => readWinogrande(o) },
  // Not in the paper's tables, but T-Few ships their splits.
  boolq: { numShots: 32, seeds: [...TFEW_SEEDS], labelNames: ['false', 'true'], evalSet: (o) => readSuperGlue('boolq', 'val', o) },
  sst2: { numShots: 16, seeds: [...TFEW_SEEDS], labelNames: ['negative', 'positive'], evalSet: (o) => readSst2(o) },
};

const TASK_ALIASES: Record<string, string> = {
  hellaswag: 'h-swag', hswag: 'h-swag', 'story-cloze': 'storycloze', story_cloze: 'storycloze',
  anli_r1: 'anli-r1', anli_r2: 'anli-r2', anli_r3: 'anli-r3', 'wsc.fixed': 'wsc', 'sst-2': 'sst2',
};

/** The 11 RAFT tasks. */
export const RAFT_TASKS = [
  'ade_corpus_v2', 'banking_77', 'neurips_impact_statement_risks', 'one_stop_english', 'overruling',
  'semiconductor_org_types', 'systematic_review_inclusion', 'tai_safety_research', 'terms_of_service',
  'tweet_eval_hate', 'twitter_complaints',
] as const;

/** The paper's 11 held-out evaluation tasks (Table 9 order is not important here). */
export const TFEW_EVAL_TASKS = [
  'copa', 'h-swag', 'storycloze', 'winogrande', 'wsc', 'wic', 'rte', 'cb', 'anli-r1', 'anli-r2', 'anli-r3',
] as const;

/** Every task name getTask() knows. */
export function listTasks(): string[] {
  return [...Object.keys(TFEW_TASKS), ...RAFT_TASKS];
}

class TfewTask implements Task {
  readonly kind = 'tfew' as const;
  readonly numShots: number;
  readonly seeds: readonly number[];
  readonly labelNames: readonly string[];
  readonly recipe: TaskRecipe;
  private evalCache?: Example[];

  constructor(readonly name: string, private readonly def: TfewTaskDef, private readonly data: DataOptions) {
    this.numShots = def.numShots;
    this.seeds = def.seeds;
    this.labelNames = def.labelNames;
    this.recipe = def.recipe ?? {};
  }
  templates(): Template[] {
    return BUILTIN_TEMPLATES[this.name].map((s) => new TextTemplate(s));
  }
  trainExamples(seed: number = this.seeds[0]): Example[] {
    return readFewShotSplit(this.name, this.numShots, seed, this.data);
  }
  evalExamples(): Example[] {
    if (!this.evalCache) this.evalCache = this.def.evalSet(this.data);
    return this.evalCache;
  }
  testExamples(): Example[] {
    return this.evalExamples();
  }
}

export interface RaftTaskOptions extends DataOptions {
  labelsInInput?: RaftLabelsInInput;
  cleanLabelNames?: boolean;
}

/** RAFT fold size: T-Few holds out 10 of the 50 labelled examples. */
const RAFT_FOLD = 10;

class RaftTask implements Task {
  readonly kind = 'raft' as const;
  readonly numShots = 50;
  readonly seeds = [0, 10, 20, 30, 40];
  readonly labelNames: readonly string[];
  readonly recipe: TaskRecipe;
  private readonly template: RaftTemplate;
  private trainCache?: Example[];

  constructor(readonly name: string, private readonly options: RaftTaskOptions) {
    const info = readRaftInfo(name, options);
    const settings = readRaftPromptSettings(options);
    this.labelNames = info.labelNames;
    this.template = new RaftTemplate({
      instruction: settings.instructions[name] ?? '',
      promptFields: settings.fields[name] ?? info.dataColumns,
      dataColumns: info.dataColumns,
      labelNames: info.labelNames,
      labelsInInput: options.labelsInInput,
      cleanLabelNames: options.cleanLabelNames,
    });
    // bin/raft_experiments.sh: Banking77's 77 choices make UL and LN too costly; inputs up to 512 tokens.
    this.recipe = name === 'banking_77' ? { ulWeight: 0, lnWeight: 0, maxInputLength: 512 } : {};
  }
  templates(): Template[] {
    return [this.template];
  }
  private all(): Example[] {
    if (!this.trainCache) this.trainCache = readRaft(this.name, 'train', this.options);
    return this.trainCache;
  }
  private fold(seed: number): [number, number] {
    if (!Number.isInteger(seed) || seed < 0 || seed + RAFT_FOLD > this.all().length) {
      throw new InvalidArgumentError(`RAFT fold start must be one of ${this.seeds.join(', ')}, got ${seed}`);
    }
    return [seed, seed + RAFT_FOLD];
  }
  trainExamples(seed?: number): Example[] {
    if (seed === undefined) return this.all().slice();
    const [a, b] = this.fold(seed);
    return [...this.all().slice(0, a), ...this.all().slice(b)];
  }
  evalExamples(seed: number = this.seeds[0]): Example[] {
    const [a, b] = this.fold(seed);
    return this.all().slice(a, b);
  }
  testExamples(): Example[] {
    return readRaft(this.name, 'test', this.options);
  }
}

export interface CustomTaskOptions extends UserDataOptions {
  name?: string;
  /** Labelled training data (CSV / TSV / JSONL). */
  trainFile: string;
  /** Labelled evaluation data; without it, evaluation uses the training rows not drawn for the seed. */
  evalFile?: string;
  /** Unlabelled data for classify. */
  testFile?: string;
  /** A JSON template file (lib/templates/user.ts); default: every column as "Column: value". */
  templateFile?: string;
  /** An instruction line for the default template. */
  instruction?: string;
  /** Draw this many training examples per seed (T-Few's sampler); default: use the whole file. */
  numShots?: number;
  seeds?: number[];
}

class CustomTask implements Task {
  readonly kind = 'custom' as const;
  readonly name: string;
  readonly numShots: number;
  readonly seeds: readonly number[];
  readonly labelNames: readonly string[];
  readonly recipe: TaskRecipe = {};
  private readonly pool: Example[];
  private readonly columns: string[];

  constructor(private readonly options: CustomTaskOptions) {
    const train = readUserData(options.trainFile, options);
    this.pool = train.examples.filter((e) => e.label >= 0);
    if (this.pool.length === 0) throw new InvalidArgumentError(`${options.trainFile} has no labelled rows`);
    this.labelNames = train.labelNames;
    this.columns = train.columns;
    this.name = options.name ?? 'custom';
    this.numShots = options.numShots ?? this.pool.length;
    this.seeds = options.seeds ?? (options.numShots ? [...TFEW_SEEDS] : [42]);
  }
  templates(): Template[] {
    const names = this.labelNames.slice();
    if (this.options.templateFile) return loadTemplateFile(this.options.templateFile, names);
    const exclude = [this.options.labelColumn ?? 'label', this.options.idColumn ?? 'id', 'ID'];
    return [defaultTemplateFor(this.columns, names, { exclude, instruction: this.options.instruction })];
  }
  trainExamples(seed: number = this.seeds[0]): Example[] {
    if (this.numShots >= this.pool.length) return this.pool.slice();
    return sampleFewShot(this.pool, this.numShots, seed);
  }
  evalExamples(seed: number = this.seeds[0]): Example[] {
    if (this.options.evalFile) {
      return readUserData(this.options.evalFile, { ...this.options, labelNames: this.labelNames.slice() }).examples.filter((e) => e.label >= 0);
    }
    if (this.numShots >= this.pool.length) {
      throw new InvalidArgumentError('no evaluation data: give an eval file or draw fewer shots than the training file has');
    }
    const used = new Set(this.trainExamples(seed));
    return this.pool.filter((e) => !used.has(e));
  }
  testExamples(): Example[] {
    if (!this.options.testFile) throw new InvalidArgumentError('this task has no test file');
    return readUserData(this.options.testFile, { ...this.options, labelNames: this.labelNames.slice() }).examples;
  }
}

/** A built-in task by name (T-Few's names: rte, cb, copa, wic, wsc, anli-r1..3, h-swag, storycloze, winogrande; RAFT's task names). */
export function getTask(name: string, options: RaftTaskOptions = {}): Task {
  const key = TASK_ALIASES[name] ?? name.replace(/^raft[/:]/, '');
  if (TFEW_TASKS[key]) return new TfewTask(key, TFEW_TASKS[key], options);
  if ((RAFT_TASKS as readonly string[]).includes(key)) return new RaftTask(key, options);
  throw new InvalidArgumentError(`unknown task "${name}"; known: ${listTasks().join(', ')} (or use a custom data file)`);
}

/** A task over the user's own files. */
export function createCustomTask(options: CustomTaskOptions): Task {
  return new CustomTask(options);
}
