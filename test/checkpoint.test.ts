import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { spawnSync } from 'child_process';
import { requiredTensors, resolveCheckpoint } from '../lib/checkpoint';
import { readT5Config } from '../lib/config';
import { FileFormatError, fromNative, InvalidModelError } from '../lib/errors';
import { T5Model } from '../lib/model';
import { native } from '../lib/native';
import { indexTorchCheckpoint } from '../lib/torch-pt';
import {
  floatToHalf, halfToFloat, readSafetensorsF64, readSafetensorsHeader, readTensorF32, readTensorF64,
  WritableTensor, writeSafetensors,
} from '../lib/safetensors';
import { fixturesDir } from './helpers/paths';
import { torchZip, type TorchZipTensor } from './helpers/torch-zip';

const gatedDir = () => path.join(fixturesDir(), 'tiny-gated-gelu-untied');
const reluDir = () => path.join(fixturesDir(), 'tiny-relu-tied');

let tmpRoot: string;
beforeAll(() => { tmpRoot = fs.mkdtempSync(path.join(os.tmpdir(), 'tfew-ckpt-')); });
afterAll(() => fs.rmSync(tmpRoot, { recursive: true, force: true }));
let counter = 0;
function tmpDir(): string {
  const d = path.join(tmpRoot, `case${counter++}`);
  fs.mkdirSync(d);
  return d;
}

/**
 * Whether the temp directory's file system keeps holes (sparse files): the tests of offsets past 4 GiB write
 * files of 4.3 GB that are almost all hole, which elsewhere would take that much disk and time.
 */
function sparseFilesWork(): boolean {
  const probe = path.join(os.tmpdir(), `tfew-sparse-probe-${process.pid}`);
  try {
    const fd = fs.openSync(probe, 'w');
    fs.writeSync(fd, Buffer.from([1]), 0, 1, 64 << 20);
    fs.closeSync(fd);
    return fs.statSync(probe).blocks * 512 < 16 << 20;
  } catch {
    return false;
  } finally {
    fs.rmSync(probe, { force: true });
  }
}
const sparse = sparseFilesWork();
// eslint-disable-next-line no-console
if (!sparse) console.warn(`[tfew tests] skipping the checkpoints past 4 GiB: ${os.tmpdir()} does not keep sparse files`);

/** Independent reader of one F64/I64 tensor: parses the header with plain Buffer calls. */
function rawTensor(file: string, name: string): number[] {
  const buf = fs.readFileSync(file);
  const n = Number(buf.readBigUInt64LE(0));
  const header = JSON.parse(buf.subarray(8, 8 + n).toString('utf8'));
  const { dtype, data_offsets: [b, e] } = header[name];
  const out: number[] = [];
  for (let p = 8 + n + b; p < 8 + n + e; p += 8) out.push(dtype === 'F64' ? buf.readDoubleLE(p) : Number(buf.readBigInt64LE(p)));
  return out;
}

/** A copy of a fixture checkpoint whose model.safetensors is rewritten through `edit`. */
function editedCheckpoint(src: string, edit: (t: Record<string, WritableTensor>) => void): string {
  const dir = tmpDir();
  fs.copyFileSync(path.join(src, 'config.json'), path.join(dir, 'config.json'));
  const tensors: Record<string, WritableTensor> = {};
  for (const [name, t] of readSafetensorsF64(path.join(src, 'model.safetensors'))) {
    tensors[name] = { dtype: 'F32', shape: t.shape, data: Float32Array.from(t.data) };
  }
  edit(tensors);
  writeSafetensors(path.join(dir, 'model.safetensors'), tensors);
  return dir;
}

describe('safetensors', () => {
  test('header of an HF-written file: offsets are contiguous and inside the file', () => {
    const file = path.join(gatedDir(), 'model.safetensors');
    const { entries, fileSize } = readSafetensorsHeader(file);
    expect(fileSize).toBe(fs.statSync(file).size);
    const sorted = [...entries.values()].sort((a, b) => a.offset - b.offset);
    const dataStart = 8 + Number(fs.readFileSync(file).readBigUInt64LE(0));
    expect(sorted[0].offset).toBe(dataStart);
    for (let i = 1; i < sorted.length; i++) expect(sorted[i].offset).toBe(sorted[i - 1].offset + sorted[i - 1].byteLength);
    const last = sorted[sorted.length - 1];
    expect(last.offset + last.byteLength).toBe(fileSize);
  });

  test('readTensorF64 / readTensorF32 agree with an independent parse (F64 and I64)', () => {
    const file = path.join(gatedDir(), 'reference.safetensors');
    const { entries } = readSafetensorsHeader(file);
    for (const name of ['base.scores', 'input_ids', 'labels', 'ia3.value.encoder.block.0.layer.1.DenseReluDense.wo.ia3_l']) {
      const entry = entries.get(name)!;
      const expected = rawTensor(file, name);
      expect(Array.from(readTensorF64(file, entry))).toEqual(expected);
      const f32 = readTensorF32(file, entry);
      expected.forEach((v, i) => expect(f32[i]).toBe(Math.fround(v)));
    }
  });

  test('write + read round trip, all float dtypes', () => {
    const file = path.join(tmpDir(), 'rt.safetensors');
    const values = Float64Array.from([0, 1, -2, 0.5, 1 / 3, Math.PI, 65504, 2 ** -24, -1e-3, 123.456]);
    writeSafetensors(file, {
      a64: { dtype: 'F64', shape: [2, 5], data: values },
      a32: { dtype: 'F32', shape: [10], data: values },
      a16: { dtype: 'F16', shape: [5, 2], data: values },
      abf: { dtype: 'BF16', shape: [10, 1], data: Float32Array.from(values) },
      empty: { dtype: 'F32', shape: [0, 3], data: new Float32Array(0) },
    }, { format: 'pt' });

    const bytes = fs.readFileSync(file);
    const n = Number(bytes.readBigUInt64LE(0));
    expect(n % 8).toBe(0);
    expect(bytes[8]).toBe('{'.charCodeAt(0));
    const headerText = bytes.subarray(8, 8 + n).toString('utf8');
    expect(headerText.trimEnd().endsWith('}')).toBe(true);
    expect(headerText.slice(headerText.trimEnd().length)).toMatch(/^ *$/);

    const { entries, metadata } = readSafetensorsHeader(file);
    expect(metadata).toEqual({ format: 'pt' });
    expect(entries.get('a64')!.shape).toEqual([2, 5]);
    expect(Array.from(readTensorF64(file, entries.get('a64')!))).toEqual(Array.from(values));
    expect(readTensorF32(file, entries.get('a32')!)).toEqual(Float32Array.from(values));
    const h = readTensorF64(file, entries.get('a16')!);
    const b = readTensorF64(file, entries.get('abf')!);
    values.forEach((v, i) => {
      // half has an 11-bit significand, bfloat16 an 8-bit one (relative rounding error <= 2^-11 / 2^-8)
      expect(Math.abs(h[i] - v)).toBeLessThanOrEqual(Math.abs(v) * 2 ** -11 + 2 ** -25);
      expect(Math.abs(b[i] - v)).toBeLessThanOrEqual(Math.abs(v) * 2 ** -8);
    });
    // values representable in half come back exactly
    for (const i of [0, 1, 2, 3, 6, 7]) expect(h[i]).toBe(values[i]);
    expect(entries.get('empty')!.byteLength).toBe(0);
  });

  test('half conversion: rounding to nearest even and specials', () => {
    expect(floatToHalf(1)).toBe(0x3c00);
    expect(floatToHalf(-2)).toBe(0xc000);
    expect(floatToHalf(65504)).toBe(0x7bff);
    expect(floatToHalf(65520)).toBe(0x7c00); // rounds up past the largest finite half
    expect(floatToHalf(2 ** -24)).toBe(0x0001);
    expect(floatToHalf(2 ** -25)).toBe(0x0000); // tie to even (0)
    expect(floatToHalf(1 + 2 ** -11)).toBe(0x3c00); // tie to even
    expect(floatToHalf(1 + 3 * 2 ** -11)).toBe(0x3c02);
    expect(halfToFloat(0x7c00)).toBe(Infinity);
    expect(Number.isNaN(halfToFloat(floatToHalf(NaN)))).toBe(true);
    for (let bits = 0; bits < 0x7c00; bits += 37) expect(floatToHalf(halfToFloat(bits))).toBe(bits);
  });

  test('corrupt headers are FileFormatErrors naming the file', async () => {
    const dir = tmpDir();
    const file = path.join(dir, 'bad.safetensors');
    const withHeader = (json: string, extra = 0) => {
      const len = Buffer.alloc(8);
      len.writeBigUInt64LE(BigInt(Buffer.byteLength(json)));
      fs.writeFileSync(file, Buffer.concat([len, Buffer.from(json), Buffer.alloc(extra)]));
    };
    const expectBad = (message: RegExp) => {
      expect(() => readSafetensorsHeader(file)).toThrow(FileFormatError);
      expect(() => readSafetensorsHeader(file)).toThrow(message);
      expect(() => readSafetensorsHeader(file)).toThrow(file);
    };
    fs.writeFileSync(file, Buffer.from([1, 2, 3]));
    expectBad(/shorter than/);
    const absurd = Buffer.alloc(64);
    absurd.writeBigUInt64LE(0xffffffffffffn);
    fs.writeFileSync(file, absurd);
    expectBad(/header length/);
    withHeader('{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]');
    expectBad(/invalid JSON/);
    withHeader('[1,2]');
    expectBad(/not a JSON object/);
    withHeader('{"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}', 8);
    expectBad(/tensor "w".*needs 12/);
    withHeader('{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', 4);
    expectBad(/truncated: tensor "w"/);
    withHeader('{"__metadata__": {"x": 1}}');
    expectBad(/__metadata__/);
    expect(() => readSafetensorsHeader(path.join(dir, 'nope.safetensors'))).toThrow(FileFormatError);
  });

  // Offsets past 4 GiB (T0-3B's safetensors is 11 GB): the fixture's tensors written after a 4.25 GiB U8 tensor the
  // model does not use, a hole in a sparse file. They must map there and score bit for bit as from the original.
  (sparse ? test : test.skip)('a file whose tensors lie past 4 GiB loads and scores as the original', async () => {
    const src = gatedDir();
    const file = path.join(src, 'model.safetensors');
    const buf = fs.readFileSync(file);
    const n = Number(buf.readBigUInt64LE(0));
    const header = JSON.parse(buf.subarray(8, 8 + n).toString('utf8')) as Record<string, { data_offsets: [number, number] }>;
    const filler = 4.25 * 2 ** 30;
    const moved: Record<string, unknown> = { filler: { dtype: 'U8', shape: [filler], data_offsets: [0, filler] } };
    for (const [name, e] of Object.entries(header)) {
      moved[name] = name === '__metadata__' ? e : { ...e, data_offsets: [e.data_offsets[0] + filler, e.data_offsets[1] + filler] };
    }
    const json = Buffer.from(JSON.stringify(moved).padEnd(Math.ceil(JSON.stringify(moved).length / 8) * 8, ' '));
    const dir = tmpDir();
    fs.copyFileSync(path.join(src, 'config.json'), path.join(dir, 'config.json'));
    const fd = fs.openSync(path.join(dir, 'model.safetensors'), 'w');
    try {
      const length = Buffer.alloc(8);
      length.writeBigUInt64LE(BigInt(json.length));
      fs.writeSync(fd, length, 0, 8, 0);
      fs.writeSync(fd, json, 0, json.length, 8);
      fs.writeSync(fd, buf, 8 + n, buf.length - 8 - n, 8 + json.length + filler);  // the data, after the hole
    } finally {
      fs.closeSync(fd);
    }
    const resolved = await resolveCheckpoint(dir);
    for (const t of resolved.tensors) expect(t.offset).toBeGreaterThan(2 ** 32);
    const run = async (d: string) => {
      const m = await T5Model.load(d, { device: 'cpu', threads: 1 });
      try {
        return (await m.rankClassify([[5, 9, 13, 1], [7, 1]], [[[4, 1], [8, 6, 1]], [[11, 1], [3, 1]]])).scores;
      } finally {
        await m.dispose();
      }
    };
    expect(await run(dir)).toEqual(await run(src));
  });
});

describe('resolveCheckpoint', () => {
  test.each([['tiny-gated-gelu-untied'], ['tiny-relu-tied']])('%s resolves to the required tensors', async (name) => {
    const dir = path.join(fixturesDir(), name);
    const { config, tensors, files } = await resolveCheckpoint(dir);
    expect(config).toEqual(readT5Config(dir));
    expect(files).toEqual([path.join(dir, 'model.safetensors')]);
    const required = requiredTensors(config);
    const { entries } = readSafetensorsHeader(files[0]);
    // the required tensors in order, then the optional per-stack embeddings the file happens to carry
    const optional = ['encoder.embed_tokens.weight', 'decoder.embed_tokens.weight'].filter((n) => entries.has(n));
    expect(tensors.map((t) => t.name)).toEqual([...required.map((r) => r.name), ...optional]);
    // expected count, computed from the architecture
    const ffnCount = config.gatedGelu ? 3 : 2;
    const enc = config.numLayers * (4 + 2 + ffnCount) + 1 + 1;
    const dec = config.numDecoderLayers * (8 + 3 + ffnCount) + 1 + 1;
    expect(required.length).toBe(1 + (config.tiedHead ? 0 : 1) + enc + dec);
    expect(tensors.some((t) => t.name === 'lm_head.weight')).toBe(!config.tiedHead);
    for (const t of tensors) {
      const e = entries.get(t.name)!;
      expect(t).toMatchObject({ offset: e.offset, byteLength: e.byteLength, dtype: e.dtype, shape: e.shape });
      expect(t.byteLength).toBe(t.shape.reduce((a, b) => a * b, 1) * 4);
    }
  });

  test('shared.weight may come from encoder.embed_tokens.weight; extra tensors are not passed', async () => {
    const dir = editedCheckpoint(reluDir(), (t) => {
      t['encoder.embed_tokens.weight'] = t['shared.weight'];
      delete t['shared.weight'];
      t['some.unused.tensor'] = { dtype: 'F32', shape: [2], data: new Float32Array(2) };
    });
    const { tensors } = await resolveCheckpoint(dir);
    const shared = tensors.find((t) => t.name === 'shared.weight')!;
    const entry = readSafetensorsHeader(path.join(dir, 'model.safetensors')).entries.get('encoder.embed_tokens.weight')!;
    expect(shared.offset).toBe(entry.offset);
    expect(tensors.some((t) => t.name.includes('unused'))).toBe(false);
  });

  test('sharded checkpoints via model.safetensors.index.json', async () => {
    const src = gatedDir();
    const dir = tmpDir();
    fs.copyFileSync(path.join(src, 'config.json'), path.join(dir, 'config.json'));
    const all = readSafetensorsF64(path.join(src, 'model.safetensors'));
    const shards: Record<string, WritableTensor>[] = [{}, {}];
    const weightMap: Record<string, string> = {};
    [...all.entries()].forEach(([name, t], i) => {
      shards[i % 2][name] = { dtype: 'BF16', shape: t.shape, data: Float32Array.from(t.data) };
      weightMap[name] = `model-0000${(i % 2) + 1}-of-00002.safetensors`;
    });
    shards.forEach((s, i) => writeSafetensors(path.join(dir, `model-0000${i + 1}-of-00002.safetensors`), s));
    fs.writeFileSync(path.join(dir, 'model.safetensors.index.json'), JSON.stringify({ metadata: {}, weight_map: weightMap }));
    const { tensors, files } = await resolveCheckpoint(dir);
    expect(files.sort()).toEqual([1, 2].map((k) => path.join(dir, `model-0000${k}-of-00002.safetensors`)));
    for (const t of tensors) {
      expect(t.file).toBe(path.join(dir, weightMap[t.name]));
      expect(t.dtype).toBe('BF16');
    }
  });

  test('no config.json', async () => {
    const dir = tmpDir();
    fs.copyFileSync(path.join(gatedDir(), 'model.safetensors'), path.join(dir, 'model.safetensors'));
    await expect(resolveCheckpoint(dir)).rejects.toThrow(InvalidModelError);
    await expect(resolveCheckpoint(dir)).rejects.toThrow(`no config.json in ${dir}`);
  });

  test('non-T5 config', async () => {
    const dir = tmpDir();
    fs.writeFileSync(path.join(dir, 'config.json'), JSON.stringify({ model_type: 'bert', hidden_size: 64 }));
    await expect(resolveCheckpoint(dir)).rejects.toThrow(InvalidModelError);
    await expect(resolveCheckpoint(dir)).rejects.toThrow(/model_type "bert"/);
    await expect(resolveCheckpoint(dir)).rejects.toThrow(path.join(dir, 'config.json'));
  });

  test('no weights, only TensorFlow or Flax weights, or a pytorch_model.bin that is not a torch zip', async () => {
    const dir = tmpDir();
    fs.copyFileSync(path.join(gatedDir(), 'config.json'), path.join(dir, 'config.json'));
    await expect(resolveCheckpoint(dir)).rejects.toThrow(/no model\.safetensors/);
    fs.writeFileSync(path.join(dir, 'tf_model.h5'), 'x');
    await expect(resolveCheckpoint(dir)).rejects.toThrow(InvalidModelError);
    await expect(resolveCheckpoint(dir)).rejects.toThrow(/tf_model\.h5 but neither model\.safetensors nor pytorch_model\.bin: convert the weights/);
    fs.writeFileSync(path.join(dir, 'pytorch_model.bin'), 'x');
    await expect(resolveCheckpoint(dir)).rejects.toThrow(FileFormatError);
    await expect(resolveCheckpoint(dir)).rejects.toThrow(/pytorch_model\.bin: not a PyTorch zip checkpoint/);
    fs.writeFileSync(path.join(dir, 'pytorch_model.bin'), Buffer.from([0x80, 2, 0x7d, 0x2e]));
    await expect(resolveCheckpoint(dir)).rejects.toThrow(/legacy \(pre-1\.6, non-zip\)/);
    fs.writeFileSync(path.join(dir, 'pytorch_model.bin'), Buffer.from('PK\x03\x04 and then nothing'));
    await expect(resolveCheckpoint(dir)).rejects.toThrow(/pytorch_model\.bin: corrupt zip container/);
  });

  test('missing tensor', async () => {
    const dir = editedCheckpoint(gatedDir(), (t) => { delete t['decoder.block.1.layer.1.EncDecAttention.v.weight']; });
    await expect(resolveCheckpoint(dir)).rejects.toThrow(InvalidModelError);
    await expect(resolveCheckpoint(dir)).rejects.toThrow(
      `missing tensor "decoder.block.1.layer.1.EncDecAttention.v.weight" in ${path.join(dir, 'model.safetensors')}`,
    );
  });

  test('lm_head is required when the head is untied', async () => {
    const dir = editedCheckpoint(gatedDir(), (t) => { delete t['lm_head.weight']; });
    await expect(resolveCheckpoint(dir)).rejects.toThrow(/missing tensor "lm_head.weight"/);
  });

  test('wrongly shaped tensor', async () => {
    const dir = editedCheckpoint(gatedDir(), (t) => {
      const w = t['encoder.block.0.layer.1.DenseReluDense.wi_1.weight'];
      w.shape = [w.shape[1], w.shape[0]];
    });
    await expect(resolveCheckpoint(dir)).rejects.toThrow(InvalidModelError);
    await expect(resolveCheckpoint(dir)).rejects.toThrow(
      /tensor "encoder.block.0.layer.1.DenseReluDense.wi_1.weight" in .*model\.safetensors has shape \[64, 96\], expected \[96, 64\]/,
    );
  });

  test('unsupported dtype (I8)', async () => {
    const dir = editedCheckpoint(gatedDir(), () => undefined);
    // rewrite the header so that one F32 tensor claims to be I8 with a consistent byte count
    const file = path.join(dir, 'model.safetensors');
    const bytes = fs.readFileSync(file);
    const n = Number(bytes.readBigUInt64LE(0));
    const header = JSON.parse(bytes.subarray(8, 8 + n).toString('utf8'));
    const name = 'decoder.final_layer_norm.weight';
    header[name].dtype = 'I8';
    header[name].shape = [header[name].shape[0] * 4];
    let json = JSON.stringify(header);
    json += ' '.repeat((8 - (json.length % 8)) % 8);
    const len = Buffer.alloc(8);
    len.writeBigUInt64LE(BigInt(json.length));
    fs.writeFileSync(file, Buffer.concat([len, Buffer.from(json), bytes.subarray(8 + n)]));
    await expect(resolveCheckpoint(dir)).rejects.toThrow(InvalidModelError);
    await expect(resolveCheckpoint(dir)).rejects.toThrow(new RegExp(`tensor "${name}" in .*model\\.safetensors has unsupported dtype I8`));
  });

  test('truncated file', async () => {
    const dir = editedCheckpoint(gatedDir(), () => undefined);
    const file = path.join(dir, 'model.safetensors');
    const { entries } = readSafetensorsHeader(file);
    const last = [...entries.values()].sort((a, b) => b.offset - a.offset)[0];
    fs.truncateSync(file, fs.statSync(file).size - 100);
    await expect(resolveCheckpoint(dir)).rejects.toThrow(FileFormatError);
    await expect(resolveCheckpoint(dir)).rejects.toThrow(`${file}: truncated: tensor "${last.name}"`);
  });

  test('a file truncated while it is mapped: a FileFormatError, not SIGBUS (the process lives on)', async () => {
    // What a checkpoint truncated during loading does to the native reader: a file mapped, truncated, read.
    const read = () => native()._testing.readAfterTruncation().catch((e) => { throw fromNative(e); });
    await expect(read()).rejects.toThrow(FileFormatError);
    await expect(read()).rejects.toThrow(/^reading the test file \S*\/tfew-truncation-test-\w+ failed with a bus error: the file was truncated/);
  });

  test('corrupt header: garbage JSON and absurd length', async () => {
    const dir = editedCheckpoint(gatedDir(), () => undefined);
    const file = path.join(dir, 'model.safetensors');
    const bytes = fs.readFileSync(file);
    bytes.write('garbage!', 8);
    fs.writeFileSync(file, bytes);
    await expect(resolveCheckpoint(dir)).rejects.toThrow(FileFormatError);
    await expect(resolveCheckpoint(dir)).rejects.toThrow(new RegExp(`${file.replace(/[.]/g, '\\.')}: corrupt safetensors header: invalid JSON`));
    bytes.writeBigUInt64LE(1n << 40n, 0);
    fs.writeFileSync(file, bytes);
    await expect(resolveCheckpoint(dir)).rejects.toThrow(/corrupt safetensors header: header length 1099511627776/);
  });
});

// Hugging Face's other format: pytorch_model.bin, the zip torch.save writes (T0_3B's hub repository ships it). The
// checkpoints here are the fixtures' model.safetensors re-saved in that format by test/helpers/write_torch_bin.py
// (Python's pickle and zipfile, imitating torch.save; no torch needed): the model must load from it and score
// exactly as from the safetensors, with the data memory-mapped (offsets into the .bin, never read into JS).
describe('pytorch_model.bin checkpoints', () => {
  const python = spawnSync('python3', ['-c', 'import zipfile, pickle'], { stdio: 'ignore' }).status === 0;
  const maybe = python ? test : test.skip;
  if (!python) console.warn('[tfew tests] skipping pytorch_model.bin loading: no python3 to write the checkpoints');
  const writeBin = (src: string, out: string, ...flags: string[]) => {
    const r = spawnSync('python3', [path.join(__dirname, 'helpers', 'write_torch_bin.py'), path.join(src, 'model.safetensors'), out, ...flags], { encoding: 'utf8' });
    if (r.status !== 0) throw new Error(`write_torch_bin.py failed: ${r.stderr}`);
  };
  const asBin = (src: string, ...flags: string[]): string => {
    const dir = tmpDir();
    fs.copyFileSync(path.join(src, 'config.json'), path.join(dir, 'config.json'));
    writeBin(src, flags.includes('--shards') ? dir : path.join(dir, 'pytorch_model.bin'), ...flags);
    return dir;
  };
  const inputs = [[5, 9, 13, 21, 1], [7, 1]];
  const choices = [[[4, 1], [8, 6, 1]], [[11, 1], [12, 1], [3, 1]]];
  const scores = async (dir: string) => {
    const m = await T5Model.load(dir, { device: 'cpu', threads: 1 });
    try {
      return { scores: (await m.rankClassify(inputs, choices)).scores, encoded: Array.from((await m.encode([inputs[0]]))[0]) };
    } finally {
      await m.dispose();
    }
  };

  maybe.each([['tiny-gated-gelu-untied', []], ['tiny-relu-tied', ['--tie']], ['tiny-gated-gelu-untied', ['--shards', '3']]])(
    '%s %j: the same tensors and the same scores as from model.safetensors', async (name, flags) => {
      const src = path.join(fixturesDir(), name as string);
      const dir = asBin(src, ...(flags as string[]));
      const fromBin = await resolveCheckpoint(dir);
      const fromSafetensors = await resolveCheckpoint(src);
      const sharded = (flags as string[]).includes('--shards');
      expect(fromBin.files).toHaveLength(sharded ? 3 : 1);
      expect(fromBin.files.every((f) => f.startsWith(dir) && f.endsWith('.bin'))).toBe(true);
      const shapes = (r: typeof fromBin) => r.tensors.map((t) => [t.name, t.dtype, t.shape]);
      expect(shapes(fromBin).filter(([n]) => !String(n).includes('embed_tokens')))
        .toEqual(shapes(fromSafetensors).filter(([n]) => !String(n).includes('embed_tokens')));
      // each range holds exactly the safetensors' bytes of that tensor
      for (const t of fromBin.tensors) {
        const twin = fromSafetensors.tensors.find((u) => u.name === t.name) ?? fromSafetensors.tensors.find((u) => u.name === 'shared.weight')!;
        const bytes = (file: string, offset: number, n: number) => {
          const b = Buffer.alloc(n);
          const fd = fs.openSync(file, 'r');
          fs.readSync(fd, b, 0, n, offset);
          fs.closeSync(fd);
          return b;
        };
        expect(bytes(t.file, t.offset, t.byteLength).equals(bytes(twin.file, twin.offset, twin.byteLength))).toBe(true);
      }
      if ((flags as string[]).includes('--tie')) {  // tied embeddings: one storage, one range
        const range = (n: string) => fromBin.tensors.find((t) => t.name === n);
        expect(range('encoder.embed_tokens.weight')).toMatchObject({ offset: range('shared.weight')!.offset });
      }
      expect(await scores(dir)).toEqual(await scores(src));
    });

  // T0-3B's pytorch_model.bin is 11.4 GB: most storages lie past 4 GiB, where the zip's central directory keeps
  // their offsets in ZIP64 records and 32-bit arithmetic would wrap. A 4.25 GiB filler storage (a hole in a sparse
  // file) puts every tensor the model uses there.
  (python && sparse ? test : test.skip)('a checkpoint whose tensors lie past 4 GiB (ZIP64 offsets) scores as from model.safetensors', async () => {
    const src = gatedDir();
    const dir = asBin(src, '--filler-gib', '4.25');
    const resolved = await resolveCheckpoint(dir);
    expect(resolved.tensors.length).toBeGreaterThan(10);
    for (const t of resolved.tensors) expect(t.offset).toBeGreaterThan(2 ** 32);
    expect(await scores(dir)).toEqual(await scores(src));
  });

  test('tensors that cannot be memory-mapped (if the model needs them), or missing, are clear errors', async () => {
    const src = gatedDir();
    const config = readT5Config(src);
    const dir = tmpDir();
    fs.copyFileSync(path.join(src, 'config.json'), path.join(dir, 'config.json'));
    const file = path.join(dir, 'pytorch_model.bin');
    const [v, d] = [config.vocabSize, config.dModel];
    const embedding = Float32Array.from({ length: v * d }, (_, i) => i);
    const write = (tensors: TorchZipTensor[], level: 0 | 6 = 0) => fs.writeFileSync(file, torchZip(tensors, undefined, level));
    write([{ name: 'shared.weight', storage: embedding, type: 'FloatStorage', shape: [v, d] }]);
    await expect(resolveCheckpoint(dir)).rejects.toThrow(InvalidModelError);
    await expect(resolveCheckpoint(dir)).rejects.toThrow(/missing tensor "lm_head.weight"/);
    // the model's embedding as a transposed view, or in a compressed zip entry: named, with the reason
    write([{ name: 'shared.weight', storage: embedding, type: 'FloatStorage', shape: [v, d], stride: [1, v] }]);
    await expect(resolveCheckpoint(dir)).rejects.toThrow(InvalidModelError);
    await expect(resolveCheckpoint(dir)).rejects.toThrow(/tensor "shared.weight" in .*pytorch_model\.bin cannot be memory-mapped: a strided view of its storage \(strides \[1, \d+\]/);
    write([{ name: 'shared.weight', storage: embedding, type: 'FloatStorage', shape: [v, d] }], 6);
    await expect(resolveCheckpoint(dir)).rejects.toThrow(/cannot be memory-mapped: its storage archive\/data\/0 is compressed \(zip method 8/);
    write([{ name: 'shared.weight', storage: embedding, type: 'FloatStorage', shape: [v + 1, d] }]);
    await expect(resolveCheckpoint(dir)).rejects.toThrow(InvalidModelError);
    await expect(resolveCheckpoint(dir)).rejects.toThrow(/cannot be memory-mapped: tensor "shared.weight" reads past the end of its storage/);
    // a tensor the model does not need may be anything: indexed with its reason, the load goes on (to the next error)
    write([{ name: 'shared.weight', storage: embedding, type: 'FloatStorage', shape: [v, d] },
           { name: 'optimizer.moment', storage: embedding, type: 'FloatStorage', shape: [d, v], stride: [1, d] }]);
    await expect(resolveCheckpoint(dir)).rejects.toThrow(/missing tensor "lm_head.weight"/);
    const index = await indexTorchCheckpoint(file);
    expect(index.get('optimizer.moment')!.unmappable).toMatch(/a strided view/);
    // a slice of a larger storage maps at its element offset
    write([{ name: 'x', storage: embedding, type: 'FloatStorage', offset: d, shape: [v - 1, d] }]);
    const x = (await indexTorchCheckpoint(file)).get('x')!;
    const raw = fs.readFileSync(file);
    expect(x.byteLength).toBe((v - 1) * d * 4);
    expect(x.unmappable).toBeUndefined();
    expect(new Float32Array(raw.buffer.slice(raw.byteOffset + x.offset, raw.byteOffset + x.offset + x.byteLength))).toEqual(embedding.subarray(d));
  });

  maybe('a pickle whose shared dicts would be walked 2^depth times, or a dict that contains itself, is refused', async () => {
    const file = path.join(tmpDir(), 'shared.bin');
    const script = `
import sys; sys.path.insert(0, ${JSON.stringify(path.join(__dirname, 'helpers'))})
import collections, write_torch_bin as w
s = w.Storage('0', 'FloatStorage', 4, bytes(16))
leaf = collections.OrderedDict(x=w.Tensor(s, 0, [4]))
d = leaf
for _ in range(40): d = collections.OrderedDict(a=d, b=d)
w.write_zip(sys.argv[1], d, [s])
loop = collections.OrderedDict(x=w.Tensor(s, 0, [4])); loop['self'] = loop
w.write_zip(sys.argv[1] + '.loop', loop, [s])
`;
    const r = spawnSync('python3', ['-c', script, file], { encoding: 'utf8' });
    expect(r.status).toBe(0);
    const t0 = Date.now();
    await expect(indexTorchCheckpoint(file)).rejects.toThrow(/has more than a million entries \(shared dicts\?\): not a state dict/);
    await expect(indexTorchCheckpoint(`${file}.loop`)).rejects.toThrow(FileFormatError);
    await expect(indexTorchCheckpoint(`${file}.loop`)).rejects.toThrow(/the dict "self" in data\.pkl contains itself/);
    expect(Date.now() - t0).toBeLessThan(5000);
  });
});
