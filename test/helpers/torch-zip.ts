// A torch.save zip written by hand (pickle protocol 2, fflate's zip), for the torch readers' tests: a dict of tensors
// rebuilt by torch._utils._rebuild_tensor_v2 from storages data/<key>. `extraGlobal` swaps OrderedDict for another
// global (a pickle that must be refused); `level` > 0 compresses the entries (torch.save never does).
import { zipSync } from 'fflate';

export interface TorchZipTensor {
  name: string;
  storage: Float32Array | Uint16Array;
  type: string;
  offset?: number;
  shape: number[];
  stride?: number[];
}

export function torchZip(tensors: TorchZipTensor[], extraGlobal?: [string, string], level: 0 | 6 = 0): Uint8Array {
  const parts: number[] = [0x80, 2, 0x7d, 0x28]; // PROTO 2, EMPTY_DICT, MARK
  const str = (s: string) => {
    const b = Buffer.from(s, 'utf8');
    parts.push(0x58, b.length & 0xff, (b.length >> 8) & 0xff, 0, 0, ...b); // BINUNICODE
  };
  const int = (n: number) => parts.push(0x4a, n & 0xff, (n >> 8) & 0xff, (n >> 16) & 0xff, (n >>> 24) & 0xff); // BININT
  const global = (mod: string, name: string) => parts.push(0x63, ...Buffer.from(`${mod}\n${name}\n`));
  const tuple = (items: () => void) => { parts.push(0x28); items(); parts.push(0x74); };
  const files: Record<string, Uint8Array> = {};
  tensors.forEach((t, key) => {
    str(t.name);
    global('torch._utils', '_rebuild_tensor_v2');
    tuple(() => {
      tuple(() => { str('storage'); global('torch', t.type); str(String(key)); str('cpu'); int(t.storage.length); });
      parts.push(0x51); // BINPERSID
      int(t.offset ?? 0);
      tuple(() => t.shape.forEach(int));
      const stride = t.stride ?? t.shape.map((_, i) => t.shape.slice(i + 1).reduce((a, b) => a * b, 1));
      tuple(() => stride.forEach(int));
      parts.push(0x89); // NEWFALSE
      if (extraGlobal) global(...extraGlobal); else global('collections', 'OrderedDict');
      parts.push(0x29, 0x52); // EMPTY_TUPLE, REDUCE
    });
    parts.push(0x52); // REDUCE
    files[`archive/data/${key}`] = new Uint8Array(t.storage.buffer.slice(0));
  });
  parts.push(0x75, 0x2e); // SETITEMS, STOP
  files['archive/data.pkl'] = Uint8Array.from(parts);
  files['archive/version'] = Buffer.from('3\n');
  return zipSync(files, { level });
}
