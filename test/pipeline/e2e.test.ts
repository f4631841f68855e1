// The whole pipeline on a tiny T5 the project builds itself: train -> eval -> classify -> ICL comparison ->
// report, on real task files when ../shared/data (or $TFEW_DATA_DIR) is present, and the CLI on top.
// Short runs: the checks are about the pipeline's behaviour, not about a tiny random model's accuracy.
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { parse as parseCsv } from 'csv-parse/sync';
import { IA3Adapter } from '../../lib/adapter';
import { main } from '../../lib/cli/main';
import { T5Model } from '../../lib/model';
import { classify } from '../../lib/pipeline/classify';
import { compareWithIcl, comparisonReport, comparisonJson } from '../../lib/pipeline/compare';
import { runDemo } from '../../lib/pipeline/demo';
import { encodePrompt } from '../../lib/pipeline/encode';
import { evaluate } from '../../lib/pipeline/evaluate';
import { runFewShot, trainAdapter, type FewShotResult } from '../../lib/pipeline/fewshot';
import { buildIclInput } from '../../lib/pipeline/icl';
import { accuracy } from '../../lib/pipeline/metrics';
import { writeReport } from '../../lib/pipeline/report';
import { dataAvailable, resolveDataDir } from '../../lib/tasks/files';
import { getTask, type Task } from '../../lib/tasks/registry';
import { buildTinyT5 } from '../../lib/tiny';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tfew-e2e-'));

describe('tfew demo (no data needed)', () => {
  test('a tiny T5 learns the synthetic task with (IA)3 and classifies new reviews correctly', async () => {
    const lines: string[] = [];
    const r = await runDemo({ modelDir: path.join(tmp, 'demo'), device: 'cpu', log: (l) => lines.push(l) });
    expect(r.accuracyBefore).toBeLessThan(0.65);
    expect(r.accuracyAfter).toBeGreaterThan(r.accuracyBefore + 0.25);
    // The showcase reviews use adjectives whose polarity we know.
    expect(r.predictions.map((p) => p.label)).toEqual(['good', 'bad', 'good', 'bad']);
    expect(lines.some((l) => l.startsWith('Before training: accuracy'))).toBe(true);
    expect(lines.filter((l) => /^ {2}step +\d+\/300 +loss/.test(l)).length).toBe(12);
  });
});

const HAVE_DATA = dataAvailable();
if (!HAVE_DATA) {
  // eslint-disable-next-line no-console
  console.warn(`[tfew tests] no data at ${resolveDataDir()}: the real-data pipeline tests are skipped (set TFEW_DATA_DIR)`);
}
const describeData = HAVE_DATA ? describe : describe.skip;

describeData('pipeline on real task files (RTE, RAFT) with a tiny model', () => {
  let model: T5Model;
  let rte: Task;
  let ade: Task;
  let fewshot: FewShotResult;
  const seeds = [42, 1024];

  beforeAll(async () => {
    rte = getTask('rte');
    ade = getTask('ade_corpus_v2');
    // A word-level vocabulary covering the texts used below (others map to <unk>).
    const texts: string[] = [];
    const push = (task: Task, examples: { fields: Record<string, unknown>; label: number; id: string }[]) => {
      for (const e of examples) for (const t of task.templates()) { const r = t.render(e as never); texts.push(...r.input, ...r.choices); }
    };
    push(rte, [...rte.trainExamples(42), ...rte.trainExamples(1024), ...rte.evalExamples().slice(0, 24)]);
    push(ade, [...ade.trainExamples(), ...ade.testExamples().slice(0, 12)]);
    const dir = path.join(tmp, 'tiny');
    buildTinyT5(dir, { words: texts, seed: 5, dModel: 32, dFf: 64, numHeads: 2, dKv: 16, numLayers: 2 });
    model = await T5Model.load(dir, { device: 'cpu' });
  });
  afterAll(async () => {
    await model?.dispose();
  });

  test('runFewShot: one adapter per seed, every template x seed evaluated', async () => {
    const templates = rte.templates().slice(0, 2);
    const events: number[] = [];
    fewshot = await runFewShot(model, {
      task: rte, seeds, templates, steps: 12, batchSize: 4, lr: 0.05, evalLimit: 24,
      saveDir: path.join(tmp, 'rte-adapters'), onStep: (seed) => events.push(seed),
    });
    expect(fewshot.training.map((t) => t.seed)).toEqual(seeds);
    expect(events.length).toBe(24);
    for (const t of fewshot.training) {
      expect(t.steps).toBe(12);
      expect(t.trainExamples).toBe(32 * templates.length); // every example under every template
      expect(t.flops).toBeGreaterThan(0);
      expect(fs.existsSync(path.join(tmp, 'rte-adapters', `seed-${t.seed}`, 'adapter_model.safetensors'))).toBe(true);
      // Training moved the vectors away from the identity.
      expect(fewshot.adapters.get(t.seed)!.data.some((v) => Math.abs(v - 1) > 1e-4)).toBe(true);
    }
    const ev = fewshot.evaluation;
    expect(ev.runs.map((r) => `${r.seed}/${r.template}`)).toEqual(seeds.flatMap((s) => templates.map((t) => `${s}/${t.name}`)));
    const gold = rte.evalExamples().slice(0, 24).map((e) => e.label);
    for (const r of ev.runs) {
      expect(r.labels).toEqual(gold);
      expect(r.accuracy).toBeCloseTo(accuracy(r.predictions, gold), 12);
    }
    expect(ev.summary.count).toBe(4);
    expect(ev.cost.flopsPerExample).toBeGreaterThan(0);
    // A saved adapter loads back to the same vectors.
    const loaded = await IA3Adapter.load(path.join(tmp, 'rte-adapters', 'seed-42'), { config: model.config });
    expect(Array.from(loaded.data)).toEqual(Array.from(fewshot.adapters.get(42)!.data));
  });

  test('the identity adapter scores exactly like no adapter', async () => {
    const opts = { task: rte, templates: rte.templates().slice(0, 1), seeds: [42], limit: 12 };
    const none = await evaluate(model, { ...opts, adapter: null });
    const ones = await evaluate(model, { ...opts, adapter: IA3Adapter.create(model) });
    expect(ones.runs[0].predictions).toEqual(none.runs[0].predictions);
  });

  test('classify agrees with evaluate for the same template and adapter', async () => {
    const template = rte.templates()[0];
    const adapter = fewshot.adapters.get(42)!;
    const examples = rte.evalExamples().slice(0, 24);
    const preds = await classify(model, examples, { template, adapter, batchSize: 5 });
    const run = fewshot.evaluation.runs.find((r) => r.seed === 42 && r.template === template.name)!;
    expect(preds.map((p) => p.prediction)).toEqual(run.predictions);
    expect(preds.map((p) => p.label)).toEqual(run.predictions.map((i) => ['Yes', 'No'][i]));
    expect(preds.map((p) => p.id)).toEqual(examples.map((e) => e.id));
  });

  test('ICL comparison: demonstrations in the input, costs side by side, report with plot', async () => {
    const templates = rte.templates().slice(0, 2);
    // The ICL input: demonstrations (dropped from the front when over budget), then the query, eos last.
    const tok = model.tokenizer!;
    const demos = rte.trainExamples(42).map((e) => templates[0].render(e));
    const query = templates[0].render(rte.evalExamples()[0]);
    const full = buildIclInput(tok, demos, query, 100000);
    expect(full.demonstrationsUsed).toBe(32);
    const capped = buildIclInput(tok, demos, query, 300);
    expect(capped.inputIds.length).toBeLessThanOrEqual(300);
    expect(capped.demonstrationsUsed).toBeLessThan(32);
    const alone = encodePrompt(tok, query, 300).inputIds;
    expect(capped.inputIds.slice(-alone.length)).toEqual(alone);

    const c = await compareWithIcl(model, {
      task: rte, templates, seeds, adapters: fewshot.adapters, training: fewshot.training, evalLimit: 16, iclShots: 4,
    });
    expect(c.costs.map((r) => r.method)).toEqual(['T-Few', 'zero-shot', 'ICL']);
    const [tfew, zero, icl] = c.costs;
    expect(icl.meanInputTokens).toBeGreaterThan(tfew.meanInputTokens * 2);
    expect(icl.inferenceFlopsPerExample).toBeGreaterThan(tfew.inferenceFlopsPerExample);
    expect(zero.inferenceFlopsPerExample).toBeCloseTo(tfew.inferenceFlopsPerExample, 0);
    expect(tfew.trainingFlops).toBeGreaterThan(0);
    expect(icl.trainingFlops).toBe(0);
    expect(tfew.diskBytes).toBe(4 * fewshot.adapters.get(42)!.data.length);
    expect(icl.diskBytes).toBeGreaterThan(0);
    expect(c.icl.runs.length).toBe(seeds.length * templates.length);

    const files = await writeReport(path.join(tmp, 'report', 'rte'), comparisonReport(c, ['tiny model']), comparisonJson(c));
    const md = fs.readFileSync(files.markdown, 'utf8');
    expect(md).toMatch(/\| rte \| T-Few \|/);
    expect(md).toMatch(/\| ICL \| \d\.\de\d+ \| 0 \|/);
    expect(fs.statSync(files.png).size).toBeGreaterThan(5000);
  });

  test('RAFT: train on a fold, classify test rows into a submission', async () => {
    const { adapter, run } = await trainAdapter(model, { task: ade, seed: 0, steps: 4, batchSize: 4 });
    expect(run.trainExamples).toBe(40);
    const test = ade.testExamples().slice(0, 12);
    const preds = await classify(model, test, { template: ade.templates()[0], adapter, labelNames: ade.labelNames });
    expect(preds.map((p) => p.id)).toEqual(test.map((e) => e.id));
    for (const p of preds) expect(ade.labelNames).toContain(p.label);
  });

  test('the tfew CLI: train, eval with a report, classify to a RAFT CSV, icl --compare, bench', async () => {
    const lines: string[] = [];
    const io = { out: (l: string) => lines.push(l), err: (l: string) => lines.push(`ERR ${l}`), interactive: false };
    const run = (...args: string[]) => main(['node', 'tfew', ...args], io);
    const m = ['--model', model.dir, '--device', 'cpu'];
    const out = path.join(tmp, 'cli');

    expect(await run('train', ...m, '--task', 'rte', '--seeds', '42,1024', '--steps', '3', '--batch-size', '4', '--templates', 'does-this-imply', '--out', path.join(out, 'rte'))).toBe(0);
    expect(fs.existsSync(path.join(out, 'rte', 'seed-1024', 'adapter_model.safetensors'))).toBe(true);
    expect(JSON.parse(fs.readFileSync(path.join(out, 'rte', 'seed-42', 'run.json'), 'utf8')).seed).toBe(42);
    expect(lines.some((l) => /^ERR rte seed 42 step 3\/3 loss/.test(l))).toBe(true);

    expect(await run('eval', ...m, '--task', 'rte', '--adapter', path.join(out, 'rte'), '--templates', 'does-this-imply', '--limit', '8', '--report', path.join(out, 'eval'))).toBe(0);
    expect(lines.some((l) => /^rte T-Few: median accuracy \d+\.\d%, IQR \d+\.\d% \(2 runs/.test(l))).toBe(true);
    expect(fs.existsSync(path.join(out, 'eval.png'))).toBe(true);

    // Classify a few RAFT test rows (a CSV with the task's columns) into RAFT's submission format.
    const input = path.join(out, 'ade-test.csv');
    const rows = getTask('ade_corpus_v2').testExamples().slice(0, 6);
    fs.writeFileSync(input, `ID,Sentence\n${rows.map((r) => `${r.id},"${String(r.fields.Sentence).replace(/"/g, '""')}"`).join('\n')}\n`);
    expect(await run('classify', ...m, '--task', 'ade_corpus_v2', '--input', input, '--out', path.join(out, 'ade.csv'))).toBe(0);
    const sub = parseCsv(fs.readFileSync(path.join(out, 'ade.csv'), 'utf8'), { columns: true }) as { ID: string; Label: string }[];
    expect(sub.map((r) => r.ID)).toEqual(rows.map((r) => r.id));
    for (const r of sub) expect(['ADE-related', 'not ADE-related']).toContain(r.Label);

    expect(await run('icl', ...m, '--task', 'rte', '--compare', '--adapter', path.join(out, 'rte'), '--templates', 'does-this-imply', '--limit', '6', '--shots', '3', '--json', path.join(out, 'icl.json'))).toBe(0);
    expect(lines.some((l) => /^ICL +\d\.\de\d+ +0 /.test(l))).toBe(true);
    expect(JSON.parse(fs.readFileSync(path.join(out, 'icl.json'), 'utf8')).costs.length).toBe(3);

    expect(await run('bench', ...m, '--task', 'rte', '--examples', '4', '--train-steps', '2', '--shots', '2')).toBe(0);
    expect(lines.some((l) => /^\| T-Few \| \d\.\de\d+ \| \d\.\de\d+ \|/m.test(l))).toBe(true);

    // Errors are one line with the error code, and a non-zero exit.
    expect(await run('eval', ...m, '--task', 'no-such-task')).toBe(1);
    expect(lines[lines.length - 1]).toMatch(/^ERR tfew: unknown task "no-such-task".*\[E_INVALID_ARGUMENT\]$/);
  });
});

describe('tfew doctor', () => {
  test('reports the addon build, CUDA probe and data directory', async () => {
    const lines: string[] = [];
    const code = await main(['node', 'tfew', 'doctor', '--json'], { out: (l) => lines.push(l), err: (l) => lines.push(l), interactive: false });
    expect(code).toBe(0);
    const info = JSON.parse(lines.join('\n'));
    expect(typeof info.addon.cudaCompiled).toBe('boolean');
    expect(typeof info.cuda.usable).toBe('boolean');
    expect(info.defaultDevice).toBe(info.cuda.usable ? 'cuda' : 'cpu');
    expect(info.dataDir.present).toBe(HAVE_DATA);
  });
});
