// Device memory planned for the largest calls (cuda.reserve at load, T5Model.reserveMemory later): calls up to
// the reserved sizes allocate nothing and keep the CUDA graphs captured so far; a reservation that does not fit
// fails at once with OutOfMemoryError and leaves the model as it was. Skipped when CUDA is not usable.
//
// The tiny checkpoint's calls fit in the arena's first 64 MiB step, so the "big" calls here are long enough
// (fp32: [batch, heads, length, length] attention scores) to need a second one.
import { IA3Adapter, OutOfMemoryError, RankBatcher, RankServer, T5Model, Trainer } from '../../lib';
import { native } from '../../lib/native';
import { loadFixture } from '../helpers/reference';
import { describeCuda, emulated, loadCuda } from './helpers';

jest.setTimeout(300_000);

const MiB = 2 ** 20;

describeCuda('device memory reserved for the largest calls', () => {
  const fx = loadFixture('tiny-gated-gelu-untied');
  let seed = 5;
  const tokens = (n: number): number[] => {
    const ids: number[] = [];
    for (let i = 0; i < n - 1; i++) {
      seed = (seed * 48271) % 2147483647;
      ids.push(2 + (seed % 120));
    }
    return [...ids, 1];
  };
  const batch = (examples: number, length: number) => ({
    inputs: Array.from({ length: examples }, () => tokens(length)),
    choices: Array.from({ length: examples }, () => [tokens(2), tokens(3)]),
  });
  const small = batch(1, 10);
  const big = batch(4, 700);  // fp32: a 128 MiB arena
  const bigShape = { batchSize: 4, inputLength: 700, choices: 2, choiceLength: 3 };
  const options = { maxInputLength: 1024 };

  /** Runs small, small, big, small; returns how each call launched and the big call's scores. */
  async function smallBigSmall(m: T5Model): Promise<{ launches: string[]; bigScores: number[][] }> {
    const launches: string[] = [];
    let bigScores: number[][] = [];
    for (const b of [small, small, big, small]) {
      const r = await m.rankClassify(b.inputs, b.choices, options);
      if (b === big) bigScores = r.scores;
      launches.push((m.graphStats().last as { launch: string }).launch);
    }
    return { launches, bigScores };
  }

  test('rank classification within cuda.reserve: no arena growth, captured graphs survive a larger call', async () => {
    const plain = await loadCuda(fx.dir, 'fp32');
    const reserved = await loadCuda(fx.dir, 'fp32', {}, { reserve: bigShape });
    try {
      expect(plain.graphStats()).toMatchObject({ arenaBytes: 0, arenaGrowths: 0 });
      const held = reserved.graphStats().arenaBytes;
      expect(held).toBeGreaterThan(64 * MiB);  // (else this test would show nothing)
      expect(reserved.graphStats().arenaGrowths).toBe(0);

      const withReserve = await smallBigSmall(reserved);
      const without = await smallBigSmall(plain);
      // plain: the big call grows the arena, which drops the small call's graph: it is captured again
      expect(without.launches).toEqual(['eager', 'capture', 'eager', 'capture']);
      expect(plain.graphStats().arenaGrowths).toBe(2);  // the first call's arena, then the big call's
      expect(plain.graphStats().arenaBytes).toBeLessThanOrEqual(held);
      // reserved: nothing allocated, the graph replays
      expect(withReserve.launches).toEqual(['eager', 'capture', 'eager', 'replay']);
      expect(reserved.graphStats()).toMatchObject({ arenaBytes: held, arenaGrowths: 0 });
      expect(withReserve.bigScores).toEqual(without.bigScores);  // the same computation, in another arena
    } finally {
      await plain.dispose();
      await reserved.dispose();
    }
  });

  test('training steps within a training reserve: no arena growth, the small step\'s graph survives', async () => {
    const m = await loadCuda(fx.dir, 'fp32', {}, { reserve: { batchSize: 4, inputLength: 500, choices: 2, choiceLength: 3, training: true } });
    try {
      expect(m.graphStats().arenaBytes).toBeGreaterThan(64 * MiB);  // a 4 x 500 step needs 128 MiB
      const adapter = IA3Adapter.create(m);
      const step = (b: ReturnType<typeof batch>) =>
        m.lossAndGradients({ inputIds: b.inputs, choices: b.choices, labels: b.inputs.map(() => 0) }, { adapter, ...options });
      const smallTrain = batch(2, 10);
      const first = await step(smallTrain);
      await step(smallTrain);  // captured (a training step's shape repeated right after)
      expect(m.graphStats().last).toMatchObject({ kind: 'train', launch: 'capture' });
      await step(batch(4, 500));
      const again = await step(smallTrain);
      expect(m.graphStats().last).toMatchObject({ kind: 'train', launch: 'replay' });
      expect(m.graphStats().arenaGrowths).toBe(0);
      expect(again.totalLoss).toBe(first.totalLoss);
    } finally {
      await m.dispose();
    }
  });

  test('a Trainer reserves its largest step before the first: a run of varied lengths never grows the arena', async () => {
    const m = await loadCuda(fx.dir, 'fp32');
    try {
      const examples = [12, 40, 25, 60, 33, 18].map((n, i) => ({ input: tokens(n), choices: [tokens(2), tokens(3 + (i % 3))], label: i % 2 }));
      const trainer = new Trainer(m, IA3Adapter.create(m), { steps: 4, batchSize: 2, seed: 3 });
      const result = await trainer.train(examples);
      expect(result.losses).toHaveLength(4);
      expect(m.graphStats()).toMatchObject({ arenaGrowths: 0, last: { kind: 'train' } });
      expect(m.graphStats().arenaBytes).toBeGreaterThan(0);
    } finally {
      await m.dispose();
    }
  });

  test('warmUpGraphs reserves first: every graph it captures is still held; more adapter slots count as a growth', async () => {
    const m = await loadCuda(fx.dir, 'fp32');
    try {
      // no adapter first in size order, then one with: the first adapter call used to allocate the slots (dropping
      // every graph); and a long single input after a wide batch used to grow the arena
      const captured = await m.warmUpGraphs([
        { inputLength: 8, choiceLengths: [2], batchSize: 200, adapter: false },
        { inputLength: 600, choiceLengths: [2, 2], adapter: false },
        { inputLength: 40, choiceLengths: [2, 3], adapter: true },
      ]);
      expect(captured).toBe(3);
      expect(m.graphStats()).toMatchObject({ cached: 3, arenaGrowths: 0 });
      // twelve adapters in one call: more slots than reserved (8): the graphs go, and it is counted
      const adapters = Array.from({ length: 12 }, () => IA3Adapter.create(m));
      const inputs = adapters.map(() => tokens(12));
      await m.rankClassify(inputs, inputs.map(() => [tokens(2), tokens(3)]), { adapter: adapters, ...options });
      expect(m.graphStats()).toMatchObject({ cached: 0, arenaGrowths: 1 });
    } finally {
      await m.dispose();
    }
  });

  test('reserveMemory later: grows once (dropping graphs, not counted as a call\'s growth), never shrinks', async () => {
    const m = await loadCuda(fx.dir, 'fp32');
    try {
      for (let i = 0; i < 2; i++) await m.rankClassify(small.inputs, small.choices, options);
      expect(m.graphStats()).toMatchObject({ cached: 1, arenaBytes: 64 * MiB, arenaGrowths: 1 });
      const held = await m.reserveMemory([{ batchSize: 1, inputLength: 16, choices: 2, choiceLength: 3 }, bigShape]);
      expect(held).toBeGreaterThan(64 * MiB);
      expect(m.graphStats()).toMatchObject({ cached: 0, arenaBytes: held, arenaGrowths: 1 });
      for (let i = 0; i < 2; i++) await m.rankClassify(small.inputs, small.choices, options);
      expect(await m.reserveMemory({ batchSize: 1, inputLength: 8, choices: 1, choiceLength: 1 })).toBe(held);
      expect(m.graphStats()).toMatchObject({ cached: 1, arenaBytes: held });  // a smaller reservation changes nothing
      await m.rankClassify(big.inputs, big.choices, options);
      await m.rankClassify(small.inputs, small.choices, options);
      expect(m.graphStats()).toMatchObject({ arenaGrowths: 1, last: { launch: 'replay' } });
    } finally {
      await m.dispose();
    }
  });

  // Emulator only: there the device memory an executable graph holds can be set (emulatorGraphExecBytes), so a graph
  // can be made too large for what is free (on a GPU: a graph's few MiB after a reservation that took the device).
  (emulated() ? test : test.skip)('a full device: graphs make room for a new one, then the count that fits is the limit; graphs go off only after three failures in a row', async () => {
    const long = batch(1, 300);  // another input-length bucket than small's
    const m = await loadCuda(fx.dir, 'fp32');
    const graphBytes = (native()._testing as unknown as { emulatorGraphExecBytes: (bytes: number) => void }).emulatorGraphExecBytes;
    const scores = async (b: typeof small) => (await m.rankClassify(b.inputs, b.choices, options)).scores;
    try {
      const expected = { small: await scores(small), long: await scores(long) };
      const free = native().cudaMemoryInfo()?.free ?? 0;
      graphBytes(Math.floor(0.6 * free));  // one graph fits in what is free, two do not
      expect(await scores(small)).toEqual(expected.small);
      expect(m.graphStats()).toMatchObject({ cached: 1, graphLimit: 0, last: { launch: 'capture' } });
      // long's graph evicts small's, and one graph is the limit from now on
      expect(await scores(long)).toEqual(expected.long);
      expect(m.graphStats()).toMatchObject({ enabled: true, cached: 1, graphLimit: 1, captureFailures: 0, last: { launch: 'capture' } });
      expect(await scores(long)).toEqual(expected.long);
      expect(m.graphStats().last).toMatchObject({ launch: 'replay' });
      // small, beyond the limit, runs eagerly instead of evicting long's graph (no captures taking turns)
      for (let i = 0; i < 2; i++) {
        expect(await scores(small)).toEqual(expected.small);
        expect(m.graphStats()).toMatchObject({ cached: 1, last: { launch: 'eager' } });
        expect(await scores(long)).toEqual(expected.long);
        expect(m.graphStats().last).toMatchObject({ launch: 'replay' });
      }
      // a reservation clears the limit; now no graph fits: each call runs eagerly and correctly, and the third
      // capture in a row that finds no memory turns graphs off
      await m.reserveMemory({ batchSize: 1, inputLength: 10, choices: 2, choiceLength: 3 });
      expect(m.graphStats().graphLimit).toBe(0);
      graphBytes(free + MiB);
      for (let i = 1; i <= 3; i++) {
        expect(await scores(small)).toEqual(expected.small);
        expect(m.graphStats()).toMatchObject({ enabled: i < 3, cached: 0, captureFailures: i, last: { launch: 'eager' } });
      }
      expect(m.graphStats().offReason).toMatch(/no device memory for graphs/);
      // (graphs off, calls run at their exact lengths, no longer padded to the bucket: equal within rounding)
      const exact = (await scores(long)).flat();
      exact.forEach((x, i) => expect(Math.abs(x - expected.long.flat()[i])).toBeLessThan(1e-5 * Math.abs(expected.long.flat()[i]) + 1e-6));
      expect(m.graphStats()).toMatchObject({ captureFailures: 3, last: { launch: 'eager' } });
    } finally {
      graphBytes(-1);
      await m.dispose();
    }
  });

  (emulated() ? test : test.skip)('the graph limit goes when another process frees device memory; a graph launch that finds no memory drops that graph and the call runs eagerly', async () => {
    const long = batch(1, 300);
    const m = await loadCuda(fx.dir, 'fp32');
    const testing = native()._testing as unknown as {
      emulatorGraphExecBytes: (bytes: number) => void;
      emulatorHoldDeviceMemory: (bytes: number) => boolean;
      emulatorFailGraphLaunches: (count: number) => void;
    };
    const scores = async (b: typeof small) => (await m.rankClassify(b.inputs, b.choices, options)).scores;
    const launch = () => (m.graphStats().last as { launch: string }).launch;
    try {
      const expected = { small: await scores(small), long: await scores(long) };  // (the arena is as large as needed)
      // another process leaves 256 MiB free; one graph of 150 MiB fits, two do not
      const free = native().cudaMemoryInfo()?.free ?? 0;
      expect(testing.emulatorHoldDeviceMemory(free - 256 * MiB)).toBe(true);
      testing.emulatorGraphExecBytes(150 * MiB);
      expect(await scores(small)).toEqual(expected.small);
      expect(await scores(long)).toEqual(expected.long);  // captured by evicting small's graph: the limit is 1
      expect(m.graphStats()).toMatchObject({ cached: 1, graphLimit: 1 });
      expect(await scores(small)).toEqual(expected.small);
      expect(launch()).toBe('eager');
      // the other process frees 100 MiB: still no room for a second graph
      expect(testing.emulatorHoldDeviceMemory(free - 356 * MiB)).toBe(true);
      expect(await scores(small)).toEqual(expected.small);
      expect(m.graphStats()).toMatchObject({ cached: 1, graphLimit: 1, last: { launch: 'eager' } });
      // it exits: the limit goes, small is captured beside long's graph, and both replay
      expect(testing.emulatorHoldDeviceMemory(0)).toBe(true);
      expect(await scores(small)).toEqual(expected.small);
      expect(m.graphStats()).toMatchObject({ cached: 2, graphLimit: 0, captureFailures: 0, last: { launch: 'capture' } });
      for (const b of [long, small]) {
        expect(await scores(b)).toEqual(b === long ? expected.long : expected.small);
        expect(launch()).toBe('replay');
      }
      // a replay whose launch finds no device memory (another process took it): that graph goes, the call runs
      // eagerly with the same scores, and the graphs left are the limit until memory frees up
      expect(testing.emulatorHoldDeviceMemory(512 * MiB)).toBe(true);
      testing.emulatorFailGraphLaunches(1);
      expect(await scores(small)).toEqual(expected.small);
      expect(m.graphStats()).toMatchObject({ enabled: true, cached: 1, graphLimit: 1, captureFailures: 1, last: { launch: 'eager' } });
      expect(await scores(small)).toEqual(expected.small);
      expect(launch()).toBe('eager');
      expect(await scores(long)).toEqual(expected.long);
      expect(launch()).toBe('replay');
      expect(testing.emulatorHoldDeviceMemory(0)).toBe(true);  // (it exits)
      expect(await scores(small)).toEqual(expected.small);
      expect(m.graphStats()).toMatchObject({ cached: 2, graphLimit: 0, last: { launch: 'capture' } });
      // three graphs in a row that cannot launch turn graphs off: two replays, then the first launch of a capture
      testing.emulatorFailGraphLaunches(3);
      expect(await scores(long)).toEqual(expected.long);
      expect(m.graphStats()).toMatchObject({ enabled: true, cached: 1, graphLimit: 1, last: { launch: 'eager' } });
      expect(await scores(small)).toEqual(expected.small);
      expect(m.graphStats()).toMatchObject({ enabled: true, cached: 0, graphLimit: 1, last: { launch: 'eager' } });
      expect(await scores(long)).toEqual(expected.long);  // (captured: room for one graph, which fails to launch)
      expect(m.graphStats()).toMatchObject({ enabled: false, cached: 0, captureFailures: 4, last: { launch: 'eager' } });
      expect(m.graphStats().offReason).toMatch(/no device memory for graphs: 3 in a row could not be instantiated or launched/);
    } finally {
      testing.emulatorFailGraphLaunches(0);
      testing.emulatorHoldDeviceMemory(0);
      testing.emulatorGraphExecBytes(-1);
      await m.dispose();
    }
  });

  test('RankBatcher reserves the largest batch before its first, and again only for more or longer choices or adapters', async () => {
    const m = await loadCuda(fx.dir, 'fp32');
    const reserve = jest.spyOn(m, 'reserveMemory');
    const adapter = IA3Adapter.create(m.config);
    const batcher = new RankBatcher(m, { maxBatch: 4, maxInputLength: 700, maxDelayMs: 5 });
    try {
      const one = await m.rankClassify(small.inputs, small.choices);  // (beside the batcher: the expected answer)
      const { arenaBytes: grown, arenaGrowths: growths } = m.graphStats();  // (that call grew the arena: one growth)
      expect((await batcher.classify(small.inputs[0], small.choices[0])).scores).toEqual(one.scores[0]);
      expect(reserve).toHaveBeenLastCalledWith({ batchSize: 4, inputLength: 700, choices: 2, choiceLength: 3, adapters: 0 });
      const held = m.graphStats().arenaBytes;
      expect(held).toBeGreaterThan(grown);
      // four long requests at once: within the reservation, no growth
      const results = await Promise.all(big.inputs.map((x, i) => batcher.classify(x, big.choices[i])));
      expect(results.map((r) => r.scores)).toEqual((await m.rankClassify(big.inputs, big.choices, options)).scores);
      expect(m.graphStats()).toMatchObject({ arenaBytes: held, arenaGrowths: growths });
      expect(reserve).toHaveBeenCalledTimes(1);
      // fewer choices, or an adapter on one request: more memory only for what was not reserved yet
      await batcher.classify(small.inputs[0], [small.choices[0][0]]);
      expect(reserve).toHaveBeenCalledTimes(1);
      await batcher.classify(small.inputs[0], [...small.choices[0], [5, 1]], { adapter });
      expect(reserve).toHaveBeenLastCalledWith({ batchSize: 4, inputLength: 700, choices: 3, choiceLength: 3, adapters: 4 });
      expect(batcher.stats.reservations).toEqual({ made: 2, failed: 0 });
      expect(m.graphStats().arenaGrowths).toBe(growths);
    } finally {
      await batcher.close();
      await m.dispose();
    }
    // a reservation that does not fit is counted once, and the requests are answered all the same
    const n = await loadCuda(fx.dir, 'fp32');
    const huge = new RankBatcher(n, { maxBatch: 4096, maxInputLength: 4096, maxDelayMs: 0 });
    const off = new RankBatcher(n, { maxBatch: 4096, maxInputLength: 4096, reserveMemory: false });
    try {
      const expected = (await n.rankClassify(small.inputs, small.choices)).scores[0];
      for (let i = 0; i < 2; i++) expect((await huge.classify(small.inputs[0], small.choices[0])).scores).toEqual(expected);
      expect(huge.stats.reservations).toMatchObject({ made: 0, failed: 1, lastError: expect.stringMatching(/reserved shapes need .* of activation memory/) });
      expect((await off.classify(small.inputs[0], small.choices[0])).scores).toEqual(expected);
      expect(off.stats.reservations).toEqual({ made: 0, failed: 0 });
    } finally {
      await huge.close();
      await off.close();
      await n.dispose();
    }
  });

  test('tfew serve --warm-up with named adapters: the batcher reserves what the warm-up did, so the warmed graphs survive the first request', async () => {
    const m = await loadCuda(fx.dir, 'fp32');
    const named = { a: IA3Adapter.create(m.config), b: IA3Adapter.create(m.config) };
    const server = new RankServer(m, named, { maxBatch: 4, maxInputLength: 700 });
    try {
      // as the CLI's --warm-up 2,3 does: the largest batch of such requests, then the graphs of single requests
      await m.reserveMemory({ batchSize: 4, inputLength: 700, choices: 2, choiceLength: 3, adapters: 2 });
      await m.warmUpGraphs([{ inputLength: 10, choiceLengths: [2, 3], adapter: true }]);
      const { cached } = m.graphStats();
      expect(cached).toBeGreaterThan(0);
      const reserve = jest.spyOn(m, 'reserveMemory');
      await server.batcher.classify(small.inputs[0], small.choices[0], { adapter: named.a });
      expect(reserve).toHaveBeenLastCalledWith({ batchSize: 4, inputLength: 700, choices: 2, choiceLength: 3, adapters: 2 });
      expect(m.graphStats()).toMatchObject({ cached, last: { launch: 'replay' } });
    } finally {
      await server.batcher.close();
      await m.dispose();
    }
  });

  test('a reservation that does not fit: OutOfMemoryError at load with nothing left held, or from reserveMemory with the model unchanged', async () => {
    const before = native().cudaMemoryInfo();
    const huge = { batchSize: 4096, inputLength: 4096, choices: 1, choiceLength: 1 };  // TiBs of attention scores
    await expect(loadCuda(fx.dir, 'fp32', {}, { reserve: huge })).rejects.toThrow(OutOfMemoryError);
    await expect(loadCuda(fx.dir, 'fp32', {}, { reserve: huge })).rejects.toThrow(/reserved shapes need .* of activation memory/);
    // (the weights were uploaded, then freed again; a real GPU may keep a little lazily loaded kernel code)
    const after = native().cudaMemoryInfo();
    expect((before?.free ?? 0) - (after?.free ?? 0)).toBeLessThan(64 * MiB);

    const m = await loadCuda(fx.dir, 'fp32');
    try {
      for (let i = 0; i < 2; i++) await m.rankClassify(small.inputs, small.choices, options);
      const stats = m.graphStats();
      await expect(m.reserveMemory(huge)).rejects.toThrow(OutOfMemoryError);
      expect(m.graphStats()).toMatchObject({ cached: stats.cached, arenaBytes: stats.arenaBytes });
      await m.rankClassify(small.inputs, small.choices, options);
      expect(m.graphStats().last).toMatchObject({ launch: 'replay' });
    } finally {
      await m.dispose();
    }
  });
});
