// Readers for the formats under the data directory (see ../shared/data/PROVENANCE.md). Each returns
// Examples whose fields carry the Hugging Face `datasets` names and integer labels, whatever the file
// used (SuperGLUE's string labels, ANLI's e/n/c, Story Cloze's CSV columns, the HellaSwag text dump, ...),
// so one set of templates serves the T-Few split files (HF names already) and the evaluation files alike.
import * as fs from 'fs';
import * as path from 'path';
import { FileFormatError, InvalidArgumentError } from '../errors';
import { dataFile, readCsv, readJsonl, resolveDataDir } from './files';
import type { DataOptions, Example, FieldValue } from './types';

function asLabel(value: FieldValue | undefined, mapping: Record<string, number>, where: string): number {
  const key = String(value);
  if (!(key in mapping)) throw new FileFormatError(`${where}: unknown label ${JSON.stringify(value)}`);
  return mapping[key];
}

function requireFields(row: Record<string, FieldValue>, names: string[], where: string): void {
  for (const n of names) {
    if (!(n in row)) throw new FileFormatError(`${where}: missing field "${n}"`);
  }
}

// ---------------------------------------------------------------------------------------------------
// T-Few few-shot split files: t-few-splits/few_shot/<task>/<k>_shot/<seed>_seed.jsonl (HF field names).

/** The split files' directory name for each task. */
export const SPLIT_DIRS: Record<string, string> = {
  rte: 'rte', cb: 'cb', copa: 'copa', wic: 'wic', wsc: 'wsc', boolq: 'boolq', sst2: 'sst2',
  'anli-r1': 'anli-r1', 'anli-r2': 'anli-r2', 'anli-r3': 'anli-r3',
  'h-swag': 'h-swag', storycloze: 'storycloze', winogrande: 'winogrande',
};

/** Lists the seeds for which a split file exists. */
export function listSplitSeeds(task: string, numShots: number, options: DataOptions = {}): number[] {
  const dir = path.join(resolveDataDir(options), 't-few-splits', 'few_shot', SPLIT_DIRS[task] ?? task, `${numShots}_shot`);
  if (!fs.existsSync(dir)) return [];
  return fs
    .readdirSync(dir)
    .map((f) => /^(\d+)_seed\.jsonl$/.exec(f))
    .filter((m): m is RegExpExecArray => m !== null)
    .map((m) => Number(m[1]))
    .sort((a, b) => a - b);
}

/** The exact few-shot training examples T-Few used for `task` with `numShots` shots and `seed`. */
export function readFewShotSplit(task: string, numShots: number, seed: number, options: DataOptions = {}): Example[] {
  const dir = SPLIT_DIRS[task];
  if (!dir) throw new InvalidArgumentError(`no T-Few split files for task "${task}"`);
  const file = dataFile(options, 't-few-splits', 'few_shot', dir, `${numShots}_shot`, `${seed}_seed.jsonl`);
  return readJsonl(file).map((row, i) => {
    const where = `${file}:${i + 1}`;
    requireFields(row, ['label'], where);
    const label = Number(row.label);
    if (!Number.isInteger(label)) throw new FileFormatError(`${where}: label is not an integer`);
    const fields = { ...row };
    if (task === 'h-swag') normalizeHellaSwagFields(fields);
    const id = row.uid ?? row.story_id ?? row.idx ?? i;
    return { id: String(id), fields, label };
  });
}

// ---------------------------------------------------------------------------------------------------
// SuperGLUE validation sets (official jsonl: string / boolean labels).

const SUPERGLUE_LABELS: Record<string, Record<string, number>> = {
  rte: { entailment: 0, not_entailment: 1 },
  cb: { entailment: 0, contradiction: 1, neutral: 2 },
  copa: { '0': 0, '1': 1 },
  wic: { false: 0, true: 1 },
  wsc: { false: 0, true: 1 },
  boolq: { false: 0, true: 1 },
};
const SUPERGLUE_DIRS: Record<string, string> = { rte: 'RTE', cb: 'CB', copa: 'COPA', wic: 'WiC', wsc: 'WSC', boolq: 'BoolQ' };

/** A SuperGLUE split ('val' = the official validation set T-Few evaluates on; 'train' = FewGLUE's 32). */
export function readSuperGlue(task: string, split: 'val' | 'train' | 'dev32', options: DataOptions = {}): Example[] {
  const dir = SUPERGLUE_DIRS[task];
  if (!dir) throw new InvalidArgumentError(`not a SuperGLUE task: "${task}"`);
  const file = dataFile(options, 'superglue', dir, `${split}.jsonl`);
  return readJsonl(file).map((row, i) => {
    const where = `${file}:${i + 1}`;
    requireFields(row, ['label', 'idx'], where);
    const fields: Record<string, FieldValue> = { ...row };
    // WSC nests the spans under `target`; HF's wsc.fixed has them at the top level.
    const target = row.target;
    if (target && typeof target === 'object' && !Array.isArray(target)) {
      Object.assign(fields, target);
      delete fields.target;
    }
    const label = asLabel(row.label, SUPERGLUE_LABELS[task], where);
    fields.label = label;
    return { id: String(row.idx), fields, label };
  });
}

// ---------------------------------------------------------------------------------------------------
// ANLI (original jsonl: context, hypothesis, label e/n/c). T-Few evaluates on test_r1..r3.

export function readAnli(round: 1 | 2 | 3, split: 'test' | 'dev', options: DataOptions = {}): Example[] {
  const file = dataFile(options, 'anli', `R${round}`, `${split}.jsonl`);
  return readJsonl(file).map((row, i) => {
    const where = `${file}:${i + 1}`;
    requireFields(row, ['uid', 'context', 'hypothesis', 'label'], where);
    const label = asLabel(row.label, { e: 0, n: 1, c: 2 }, where);
    return {
      id: String(row.uid),
      fields: { uid: row.uid, premise: row.context, hypothesis: row.hypothesis, label, reason: row.reason ?? '' },
      label,
    };
  });
}

// ---------------------------------------------------------------------------------------------------
// Story Cloze 2016 (CSV). T-Few trains on the validation file and evaluates on the test file.

export function readStoryCloze(split: 'val' | 'test', options: DataOptions = {}): Example[] {
  const file = dataFile(options, 'storycloze', `cloze_test_${split}__spring2016.csv`);
  return readCsv(file).map((row, i) => {
    const where = `${file}:${i + 2}`;
    const answer = Number(row.AnswerRightEnding);
    if (answer !== 1 && answer !== 2) throw new FileFormatError(`${where}: AnswerRightEnding must be 1 or 2`);
    const fields: Record<string, FieldValue> = {
      story_id: row.InputStoryid,
      input_sentence_1: row.InputSentence1,
      input_sentence_2: row.InputSentence2,
      input_sentence_3: row.InputSentence3,
      input_sentence_4: row.InputSentence4,
      sentence_quiz1: row.RandomFifthSentenceQuiz1,
      sentence_quiz2: row.RandomFifthSentenceQuiz2,
      answer_right_ending: answer,
      label: answer - 1,
      // T-Few numbers rows by position; its split files' idx refer to this order.
      idx: i,
    };
    return { id: row.InputStoryid, fields, label: answer - 1 };
  });
}

// ---------------------------------------------------------------------------------------------------
// HellaSwag validation, text dump: 6 lines per item ("activity: context", gold index, 4 endings).

/** The clean-up the text dump applied (WikiHow markup removed); applied to split-file examples too. */
export function cleanHellaSwagText(text: string): string {
  return text
    .trim()
    .replace(/ \[title\]/g, '. ')
    .replace(/\[.*?\]/g, '')
    .replace(/ {2}/g, ' ')
    .trim();
}

function normalizeHellaSwagFields(fields: Record<string, FieldValue>): void {
  if (typeof fields.ctx === 'string') fields.ctx = cleanHellaSwagText(fields.ctx);
  if (Array.isArray(fields.endings)) fields.endings = fields.endings.map((e) => cleanHellaSwagText(String(e)));
}

export function readHellaSwag(options: DataOptions = {}): Example[] {
  const file = dataFile(options, 'hellaswag', 'hellaswag_val_full.txt');
  const lines = fs.readFileSync(file, 'utf8').split(/\r?\n/);
  while (lines.length > 0 && lines[lines.length - 1] === '') lines.pop();
  if (lines.length % 6 !== 0) throw new FileFormatError(`${file}: expected 6 lines per item, got ${lines.length} lines`);
  const out: Example[] = [];
  for (let i = 0; i < lines.length; i += 6) {
    const head = lines[i];
    const sep = head.indexOf(': ');
    const label = Number(lines[i + 1]);
    if (!Number.isInteger(label) || label < 0 || label > 3) throw new FileFormatError(`${file}:${i + 2}: bad label`);
    const activity = sep >= 0 ? head.slice(0, sep) : '';
    const ctx = sep >= 0 ? head.slice(sep + 2) : head;
    const idx = i / 6;
    out.push({
      id: String(idx),
      fields: { activity_label: activity, ctx, endings: lines.slice(i + 2, i + 6), label, idx },
      label,
    });
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------
// WinoGrande 1.1 dev (CSV with a trailing summary row; the prediction columns are not ours).

export function readWinogrande(options: DataOptions = {}): Example[] {
  const file = dataFile(options, 'winogrande', 'dev_preds.csv');
  const out: Example[] = [];
  readCsv(file).forEach((row, i) => {
    if (!row.qID) return; // the summary row
    const answer = Number(row.answer);
    if (answer !== 1 && answer !== 2) throw new FileFormatError(`${file}:${i + 2}: answer must be 1 or 2`);
    out.push({
      id: row.qID,
      fields: { sentence: row.sentence, option1: row.option1, option2: row.option2, answer: row.answer, label: answer - 1 },
      label: answer - 1,
    });
  });
  return out;
}

// ---------------------------------------------------------------------------------------------------
// RAFT: raft/<task>/{task.json, train.csv, test_unlabeled.csv}.

export interface RaftTaskInfo {
  name: string;
  /** Data columns in dataset order (ID excluded). */
  dataColumns: string[];
  /** Label names, task.json order (label index = position here; HF's integer is this + 1). */
  labelNames: string[];
}

export function readRaftInfo(task: string, options: DataOptions = {}): RaftTaskInfo {
  const file = dataFile(options, 'raft', task, 'task.json');
  let json: { name?: string; data_columns?: string[]; label_columns?: { Label?: string[] } };
  try {
    json = JSON.parse(fs.readFileSync(file, 'utf8'));
  } catch (e) {
    throw new FileFormatError(`${file}: ${(e as Error).message}`);
  }
  const labels = json.label_columns?.Label;
  if (!Array.isArray(json.data_columns) || !Array.isArray(labels)) {
    throw new FileFormatError(`${file}: expected data_columns and label_columns.Label`);
  }
  return { name: json.name ?? task, dataColumns: json.data_columns.filter((c) => c !== 'ID'), labelNames: labels };
}

/** RAFT train (50 labelled) or test (unlabelled, label -1) rows. */
export function readRaft(task: string, split: 'train' | 'test', options: DataOptions = {}): Example[] {
  const info = readRaftInfo(task, options);
  const file = dataFile(options, 'raft', task, split === 'train' ? 'train.csv' : 'test_unlabeled.csv');
  return readCsv(file).map((row, i) => {
    const where = `${file}:${i + 2}`;
    if (row.ID === undefined) throw new FileFormatError(`${where}: missing ID column`);
    const fields: Record<string, FieldValue> = {};
    for (const c of info.dataColumns) fields[c] = row[c] ?? '';
    let label = -1;
    if (split === 'train') {
      label = info.labelNames.indexOf(row.Label);
      if (label < 0) throw new FileFormatError(`${where}: unknown label "${row.Label}"`);
    }
    fields.ID = row.ID;
    return { id: row.ID, fields, label };
  });
}

// ---------------------------------------------------------------------------------------------------
// SST-2 (GLUE validation TSV), an extra small sentiment set with T-Few split files.

export function readSst2(options: DataOptions = {}): Example[] {
  const file = dataFile(options, 'sst2', 'glue_validation.tsv');
  return readCsv(file, { delimiter: '\t' }).map((row, i) => {
    const label = Number(row.label);
    if (label !== 0 && label !== 1) throw new FileFormatError(`${file}:${i + 2}: label must be 0 or 1`);
    return { id: String(i), fields: { sentence: row.sentence, label, idx: i }, label };
  });
}
