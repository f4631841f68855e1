// RAFT's submission format: a CSV per task with the header "ID,Label", one row per test example, the
// label as its name (e.g. "ADE-related"), IDs as in test_unlabeled.csv.
import * as fs from 'fs';
import * as path from 'path';
import { InvalidArgumentError } from '../errors';

function csvField(value: string): string {
  return /[",\r\n]/.test(value) ? `"${value.replace(/"/g, '""')}"` : value;
}

/** The CSV text of a RAFT submission. */
export function raftSubmissionCsv(ids: readonly string[], predictions: readonly number[], labelNames: readonly string[]): string {
  if (ids.length !== predictions.length) {
    throw new InvalidArgumentError(`${ids.length} ids but ${predictions.length} predictions`);
  }
  const lines = ['ID,Label'];
  ids.forEach((id, i) => {
    const p = predictions[i];
    if (!Number.isInteger(p) || p < 0 || p >= labelNames.length) {
      throw new InvalidArgumentError(`prediction ${p} for ID ${id} is not a label index (0..${labelNames.length - 1})`);
    }
    lines.push(`${csvField(String(id))},${csvField(labelNames[p])}`);
  });
  return `${lines.join('\n')}\n`;
}

/** Writes the submission CSV (creating the directory). */
export function writeRaftSubmission(file: string, ids: readonly string[], predictions: readonly number[], labelNames: readonly string[]): void {
  fs.mkdirSync(path.dirname(path.resolve(file)), { recursive: true });
  fs.writeFileSync(file, raftSubmissionCsv(ids, predictions, labelNames));
}
