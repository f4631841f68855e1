// CUDA graphs and their shape buckets (cuda.graphBuckets): small rank-classification calls run padded up to a
// grid of lengths, so that calls of similar lengths replay one graph; the results stay those of the exact
// shape. Read through T5Model.graphStats(). Skipped when CUDA is not usable.
import { graphBucketLengths, IA3Adapter, T5Model } from '../../lib';
import { mulberry32 } from '../../benchmarks/random-t5';
import { loadFixture, maxRelError, relError } from '../helpers/reference';
import { argmaxRows, bf16Tolerance, clearWinners, describeCuda, loadCuda, Precision, randomCheckpoint } from './helpers';

jest.setTimeout(300_000);

/** The engine's encoder-length grid (model/graph_buckets.h graph_bucket_length), written out independently. */
function bucket(len: number): number {
  const grid = [8, 16, 24, 32, 40, 48, 56, 64, 72, 80, 88, 96, 104, 112, 120, 128, 144, 160, 176, 192, 208, 224, 240, 256, 288, 320];
  const b = grid.find((g) => g >= len);
  if (b === undefined) throw new Error(`no bucket listed for ${len}`);
  return b;
}

describeCuda('CUDA graphs with shape buckets', () => {
  const fx = loadFixture('tiny-gated-gelu-untied');
  const rand = mulberry32(77);
  const tokens = (n: number): number[] => [...Array.from({ length: n - 1 }, () => 2 + Math.floor(rand() * 120)), 1];
  const choices = [[5, 9, 11, 13, 1], [7, 1]]; // decoder length 5: bucket 8 (rows of 5 and 2 tokens)
  let bucketed: T5Model;
  let exact: T5Model;

  beforeAll(async () => {
    bucketed = await loadCuda(fx.dir, 'fp32');
    exact = await loadCuda(fx.dir, 'fp32', {}, { graphBuckets: false });
  });
  afterAll(async () => {
    await bucketed?.dispose();
    await exact?.dispose();
  });

  test('describe() and graphStats() say how graphs run', () => {
    // (a failed capture turns graphs off and describe() says why: every test below depends on graphs)
    expect(`${bucketed.graphStats().enabled}: ${bucketed.describe()}`).toMatch(/^true: /);
    expect(bucketed.describe()).toMatch(/CUDA graphs on \(small calls padded to shape buckets\)/);
    expect(exact.describe()).toMatch(/CUDA graphs on \(exact shapes\)/);
    expect(bucketed.graphStats()).toMatchObject({ enabled: true, offReason: '', buckets: true, replays: 0, captures: 0, eager: 0, cached: 0, last: null });
    expect(exact.graphStats()).toMatchObject({ enabled: true, buckets: false });
  });

  test('graphs off: graphStats() says why from the start, and warmUpGraphs warms nothing', async () => {
    const off = await loadCuda(fx.dir, 'fp32', {}, { graphs: false });
    try {
      expect(off.graphStats()).toMatchObject({ enabled: false, offReason: expect.stringMatching(/^off \(/), buckets: false });
      expect(await off.warmUpGraphs([{ inputLength: 40, choiceLengths: [2, 2] }])).toBe(0);
      expect(off.graphStats()).toMatchObject({ eager: 0, captures: 0 });
    } finally {
      await off.dispose();
    }
  });

  test('single-example calls of similar lengths share one graph and give the exact-shape results', async () => {
    const lengths = [34, 39, 36, 40, 33];  // all in the bucket of 40
    const launches: string[] = [];
    for (const n of lengths) {
      const input = [tokens(n)];
      const a = await bucketed.rankClassify(input, [choices]);
      const s = bucketed.graphStats();
      launches.push(s.last!.launch);
      expect(s.last).toMatchObject({ kind: 'score', batch: 1, encLen: bucket(n), rows: 2, decLen: 8 });
      const b = await exact.rankClassify(input, [choices]);
      expect(exact.graphStats().last).toMatchObject({ kind: 'score', batch: 1, encLen: n, rows: 2, decLen: 5, launch: 'eager' });
      expect(maxRelError(a.logProbs.flat(), b.logProbs.flat())).toBeLessThan(1e-5);
      expect(a.predictions).toEqual(b.predictions);
    }
    // the first call of the bucket runs eagerly, the second captures its graph, the rest replay it
    expect(`${launches.join(',')} (${bucketed.describe()})`).toMatch(/^eager,capture,replay,replay,replay /);
    expect(bucketed.graphStats()).toMatchObject({ replays: 3, captures: 1, eager: 1, cached: 1 });
    expect(exact.graphStats()).toMatchObject({ replays: 0, captures: 0, eager: 5, cached: 0 });
  });

  test('batches of 5 and 6 requests share one graph (filler examples and rows) and give the exact-shape results', async () => {
    // a service's batches vary in size and rows: 5 examples run as 6 (one filler example of one token and one row),
    // and 12 rows (2 or 3 choices each) + the filler's row = 13 rows as 16 (the extra rows on the last example, then
    // dropped); 4 examples of 10 rows need no filler: their rows are padded to 12 on the last example
    const adapter = IA3Adapter.create(bucketed);
    for (let i = 0; i < adapter.data.length; i++) adapter.data[i] = 1 + 0.3 * (rand() - 0.5);
    adapter.markChanged();
    const launches: string[] = [];
    for (const [size, rows] of [[5, 12], [6, 15], [5, 12], [4, 10], [6, 15]]) {
      const inputs = Array.from({ length: size }, () => tokens(33 + Math.floor(rand() * 8)));  // bucket 40
      const choiceSets = inputs.map((_, i) => (i % 2 === 0 ? [tokens(2), tokens(5)] : [tokens(3), tokens(4), tokens(2)]));
      expect(choiceSets.flat().length).toBe(rows);
      const options = { adapter: inputs.map((_, i) => (i % 3 === 1 ? null : adapter)), batchSize: 8 };
      const a = await bucketed.rankClassify(inputs, choiceSets, options);
      const s = bucketed.graphStats().last!;
      launches.push(s.launch);
      expect(s).toMatchObject(size === 4 ? { batch: 4, encLen: 40, rows: 12, decLen: 8 } : { batch: 6, encLen: 40, rows: 16, decLen: 8 });
      const b = await exact.rankClassify(inputs, choiceSets, options);
      expect(exact.graphStats().last).toMatchObject({ batch: size, rows, decLen: 5 });
      expect(maxRelError(a.logProbs.flat(), b.logProbs.flat())).toBeLessThan(1e-5);
      expect(a.predictions).toEqual(b.predictions);
    }
    expect(launches).toEqual(['eager', 'capture', 'replay', 'eager', 'replay']);
  });

  test('the fixture batch, bucketed, against the float64 reference', async () => {
    const r = await bucketed.rankClassify(fx.inputIds, fx.choices, { lengthNormalize: false });
    const maxLen = Math.max(...fx.inputIds.map((x) => x.length));
    expect(bucketed.graphStats().last!.encLen).toBe(bucket(maxLen));
    expect(maxRelError(r.logProbs.flat(), fx.get('base.sum_logp'))).toBeLessThan(1e-4);
  });

  test('encoder states, logits and large calls keep their exact shape (large: but for an encoder length aligned to 8); short answers keep their length', async () => {
    const input = [tokens(37)];
    await bucketed.encode(input);
    expect(bucketed.graphStats().last).toMatchObject({ kind: 'score', encLen: 37 });
    await bucketed.choiceLogits(input, [choices]);
    expect(bucketed.graphStats().last).toMatchObject({ kind: 'score', encLen: 37, decLen: 5 });
    // 33 examples of 136 tokens: 33 x 144 padded tokens would pass the 4096 of the latency regime. Such a call is
    // bound by the GPU, not by launches: its graph is captured only when the call before had the same shape.
    const many = Array.from({ length: 33 }, () => tokens(136));
    const others = Array.from({ length: 33 }, () => tokens(128));
    const launches: string[] = [];
    for (const inputs of [many, others, many, many, many]) {
      await bucketed.rankClassify(inputs, inputs.map(() => choices), { batchSize: 33 });
      expect(bucketed.graphStats().last).toMatchObject({ batch: 33, encLen: inputs[0].length, decLen: 5 });
      launches.push(bucketed.graphStats().last!.launch);
    }
    expect(launches).toEqual(['eager', 'eager', 'eager', 'capture', 'replay']);
    // ... but a longest input that is not a multiple of 8 runs padded to one (masked; cuBLAS's strided GEMMs of the
    // folded cross-attention ran ~4.5x slower at 249 tokens than at 256 on an H200): 130 -> 136, the exact results
    const odd = Array.from({ length: 33 }, (_, i) => tokens(i === 5 ? 130 : 60 + i));
    const oddChoices = odd.map(() => choices);
    const aligned = await bucketed.rankClassify(odd, oddChoices, { batchSize: 33 });
    expect(bucketed.graphStats().last).toMatchObject({ batch: 33, encLen: 136, rows: 66, decLen: 5 });
    const asGiven = await exact.rankClassify(odd, oddChoices, { batchSize: 33 });
    expect(exact.graphStats().last).toMatchObject({ batch: 33, encLen: 130, rows: 66, decLen: 5 });
    expect(maxRelError(aligned.logProbs.flat(), asGiven.logProbs.flat())).toBeLessThan(1e-5);
    expect(aligned.predictions).toEqual(asGiven.predictions);
    // 100 choices: 100 x 8 padded decoder tokens would pass 512 (the call runs at its exact shape, 37 -> 40 tokens)
    const hundred = Array.from({ length: 100 }, (_, i) => [5 + (i % 90), 9, 11, 13, 1]);
    const h = await bucketed.rankClassify(input, [hundred]);
    expect(bucketed.graphStats().last).toMatchObject({ batch: 1, encLen: 40, rows: 100, decLen: 5 });
    const hExact = await exact.rankClassify(input, [hundred]);
    expect(exact.graphStats().last).toMatchObject({ batch: 1, encLen: 37, rows: 100, decLen: 5 });
    expect(maxRelError(h.logProbs.flat(), hExact.logProbs.flat())).toBeLessThan(1e-5);
    // answers of at most 4 tokens (one word and eos) are not padded
    await bucketed.rankClassify(input, [[[5, 1], [6, 7, 1]]]);
    expect(bucketed.graphStats().last).toMatchObject({ encLen: 40, rows: 2, decLen: 3 });
  });

  test('warmUpGraphs: the first real call of a warmed bucket replays its graph', async () => {
    const m = await loadCuda(fx.dir, 'fp32');
    try {
      expect(await m.warmUpGraphs([{ inputLength: 104, choiceLengths: [5, 2] }, { inputLength: 30, choiceLengths: [2, 2], adapter: false }])).toBe(2);
      expect(m.graphStats()).toMatchObject({ eager: 2, captures: 2, replays: 0, cached: 2 });
      const a = IA3Adapter.create(m);
      for (let i = 0; i < a.data.length; i++) a.data[i] = 1 + 0.3 * (rand() - 0.5);
      a.markChanged();
      const input = [tokens(97)];
      const r = await m.rankClassify(input, [choices], { adapter: a });  // bucket 104, choices padded to 8
      expect(m.graphStats().last).toMatchObject({ launch: 'replay', encLen: 104, decLen: 8 });
      const e = await exact.rankClassify(input, [choices], { adapter: a });  // the warmed graph ran this call's data
      expect(maxRelError(r.logProbs.flat(), e.logProbs.flat())).toBeLessThan(1e-5);
      await m.rankClassify([tokens(25)], [[[5, 1], [6, 1]]]);  // no adapter, bucket 32 (30 warmed it)
      expect(m.graphStats().last).toMatchObject({ launch: 'replay', encLen: 32, decLen: 2 });
    } finally {
      await m.dispose();
    }
  });

  test("graphBucketLengths lists the engine's buckets", async () => {
    const lengths = graphBucketLengths(150);
    expect(lengths).toEqual([8, 16, 24, 32, 40, 48, 56, 64, 72, 80, 88, 96, 104, 112, 120, 128, 144, 150]);
    for (const n of [8, 9, 64, 65, 127, 144, 145]) {
      await bucketed.rankClassify([tokens(n)], [choices]);
      const expected = lengths.find((l) => l >= n) === 150 ? 160 : lengths.find((l) => l >= n);
      expect(bucketed.graphStats().last!.encLen).toBe(expected);
      expect(bucketed.graphStats().last!.encLen).toBe(bucket(n));
    }
  });

  test('at most 64 graphs are kept; the least recently used goes first', async () => {
    const m = await loadCuda(fx.dir, 'fp32', {}, { graphBuckets: false });
    try {
      const call = async (n: number) => {
        const input = [tokens(n)];
        await m.rankClassify(input, [choices]);
        return m.graphStats().last!.launch;
      };
      // lengths 2..67: 66 shapes, each captured on its second call; length 2 is used again before the last two
      for (let n = 2; n <= 65; n++) {
        await call(n);
        await call(n);
      }
      expect(m.graphStats().cached).toBe(64);
      expect(await call(2)).toBe('replay');
      for (const n of [66, 67]) {
        await call(n);
        expect(await call(n)).toBe('capture');
      }
      expect(m.graphStats().cached).toBe(64);
      // 66 and 67 took the places of 3 and 4, the least recently used (2 was used again before them)
      expect(await call(2)).toBe('replay');
      expect(await call(5)).toBe('replay');
      expect(await call(3)).toBe('capture');
    } finally {
      await m.dispose();
    }
  });

  test('training steps: captured after a step of the same shape or on a shape\'s third step, replayed after', async () => {
    // (a training batch's encoder length is its longest input rounded up to a multiple of 8: 21 -> 24, 29 -> 32, 37 -> 40)
    const batch = { inputIds: [tokens(21), tokens(18)], choices: [choices, choices], labels: [0, 1] };
    const other = { inputIds: [tokens(29), tokens(18)], choices: [choices, choices], labels: [1, 0] };
    const launches: string[] = [];
    // a Trainer's batches of different lengths: shapes seen again, but not twice in a row; a shape's second step
    // runs eagerly (a capture would leave the GPU idle for a graph perhaps not replayed soon), its third is captured
    const third = { inputIds: [tokens(37), tokens(18)], choices: [choices, choices], labels: [0, 1] };
    for (const b of [batch, other, batch, other, third, batch, batch, other, other, third, third]) {
      await bucketed.lossAndGradients(b);
      const s = bucketed.graphStats();
      expect(s.last).toMatchObject({ kind: 'train', batch: 2, encLen: b === batch ? 24 : b === other ? 32 : 40, rows: 4, decLen: 5 });
      launches.push(s.last!.launch);
    }
    expect(launches).toEqual(['eager', 'eager', 'eager', 'eager', 'eager', 'capture', 'replay', 'capture', 'replay', 'eager', 'capture']);
  });

  // A replay must read each call's own tokens, labels and adapter vectors, not those it was captured with: four
  // steps of one shape and different data (eager, capture, replay, replay), each against the CPU backend.
  test('replayed training steps use their own data and adapter values', async () => {
    const cpu = await T5Model.load(fx.dir, { device: 'cpu', threads: 1 });
    try {
      const adapter = await IA3Adapter.load(`${fx.dir}/adapter_a`);
      const launches: string[] = [];
      const losses: number[] = [];
      for (let k = 0; k < 4; k++) {
        // (encoder length 25: a shape the test above left no graph for)
        const batch = { inputIds: [tokens(25), tokens(18)], choices: [[tokens(5), tokens(2)], [tokens(3), tokens(5)]], labels: [k % 2, (k + 1) % 2] };
        for (let i = 0; i < adapter.data.length; i++) adapter.data[i] *= 1 + 0.05 * (rand() - 0.5);
        adapter.markChanged();
        const g = await bucketed.lossAndGradients(batch, { adapter });
        launches.push(bucketed.graphStats().last!.launch);
        const want = await cpu.lossAndGradients(batch, { adapter });
        expect(Math.abs(g.totalLoss - want.totalLoss)).toBeLessThan(1e-4 * Math.abs(want.totalLoss));
        for (const m of adapter.modules) expect(relError(g.gradients[m.name], want.gradients[m.name])).toBeLessThan(1e-4);
        losses.push(g.totalLoss);
      }
      expect(launches).toEqual(['eager', 'capture', 'replay', 'replay']);
      expect(new Set(losses).size).toBe(4);  // (the data did differ)
    } finally {
      await cpu.dispose();
    }
  });
});

// The other kernel paths a bucketed call can take, on the T0-3B-width random checkpoint (d_kv 64): the fused
// encoder attention (bf16) over padded keys, the folded and the precomputed cross-attention over padded encoder
// positions, several examples of different lengths with a mixed batch of adapters.
describeCuda('CUDA graph buckets on the fused and folded paths', () => {
  const rand = mulberry32(78);
  let dir: string;
  let vocab: number;
  beforeAll(() => {
    const c = randomCheckpoint();
    dir = c.dir;
    vocab = c.config.vocab_size as number;
  });
  const tokens = (n: number): number[] => [...Array.from({ length: n - 1 }, () => 2 + Math.floor(rand() * (vocab - 2))), 1];

  describe.each([['bf16', 'folded'], ['bf16', 'precomputed'], ['fp32', 'folded']] as [Precision, 'folded' | 'precomputed'][])(
    '%s, cross-attention %s', (precision, crossAttention) => {
      test('a mixed batch of three lengths, bucketed, equals the exact shape', async () => {
        const bucketed = await loadCuda(dir, precision, {}, { crossAttention });
        const exact = await loadCuda(dir, precision, {}, { crossAttention, graphBuckets: false });
        try {
          const adapters = [IA3Adapter.create(bucketed), IA3Adapter.create(bucketed)];
          adapters.forEach((a, k) => {
            for (let i = 0; i < a.data.length; i++) a.data[i] = 1 + 0.4 * (rand() - 0.5) * (k + 1);
            a.markChanged();
          });
          const inputs = [tokens(37), tokens(50), tokens(21)];
          const choices = [[tokens(6), tokens(3)], [tokens(2), tokens(5)], [tokens(7), tokens(1 + 1)]];
          const options = { adapter: [adapters[0], null, adapters[1]] };
          const a = await bucketed.rankClassify(inputs, choices, options);
          expect(`${bucketed.graphStats().enabled}: ${bucketed.describe()}`).toMatch(/^true: /);
          expect(bucketed.graphStats().last).toMatchObject({ batch: 3, encLen: 56, rows: 6, decLen: 8 });
          const b = await exact.rankClassify(inputs, choices, options);
          expect(exact.graphStats().last).toMatchObject({ batch: 3, encLen: 50, rows: 6, decLen: 7 });
          const tol = precision === 'fp32' ? 1e-5 : bf16Tolerance(['random', 'sum_logp']);
          expect(maxRelError(a.logProbs.flat(), b.logProbs.flat())).toBeLessThan(tol);
          expect(maxRelError(a.scores.flat(), b.scores.flat())).toBeLessThan(tol);
          expect(a.predictions).toEqual(argmaxRows(a.scores));
          const clear = clearWinners(b.scores, 2 * tol);
          expect(clear.length).toBeGreaterThan(0);
          for (const e of clear) expect(a.predictions[e]).toBe(argmaxRows(b.scores)[e]);
        } finally {
          await bucketed.dispose();
          await exact.dispose();
        }
      });
    });
});
