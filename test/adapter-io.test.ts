import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { spawnSync } from 'child_process';
import { unzipSync, zipSync } from 'fflate';
import { ia3Modules, IA3Adapter, splitByModule } from '../lib/adapter';
import { readT5Config } from '../lib/config';
import { FileFormatError, InvalidAdapterError, InvalidArgumentError } from '../lib/errors';
import type { NativeConfig } from '../lib/native';
import { readSafetensorsF64, readSafetensorsHeader, WritableTensor, writeSafetensors } from '../lib/safetensors';
import { indexTorchCheckpoint, readTorchCheckpoint } from '../lib/torch-pt';
import { dataFile, fixturesDir } from './helpers/paths';
import { torchZip } from './helpers/torch-zip';

const T0_3B: NativeConfig = {
  vocabSize: 32128, dModel: 2048, dFf: 5120, dKv: 64, numHeads: 32, numLayers: 24, numDecoderLayers: 24,
  numBuckets: 32, maxDistance: 128, layerNormEps: 1e-6, gatedGelu: true, tiedHead: false,
  scaleDecoderOutputs: false, dropoutRate: 0.1, padTokenId: 0, eosTokenId: 1, decoderStartTokenId: 0,
};

const fixture = (name: string) => path.join(fixturesDir(), name);
let tmpRoot: string;
beforeAll(() => { tmpRoot = fs.mkdtempSync(path.join(os.tmpdir(), 'tfew-adapter-')); });
afterAll(() => fs.rmSync(tmpRoot, { recursive: true, force: true }));
let counter = 0;
const tmp = (name = `case${counter++}`) => path.join(tmpRoot, name);

const bytesOf = (x: Float32Array) => Buffer.from(x.buffer, x.byteOffset, x.byteLength);

function relErr(a: number, b: number): number {
  return Math.abs(a - b) / Math.max(Math.abs(b), 1e-12);
}

describe('ia3Modules', () => {
  test('IA3Layout order, contiguous, sizes from the architecture', () => {
    const config = readT5Config(fixture('tiny-gated-gelu-untied'));
    const mods = ia3Modules(config);
    const inner = config.numHeads * config.dKv;
    const expectedNames: string[] = [];
    for (let i = 0; i < config.numLayers; i++) {
      expectedNames.push(`encoder.block.${i}.layer.0.SelfAttention.k.ia3_l`, `encoder.block.${i}.layer.0.SelfAttention.v.ia3_l`,
        `encoder.block.${i}.layer.1.DenseReluDense.wo.ia3_l`);
    }
    for (let i = 0; i < config.numDecoderLayers; i++) {
      expectedNames.push(`decoder.block.${i}.layer.0.SelfAttention.k.ia3_l`, `decoder.block.${i}.layer.0.SelfAttention.v.ia3_l`,
        `decoder.block.${i}.layer.1.EncDecAttention.k.ia3_l`, `decoder.block.${i}.layer.1.EncDecAttention.v.ia3_l`,
        `decoder.block.${i}.layer.2.DenseReluDense.wo.ia3_l`);
    }
    expect(mods.map((m) => m.name)).toEqual(expectedNames);
    let offset = 0;
    for (const m of mods) {
      expect(m.offset).toBe(offset);
      const ff = m.name.endsWith('wo.ia3_l');
      expect(m.length).toBe(ff ? config.dFf : inner);
      expect(m.peftShape).toEqual(ff ? [1, config.dFf] : [inner, 1]);
      offset += m.length;
    }
  });

  test('T0-3B has 540,672 (IA)3 values (T-Few paper)', () => {
    const mods = ia3Modules(T0_3B);
    expect(mods.length).toBe(24 * 3 + 24 * 5);
    expect(mods.reduce((a, m) => a + m.length, 0)).toBe(540672);
  });
});

describe('IA3Adapter basics', () => {
  const config = () => readT5Config(fixture('tiny-gated-gelu-untied'));

  test('create, get/set views, version, clone, ids', () => {
    const a = IA3Adapter.create(config());
    const b = IA3Adapter.create({ config: config() }, 0.5);
    expect(a.id).not.toBe(b.id);
    expect(a.data.every((v) => v === 1)).toBe(true);
    expect(b.data.every((v) => v === 0.5)).toBe(true);
    const name = 'decoder.block.1.layer.1.EncDecAttention.v.ia3_l';
    const values = Array.from({ length: 64 }, (_, i) => i / 10);
    const v0 = a.version;
    a.set(name, values);
    expect(a.version).toBe(v0 + 1);
    expect(Array.from(a.get(name))).toEqual(values.map(Math.fround));
    expect(Array.from(a.get(`base_model.model.${name}.default`))).toEqual(values.map(Math.fround));
    const m = a.modules.find((x) => x.name === name)!;
    expect(a.data[m.offset + 3]).toBe(Math.fround(0.3));
    a.get(name)[0] = 7; // a view
    expect(a.data[m.offset]).toBe(7);
    const c = a.clone();
    expect(c.id).not.toBe(a.id);
    expect(c.data).toEqual(a.data);
    c.data[0] = -1;
    expect(a.data[0]).toBe(1);
    expect(() => a.set(name, [1, 2])).toThrow(InvalidArgumentError);
    expect(() => a.get('encoder.block.9.layer.0.SelfAttention.k.ia3_l')).toThrow(InvalidArgumentError);
    const views = splitByModule(a.modules, a.data);
    expect(views[name]).toEqual(a.get(name));
  });

  test('assertCompatible', () => {
    const a = IA3Adapter.create(config());
    expect(() => a.assertCompatible(config())).not.toThrow();
    expect(() => a.assertCompatible({ ...config(), dFf: 128 })).toThrow(InvalidAdapterError);
    expect(() => a.assertCompatible({ ...config(), numDecoderLayers: 3 })).toThrow(/numDecoderLayers 2 vs model 3/);
    expect(() => a.assertCompatible(T0_3B)).toThrow(InvalidAdapterError);
  });
});

describe('PEFT adapters', () => {
  test.each([['tiny-gated-gelu-untied'], ['tiny-relu-tied']])('%s adapter_a matches reference ia3.value.*', async (model) => {
    const dir = fixture(model);
    const config = readT5Config(dir);
    const ref = readSafetensorsF64(path.join(dir, 'reference.safetensors'));
    for (const source of [path.join(dir, 'adapter_a'), path.join(dir, 'adapter_a', 'adapter_model.safetensors')]) {
      for (const a of [await IA3Adapter.load(source), await IA3Adapter.load(source, { config })]) {
        a.assertCompatible(config);
        for (const m of a.modules) {
          const expected = ref.get(`ia3.value.${m.name}`)!;
          expect(expected.shape).toEqual(m.peftShape);
          const got = a.get(m.name);
          expected.data.forEach((v, i) => expect(relErr(got[i], v)).toBeLessThanOrEqual(1e-6));
        }
      }
    }
  });

  // Older PEFT versions saved adapter_model.bin (torch.save's zip); written here from adapter_a's safetensors by
  // test/helpers/write_torch_bin.py (Python's pickle and zipfile, no torch).
  const python = spawnSync('python3', ['-c', 'import zipfile, pickle'], { stdio: 'ignore' }).status === 0;
  (python ? test : test.skip)('adapter_model.bin (older PEFT): the same vectors as adapter_model.safetensors, as a directory or a file', async () => {
    const src = path.join(fixture('tiny-gated-gelu-untied'), 'adapter_a');
    const dir = tmp();
    fs.mkdirSync(dir);
    fs.copyFileSync(path.join(src, 'adapter_config.json'), path.join(dir, 'adapter_config.json'));
    const bin = path.join(dir, 'adapter_model.bin');
    const r = spawnSync('python3', [path.join(__dirname, 'helpers', 'write_torch_bin.py'), path.join(src, 'adapter_model.safetensors'), bin], { encoding: 'utf8' });
    expect(r.status).toBe(0);
    const expected = await IA3Adapter.load(src);
    for (const source of [dir, bin]) expect((await IA3Adapter.load(source)).data).toEqual(expected.data);
  });

  test('adapter_b matches its file and differs from adapter_a', async () => {
    const dir = fixture('tiny-gated-gelu-untied');
    const b = await IA3Adapter.load(path.join(dir, 'adapter_b'));
    const a = await IA3Adapter.load(path.join(dir, 'adapter_a'));
    const raw = readSafetensorsF64(path.join(dir, 'adapter_b', 'adapter_model.safetensors'));
    for (const [key, t] of raw) {
      const got = b.get(key);
      t.data.forEach((v, i) => expect(got[i]).toBe(Math.fround(v)));
    }
    expect(b.data).not.toEqual(a.data);
  });

  test('save + load round trip, PEFT layout like the fixtures', async () => {
    const dir = fixture('tiny-gated-gelu-untied');
    const a = await IA3Adapter.load(path.join(dir, 'adapter_a'));
    const out = tmp();
    await a.save(out);
    const back = await IA3Adapter.load(out);
    expect(back.data).toEqual(a.data);
    expect(back.dims).toEqual(a.dims);
    // same keys and shapes as the PEFT-written fixture, stored as F32
    const mine = readSafetensorsHeader(path.join(out, 'adapter_model.safetensors')).entries;
    const theirs = readSafetensorsHeader(path.join(dir, 'adapter_a', 'adapter_model.safetensors')).entries;
    expect([...mine.keys()].sort()).toEqual([...theirs.keys()].sort());
    for (const [k, e] of mine) {
      expect(e.shape).toEqual(theirs.get(k)!.shape);
      expect(e.dtype).toBe('F32');
    }
    const cfgMine = JSON.parse(fs.readFileSync(path.join(out, 'adapter_config.json'), 'utf8'));
    const cfgTheirs = JSON.parse(fs.readFileSync(path.join(dir, 'adapter_a', 'adapter_config.json'), 'utf8'));
    delete cfgTheirs.peft_version;
    expect(cfgMine).toEqual(cfgTheirs);
  });

  test.each([['F64', 0], ['F16', 2 ** -11], ['BF16', 2 ** -8]] as const)('%s adapter files', async (dtype, tol) => {
    const src = path.join(fixture('tiny-relu-tied'), 'adapter_a', 'adapter_model.safetensors');
    const raw = readSafetensorsF64(src);
    const tensors: Record<string, WritableTensor> = {};
    for (const [k, t] of raw) tensors[`${k.replace(/\.ia3_l$/, '.ia3_l.default')}`] = { dtype, shape: t.shape, data: t.data };
    const file = tmp(`adapter-${dtype}.safetensors`);
    writeSafetensors(file, tensors);
    const a = await IA3Adapter.load(file);
    for (const [k, t] of raw) {
      const got = a.get(k);
      t.data.forEach((v, i) => expect(Math.abs(got[i] - v)).toBeLessThanOrEqual(Math.abs(v) * tol + 1e-7));
    }
  });

  describe('mismatches', () => {
    const src = () => path.join(fixture('tiny-gated-gelu-untied'), 'adapter_a', 'adapter_model.safetensors');
    const rewrite = (edit: (t: Record<string, WritableTensor>) => void): string => {
      const tensors: Record<string, WritableTensor> = {};
      for (const [k, t] of readSafetensorsF64(src())) tensors[k] = { dtype: 'F32', shape: t.shape, data: t.data };
      edit(tensors);
      const file = tmp();
      writeSafetensors(file, tensors);
      return file;
    };
    const config = () => readT5Config(fixture('tiny-gated-gelu-untied'));
    const missing = 'base_model.model.encoder.block.1.layer.0.SelfAttention.v.ia3_l';

    test('missing module', async () => {
      const file = rewrite((t) => { delete t[missing]; });
      await expect(IA3Adapter.load(file, { config: config() })).rejects.toThrow(InvalidAdapterError);
      await expect(IA3Adapter.load(file)).rejects.toThrow('missing module "encoder.block.1.layer.0.SelfAttention.v.ia3_l"');
    });

    test('wrong size', async () => {
      const file = rewrite((t) => { t[missing] = { dtype: 'F32', shape: [32, 1], data: new Float32Array(32) }; });
      await expect(IA3Adapter.load(file, { config: config() })).rejects.toThrow(
        /module "encoder.block.1.layer.0.SelfAttention.v.ia3_l" has 32 values.*expected 64/,
      );
    });

    test('adapter for another model', async () => {
      await expect(IA3Adapter.load(src(), { config: { ...config(), dFf: 128 } })).rejects.toThrow(/DenseReluDense.wo.ia3_l" has 96 values/);
      await expect(IA3Adapter.load(src(), { config: { ...config(), numLayers: 1 } })).rejects.toThrow(
        /module "encoder.block.1.layer.0.SelfAttention.k.ia3_l" does not exist/,
      );
      await expect(IA3Adapter.load(src(), { config: T0_3B })).rejects.toThrow(InvalidAdapterError);
    });

    test('not an IA3 adapter / not an adapter at all', async () => {
      const file = rewrite((t) => { t['base_model.model.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight'] = { dtype: 'F32', shape: [2], data: new Float32Array(2) }; });
      await expect(IA3Adapter.load(file)).rejects.toThrow(/is not an \(IA\)3 vector/);
      const dir = tmp();
      fs.mkdirSync(dir);
      await expect(IA3Adapter.load(dir)).rejects.toThrow(/no adapter_model.safetensors \(or adapter_model.bin\)/);
      fs.writeFileSync(path.join(dir, 'adapter_config.json'), JSON.stringify({ peft_type: 'LORA' }));
      fs.copyFileSync(src(), path.join(dir, 'adapter_model.safetensors'));
      await expect(IA3Adapter.load(dir)).rejects.toThrow(/only IA3/);
      const junk = tmp();
      fs.writeFileSync(junk, 'definitely not safetensors');
      await expect(IA3Adapter.load(junk)).rejects.toThrow(InvalidAdapterError);
      await expect(IA3Adapter.load(tmp())).rejects.toThrow(/no adapter at/);
    });
  });
});

describe('torch .pt reader', () => {
  test('dtypes, offsets and non-contiguous strides', () => {
    const storage = Float32Array.from([0, 1, 2, 3, 4, 5, 6, 7]);
    const half = Uint16Array.from([0x3c00, 0xc000, 0x3800]); // 1, -2, 0.5
    const bf = Uint16Array.from([0x3f80, 0x4040]); // 1, 3
    const file = tmp('synthetic.pt');
    fs.writeFileSync(file, torchZip([
      { name: 'plain', storage, type: 'FloatStorage', shape: [2, 4] },
      { name: 'transposed', storage, type: 'FloatStorage', shape: [4, 2], stride: [1, 4] },
      { name: 'slice', storage, type: 'FloatStorage', offset: 5, shape: [3, 1] },
      { name: 'half', storage: half, type: 'HalfStorage', shape: [3] },
      { name: 'bf16', storage: bf, type: 'BFloat16Storage', shape: [1, 2] },
    ]));
    const m = readTorchCheckpoint(file);
    expect([...m.keys()]).toEqual(['plain', 'transposed', 'slice', 'half', 'bf16']);
    expect(Array.from(m.get('plain')!.data)).toEqual([0, 1, 2, 3, 4, 5, 6, 7]);
    expect(Array.from(m.get('transposed')!.data)).toEqual([0, 4, 1, 5, 2, 6, 3, 7]);
    expect(m.get('transposed')!.shape).toEqual([4, 2]);
    expect(Array.from(m.get('slice')!.data)).toEqual([5, 6, 7]);
    expect(Array.from(m.get('half')!.data)).toEqual([1, -2, 0.5]);
    expect(m.get('half')!.dtype).toBe('F16');
    expect(Array.from(m.get('bf16')!.data)).toEqual([1, 3]);
  });

  test('unexpected content is a FileFormatError', () => {
    const file = tmp('bad.pt');
    fs.writeFileSync(file, torchZip([{ name: 'x', storage: new Float32Array(2), type: 'FloatStorage', shape: [2] }], ['os', 'system']));
    expect(() => readTorchCheckpoint(file)).toThrow(FileFormatError);
    expect(() => readTorchCheckpoint(file)).toThrow(/unsupported object os.system/);
    fs.writeFileSync(file, torchZip([{ name: 'x', storage: new Float32Array(2), type: 'FloatStorage', shape: [3] }]));
    expect(() => readTorchCheckpoint(file)).toThrow(/reads past the end of its storage/);
    fs.writeFileSync(file, zipSync({ 'archive/other.txt': Buffer.from('hi') }));
    expect(() => readTorchCheckpoint(file)).toThrow(/no data.pkl/);
    fs.writeFileSync(file, Buffer.from([0x80, 2, 0x7d, 0x2e]));
    expect(() => readTorchCheckpoint(file)).toThrow(/legacy/);
    fs.writeFileSync(file, 'hello');
    expect(() => readTorchCheckpoint(file)).toThrow(/not a PyTorch zip/);
  });

  test('a T5 v1.0 T-Few checkpoint (no wi_1) keeps FFN vectors at 1 and needs a config', async () => {
    const config = readT5Config(fixture('tiny-relu-tied'));
    const inner = config.numHeads * config.dKv;
    const tensors: Parameters<typeof torchZip>[0] = [];
    const mods = ia3Modules(config).filter((m) => !m.name.endsWith('wo.ia3_l'));
    mods.forEach((m, j) => tensors.push({
      name: `model.${m.name.replace(/\.ia3_l$/, '.multi_lora_b')}`,
      storage: Float32Array.from({ length: inner }, (_, i) => 1 + j / 100 + i / 1000),
      type: 'FloatStorage', shape: [inner, 1],
    }));
    const file = tmp('t5v1.pt');
    fs.writeFileSync(file, torchZip(tensors));
    await expect(IA3Adapter.load(file)).rejects.toThrow(/pass options.config/);
    const a = await IA3Adapter.load(file, { config });
    mods.forEach((m, j) => expect(a.get(m.name)[2]).toBe(Math.fround(1 + j / 100 + 2 / 1000)));
    for (const m of a.modules.filter((x) => x.name.endsWith('wo.ia3_l'))) expect(a.get(m.name).every((v) => v === 1)).toBe(true);
  });
});

describe('the released T-Few checkpoint t03b_ia3_finish.pt', () => {
  const file = dataFile('t-few-ia3/t03b_ia3_finish.pt', 'T-Few .pt tests');
  const maybe = file ? test : test.skip;

  maybe('192 tensors, shapes (2048,1)/(5120,1), bytes equal to the zip storages', () => {
    const tensors = readTorchCheckpoint(file!);
    expect(tensors.size).toBe(192);
    let total = 0;
    // every tensor's values are exactly one raw storage of the zip (read here without the pickle)
    const storages = new Set<string>();
    for (const [name, bytes] of Object.entries(unzipSync(fs.readFileSync(file!)))) {
      if (/\/data\/\d+$/.test(name)) storages.add(Buffer.from(bytes).toString('base64'));
    }
    expect(storages.size).toBe(192);
    for (const [name, t] of tensors) {
      expect(t.dtype).toBe('F32');
      expect(t.shape).toEqual([name.includes('wi_1') ? 5120 : 2048, 1]);
      expect(storages.has(Buffer.from(t.data.buffer).toString('base64'))).toBe(true);
      total += t.data.length;
    }
    expect(total).toBe(540672);
  });

  maybe('indexTorchCheckpoint maps every tensor to the bytes readTorchCheckpoint reads (torch pads its local zip headers)', async () => {
    const full = readTorchCheckpoint(file!);
    const ranges = await indexTorchCheckpoint(file!);
    expect([...ranges.keys()]).toEqual([...full.keys()]);
    const bytes = fs.readFileSync(file!);
    for (const [name, r] of ranges) {
      expect(r).toMatchObject({ name, dtype: 'F32', shape: full.get(name)!.shape });
      expect(r.offset % 64).toBe(0);  // (torch.save aligns its storages)
      const mapped = new Float32Array(bytes.buffer.slice(bytes.byteOffset + r.offset, bytes.byteOffset + r.offset + r.byteLength));
      expect(mapped).toEqual(full.get(name)!.data);
    }
  });

  maybe('loads as an adapter for T0-3B (wi_1 -> wo), with or without the config', async () => {
    const tensors = readTorchCheckpoint(file!);
    const a = await IA3Adapter.load(file!, { config: T0_3B });
    expect(a.data.length).toBe(540672);
    expect(a.dims).toEqual({ numLayers: 24, numDecoderLayers: 24, innerDim: 2048, dFf: 5120 });
    for (const [key, t] of tensors) {
      const name = key.replace('.wi_1.', '.wo.').replace(/multi_lora_b$/, 'ia3_l');
      // byte-exact (jest's element-wise toEqual is slow on 540k values)
      expect(bytesOf(a.get(name)).equals(bytesOf(t.data))).toBe(true);
    }
    let sum = 0;
    for (const v of a.data) sum += v;
    expect(Math.abs(sum / a.data.length - 1)).toBeLessThan(0.05); // pre-trained vectors are centred near 1
    const inferred = await IA3Adapter.load(file!);
    expect(inferred.dims).toEqual(a.dims);
    expect(bytesOf(inferred.data).equals(bytesOf(a.data))).toBe(true);
  });
});
