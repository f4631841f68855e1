// What passing adapters costs the event loop per call: the addon's adapter snapshots (by IA3Adapter id and
// version) against copying every adapter's vectors on each call, as before session 6. A model with T0-3B's
// (IA)3 layout (24 + 24 layers, inner 2048, d_ff 5120: 540,672 floats per adapter) at d_model 64, so the call
// itself is cheap; the CPU backend (no GPU needed). Times the synchronous part of the native score() call (until
// it returns its promise), medians of 31, for 1 and 8 adapters.
//
//   node dist/benchmarks/adapter-overhead.js [--out FILE.json]
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { IA3Adapter, T5Model } from '../lib';
import { buildBatch } from '../lib/batch';
import type { NativeModel } from '../lib/native';
import { t0_3bConfigJson, writeRandomT5 } from './random-t5';

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[xs.length >> 1];

async function main(): Promise<void> {
  const configJson = { ...t0_3bConfigJson(24), d_model: 64, vocab_size: 256 };
  const dir = path.join(os.tmpdir(), 'tfew-adapter-overhead');
  writeRandomT5(dir, { configJson });
  const model = await T5Model.load(dir, { device: 'cpu', threads: 2 });
  const nm = (model as unknown as { nativeModel: NativeModel }).nativeModel;
  const results: Record<string, unknown> = {};
  for (const count of [1, 8]) {
    const adapters = Array.from({ length: count }, () => IA3Adapter.create(model, 1.01));
    const examples = Array.from({ length: 8 }, (_, i) => ({ inputIds: [5 + i, 6, 1], choices: [[4, 1], [5, 1]], adapterIndex: i % count }));
    const batch = buildBatch(examples, configJson.vocab_size, { padId: 0 });
    const data = adapters.map((a) => a.data);
    const keys = adapters.flatMap((a) => [a.id, a.version]);
    for (const [mode, k] of [['copied every call', undefined], ['snapshots (id, version)', keys]] as const) {
      const ms: number[] = [];
      for (let r = 0; r < 32; r++) {
        const t = process.hrtime.bigint();
        const pending = nm.score(batch, data, false, false, k);
        if (r > 0) ms.push(Number(process.hrtime.bigint() - t) / 1e6);  // (the first keyed call makes the snapshots)
        await pending;
      }
      results[`${count} adapter${count > 1 ? 's' : ''}, ${mode}`] = { medianMs: median(ms), runsMs: ms };
    }
  }
  await model.dispose();
  const out = { date: new Date().toISOString(), floatsPerAdapter: 540672, what: 'event-loop time of one score() call', results };
  const json = JSON.stringify(out, null, 2);
  const i = process.argv.indexOf('--out');
  if (i >= 0) fs.writeFileSync(process.argv[i + 1], json + '\n');
  console.log(json);
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
