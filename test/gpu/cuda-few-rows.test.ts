// The few-row decoder linears (cuda.fewRowLinears: kernels/linear_few_rows.cu) against the CPU reference backend and
// against the same engine's cuBLAS path, on random checkpoints of both layouts: T0 (gated-gelu, untied head; the
// T0-3B width on a GPU, a quarter of it on the emulator) and the original T5 (relu, tied and rescaled head).
// Calls of 16 and 32 decoder rows (one and two row tiles), the folded cross-attention (the kernels apply l_k and l_v)
// and the precomputed one (unequal numbers of choices), mixed adapters, graph replays, and a call past 32 rows that
// must take the cuBLAS path unchanged. Tolerance: twice PyTorch's bf16 error on the T0 random checkpoint (as
// cuda-random; the T5-layout checkpoint has no measurement of its own, so the T0 one stands in).
import * as os from 'os';
import * as path from 'path';
import { IA3Adapter, T5Model } from '../../lib';
import { native } from '../../lib/native';
import { randomBatch, t0_3bConfigJson, writeRandomT5 } from '../../benchmarks/random-t5';
import { maxRelError } from '../helpers/reference';
import { bf16Tolerance, describeCuda, emulated, loadCuda, randomAdapter, randomCheckpoint } from './helpers';

jest.setTimeout(900_000);

type Call = { name: string; inputIds: number[][]; choices: number[][][]; adapters: (number | null)[]; rows: number };

// A T5 v1.0-layout checkpoint (relu FFN, tied head rescaled by d_model^-0.5) of a width the kernels have (512, 1024),
// with an attention width three times d_model (as the original T5-3B's 4,096 for 1,024): q|k|v then has enough
// columns (>= 32 per SM) for the kernels' 32-column blocks, and o and the cross-attention's o a K other than d_model.
function t5LayoutCheckpoint(): string {
  const config = { ...t0_3bConfigJson(2), feed_forward_proj: 'relu', dense_act_fn: 'relu', is_gated_act: false, tie_word_embeddings: true };
  Object.assign(config, emulated() ? { d_model: 512, d_ff: 2048, num_heads: 24 } : { d_model: 1024, d_ff: 4096, num_heads: 48 });
  const dir = path.join(os.tmpdir(), emulated() ? 'tfew-rand-t5relu-emu-2l' : 'tfew-rand-t5relu-2l');
  writeRandomT5(dir, { configJson: config, seed: 4321 });
  return dir;
}

// Decoder rows = choice rows x the longest choice (eos included).
function calls(vocab: number): Call[] {
  const out: Call[] = [];
  const add = (name: string, lengths: number[], choiceLengths: number[][], adapters: (number | null)[], seed: number) => {
    const b = randomBatch(vocab, lengths, choiceLengths, seed);
    const rowsOf = b.choices.reduce((n, c) => n + c.length, 0);
    const decLen = Math.max(...b.choices.flat().map((c) => c.length));
    out.push({ name, inputIds: b.inputIds, choices: b.choices, adapters, rows: rowsOf * decLen });
  };
  add('one example, 2 choices (16 rows, folded)', [97], [[7, 3]], [0], 11);
  // (4 choices of up to 6 tokens: the graph bucket pads them to 8, 32 rows, where precomputing is cheaper)
  add('one example, 4 choices (two row tiles, precomputed)', [40], [[5, 2, 4, 5]], [1], 12);
  add('two examples, two adapters (32 rows, folded)', [64, 23], [[7, 2], [4, 7]], [0, 1], 13);
  add('unequal choices, an adapter and none (precomputed)', [50, 81], [[3, 7, 1], [6]], [1, null], 14);
  return out;
}

describeCuda('few-row decoder linears (cuda.fewRowLinears)', () => {
  const tol = (quantity: string) => bf16Tolerance(['random', quantity]);

  describe.each([
    ['T0 layout (gated-gelu, untied head)', () => randomCheckpoint().dir],
    ['T5 layout (relu, tied head)', t5LayoutCheckpoint],
  ] as const)('%s', (_layout, checkpoint) => {
    let dir: string;
    let few: T5Model;
    let plain: T5Model;
    let adapters: IA3Adapter[];
    let cases: Call[];
    const cpuResults = new Map<string, { logProbs: number[][]; scores: number[][] }>();
    const perExample = (c: Call) => c.adapters.map((i) => (i === null ? null : adapters[i]));

    beforeAll(async () => {
      dir = checkpoint();
      const cpu = await T5Model.load(dir, { device: 'cpu' });
      adapters = [randomAdapter(cpu, 31), randomAdapter(cpu, 32)];
      cases = calls(cpu.config.vocabSize);
      for (const c of cases) cpuResults.set(c.name, await cpu.rankClassify(c.inputIds, c.choices, { adapter: perExample(c) }));
      await cpu.dispose();
      few = await loadCuda(dir, 'bf16', {}, { fewRowLinears: true });
      plain = await loadCuda(dir, 'bf16', {}, { fewRowLinears: false });
    });
    afterAll(async () => {
      await few?.dispose();
      await plain?.dispose();
    });

    test('the engines say which path they run', () => {
      expect(few.describe()).toMatch(/few-row decoder linears fused/);
      expect(plain.describe()).not.toMatch(/few-row/);
    });

    test('each call agrees with the CPU backend and with the cuBLAS path, and takes the few-row kernels', async () => {
      for (const c of cases) {
        expect(c.rows).toBeLessThanOrEqual(32);
        const want = cpuResults.get(c.name)!;
        const r = await few.rankClassify(c.inputIds, c.choices, { adapter: perExample(c) });
        const p = await plain.rankClassify(c.inputIds, c.choices, { adapter: perExample(c) });
        expect([c.name, maxRelError(r.logProbs.flat(), want.logProbs.flat()) < tol('sum_logp')]).toEqual([c.name, true]);
        expect([c.name, maxRelError(r.scores.flat(), want.scores.flat()) < tol('scores')]).toEqual([c.name, true]);
        expect([c.name, maxRelError(r.logProbs.flat(), p.logProbs.flat()) < tol('sum_logp')]).toEqual([c.name, true]);
        // and no less exact than the cuBLAS path they replace (both bf16, the same roundings but for the order of the
        // dot products' sums): within twice its error against the CPU (taken as at least 5e-4: one draw can be far
        // below the other path's), plus 3e-4 for the sums' order. (On the emulator the two errors are 1.5e-4 to
        // 7e-4 since session 20's gelu, which computes gelu_new as the CPU does; a kernel that drops l_v triples the
        // first, up to 8.6e-3.) On a GPU, where each path's maximum error over a few log-probs is one draw of ~1e-3 to
        // 5e-3, three times plus 1e-3.
        const fewErr = maxRelError(r.logProbs.flat(), want.logProbs.flat());
        const cublasErr = maxRelError(p.logProbs.flat(), want.logProbs.flat());
        const bound = emulated() ? 2 * Math.max(cublasErr, 5e-4) + 3e-4 : 3 * cublasErr + 1e-3;
        expect([c.name, fewErr, fewErr <= bound]).toEqual([c.name, fewErr, true]);
        // other sums of the same products: some log-prob differs in its last bits (the kernels ran, not cuBLAS)
        expect([c.name, r.logProbs.flat().some((v, i) => v !== p.logProbs.flat()[i])]).toEqual([c.name, true]);
      }
    });

    test('graph replays of a few-row call give the eager result', async () => {
      const c = cases[2];
      const first = (await few.rankClassify(c.inputIds, c.choices, { adapter: perExample(c) })).logProbs.flat();
      for (let i = 0; i < 3; i++) {
        const again = await few.rankClassify(c.inputIds, c.choices, { adapter: perExample(c) });
        expect(again.logProbs.flat()).toEqual(first);
      }
    });

    // The grid is what the GPU runs at once (blocks per SM x SMs), each block looping over column blocks: on the
    // emulator, with 1 SM (8 blocks) instead of 132, every block takes several column blocks; the same bits.
    (emulated() ? test : test.skip)('blocks that loop over several column blocks give the same bits (emulator: 1 SM)', async () => {
      const c = cases[2];
      const want = (await few.rankClassify(c.inputIds, c.choices, { adapter: perExample(c) })).logProbs.flat();
      const fewSms = await loadCuda(dir, 'bf16', {}, { fewRowLinears: true, graphs: false });
      try {
        native()._testing.emulatorMultiprocessors!(1);
        const got = (await fewSms.rankClassify(c.inputIds, c.choices, { adapter: perExample(c) })).logProbs.flat();
        expect(got).toEqual(want);
      } finally {
        native()._testing.emulatorMultiprocessors!(0);
        await fewSms.dispose();
      }
    });

    test('past 32 decoder rows the cuBLAS path runs, bit for bit as without the option', async () => {
      const b = randomBatch(few.config.vocabSize, [30, 44, 12], [[7, 7], [3, 7], [7, 2]], 15);  // 6 rows x 8 = 48
      const r = await few.rankClassify(b.inputIds, b.choices, { adapter: [adapters[0], adapters[1], null] });
      const p = await plain.rankClassify(b.inputIds, b.choices, { adapter: [adapters[0], adapters[1], null] });
      expect(r.logProbs).toEqual(p.logProbs);
    });
  });

  test('cuda.fewRowLinears must be a boolean', async () => {
    await expect(loadCuda(randomCheckpoint().dir, 'bf16', {}, { fewRowLinears: 'yes' as unknown as boolean }))
      .rejects.toThrow(/cuda.fewRowLinears must be a boolean/);
  });
});
