// Metric aggregation (median / IQR, the paper's protocol), cost formulas, the RAFT submission format and
// report rendering.
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { parse as parseCsv } from 'csv-parse/sync';
import { InvalidArgumentError } from '../../lib/errors';
import { ia3ParameterCount, measure, parameterCount, rankFlops, trainingFlops, type FlopsConfig } from '../../lib/pipeline/cost';
import { accuracy, median, quantile, spread, summarizeRuns } from '../../lib/pipeline/metrics';
import { raftSubmissionCsv, writeRaftSubmission } from '../../lib/pipeline/raft-submission';
import { comparisonPlotSpec, markdownReport, renderVegaLite, writeReport, type MethodResult } from '../../lib/pipeline/report';
import { dataAvailable } from '../../lib/tasks/files';
import { readRaft, readRaftInfo } from '../../lib/tasks/readers';
import { readT5Config } from '../../lib/config';

/** The JSON header of a safetensors file, read directly (8-byte little-endian length, then JSON). */
function safetensorsHeader(file: string): Record<string, { shape: number[]; data_offsets: [number, number] }> {
  const buf = fs.readFileSync(file);
  const len = Number(buf.readBigUInt64LE(0));
  const header = JSON.parse(buf.subarray(8, 8 + len).toString('utf8'));
  delete header.__metadata__;
  return header;
}

describe('metrics', () => {
  test('accuracy', () => {
    expect(accuracy([0, 1, 1, 2], [0, 1, 0, 2])).toBe(0.75);
    expect(() => accuracy([0], [0, 1])).toThrow(InvalidArgumentError);
    expect(() => accuracy([], [])).toThrow(InvalidArgumentError);
  });

  test('quantiles interpolate linearly between order statistics (NumPy\'s default)', () => {
    // For 1..n the q-quantile is 1 + q (n - 1) exactly.
    const xs = [5, 1, 4, 2, 3, 9, 6, 8, 7, 10];
    for (const q of [0, 0.1, 0.25, 0.5, 0.75, 0.9, 1]) expect(quantile(xs, q)).toBeCloseTo(1 + q * 9, 12);
    expect(quantile([1, 2, 3, 4], 0.25)).toBe(1.75);
    expect(quantile([1, 2, 3, 4], 0.75)).toBe(3.25);
    expect(median([3, 1, 2])).toBe(2);
    expect(median([4, 1, 3, 2])).toBe(2.5);
    expect(median([7])).toBe(7);
    expect(() => quantile([], 0.5)).toThrow(InvalidArgumentError);
    expect(() => quantile([1], 1.5)).toThrow(InvalidArgumentError);
  });

  test('spread: median, quartiles, IQR, mean, range', () => {
    const s = spread([0.5, 0.7, 0.6, 0.9]);
    expect(s.median).toBeCloseTo(0.65, 12);
    expect(s.q25).toBeCloseTo(0.575, 12);
    expect(s.q75).toBeCloseTo(0.75, 12);
    expect(s.iqr).toBeCloseTo(0.175, 12);
    expect(s.mean).toBeCloseTo(0.675, 12);
    expect([s.min, s.max, s.count]).toEqual([0.5, 0.9, 4]);
  });

  test('summarizeRuns pools every template x seed run, with per-template and per-seed breakdowns', () => {
    const acc: Record<string, number[]> = { a: [0.6, 0.7, 0.8], b: [0.5, 0.9, 0.4] }; // by template, seeds 1..3
    const runs = Object.entries(acc).flatMap(([template, xs]) => xs.map((accuracy, i) => ({ template, seed: i + 1, accuracy, count: 10 })));
    const s = summarizeRuns(runs);
    const all = [0.4, 0.5, 0.6, 0.7, 0.8, 0.9];
    expect(s.count).toBe(6);
    expect(s.median).toBeCloseTo(median(all), 12);
    expect(s.iqr).toBeCloseTo(quantile(all, 0.75) - quantile(all, 0.25), 12);
    expect(s.perTemplate.a.median).toBeCloseTo(0.7, 12);
    expect(s.perTemplate.b.median).toBeCloseTo(0.5, 12);
    expect(s.perSeed['2'].median).toBeCloseTo(0.8, 12);
    expect(() => summarizeRuns([])).toThrow(InvalidArgumentError);
  });
});

describe('cost accounting', () => {
  // T0-3B's architecture (tfew-spec.md section 3).
  const t03b: FlopsConfig & { tiedHead: boolean } = {
    dModel: 2048, dFf: 5120, dKv: 64, numHeads: 32, numLayers: 24, numDecoderLayers: 24, vocabSize: 32128, gatedGelu: true, tiedHead: false,
  };

  test('parameter counts match T0-3B: 2,849,757,184 weights and 540,672 (IA)3 values', () => {
    expect(parameterCount(t03b)).toBe(2849757184);
    expect(ia3ParameterCount(t03b)).toBe(540672);
  });

  test('parameter count equals the tensors of a real checkpoint (the tiny fixtures)', () => {
    for (const name of ['tiny-gated-gelu-untied', 'tiny-relu-tied']) {
      const dir = path.join(__dirname, '..', 'fixtures', name);
      const config = readT5Config(dir);
      const header = safetensorsHeader(path.join(dir, 'model.safetensors'));
      // A tied checkpoint may also store the embedding as encoder/decoder.embed_tokens: count it once.
      let total = 0;
      for (const [k, v] of Object.entries(header)) {
        if (/embed_tokens\.weight$/.test(k) && header['shared.weight']) continue;
        total += v.shape.reduce((a, b) => a * b, 1);
      }
      expect(parameterCount(config)).toBe(total);
    }
  });

  test('rank-classification FLOPs follow the paper\'s "N FLOPs per token" for an encoder-decoder', () => {
    // Table 1's convention: inference ~ parameters x (input + choice tokens). Attention adds a little on top.
    const n = parameterCount(t03b);
    const flops = rankFlops(t03b, 256, [8, 8]);
    expect(flops / (n * (256 + 16))).toBeGreaterThan(0.85);
    expect(flops / (n * (256 + 16))).toBeLessThan(1.15);
    // Longer inputs (ICL) cost more, superlinearly because of attention.
    expect(rankFlops(t03b, 1024, [8, 8])).toBeGreaterThan(4 * rankFlops(t03b, 256, [8, 8]) - 4 * 16 * n);
    // The paper's training cost: 3 x forward x 1000 steps x batch 8.
    expect(trainingFlops(flops, 1000, 8)).toBeCloseTo(3 * flops * 8000, -6);
  });

  test('measure() times the work and samples memory', async () => {
    const m = await measure(async () => {
      const big = Buffer.alloc(64 * 1024 * 1024, 1);
      await new Promise((r) => setTimeout(r, 50));
      return big.length;
    }, null);
    expect(m.result).toBe(64 * 1024 * 1024);
    expect(m.seconds).toBeGreaterThanOrEqual(0.04);
    expect(m.peakRssBytes).toBeGreaterThan(0);
    expect(m.peakRssDeltaBytes).toBeGreaterThanOrEqual(0);
    expect(m.peakDeviceBytes).toBeNaN();  // (no GPU asked for: nothing measured there)
  });
});

describe('RAFT submission CSV', () => {
  test('header ID,Label; one row per example with the label name; quoting where needed', () => {
    const csv = raftSubmissionCsv(['50', '51', '52'], [1, 0, 2], ['ADE-related', 'not ADE-related', 'a, "quoted" label']);
    expect(csv.split('\n')[0]).toBe('ID,Label');
    const rows = parseCsv(csv, { columns: true }) as { ID: string; Label: string }[];
    expect(rows).toEqual([
      { ID: '50', Label: 'not ADE-related' },
      { ID: '51', Label: 'ADE-related' },
      { ID: '52', Label: 'a, "quoted" label' },
    ]);
    expect(csv.endsWith('\n')).toBe(true);
    expect(() => raftSubmissionCsv(['1'], [2], ['a', 'b'])).toThrow(InvalidArgumentError);
    expect(() => raftSubmissionCsv(['1', '2'], [0], ['a', 'b'])).toThrow(InvalidArgumentError);
  });

  (dataAvailable() ? test : test.skip)('a full test set: every test ID once, labels from task.json', () => {
    const test = readRaft('overruling', 'test');
    const { labelNames } = readRaftInfo('overruling');
    const file = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'tfew-raft-')), 'sub', 'overruling.csv');
    writeRaftSubmission(file, test.map((e) => e.id), test.map((_, i) => i % 2), labelNames);
    const rows = parseCsv(fs.readFileSync(file, 'utf8'), { columns: true }) as { ID: string; Label: string }[];
    expect(rows.map((r) => r.ID)).toEqual(test.map((e) => e.id));
    expect(new Set(rows.map((r) => r.Label))).toEqual(new Set(labelNames));
  });
});

describe('reports', () => {
  const runs = (xs: number[]) => xs.map((accuracy, i) => ({ template: `t${i % 2}`, seed: Math.floor(i / 2), accuracy, count: 20 }));
  const results: MethodResult[] = [
    { method: 'T-Few', task: 'rte', runs: runs([0.8, 0.7, 0.9, 0.75]), summary: summarizeRuns(runs([0.8, 0.7, 0.9, 0.75])) },
    { method: 'ICL', task: 'rte', runs: runs([0.6, 0.55, 0.65, 0.5]), summary: summarizeRuns(runs([0.6, 0.55, 0.65, 0.5])) },
  ];
  const costs = [
    { method: 'T-Few', inferenceFlopsPerExample: 1.1e12, trainingFlops: 2.7e16, diskBytes: 4.2e6, accuracy: 0.775, accuracyIqr: 0.06, msPerExample: 3, trainingSeconds: 100, peakRssBytes: 1e9, peakDeviceBytes: 6 * 1024 ** 3, meanInputTokens: 103 },
    { method: 'ICL', inferenceFlopsPerExample: 4.5e13, trainingFlops: 0, diskBytes: 16000, accuracy: 0.575, accuracyIqr: 0.06, msPerExample: 30, trainingSeconds: 0, peakRssBytes: 2e9, peakDeviceBytes: NaN, meanInputTokens: 4000 },
  ];

  test('Markdown: accuracy table with median/IQR, per-template table, cost table', () => {
    const md = markdownReport({ title: 'T', setup: ['Model: m'], results, costs, plotPath: 'p.png' });
    expect(md).toContain('| rte | T-Few | 77.5 | ');
    expect(md).toContain(`| rte | ICL | ${(100 * median([0.6, 0.55, 0.65, 0.5])).toFixed(1)} | `);
    expect(md).toContain('| T-Few | 1.1e12 | 2.7e16 | 4.0 MB |');
    expect(md).toMatch(/\| T-Few \|.*\| 6\.00 GB \| 103 \|/);  // peak GPU memory
    expect(md).toMatch(/\| ICL \|.*\| n\/a \| 4000 \|/);  // (the CPU backend measures none)
    expect(md).toContain('![accuracy and cost, T-Few vs ICL](p.png)');
    expect(md).toMatch(/### rte: T-Few per template[\s\S]*\| t0 \|/);
  });

  test('the plot renders to SVG and PNG without a browser', async () => {
    const spec = comparisonPlotSpec(results, costs);
    const { svg, png } = await renderVegaLite(spec);
    expect(svg.startsWith('<svg')).toBe(true);
    expect(svg).toContain('Accuracy (median, IQR)');
    expect(svg).toContain('Inference FLOPs per example');
    expect(png.subarray(0, 8)).toEqual(Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]));
    expect(png.length).toBeGreaterThan(5000);
  });

  test('writeReport writes the Markdown, JSON and plot files', async () => {
    const base = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'tfew-report-')), 'out', 'rte');
    const files = await writeReport(base, { title: 'R', setup: [], results, costs }, { raw: true });
    for (const f of Object.values(files)) expect(fs.statSync(f).size).toBeGreaterThan(0);
    expect(fs.readFileSync(files.markdown, 'utf8')).toContain('](rte.png)');
    expect(JSON.parse(fs.readFileSync(files.json, 'utf8'))).toEqual({ raw: true });
  });
});
