// Reads a PyTorch checkpoint saved by torch.save (the zip container, torch >= 1.6) without Python: the zip
// holds <archive>/data.pkl (the pickled object, tensors referenced by persistent ids) and
// <archive>/data/<key> (raw little-endian storages). Two ways in:
// - readTorchCheckpoint: every tensor's values, for small files (the released T-Few (IA)3 checkpoints);
// - indexTorchCheckpoint: where each tensor lies in the file, for memory-mapping large ones (a Hugging Face
//   pytorch_model.bin: T0-3B's is 11.4 GB), reading only the zip directory (yauzl) and data.pkl.
// Only a closed set of pickle globals is honoured; anything else is a FileFormatError, so nothing in the
// file can make us build arbitrary objects.
import * as fs from 'fs';
import { unzipSync } from 'fflate';
import { NameRegistry, Parser } from 'pickleparser';
import * as yauzl from 'yauzl';
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
  // bytes: the storage's data (readTorchCheckpoint); byteLength: its size in the file (indexTorchCheckpoint)
  constructor(readonly key: string, readonly type: StorageType, readonly byteLength: number, readonly bytes?: Uint8Array) {}
  get numel(): number { return Math.floor(this.byteLength / this.type.size); }
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
  checkSignature(bytes, file);
  let entries: Record<string, Uint8Array>;
  try {
    // (whole-file reading is for small checkpoints: an entry that inflates past 256 MiB is refused, not inflated)
    entries = unzipSync(bytes, {
      filter: (f) => {
        if (f.originalSize > 256 << 20) throw new FileFormatError(`${file}: zip entry ${f.name} inflates to ${f.originalSize} bytes (at most 256 MiB here)`);
        return true;
      },
    });
  } catch (e) {
    if (e instanceof FileFormatError) throw e;
    throw new FileFormatError(`${file}: corrupt zip container: ${(e as Error).message}`);
  }
  const { pkl, prefix } = findPickle(Object.keys(entries), file);
  checkByteOrder(entries[`${prefix}byteorder`], file);
  const root = unpickle(entries[pkl], file, (key, type) => {
    const data = entries[`${prefix}data/${key}`];
    return data && new Storage(key, type, data.byteLength, data);
  });
  const out = new Map<string, TorchTensor>();
  for (const [name, t] of tensorsOf(root, file)) out.set(name, materialize(t, name, file));
  return out;
}

/** Where one tensor of a torch checkpoint lies in its file (contiguous, uncompressed): for memory-mapping. */
export interface TorchTensorRange {
  name: string;
  /** Safetensors-style dtype name: F32, F64, F16, BF16, I64, ... */
  dtype: string;
  shape: number[];
  /** Absolute byte offset of the tensor's first element in the file. */
  offset: number;
  byteLength: number;
  /** Why this tensor cannot be memory-mapped (a strided view, a compressed storage), when it cannot. */
  unmappable?: string;
}

/**
 * Where every tensor of a torch.save'd zip file lies, without reading the tensors: only the zip's central directory,
 * the local headers of the storages and data.pkl are read (ZIP64 included: files past 4 GiB). Tensors that share a
 * storage (tied weights) get the same range. A tensor that cannot be mapped (not a contiguous row-major view of its
 * storage, outside it, or in a compressed or encrypted entry) comes with `unmappable` saying why: a caller that
 * needs it refuses it (resolveCheckpoint), one that does not goes on.
 */
export async function indexTorchCheckpoint(file: string): Promise<Map<string, TorchTensorRange>> {
  checkSignature(fileHead(file), file);
  let zip: yauzl.ZipFile;
  try {
    zip = await yauzl.openPromise(file, { lazyEntries: true, autoClose: false, strictFileNames: false });
  } catch (e) {
    throw new FileFormatError(`${file}: corrupt zip container: ${(e as Error).message}`);
  }
  try {
    const entries = new Map<string, yauzl.Entry>();
    try {
      for await (const entry of zip.eachEntry()) entries.set(entry.fileName, entry);
    } catch (e) {
      throw new FileFormatError(`${file}: corrupt zip container: ${(e as Error).message}`);
    }
    const { pkl, prefix } = findPickle([...entries.keys()], file);
    const read = async (entry: yauzl.Entry, limit: number): Promise<Buffer> => {
      if (entry.uncompressedSize > limit) throw new FileFormatError(`${file}: ${entry.fileName} is ${entry.uncompressedSize} bytes (at most ${limit} expected)`);
      try {
        const chunks: Buffer[] = [];
        for await (const chunk of await zip.openReadStreamPromise(entry)) chunks.push(chunk as Buffer);
        return Buffer.concat(chunks);
      } catch (e) {
        throw new FileFormatError(`${file}: cannot read ${entry.fileName}: ${(e as Error).message}`);
      }
    };
    const byteorder = entries.get(`${prefix}byteorder`);
    checkByteOrder(byteorder && await read(byteorder, 64), file);
    const pklEntry = entries.get(pkl) as yauzl.Entry;
    const storageEntries = new Map<Storage, yauzl.Entry>();
    // (T0-3B's data.pkl is ~100 KB: a larger one is no state dict, maybe a zip bomb)
    const root = unpickle(await read(pklEntry, 64 << 20), file, (key, type) => {
      const entry = entries.get(`${prefix}data/${key}`);
      if (!entry) return undefined;
      const s = new Storage(key, type, entry.uncompressedSize);
      storageEntries.set(s, entry);
      return s;
    });
    const dataStart = new Map<Storage, number>();
    const out = new Map<string, TorchTensorRange>();
    for (const [name, t] of tensorsOf(root, file)) {
      const { storage, offset, shape, stride } = t;
      let bad: string | undefined;
      try {
        checkView(t, name, file);
      } catch (e) {
        bad = (e as Error).message.replace(`${file}: `, '');
      }
      const numel = shape.reduce((a, b) => a * b, 1);
      const entry = storageEntries.get(storage) as yauzl.Entry;
      // (a tensor that cannot be mapped fails the load only if the model needs it: resolveCheckpoint)
      const rowMajor = shape.every((dim, d) => dim === 1 || stride[d] === shape.slice(d + 1).reduce((a, b) => a * b, 1));
      const unmappable = bad ? bad
        : !rowMajor
        ? `a strided view of its storage (strides [${stride.join(', ')}] for shape [${shape.join(', ')}]): save a contiguous copy`
        : entry.isEncrypted() ? `its storage ${entry.fileName} is encrypted`
        : entry.compressionMethod !== 0 ? `its storage ${entry.fileName} is compressed (zip method ${entry.compressionMethod}; torch.save stores storages uncompressed)`
        : undefined;
      if (unmappable) {
        out.set(name, { name, dtype: storage.type.dtype, shape: [...shape], offset: 0, byteLength: 0, unmappable });
        continue;
      }
      let start = dataStart.get(storage);
      if (start === undefined) {
        try {
          start = (await zip.readLocalFileHeaderPromise(entry, { minimal: true })).fileDataStart;
        } catch (e) {
          throw new FileFormatError(`${file}: corrupt zip container at ${entry.fileName}: ${(e as Error).message}`);
        }
        dataStart.set(storage, start);
      }
      out.set(name, { name, dtype: storage.type.dtype, shape: [...shape], offset: start + offset * storage.type.size,
                      byteLength: numel * storage.type.size });
    }
    return out;
  } finally {
    zip.close();
  }
}

/** The first 4 bytes of a file (fewer if it is shorter); FileFormatError when it cannot be read. */
function fileHead(file: string): Buffer {
  const head = Buffer.alloc(4);
  try {
    const fd = fs.openSync(file, 'r');
    try {
      return head.subarray(0, fs.readSync(fd, head, 0, 4, 0));
    } finally {
      fs.closeSync(fd);
    }
  } catch (e) {
    throw new FileFormatError(`${file}: cannot read: ${(e as Error).message}`);
  }
}

const zipSignature = (head: Uint8Array): boolean => head.length >= 2 && head[0] === 0x50 && head[1] === 0x4b;  // "PK"

/** Whether a file starts with a zip signature, as torch.save's files (>= 1.6) do. */
export function isZipFile(file: string): boolean {
  return zipSignature(fileHead(file));
}

function checkSignature(head: Uint8Array, file: string): void {
  if (head.length >= 2 && head[0] === 0x80) {
    throw new FileFormatError(`${file}: legacy (pre-1.6, non-zip) torch.save format is not supported; re-save it with a recent PyTorch`);
  }
  if (head.length < 4 || !zipSignature(head)) {
    throw new FileFormatError(`${file}: not a PyTorch zip checkpoint (no zip signature)`);
  }
}

// The pickle's entry name (<archive>/data.pkl) and the archive prefix of the other entries.
function findPickle(names: string[], file: string): { pkl: string; prefix: string } {
  const pkl = names.find((n) => n === 'data.pkl' || n.endsWith('/data.pkl'));
  if (!pkl) throw new FileFormatError(`${file}: no data.pkl in the zip container`);
  return { pkl, prefix: pkl.slice(0, pkl.length - 'data.pkl'.length) };
}

function checkByteOrder(byteorder: Uint8Array | undefined, file: string): void {
  if (byteorder && new TextDecoder().decode(byteorder).trim() !== 'little') {
    throw new FileFormatError(`${file}: big-endian torch checkpoints are not supported`);
  }
}

// Unpickles data.pkl; `storage(key, type)` gives the storage a persistent id names (undefined: missing from the zip).
function unpickle(pkl: Uint8Array, file: string, storage: (key: string, type: StorageType) => Storage | undefined): unknown {
  const storages = new Map<string, Storage>();
  const storageRef = (pid: unknown): Storage => {
    // pid = ('storage', storage_type, key, location, numel)
    if (!Array.isArray(pid) || pid[0] !== 'storage' || !(pid[1] instanceof StorageType) || typeof pid[2] !== 'string') {
      throw new FileFormatError(`${file}: unexpected persistent id ${describe(pid)} in data.pkl`);
    }
    const [, type, key] = pid as [string, StorageType, string];
    const cached = storages.get(key);
    if (cached) return cached;
    const s = storage(key, type);
    if (!s) throw new FileFormatError(`${file}: storage data/${key} referenced by data.pkl is missing from the zip`);
    storages.set(key, s);
    return s;
  };
  try {
    const parser = new Parser({
      nameResolver: new StrictRegistry(file),
      persistentResolver: { resolve: storageRef },
      unpicklingTypeOfDictionary: 'Map',
    });
    return parser.parse(pkl);
  } catch (e) {
    if (e instanceof FileFormatError) throw e;
    throw new FileFormatError(`${file}: cannot unpickle data.pkl: ${(e as Error).message}`);
  }
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

// Every tensor under `node` with its name: nested dicts flattened with '.'-joined keys. Plain numbers, strings and
// lists (epochs, hyper-parameters...) are not tensors and are skipped. The pickle's memo can make a dict contain
// itself, or a chain of shared dicts that would be walked 2^depth times: a cycle, more than 64 levels or more than
// a million entries walked are refused.
function tensorsOf(root: unknown, file: string): [string, RebuiltTensor][] {
  const out: [string, RebuiltTensor][] = [];
  const onPath = new Set<Map<unknown, unknown>>();
  let walked = 0;
  const walk = (node: unknown, prefix: string) => {
    if (++walked > 1_000_000) throw new FileFormatError(`${file}: data.pkl has more than a million entries (shared dicts?): not a state dict`);
    if (node instanceof RebuiltTensor) out.push([prefix, node]);
    if (!(node instanceof Map)) return;
    if (onPath.has(node)) throw new FileFormatError(`${file}: the dict "${prefix}" in data.pkl contains itself: not a state dict`);
    if (onPath.size >= 64) throw new FileFormatError(`${file}: data.pkl nests dicts more than 64 deep: not a state dict`);
    onPath.add(node);
    for (const [k, v] of node) walk(v, prefix ? `${prefix}.${String(k)}` : String(k));
    onPath.delete(node);
  };
  walk(root, '');
  return out;
}

// A view that stays inside its storage.
function checkView(t: RebuiltTensor, name: string, file: string): void {
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
}

function materialize(t: RebuiltTensor, name: string, file: string): TorchTensor {
  checkView(t, name, file);
  const { storage, offset, shape, stride } = t;
  const n = shape.reduce((a, b) => a * b, 1);
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
  const b = storage.bytes as Uint8Array;
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
