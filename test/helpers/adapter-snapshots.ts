// How a backend treats adapters between calls (the addon's snapshots per IA3Adapter id and version, and on CUDA
// the device slots keyed by snapshot): shared by test/model-lifecycle.test.ts (CPU) and
// test/gpu/cuda-behaviour.test.ts (CUDA). `tol`: the relative error allowed between two runs of the same inputs.
import { IA3Adapter, T5Model } from '../../lib';

const maxRel = (a: number[], b: number[]) => Math.max(...a.map((x, i) => Math.abs(x - b[i]) / Math.max(Math.abs(b[i]), 1e-6)));

function spread(model: T5Model, seed: number): IA3Adapter {
  const a = IA3Adapter.create(model);
  let s = seed;
  for (let i = 0; i < a.data.length; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    a.data[i] = 0.7 + 0.6 * (s / 4294967296);
  }
  return a;  // (first used after this: version 0 holds these values)
}

export async function checkAdapterSnapshots(model: T5Model, inputs: number[][], choices: number[][][], tol: number): Promise<void> {
  const score = async (adapter: IA3Adapter | (IA3Adapter | null)[] | null) =>
    (await model.rankClassify(inputs, choices, { adapter })).logProbs.flat();
  const a = spread(model, 1), b = spread(model, 2);
  const withA = await score(a);
  const withB = await score(b);
  expect(maxRel(withA, withB)).toBeGreaterThan(1e-3);  // the two adapters are told apart

  // The slots swap between calls: [a, b] then [b, a] (per example), each answered with its own adapter.
  const n = inputs.length;
  const ab = Array.from({ length: n }, (_, i) => (i % 2 === 0 ? a : b));
  const ba = Array.from({ length: n }, (_, i) => (i % 2 === 0 ? b : a));
  const mixedAB = await score(ab), mixedBA = await score(ba);
  const rows = choices.map((c) => c.length);
  let r = 0;
  for (let i = 0; i < n; i++) {
    const own = (adapters: IA3Adapter[]) => (adapters[i] === a ? withA : withB).slice(r, r + rows[i]);
    expect(maxRel(mixedAB.slice(r, r + rows[i]), own(ab))).toBeLessThan(tol);
    expect(maxRel(mixedBA.slice(r, r + rows[i]), own(ba))).toBeLessThan(tol);
    r += rows[i];
  }

  // An in-place edit is seen after markChanged(), and not before (the snapshot of the version is used).
  const saved = Float32Array.from(a.data);
  a.data.fill(1);
  expect(maxRel(await score(a), withA)).toBeLessThan(tol);
  a.markChanged();
  const ones = await score(a);
  expect(maxRel(ones, await score(null))).toBeLessThan(tol);
  a.data.set(saved);
  a.markChanged();
  expect(maxRel(await score(a), withA)).toBeLessThan(tol);

  // More adapters than the snapshot table holds (256 for small models), then the first ones again: their own values.
  const many = Array.from({ length: 300 }, (_, i) => spread(model, 100 + i));
  const first = await score(many[0]);
  for (const m of many) await model.rankClassify(inputs.slice(0, 1), choices.slice(0, 1), { adapter: m });
  expect(maxRel(await score(many[0]), first)).toBeLessThan(tol);
  expect(maxRel(await score(a), withA)).toBeLessThan(tol);
}
