// The CPU backend's attention (cuda/cpu/attention.cc) through the _testing.cpuAttention hook, against a float64
// computation written here from T5's definition: scores = q.k (no 1/sqrt(d_kv)) + bias, keys j >= key_len[s] and
// (causal) j > i masked, softmax, inverted dropout on the probabilities with the mask of (seed, site, flat index of
// the probability), out = P'v; dq, dk, dv by the hand-derived backward, dk/dv added to their initial values.
// Shapes: one sequence, padded sequences of different lengths, causal self-attention, cross-attention with
// query sequences sharing K/V (kvOf), with and without bias, dropout 0 and 0.1, d_kv 64 and 7, 1 and 3 heads;
// 1 and 3 threads bit-identical. Also: the dropout rate and pattern as the attention applies it, padded keys
// taking no part (NaN in their rows), central differences of the native forward against the native backward,
// position_bias against T5's bucket rule, and the hooks' argument errors.
import { native } from '../lib/native';

interface AttentionArgs {
  q: Float32Array; k: Float32Array; v: Float32Array; dout: Float32Array; kvOf: Int32Array; keyLen: Int32Array;
  bias?: Float32Array | null; dkInit?: Float32Array | null; dvInit?: Float32Array | null;
  batch: number; heads: number; dKv: number; qLen: number; kLen: number; kvBatch: number; causal: boolean;
  dropoutRate: number; seed: bigint; site: bigint; threads: number;
}
interface AttentionResult { out: Float32Array; probs: Float32Array; dq: Float32Array; dk: Float32Array; dv: Float32Array }
// The hooks this file tests (cuda/napi/addon.cc); not part of lib's typed API.
interface Hooks {
  cpuAttention(o: AttentionArgs): Promise<AttentionResult>;
  cpuDropoutKeep(seed: bigint, site: bigint, rate: number, n: number): Promise<Uint8Array>;
  cpuPositionBias(o: { table: Float32Array; heads: number; qLen: number; kLen: number; bidirectional: boolean;
    numBuckets: number; maxDistance: number }): Promise<Float32Array>;
}
const hooks = (): Hooks => native()._testing as unknown as Hooks;

/** Deterministic values in [-scale, scale) (xorshift32). */
function values(seed: number, n: number, scale = 1): Float32Array {
  let x = (seed * 2654435761 + 1) >>> 0 || 1;
  const a = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0;
    a[i] = (x / 4294967296 * 2 - 1) * scale;
  }
  return a;
}

interface Case {
  name: string; batch: number; heads: number; dKv: number; qLen: number; kLen: number; kvBatch: number;
  causal: boolean; keyLen: number[]; kvOf: number[]; bias: boolean; rate: number; init: boolean;
}

function makeArgs(c: Case, salt = 0): AttentionArgs {
  const inner = c.heads * c.dKv, nq = c.batch * c.qLen * inner, nk = c.kvBatch * c.kLen * inner;
  return {
    q: values(1 + salt, nq), k: values(2 + salt, nk), v: values(3 + salt, nk), dout: values(4 + salt, nq),
    bias: c.bias ? values(5 + salt, c.heads * c.qLen * c.kLen, 2) : null,
    dkInit: c.init ? values(6 + salt, nk, 0.5) : null, dvInit: c.init ? values(7 + salt, nk, 0.5) : null,
    kvOf: Int32Array.from(c.kvOf), keyLen: Int32Array.from(c.keyLen),
    batch: c.batch, heads: c.heads, dKv: c.dKv, qLen: c.qLen, kLen: c.kLen, kvBatch: c.kvBatch, causal: c.causal,
    dropoutRate: c.rate, seed: 0x9e3779b97f4a7c15n, site: 4242n, threads: 1,
  };
}

type Ref = { out: Float64Array; probs: Float64Array; dq: Float64Array; dk: Float64Array; dv: Float64Array };

/** The float64 attention, forward and backward. keep[flat probs index] is the dropout mask (null: rate 0). */
function reference(a: AttentionArgs, keep: Uint8Array | null): Ref {
  const { batch: B, heads: H, dKv: D, qLen: Lq, kLen: Lk } = a;
  const inner = H * D;
  const r: Ref = {
    out: new Float64Array(B * Lq * inner), probs: new Float64Array(B * H * Lq * Lk), dq: new Float64Array(B * Lq * inner),
    dk: Float64Array.from(a.dkInit ?? new Float32Array(a.k.length)), dv: Float64Array.from(a.dvInit ?? new Float32Array(a.v.length)),
  };
  const keptScale = 1 / (1 - Math.fround(a.dropoutRate));  // (the rate reaches C++ as a float)
  for (let s = 0; s < B; s++)
    for (let h = 0; h < H; h++) {
      const kv = a.kvOf[s];
      const qi = (i: number, c: number) => (s * Lq + i) * inner + h * D + c;
      const kj = (j: number, c: number) => (kv * Lk + j) * inner + h * D + c;
      const P = new Float64Array(Lq * Lk), scale = new Float64Array(Lq * Lk), dS = new Float64Array(Lq * Lk);
      for (let i = 0; i < Lq; i++) {
        const nk = Math.min(a.keyLen[s], a.causal ? i + 1 : Lk);
        const score = new Float64Array(nk);
        for (let j = 0; j < nk; j++) {
          for (let c = 0; c < D; c++) score[j] += a.q[qi(i, c)] * a.k[kj(j, c)];
          if (a.bias) score[j] += a.bias[(h * Lq + i) * Lk + j];
        }
        const mx = Math.max(...score);
        let sum = 0;
        for (let j = 0; j < nk; j++) sum += Math.exp(score[j] - mx);
        for (let j = 0; j < nk; j++) {
          const flat = ((s * H + h) * Lq + i) * Lk + j;
          P[i * Lk + j] = r.probs[flat] = Math.exp(score[j] - mx) / sum;
          scale[i * Lk + j] = keep ? (keep[flat] ? keptScale : 0) : 1;
        }
        // out = P' v; dP = (dout v^T) * scale; dS = P (dP - sum_j P dP)
        const dP = new Float64Array(nk);
        let pdp = 0;
        for (let j = 0; j < nk; j++) {
          const pd = P[i * Lk + j] * scale[i * Lk + j];
          for (let c = 0; c < D; c++) {
            r.out[qi(i, c)] += pd * a.v[kj(j, c)];
            dP[j] += a.dout[qi(i, c)] * a.v[kj(j, c)];
            r.dv[kj(j, c)] += pd * a.dout[qi(i, c)];
          }
          dP[j] *= scale[i * Lk + j];
          pdp += P[i * Lk + j] * dP[j];
        }
        for (let j = 0; j < nk; j++) dS[i * Lk + j] = P[i * Lk + j] * (dP[j] - pdp);
      }
      // dq = dS k; dk += dS^T q (no scale factor: the scores have none)
      for (let i = 0; i < Lq; i++)
        for (let j = 0; j < Lk; j++)
          for (let c = 0; c < D; c++) {
            r.dq[qi(i, c)] += dS[i * Lk + j] * a.k[kj(j, c)];
            r.dk[kj(j, c)] += dS[i * Lk + j] * a.q[qi(i, c)];
          }
    }
  return r;
}

/** max |got - want| / max |want|. */
function relError(got: Float32Array, want: Float64Array): number {
  let err = 0, mag = 0;
  for (let i = 0; i < want.length; i++) {
    err = Math.max(err, Math.abs(got[i] - want[i]));
    mag = Math.max(mag, Math.abs(want[i]));
  }
  return err / Math.max(mag, 1e-30);
}

const bits = (a: Float32Array) => Buffer.from(a.buffer, a.byteOffset, a.byteLength);
const sameBits = (a: Float32Array, b: Float32Array) => bits(a).equals(bits(b));
const FIELDS = ['out', 'probs', 'dq', 'dk', 'dv'] as const;

async function mask(a: AttentionArgs): Promise<Uint8Array | null> {
  return a.dropoutRate > 0 ? hooks().cpuDropoutKeep(a.seed, a.site, a.dropoutRate, a.batch * a.heads * a.qLen * a.kLen) : null;
}

const base = { batch: 1, heads: 1, dKv: 64, kvBatch: 1, causal: false, bias: false, rate: 0, init: false };
const CASES: Case[] = [
  { ...base, name: 'one sequence, one head', qLen: 5, kLen: 5, keyLen: [5], kvOf: [0] },
  { ...base, name: 'one sequence, 3 heads, bias, dropout 0.1', heads: 3, qLen: 6, kLen: 6, keyLen: [6], kvOf: [0], bias: true, rate: 0.1 },
  { ...base, name: 'padded sequences (key_len 6, 3, 1), d_kv 7, bias', batch: 3, kvBatch: 3, heads: 3, dKv: 7, qLen: 6, kLen: 6,
    keyLen: [6, 3, 1], kvOf: [0, 1, 2], bias: true, init: true },
  { ...base, name: 'padded sequences, dropout 0.1', batch: 2, kvBatch: 2, heads: 3, qLen: 8, kLen: 8, keyLen: [5, 8], kvOf: [0, 1], rate: 0.1 },
  { ...base, name: 'causal, q_len == k_len, bias, dropout 0.1', batch: 2, kvBatch: 2, heads: 3, qLen: 7, kLen: 7, keyLen: [7, 7],
    kvOf: [0, 1], causal: true, bias: true, rate: 0.1, init: true },
  { ...base, name: 'causal with padding, d_kv 7', batch: 2, kvBatch: 2, dKv: 7, qLen: 7, kLen: 7, keyLen: [7, 4], kvOf: [0, 1],
    causal: true },
  { ...base, name: 'cross-attention: 3 query sequences on 2 K/V (kvOf 0, 0, 1), q_len 4, k_len 9', batch: 3, kvBatch: 2, heads: 3,
    dKv: 7, qLen: 4, kLen: 9, keyLen: [9, 9, 5], kvOf: [0, 0, 1], init: true },
  { ...base, name: 'cross-attention sharing K/V, d_kv 64, bias, dropout 0.1', batch: 3, kvBatch: 2, heads: 3, qLen: 4, kLen: 9,
    keyLen: [6, 6, 9], kvOf: [1, 1, 0], bias: true, rate: 0.1, init: true },
  { ...base, name: 'cross-attention, q_len > k_len, dropout 0.1', batch: 3, kvBatch: 2, dKv: 7, qLen: 10, kLen: 3, keyLen: [3, 2, 3],
    kvOf: [0, 1, 1], rate: 0.1 },
];

describe('CPU attention', () => {
  test.each(CASES.map((c) => [c.name, c] as const))('%s: matches float64 within 1e-5, 1 and 3 threads bit-identical', async (_, c) => {
    const args = makeArgs(c);
    const got = await hooks().cpuAttention(args);
    const again = await hooks().cpuAttention({ ...args, threads: 3 });
    expect(FIELDS.filter((f) => !sameBits(got[f], again[f]))).toEqual([]);
    const want = reference(args, await mask(args));
    const errors = FIELDS.map((f) => [f, relError(got[f], want[f])] as const);
    expect(errors.filter(([, e]) => !(e <= 1e-5))).toEqual([]);  // (lists the fields that are off, with their errors)
    // masked keys (padding, and the future when causal) get a probability of exactly 0
    for (let i = 0; i < want.probs.length; i++) if (want.probs[i] === 0) expect(got.probs[i]).toBe(0);
  });

  test('dropout 0.1: about 10% of the visible probabilities dropped, the mask of their flat index; it changes with seed and site', async () => {
    // v one-hot per key (v[j] = e_j in each head's columns): out[s, i, h*d_kv + j] is then P'[i, j] exactly
    const c: Case = { ...base, name: '', batch: 2, kvBatch: 2, heads: 3, qLen: 64, kLen: 64, keyLen: [64, 40], kvOf: [0, 1], rate: 0.1 };
    const args = makeArgs(c);
    args.q = values(1, args.q.length, 0.3);  // (small scores: no probability underflows to 0)
    args.v.fill(0);
    for (let kv = 0; kv < 2; kv++) for (let j = 0; j < 64; j++) for (let h = 0; h < 3; h++) args.v[(kv * 64 + j) * 192 + h * 64 + j] = 1;
    const dropped = (r: AttentionResult) => {
      const d: boolean[] = [];
      for (let s = 0; s < 2; s++) for (let h = 0; h < 3; h++) for (let i = 0; i < 64; i++) for (let j = 0; j < c.keyLen[s]; j++)
        d.push(r.out[(s * 64 + i) * 192 + h * 64 + j] === 0);
      return d;
    };
    const r = await hooks().cpuAttention(args);
    const keep = (await mask(args))!;
    const d = dropped(r);
    const fraction = d.filter(Boolean).length / d.length;
    expect(fraction).toBeGreaterThan(0.08);
    expect(fraction).toBeLessThan(0.12);
    // dropped exactly where the predicate says, kept ones scaled by 1 / 0.9
    let n = 0, wrongMask = 0, wrongScale = 0;
    for (let s = 0; s < 2; s++) for (let h = 0; h < 3; h++) for (let i = 0; i < 64; i++) for (let j = 0; j < c.keyLen[s]; j++) {
      const flat = ((s * 3 + h) * 64 + i) * 64 + j;
      if (d[n++] !== !keep[flat]) wrongMask++;
      if (keep[flat] && !(Math.abs(r.out[(s * 64 + i) * 192 + h * 64 + j] / r.probs[flat] * 0.9 - 1) < 1e-6)) wrongScale++;
    }
    expect([wrongMask, wrongScale]).toEqual([0, 0]);
    // the same (seed, site) repeats the mask; another seed or site gives another one (~18% of the entries differ)
    expect(sameBits((await hooks().cpuAttention(args)).out, r.out)).toBe(true);
    const differ = (e: boolean[]) => e.filter((x, i) => x !== d[i]).length / d.length;
    expect(differ(dropped(await hooks().cpuAttention({ ...args, seed: args.seed + 1n })))).toBeGreaterThan(0.1);
    expect(differ(dropped(await hooks().cpuAttention({ ...args, site: args.site + 1n })))).toBeGreaterThan(0.1);
    // the predicate alone: rate 0.1 over 100000 indices, and a different pattern per seed and per site
    const m = await hooks().cpuDropoutKeep(7n, 3n, 0.1, 100000);
    const m2 = await hooks().cpuDropoutKeep(8n, 3n, 0.1, 100000), m3 = await hooks().cpuDropoutKeep(7n, 4n, 0.1, 100000);
    expect(Math.abs(m.filter((x) => x === 0).length / 1e5 - 0.1)).toBeLessThan(0.005);
    expect(m.filter((x, i) => x !== m2[i]).length / 1e5).toBeGreaterThan(0.15);
    expect(m.filter((x, i) => x !== m3[i]).length / 1e5).toBeGreaterThan(0.15);
    expect((await hooks().cpuDropoutKeep(7n, 3n, 0, 1000)).every((x) => x === 1)).toBe(true);
  });

  test.each([0, 0.1])('padded keys take no part (dropout %s): NaN/Inf in their k/v rows leave out, probs and dq bit-identical; their dk/dv stay at the initial value', async (rate) => {
    const c: Case = { ...base, name: '', batch: 3, kvBatch: 2, heads: 3, dKv: 7, qLen: 4, kLen: 9, keyLen: [7, 5, 4], kvOf: [0, 0, 1],
      bias: true, rate, init: true };
    const args = makeArgs(c);
    const valid = [7, 4];  // keys of each K/V sequence some query sequence sees
    const poisoned = { ...args, k: args.k.slice(), v: args.v.slice() };
    const inner = 21;
    for (let kv = 0; kv < 2; kv++)
      for (let j = valid[kv]; j < 9; j++)
        for (let e = 0; e < inner; e++) {
          const at = (kv * 9 + j) * inner + e;
          poisoned.k[at] = e % 2 ? NaN : 1e30;
          poisoned.v[at] = e % 3 ? Infinity : -7;
        }
    const clean = await hooks().cpuAttention(args), dirty = await hooks().cpuAttention(poisoned);
    expect(FIELDS.filter((f) => !sameBits(clean[f], dirty[f]))).toEqual([]);
    for (let kv = 0; kv < 2; kv++)
      for (let j = valid[kv]; j < 9; j++) {
        const row = (a: Float32Array) => Array.from(a.subarray((kv * 9 + j) * inner, (kv * 9 + j + 1) * inner));
        expect(row(clean.dk)).toEqual(row(args.dkInit!));
        expect(row(clean.dv)).toEqual(row(args.dvInit!));
      }
    // and without initial values they are zeros
    const zero = await hooks().cpuAttention({ ...poisoned, dkInit: null, dvInit: null });
    for (let j = 4; j < 9; j++) for (let e = 0; e < inner; e++) {
      expect(zero.dk[(9 + j) * inner + e]).toBe(0);
      expect(zero.dv[(9 + j) * inner + e]).toBe(0);
    }
  });

  test('dk and dv accumulate: the initial values plus the gradients computed from zeros', async () => {
    const c = CASES.find((x) => x.name.startsWith('cross-attention sharing'))!;
    const args = makeArgs(c);
    const withInit = await hooks().cpuAttention(args), fromZero = await hooks().cpuAttention({ ...args, dkInit: null, dvInit: null });
    for (const f of ['dk', 'dv'] as const) {
      const init = f === 'dk' ? args.dkInit! : args.dvInit!;
      let worst = 0;
      for (let i = 0; i < init.length; i++)
        worst = Math.max(worst, Math.abs(withInit[f][i] - (init[i] + fromZero[f][i])) / (Math.abs(init[i]) + Math.abs(fromZero[f][i]) + 1e-30));
      expect(worst).toBeLessThan(1e-5);
    }
    expect(sameBits(withInit.dq, fromZero.dq) && sameBits(withInit.out, fromZero.out)).toBe(true);
  });

  test.each([0, 0.1])('central differences of sum(out * dout) through the native forward match dq, dk, dv (dropout %s)', async (rate) => {
    const c: Case = { ...base, name: '', batch: 3, kvBatch: 2, heads: 2, dKv: 7, qLen: 5, kLen: 6, keyLen: [6, 4, 5], kvOf: [0, 0, 1],
      causal: true, bias: true, rate };
    const args = makeArgs(c);
    const grads = await hooks().cpuAttention(args);
    const loss = async (a: AttentionArgs) => {
      const { out } = await hooks().cpuAttention(a);
      let s = 0;
      for (let i = 0; i < out.length; i++) s += out[i] * a.dout[i];
      return s;
    };
    for (const f of ['q', 'k', 'v'] as const) {
      const g = grads[f === 'q' ? 'dq' : f === 'k' ? 'dk' : 'dv'];
      const scale = Math.max(...Array.from(g, Math.abs));
      // the 4 largest gradients and 8 spread over the tensor (among them zeros: padded and masked entries)
      const order = Array.from(g.keys()).sort((x, y) => Math.abs(g[y]) - Math.abs(g[x]));
      const picks = [...order.slice(0, 4), ...Array.from({ length: 8 }, (_, n) => Math.floor((n + 0.5) * g.length / 8))];
      for (const e of picks) {
        const plus = args[f].slice(), minus = args[f].slice();
        plus[e] += 1e-2;
        minus[e] -= 1e-2;
        const fd = ((await loss({ ...args, [f]: plus })) - (await loss({ ...args, [f]: minus }))) / (plus[e] - minus[e]);
        // (observed: within 1e-5 of each other; the fp32 forward's rounding and the h^2 terms stay far below this)
        expect([f, e, Math.abs(fd - g[e]) <= 1e-3 * (Math.abs(g[e]) + scale)]).toEqual([f, e, true]);
      }
    }
  });

  test('position_bias: bias[h][i][j] = table[bucket(j - i)][h] with T5 buckets (float32 log, truncation)', async () => {
    // T5's relative_position_bucket from its definition, the log in float32 as torch computes it
    const bucket = (rel: number, bidirectional: boolean, numBuckets: number, maxDistance: number) => {
      let b = 0, n: number;
      if (bidirectional) {
        numBuckets /= 2;
        if (rel > 0) b += numBuckets;
        n = Math.abs(rel);
      } else n = Math.max(-rel, 0);
      const maxExact = numBuckets / 2;
      if (n < maxExact) return b + n;
      const f = Math.fround;
      const scaled = f(f(f(Math.log(f(n / maxExact))) / f(Math.log(maxDistance / maxExact))) * (numBuckets - maxExact));
      return b + Math.min(maxExact + Math.trunc(scaled), numBuckets - 1);
    };
    // a few values any T5 implementation gives (32 buckets, max distance 128)
    expect([0, -1, 1, -7, -8, -200, 200].map((r) => bucket(r, true, 32, 128))).toEqual([0, 1, 17, 7, 8, 15, 31]);
    expect([5, 0, -1, -15, -16, -200].map((r) => bucket(r, false, 32, 128))).toEqual([0, 0, 1, 15, 16, 31]);
    for (const [bidirectional, qLen, kLen] of [[true, 150, 150], [false, 150, 150], [true, 3, 140], [false, 140, 3]] as const) {
      const heads = 3, numBuckets = 32, maxDistance = 128;
      const table = Float32Array.from({ length: numBuckets * heads }, (_, n) => Math.floor(n / heads) * 100 + (n % heads));
      const bias = await hooks().cpuPositionBias({ table, heads, qLen, kLen, bidirectional, numBuckets, maxDistance });
      let mismatches = 0;
      for (let h = 0; h < heads; h++) for (let i = 0; i < qLen; i++) for (let j = 0; j < kLen; j++)
        if (bias[(h * qLen + i) * kLen + j] !== bucket(j - i, bidirectional, numBuckets, maxDistance) * 100 + h) mismatches++;
      expect(mismatches).toBe(0);
    }
  });

  // Each malformed argument rejects (never throws) with E_INVALID_ARGUMENT.
  const c3: Case = { ...base, name: '', batch: 3, kvBatch: 2, heads: 2, dKv: 3, qLen: 4, kLen: 5, keyLen: [5, 5, 2], kvOf: [0, 0, 1], bias: true, init: true };
  const good = makeArgs(c3);
  const badAttention: [string, Partial<Record<keyof AttentionArgs, unknown>>, RegExp][] = [
    ['q too short', { q: good.q.subarray(1) }, /'q' must be a Float32Array of 72/],
    ['k too long', { k: new Float32Array(good.k.length + 1) }, /'k'/],
    ['v a Float64Array', { v: Float64Array.from(good.v) }, /'v'/],
    ['dout missing', { dout: undefined }, /'dout'/],
    ['bias of the wrong length', { bias: new Float32Array(10) }, /'bias'/],
    ['dkInit of the wrong length', { dkInit: new Float32Array(3) }, /'dkInit'/],
    ['dvInit of the wrong length', { dvInit: new Float32Array(3) }, /'dvInit'/],
    ['kvOf too short', { kvOf: Int32Array.of(0, 0) }, /one entry per query sequence/],
    ['keyLen a plain array', { keyLen: [5, 5, 2] }, /Int32Array for 'keyLen'/],
    ['kvOf entry -1', { kvOf: Int32Array.of(0, -1, 1) }, /kvOf entries/],
    ['kvOf entry == kvBatch', { kvOf: Int32Array.of(0, 2, 1) }, /kvOf entries/],
    ['keyLen 0', { keyLen: Int32Array.of(5, 0, 2) }, /keyLen entries in \[1, kLen\]/],
    ['keyLen > kLen', { keyLen: Int32Array.of(5, 6, 2) }, /keyLen entries/],
    ['batch 0', { batch: 0 }, /'batch'/],
    ['heads -1', { heads: -1 }, /'heads'/],
    ['dKv 1.5', { dKv: 1.5 }, /'dKv'/],
    ['qLen missing', { qLen: undefined }, /'qLen'/],
    ['kvBatch 0', { kvBatch: 0 }, /'kvBatch'/],
    ['threads 0', { threads: 0 }, /threads/],
    ['causal 1', { causal: 1 }, /'causal'/],
    ['dropoutRate 1', { dropoutRate: 1 }, /'dropoutRate'/],
    ['dropoutRate -0.1', { dropoutRate: -0.1 }, /'dropoutRate'/],
    ['dropoutRate NaN', { dropoutRate: NaN }, /'dropoutRate'/],
    ['seed a Number', { seed: 1 }, /'seed' must be a BigInt/],
    ['seed negative', { seed: -1n }, /'seed'/],
    ['seed 2^64', { seed: 1n << 64n }, /'seed'/],
    ['site a string', { site: '3' }, /'site'/],
  ];
  test.each(badAttention)('cpuAttention rejects %s', async (_, change, message) => {
    const call = hooks().cpuAttention({ ...good, ...change } as AttentionArgs);
    await expect(call).rejects.toMatchObject({ code: 'E_INVALID_ARGUMENT', message: expect.stringMatching(message) });
  });

  test('cpuDropoutKeep and cpuPositionBias reject malformed arguments', async () => {
    const h = hooks() as unknown as Record<string, (...a: unknown[]) => Promise<unknown>>;
    const pb = { table: new Float32Array(64), heads: 2, qLen: 2, kLen: 2, bidirectional: true, numBuckets: 32, maxDistance: 128 };
    for (const [fn, a, message] of [
      ['cpuDropoutKeep', [1, 2n, 0.1, 10], /'seed'/], ['cpuDropoutKeep', [1n, 2n, 1, 10], /'rate'/],
      ['cpuDropoutKeep', [1n, 2n, 0.1, -1], /n must be/], ['cpuDropoutKeep', [], /'seed'/],
      ['cpuPositionBias', [{ ...pb, table: new Float32Array(63) }], /'table'/],
      ['cpuPositionBias', [{ ...pb, numBuckets: 3 }], /too few buckets/],
      ['cpuPositionBias', [{ ...pb, maxDistance: 8 }], /too few buckets/],
      ['cpuPositionBias', [{ ...pb, heads: 0 }], /'heads'/],
    ] as const) await expect(h[fn](...a)).rejects.toMatchObject({ code: 'E_INVALID_ARGUMENT', message: expect.stringMatching(message) });
  });
});
