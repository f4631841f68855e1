// The CUDA engine's device-memory planner (cuda/gpu/engine_plan.h) on the T0-3B architecture, without a GPU:
// the arena sizes behind the memory numbers in benchmarks/RESULTS.md and the recompute levels' savings.
// Needs the CUDA build of the addon (nvcc present at install), not a GPU; skipped otherwise.
import { t0_3bConfigJson } from '../benchmarks/random-t5';
import { parseT5Config } from '../lib/config';
import { fromNative, InvalidArgumentError } from '../lib/errors';
import { native } from '../lib/native';

const compiled = (() => {
  try {
    return native().buildInfo.cudaCompiled;
  } catch {
    return false;
  }
})();
if (!compiled) console.warn('[cuda-memory-plan] skipped: this build of the addon has no CUDA backend');
const describeCompiled = compiled ? describe : describe.skip;

const GiB = 2 ** 30;
const config = parseT5Config(t0_3bConfigJson(24), 'config.json');
type Level = 'none' | 'attention' | 'all';
// foldedCross: what the engine picks for TRAIN-3B (uniform choices, short enough: CudaEngine::folds_cross_attention);
// fusedBackward: the fused encoder attention backward (the engine's default since session 18; the helper's is the
// cuBLAS backward, which the tests below were written against)
const trainArena = (recompute: Level, choices = 2, foldedCross = false, fusedBackward = false): Promise<number> =>
  native()._testing.cudaArenaBytes(config, { batch: 8, encLen: 256, rows: 8 * choices, decLen: 8, training: true, nAdapters: 1, recompute, foldedCross, fusedBackward });

// The fused backward's dropout keep mask of one encoder layer's attention probabilities: a bit per (example, head,
// query, key), each query row in whole 64-key tiles (TRAIN-3B: 2 MiB). T0's dropout rate is 0.1.
const keepBitsBytes = (batch = 8, len = 256): number => batch * config.numHeads * len * Math.ceil(len / 64) * 8;
// With nothing recomputed, the fused backward also keeps each encoder layer's attention output (bf16 [tokens, inner])
// and softmax statistics (m, l, D: fp32 [B, H, len, 3]) instead of running the attention forward again.
const savedAttentionBytes = (batch = 8, len = 256): number =>
  batch * len * config.numHeads * config.dKv * 2 + batch * config.numHeads * len * 3 * 4;

// bf16 weights of an untied T0 checkpoint (shared embedding + head), fp32 norms and relative-position tables:
// counted from the architecture, independently of the engine's weight walker.
function t0WeightBytes(): number {
  const { dModel: d, dFf: ff, vocabSize: V, numHeads: H, dKv, numLayers: Le, numDecoderLayers: Ld, numBuckets } = config;
  const inner = H * dKv;
  const ffn = 2 * ff * d + ff * d;  // wi_0 | wi_1, wo
  const encoder = Le * (3 * inner * d + inner * d + ffn);
  const decoder = Ld * (3 * inner * d + inner * d + inner * d + 2 * inner * d + inner * d + ffn);
  const norms = (2 * Le + 3 * Ld + 2) * d;
  return 2 * (2 * V * d + encoder + decoder) + 4 * (norms + 2 * numBuckets * H);
}

describeCompiled('CUDA memory planner (T0-3B, no GPU needed)', () => {
  test('each recompute level saves exactly the encoder buffers it stops keeping', async () => {
    const Ne = 8 * 256, inner = config.numHeads * config.dKv, wiCols = 2 * config.dFf, layers = config.numLayers;
    // every layer's q|k|v (bf16) is replaced by one shared buffer; 'all' does the same for the wi outputs
    const [none, attention, all] = await Promise.all([trainArena('none'), trainArena('attention'), trainArena('all')]);
    expect(none - attention).toBe((layers - 1) * Ne * 3 * inner * 2);
    expect(attention - all).toBe((layers - 1) * Ne * wiCols * 2);
    // with the fused backward, each layer's dropout keep mask too (the backward's rerun of the attention makes it
    // again), and every layer's attention output and statistics (that rerun makes them in the shared buffers)
    const fused = await Promise.all((['none', 'attention', 'all'] as const).map((l) => trainArena(l, 2, false, true)));
    expect(keepBitsBytes()).toBe(2 * 2 ** 20);
    expect(savedAttentionBytes()).toBe(8.75 * 2 ** 20);
    expect(fused[0] - fused[1]).toBe((layers - 1) * (Ne * 3 * inner * 2 + keepBitsBytes()) + layers * savedAttentionBytes());
    expect((fused[0] - fused[1]) / GiB).toBeCloseTo(0.79, 2);  // as LossOptions.recompute's documentation says
    expect(fused[1] - fused[2]).toBe((layers - 1) * Ne * wiCols * 2);
  });

  test('TRAIN-3B: weights + arena within the 8 GiB goal at every recompute level (cross-attention folded)', async () => {
    const weights = t0WeightBytes();
    expect(weights / GiB).toBeCloseTo(5.31, 2);
    const headroom = 64 * 2 ** 20;  // cuBLAS workspace and allocation rounding
    expect(weights + (await trainArena('none', 2, true)) + headroom).toBeLessThan(7.9 * GiB);
    expect(weights + (await trainArena('attention', 2, true)) + headroom).toBeLessThan(7.4 * GiB);
    expect(weights + (await trainArena('all', 2, true)) + headroom).toBeLessThan(6.5 * GiB);
    // with every layer's cross keys/values (a batch with unequal choices) the fastest mode is just above it
    // (8.01 GiB), recomputing the attention's q|k|v well within it
    expect(weights + (await trainArena('none')) + headroom).toBeLessThan(8.05 * GiB);
    expect(weights + (await trainArena('attention')) + headroom).toBeLessThan(7.5 * GiB);
    // the fused attention backward (the default since session 18) keeps each layer's attention output too: 0.12 GiB
    // above the cuBLAS backward's plan, still within the goal (7.92 GiB; 7.97 GiB measured on an H200 in session 18);
    // recomputing the attention brings it to 0.13 GiB below the cuBLAS one's
    const [cublasNone, cublasAttention] = [await trainArena('none', 2, true), await trainArena('attention', 2, true)];
    expect((await trainArena('none', 2, true, true)) - cublasNone).toBeCloseTo(0.124 * GiB, -7);
    expect(weights + (await trainArena('none', 2, true, true)) + headroom).toBeLessThan(7.95 * GiB);
    expect(cublasAttention - (await trainArena('attention', 2, true, true))).toBeCloseTo(0.126 * GiB, -7);
    // the engine's default plan (fused backward) at the other levels, folded or not
    expect(weights + (await trainArena('attention', 2, true, true)) + headroom).toBeLessThan(7.2 * GiB);
    expect(weights + (await trainArena('all', 2, true, true)) + headroom).toBeLessThan(6.3 * GiB);
    expect(weights + (await trainArena('attention', 2, false, true)) + headroom).toBeLessThan(7.5 * GiB);
  });

  test('the fused encoder attention backward keeps no [B, H, L, L] tensors but a keep mask (and each layer\'s output)', async () => {
    const shape = { batch: 8, encLen: 256, rows: 16, decLen: 8, training: true, nAdapters: 1, recompute: 'none' as const, foldedCross: true };
    const fused = await native()._testing.cudaArenaBytes(config, { ...shape, fusedBackward: true });
    const cublas = await native()._testing.cudaArenaBytes(config, shape);
    const BHLL = 8 * config.numHeads * 256 * 256;
    const squares = BHLL * 4 + BHLL * 2 + BHLL * 2;  // fp32 scores, bf16 P, bf16 P'
    const scaledQkv = 8 * 256 * 3 * config.numHeads * config.dKv * 2;  // the cuBLAS path's scaled q|k|v copy
    // less by the squares and (up to where the decoder's temporaries take over) the scaled copy; more by each
    // layer's dropout keep mask (1/32 of a bf16 P)
    const keepBits = config.numLayers * keepBitsBytes();
    expect(keepBits).toBe(48 * 2 ** 20);
    // (and more by what it keeps of each layer's attention so as not to run it again: savedAttentionBytes)
    const kept = keepBits + config.numLayers * savedAttentionBytes();
    expect(cublas - fused).toBeGreaterThanOrEqual(squares - kept);
    expect(cublas - fused).toBeLessThan(squares - kept + scaledQkv + 2 ** 20);  // and the pointer arrays
    // the mask bits are planned only for a step with dropout
    expect(fused - (await native()._testing.cudaArenaBytes(config, { ...shape, fusedBackward: true, dropout: false }))).toBe(keepBits);
    expect(cublas).toBe(await trainArena('none', 2, true));  // (the helper's default: the cuBLAS backward's plan)
  });

  test('the training forward keeps the residual stream in bf16 (half an fp32 copy) and no scratch wi output', async () => {
    // One more encoder layer adds exactly its saved inputs: two residual-stream copies (bf16), q|k|v and the wi
    // outputs (bf16), its attention's dropout keep mask, output and statistics, and its (IA)3 gradients (k, v, ff),
    // fp32.
    const deeper = parseT5Config({ ...t0_3bConfigJson(24), num_layers: 25 }, 'config.json');
    const shape = { batch: 8, encLen: 256, rows: 16, decLen: 8, training: true, nAdapters: 1, recompute: 'none' as const, foldedCross: true };
    // (the fused backward's plan: with the cuBLAS one the attention's [B, H, L, L] buffers are shared by all layers)
    const grow = (await native()._testing.cudaArenaBytes(deeper, { ...shape, fusedBackward: true })) - (await trainArena('none', 2, true, true));
    const Ne = 8 * 256, d = config.dModel, inner = config.numHeads * config.dKv, ff = config.dFf;
    expect(grow).toBe(Ne * (2 * d * 2 + 3 * inner * 2 + 2 * ff * 2) + keepBitsBytes() + savedAttentionBytes() + (2 * inner + ff) * 4);
  });

  test("recompute 'auto' keeps the most that fits in the free device memory", async () => {
    const MiB = 2 ** 20, granule = 64 * MiB, reserve = 256 * MiB;
    const allocated = async (level: Level) => Math.ceil((await trainArena(level)) / granule) * granule;
    const [none, attention, all] = [await allocated('none'), await allocated('attention'), await allocated('all')];
    const shape = { batch: 8, encLen: 256, rows: 16, decLen: 8, training: true, nAdapters: 1 };
    const choice = (have: number, free: number) => native()._testing.cudaRecomputeChoice(config, shape, have, free);
    expect(await choice(0, 16 * GiB)).toBe('none');
    expect(await choice(0, none + reserve)).toBe('none');
    expect(await choice(0, none + reserve - MiB)).toBe('attention');
    expect(await choice(0, attention + reserve)).toBe('attention');
    expect(await choice(0, attention + reserve - MiB)).toBe('all');
    expect(await choice(0, 0)).toBe('all');  // nothing fits: the smallest (its allocation reports the shortfall)
    // an arena already held counts: it is replaced by the bigger one, or already big enough
    expect(await choice(none, 0)).toBe('none');
    expect(await choice(all, attention - all + reserve)).toBe('attention');
  });

  test("recompute 'auto' within a reserved training shape: what the reserved arena holds, never a growth", async () => {
    const MiB = 2 ** 20, granule = 64 * MiB, reserve = 256 * MiB;
    const shape = (encLen: number) => ({ batch: 8, encLen, rows: 16, decLen: 8, training: true, nAdapters: 1 });
    const bytes = (encLen: number, recompute: Level) => native()._testing.cudaArenaBytes(config, { ...shape(encLen), recompute });
    // reserve() for 8 x 256 where 'none' does not fit: it picks 'attention' and holds that arena
    const noneAt256 = await bytes(256, 'none');
    const free = Math.ceil(noneAt256 / granule) * granule + reserve - MiB;
    expect(await native()._testing.cudaRecomputeChoice(config, shape(256), 0, free)).toBe('attention');
    const held = Math.ceil((await bytes(256, 'attention')) / granule) * granule;
    const left = free - held;  // free besides the reserved arena
    // a shorter step whose 'none' plan is above the arena held but fits in what is free: unreserved, 'auto' picks
    // 'none' and grows the arena; within the reservation it keeps to the arena held
    const encLen = 224;
    expect(await bytes(encLen, 'none')).toBeGreaterThan(held);
    expect(await native()._testing.cudaRecomputeChoice(config, shape(encLen), held, left)).toBe('none');
    const within = await native()._testing.cudaRecomputeChoice(config, shape(encLen), held, left, [shape(256)]);
    expect(within).toBe('attention');
    expect(await bytes(encLen, within)).toBeLessThanOrEqual(held);
    // every length up to the reserved one stays within the arena held; a longer step is not covered by it
    for (let len = 16; len <= 256; len += 16) {
      const level = await native()._testing.cudaRecomputeChoice(config, shape(len), held, left, [shape(256)]);
      expect({ len, fits: (await bytes(len, level)) <= held }).toEqual({ len, fits: true });
    }
    // a step outside the reserved shape (here: two adapters where one was reserved) is decided as before
    expect(await native()._testing.cudaRecomputeChoice(config, { ...shape(encLen), nAdapters: 2 }, held, left, [shape(256)])).toBe('none');
  });

  test("recompute 'auto' on the engine's default plan (the fused attention backward): the same thresholds, its sizes", async () => {
    const MiB = 2 ** 20, granule = 64 * MiB, reserve = 256 * MiB;
    const allocated = async (level: Level) => Math.ceil((await trainArena(level, 2, false, true)) / granule) * granule;
    const [none, attention] = [await allocated('none'), await allocated('attention')];
    expect(none).toBeGreaterThan(Math.ceil((await trainArena('none')) / granule) * granule);  // (its own sizes)
    const shape = { batch: 8, encLen: 256, rows: 16, decLen: 8, training: true, nAdapters: 1, fusedBackward: true };
    const choice = (have: number, free: number) => native()._testing.cudaRecomputeChoice(config, shape, have, free);
    expect(await choice(0, none + reserve)).toBe('none');
    expect(await choice(0, none + reserve - MiB)).toBe('attention');
    expect(await choice(0, attention + reserve)).toBe('attention');
    expect(await choice(0, attention + reserve - MiB)).toBe('all');
  });

  test('the cross-attention key/value gradients take one layer of memory, not all 24; folded, no keys/values', async () => {
    const Ne = 8 * 256, Nd = 16 * 8, d = config.dModel, inner = config.numHeads * config.dKv, ff = config.dFf;
    const H = config.numHeads, Le = 256;
    // One more decoder layer adds its cross k|v ([Ne, 2 inner], read by the backward), its saved activations
    // (three bf16 residual inputs, q|k|v, the cross q, the wi outputs) and its (IA)3 gradients (k, v, cross k,
    // cross v, ff), but no cross k|v gradient buffer of its own: that one is shared by all layers.
    const deeper = parseT5Config({ ...t0_3bConfigJson(24), num_decoder_layers: 25 }, 'config.json');
    const shape = { batch: 8, encLen: 256, rows: 16, decLen: 8, training: true, nAdapters: 1, recompute: 'none' as const };
    const grow = (await native()._testing.cudaArenaBytes(deeper, shape)) - (await trainArena('none'));
    const crossKv = Ne * 2 * inner * 2;
    const saved = Nd * (3 * d * 2 + 3 * inner * 2 + inner * 2 + 2 * ff * 2);
    const ia3Grads = (4 * inner + ff) * 4;
    expect(grow).toBe(crossKv + saved + ia3Grads);
    // folded: instead of keys/values, the layer's probabilities [Nd, H, Le] and its context before l_v (bf16)
    const foldedGrow = (await native()._testing.cudaArenaBytes(deeper, { ...shape, foldedCross: true })) - (await trainArena('none', 2, true));
    expect(foldedGrow).toBe(saved + Nd * H * Le * 2 + Nd * inner * 2 + ia3Grads);
    // at an odd encoder length the probabilities' rows are a multiple of 8 long (folded_cross_ld: 16-byte rows for
    // cuBLAS's tensor-core kernels): 249 keys take 256
    const odd = { ...shape, encLen: 249, foldedCross: true };
    const oddGrow = (await native()._testing.cudaArenaBytes(deeper, odd)) - (await native()._testing.cudaArenaBytes(config, odd));
    expect(oddGrow).toBe(saved + Nd * H * 256 * 2 + Nd * inner * 2 + ia3Grads);
  });

  test('RANK-3B-B32: the folded cross-attention needs no encoder keys/values (1.5 GiB of the arena)', async () => {
    const shape = { batch: 32, encLen: 256, rows: 64, decLen: 8, training: false, nAdapters: 1, recompute: 'none' as const };
    const precomputed = await native()._testing.cudaArenaBytes(config, shape);
    const folded = await native()._testing.cudaArenaBytes(config, { ...shape, foldedCross: true });
    const encoderOnly = await native()._testing.cudaArenaBytes(config, { ...shape, rows: 0, decLen: 0, foldedCross: true });
    // precomputed, the decoder's buffers set the arena: every layer's keys/values of 32 x 256 positions (1.5 GiB),
    // less the encoder temporaries they share bytes with. Folded, the encoder's temporaries set it.
    const Ne = 32 * 256, inner = config.numHeads * config.dKv;
    const keysValues = Ne * 2 * inner * config.numDecoderLayers * 2;
    expect(precomputed).toBeGreaterThan(keysValues);
    expect(precomputed - folded).toBeGreaterThan(1.1 * GiB);
    expect(Math.abs(folded - encoderOnly)).toBeLessThan(2 ** 20);
  });

  test('inference arena grows linearly with the batch; bad shapes are typed errors', async () => {
    const rank = (batch: number): Promise<number> =>
      native()._testing.cudaArenaBytes(config, { batch, encLen: 256, rows: 2 * batch, decLen: 8, training: false, nAdapters: 1, recompute: 'none' });
    const [b16, b32, b64] = await Promise.all([rank(16), rank(32), rank(64)]);
    expect(Math.abs((b64 - b32) - 2 * (b32 - b16))).toBeLessThan(2 ** 20);
    expect(b32 / GiB).toBeGreaterThan(1.5);  // every decoder layer's cross k|v of 32 x 256 tokens: 1.5 GiB
    const bad = native()._testing.cudaArenaBytes(config, { batch: 0, encLen: 256, rows: 0, decLen: 8, training: false, nAdapters: 1, recompute: 'none' });
    await expect(bad.catch((e) => { throw fromNative(e); })).rejects.toBeInstanceOf(InvalidArgumentError);
  });

  // cuda.reserve / reserveMemory plan the largest shape once: that is enough only if no smaller call needs more.
  test('a smaller call never needs more arena than the largest (what reserving the largest relies on)', async () => {
    let seed = 12345;
    const rand = (n: number): number => {  // 1..n (a small LCG: reproducible)
      seed = (seed * 1103515245 + 12345) % 2 ** 31;
      return 1 + (seed % n);
    };
    const bytes = (s: { batch: number; encLen: number; rows: number; decLen: number; training: boolean; nAdapters: number;
      recompute: Level; foldedCross: boolean; dropout: boolean }) => native()._testing.cudaArenaBytes(config, s);
    for (let i = 0; i < 60; i++) {
      const training = i % 2 === 0;
      const big = { batch: rand(32), encLen: rand(512), choices: rand(4), decLen: rand(16), nAdapters: rand(8) };
      const small = { batch: rand(big.batch), encLen: rand(big.encLen), choices: rand(big.choices), decLen: rand(big.decLen), nAdapters: rand(big.nAdapters) };
      const recompute = (['none', 'attention', 'all'] as const)[i % 3];
      for (const foldedCross of [false, true]) {
        const common = { training, recompute, foldedCross, dropout: training };
        const largest = await bytes({ ...common, batch: big.batch, encLen: big.encLen, rows: big.batch * big.choices, decLen: big.decLen, nAdapters: big.nAdapters });
        const smaller = await bytes({ ...common, batch: small.batch, encLen: small.encLen, rows: small.batch * small.choices, decLen: small.decLen, nAdapters: small.nAdapters });
        const noAdapters = await bytes({ ...common, batch: small.batch, encLen: small.encLen, rows: small.batch * small.choices, decLen: small.decLen, nAdapters: 0 });
        const noDropout = await bytes({ ...common, dropout: false, batch: small.batch, encLen: small.encLen, rows: small.batch * small.choices, decLen: small.decLen, nAdapters: small.nAdapters });
        const where = JSON.stringify({ big, small, ...common });
        expect({ where, fits: smaller <= largest }).toEqual({ where, fits: true });
        expect({ where, fits: noAdapters <= smaller && noDropout <= smaller }).toEqual({ where, fits: true });
      }
    }
  });

  // reserve() plans rank classification up to a shape once; a call within it runs as graph buckets pad it (filler
  // examples and rows, longer lengths), which may exceed the reserved numbers: its arena must still fit.
  test('every call within a reserved shape, padded as graph buckets pad it, fits in what reserve() plans', async () => {
    let seed = 777;
    const rand = (n: number): number => {  // 1..n
      seed = (seed * 1103515245 + 12345) % 2 ** 31;
      return 1 + (seed % n);
    };
    let padded = 0, fillers = 0;
    const cases: [number, number, number, number][] = [[5, 180, 2, 2], [9, 96, 2, 2], [5, 180, 2, 5]];  // (found by review)
    for (let i = 0; i < 40; i++) cases.push([rand(12), rand(400), rand(4), rand(12)]);
    for (const [batch, encLen, choices, decLen] of cases) {
      const reserved = await native()._testing.cudaReserveBytes(config, { batch, encLen, choices, decLen, nAdapters: 1 });
      for (let k = 0; k < 25; k++) {
        const b = rand(batch), le = rand(encLen), ld = rand(decLen);
        let rows = 0;
        for (let e = 0; e < b; e++) rows += rand(choices);
        const call = native().graphBucketCall(config, b, le, rows, ld);
        if (call.padded) padded++;
        if (call.batch > b) fillers++;
        for (const foldedCross of [false, true]) {
          const need = await native()._testing.cudaArenaBytes(config, { batch: call.batch, encLen: call.encLen, rows: call.rows,
            decLen: call.decLen, training: false, nAdapters: 1, recompute: 'none', foldedCross });
          const where = JSON.stringify({ reserved: { batch, encLen, choices, decLen }, call: { b, le, rows, ld }, runs: call, foldedCross });
          expect({ where, fits: need <= reserved }).toEqual({ where, fits: true });
        }
      }
    }
    expect(padded).toBeGreaterThan(100);  // (the cases exercise the padding, fillers included)
    expect(fillers).toBeGreaterThan(20);
  });

  test("graph bucket padding: counts above 4 in two steps per doubling; fillers only where they stay small", () => {
    const t = native();
    expect(native().graphBuckets([1], null, [1, 4, 5, 6, 7, 9, 13, 17, 25, 33]).counts).toEqual([1, 4, 6, 6, 8, 12, 16, 24, 32, 48]);
    // T0-3B: 5 x 208 padded tokens would be 6 x 208 with a filler, over 2.5 TFLOP: its lengths alone are padded
    expect(t.graphBucketCall(config, 5, 200, 10, 2)).toEqual({ batch: 5, encLen: 208, rows: 10, decLen: 2, padded: true });
    expect(t.graphBucketCall(config, 3, 100, 7, 5)).toEqual({ batch: 3, encLen: 104, rows: 8, decLen: 8, padded: true });
    expect(t.graphBucketCall(config, 5, 40, 10, 2)).toEqual({ batch: 6, encLen: 40, rows: 12, decLen: 2, padded: true });
    expect(t.graphBucketCall(config, 32, 256, 64, 8)).toEqual({ batch: 32, encLen: 256, rows: 64, decLen: 8, padded: false });
    // a larger call runs as it is but for its encoder length, aligned to 8 (cuBLAS's strided GEMMs over it)
    expect(t.graphBucketCall(config, 32, 249, 64, 8)).toEqual({ batch: 32, encLen: 256, rows: 64, decLen: 8, padded: false });
    expect(t.graphBucketCall(config, 32, 248, 64, 5)).toEqual({ batch: 32, encLen: 248, rows: 64, decLen: 5, padded: false });
    // not past the 2^24 input positions a call may have: 2^20 examples of 17 tokens stay at 17
    expect(t.graphBucketCall(config, 1 << 20, 17, 1 << 20, 2)).toEqual({ batch: 1 << 20, encLen: 17, rows: 1 << 20, decLen: 2, padded: false });
  });
});
