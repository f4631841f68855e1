#!/usr/bin/env python3
"""Writes a checkpoint in PyTorch's torch.save format (a zip of archive/data.pkl and raw storages) from a
model.safetensors, without torch: the container and pickle as torch >= 1.6 writes a Hugging Face state_dict.

  python3 test/helpers/write_torch_bin.py MODEL.safetensors OUT.bin [--shards N --index OUT_DIR] [--tie] [--filler-gib G]

What it imitates of torch.save (torch/serialization.py):
  - an OrderedDict state_dict with a `_metadata` attribute (pickled by BUILD after the items);
  - each tensor as torch._utils._rebuild_tensor_v2(persistent storage id, offset, size, stride, requires_grad,
    backward_hooks), the id being ('storage', torch.FloatStorage, key, 'cpu', numel);
  - storages stored uncompressed as archive/data/<key>, 64-byte aligned by padding the local header's extra field;
  - ZIP64 records in the local headers (torch's writer emits them for every entry).
--tie stores encoder.embed_tokens.weight and decoder.embed_tokens.weight as views of shared.weight's storage, as
tied Hugging Face models do. --shards N splits the tensors over N files and writes pytorch_model.bin.index.json.
--filler-gib G stores first a tensor "filler" of G GiB of zeros (a storage the model does not use), so that every
other storage lies past it, as in T0-3B's 11 GB file: past 4 GiB, their offsets need the ZIP64 records. The zeros are
a hole in a sparse file (SparseWriter), so the file takes little disk space and is written in seconds.
This is a test helper: the pickle and zip come from Python's standard library, independent of our reader.
"""
import collections
import io
import json
import pickle
import struct
import sys
import types
import zipfile

DTYPES = {'F32': ('FloatStorage', 4), 'F16': ('HalfStorage', 2), 'BF16': ('BFloat16Storage', 2), 'F64': ('DoubleStorage', 8)}

# Stand-ins for the torch globals the pickle names: only their module and name matter.
torch_mod = types.ModuleType('torch')
utils_mod = types.ModuleType('torch._utils')
sys.modules['torch'] = torch_mod
sys.modules['torch._utils'] = utils_mod
for name, _ in DTYPES.values():
    cls = type(name, (), {'__module__': 'torch'})
    setattr(torch_mod, name, cls)


def _rebuild_tensor_v2(*args):
    raise RuntimeError('never called')


_rebuild_tensor_v2.__module__ = 'torch._utils'
utils_mod._rebuild_tensor_v2 = _rebuild_tensor_v2


class Storage:
    def __init__(self, key, storage_type, numel, data):
        self.key, self.storage_type, self.numel, self.data = key, storage_type, numel, data


class Tensor:
    def __init__(self, storage, offset, shape):
        self.storage, self.offset, self.shape = storage, offset, shape

    def __reduce__(self):
        stride = [1] * len(self.shape)
        for i in range(len(self.shape) - 2, -1, -1):
            stride[i] = stride[i + 1] * self.shape[i + 1]
        return (_rebuild_tensor_v2, (self.storage, self.offset, tuple(self.shape), tuple(stride), False,
                                     collections.OrderedDict()))


class Zeros:
    """A storage's data of n zero bytes, handed to the zip writer in chunks that SparseWriter skips over."""
    CHUNK = bytes(64 << 20)

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


class SparseWriter(io.RawIOBase):
    """A file object for zipfile that seeks over the Zeros chunks instead of writing them (a hole reads as zeros)."""

    def __init__(self, f):
        self.f = f

    def writable(self):
        return True

    def seekable(self):
        return True

    def write(self, data):
        if data is Zeros.CHUNK:
            self.f.seek(len(data), io.SEEK_CUR)
            return len(data)
        return self.f.write(data)

    def seek(self, offset, whence=io.SEEK_SET):
        return self.f.seek(offset, whence)

    def tell(self):
        return self.f.tell()

    def flush(self):
        self.f.flush()


class Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ('storage', getattr(torch_mod, obj.storage_type), obj.key, 'cpu', obj.numel)
        return None


def read_safetensors(path):
    with open(path, 'rb') as f:
        buf = f.read()
    n = struct.unpack('<Q', buf[:8])[0]
    header = json.loads(buf[8:8 + n])
    header.pop('__metadata__', None)
    out = collections.OrderedDict()
    for name, e in header.items():
        b, end = e['data_offsets']
        out[name] = (e['dtype'], e['shape'], buf[8 + n + b:8 + n + end])
    return out


def write_bin(path, tensors, filler_bytes=0):
    """tensors: OrderedDict name -> (dtype, shape, bytes) or ('view', other_name)."""
    state = collections.OrderedDict()
    storages = []
    if filler_bytes:
        storages.append(Storage('0', 'FloatStorage', filler_bytes // 4, Zeros(filler_bytes)))
        state['filler'] = Tensor(storages[0], 0, [filler_bytes // 4])
    for name, t in tensors.items():
        if t[0] == 'view':
            state[name] = Tensor(state[t[1]].storage, 0, state[t[1]].shape)
            continue
        dtype, shape, data = t
        storage_type, size = DTYPES[dtype]
        s = Storage(str(len(storages)), storage_type, len(data) // size, data)
        storages.append(s)
        state[name] = Tensor(s, 0, shape)
    state._metadata = collections.OrderedDict([('', {'version': 1}), ('shared', {'version': 1})])
    write_zip(path, state, storages)


def write_zip(path, obj, storages):
    """torch.save's container for `obj` (dicts of Tensor), whose storages are `storages`."""
    pkl = io.BytesIO()
    Pickler(pkl, protocol=2).dump(obj)
    # the file ends with the central directory, never in a hole, so its size is right without a truncate
    with open(path, 'wb') as raw, zipfile.ZipFile(SparseWriter(raw), 'w', compression=zipfile.ZIP_STORED) as z:
        def add(name, data):
            info = zipfile.ZipInfo('archive/' + name)
            # the local header is 30 bytes + name + extra (+ 20 bytes of ZIP64 extra that force_zip64 adds):
            # pad it so that the data starts 64-byte aligned, as torch's writer does
            header = 30 + len(info.filename) + 20 + 4
            pad = (-(z.fp.tell() + header)) % 64
            info.extra = struct.pack('<HH', 0x4246, pad) + b'Z' * pad
            with z.open(info, 'w', force_zip64=True) as f:
                if isinstance(data, Zeros):
                    for k in range(0, len(data), len(Zeros.CHUNK)):
                        f.write(Zeros.CHUNK if len(data) - k >= len(Zeros.CHUNK) else bytes(len(data) - k))
                else:
                    f.write(data)
        add('data.pkl', pkl.getvalue())
        add('byteorder', b'little')
        for s in storages:
            add('data/' + s.key, s.data)
        add('version', b'3\n')


def main():
    args = sys.argv[1:]
    src, out = args[0], args[1]
    shards = int(args[args.index('--shards') + 1]) if '--shards' in args else 1
    tensors = read_safetensors(src)
    if '--tie' in args:
        for name in ('encoder.embed_tokens.weight', 'decoder.embed_tokens.weight'):
            tensors[name] = ('view', 'shared.weight')
    filler = int(float(args[args.index('--filler-gib') + 1]) * (1 << 30)) // 4 * 4 if '--filler-gib' in args else 0
    if shards == 1:
        write_bin(out, tensors, filler)
        return
    names = list(tensors)
    weight_map = {}
    for k in range(shards):
        part = collections.OrderedDict((n, tensors[n]) for n in names[k::shards] if tensors[n][0] != 'view')
        file = 'pytorch_model-%05d-of-%05d.bin' % (k + 1, shards)
        write_bin(out + '/' + file, part)
        weight_map.update({n: file for n in part})
    with open(out + '/pytorch_model.bin.index.json', 'w') as f:
        json.dump({'metadata': {}, 'weight_map': weight_map}, f)


if __name__ == '__main__':
    main()
