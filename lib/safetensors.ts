// The safetensors container: u64 little-endian header length N, N bytes of JSON
// ({name: {dtype, shape, data_offsets: [begin, end]}, __metadata__?: {string: string}}), then the data
// (offsets relative to the byte after the header). Only the header is ever read eagerly: checkpoint files
// can be tens of GB and the native side maps them itself.
import * as fs from 'fs';
import * as path from 'path';
import { FileFormatError } from './errors';

export interface SafetensorsEntry {
  name: string;
  dtype: 'F64' | 'F32' | 'F16' | 'BF16' | string;
  shape: number[];
  /** Absolute byte offset of the tensor's data in the file. */
  offset: number;
  byteLength: number;
}

export interface SafetensorsHeader {
  entries: Map<string, SafetensorsEntry>;
  metadata: Record<string, string>;
  fileSize: number;
}

export type WritableDType = 'F32' | 'F64' | 'F16' | 'BF16';

export interface WritableTensor {
  dtype: WritableDType;
  shape: number[];
  data: Float32Array | Float64Array;
}

/** Bytes per element of every dtype the safetensors format defines. */
export const DTYPE_SIZES: Readonly<Record<string, number>> = {
  BOOL: 1, U8: 1, I8: 1, F8_E4M3: 1, F8_E5M2: 1,
  I16: 2, U16: 2, F16: 2, BF16: 2,
  I32: 4, U32: 4, F32: 4,
  I64: 8, U64: 8, F64: 8,
};

const MAX_HEADER_BYTES = 100 * 1024 * 1024;

/** Reads and validates the header of a safetensors file (never the tensor data). */
export function readSafetensorsHeader(file: string): SafetensorsHeader {
  let fd: number;
  try {
    fd = fs.openSync(file, 'r');
  } catch (e) {
    throw new FileFormatError(`${file}: cannot open: ${(e as Error).message}`);
  }
  try {
    const fileSize = fs.fstatSync(fd).size;
    if (fileSize < 8) throw new FileFormatError(`${file}: not a safetensors file (${fileSize} bytes, shorter than the 8-byte header length)`);
    const lenBuf = Buffer.alloc(8);
    readFully(fd, lenBuf, 0, file);
    const headerLen = lenBuf.readBigUInt64LE(0);
    if (headerLen < 2n || headerLen > BigInt(fileSize - 8) || headerLen > BigInt(MAX_HEADER_BYTES)) {
      throw new FileFormatError(
        `${file}: corrupt safetensors header: header length ${headerLen} is impossible for a ${fileSize}-byte file`,
      );
    }
    const n = Number(headerLen);
    const headerBuf = Buffer.alloc(n);
    readFully(fd, headerBuf, 8, file);
    let json: unknown;
    try {
      json = JSON.parse(headerBuf.toString('utf8'));
    } catch (e) {
      throw new FileFormatError(`${file}: corrupt safetensors header: invalid JSON (${(e as Error).message})`);
    }
    if (typeof json !== 'object' || json === null || Array.isArray(json)) {
      throw new FileFormatError(`${file}: corrupt safetensors header: not a JSON object`);
    }
    const dataStart = 8 + n;
    const entries = new Map<string, SafetensorsEntry>();
    let metadata: Record<string, string> = {};
    for (const [name, value] of Object.entries(json as Record<string, unknown>)) {
      if (name === '__metadata__') {
        metadata = parseMetadata(value, file);
        continue;
      }
      entries.set(name, parseEntry(name, value, dataStart, fileSize, file));
    }
    return { entries, metadata, fileSize };
  } finally {
    fs.closeSync(fd);
  }
}

function parseMetadata(value: unknown, file: string): Record<string, string> {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) {
    throw new FileFormatError(`${file}: corrupt safetensors header: __metadata__ must be an object of strings`);
  }
  const out: Record<string, string> = {};
  for (const [k, v] of Object.entries(value as Record<string, unknown>)) {
    if (typeof v !== 'string') throw new FileFormatError(`${file}: corrupt safetensors header: __metadata__.${k} is not a string`);
    out[k] = v;
  }
  return out;
}

function parseEntry(name: string, value: unknown, dataStart: number, fileSize: number, file: string): SafetensorsEntry {
  const bad = (why: string) => new FileFormatError(`${file}: corrupt safetensors header: tensor "${name}": ${why}`);
  if (typeof value !== 'object' || value === null) throw bad('entry is not an object');
  const { dtype, shape, data_offsets: offsets } = value as Record<string, unknown>;
  if (typeof dtype !== 'string') throw bad('dtype is missing');
  if (!Array.isArray(shape) || !shape.every((d) => Number.isSafeInteger(d) && d >= 0)) throw bad('shape must be a list of non-negative integers');
  if (!Array.isArray(offsets) || offsets.length !== 2 || !offsets.every((o) => Number.isSafeInteger(o) && o >= 0)) {
    throw bad('data_offsets must be [begin, end]');
  }
  const [begin, end] = offsets as number[];
  if (end < begin) throw bad(`data_offsets [${begin}, ${end}] are reversed`);
  if (dataStart + end > fileSize) {
    throw new FileFormatError(
      `${file}: truncated: tensor "${name}" ends at byte ${dataStart + end} but the file has ${fileSize} bytes`,
    );
  }
  const itemSize = DTYPE_SIZES[dtype];
  // Unknown (newer) dtypes are passed through; their consumers decide whether they are supported.
  if (itemSize !== undefined) {
    const expected = (shape as number[]).reduce((a, b) => a * b, 1) * itemSize;
    if (expected !== end - begin) {
      throw bad(`${end - begin} bytes of data but shape [${(shape as number[]).join(', ')}] of ${dtype} needs ${expected}`);
    }
  }
  return { name, dtype, shape: shape as number[], offset: dataStart + begin, byteLength: end - begin };
}

function readFully(fd: number, buf: Buffer | Uint8Array, position: number, file: string): void {
  let done = 0;
  while (done < buf.length) {
    const n = fs.readSync(fd, buf, done, buf.length - done, position + done);
    if (n === 0) throw new FileFormatError(`${file}: truncated: unexpected end of file at byte ${position + done}`);
    done += n;
  }
}

function readEntryBytes(file: string, entry: SafetensorsEntry): ArrayBuffer {
  // A fresh ArrayBuffer so typed views over it are aligned.
  const bytes = new Uint8Array(entry.byteLength);
  let fd: number;
  try {
    fd = fs.openSync(file, 'r');
  } catch (e) {
    throw new FileFormatError(`${file}: cannot open: ${(e as Error).message}`);
  }
  try {
    readFully(fd, bytes, entry.offset, file);
  } finally {
    fs.closeSync(fd);
  }
  return bytes.buffer;
}

function numel(entry: SafetensorsEntry): number {
  return entry.shape.reduce((a, b) => a * b, 1);
}

// Typed-array views assume a little-endian host, which is every platform Node and CUDA run on.
function decode(buf: ArrayBuffer, entry: SafetensorsEntry, file: string, out: Float32Array | Float64Array): void {
  const n = out.length;
  switch (entry.dtype) {
    case 'F64': out.set(new Float64Array(buf, 0, n)); return;
    case 'F32': out.set(new Float32Array(buf, 0, n)); return;
    case 'F16': {
      const h = new Uint16Array(buf, 0, n);
      for (let i = 0; i < n; i++) out[i] = halfToFloat(h[i]);
      return;
    }
    case 'BF16': {
      const h = new Uint16Array(buf, 0, n);
      const bits = new Uint32Array(1);
      const f = new Float32Array(bits.buffer);
      for (let i = 0; i < n; i++) {
        bits[0] = h[i] << 16;
        out[i] = f[0];
      }
      return;
    }
    case 'I64': {
      const v = new BigInt64Array(buf, 0, n);
      for (let i = 0; i < n; i++) out[i] = Number(v[i]);
      return;
    }
    case 'I32': out.set(new Int32Array(buf, 0, n)); return;
    case 'I16': out.set(new Int16Array(buf, 0, n)); return;
    case 'I8': out.set(new Int8Array(buf, 0, n)); return;
    case 'U8':
    case 'BOOL': out.set(new Uint8Array(buf, 0, n)); return;
    default:
      throw new FileFormatError(`${file}: tensor "${entry.name}" has dtype ${entry.dtype}, which cannot be converted to float`);
  }
}

/** Reads one (small) tensor as float32, converting from F64/F32/F16/BF16 (and integer dtypes). */
export function readTensorF32(file: string, entry: SafetensorsEntry): Float32Array {
  const out = new Float32Array(numel(entry));
  decode(readEntryBytes(file, entry), entry, file, out);
  return out;
}

/** Reads one (small) tensor as float64 (exact for F64 fixtures and integer tensors up to 2^53). */
export function readTensorF64(file: string, entry: SafetensorsEntry): Float64Array {
  const out = new Float64Array(numel(entry));
  decode(readEntryBytes(file, entry), entry, file, out);
  return out;
}

/** Every tensor of a small file as float64 (fixtures, adapters). */
export function readSafetensorsF64(file: string): Map<string, { shape: number[]; dtype: string; data: Float64Array }> {
  const { entries } = readSafetensorsHeader(file);
  const out = new Map<string, { shape: number[]; dtype: string; data: Float64Array }>();
  for (const entry of entries.values()) out.set(entry.name, { shape: entry.shape, dtype: entry.dtype, data: readTensorF64(file, entry) });
  return out;
}

/**
 * Writes a safetensors file readable by HF safetensors: contiguous data in the given order, the header
 * padded with spaces to a multiple of 8 bytes. Written to a temporary name and renamed into place.
 */
export function writeSafetensors(file: string, tensors: Record<string, WritableTensor>, metadata?: Record<string, string>): void {
  const header: Record<string, unknown> = {};
  if (metadata && Object.keys(metadata).length > 0) header.__metadata__ = { ...metadata };
  const blobs: Uint8Array[] = [];
  let offset = 0;
  for (const [name, t] of Object.entries(tensors)) {
    if (name === '__metadata__') throw new FileFormatError(`${file}: "__metadata__" cannot be a tensor name`);
    const itemSize = DTYPE_SIZES[t.dtype];
    if (itemSize === undefined || !['F32', 'F64', 'F16', 'BF16'].includes(t.dtype)) {
      throw new FileFormatError(`${file}: cannot write tensor "${name}" as ${t.dtype}`);
    }
    const count = t.shape.reduce((a, b) => a * b, 1);
    if (count !== t.data.length) {
      throw new FileFormatError(`${file}: tensor "${name}" has ${t.data.length} values but shape [${t.shape.join(', ')}]`);
    }
    const blob = encode(t);
    header[name] = { dtype: t.dtype, shape: t.shape, data_offsets: [offset, offset + blob.byteLength] };
    blobs.push(blob);
    offset += blob.byteLength;
  }
  let json = JSON.stringify(header);
  const jsonBytes = Buffer.byteLength(json, 'utf8');
  json += ' '.repeat((8 - (jsonBytes % 8)) % 8);
  const headerBuf = Buffer.from(json, 'utf8');
  const lenBuf = Buffer.alloc(8);
  lenBuf.writeBigUInt64LE(BigInt(headerBuf.length), 0);

  fs.mkdirSync(path.dirname(file), { recursive: true });
  const tmp = `${file}.tmp-${process.pid}-${Date.now()}`;
  const fd = fs.openSync(tmp, 'w');
  try {
    fs.writeSync(fd, lenBuf);
    fs.writeSync(fd, headerBuf);
    for (const blob of blobs) {
      let done = 0;
      while (done < blob.byteLength) done += fs.writeSync(fd, blob, done, blob.byteLength - done);
    }
  } catch (e) {
    fs.closeSync(fd);
    fs.rmSync(tmp, { force: true });
    throw new FileFormatError(`${file}: write failed: ${(e as Error).message}`);
  }
  fs.closeSync(fd);
  fs.renameSync(tmp, file);
}

function encode(t: WritableTensor): Uint8Array {
  const n = t.data.length;
  switch (t.dtype) {
    case 'F64': return new Uint8Array(Float64Array.from(t.data).buffer);
    case 'F32': return new Uint8Array(Float32Array.from(t.data).buffer);
    case 'F16': {
      const h = new Uint16Array(n);
      for (let i = 0; i < n; i++) h[i] = floatToHalf(t.data[i]);
      return new Uint8Array(h.buffer);
    }
    case 'BF16': {
      const f = Float32Array.from(t.data);
      const bits = new Uint32Array(f.buffer);
      const h = new Uint16Array(n);
      for (let i = 0; i < n; i++) h[i] = floatBitsToBf16(bits[i]);
      return new Uint8Array(h.buffer);
    }
  }
}

/** IEEE binary16 bits -> number. */
export function halfToFloat(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >> 10) & 0x1f;
  const frac = h & 0x3ff;
  if (exp === 0) return sign * frac * 2 ** -24;
  if (exp === 0x1f) return frac ? NaN : sign * Infinity;
  return sign * (1 + frac / 1024) * 2 ** (exp - 15);
}

/** number -> IEEE binary16 bits, rounding to nearest even (values beyond the range become +-Infinity). */
export function floatToHalf(value: number): number {
  if (Number.isNaN(value)) return 0x7e00;
  const sign = value < 0 || Object.is(value, -0) ? 0x8000 : 0;
  const a = Math.abs(value);
  if (a === Infinity) return sign | 0x7c00;
  // Subnormal range: quantise to multiples of 2^-24 with ties to even.
  if (a < 2 ** -14) return sign | roundHalfEven(a * 2 ** 24);
  let exp = Math.floor(Math.log2(a));
  if (2 ** exp > a) exp -= 1; // guard log2 rounding
  if (2 ** (exp + 1) <= a) exp += 1;
  let mant = roundHalfEven((a / 2 ** exp - 1) * 1024);
  if (mant === 1024) {
    mant = 0;
    exp += 1;
  }
  if (exp > 15) return sign | 0x7c00;
  return sign | ((exp + 15) << 10) | mant;
}

function roundHalfEven(x: number): number {
  const f = Math.floor(x);
  const d = x - f;
  if (d > 0.5) return f + 1;
  if (d < 0.5) return f;
  return f % 2 === 0 ? f : f + 1;
}

/** float32 bits -> bfloat16 bits, rounding to nearest even (as torch does). */
export function floatBitsToBf16(bits: number): number {
  if ((bits & 0x7f800000) === 0x7f800000 && (bits & 0x7fffff) !== 0) return ((bits >>> 16) | 0x40) & 0xffff; // quiet NaN
  const rounded = bits + 0x7fff + ((bits >>> 16) & 1);
  return (rounded >>> 16) & 0xffff;
}
