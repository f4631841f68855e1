// binding.gyp's role: the CPU-only build through node-gyp when cmake is absent. Builds it in a temporary copy
// (TFEW_BUILD=gyp, the same path scripts/build-native.js takes without cmake), loads it, and runs the fixture
// through it. Skipped when node-gyp cannot find Node's headers offline (nodedir).
import { execFileSync } from 'child_process';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { resolveCheckpoint } from '../lib/checkpoint';
import type { NativeAddon } from '../lib/native';
import { loadFixture } from './helpers/reference';

const root = path.resolve(__dirname, '..');
const nodedir = process.env.npm_config_nodedir ?? '/usr';
const headers = fs.existsSync(path.join(nodedir, 'include', 'node', 'node_api.h'));
if (!headers) console.warn(`[tfew tests] skipping the node-gyp build: no Node headers under ${nodedir} (set npm_config_nodedir)`);

(headers ? describe : describe.skip)('the node-gyp (binding.gyp) build', () => {
  jest.setTimeout(600_000);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tfew-gyp-'));
  afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

  test('builds the CPU backend without cmake and gives the fixture scores', async () => {
    for (const f of ['binding.gyp', 'package.json', 'scripts', 'cuda']) fs.cpSync(path.join(root, f), path.join(dir, f), { recursive: true });
    fs.symlinkSync(path.join(root, 'node_modules'), path.join(dir, 'node_modules'));
    execFileSync(process.execPath, [path.join(dir, 'scripts', 'build-native.js')], {
      cwd: dir, stdio: 'pipe', env: { ...process.env, TFEW_BUILD: 'gyp', TFEW_BUILD_JOBS: '2', npm_config_nodedir: nodedir },
    });
    // eslint-disable-next-line @typescript-eslint/no-var-requires
    const addon = require(path.join(dir, 'build', 'Release', 'tfew.node')) as NativeAddon;
    expect(addon.buildInfo.cudaCompiled).toBe(false);
    expect(addon.probeCuda().reason).toMatch(/no CUDA backend/);
    const fx = loadFixture('tiny-relu-tied');
    const { config, tensors } = await resolveCheckpoint(fx.dir);
    const model = await addon.loadModel(config, tensors, { device: 'cpu', threads: 2 });
    const B = fx.inputIds.length;
    const encLen = Math.max(...fx.inputIds.map((x) => x.length));
    const rows = fx.choices.flat();
    const decLen = Math.max(...rows.map((c) => c.length));
    const inputIds = new Int32Array(B * encLen);
    fx.inputIds.forEach((ids, b) => inputIds.set(ids, b * encLen));
    const choiceIds = new Int32Array(rows.length * decLen);
    rows.forEach((c, r) => choiceIds.set(c, r * decLen));
    const out = await model.score({
      batchSize: B, encLen, inputIds, encLengths: Int32Array.from(fx.inputIds.map((x) => x.length)), numRows: rows.length,
      decLen, choiceIds, rowStart: Int32Array.from([0, 3, 6, 9]), adapterOfExample: new Int32Array(B).fill(-1),
    }, [], false, false);
    const sums = rows.map((c, r) => c.reduce((s, _, t) => s + out.tokenLogp[r * decLen + t], 0));
    const expected = fx.get('base.sum_logp');
    sums.forEach((s, i) => expect(Math.abs(s - expected[i])).toBeLessThan(1e-4 * Math.abs(expected[i])));
    await model.dispose();
  });
});
