import * as os from 'os'; import * as path from 'path'; import * as fs from 'fs';
import { runDemo, syntheticReviews } from '../../lib/pipeline/demo';
test('demo', async () => {
  const tr = syntheticReviews(32, 7); const c: Record<string, number> = {}; for (const e of tr) { const w = String(e.fields.text).split(' ')[3]; c[w] = (c[w] ?? 0) + 1; } console.log(JSON.stringify(c));
  for (const ms of [3, 2]) for (const steps of [400, 600]) {
  const t0 = Date.now();
  const r = await runDemo({ modelDir: fs.mkdtempSync(path.join(os.tmpdir(), 'demo-')), device: 'cpu', modelSeed: ms, steps, log: () => {} });
  console.log(ms, steps, Date.now() - t0, r.accuracyBefore, r.accuracyAfter, r.predictions.map(p => p.label + ':' + p.confidence.toFixed(2)).join(' '));
  }
}, 600000);
