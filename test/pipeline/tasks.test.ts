// Readers, the few-shot sampler and the task registry. The real-data parts run against ../shared/data
// (or $TFEW_DATA_DIR) and are skipped with a message when it is absent.
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { FileFormatError, InvalidArgumentError } from '../../lib/errors';
import { readUserData } from '../../lib/tasks/custom';
import { dataAvailable, resolveDataDir, readCsv } from '../../lib/tasks/files';
import { NumpyRandomState, sampleFewShot } from '../../lib/tasks/numpy-random';
import {
  cleanHellaSwagText, listSplitSeeds, readAnli, readFewShotSplit, readHellaSwag, readRaft, readRaftInfo, readStoryCloze,
  readSuperGlue, readWinogrande,
} from '../../lib/tasks/readers';
import { createCustomTask, getTask, RAFT_TASKS, TFEW_EVAL_TASKS, TFEW_SEEDS } from '../../lib/tasks/registry';

const HAVE_DATA = dataAvailable();
if (!HAVE_DATA) {
  // eslint-disable-next-line no-console
  console.warn(`[tfew tests] no data at ${resolveDataDir()}: real-data reader and sampling tests are skipped (set TFEW_DATA_DIR)`);
}
const withData = HAVE_DATA ? test : test.skip;

describe('NumPy-compatible MT19937 (the sampler T-Few used)', () => {
  test('reproduces the reference generator: the 10000th output of seed 5489 is 4123659995', () => {
    // The check value the C++ standard gives for std::mt19937 (default seed 5489).
    const r = new NumpyRandomState(5489);
    let v = 0;
    for (let i = 0; i < 10000; i++) v = r.nextUint32();
    expect(v).toBe(4123659995);
  });

  test('interval() stays within [0, max] and shuffle() is a permutation', () => {
    const r = new NumpyRandomState(1);
    for (const max of [0, 1, 2, 7, 100, 1000]) for (let i = 0; i < 50; i++) {
      const v = r.interval(max);
      expect(v).toBeGreaterThanOrEqual(0);
      expect(v).toBeLessThanOrEqual(max);
    }
    const items = Array.from({ length: 100 }, (_, i) => i);
    const shuffled = new NumpyRandomState(42).shuffle(items.slice());
    expect([...shuffled].sort((a, b) => a - b)).toEqual(items);
    expect(shuffled).not.toEqual(items);
    expect(sampleFewShot(items, 10, 42)).toEqual(shuffled.slice(0, 10));
    // numpy's own answers (numpy.random.RandomState(seed).shuffle(list(range(n)))), without the data directory
    expect(shuffled.slice(0, 10)).toEqual([83, 53, 70, 45, 44, 39, 22, 80, 10, 0]);
    const thousand = new NumpyRandomState(7).shuffle(Array.from({ length: 1000 }, (_, i) => i));
    expect([...thousand.slice(0, 8), ...thousand.slice(-3)]).toEqual([778, 334, 271, 802, 216, 408, 812, 94, 537, 196, 175]);
    expect(new NumpyRandomState(2 ** 32 - 1).shuffle([0, 1, 2, 3, 4])).toEqual([4, 1, 0, 2, 3]);
    expect(() => new NumpyRandomState(-1)).toThrow(RangeError);
  });

  withData('draws exactly T-Few\'s Story Cloze split files from the 2016 validation set, for every seed', () => {
    // T-Few: np.random.seed(seed); np.random.shuffle(validation rows); first 70 (dataset_readers.py).
    const pool = readStoryCloze('val');
    expect(pool.length).toBe(1871);
    const seeds = listSplitSeeds('storycloze', 70);
    expect(seeds).toEqual([0, 1, 32, 42, 1024]);
    for (const seed of seeds) {
      const drawn = sampleFewShot(pool, 70, seed);
      const split = readFewShotSplit('storycloze', 70, seed);
      expect(drawn.map((e) => e.id)).toEqual(split.map((e) => e.id));
      // The split's label (HF: answer_right_ending - 1) agrees with our CSV reader's.
      expect(drawn.map((e) => e.label)).toEqual(split.map((e) => e.label));
      expect(drawn.map((e) => e.fields.idx)).toEqual(split.map((e) => e.fields.idx));
    }
  });
});

describe('readers (real data)', () => {
  withData('SuperGLUE string labels map to the HF integers T-Few\'s split files use', () => {
    // FewGLUE's train/dev32 rows share SuperGLUE train idx with some split-file rows: same text => same label.
    const textOf = (f: Record<string, unknown>) => String(f.premise ?? f.text ?? f.sentence1 ?? f.question);
    for (const task of ['rte', 'cb', 'copa', 'wic', 'wsc']) {
      const ours = new Map([...readSuperGlue(task, 'train'), ...readSuperGlue(task, 'dev32')].map((e) => [String(e.fields.idx), e]));
      let matched = 0;
      for (const seed of listSplitSeeds(task, 32)) {
        for (const s of readFewShotSplit(task, 32, seed)) {
          const o = ours.get(String(s.fields.idx));
          if (!o || textOf(o.fields) !== textOf(s.fields)) continue;
          expect(o.label).toBe(s.label);
          // (WSC span texts may differ in case: T-Few uses HF's wsc.fixed, which corrects a few spans.)
          matched++;
        }
      }
      expect(matched).toBeGreaterThan(0);
    }
  });

  withData('evaluation sets have the published sizes and label ranges', () => {
    expect(readSuperGlue('rte', 'val').length).toBe(277);
    expect(readSuperGlue('cb', 'val').length).toBe(56);
    expect(readSuperGlue('copa', 'val').length).toBe(100);
    expect(readSuperGlue('wic', 'val').length).toBe(638);
    const wsc = readSuperGlue('wsc', 'val');
    expect(wsc.length).toBe(104);
    expect(typeof wsc[0].fields.span2_text).toBe('string'); // flattened from `target`
    expect([readAnli(1, 'test').length, readAnli(2, 'test').length, readAnli(3, 'test').length]).toEqual([1000, 1000, 1200]);
    expect(readAnli(1, 'test')[0].fields.premise).toBeTruthy();
    expect(readStoryCloze('test').length).toBe(1871);
    const wino = readWinogrande();
    expect(wino.length).toBe(1267); // the trailing summary row is dropped
    expect(wino.filter((e) => e.label === 0).length).toBe(628);
    const hs = readHellaSwag();
    expect(hs.length).toBe(10042);
    const counts = [0, 1, 2, 3].map((l) => hs.filter((e) => e.label === l).length);
    expect(counts).toEqual([2515, 2485, 2584, 2458]);
    expect((hs[0].fields.endings as string[]).length).toBe(4);
  });

  withData('HellaSwag split examples get the same markup clean-up as the evaluation text', () => {
    const split = readFewShotSplit('h-swag', 20, 42);
    for (const e of split) {
      expect(String(e.fields.ctx)).not.toMatch(/\[(header|title|step|substeps)\]/);
      for (const end of e.fields.endings as string[]) expect(end).not.toMatch(/\[substeps\]/);
    }
    expect(cleanHellaSwagText('[header] How to x [title] Do y. [step] Then  z.')).toBe('How to x. Do y. Then z.');
  });

  withData('RAFT: 11 tasks, 50 labelled training rows each, label names from task.json', () => {
    for (const t of RAFT_TASKS) {
      const info = readRaftInfo(t);
      const train = readRaft(t, 'train');
      expect(train.length).toBe(50);
      for (const e of train) expect(info.labelNames[e.label]).toBeDefined();
      // Label strings in train.csv map back to themselves.
      const raw = readCsv(path.join(resolveDataDir(), 'raft', t, 'train.csv'));
      expect(train.map((e) => info.labelNames[e.label])).toEqual(raw.map((r) => r.Label));
    }
    const test = readRaft('ade_corpus_v2', 'test');
    expect(test.length).toBe(5000);
    expect(test.every((e) => e.label === -1)).toBe(true);
  });

  test('a missing file is a FileFormatError that names the data directory', () => {
    expect(() => readSuperGlue('rte', 'val', { dataDir: '/nonexistent-tfew-data' })).toThrow(FileFormatError);
    expect(() => readSuperGlue('rte', 'val', { dataDir: '/nonexistent-tfew-data' })).toThrow(/TFEW_DATA_DIR/);
  });
});

describe('task registry', () => {
  withData('T-Few tasks train on the split files and evaluate on the paper\'s evaluation sets', () => {
    for (const name of TFEW_EVAL_TASKS) {
      const task = getTask(name);
      expect(task.seeds).toEqual([...TFEW_SEEDS]);
      for (const seed of task.seeds) {
        const train = task.trainExamples(seed);
        expect(train.length).toBe(task.numShots);
        expect(train).toEqual(readFewShotSplit(name, task.numShots, seed));
      }
      const templates = task.templates();
      expect(templates.length).toBeGreaterThanOrEqual(3);
      // Every template renders the first training and evaluation example with the right number of choices.
      const first = task.evalExamples()[0];
      for (const t of templates) {
        expect(t.render(task.trainExamples(42)[0]).choices.length).toBe(task.labelNames.length);
        expect(t.render(first).choices.length).toBe(task.labelNames.length);
      }
    }
    expect(getTask('hellaswag').name).toBe('h-swag');
  });

  withData('RAFT folds: 40 training + 10 held-out rows, disjoint, the five folds cover all 50', () => {
    const task = getTask('raft/twitter_complaints');
    expect(task.kind).toBe('raft');
    const seen = new Set<string>();
    for (const fold of task.seeds) {
      const train = task.trainExamples(fold).map((e) => e.id);
      const held = task.evalExamples(fold).map((e) => e.id);
      expect(train.length).toBe(40);
      expect(held.length).toBe(10);
      expect(train.some((id) => held.includes(id))).toBe(false);
      held.forEach((id) => seen.add(id));
    }
    expect(seen.size).toBe(50);
    expect(task.trainExamples().length).toBe(50);
    expect(() => task.trainExamples(45)).toThrow(InvalidArgumentError);
    expect(getTask('banking_77').recipe).toEqual({ ulWeight: 0, lnWeight: 0, maxInputLength: 512 });
    // The RAFT prompt lists the labels and ends with the label cue.
    const r = task.templates()[0].render(task.trainExamples()[0]);
    expect(r.input[0]).toMatch(/ Possible labels: complaint, no complaint$/);
    expect(r.input[r.input.length - 1]).toMatch(/^Tweet text: [\s\S]*\nLabel:$/);
  });

  test('unknown tasks are an InvalidArgumentError listing the known ones', () => {
    expect(() => getTask('nope')).toThrow(/unknown task "nope".*rte/);
  });
});

describe('user data', () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tfew-user-'));

  test('CSV with string labels: sorted label names by default, unlabelled rows get -1', () => {
    const file = path.join(dir, 'reviews.csv');
    fs.writeFileSync(file, 'id,text,label\n1,"great, really",pos\n2,bad,neg\n3,"said ""meh""",\n4,fine,pos\n');
    const d = readUserData(file);
    expect(d.labelNames).toEqual(['neg', 'pos']);
    expect(d.examples.map((e) => [e.id, e.label])).toEqual([['1', 1], ['2', 0], ['3', -1], ['4', 1]]);
    expect(d.examples[2].fields.text).toBe('said "meh"');
    expect(d.columns).toEqual(['id', 'text', 'label']);
  });

  test('JSONL with integer labels, explicit label names and column', () => {
    const file = path.join(dir, 'data.jsonl');
    fs.writeFileSync(file, '{"q":"a","y":1}\n\n{"q":"b","y":0}\n{"q":"c","y":"yes"}\n');
    const d = readUserData(file, { labelColumn: 'y', labelNames: ['no', 'yes'] });
    expect(d.examples.map((e) => e.label)).toEqual([1, 0, 1]);
    expect(() => readUserData(file, { labelColumn: 'y', labelNames: ['x'] })).toThrow(FileFormatError);
    fs.writeFileSync(path.join(dir, 'bad.jsonl'), '{"q":1}\n[1,2]\n');
    expect(() => readUserData(path.join(dir, 'bad.jsonl'))).toThrow(/bad.jsonl:2/);
    expect(() => readUserData(path.join(dir, 'x.txt'))).toThrow(InvalidArgumentError);
  });

  test('a custom task samples k shots per seed with T-Few\'s sampler and evaluates on the rest', () => {
    const file = path.join(dir, 'many.csv');
    const rows = Array.from({ length: 40 }, (_, i) => `${i},item ${i},${i % 2 ? 'odd' : 'even'}`);
    fs.writeFileSync(file, `id,text,label\n${rows.join('\n')}\n`);
    const task = createCustomTask({ trainFile: file, numShots: 8 });
    expect(task.seeds).toEqual([...TFEW_SEEDS]);
    const pool = readUserData(file).examples;
    const train = task.trainExamples(42);
    expect(train.map((e) => e.id)).toEqual(sampleFewShot(pool, 8, 42).map((e) => e.id));
    const evalIds = task.evalExamples(42).map((e) => e.id);
    expect(evalIds.length).toBe(32);
    expect(train.some((e) => evalIds.includes(e.id))).toBe(false);
    const [t] = task.templates();
    expect(t.render(train[0]).choices).toEqual(['even', 'odd']);
    expect(t.render(train[0]).input[0]).toMatch(/^text: item \d+\nLabel:$/);
  });
});
