import * as os from 'os'; import * as path from 'path'; import * as fs from 'fs';
import { runDemo } from '../../lib/pipeline/demo';
test('demo', async () => {
  const t0 = Date.now();
  const r = await runDemo({ modelDir: fs.mkdtempSync(path.join(os.tmpdir(), 'demo-')), device: 'cpu' });
  console.log(Date.now() - t0, JSON.stringify(r).slice(0, 300));
});
