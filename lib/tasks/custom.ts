// A user's own data: CSV / TSV / JSONL with a label column.
import * as path from 'path';
import { FileFormatError, InvalidArgumentError } from '../errors';
import { readCsv, readJsonl } from './files';
import type { Example, FieldValue } from './types';

export interface UserDataOptions {
  /** Column holding the label (a label name or a 0-based index). Default 'label'. */
  labelColumn?: string;
  /** Column holding a stable id. Default 'id' when present, else 'ID', else the row number. */
  idColumn?: string;
  /**
   * The label names, in answer-choice order. Labels in the file may be these names or indices into them.
   * Default: when every label is an integer, "0".."max"; otherwise the distinct label strings, sorted.
   */
  labelNames?: string[];
  /** File format; default from the extension (.csv, .tsv, .jsonl / .json). */
  format?: 'csv' | 'tsv' | 'jsonl';
}

export interface UserData {
  examples: Example[];
  labelNames: string[];
  /** Every column seen, in first-seen order (what templates may refer to). */
  columns: string[];
}

function formatOf(file: string, format?: UserDataOptions['format']): 'csv' | 'tsv' | 'jsonl' {
  if (format) return format;
  const ext = path.extname(file).toLowerCase();
  if (ext === '.csv') return 'csv';
  if (ext === '.tsv') return 'tsv';
  if (ext === '.jsonl' || ext === '.json' || ext === '.ndjson') return 'jsonl';
  throw new InvalidArgumentError(`cannot tell the format of ${file}: use .csv, .tsv or .jsonl (or pass format)`);
}

function isMissing(v: FieldValue | undefined): boolean {
  return v === undefined || v === null || (typeof v === 'string' && v.trim() === '');
}

/**
 * Reads a user's labelled (or partly unlabelled) file. Rows without a label get label -1, so the same
 * reader serves training files and inputs to classify.
 */
export function readUserData(file: string, options: UserDataOptions = {}): UserData {
  const fmt = formatOf(file, options.format);
  const rows: Record<string, FieldValue>[] =
    fmt === 'jsonl' ? readJsonl(file) : readCsv(file, { delimiter: fmt === 'tsv' ? '\t' : ',' });
  const labelColumn = options.labelColumn ?? 'label';
  const columns: string[] = [];
  for (const r of rows) for (const k of Object.keys(r)) if (!columns.includes(k)) columns.push(k);
  const idColumn = options.idColumn ?? (columns.includes('id') ? 'id' : columns.includes('ID') ? 'ID' : undefined);

  const rawLabels = rows.map((r) => r[labelColumn]).filter((v) => !isMissing(v)).map((v) => String(v).trim());
  let labelNames = options.labelNames;
  if (!labelNames) {
    const allInts = rawLabels.length > 0 && rawLabels.every((l) => /^\d+$/.test(l));
    if (allInts) {
      const max = Math.max(...rawLabels.map(Number));
      labelNames = Array.from({ length: max + 1 }, (_, i) => String(i));
    } else {
      labelNames = [...new Set(rawLabels)].sort();
    }
  }
  const names = labelNames;

  const examples = rows.map((row, i): Example => {
    const where = `${file}: row ${i + 1}`;
    const raw = row[labelColumn];
    let label = -1;
    if (!isMissing(raw)) {
      const s = String(raw).trim();
      label = names.indexOf(s);
      if (label < 0 && /^\d+$/.test(s) && Number(s) < names.length) label = Number(s);
      if (label < 0) throw new FileFormatError(`${where}: label "${s}" is not one of ${JSON.stringify(names)}`);
    }
    const id = idColumn && !isMissing(row[idColumn]) ? String(row[idColumn]) : String(i);
    return { id, fields: { ...row }, label };
  });
  return { examples, labelNames: names, columns };
}
