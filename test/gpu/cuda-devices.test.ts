// Which GPU a model runs on (cuda.device): one process can hold a model on each GPU. Each model's work runs on
// its own GPU whatever thread of the pool runs it (the engine sets its device before any work); memory is taken
// from that GPU and given back to it; an index that is not visible is a DeviceUnavailableError naming the count.
//
// On the emulator the checks with two GPUs run in a child process with TFEW_EMU_DEVICES=2: there each thread has
// a current device, and work on another device's stream, or cuBLAS operands in another device's memory, fail as
// they would on a GPU (so a missing cudaSetDevice shows). On a real GPU they run when it has two or more.
import { spawn, spawnSync } from 'child_process';
import * as path from 'path';
import { DeviceUnavailableError, IA3Adapter, InvalidArgumentError, RankBatcher, T5Model } from '../../lib';
import { native } from '../../lib/native';
import { loadFixture } from '../helpers/reference';
import { cudaStatus, describeCuda, emulated } from './helpers';

jest.setTimeout(300_000);

const fx = loadFixture('tiny-gated-gelu-untied');

describeCuda('cuda.device: which GPU a model runs on', () => {
  test('the probe names the GPU; an index that is not visible is refused with the count', async () => {
    const probe = native().probeCuda();
    expect(probe.deviceCount).toBeGreaterThanOrEqual(1);
    expect(probe.deviceIndex).toBeGreaterThanOrEqual(0);
    expect(native().probeCuda(probe.deviceIndex)).toEqual(probe);
    const missing = native().probeCuda(probe.deviceCount);
    expect(missing.usable).toBe(false);
    expect(missing.reason).toMatch(new RegExp(`not one of the ${probe.deviceCount} visible GPU`));
    expect(native().cudaMemoryInfo(probe.deviceCount)).toBeNull();
    await expect(T5Model.load(fx.dir, { device: 'cuda', cuda: { device: probe.deviceCount } })).rejects.toThrow(DeviceUnavailableError);
    await expect(T5Model.load(fx.dir, { device: 'cuda', cuda: { device: -1 } })).rejects.toThrow(InvalidArgumentError);
    await expect(T5Model.load(fx.dir, { device: 'cuda', cuda: { device: 0.5 } })).rejects.toThrow(InvalidArgumentError);
    // with 'auto' too: a model meant for a GPU that is not there does not quietly run on the CPU
    await expect(T5Model.load(fx.dir, { device: 'auto', cuda: { device: probe.deviceCount } })).rejects.toThrow(/not one of the/);
    const explicit = await T5Model.load(fx.dir, { device: 'cuda', cuda: { device: probe.deviceIndex, precision: 'fp32' } });
    try {
      expect(explicit.describe()).toContain(`cuda:${probe.deviceIndex} `);
      expect(explicit.gpuIndex).toBe(probe.deviceIndex);
      const merged = await explicit.withMergedAdapter(IA3Adapter.create(explicit, 1.1));
      expect(merged.gpuIndex).toBe(probe.deviceIndex);
      await merged.dispose();
      // replicas (one model on each GPU) must compute alike: a bf16 copy beside an fp32 one is refused
      const bf16 = await T5Model.load(fx.dir, { device: 'cuda', cuda: { device: probe.deviceIndex } });
      const fp32 = await T5Model.load(fx.dir, { device: 'cuda', cuda: { device: probe.deviceIndex, precision: 'fp32' } });
      try {
        expect(() => new RankBatcher([explicit, bf16])).toThrow(/they compute in different precisions \(fp32, bf16\)/);
        expect(explicit.replicaMismatch(fp32)).toBeNull();
        expect([bf16.precision, fp32.precision]).toEqual(['bf16', 'fp32']);
      } finally {
        await bf16.dispose();
        await fp32.dispose();
      }
    } finally {
      await explicit.dispose();
    }
  });

  // TFEW_CUDA_PRECISION sets the precision of models loaded without cuda.precision (read by the addon, so in a
  // child process): model.precision and the replica check see the engine's, not the option's.
  test('TFEW_CUDA_PRECISION: model.precision is what the engine runs', () => {
    const script = `const { T5Model, RankBatcher } = require(${JSON.stringify(path.join(__dirname, '..', '..', 'dist', 'lib'))});
      (async () => {
        const dir = ${JSON.stringify(fx.dir)};
        const unset = await T5Model.load(dir, { device: 'cuda' });
        const fp32 = await T5Model.load(dir, { device: 'cuda', cuda: { precision: 'fp32' } });
        const bf16 = await T5Model.load(dir, { device: 'cuda', cuda: { precision: 'bf16' } });
        console.log(JSON.stringify({ unset: unset.precision, fp32: unset.replicaMismatch(fp32), bf16: unset.replicaMismatch(bf16) }));
        for (const m of [unset, fp32, bf16]) await m.dispose();
      })().catch((e) => console.log(JSON.stringify({ fatal: String(e) })));`;
    const r = spawnSync(process.execPath, ['-e', script], { env: { ...process.env, TFEW_CUDA_PRECISION: 'fp32' }, encoding: 'utf8', timeout: 120_000 });
    expect(JSON.parse(r.stdout.trim().split('\n').pop()!)).toEqual({ unset: 'fp32', fp32: null, bf16: 'they compute in different precisions (fp32, bf16)' });
  });

  // The checks with two GPUs (a script, so that the emulator can run it with two emulated GPUs in a child process).
  const script = `
    const { T5Model, IA3Adapter, RankBatcher } = require(${JSON.stringify(path.join(__dirname, '..', '..', 'dist', 'lib'))});
    const { native } = require(${JSON.stringify(path.join(__dirname, '..', '..', 'dist', 'lib', 'native'))});
    const dir = ${JSON.stringify(fx.dir)};
    const inputs = [[5, 6, 7, 8, 1], [9, 10, 1]], choices = [[[4, 1], [5, 6, 1]], [[7, 1], [8, 1]]];
    const batch = { inputIds: inputs, choices, labels: [1, 0] };
    const free = (d) => native().cudaMemoryInfo(d).free;
    async function run(m, adapter) {
      const r = [];
      for (let i = 0; i < 3; i++) r.push((await m.rankClassify(inputs, choices, { adapter })).logProbs);  // eager, capture, replay
      const g = await m.lossAndGradients(batch, { adapter });
      // a device training session: three optimizer steps, the vectors read back, then ended
      const trainee = IA3Adapter.create(m, 1.05);
      const session = await m.createTrainingSession([trainee], { lr: 0.01, totalSteps: 10 });
      for (let i = 0; i < 3; i++) await session.step(batch);
      await session.sync();
      await session.dispose();
      const trained = Array.from(trainee.data.slice(0, 8));
      return { logProbs: r, loss: g.totalLoss, grad: Array.from(Object.values(g.gradients)[0].slice(0, 8)), trained };
    }
    (async () => {
      const out = { count: native().probeCuda().deviceCount, names: [0, 1].map((d) => native().probeCuda(d).usable) };
      const free0 = free(0), free1 = free(1);
      const a = await T5Model.load(dir, { device: 'cuda', cuda: { device: 0, precision: 'fp32' } });
      const b = await T5Model.load(dir, { device: 'cuda', cuda: { device: 1, precision: 'fp32' } });
      out.describe = [a.describe(), b.describe()];
      const adapter = IA3Adapter.create(a, 1.05);
      out.loadedOn1 = free1 - free(1);
      // the two models' calls interleaved on the thread pool: each must run on its own GPU
      const [ra, rb] = await Promise.all([run(a, adapter), run(b, adapter)]);
      out.a = ra; out.b = rb;
      const rb2 = await run(b, adapter);  // after device 0's work on the same threads
      out.b2 = rb2;
      // one RankBatcher over both GPUs: batches on both at once, answers as on one
      const batcher = new RankBatcher([a, b], { maxBatch: 1, maxDelayMs: 1 });
      const served = await Promise.all([0, 1, 0, 1, 0, 1].map((i) => batcher.classify(inputs[i], choices[i], { adapter })));
      out.served = served.map((r) => r.logProbs);
      out.replicaBatches = batcher.stats.replicas.map((r) => r.batches);
      await batcher.close();
      await b.reserveMemory({ batchSize: 4, inputLength: 64, choices: 2, choiceLength: 4 });
      const merged = await b.withMergedAdapter(adapter);  // on b's GPU
      out.mergedDescribe = merged.describe();
      out.merged = (await merged.rankClassify(inputs, choices)).logProbs;
      await merged.dispose();
      const usedOn0 = free0 - free(0);
      await a.dispose();
      out.freedOn0 = free0 - free(0);
      out.usedOn0 = usedOn0;
      out.usedOn1 = free1 - free(1);
      await b.dispose();
      out.freedOn1 = free1 - free(1);
      process.stdout.write(JSON.stringify(out));
    })().catch((e) => { process.stdout.write(JSON.stringify({ fatal: String(e && e.stack || e) })); });`;

  const twoGpus = cudaStatus().usable && (emulated() || native().probeCuda().deviceCount >= 2);
  (twoGpus ? test : test.skip)('two models on two GPUs: the same results, each GPU\'s own memory, interleaved calls', () => {
    const env = emulated() ? { ...process.env, TFEW_EMU_DEVICES: '2' } : process.env;
    const child = spawnSync(process.execPath, ['-e', script], { env, encoding: 'utf8', timeout: 240_000 });
    expect(child.stderr).not.toMatch(/emulator\] .* (while device|of device)/);
    expect(child.status).toBe(0);
    const out = JSON.parse(child.stdout);
    expect(out.fatal).toBeUndefined();
    expect(out.count).toBeGreaterThanOrEqual(2);
    expect(out.names).toEqual([true, true]);
    expect(out.describe[0]).toContain('cuda:0 ');
    expect(out.describe[1]).toContain('cuda:1 ');
    // model b's weights and arena on GPU 1, none of it on GPU 0 once a is gone; all of it back after dispose
    expect(out.loadedOn1).toBeGreaterThan(0);
    expect(out.usedOn1).toBeGreaterThan(0);
    expect(out.freedOn0).toBeLessThan(out.usedOn0);
    if (emulated()) {
      expect(out.freedOn0).toBe(0);
      expect(out.freedOn1).toBe(0);
    }
    // the same maths on both GPUs (fp32, the same kernels), graphs included (the third call replays)
    expect(out.b.logProbs).toEqual(out.a.logProbs);
    expect(out.b.loss).toBe(out.a.loss);
    expect(out.b.grad).toEqual(out.a.grad);
    expect(out.b2).toEqual(out.b);
    expect(out.a.trained.some((v: number) => v !== Math.fround(1.05))).toBe(true);  // (the session stepped)
    expect(out.replicaBatches.every((n: number) => n > 0)).toBe(true);
    // (one example per call against two per call: equal within rounding)
    const want = [0, 1, 0, 1, 0, 1].map((i) => out.a.logProbs[2][i]).flat();
    out.served.flat().forEach((x: number, i: number) => expect(Math.abs(x - want[i])).toBeLessThan(1e-5 * Math.abs(want[i]) + 1e-6));
    expect(out.mergedDescribe).toContain('cuda:1 ');
    // merged (IA)3 scaling equals the adapter applied per call (fp32: within rounding)
    out.merged.flat().forEach((x: number, i: number) => expect(Math.abs(x - out.a.logProbs[2].flat()[i])).toBeLessThan(1e-5 * Math.abs(x) + 1e-6));
  });

  (emulated() ? test : test.skip)('tfew serve --cuda-devices all: a replica on each GPU', async () => {
    const cli = path.join(__dirname, '..', '..', 'dist', 'lib', 'cli', 'main.js');
    const child = spawn(process.execPath, [cli, 'serve', '--model', fx.dir, '--cuda-devices', 'all', '--port', '0', '--cuda-precision', 'fp32'],
                        { env: { ...process.env, TFEW_EMU_DEVICES: '2' }, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '', err = '';
    child.stderr.on('data', (d) => { err += d; });
    const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
    try {
      const line = await new Promise<string>((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`no "tfew serve:" line; stderr: ${err}`)), 100_000);
        void exited.then((code) => reject(new Error(`tfew serve exited (${code}) before listening; stderr: ${err}`)));
        child.stdout.on('data', (d) => {
          out += d;
          const m = /tfew serve: .*/.exec(out);
          if (m) {
            clearTimeout(timer);
            resolve(m[0]);
          }
        });
      });
      expect(line).toMatch(/on 2 GPUs \(0, 1\)/);
      const base = /http:\/\/[^ ]+/.exec(line)![0];
      const health = (await (await fetch(`${base}/health`)).json()) as { replicas: { model: string }[] };
      expect(health.replicas.map((r) => r.model.slice(0, 7))).toEqual(['cuda:0 ', 'cuda:1 ']);
      const res = await fetch(`${base}/classify`, { method: 'POST', headers: { 'content-type': 'application/json' },
                                                    body: JSON.stringify({ input: [5, 6, 7, 1], choices: [[4, 1], [5, 1]] }) });
      expect(res.status).toBe(200);
    } finally {
      child.kill('SIGTERM');
      expect(await exited).toBe(0);
    }
    expect(err).not.toMatch(/emulator\] .* (while device|of device)/);
  });

  (emulated() ? test : test.skip)('tfew doctor lists every GPU (two emulated ones)', () => {
    const cli = path.join(__dirname, '..', '..', 'dist', 'lib', 'cli', 'main.js');
    const env = { ...process.env, TFEW_EMU_DEVICES: '2' };
    const json = spawnSync(process.execPath, [cli, 'doctor', '--json'], { env, encoding: 'utf8', timeout: 60_000 });
    expect(json.status).toBe(0);
    const info = JSON.parse(json.stdout);
    expect(info.cuda).toMatchObject({ usable: true, deviceCount: 2, deviceIndex: 0 });
    expect(info.gpus.map((g: { deviceIndex: number; usable: boolean }) => [g.deviceIndex, g.usable])).toEqual([[0, true], [1, true]]);
    const text = spawnSync(process.execPath, [cli, 'doctor'], { env: { ...env, TFEW_CUDA_DEVICE: '1' }, encoding: 'utf8', timeout: 60_000 });
    expect(text.status).toBe(0);
    const gpus = text.stdout.split('\n').filter((l) => l.startsWith('gpu '));
    expect(gpus).toHaveLength(2);
    expect(gpus[1]).toMatch(/^gpu 1 .*\(default\)$/);
    expect(gpus[0]).not.toMatch(/default/);
  });
});
