// Results as Markdown with a plot (accuracy and cost, T-Few against ICL), rendered without a browser:
// a Vega-Lite spec compiled to Vega, drawn to SVG by a headless vega View, rasterised to PNG by resvg.
import * as fs from 'fs';
import * as path from 'path';
import type { AccuracySummary, RunAccuracy } from './metrics';
import { formatBytes, formatFlops, type CostRow } from './cost';

/** Accuracy of one method on one task. */
export interface MethodResult {
  method: string;
  task: string;
  runs: RunAccuracy[];
  summary: AccuracySummary;
}

export interface ReportInput {
  title: string;
  /** Lines describing the setup (model, device, data), shown as a list. */
  setup: string[];
  results: MethodResult[];
  costs?: CostRow[];
  /** Relative path of the plot image, linked from the Markdown. */
  plotPath?: string;
  notes?: string[];
}

const pct = (x: number) => (Number.isFinite(x) ? `${(100 * x).toFixed(1)}` : '-');

function table(header: string[], rows: string[][]): string {
  const line = (cells: string[]) => `| ${cells.join(' | ')} |`;
  return [line(header), line(header.map(() => '---')), ...rows.map(line)].join('\n');
}

/** The Markdown report. */
export function markdownReport(input: ReportInput): string {
  const out: string[] = [`# ${input.title}`, ''];
  if (input.setup.length > 0) out.push(...input.setup.map((s) => `- ${s}`), '');

  if (input.results.length > 0) {
    out.push('## Accuracy', '', 'Median accuracy (%) over every template x seed run, with the interquartile range (the paper\'s protocol).', '');
    out.push(
      table(
        ['Task', 'Method', 'Median', 'IQR', 'Q25-Q75', 'Runs', 'Examples per run'],
        input.results.map((r) => [
          r.task, r.method, pct(r.summary.median), pct(r.summary.iqr), `${pct(r.summary.q25)}-${pct(r.summary.q75)}`,
          String(r.summary.count), String(Math.round(r.runs.reduce((a, x) => a + x.count, 0) / Math.max(1, r.runs.length))),
        ]),
      ),
      '',
    );
  }

  for (const r of input.results) {
    const templates = Object.keys(r.summary.perTemplate);
    if (templates.length < 2 && Object.keys(r.summary.perSeed).length < 2) continue;
    out.push(`### ${r.task}: ${r.method} per template`, '');
    out.push(
      table(
        ['Template', 'Median over seeds', 'Min', 'Max', 'Seeds'],
        templates.map((t) => {
          const s = r.summary.perTemplate[t];
          return [t, pct(s.median), pct(s.min), pct(s.max), String(s.count)];
        }),
      ),
      '',
    );
  }

  if (input.costs && input.costs.length > 0) {
    out.push('## Cost', '');
    out.push(
      'Inference FLOPs are analytic per evaluated example (formula in lib/pipeline/cost.ts), training FLOPs = 3 x forward x steps x batch ' +
        '(the paper\'s convention); time and memory are measured on this machine (peak host RSS; peak GPU memory in use ' +
        'from cudaMemGetInfo on the CUDA backend, n/a on the CPU).',
      '',
    );
    out.push(
      table(
        ['Method', 'Inference FLOPs / example', 'Training FLOPs', 'Disk', 'Accuracy', 'ms / example', 'Training time', 'Peak RSS', 'Peak GPU memory', 'Input tokens'],
        input.costs.map((c) => [
          c.method, formatFlops(c.inferenceFlopsPerExample), formatFlops(c.trainingFlops), formatBytes(c.diskBytes),
          Number.isFinite(c.accuracy) ? `${pct(c.accuracy)} (IQR ${pct(c.accuracyIqr)})` : '-', c.msPerExample.toFixed(2),
          c.trainingSeconds > 0 ? `${c.trainingSeconds.toFixed(1)} s` : '-', formatBytes(c.peakRssBytes), formatBytes(c.peakDeviceBytes), c.meanInputTokens.toFixed(0),
        ]),
      ),
      '',
    );
  }

  if (input.plotPath) out.push(`![accuracy and cost, T-Few vs ICL](${input.plotPath})`, '');
  if (input.notes && input.notes.length > 0) out.push('## Notes', '', ...input.notes.map((n) => `- ${n}`), '');
  return out.join('\n');
}

/** A Vega-Lite spec: accuracy (median with IQR) and inference FLOPs per example, per method. */
export function comparisonPlotSpec(results: MethodResult[], costs: CostRow[] = []): Record<string, unknown> {
  const accuracyRows = results.map((r) => ({
    label: results.some((o) => o.task !== r.task) ? `${r.method} (${r.task})` : r.method,
    method: r.method,
    median: 100 * r.summary.median,
    q25: 100 * r.summary.q25,
    q75: 100 * r.summary.q75,
  }));
  const methodOrder = [...new Set([...results.map((r) => r.method), ...costs.map((c) => c.method)])];
  const accuracyChart = {
    title: 'Accuracy (median, IQR)',
    width: 260,
    height: 200,
    data: { values: accuracyRows },
    layer: [
      {
        mark: 'bar',
        encoding: {
          x: { field: 'label', type: 'nominal', title: null, axis: { labelAngle: 0 }, sort: null },
          y: { field: 'median', type: 'quantitative', title: 'accuracy (%)', scale: { domain: [0, 100] } },
          color: { field: 'method', type: 'nominal', legend: null, sort: methodOrder },
        },
      },
      {
        mark: { type: 'rule', strokeWidth: 2 },
        encoding: {
          x: { field: 'label', type: 'nominal', sort: null },
          y: { field: 'q25', type: 'quantitative' },
          y2: { field: 'q75' },
        },
      },
    ],
  };
  const charts: Record<string, unknown>[] = [accuracyChart];
  if (costs.length > 0) {
    const costRows = costs.map((c) => ({ method: c.method, flops: c.inferenceFlopsPerExample, ms: c.msPerExample }));
    // Bars on a log axis need a finite baseline: a decade or so below the smallest value.
    const positive = costRows.map((r) => r.flops).filter((f) => f > 0);
    const baseline = 10 ** Math.floor(Math.log10(positive.length > 0 ? Math.min(...positive) : 1) - 0.5);
    charts.push({
      title: 'Inference FLOPs per example',
      width: 220,
      height: 200,
      data: { values: costRows },
      layer: [
        {
          mark: 'bar',
          encoding: {
            x: { field: 'method', type: 'nominal', title: null, axis: { labelAngle: 0 }, sort: methodOrder },
            y: { field: 'flops', type: 'quantitative', title: 'FLOPs (log scale)', scale: { type: 'log', domainMin: baseline }, axis: { format: '.0e', tickCount: 6 } },
            y2: { datum: baseline },
            color: { field: 'method', type: 'nominal', legend: null, sort: methodOrder },
          },
        },
        {
          mark: { type: 'text', dy: -6 },
          encoding: {
            x: { field: 'method', type: 'nominal', sort: methodOrder },
            y: { field: 'flops', type: 'quantitative' },
            text: { field: 'flops', type: 'quantitative', format: '.2~e' },
          },
        },
      ],
    });
    charts.push({
      title: 'Wall time per example',
      width: 220,
      height: 200,
      data: { values: costRows },
      mark: 'bar',
      encoding: {
        x: { field: 'method', type: 'nominal', title: null, axis: { labelAngle: 0 }, sort: methodOrder },
        y: { field: 'ms', type: 'quantitative', title: 'ms (measured)' },
        color: { field: 'method', type: 'nominal', legend: null, sort: methodOrder },
      },
    });
  }
  return {
    $schema: 'https://vega.github.io/schema/vega-lite/v5.json',
    background: 'white',
    padding: 10,
    hconcat: charts,
  };
}

/** Renders a Vega-Lite spec to SVG and PNG in-process (no browser, no network). */
export async function renderVegaLite(spec: Record<string, unknown>): Promise<{ svg: string; png: Buffer }> {
  // Loaded lazily: they are sizeable and only reports need them.
  // eslint-disable-next-line @typescript-eslint/no-var-requires
  const vl = require('vega-lite') as { compile(spec: unknown): { spec: unknown } };
  // eslint-disable-next-line @typescript-eslint/no-var-requires
  const vega = require('vega') as {
    parse(spec: unknown): unknown;
    View: new (runtime: unknown, options: { renderer: string }) => { toSVG(): Promise<string>; finalize(): void };
  };
  // eslint-disable-next-line @typescript-eslint/no-var-requires
  const { Resvg } = require('@resvg/resvg-js') as {
    Resvg: new (svg: string, options?: unknown) => { render(): { asPng(): Buffer } };
  };
  const view = new vega.View(vega.parse(vl.compile(spec).spec), { renderer: 'none' });
  try {
    const svg = await view.toSVG();
    const png = new Resvg(svg, { fitTo: { mode: 'zoom', value: 2 }, font: { loadSystemFonts: true } }).render().asPng();
    return { svg, png };
  } finally {
    view.finalize();
  }
}

/** Writes `<base>.md`, `<base>.json` (the raw results), and the plot as `<base>.png` and `<base>.svg`. */
export async function writeReport(base: string, input: Omit<ReportInput, 'plotPath'>, raw: unknown): Promise<{ markdown: string; json: string; png: string; svg: string }> {
  const dir = path.dirname(path.resolve(base));
  fs.mkdirSync(dir, { recursive: true });
  const stem = path.basename(base);
  const { svg, png } = await renderVegaLite(comparisonPlotSpec(input.results, input.costs));
  const files = { markdown: `${base}.md`, json: `${base}.json`, png: `${base}.png`, svg: `${base}.svg` };
  fs.writeFileSync(files.svg, svg);
  fs.writeFileSync(files.png, png);
  fs.writeFileSync(files.json, `${JSON.stringify(raw, null, 2)}\n`);
  fs.writeFileSync(files.markdown, markdownReport({ ...input, plotPath: `${stem}.png` }));
  return files;
}
