// Low-level file access for the task readers: locating the data directory and parsing JSONL / CSV / TSV.
import * as fs from 'fs';
import * as path from 'path';
import { parse as parseCsv } from 'csv-parse/sync';
import { FileFormatError } from '../errors';
import { packageRoot } from '../native';
import type { DataOptions, FieldValue } from './types';

/** The data directory: the explicit option, else $TFEW_DATA_DIR, else ../shared/data beside the package. */
export function resolveDataDir(options: DataOptions = {}): string {
  return options.dataDir ?? process.env.TFEW_DATA_DIR ?? path.resolve(packageRoot(), '..', 'shared', 'data');
}

/** True when the data directory exists (tests use it to skip cleanly). */
export function dataAvailable(options: DataOptions = {}): boolean {
  return fs.existsSync(resolveDataDir(options));
}

/** An absolute path of a file under the data directory; throws a FileFormatError naming it when absent. */
export function dataFile(options: DataOptions, ...parts: string[]): string {
  const dir = resolveDataDir(options);
  const file = path.join(dir, ...parts);
  if (!fs.existsSync(file)) {
    throw new FileFormatError(
      `data file not found: ${file} (data directory ${dir}; pass --data-dir or set TFEW_DATA_DIR)`,
    );
  }
  return file;
}

function readText(file: string): string {
  try {
    return fs.readFileSync(file, 'utf8');
  } catch (e) {
    throw new FileFormatError(`cannot read ${file}: ${(e as Error).message}`);
  }
}

/** One JSON object per non-empty line. */
export function readJsonl(file: string): Record<string, FieldValue>[] {
  const rows: Record<string, FieldValue>[] = [];
  readText(file)
    .split(/\r?\n/)
    .forEach((line, i) => {
      if (line.trim() === '') return;
      let value: unknown;
      try {
        value = JSON.parse(line);
      } catch (e) {
        throw new FileFormatError(`${file}:${i + 1}: invalid JSON (${(e as Error).message})`);
      }
      if (value === null || typeof value !== 'object' || Array.isArray(value)) {
        throw new FileFormatError(`${file}:${i + 1}: expected a JSON object per line`);
      }
      rows.push(value as Record<string, FieldValue>);
    });
  return rows;
}

export interface CsvOptions {
  /** Field delimiter; default ','. */
  delimiter?: string;
  /** false: the file has no header row and records come back keyed '0', '1', ... */
  header?: boolean;
}

/** RFC-4180 CSV (quoted fields may contain commas and newlines) as records keyed by the header. */
export function readCsv(file: string, options: CsvOptions = {}): Record<string, string>[] {
  const text = readText(file);
  try {
    if (options.header === false) {
      const rows = parseCsv(text, { delimiter: options.delimiter ?? ',', relax_column_count: true, bom: true }) as string[][];
      return rows.map((r) => Object.fromEntries(r.map((v, i) => [String(i), v])));
    }
    return parseCsv(text, {
      columns: true,
      delimiter: options.delimiter ?? ',',
      relax_column_count: true,
      bom: true,
      // TSV files (SST-2) are not quoted and contain bare quote characters.
      quote: options.delimiter === '\t' ? false : '"',
    }) as Record<string, string>[];
  } catch (e) {
    throw new FileFormatError(`${file}: invalid CSV (${(e as Error).message})`);
  }
}

/** Column names of a CSV file, in file order. */
export function readCsvHeader(file: string, delimiter = ','): string[] {
  const firstLines = readText(file).split(/\r?\n/, 1)[0];
  const rows = parseCsv(firstLines, { delimiter, bom: true, relax_quotes: true }) as string[][];
  return rows[0] ?? [];
}
