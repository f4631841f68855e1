import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { requiredTensors, resolveCheckpoint } from '../lib/checkpoint';
import { readT5Config } from '../lib/config';
import { FileFormatError, fromNative, InvalidModelError } from '../lib/errors';
import { native } from '../lib/native';
import {
  floatToHalf, halfToFloat, readSafetensorsF64, readSafetensorsHeader, readTensorF32, readTensorF64,
  WritableTensor, writeSafetensors,
} from '../lib/safetensors';
import { fixturesDir } from './helpers/paths';

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

  test('corrupt headers are FileFormatErrors naming the file', () => {
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
});

describe('resolveCheckpoint', () => {
  test.each([['tiny-gated-gelu-untied'], ['tiny-relu-tied']])('%s resolves to the required tensors', (name) => {
    const dir = path.join(fixturesDir(), name);
    const { config, tensors, files } = resolveCheckpoint(dir);
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

  test('shared.weight may come from encoder.embed_tokens.weight; extra tensors are not passed', () => {
    const dir = editedCheckpoint(reluDir(), (t) => {
      t['encoder.embed_tokens.weight'] = t['shared.weight'];
      delete t['shared.weight'];
      t['some.unused.tensor'] = { dtype: 'F32', shape: [2], data: new Float32Array(2) };
    });
    const { tensors } = resolveCheckpoint(dir);
    const shared = tensors.find((t) => t.name === 'shared.weight')!;
    const entry = readSafetensorsHeader(path.join(dir, 'model.safetensors')).entries.get('encoder.embed_tokens.weight')!;
    expect(shared.offset).toBe(entry.offset);
    expect(tensors.some((t) => t.name.includes('unused'))).toBe(false);
  });

  test('sharded checkpoints via model.safetensors.index.json', () => {
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
    const { tensors, files } = resolveCheckpoint(dir);
    expect(files.sort()).toEqual([1, 2].map((k) => path.join(dir, `model-0000${k}-of-00002.safetensors`)));
    for (const t of tensors) {
      expect(t.file).toBe(path.join(dir, weightMap[t.name]));
      expect(t.dtype).toBe('BF16');
    }
  });

  test('no config.json', () => {
    const dir = tmpDir();
    fs.copyFileSync(path.join(gatedDir(), 'model.safetensors'), path.join(dir, 'model.safetensors'));
    expect(() => resolveCheckpoint(dir)).toThrow(InvalidModelError);
    expect(() => resolveCheckpoint(dir)).toThrow(`no config.json in ${dir}`);
  });

  test('non-T5 config', () => {
    const dir = tmpDir();
    fs.writeFileSync(path.join(dir, 'config.json'), JSON.stringify({ model_type: 'bert', hidden_size: 64 }));
    expect(() => resolveCheckpoint(dir)).toThrow(InvalidModelError);
    expect(() => resolveCheckpoint(dir)).toThrow(/model_type "bert"/);
    expect(() => resolveCheckpoint(dir)).toThrow(path.join(dir, 'config.json'));
  });

  test('no weights, or only pytorch_model.bin', () => {
    const dir = tmpDir();
    fs.copyFileSync(path.join(gatedDir(), 'config.json'), path.join(dir, 'config.json'));
    expect(() => resolveCheckpoint(dir)).toThrow(/no model\.safetensors/);
    fs.writeFileSync(path.join(dir, 'pytorch_model.bin'), 'x');
    expect(() => resolveCheckpoint(dir)).toThrow(InvalidModelError);
    expect(() => resolveCheckpoint(dir)).toThrow(/pytorch_model\.bin.*convert the weights to safetensors/);
  });

  test('missing tensor', () => {
    const dir = editedCheckpoint(gatedDir(), (t) => { delete t['decoder.block.1.layer.1.EncDecAttention.v.weight']; });
    expect(() => resolveCheckpoint(dir)).toThrow(InvalidModelError);
    expect(() => resolveCheckpoint(dir)).toThrow(
      `missing tensor "decoder.block.1.layer.1.EncDecAttention.v.weight" in ${path.join(dir, 'model.safetensors')}`,
    );
  });

  test('lm_head is required when the head is untied', () => {
    const dir = editedCheckpoint(gatedDir(), (t) => { delete t['lm_head.weight']; });
    expect(() => resolveCheckpoint(dir)).toThrow(/missing tensor "lm_head.weight"/);
  });

  test('wrongly shaped tensor', () => {
    const dir = editedCheckpoint(gatedDir(), (t) => {
      const w = t['encoder.block.0.layer.1.DenseReluDense.wi_1.weight'];
      w.shape = [w.shape[1], w.shape[0]];
    });
    expect(() => resolveCheckpoint(dir)).toThrow(InvalidModelError);
    expect(() => resolveCheckpoint(dir)).toThrow(
      /tensor "encoder.block.0.layer.1.DenseReluDense.wi_1.weight" in .*model\.safetensors has shape \[64, 96\], expected \[96, 64\]/,
    );
  });

  test('unsupported dtype (I8)', () => {
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
    expect(() => resolveCheckpoint(dir)).toThrow(InvalidModelError);
    expect(() => resolveCheckpoint(dir)).toThrow(new RegExp(`tensor "${name}" in .*model\\.safetensors has unsupported dtype I8`));
  });

  test('truncated file', () => {
    const dir = editedCheckpoint(gatedDir(), () => undefined);
    const file = path.join(dir, 'model.safetensors');
    const { entries } = readSafetensorsHeader(file);
    const last = [...entries.values()].sort((a, b) => b.offset - a.offset)[0];
    fs.truncateSync(file, fs.statSync(file).size - 100);
    expect(() => resolveCheckpoint(dir)).toThrow(FileFormatError);
    expect(() => resolveCheckpoint(dir)).toThrow(`${file}: truncated: tensor "${last.name}"`);
  });

  test('a file truncated while it is mapped: a FileFormatError, not SIGBUS (the process lives on)', async () => {
    // What a checkpoint truncated during loading does to the native reader: a file mapped, truncated, read.
    const read = () => native()._testing.readAfterTruncation().catch((e) => { throw fromNative(e); });
    await expect(read()).rejects.toThrow(FileFormatError);
    await expect(read()).rejects.toThrow(/^reading the test file \S*\/tfew-truncation-test-\w+ failed with a bus error: the file was truncated/);
  });

  test('corrupt header: garbage JSON and absurd length', () => {
    const dir = editedCheckpoint(gatedDir(), () => undefined);
    const file = path.join(dir, 'model.safetensors');
    const bytes = fs.readFileSync(file);
    bytes.write('garbage!', 8);
    fs.writeFileSync(file, bytes);
    expect(() => resolveCheckpoint(dir)).toThrow(FileFormatError);
    expect(() => resolveCheckpoint(dir)).toThrow(new RegExp(`${file.replace(/[.]/g, '\\.')}: corrupt safetensors header: invalid JSON`));
    bytes.writeBigUInt64LE(1n << 40n, 0);
    fs.writeFileSync(file, bytes);
    expect(() => resolveCheckpoint(dir)).toThrow(/corrupt safetensors header: header length 1099511627776/);
  });
});
