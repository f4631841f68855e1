// RankBatcher (lib/serve.ts): concurrent requests with different adapters gathered into mixed-task batches.
// Each request's answer must equal rankClassify of that request alone with its adapter; batches must form as
// the policy says; a bad request must fail alone; abort, back-pressure, close and dispose behave.
import { setMaxListeners } from 'events';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import {
  AbortError, classify, CudaError, DisposedError, IA3Adapter, InvalidAdapterError, InvalidArgumentError, OutOfMemoryError, QueueFullError, RankBatcher,
  T5Model,
} from '../lib';
import { buildTinyT5 } from '../lib/tiny';
import { normalFrom, seededRandom } from '../lib/random';
import { loadFixture } from './helpers/reference';

const WORDS = ['great film loved it awful boring plot superb acting terrible waste of time yes no maybe positive negative review the a was'];

function randomAdapter(model: T5Model, seed: number): IA3Adapter {
  const r = seededRandom(seed);
  const a = IA3Adapter.create(model);
  for (let i = 0; i < a.data.length; i++) a.data[i] = 1 + 0.3 * normalFrom(r);
  a.markChanged();
  return a;
}

const maxRel = (a: number[], b: number[]): number =>
  Math.max(...a.map((x, i) => Math.abs(x - b[i]) / Math.max(Math.abs(b[i]), 1e-6)));

describe('RankBatcher', () => {
  let dir: string;
  let model: T5Model;
  let adapters: (IA3Adapter | null)[];
  // requests of different lengths and choice counts, token ids and strings
  const requests: { input: string | number[]; choices: string[] | number[][] }[] = [
    { input: 'the film was great , loved it', choices: ['positive', 'negative'] },
    { input: [5, 6, 7, 1], choices: [[8, 1], [9, 10, 1], [11, 1]] },
    { input: 'awful boring plot', choices: ['yes', 'no', 'maybe'] },
    { input: [12, 13, 14, 15, 16, 17, 18, 19, 1], choices: [[4, 1], [5, 1]] },  // (the vocabulary has 25 tokens)
    { input: 'superb acting', choices: ['positive review', 'negative review'] },
    { input: [3, 1], choices: [[6, 7, 8, 1], [9, 1]] },
    { input: 'a terrible waste of time', choices: ['yes', 'no'] },
    { input: [20, 21, 22, 1], choices: [[23, 1], [24, 1], [21, 1], [3, 1]] },
    { input: 'loved the acting', choices: ['positive', 'negative'] },
    { input: [7, 7, 7, 7, 1], choices: [[10, 1], [11, 12, 1]] },
  ];

  beforeAll(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tfew-serve-'));
    buildTinyT5(dir, { words: WORDS, gated: true, seed: 7, dModel: 48, dFf: 64, numHeads: 4, dKv: 12, numLayers: 2 });
    model = await T5Model.load(dir, { device: 'cpu', threads: 2 });
    const a = randomAdapter(model, 1), b = randomAdapter(model, 2), c = randomAdapter(model, 3);
    adapters = [a, null, b, c, a, b, null, c, a, b];
  });
  afterAll(async () => {
    await model?.dispose();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  // what each request gets alone, with its adapter
  const alone = async (i: number) =>
    model.rankClassify([requests[i].input] as string[] | number[][], [requests[i].choices], { adapter: adapters[i] });

  test('concurrent requests with mixed adapters: batches of maxBatch, each answer equal to the request alone', async () => {
    const batcher = new RankBatcher(model, { maxBatch: 4, maxDelayMs: 5 });
    const answers = await Promise.all(requests.map((r, i) => batcher.classify(r.input, r.choices, { adapter: adapters[i] })));
    const stats = batcher.stats;
    expect(stats).toMatchObject({ requests: 10, batches: 3, batchedExamples: 10, largestBatch: 4, isolatedBatches: 0 });
    // (the later batches' requests waited for the batches before them)
    expect(stats.maxWaitMs).toBeGreaterThan(0);
    expect(stats.maxWaitMs).toBeGreaterThanOrEqual(stats.meanWaitMs);
    expect(stats.meanBatchMs).toBeGreaterThan(0);
    expect(stats.lastBatchMs).toBeGreaterThan(0);
    for (let i = 0; i < requests.length; i++) {
      const want = await alone(i);
      expect(answers[i].prediction).toBe(want.predictions[0]);
      expect(maxRel(answers[i].logProbs, want.logProbs[0])).toBeLessThan(1e-5);
      expect(maxRel(answers[i].scores, want.scores[0])).toBeLessThan(1e-5);
      expect(answers[i].scores).toHaveLength(requests[i].choices.length);
    }
    // the adapters matter: request 0 without its adapter scores differently (so a mix-up would be caught)
    const bare = await model.rankClassify([requests[0].input] as string[], [requests[0].choices]);
    expect(maxRel(answers[0].logProbs, bare.logProbs[0])).toBeGreaterThan(1e-3);
    await batcher.close();
  });

  test('requests that arrive while a batch runs go together in the next one', async () => {
    const batcher = new RankBatcher(model, { maxBatch: 32, maxDelayMs: 0 });
    const first = batcher.classify(requests[0].input, requests[0].choices, { adapter: adapters[0] });
    await new Promise((r) => setTimeout(r, 2));  // the first batch (one request) has been sent
    const rest = requests.slice(1).map((r, i) => batcher.classify(r.input, r.choices, { adapter: adapters[i + 1] }));
    expect(batcher.pending).toBe(9);
    const answers = await Promise.all([first, ...rest]);
    expect(batcher.stats.batches).toBe(2);
    expect(batcher.stats.largestBatch).toBe(9);
    for (const i of [0, 5, 9]) expect(maxRel(answers[i].logProbs, (await alone(i)).logProbs[0])).toBeLessThan(1e-5);
  });

  // A backlog of 48 requests, short (4-6 tokens) and long (20-24) inputs interleaved, all waiting at the first
  // dispatch, in batches of 8; each engine call recorded (which requests, in which order). Two shapes of service:
  // one task (two choices each), and two tasks interleaved (a short one of 3 choices, a long one of 2).
  const backlogOf = (twoTasks: boolean) => Array.from({ length: 48 }, (_, i) => {
    const len = [4, 24, 6, 20, 5, 22][i % 6];
    const ids = [2 + (i % 23), 2 + Math.floor(i / 23)];  // (the first two tokens name the request)
    while (ids.length < len - 1) ids.push(3 + ((i + ids.length) % 20));
    ids.push(1);
    return { ids, choices: twoTasks && len < 10 ? [[6, 1], [7, 1], [8, 1]] : [[4, 1], [5, 1]] };
  });
  type Backlog = ReturnType<typeof backlogOf>;
  async function runBacklog(backlog: Backlog, groupByLength: boolean) {
    const byName = new Map(backlog.map((r, i) => [`${r.ids[0]},${r.ids[1]}`, i]));
    const original = model.rankClassify.bind(model);
    const calls: number[][] = [];
    const spy = jest.spyOn(model, 'rankClassify').mockImplementation((inputs, choices, options) => {
      calls.push((inputs as number[][]).map((ids) => byName.get(`${ids[0]},${ids[1]}`)!));
      return original(inputs, choices, options);
    });
    try {
      const batcher = new RankBatcher(model, { maxBatch: 8, maxDelayMs: 5, groupByLength });
      const answers = await Promise.all(backlog.map((r, i) => batcher.classify(r.ids, r.choices, { adapter: adapters[i % adapters.length] })));
      return { calls, answers, grouped: batcher.stats.groupedBatches };
    } finally {
      spy.mockRestore();
    }
  }
  // what a batch costs the encoder (every example at the longest input's length), and its numbers of choices
  const paddedTokens = (backlog: Backlog, calls: number[][]) =>
    calls.reduce((t, c) => t + c.length * Math.max(...c.map((i) => backlog[i].ids.length)), 0);
  const mixedChoices = (backlog: Backlog, calls: number[][]) =>
    calls.filter((c) => new Set(c.map((i) => backlog[i].choices.length)).size > 1).length;

  test.each([['one task', false], ['two tasks', true]] as const)(
    'under a backlog (%s), batches group like requests: the oldest always next, none passed over more than twice', async (_, twoTasks) => {
      const backlog = backlogOf(twoTasks);
      const { calls, answers, grouped } = await runBacklog(backlog, true);
      const fifo = await runBacklog(backlog, false);
      expect(calls).toHaveLength(6);
      expect(grouped).toBe(5);  // (the last batch takes what is left)
      expect(fifo.grouped).toBe(0);
      // in arrival order: each batch the next 8
      expect(fifo.calls).toEqual([0, 1, 2, 3, 4, 5].map((b) => Array.from({ length: 8 }, (__, k) => 8 * b + k)));
      // Replaying the policy's promises: each batch holds the oldest request not yet sent, takes only from the oldest
      // 16 (2 x maxBatch), and passes over no request a third time.
      const unsent = backlog.map((__, i) => i);
      const passedOver = new Array<number>(backlog.length).fill(0);
      for (const call of calls) {
        expect(call).toContain(unsent[0]);
        const window = unsent.slice(0, 16);
        for (const i of call) expect(window).toContain(i);
        for (const i of window) if (!call.includes(i)) passedOver[i]++;
        for (const i of call) unsent.splice(unsent.indexOf(i), 1);
      }
      expect(unsent).toEqual([]);
      expect(Math.max(...passedOver)).toBeLessThanOrEqual(2);
      // and what grouping is for: fewer padded encoder tokens (in arrival order every batch runs at 20-24 tokens),
      // and, with two tasks, batches of one number of choices
      expect(paddedTokens(backlog, calls)).toBeLessThan(0.75 * paddedTokens(backlog, fifo.calls));
      if (twoTasks) {
        expect(mixedChoices(backlog, fifo.calls)).toBe(6);
        expect(mixedChoices(backlog, calls)).toBe(0);
      }
      // each answer as the request alone (and as in arrival order)
      for (const i of [0, 7, 13, 30, 47]) {
        const want = await model.rankClassify([backlog[i].ids], [backlog[i].choices], { adapter: adapters[i % adapters.length] });
        expect(answers[i].prediction).toBe(want.predictions[0]);
        expect(maxRel(answers[i].scores, want.scores[0])).toBeLessThan(1e-5);
      }
      answers.forEach((a, i) => expect(maxRel(a.scores, fifo.answers[i].scores)).toBeLessThan(1e-5));
    });

  test('grouping on replicas: each replica\'s batches are chosen by shape, every request sent once, answers as alone', async () => {
    const backlog = backlogOf(true);
    const byName = new Map(backlog.map((r, i) => [`${r.ids[0]},${r.ids[1]}`, i]));
    const second = await T5Model.load(dir, { device: 'cpu', threads: 1 });
    const calls: { replica: number; members: number[] }[] = [];
    const spies = [model, second].map((m, replica) => {
      const original = m.rankClassify.bind(m);
      return jest.spyOn(m, 'rankClassify').mockImplementation((inputs, choices, options) => {
        calls.push({ replica, members: (inputs as number[][]).map((ids) => byName.get(`${ids[0]},${ids[1]}`)!) });
        return original(inputs, choices, options);
      });
    });
    try {
      const batcher = new RankBatcher([model, second], { maxBatch: 8, maxDelayMs: 5 });
      const answers = await Promise.all(backlog.map((r, i) => batcher.classify(r.ids, r.choices, { adapter: adapters[i % adapters.length] })));
      await batcher.close();
      // both replicas ran batches, and grouped ones
      expect(new Set(calls.map((c) => c.replica))).toEqual(new Set([0, 1]));
      expect(batcher.stats.groupedBatches).toBeGreaterThanOrEqual(4);
      // every request sent once; each batch (in the order sent) holds the oldest request not yet sent
      const sent = calls.flatMap((c) => c.members);
      expect([...sent].sort((a, b) => a - b)).toEqual(backlog.map((_, i) => i));
      const unsent = backlog.map((_, i) => i);
      for (const { members } of calls) {
        expect(members).toContain(unsent[0]);
        for (const i of members) unsent.splice(unsent.indexOf(i), 1);
      }
      // grouped on either replica: no batch mixes numbers of choices (in arrival order all 6 of 6 do), and fewer
      // padded encoder tokens than batches of 8 in arrival order
      expect(mixedChoices(backlog, calls.map((c) => c.members))).toBe(0);
      const fifoCalls = [0, 1, 2, 3, 4, 5].map((b) => Array.from({ length: 8 }, (__, k) => 8 * b + k));
      expect(paddedTokens(backlog, calls.map((c) => c.members))).toBeLessThan(0.75 * paddedTokens(backlog, fifoCalls));
      for (const i of [0, 7, 13, 30, 47]) {
        const want = await model.rankClassify([backlog[i].ids], [backlog[i].choices], { adapter: adapters[i % adapters.length] });
        expect(maxRel(answers[i].scores, want.scores[0])).toBeLessThan(1e-5);
      }
    } finally {
      spies.forEach((sp) => sp.mockRestore());
      await second.dispose();
    }
  });

  test('bad requests are refused when they arrive, with typed errors, and cost no engine call', async () => {
    const otherModel = await T5Model.load(loadFixture('tiny-relu-tied').dir, { device: 'cpu', threads: 1 });
    const foreign = IA3Adapter.create(otherModel);  // another architecture's vector layout
    await otherModel.dispose();
    const batcher = new RankBatcher(model, { maxBatch: 8, maxDelayMs: 5, maxInputLength: 16, maxChoices: 3, maxChoiceLength: 4 });
    const good = [0, 1, 2].map((i) => batcher.classify(requests[i].input, requests[i].choices, { adapter: adapters[i] }));
    const refused = [
      batcher.classify([5, 100000, 1], [[4, 1], [5, 1]]),                       // unknown token id
      batcher.classify([5, 1.5, 1], [[4, 1]]),                                  // not an integer
      batcher.classify(requests[3].input, requests[3].choices, { adapter: foreign }),
      batcher.classify([...new Array(20).fill(5), 1], [[4, 1]]),               // ids beyond maxInputLength
      batcher.classify([5, 1], [[4, 1], [5, 1], [6, 1], [7, 1]]),               // more than maxChoices
      batcher.classify([5, 1], [[4, 5, 6, 7, 8, 1]]),                            // a choice beyond maxChoiceLength
      batcher.classify([5, 1], [[]]),                                           // an empty choice
      batcher.classify([5, 1], [[4, 1]], { signal: {} as AbortSignal }),
      batcher.classify([5, 1], [[4, 1]], null as unknown as undefined),        // (null options are fine: below)
    ];
    for (const [i, r] of refused.slice(0, 8).entries()) {
      await expect(r).rejects.toBeInstanceOf(i === 2 ? InvalidAdapterError : InvalidArgumentError);
    }
    await expect(refused[8]).resolves.toMatchObject({ scores: [expect.any(Number)] });
    // text is truncated to maxInputLength, not refused
    await expect(batcher.classify('great film '.repeat(40), ['yes', 'no'])).resolves.toMatchObject({ prediction: expect.any(Number) });
    const answers = await Promise.all(good);
    for (let i = 0; i < 3; i++) expect(maxRel(answers[i].logProbs, (await alone(i)).logProbs[0])).toBeLessThan(1e-5);
    expect(batcher.stats.isolatedBatches).toBe(0);
    expect(batcher.stats.batchedExamples).toBe(5);  // the 3 good ones, the null-options one, the text
  });

  test('a request the engine rejects (out of memory) fails alone; its batch-mates are answered', async () => {
    const batcher = new RankBatcher(model, { maxBatch: 8, maxDelayMs: 5, maxInputLength: 400000 });
    const good = [0, 1, 2].map((i) => batcher.classify(requests[i].input, requests[i].choices, { adapter: adapters[i] }));
    // 300,000 token ids pass the batcher's checks here, and need more memory than there is (a fast, typed failure)
    const tooLong = batcher.classify([...new Array(300000).fill(5), 1], [[4, 1], [5, 1]]);
    await expect(tooLong).rejects.toBeInstanceOf(OutOfMemoryError);
    const answers = await Promise.all(good);
    for (let i = 0; i < 3; i++) expect(maxRel(answers[i].logProbs, (await alone(i)).logProbs[0])).toBeLessThan(1e-5);
    expect(batcher.stats).toMatchObject({ batches: 1, isolatedBatches: 1 });
  });

  test('10,000 requests, half of them aborted while queued: the rest answered, the aborts cheap', async () => {
    const batcher = new RankBatcher(model, { maxBatch: 64, maxDelayMs: 0, maxQueue: 20000 });
    const ctl = new AbortController();
    setMaxListeners(20000, ctl.signal);  // (one listener per request)
    const all = Array.from({ length: 10000 }, (_, i) =>
      batcher.classify([3 + (i % 20), 1], [[4, 1], [5, 1]], i % 2 ? { signal: ctl.signal } : {}));
    const t0 = Date.now();
    ctl.abort();
    expect(Date.now() - t0).toBeLessThan(500);
    const settled = await Promise.allSettled(all);
    expect(settled.filter((s, i) => i % 2 === 1 && s.status === 'rejected' && s.reason instanceof AbortError)).toHaveLength(5000);
    expect(settled.filter((s, i) => i % 2 === 0 && s.status === 'fulfilled')).toHaveLength(5000);
    expect(batcher.stats.batchedExamples).toBe(5000);
    expect(batcher.pending).toBe(0);
  });

  test('thousands of requests aborted while few wait: their entries are swept out of the queue', async () => {
    const batcher = new RankBatcher(model, { maxBatch: 8, maxDelayMs: 50, maxQueue: 10000 });
    const ctl = new AbortController();
    setMaxListeners(5000, ctl.signal);
    const kept = Array.from({ length: 5 }, (_, i) => batcher.classify(requests[i].input, requests[i].choices));
    const dropped = Array.from({ length: 3000 }, () => batcher.classify([5, 6, 1], [[4, 1]], { signal: ctl.signal }));
    ctl.abort();
    const internal = batcher as unknown as { queue: unknown[]; head: number };
    expect(internal.queue.length - internal.head).toBeLessThan(1100);  // swept (it holds 5 waiting + < 1025 aborted)
    expect(batcher.pending).toBe(5);
    expect((await Promise.allSettled(dropped)).every((r) => r.status === 'rejected')).toBe(true);
    expect((await Promise.all(kept)).length).toBe(5);
    expect(batcher.stats.batchedExamples).toBe(5);
    expect(batcher.pending).toBe(0);
  });

  test('abort while queued: AbortError, and the request is not sent', async () => {
    const batcher = new RankBatcher(model, { maxBatch: 8, maxDelayMs: 20 });
    const ctl = new AbortController();
    const kept = batcher.classify(requests[0].input, requests[0].choices);
    const aborted = batcher.classify(requests[1].input, requests[1].choices, { signal: ctl.signal });
    ctl.abort();
    await expect(aborted).rejects.toBeInstanceOf(AbortError);
    await kept;
    expect(batcher.stats.batchedExamples).toBe(1);
    const already = new AbortController();
    already.abort();
    await expect(batcher.classify(requests[0].input, requests[0].choices, { signal: already.signal })).rejects.toBeInstanceOf(AbortError);
  });

  test('a backlog grouped by shape with aborts behind the head: each aborted request rejects and is never sent, the rest are answered', async () => {
    const backlog = backlogOf(true);
    const byName = new Map(backlog.map((r, i) => [`${r.ids[0]},${r.ids[1]}`, i]));
    const original = model.rankClassify.bind(model);
    const sent: number[] = [];
    let release!: () => void;
    const gate = new Promise<void>((r) => { release = r; });
    let firstSent!: () => void;
    const first = new Promise<void>((r) => { firstSent = r; });
    const spy = jest.spyOn(model, 'rankClassify').mockImplementation(async (inputs, choices, options) => {
      sent.push(...(inputs as number[][]).map((ids) => byName.get(`${ids[0]},${ids[1]}`)!));
      firstSent();
      await gate;  // (the first batch runs until the aborts below are made)
      return original(inputs, choices, options);
    });
    try {
      const batcher = new RankBatcher(model, { maxBatch: 8, maxDelayMs: 5 });
      const controllers = backlog.map(() => new AbortController());
      const answers = backlog.map((r, i) => batcher.classify(r.ids, r.choices, { signal: controllers[i].signal }));
      // while the first batch (chosen by shape from the oldest 16) runs, abort every third request that waits: some
      // among the entries it took from behind the queue's head, some after them
      await first;
      expect(batcher.stats.groupedBatches).toBe(1);
      const abortedIds = backlog.map((_, i) => i).filter((i) => i % 3 === 1 && !sent.includes(i));
      expect(abortedIds.length).toBeGreaterThan(8);
      for (const i of abortedIds) controllers[i].abort();
      release();
      const settled = await Promise.allSettled(answers);
      for (const [i, s] of settled.entries()) {
        if (abortedIds.includes(i)) {
          expect([i, s.status, s.status === 'rejected' && s.reason instanceof AbortError]).toEqual([i, 'rejected', true]);
          expect(sent).not.toContain(i);
        } else {
          expect([i, s.status]).toEqual([i, 'fulfilled']);
        }
      }
      expect(new Set(sent).size).toBe(sent.length);  // none sent twice
      expect(sent.length).toBe(backlog.length - abortedIds.length);
      expect(batcher.pending).toBe(0);
      expect((batcher as unknown as { abortedInQueue: number }).abortedInQueue).toBe(0);
      await batcher.close();
    } finally {
      spy.mockRestore();
    }
  });

  test('back-pressure: beyond maxQueue waiting requests, QueueFullError', async () => {
    const batcher = new RankBatcher(model, { maxBatch: 2, maxQueue: 3, maxDelayMs: 50 });
    const accepted = [0, 1, 2].map((i) => batcher.classify(requests[i].input, requests[i].choices));
    const refused = batcher.classify(requests[3].input, requests[3].choices);
    await expect(refused).rejects.toBeInstanceOf(QueueFullError);
    await expect(refused).rejects.toMatchObject({ code: 'E_QUEUE_FULL' });
    expect((await Promise.all(accepted)).length).toBe(3);
  });

  test('close() answers what was accepted, then refuses; a disposed model rejects with DisposedError', async () => {
    const batcher = new RankBatcher(model, { maxBatch: 4, maxDelayMs: 1000 });
    const accepted = [0, 1, 2].map((i) => batcher.classify(requests[i].input, requests[i].choices, { adapter: adapters[i] }));
    const t0 = Date.now();
    await batcher.close();  // sends the waiting requests at once (not after maxDelayMs)
    expect(Date.now() - t0).toBeLessThan(900);
    expect((await Promise.all(accepted)).map((r) => r.scores.length)).toEqual([2, 3, 3]);
    await expect(batcher.classify(requests[0].input, requests[0].choices)).rejects.toBeInstanceOf(DisposedError);

    const own = await T5Model.load(dir, { device: 'cpu', threads: 1 });
    const b2 = new RankBatcher(own, { maxDelayMs: 20 });
    const queued = b2.classify(requests[0].input, requests[0].choices);
    await own.dispose();  // disposed before the batch is sent
    await expect(queued).rejects.toBeInstanceOf(DisposedError);
    await expect(b2.classify(requests[0].input, requests[0].choices)).rejects.toBeInstanceOf(DisposedError);
    // and the shared model still serves a batcher afterwards
    expect((await new RankBatcher(model).classify(requests[0].input, requests[0].choices)).scores).toHaveLength(2);
  });

  test('replicas (the same model loaded twice, as on two GPUs): batches run on both at once, answers as alone', async () => {
    const replicas = [await T5Model.load(dir, { device: 'cpu', threads: 1 }), await T5Model.load(dir, { device: 'cpu', threads: 1 })];
    try {
      let inFlight = 0, most = 0;
      for (const m of replicas) {
        const call = m.rankClassify.bind(m);
        jest.spyOn(m, 'rankClassify').mockImplementation(async (...args: Parameters<T5Model['rankClassify']>) => {
          most = Math.max(most, ++inFlight);
          try {
            return await call(...args);
          } finally {
            inFlight--;
          }
        });
      }
      const batcher = new RankBatcher(replicas, { maxBatch: 2, maxDelayMs: 5 });
      const answers = await Promise.all(requests.map((r, i) => batcher.classify(r.input, r.choices, { adapter: adapters[i] })));
      const stats = batcher.stats;
      expect(stats).toMatchObject({ requests: 10, batches: 5, batchedExamples: 10, largestBatch: 2 });
      expect(stats.replicas.map((r) => r.batches).reduce((a, b) => a + b)).toBe(5);
      expect(Math.min(...stats.replicas.map((r) => r.batches))).toBeGreaterThan(0);  // both worked
      expect(most).toBe(2);  // at the same time
      expect(stats.replicas.every((r) => !r.busy)).toBe(true);
      for (let i = 0; i < requests.length; i++) {
        const want = await alone(i);
        expect(answers[i].prediction).toBe(want.predictions[0]);
        expect(maxRel(answers[i].logProbs, want.logProbs[0])).toBeLessThan(1e-5);
      }
      // a replica disposed: the other serves on; both disposed: DisposedError, now and for what was queued
      await replicas[0].dispose();
      const more = await Promise.all(requests.slice(0, 4).map((r, i) => batcher.classify(r.input, r.choices, { adapter: adapters[i] })));
      for (let i = 0; i < 4; i++) expect(maxRel(more[i].logProbs, answers[i].logProbs)).toBeLessThan(1e-6);
      const slow = new RankBatcher(replicas, { maxDelayMs: 50 });
      const queued = slow.classify(requests[0].input, requests[0].choices);
      await replicas[1].dispose();
      await expect(queued).rejects.toBeInstanceOf(DisposedError);
      await expect(batcher.classify(requests[0].input, requests[0].choices)).rejects.toBeInstanceOf(DisposedError);
      await slow.close();
      await batcher.close();
    } finally {
      for (const m of replicas) await m.dispose();
    }
  });

  test('a burst is shared evenly among idle replicas (10 requests on two: 5 + 5, not 8 + 2)', async () => {
    const second = await T5Model.load(dir, { device: 'cpu', threads: 1 });
    try {
      const batcher = new RankBatcher([model, second], { maxBatch: 8, maxDelayMs: 5 });
      const answers = await Promise.all(requests.map((r, i) => batcher.classify(r.input, r.choices, { adapter: adapters[i] })));
      expect(batcher.stats).toMatchObject({ batches: 2, largestBatch: 5 });
      expect(batcher.stats.replicas.map((r) => r.batches)).toEqual([1, 1]);
      for (const i of [0, 4, 9]) expect(maxRel(answers[i].logProbs, (await alone(i)).logProbs[0])).toBeLessThan(1e-5);
      await batcher.close();
    } finally {
      await second.dispose();
    }
  });

  test('close() after every queued request was aborted resolves (one model and replicas)', async () => {
    const second = await T5Model.load(dir, { device: 'cpu', threads: 1 });
    try {
      for (const target of [model, [model, second]]) {
        const batcher = new RankBatcher(target, { maxDelayMs: 1000 });
        const controllers = [0, 1, 2].map(() => new AbortController());
        const queued = controllers.map((c, i) => batcher.classify(requests[i].input, requests[i].choices, { signal: c.signal }));
        const closed = batcher.close();
        controllers.forEach((c) => c.abort());  // (before the batch goes)
        for (const q of queued) await expect(q).rejects.toBeInstanceOf(AbortError);
        await closed;
        expect(batcher.stats.batches).toBe(0);
      }
    } finally {
      await second.dispose();
    }
  });

  test('a replica whose engine fails: its batches go to the other, and after three in a row it leaves the rotation', async () => {
    const healthy = await T5Model.load(dir, { device: 'cpu', threads: 1 });
    const broken = await T5Model.load(dir, { device: 'cpu', threads: 1 });
    try {
      jest.spyOn(broken, 'rankClassify').mockImplementation(async () => {
        throw new CudaError('an illegal memory access was encountered (the GPU context is lost)');
      });
      const batcher = new RankBatcher([broken, healthy], { maxBatch: 1, maxDelayMs: 1 });
      const answers = await Promise.all(requests.map((r, i) => batcher.classify(r.input, r.choices, { adapter: adapters[i] })));
      for (let i = 0; i < requests.length; i++) expect(maxRel(answers[i].logProbs, (await alone(i)).logProbs[0])).toBeLessThan(1e-5);
      const [b, h] = batcher.stats.replicas;
      expect(b).toMatchObject({ retired: true, failures: 3, batches: 3 });  // then out of the rotation
      expect(h.batches).toBe(requests.length + 0);
      // with no other replica left in rotation the broken one comes back, and its errors reach the callers
      await healthy.dispose();
      await expect(batcher.classify(requests[0].input, requests[0].choices)).rejects.toBeInstanceOf(CudaError);
      await batcher.close();
    } finally {
      await healthy.dispose();
      await broken.dispose();
    }
  });

  test('replicas must be distinct copies of one model: the same weights, merged adapter and backend', async () => {
    const other = await T5Model.load(loadFixture('tiny-relu-tied').dir, { device: 'cpu', threads: 1 });
    // the same architecture: a copy of the checkpoint with one weight changed, and the checkpoint with an adapter merged
    const copy = fs.mkdtempSync(path.join(os.tmpdir(), 'tfew-serve-copy-'));
    buildTinyT5(copy, { words: WORDS, gated: true, seed: 8, dModel: 48, dFf: 64, numHeads: 4, dKv: 12, numLayers: 2 });
    const reseeded = await T5Model.load(copy, { device: 'cpu', threads: 1 });
    const merged = await model.withMergedAdapter(randomAdapter(model, 5));
    const twin = await T5Model.load(dir, { device: 'cpu', threads: 1 });
    try {
      expect(() => new RankBatcher([model, other])).toThrow(/model 1 is not one of model 0 \(their configs differ\)/);
      expect(() => new RankBatcher([model, reseeded])).toThrow(/their weights differ/);
      expect(() => new RankBatcher([model, twin, merged])).toThrow(/model 2 is not one of model 0 \(they have different adapters merged/);
      expect(() => new RankBatcher([model, model])).toThrow(/distinct/);
      expect(() => new RankBatcher([])).toThrow(InvalidArgumentError);
      // the same checkpoint loaded twice (threads may differ, or through a symbolic link) is a replica; so are two
      // models with the same adapter merged
      expect(model.replicaMismatch(twin)).toBeNull();
      expect(model.precision).toBe('fp32');
      const link = `${copy}-link`;
      fs.symlinkSync(dir, link);
      const linked = await T5Model.load(link, { device: 'cpu', threads: 1 });
      try {
        expect(model.replicaMismatch(linked)).toBeNull();
      } finally {
        await linked.dispose();
        fs.rmSync(link);
      }
      const mergedTwin = await twin.withMergedAdapter(randomAdapter(model, 5));
      try {
        expect(merged.replicaMismatch(mergedTwin)).toBeNull();
      } finally {
        await mergedTwin.dispose();
      }
      await new RankBatcher([model, twin]).close();
      // three replicas on libuv's default 4 threads: a warning (once) that says how many to set
      const saved = process.env.UV_THREADPOOL_SIZE;
      const warn = jest.spyOn(process, 'emitWarning').mockImplementation(() => undefined);
      const third = await T5Model.load(dir, { device: 'cpu', threads: 1 });
      try {
        process.env.UV_THREADPOOL_SIZE = '7';
        await new RankBatcher([model, twin, third]).close();
        expect(warn).not.toHaveBeenCalled();
        delete process.env.UV_THREADPOOL_SIZE;
        await new RankBatcher([model, twin, third]).close();
        await new RankBatcher([model, twin, third]).close();
        expect(warn).toHaveBeenCalledTimes(1);
        expect(String(warn.mock.calls[0][0])).toMatch(/RankBatcher: 3 replicas share libuv's 4 threads.*UV_THREADPOOL_SIZE=7/);
      } finally {
        warn.mockRestore();
        if (saved === undefined) delete process.env.UV_THREADPOOL_SIZE; else process.env.UV_THREADPOOL_SIZE = saved;
        await third.dispose();
      }
      // evaluate() and classify() share their runs out among replicas: the same check
      await expect(classify([model, reseeded], [], {} as never)).rejects.toThrow(/classify\(\) replicas must be copies of one model.*weights differ/);
    } finally {
      for (const m of [other, reseeded, merged, twin]) await m.dispose();
      fs.rmSync(copy, { recursive: true, force: true });
    }
  });

  test('options are checked', () => {
    expect(() => new RankBatcher(model, { maxBatch: 0 })).toThrow(InvalidArgumentError);
    expect(() => new RankBatcher(model, { maxQueue: 1.5 })).toThrow(InvalidArgumentError);
    expect(() => new RankBatcher(model, { maxDelayMs: -1 })).toThrow(InvalidArgumentError);
    expect(() => new RankBatcher(model, { maxDelayMs: 2 ** 40 })).toThrow(InvalidArgumentError);
    expect(() => new RankBatcher(model, { maxInputLength: 0 })).toThrow(InvalidArgumentError);
    expect(() => new RankBatcher(model, { lengthNormalize: 'no' as unknown as boolean })).toThrow(InvalidArgumentError);
    expect(() => new RankBatcher(model, { maxChoices: 0 })).toThrow(InvalidArgumentError);
    expect(() => new RankBatcher(undefined as unknown as T5Model)).toThrow(InvalidArgumentError);
    expect(() => new RankBatcher(model, { reserveMemory: 1 as unknown as boolean })).toThrow(/reserveMemory must be a boolean/);
    expect(() => new RankBatcher(model, { maxAdapters: 0 })).toThrow(/maxAdapters must be an integer >= 1/);
    expect(() => new RankBatcher(model, { groupByLength: 'yes' as unknown as boolean })).toThrow(/groupByLength must be a boolean/);
  });

  test('reserveMemory: nothing to reserve on the CPU backend (CUDA: test/gpu/cuda-reserve)', async () => {
    const reserve = jest.spyOn(model, 'reserveMemory');
    const batcher = new RankBatcher(model, { maxDelayMs: 0 });
    try {
      await batcher.classify('the plot was superb', ['good', 'bad']);
      expect(reserve).not.toHaveBeenCalled();
      expect(batcher.stats.reservations).toEqual({ made: 0, failed: 0 });
    } finally {
      reserve.mockRestore();
      await batcher.close();
    }
  });

  test('reserveMemory on a CUDA model: a reservation that fails for any reason is counted once and the requests are answered', async () => {
    // (the CPU model plays a CUDA one whose reservation is refused: the engine's limits, not out of memory)
    Object.defineProperty(model, 'device', { value: 'cuda', configurable: true });
    const reserve = jest.spyOn(model, 'reserveMemory').mockRejectedValue(new InvalidArgumentError('reserveMemory: inputLength 4194304 is over 1048576'));
    const batcher = new RankBatcher(model, { maxDelayMs: 0, maxAdapters: 3 });
    try {
      const expected = await model.rankClassify(['the plot was superb'], [['good', 'bad']], { adapter: [adapters[0]] });
      for (let i = 0; i < 2; i++) {
        expect((await batcher.classify('the plot was superb', ['good', 'bad'], { adapter: adapters[0] })).scores).toEqual(expected.scores[0]);
      }
      expect(reserve).toHaveBeenCalledTimes(1);
      expect(reserve).toHaveBeenCalledWith(expect.objectContaining({ batchSize: 32, inputLength: 256, choices: 2, adapters: 3 }));
      expect(batcher.stats.reservations).toEqual({ made: 0, failed: 1, lastError: 'reserveMemory: inputLength 4194304 is over 1048576' });
    } finally {
      Object.defineProperty(model, 'device', { value: 'cpu', configurable: true });
      reserve.mockRestore();
      await batcher.close();
    }
  });
});
