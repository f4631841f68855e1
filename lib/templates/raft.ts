// The RAFT prompt as T-Few builds it (tfew-spec.md, "RAFT"):
//   piece 0: <task instruction> + " Possible labels: " + labels joined by ", "
//   then one piece "<Field>: <value>" per prompt field that is non-empty, in the dataset's column order,
//   and "\nLabel:" appended to the last piece. The pieces are tokenized separately and concatenated; only
//   the last one gets EOS. Answer choices are the label names.
// The per-task instructions and field lists are RAFT's own, read at run time from the data directory
// (t-few-splits/meta/raft_prompt_construction_settings.jsonl), never embedded here.
import * as fs from 'fs';
import { FileFormatError, InvalidArgumentError } from '../errors';
import { dataFile } from '../tasks/files';
import type { DataOptions, Example } from '../tasks/types';
import type { RenderedPrompt, Template } from './engine';

export type RaftLabelsInInput = 'comma' | 'newline' | 'none';

export interface RaftTemplateOptions {
  instruction: string;
  /** The fields that go into the prompt (any order: the dataset's column order is used). */
  promptFields: string[];
  /** All data columns in dataset order. */
  dataColumns: string[];
  labelNames: string[];
  /** How the label list appears in the input. T-Few's code default, 'comma', is used for every task. */
  labelsInInput?: RaftLabelsInInput;
  /** Banking77's T-Few evaluation option: "card_arrival" -> "card arrival" in the answer choices. */
  cleanLabelNames?: boolean;
}

export class RaftTemplate implements Template {
  readonly name = 'raft';
  readonly originalTask = true;
  readonly choices: string[];
  private readonly header: string;
  private readonly fieldOrder: string[];

  constructor(options: RaftTemplateOptions) {
    if (options.labelNames.length < 2) throw new InvalidArgumentError('a RAFT template needs at least two labels');
    this.choices = options.cleanLabelNames
      ? options.labelNames.map((l) => l.replace(/_/g, ' ').replace(/\. /g, ' '))
      : options.labelNames.slice();
    const instruction = options.instruction.trim();
    const mode = options.labelsInInput ?? 'comma';
    if (mode === 'comma') this.header = `${instruction} Possible labels: ${this.choices.join(', ')}`;
    else if (mode === 'newline') {
      this.header = `${instruction}\nPossible labels:\n${this.choices.map((c, i) => `${i + 1}. ${c}`).join('\n')}`;
    } else this.header = instruction;
    this.fieldOrder = options.dataColumns.filter((c) => options.promptFields.includes(c));
  }

  render(example: Example): RenderedPrompt {
    const pieces = [this.header];
    for (const field of this.fieldOrder) {
      const value = example.fields[field];
      const text = value === undefined || value === null ? '' : String(value).trim();
      if (text !== '') pieces.push(`${field}: ${text}`);
    }
    pieces[pieces.length - 1] += '\nLabel:';
    if (example.label >= this.choices.length) {
      throw new InvalidArgumentError(`RAFT example ${example.id}: label ${example.label} out of range`);
    }
    return { input: pieces, choices: this.choices.slice(), label: example.label };
  }
}

export interface RaftPromptSettings {
  fields: Record<string, string[]>;
  instructions: Record<string, string>;
}

/** Reads RAFT's prompt settings (line 1: prompt fields per task, line 2: instructions per task). */
export function readRaftPromptSettings(options: DataOptions = {}): RaftPromptSettings {
  const file = dataFile(options, 't-few-splits', 'meta', 'raft_prompt_construction_settings.jsonl');
  const lines = fs.readFileSync(file, 'utf8').split(/\r?\n/).filter((l) => l.trim() !== '');
  try {
    const [fields, instructions] = lines.map((l) => JSON.parse(l));
    if (!fields || !instructions) throw new Error('expected two JSON lines');
    return { fields, instructions };
  } catch (e) {
    throw new FileFormatError(`${file}: ${(e as Error).message}`);
  }
}
