// CUDA backend behaviour beyond numbers: device selection, typed errors (out of memory, disposed), and that
// dispose() gives the device memory back. Skipped when CUDA is not usable.
import { spawnSync } from 'child_process';
import * as path from 'path';
import { DisposedError, InvalidArgumentError, OutOfMemoryError, resolveCheckpoint, T5Model } from '../../lib';
import { native } from '../../lib/native';
import { checkAdapterSnapshots } from '../helpers/adapter-snapshots';
import { loadFixture } from '../helpers/reference';
import { describeCuda, emulated, loadCuda, randomCheckpoint } from './helpers';

jest.setTimeout(300_000);

/** Device memory in use on the GPU we run on (MiB), from cudaMemGetInfo. */
function usedMiB(): number {
  const m = native().cudaMemoryInfo();
  if (!m) throw new Error('cudaMemoryInfo() returned null on a usable GPU');
  return (m.total - m.free) / (1 << 20);
}

describeCuda('CUDA backend behaviour', () => {
  const fx = loadFixture('tiny-gated-gelu-untied');

  test('the probe describes a usable GPU', () => {
    const p = native().probeCuda();
    expect(p.compiled).toBe(true);
    expect(p.usable).toBe(true);
    expect(p.reason).toBe('');
    expect(p.deviceName.length).toBeGreaterThan(0);
    expect(p.computeCapability).toBeGreaterThanOrEqual(80);
    expect(p.totalMemory).toBeGreaterThan(1 << 30);
    expect(p.cublasLibrary).toMatch(emulated() ? /emulated cuBLAS/ : /libcublas/);
  });

  test("device 'auto' picks CUDA and says so", async () => {
    const m = await T5Model.load(fx.dir, { device: 'auto' });
    try {
      expect(m.device).toBe('cuda');
      expect(m.deviceReason).toMatch(/CUDA/);
      expect(m.describe()).toContain(native().probeCuda().deviceName);
    } finally {
      await m.dispose();
    }
  });

  test('a batch too large for the GPU is an OutOfMemoryError, and the model keeps working', async () => {
    // fp32 mode keeps the batched-GEMM attention, whose score buffer grows with the square of the length
    const m = await loadCuda(fx.dir, 'fp32');
    try {
      const ok = await m.rankClassify(fx.inputIds, fx.choices);
      // 256 examples of 8192 tokens: the attention scores alone would need 256*4*8192^2*4 bytes = 275 GB
      const long = Array.from({ length: 256 }, (_, b) => [...Array.from({ length: 8191 }, (_, t) => 2 + ((b + t) % 100)), 1]);
      const choices = long.map(() => [[5, 1]]);
      const err = await m.rankClassify(long, choices, { batchSize: 256 }).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(OutOfMemoryError);
      expect((err as Error).message).toMatch(/out of GPU memory/);
      const again = await m.rankClassify(fx.inputIds, fx.choices);
      expect(again.logProbs).toEqual(ok.logProbs);
    } finally {
      await m.dispose();
    }
  });

  test('a batch the CPU backend rejects is rejected the same way (no answer choice for an example)', async () => {
    const { config, tensors } = await resolveCheckpoint(fx.dir);
    const nm = await native().loadModel(config, tensors, { device: 'cuda', threads: 1, cuda: { precision: 'fp32' } });
    try {
      const batch = {
        batchSize: 2, encLen: 2, inputIds: Int32Array.from([5, 1, 6, 1]), encLengths: Int32Array.from([2, 2]),
        numRows: 2, decLen: 2, choiceIds: Int32Array.from([3, 1, 4, 1]), rowStart: Int32Array.from([0, 0, 2]),
        adapterOfExample: Int32Array.from([-1, -1]),
      };
      const err = await nm.score(batch, [], false, false).then(() => undefined, (e: unknown) => e);
      expect((err as { code?: string }).code).toBe('E_INVALID_ARGUMENT');
      expect((err as Error).message).toMatch(/at least one answer choice/);
      // and the model keeps working
      const ok = await nm.score({ ...batch, rowStart: Int32Array.from([0, 1, 2]) }, [], false, false);
      expect(ok.tokenLogp.length).toBe(4);
    } finally {
      await nm.dispose();
    }
  });

  test('adapters between calls: device slots swapped, in-place edits seen after markChanged(), many adapters', async () => {
    const m = await loadCuda(fx.dir, 'fp32');
    try {
      const inputs = [[5, 6, 7, 8, 1], [9, 10, 1], [11, 12, 13, 1], [14, 1]];
      const choices = [[[4, 1], [5, 6, 1]], [[7, 1], [8, 1], [9, 1]], [[10, 1], [11, 1]], [[12, 1], [13, 14, 1]]];
      await checkAdapterSnapshots(m, inputs, choices, 1e-5);
    } finally {
      await m.dispose();
    }
  });

  // Emulator only: its device memory can be made small (TFEW_EMU_MEMORY_MB), in a child process of its own.
  (emulated() ? test : test.skip)('out of memory while growing the adapter buffer: typed, and later calls use their adapters', () => {
    const root = path.resolve(__dirname, '..', '..');
    const script = `
      const { T5Model, IA3Adapter } = require(${JSON.stringify(path.join(root, 'dist', 'lib'))});
      (async () => {
        const m = await T5Model.load(${JSON.stringify(fx.dir)}, { device: 'cuda', cuda: { precision: 'fp32' } });
        const a = IA3Adapter.create(m, 1.1);
        const inputs = [[5, 6, 7, 1]], choices = [[[4, 1], [5, 1]]];
        const logp = async (adapter) => (await m.rankClassify(inputs, choices, { adapter })).logProbs[0];
        const out = { withA: await logp(a), none: await logp(null) };
        const many = Array.from({ length: 4000 }, () => IA3Adapter.create(m, 1));
        out.big = await m.rankClassify(many.map(() => [5, 1]), many.map(() => [[4, 1]]), { adapter: many, batchSize: 4000 })
          .then(() => 'ok', (e) => e.code);
        out.after = await logp(a);
        const nine = Array.from({ length: 9 }, (_, i) => (i === 0 ? a : IA3Adapter.create(m, 1)));
        out.nine = (await m.rankClassify(nine.map(() => inputs[0]), nine.map(() => choices[0]), { adapter: nine, batchSize: 9 })).logProbs[0];
        await m.dispose();
        process.stdout.write(JSON.stringify(out));
      })().catch((e) => { process.stdout.write(JSON.stringify({ fatal: String(e) })); });`;
    const child = spawnSync(process.execPath, ['-e', script], { env: { ...process.env, TFEW_EMU_MEMORY_MB: '100' }, encoding: 'utf8', timeout: 240_000 });
    expect(child.status).toBe(0);
    const out = JSON.parse(child.stdout);
    expect(out.big).toBe('E_OUT_OF_MEMORY');
    const rel = (x: number[], y: number[]) => Math.max(...x.map((v, i) => Math.abs(v - y[i]) / Math.abs(y[i])));
    expect(rel(out.withA, out.none)).toBeGreaterThan(1e-3);  // (the adapter matters)
    expect(rel(out.after, out.withA)).toBeLessThan(1e-6);
    expect(rel(out.nine, out.withA)).toBeLessThan(1e-6);
  });

  test('TFEW_CUDA_ATTENTION_KERNEL that names no kernel is refused at load (not taken as the default)', () => {
    // The native side reads the real environment, which jest's process.env does not reach: child processes.
    const root = path.resolve(__dirname, '..', '..');
    const script = `
      const { T5Model } = require(${JSON.stringify(path.join(root, 'dist', 'lib'))});
      T5Model.load(${JSON.stringify(fx.dir)}, { device: 'cuda', cuda: { precision: 'bf16' } })
        .then(async (m) => { const d = m.describe(); await m.dispose(); process.stdout.write(JSON.stringify({ describe: d })); },
              (e) => process.stdout.write(JSON.stringify({ name: e.name, code: e.code, message: e.message })));`;
    const run = (kernel: string) => {
      const child = spawnSync(process.execPath, ['-e', script],
                              { env: { ...process.env, TFEW_CUDA_ATTENTION_KERNEL: kernel }, encoding: 'utf8', timeout: 240_000 });
      expect(child.status).toBe(0);
      return JSON.parse(child.stdout) as { describe?: string; name?: string; code?: string; message?: string };
    };
    const typo = run('wmmma');
    expect(typo.name).toBe(InvalidArgumentError.name);
    expect(typo.code).toBe('E_INVALID_ARGUMENT');
    expect(typo.message).toMatch(/TFEW_CUDA_ATTENTION_KERNEL must be 'mma' \(the default\) or 'wmma', got 'wmmma'/);
    expect(run('mma').describe).toMatch(/encoder attention fused \(backward/);  // the mma.sync kernel: no "(WMMA kernel)"
    expect(run('wmma').describe).toMatch(/encoder attention fused \(WMMA kernel\)/);
  });

  test('a disposed model rejects with DisposedError', async () => {
    const m = await loadCuda(fx.dir, 'bf16');
    await m.dispose();
    expect(m.disposed).toBe(true);
    await expect(m.rankClassify(fx.inputIds, fx.choices)).rejects.toBeInstanceOf(DisposedError);
    await m.dispose(); // twice is fine
  });

  test('dispose() returns the device memory (cudaMemGetInfo)', async () => {
    const { dir, weightBytesBf16 } = randomCheckpoint();
    // warm the CUDA context so its own memory is not counted
    const warm = await loadCuda(fx.dir, 'bf16');
    await warm.dispose();
    const before = usedMiB();
    const m = await loadCuda(dir, 'bf16');
    await m.rankClassify([[5, 6, 7, 1]], [[[8, 1], [9, 1]]]);
    const loaded = usedMiB();
    await m.dispose();
    const after = usedMiB();
    // at least the bf16 weights (2+2 layers of the T0-3B width: ~0.7 GB)
    expect(loaded - before).toBeGreaterThan((0.95 * weightBytesBf16) / (1 << 20));
    expect(after - before).toBeLessThan(64);
  });
});
