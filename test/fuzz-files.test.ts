// Damaged files: every loader must answer a corrupted, truncated or padded file with a typed error (a TfewError)
// or with a load that works, never with a TypeError or RangeError from deep inside, a hang or a crash; and the
// process must go on loading good files after. The damage is seeded random: bytes changed in the parts a parser
// reads (the safetensors header, the zip records and pickle of a pytorch_model.bin, a protobuf, JSON), files cut
// short, and bytes inserted. Formats: model.safetensors, pytorch_model.bin, adapter_model.safetensors,
// config.json, tokenizer.json and spiece.model (the last two from the data directory; skipped without it).
import { spawnSync } from 'child_process';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { IA3Adapter, T5Model, T5Tokenizer, TfewError, readT5Config, resolveCheckpoint } from '../lib';
import { seededRandom } from '../lib/random';
import { resolveDataDir } from '../lib/tasks/files';
import { fixturesDir } from './helpers/paths';

jest.setTimeout(300_000);

// 120 cases a format in the suite (seconds); TFEW_FUZZ_CASES=3000 for a longer hunt (session 11: no failure in 3000)
const CASES = Number(process.env.TFEW_FUZZ_CASES) || 120;
const fixture = path.join(fixturesDir(), 'tiny-gated-gelu-untied');

let tmpRoot: string;
beforeAll(() => { tmpRoot = fs.mkdtempSync(path.join(os.tmpdir(), 'tfew-fuzz-')); });
afterAll(() => fs.rmSync(tmpRoot, { recursive: true, force: true }));

type Region = [number, number];

/** Case k's damage of `good`: bytes changed inside the regions, a cut, or inserted bytes (seeded by k). */
function damage(good: Buffer, regions: Region[], k: number): Buffer {
  const r = seededRandom(9000 + k);
  const pick = (): number => {
    const [a, b] = regions[Math.floor(r() * regions.length)];
    return a + Math.floor(r() * Math.max(1, b - a));
  };
  const kind = k % 5;
  if (kind === 3) return good.subarray(0, pick());  // cut short inside a region
  if (kind === 4) {  // bytes inserted: everything after moves
    const at = pick();
    const extra = Buffer.from(Array.from({ length: 1 + Math.floor(r() * 16) }, () => Math.floor(r() * 256)));
    return Buffer.concat([good.subarray(0, at), extra, good.subarray(at)]);
  }
  const out = Buffer.from(good);
  const changes = kind === 0 ? 1 : kind === 1 ? 4 : 32;
  for (let i = 0; i < changes; i++) {
    const at = Math.min(pick(), out.length - 1);
    // digits and JSON punctuation as often as any byte: they reach the parsers' number and structure paths
    out[at] = r() < 0.5 ? Math.floor(r() * 256) : '0123456789[]{}:,"-.e'.charCodeAt(Math.floor(r() * 20));
  }
  return out;
}

/** Runs `load` on each damaged copy; each must succeed or throw a TfewError. Returns how many loaded. */
async function fuzz(good: Buffer, regions: Region[], write: (bytes: Buffer, dir: string) => string,
                    load: (file: string) => Promise<unknown>): Promise<{ loaded: number; errors: Set<string> }> {
  let loaded = 0;
  const errors = new Set<string>();
  for (let k = 0; k < CASES; k++) {
    const dir = fs.mkdtempSync(path.join(tmpRoot, 'case-'));
    const file = write(damage(good, regions, k), dir);
    try {
      await load(file);
      loaded++;
    } catch (e) {
      if (!(e instanceof TfewError)) throw new Error(`case ${k}: ${(e as Error)?.constructor?.name}: ${(e as Error)?.message ?? e}`);
      errors.add(e.constructor.name);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  }
  return { loaded, errors };
}

/** A model directory around a damaged weights file: the fixture's config.json beside it. */
function modelDir(name: string) {
  return (bytes: Buffer, dir: string): string => {
    fs.copyFileSync(path.join(fixture, 'config.json'), path.join(dir, 'config.json'));
    fs.writeFileSync(path.join(dir, name), bytes);
    return dir;
  };
}

/** A damaged file on its own, named `name`. */
function asFile(name: string) {
  return (bytes: Buffer, dir: string): string => {
    fs.writeFileSync(path.join(dir, name), bytes);
    return path.join(dir, name);
  };
}

/** Loads the model and scores one example (garbage weights may give any numbers, never a crash). */
async function loadAndScore(dir: string): Promise<void> {
  await resolveCheckpoint(dir);
  const m = await T5Model.load(dir, { device: 'cpu', threads: 1 });
  try {
    await m.rankClassify([[5, 9, 1]], [[[4, 1], [8, 1]]]);
  } finally {
    await m.dispose();
  }
}

async function goodModelStillLoads(): Promise<void> {
  const m = await T5Model.load(fixture, { device: 'cpu', threads: 1 });
  try {
    expect((await m.rankClassify([[5, 9, 1]], [[[4, 1], [8, 1]]])).scores[0].every(Number.isFinite)).toBe(true);
  } finally {
    await m.dispose();
  }
}

test('model.safetensors: damage in the header and data offsets gives typed errors', async () => {
  const good = fs.readFileSync(path.join(fixture, 'model.safetensors'));
  const headerEnd = 8 + Number(good.readBigUInt64LE(0));
  // the header (and the length before it) is what is parsed; a few cases also reach the data (any bytes load)
  const { loaded, errors } = await fuzz(good, [[0, headerEnd], [0, headerEnd], [headerEnd, good.length]], modelDir('model.safetensors'), loadAndScore);
  expect(errors.size).toBeGreaterThan(0);
  expect(loaded).toBeLessThan(CASES);
  await goodModelStillLoads();
});

const python = spawnSync('python3', ['-c', 'import zipfile, pickle'], { stdio: 'ignore' }).status === 0;
(python ? test : test.skip)('pytorch_model.bin: damage in the zip records and the pickle gives typed errors', async () => {
  const bin = path.join(tmpRoot, 'good.bin');
  const r = spawnSync('python3', [path.join(__dirname, 'helpers', 'write_torch_bin.py'), path.join(fixture, 'model.safetensors'), bin], { encoding: 'utf8' });
  expect(r.stderr).toBe('');
  const good = fs.readFileSync(bin);
  // data.pkl is the first entry (its local header and the pickle: ~7 KB here); the central directory and the end
  // records are the last part of the file
  const cdStart = good.lastIndexOf(Buffer.from([0x50, 0x4b, 0x01, 0x02]), good.length - 1);
  let firstCd = cdStart;
  for (let at = cdStart; at >= 0; at = good.lastIndexOf(Buffer.from([0x50, 0x4b, 0x01, 0x02]), at - 1)) firstCd = at;
  const pklEnd = good.indexOf(Buffer.from([0x50, 0x4b, 0x03, 0x04]), 4);
  expect(pklEnd).toBeGreaterThan(100);
  const { loaded, errors } = await fuzz(good, [[0, pklEnd], [firstCd, good.length]], modelDir('pytorch_model.bin'), loadAndScore);
  expect(errors.size).toBeGreaterThan(0);
  expect(loaded).toBeLessThan(CASES);
  await goodModelStillLoads();
});

test('adapter_model.safetensors and config.json: typed errors', async () => {
  const adapter = fs.readFileSync(path.join(fixture, 'adapter_a', 'adapter_model.safetensors'));
  const headerEnd = 8 + Number(adapter.readBigUInt64LE(0));
  const config = readT5Config(fixture);
  const a = await fuzz(adapter, [[0, headerEnd]], asFile('adapter_model.safetensors'), (file) => IA3Adapter.load(file, { config }));
  expect(a.errors.has('InvalidAdapterError')).toBe(true);
  const json = fs.readFileSync(path.join(fixture, 'config.json'));
  const c = await fuzz(json, [[0, json.length]], (bytes, dir) => {
    fs.writeFileSync(path.join(dir, 'config.json'), bytes);
    return dir;
  }, async (dir) => readT5Config(dir));
  expect(c.errors.has('InvalidModelError')).toBe(true);
});

const tokenizerDir = path.join(resolveDataDir(), 't5-tokenizer');
const haveTokenizer = fs.existsSync(path.join(tokenizerDir, 'spiece.model')) && fs.existsSync(path.join(tokenizerDir, 'tokenizer.json'));
// eslint-disable-next-line no-console
if (!haveTokenizer) console.warn(`[tfew tests] skipping the tokenizer fuzz cases: no T5 tokenizer files in ${tokenizerDir} (TFEW_DATA_DIR)`);
(haveTokenizer ? test : test.skip)('spiece.model and tokenizer.json: typed errors, or a tokenizer that works', async () => {
  const use = (t: T5Tokenizer) => { t.encode('A damaged tokenizer, 12 tokens or so.'); };
  const spiece = fs.readFileSync(path.join(tokenizerDir, 'spiece.model'));
  // the protobuf's first records (the trainer and normalizer specs sit at the end; the pieces from the start)
  const s = await fuzz(spiece, [[0, 4096], [spiece.length - 4096, spiece.length]], asFile('spiece.model'),
    async (file) => use(T5Tokenizer.fromSentencePiece(file)));
  expect(s.errors.size).toBeGreaterThan(0);
  const json = fs.readFileSync(path.join(tokenizerDir, 'tokenizer.json'));
  const j = await fuzz(json, [[0, 4096], [json.length - 65536, json.length]], asFile('tokenizer.json'),
    async (file) => use(T5Tokenizer.fromFile(file)));
  expect(j.errors.size).toBeGreaterThan(0);
});
