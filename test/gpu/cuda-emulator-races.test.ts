// On the CUDA emulator only: the smoke check (rank-bench.js smoke: both tiny checkpoints, fp32 and bf16,
// inference and training against the CPU backend) with the threads of every block run in reverse order
// between barriers (TFEW_EMU_SCHEDULE=reverse). The other emulator tests run them in order; a kernel that is
// right in only one of the two orders reads shared or global memory without the barrier it needs.
import { spawnSync } from 'child_process';
import * as fs from 'fs';
import * as path from 'path';
import { emulated } from './helpers';

const root = path.resolve(__dirname, '..', '..');
const smoke = path.join(root, 'dist', 'benchmarks', 'rank-bench.js');
const run = emulated() && fs.existsSync(smoke) ? test : test.skip;
// eslint-disable-next-line no-console
if (emulated() && !fs.existsSync(smoke)) console.warn(`[tfew tests] skipping the emulator's race check: no ${smoke} (npx tsc -p .)`);

describe('CUDA emulator: no kernel depends on the order of its threads', () => {
  run('the smoke check passes with threads scheduled last to first', () => {
    const r = spawnSync(process.execPath, [smoke, 'smoke', '--fixtures', path.join(root, 'test', 'fixtures')], {
      env: { ...process.env, TFEW_EMU_SCHEDULE: 'reverse', TFEW_CUDA_DEBUG_SYNC: '1' },
      encoding: 'utf8',
      timeout: 300_000,
    });
    const out = `${r.stdout}\n${r.stderr}`;
    expect(out).toMatch(/\[smoke\] all checks passed/);
    expect(r.status).toBe(0);
  });
});
