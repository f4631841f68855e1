// The probe's refusals (cuda/gpu/probe.cc): a machine the CUDA backend cannot use gets a reason a user can act on,
// `device: 'cuda'` rejects with it as E_DEVICE_UNAVAILABLE, `device: 'auto'` runs on the CPU and says why, and
// `tfew doctor` prints it. A GPU machine cannot be made to lack its driver, so these run on the CUDA emulator,
// whose TFEW_EMU_PROBE setting stands for the machine (cuda/emu/emu_runtime.cc): each in a child process, since the
// probe looks once per process.
import { spawnSync } from 'child_process';
import * as path from 'path';
import { loadFixture } from '../helpers/reference';
import { describeCuda, emulated } from './helpers';

jest.setTimeout(300_000);

const fx = loadFixture('tiny-gated-gelu-untied');
const root = path.join(__dirname, '..', '..');

// In a child process with TFEW_EMU_PROBE=fault: the probe, what loading with 'cuda' and with 'auto' gives.
function underFault(fault: string, env: Record<string, string> = {}): { probe: { usable: boolean; reason: string; compiled: boolean }; cuda: { code?: string; message: string }; auto: { device: string; reason: string; predictions: number[] } } {
  const script = `
    const { T5Model } = require(${JSON.stringify(path.join(root, 'dist', 'lib'))});
    const { native } = require(${JSON.stringify(path.join(root, 'dist', 'lib', 'native'))});
    (async () => {
      const probe = native().probeCuda();
      let cuda;
      try { await T5Model.load(${JSON.stringify(fx.dir)}, { device: 'cuda' }); cuda = { message: 'loaded' }; }
      catch (e) { cuda = { code: e.code, message: e.message }; }
      const m = await T5Model.load(${JSON.stringify(fx.dir)}, { device: 'auto' });
      const r = await m.rankClassify([[5, 6, 1]], [[[4, 1], [7, 8, 1]]]);
      const auto = { device: m.device, reason: m.deviceReason, predictions: r.predictions };
      await m.dispose();
      console.log(JSON.stringify({ probe, cuda, auto }));
    })().catch((e) => { console.error(e); process.exit(1); });`;
  const out = spawnSync(process.execPath, ['-e', script], { env: { ...process.env, ...env, TFEW_EMU_PROBE: fault }, encoding: 'utf8', timeout: 120_000 });
  if (out.status !== 0) throw new Error(`child (TFEW_EMU_PROBE=${fault}) failed: ${out.stderr}`);
  return JSON.parse(out.stdout.trim().split('\n').pop()!);
}

(emulated() ? describeCuda : describe.skip)('the CUDA probe refuses a machine it cannot use, and says why', () => {
  test.each([
    ['no-driver', /^no NVIDIA driver found \(libcuda\.so\.1 is not installed or not on the loader path\)/, {}],
    ['old-driver', /^the NVIDIA driver supports CUDA 11\.8 but this build of the addon uses the CUDA \d+\.\d runtime: update the NVIDIA driver$/, {}],
    ['no-device', /^no CUDA-capable GPU is visible/, {}],
    ['old-gpu', /^GPU 0 \(.*\) has compute capability 7\.5; the CUDA backend needs 8\.0 or newer/, {}],
    // no-cublas: a GPU and a driver but no cuBLAS; gpu/cublas_loader.cc's own search and messages (over
    // TFEW_CUBLAS_PATH alone on the emulator, which never opens a real cuBLAS)
    ['no-cublas', /^cuBLAS could not be loaded \(libcublas\.so\.13-absent-from-this-emulated-machine: [^)]*\); install the CUDA toolkit's cuBLAS or put its lib64 directory on LD_LIBRARY_PATH$/, {}],
    ['no-cublas', /^cuBLAS could not be loaded \(\/nonexistent\/libcublas\.so\.13: [^)]*No such file[^)]*\); install/, { TFEW_CUBLAS_PATH: '/nonexistent/libcublas.so.13' }],
    // a library that is not cuBLAS (the C math library, on every Linux machine): its missing entry points named
    ['no-cublas', /^\S*libm\.so\.6 lacks required entry points \(cublasCreate_v2, cublasDestroy_v2, .*cublasGemmStridedBatchedEx\): cuBLAS 12 or newer is needed$/, { TFEW_CUBLAS_PATH: 'libm.so.6' }],
  ])('%s %s', (fault, reason, env: Record<string, string>) => {  // (every row gives env: a missing one would be Jest's done)
    const { probe, cuda, auto } = underFault(fault, env);
    expect(probe).toMatchObject({ compiled: true, usable: false });
    expect(probe.reason).toMatch(reason);
    // device 'cuda': a typed error with the same reason
    expect(cuda.code).toBe('E_DEVICE_UNAVAILABLE');
    expect(cuda.message).toContain(probe.reason);
    // device 'auto': the CPU backend, which works, and the reason it was chosen
    expect(auto.device).toBe('cpu');
    expect(auto.reason).toContain(probe.reason);
    expect(auto.predictions).toHaveLength(1);
  });

  test('an unknown TFEW_EMU_PROBE value is said on stderr (the machine stays usable)', () => {
    const script = `const { native } = require(${JSON.stringify(path.join(root, 'dist', 'lib', 'native'))});
      console.log(JSON.stringify(native().probeCuda()));`;
    const out = spawnSync(process.execPath, ['-e', script], { env: { ...process.env, TFEW_EMU_PROBE: 'no-drvier' }, encoding: 'utf8', timeout: 60_000 });
    expect(out.status).toBe(0);
    expect(JSON.parse(out.stdout.trim().split('\n').pop()!)).toMatchObject({ usable: true });
    expect(out.stderr).toContain("TFEW_EMU_PROBE='no-drvier' is not one of no-driver, old-driver, no-device, old-gpu, no-cublas");
  });

  test('tfew doctor prints the reason (text and JSON) and exits 0', () => {
    const cli = path.join(root, 'dist', 'lib', 'cli', 'main.js');
    const env = { ...process.env, TFEW_EMU_PROBE: 'old-gpu' };
    const json = spawnSync(process.execPath, [cli, 'doctor', '--json'], { env, encoding: 'utf8', timeout: 60_000 });
    expect(json.status).toBe(0);
    const info = JSON.parse(json.stdout);
    expect(info.cuda).toMatchObject({ usable: false });
    expect(info.cuda.reason).toMatch(/compute capability 7\.5/);
    const text = spawnSync(process.execPath, [cli, 'doctor'], { env, encoding: 'utf8', timeout: 60_000 });
    expect(text.status).toBe(0);
    expect(text.stdout).toMatch(/cuda usable\s+no/);
    expect(text.stdout).toMatch(/compute capability 7\.5/);
  });
});
