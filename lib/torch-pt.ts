// Reads a PyTorch checkpoint saved by torch.save (the zip container, torch >= 1.6) without Python: the zip
// holds <archive>/data.pkl (the pickled object, tensors referenced by persistent ids) and
// <archive>/data/<key> (raw little-endian storages). Used for the released T-Few (IA)3 checkpoints.
// Only a closed set of pickle globals is honoured; anything else is a FileFormatError, so nothing in the
// file can make us build arbitrary objects.
import * as fs from 'fs';
import { unzipSync } from 'fflate';
import { NameRegistry, Parser } from 'pickleparser';
import { FileFormatError } from './errors';
import { halfToFloat } from './safetensors';

export interface TorchTensor {
  shape: number[];
  /** Safetensors-style dtype name of the storage: F32, F64, F16, BF16, I64, I32, I16, I8, U8, BOOL. */
  dtype: string;
  /** The values in row-major order, converted to float32. */
  data: Float32Array;
}

// torch storage class -> (dtype, bytes per element)
const STORAGE_TYPES: Record<string, { dtype: string; size: number }> = {
  FloatStorage: { dtype: 'F32', size: 4 },
  DoubleStorage: { dtype: 'F64', size: 8 },
  HalfStorage: { dtype: 'F16', size: 2 },
  BFloat16Storage: { dtype: 'BF16', size: 2 },
  LongStorage: { dtype: 'I64', size: 8 },
  IntStorage: { dtype: 'I32', size: 4 },
  ShortStorage: { dtype: 'I16', size: 2 },
  CharStorage: { dtype: 'I8', size: 1 },
  ByteStorage: { dtype: 'U8', size: 1 },
  BoolStorage: { dtype: 'BOOL', size: 1 },
};

class StorageType {
  constructor(readonly name: string, readonly dtype: string, readonly size: number) {}
}

class Storage {
  constructor(readonly key: string, readonly type: StorageType, readonly bytes: Uint8Array) {}
  get numel(): number { return Math.floor(this.bytes.byteLength / this.type.size); }
}

class RebuiltTensor {
  constructor(readonly storage: Storage, readonly offset: number, readonly shape: number[], readonly stride: number[]) {}
}

/** Reads every tensor of a torch.save'd zip file; nested dicts are flattened with '.'-joined keys. */
export function readTorchCheckpoint(file: string): Map<string, TorchTensor> {
  let bytes: Uint8Array;
  try {
    bytes = fs.readFileSync(file);
  } catch (e) {
    throw new FileFormatError(`${file}: cannot read: ${(e as Error).message}`);
  }
  return parseTorchCheckpoint(bytes, file);
}

/** As readTorchCheckpoint, from bytes already in memory (`file` names it in errors). */
export function parseTorchCheckpoint(bytes: Uint8Array, file: string): Map<string, TorchTensor> {
  if (bytes.length >= 2 && bytes[0] === 0x80) {
    throw new FileFormatError(`${file}: legacy (pre-1.6, non-zip) torch.save format is not supported; re-save it with a recent PyTorch`);
  }
  if (bytes.length < 4 || bytes[0] !== 0x50 || bytes[1] !== 0x4b) {
    throw new FileFormatError(`${file}: not a PyTorch zip checkpoint (no zip signature)`);
  }
  let entries: Record<string, Uint8Array>;
  try {
    entries = unzipSync(bytes);
  } catch (e) {
    throw new FileFormatError(`${file}: corrupt zip container: ${(e as Error).message}`);
  }
  const pklName = Object.keys(entries).find((n) => n === 'data.pkl' || n.endsWith('/data.pkl'));
  if (!pklName) throw new FileFormatError(`${file}: no data.pkl in the zip container`);
  const prefix = pklName.slice(0, pklName.length - 'data.pkl'.length);
  const byteorder = entries[`${prefix}byteorder`];
  if (byteorder && new TextDecoder().decode(byteorder).trim() !== 'little') {
    throw new FileFormatError(`${file}: big-endian torch checkpoints are not supported`);
  }

  const storages = new Map<string, Storage>();
  const registry = new StrictRegistry(file);
  const storageRef = (pid: unknown): Storage => {
    // pid = ('storage', storage_type, key, location, numel)
    if (!Array.isArray(pid) || pid[0] !== 'storage' || !(pid[1] instanceof StorageType) || typeof pid[2] !== 'string') {
      throw new FileFormatError(`${file}: unexpected persistent id ${describe(pid)} in data.pkl`);
    }
    const [, type, key] = pid as [string, StorageType, string];
    const cached = storages.get(key);
    if (cached) return cached;
    const data = entries[`${prefix}data/${key}`];
    if (!data) throw new FileFormatError(`${file}: storage data/${key} referenced by data.pkl is missing from the zip`);
    const s = new Storage(key, type, data);
    storages.set(key, s);
    return s;
  };
  let root: unknown;
  try {
    const parser = new Parser({
      nameResolver: registry,
      persistentResolver: { resolve: storageRef },
      unpicklingTypeOfDictionary: 'Map',
    });
    root = parser.parse(entries[pklName]);
  } catch (e) {
    if (e instanceof FileFormatError) throw e;
    throw new FileFormatError(`${file}: cannot unpickle data.pkl: ${(e as Error).message}`);
  }

  const out = new Map<string, TorchTensor>();
  collect(root, '', out, file);
  return out;
}

class StrictRegistry extends NameRegistry {
  constructor(private readonly file: string) {
    super();
    for (const [name, info] of Object.entries(STORAGE_TYPES)) {
      const type = new StorageType(name, info.dtype, info.size);
      // Storage classes are only passed around as values inside persistent ids, never called.
      this._registry.set(`torch.${name}`, type as unknown as () => StorageType);
    }
    const rebuild = (storage: unknown, offset: unknown, size: unknown, stride: unknown) => {
      if (!(storage instanceof Storage) || typeof offset !== 'number' || !Array.isArray(size) || !Array.isArray(stride)) {
        throw new FileFormatError(`${this.file}: malformed tensor record in data.pkl`);
      }
      return new RebuiltTensor(storage, offset, size as number[], stride as number[]);
    };
    this.register('torch._utils', '_rebuild_tensor_v2', rebuild);
    this.register('torch._utils', '_rebuild_tensor', rebuild);
    // nn.Parameter wraps a tensor: (data, requires_grad, backward_hooks)
    this.register('torch._utils', '_rebuild_parameter', (data: unknown) => data);
    this.register('collections', 'OrderedDict', () => new Map());
  }

  onMissingName(module: string, name: string): never {
    throw new FileFormatError(`${this.file}: unsupported object ${module}.${name} in data.pkl (only tensors and dicts are read)`);
  }
}

function describe(v: unknown): string {
  try {
    return JSON.stringify(v)?.slice(0, 80) ?? String(v);
  } catch {
    return String(v);
  }
}

function collect(node: unknown, prefix: string, out: Map<string, TorchTensor>, file: string): void {
  if (node instanceof RebuiltTensor) {
    out.set(prefix, materialize(node, prefix, file));
    return;
  }
  if (node instanceof Map) {
    for (const [k, v] of node) collect(v, prefix ? `${prefix}.${String(k)}` : String(k), out, file);
    return;
  }
  // Plain numbers, strings, lists (epochs, hyper-parameters...) are not tensors and are skipped.
}

function materialize(t: RebuiltTensor, name: string, file: string): TorchTensor {
  const { storage, offset, shape, stride } = t;
  if (shape.length !== stride.length || ![...shape, ...stride, offset].every((v) => Number.isInteger(v) && v >= 0)) {
    throw new FileFormatError(`${file}: tensor "${name}" has a malformed shape/stride`);
  }
  const n = shape.reduce((a, b) => a * b, 1);
  if (n > 0) {
    const last = offset + shape.reduce((acc, dim, i) => acc + (dim - 1) * stride[i], 0);
    if (last >= storage.numel) {
      throw new FileFormatError(`${file}: tensor "${name}" reads past the end of its storage data/${storage.key}`);
    }
  }
  const read = elementReader(storage, name, file);
  const data = new Float32Array(n);
  // Walk the (possibly non-contiguous) view in row-major order.
  const index = new Array<number>(shape.length).fill(0);
  for (let i = 0; i < n; i++) {
    let pos = offset;
    for (let d = 0; d < shape.length; d++) pos += index[d] * stride[d];
    data[i] = read(pos);
    for (let d = shape.length - 1; d >= 0; d--) {
      if (++index[d] < shape[d]) break;
      index[d] = 0;
    }
  }
  return { shape: [...shape], dtype: storage.type.dtype, data };
}

function elementReader(storage: Storage, name: string, file: string): (i: number) => number {
  const b = storage.bytes;
  const view = new DataView(b.buffer, b.byteOffset, b.byteLength);
  switch (storage.type.dtype) {
    case 'F32': return (i) => view.getFloat32(i * 4, true);
    case 'F64': return (i) => view.getFloat64(i * 8, true);
    case 'F16': return (i) => halfToFloat(view.getUint16(i * 2, true));
    case 'BF16': {
      const tmp = new DataView(new ArrayBuffer(4));
      return (i) => {
        tmp.setUint32(0, view.getUint16(i * 2, true) << 16, true);
        return tmp.getFloat32(0, true);
      };
    }
    case 'I64': return (i) => Number(view.getBigInt64(i * 8, true));
    case 'I32': return (i) => view.getInt32(i * 4, true);
    case 'I16': return (i) => view.getInt16(i * 2, true);
    case 'I8': return (i) => view.getInt8(i);
    case 'U8':
    case 'BOOL': return (i) => view.getUint8(i);
    default:
      throw new FileFormatError(`${file}: tensor "${name}" has unsupported storage ${storage.type.name}`);
  }
}
