// (IA)3 adapters: one flat Float32Array per adapter in the order of IA3Layout (cuda/model/t5_config.h),
// with PEFT module names for I/O. Reads PEFT adapters (directory or adapter_model.safetensors) and the
// T-Few checkpoints (.pt, 'multi_lora_b' vectors); writes PEFT format.
import * as fs from 'fs';
import * as path from 'path';
import { FileFormatError, InvalidAdapterError, InvalidArgumentError, TfewError } from './errors';
import type { NativeConfig } from './native';
import { readSafetensorsHeader, readTensorF32, writeSafetensors } from './safetensors';
import { isZipFile, readTorchCheckpoint } from './torch-pt';

export interface IA3Module {
  /** PEFT module name without 'base_model.model.', e.g. 'encoder.block.0.layer.0.SelfAttention.k.ia3_l'. */
  name: string;
  /** Start of this vector in the flat adapter array. */
  offset: number;
  length: number;
  /** PEFT's tensor shape: [out, 1] for k/v, [1, d_ff] for the FFN vector (it scales the input of wo). */
  peftShape: [number, number];
}

/** What the size of an adapter depends on. innerDim = numHeads * dKv. */
export interface IA3Dims {
  numLayers: number;
  numDecoderLayers: number;
  innerDim: number;
  dFf: number;
}

type DimsSource = NativeConfig | IA3Dims | { config: NativeConfig };

function toDims(src: DimsSource): IA3Dims {
  if (src === null || typeof src !== 'object') {
    throw new InvalidArgumentError(`expected a T5Model, its config or adapter dimensions, got ${String(src)}`);
  }
  const c = 'config' in src ? src.config : src;
  const innerDim = 'innerDim' in c ? c.innerDim : c.numHeads * c.dKv;
  const dims = { numLayers: c.numLayers, numDecoderLayers: c.numDecoderLayers, innerDim, dFf: c.dFf };
  for (const [k, v] of Object.entries(dims)) {
    if (!Number.isInteger(v) || v < 0 || (k !== 'numLayers' && k !== 'numDecoderLayers' && v < 1)) {
      throw new InvalidArgumentError(`adapter dimension ${k} must be a positive integer, got ${v}`);
    }
  }
  return dims;
}

/** The (IA)3 vectors of a model, exactly in IA3Layout order (encoder blocks, then decoder blocks). */
export function ia3Modules(config: NativeConfig | IA3Dims): IA3Module[] {
  const { numLayers, numDecoderLayers, innerDim: inner, dFf } = toDims(config);
  const out: IA3Module[] = [];
  let offset = 0;
  const kv = (name: string) => {
    out.push({ name, offset, length: inner, peftShape: [inner, 1] });
    offset += inner;
  };
  const ff = (name: string) => {
    out.push({ name, offset, length: dFf, peftShape: [1, dFf] });
    offset += dFf;
  };
  for (let i = 0; i < numLayers; i++) {
    const b = `encoder.block.${i}`;
    kv(`${b}.layer.0.SelfAttention.k.ia3_l`);
    kv(`${b}.layer.0.SelfAttention.v.ia3_l`);
    ff(`${b}.layer.1.DenseReluDense.wo.ia3_l`);
  }
  for (let i = 0; i < numDecoderLayers; i++) {
    const b = `decoder.block.${i}`;
    kv(`${b}.layer.0.SelfAttention.k.ia3_l`);
    kv(`${b}.layer.0.SelfAttention.v.ia3_l`);
    kv(`${b}.layer.1.EncDecAttention.k.ia3_l`);
    kv(`${b}.layer.1.EncDecAttention.v.ia3_l`);
    ff(`${b}.layer.2.DenseReluDense.wo.ia3_l`);
  }
  return out;
}

/** Splits a flat array (an adapter or its gradient) into PEFT-named views, without copying. */
export function splitByModule(modules: readonly IA3Module[], flat: Float32Array): Record<string, Float32Array> {
  const out: Record<string, Float32Array> = {};
  for (const m of modules) out[m.name] = flat.subarray(m.offset, m.offset + m.length);
  return out;
}

const PEFT_PREFIX = 'base_model.model.';

/** PEFT key -> module name: drops 'base_model.model.' and the adapter-name suffix ('.default'). */
function peftModuleName(key: string): string {
  let name = key.startsWith(PEFT_PREFIX) ? key.slice(PEFT_PREFIX.length) : key;
  const at = name.lastIndexOf('.ia3_l');
  if (at >= 0) name = name.slice(0, at + '.ia3_l'.length);
  return name;
}

/** T-Few key -> module name: '<anything>.encoder.block.0.layer.1.DenseReluDense.wi_1.multi_lora_b' -> '...wo.ia3_l'. */
function tfewModuleName(key: string): string | undefined {
  const m = /(?:^|\.)((?:encoder|decoder)\.block\.\d+\.layer\.\d+\.(?:SelfAttention|EncDecAttention|DenseReluDense)\.(?:k|v|wi_1))\.multi_lora_b$/.exec(key);
  if (!m) return undefined;
  // T-Few scales wi_1's output; for gated-gelu that equals scaling the input of wo (PEFT's placement).
  return `${m[1].replace(/\.wi_1$/, '.wo')}.ia3_l`;
}

let nextId = 1;

export class IA3Adapter {
  /** Unique per instance: with `version`, names the contents the addon holds a snapshot of. */
  readonly id: number;
  /** Bumped by markChanged() / set(). The addon reuses its snapshot of this adapter (no copy of the vectors, no
   *  upload to the GPU) while the version is the same: after editing `data` in place, call markChanged(). */
  version = 0;
  readonly dims: IA3Dims;
  /** All vectors, flat in IA3Layout order. After editing in place, call markChanged(). */
  readonly data: Float32Array;
  readonly modules: IA3Module[];
  private readonly byName: Map<string, IA3Module>;

  private constructor(dims: IA3Dims, data: Float32Array) {
    this.id = nextId++;
    this.dims = Object.freeze({ ...dims });
    this.modules = ia3Modules(dims);
    this.byName = new Map(this.modules.map((m) => [m.name, m]));
    const total = this.modules.length ? this.modules[this.modules.length - 1].offset + this.modules[this.modules.length - 1].length : 0;
    if (data.length !== total) throw new InvalidAdapterError(`adapter data has ${data.length} values, the layout needs ${total}`);
    this.data = data;
  }

  /** A new adapter for a model (or its config); every value `init` (1 = the identity, as PEFT/T-Few init). */
  static create(modelOrConfig: DimsSource, init = 1): IA3Adapter {
    const dims = toDims(modelOrConfig);
    const size = ia3Modules(dims).reduce((a, m) => a + m.length, 0);
    return new IA3Adapter(dims, new Float32Array(size).fill(init));
  }

  /** An adapter over a copy of `flat` (IA3Layout order), e.g. optimizer output. */
  static fromFlat(modelOrConfig: DimsSource, flat: ArrayLike<number>): IA3Adapter {
    return new IA3Adapter(toDims(modelOrConfig), Float32Array.from(flat));
  }

  /**
   * Loads a PEFT adapter directory (adapter_model.safetensors, or older PEFT's adapter_model.bin), a PEFT adapter
   * file of either kind, or a T-Few .pt checkpoint.
   * Without options.config the sizes are inferred from the tensors.
   */
  static async load(file: string, options: { config?: NativeConfig } = {}): Promise<IA3Adapter> {
    const { vectors, source, ffOptional } = readAdapterVectors(file);
    const dims = options.config ? toDims(options.config) : inferDims(vectors, source, ffOptional);
    const adapter = IA3Adapter.create(dims, 1);
    const expected = new Set(adapter.modules.map((m) => m.name));
    for (const name of vectors.keys()) {
      if (!expected.has(name)) {
        throw new InvalidAdapterError(`${source}: module "${name}" does not exist in a model with ${describeDims(dims)}`);
      }
    }
    const hasAnyFf = [...vectors.keys()].some((n) => n.endsWith('DenseReluDense.wo.ia3_l'));
    for (const m of adapter.modules) {
      const v = vectors.get(m.name);
      if (!v) {
        // T-Few adds no FFN vector on T5 v1.0 (no wi_1): those stay at 1, the identity.
        if (ffOptional && !hasAnyFf && m.name.endsWith('DenseReluDense.wo.ia3_l')) continue;
        throw new InvalidAdapterError(`${source}: missing module "${m.name}"`);
      }
      if (v.data.length !== m.length) {
        throw new InvalidAdapterError(
          `${source}: module "${m.name}" has ${v.data.length} values (shape [${v.shape.join(', ')}]), expected ${m.length} for ${describeDims(dims)}`,
        );
      }
      adapter.data.set(v.data, m.offset);
    }
    return adapter;
  }

  /** Writes DIR/adapter_config.json and DIR/adapter_model.safetensors (F32), the PEFT layout. */
  async save(dir: string): Promise<void> {
    try {
      this.writePeft(dir);
    } catch (e) {
      if (e instanceof TfewError) throw e;
      throw new FileFormatError(`cannot write the adapter to ${dir}: ${(e as Error).message}`);
    }
  }

  private writePeft(dir: string): void {
    fs.mkdirSync(dir, { recursive: true });
    const tensors: Record<string, { dtype: 'F32'; shape: number[]; data: Float32Array }> = {};
    for (const m of this.modules) {
      tensors[`${PEFT_PREFIX}${m.name}`] = { dtype: 'F32', shape: [...m.peftShape], data: this.data.subarray(m.offset, m.offset + m.length) };
    }
    writeSafetensors(path.join(dir, 'adapter_model.safetensors'), tensors, { format: 'pt' });
    const config = {
      auto_mapping: null,
      base_model_name_or_path: null,
      exclude_modules: null,
      fan_in_fan_out: false,
      feedforward_modules: ['wo'],
      inference_mode: true,
      init_ia3_weights: true,
      modules_to_save: null,
      peft_type: 'IA3',
      revision: null,
      target_modules: ['wo', 'v', 'k'],
      task_type: 'SEQ_2_SEQ_LM',
    };
    fs.writeFileSync(path.join(dir, 'adapter_config.json'), `${JSON.stringify(config, null, 2)}\n`);
  }

  /** A view into data for one module (PEFT name, with or without 'base_model.model.'). */
  get(name: string): Float32Array {
    const m = this.module(name);
    return this.data.subarray(m.offset, m.offset + m.length);
  }

  /** Overwrites one module's values and marks the adapter changed. */
  set(name: string, values: ArrayLike<number>): void {
    const m = this.module(name);
    if (values.length !== m.length) throw new InvalidArgumentError(`module "${m.name}" holds ${m.length} values, got ${values.length}`);
    this.data.set(values, m.offset);
    this.markChanged();
  }

  /**
   * Call after editing `data` in place: calls that start after it use the new values (it bumps `version`). A call
   * reads the adapter when it starts running (calls on one model run one after another), not when it is made.
   */
  markChanged(): void {
    this.version++;
  }

  /** An independent copy with a new id. */
  clone(): IA3Adapter {
    return new IA3Adapter(this.dims, Float32Array.from(this.data));
  }

  /** Throws InvalidAdapterError when this adapter was built for other sizes than `config`. */
  assertCompatible(config: NativeConfig | IA3Dims): void {
    const want = toDims(config);
    const diffs = (Object.keys(want) as (keyof IA3Dims)[]).filter((k) => want[k] !== this.dims[k]);
    if (diffs.length > 0) {
      throw new InvalidAdapterError(
        `adapter does not fit the model: ${diffs.map((k) => `${k} ${this.dims[k]} vs model ${want[k]}`).join(', ')}`,
      );
    }
  }

  private module(name: string): IA3Module {
    const m = this.byName.get(peftModuleName(name));
    if (!m) throw new InvalidArgumentError(`no (IA)3 module named "${name}"`);
    return m;
  }
}

function describeDims(d: IA3Dims): string {
  return `${d.numLayers}+${d.numDecoderLayers} layers, inner dim ${d.innerDim}, d_ff ${d.dFf}`;
}

interface LoadedVectors {
  vectors: Map<string, { shape: number[]; data: Float32Array }>;
  source: string;
  /** T-Few files may lack the FFN vectors (T5 v1.0). */
  ffOptional: boolean;
}

function readAdapterVectors(file: string): LoadedVectors {
  if (!fs.existsSync(file)) throw new InvalidAdapterError(`no adapter at ${file}`);
  if (fs.statSync(file).isDirectory()) {
    const st = path.join(file, 'adapter_model.safetensors');
    const cfgFile = path.join(file, 'adapter_config.json');
    if (fs.existsSync(cfgFile)) {
      let cfg: { peft_type?: unknown };
      try {
        cfg = JSON.parse(fs.readFileSync(cfgFile, 'utf8'));
      } catch (e) {
        throw new InvalidAdapterError(`${cfgFile}: invalid JSON: ${(e as Error).message}`);
      }
      if (cfg.peft_type !== undefined && cfg.peft_type !== 'IA3') {
        throw new InvalidAdapterError(`${cfgFile}: peft_type is ${JSON.stringify(cfg.peft_type)}, only IA3 adapters are supported`);
      }
    }
    if (fs.existsSync(st)) return readPeftSafetensors(st);
    // (older PEFT versions saved torch.save's zip)
    const bin = path.join(file, 'adapter_model.bin');
    if (fs.existsSync(bin)) return readTorchAdapter(bin);
    throw new InvalidAdapterError(`no adapter_model.safetensors (or adapter_model.bin) in ${file}`);
  }
  let zip: boolean;
  try {
    zip = isZipFile(file);
  } catch (e) {
    if (e instanceof FileFormatError) throw new InvalidAdapterError(`not a readable adapter: ${e.message}`);
    throw e;
  }
  return zip ? readTorchAdapter(file) : readPeftSafetensors(file);
}

function readPeftSafetensors(file: string): LoadedVectors {
  let header;
  try {
    header = readSafetensorsHeader(file);
  } catch (e) {
    if (e instanceof FileFormatError) throw new InvalidAdapterError(`not a readable adapter: ${e.message}`);
    throw e;
  }
  return peftVectors(file, [...header.entries.values()].map((entry) => ({ ...entry, data: () => readTensorF32(file, entry) })));
}

// PEFT's (IA)3 tensors (…ia3_l) by module name.
function peftVectors(file: string, tensors: { name: string; dtype: string; shape: number[]; data: () => Float32Array }[]): LoadedVectors {
  const vectors = new Map<string, { shape: number[]; data: Float32Array }>();
  for (const t of tensors) {
    if (!t.name.includes('ia3_l')) throw new InvalidAdapterError(`${file}: tensor "${t.name}" is not an (IA)3 vector`);
    if (!['F32', 'F64', 'F16', 'BF16'].includes(t.dtype)) {
      throw new InvalidAdapterError(`${file}: tensor "${t.name}" has unsupported dtype ${t.dtype}`);
    }
    const name = peftModuleName(t.name);
    if (vectors.has(name)) throw new InvalidAdapterError(`${file}: module "${name}" appears twice`);
    vectors.set(name, { shape: t.shape, data: t.data() });
  }
  return { vectors, source: file, ffOptional: false };
}

// A torch.save'd zip: PEFT's adapter_model.bin (…ia3_l tensors) or a T-Few checkpoint (…multi_lora_b).
function readTorchAdapter(file: string): LoadedVectors {
  let tensors;
  try {
    tensors = readTorchCheckpoint(file);
  } catch (e) {
    if (e instanceof FileFormatError) throw new InvalidAdapterError(`not a readable adapter: ${e.message}`);
    throw e;
  }
  if ([...tensors.keys()].some((k) => k.includes('ia3_l'))) {
    return peftVectors(file, [...tensors].map(([name, t]) => ({ name, dtype: t.dtype, shape: t.shape, data: () => t.data })));
  }
  const vectors = new Map<string, { shape: number[]; data: Float32Array }>();
  for (const [key, t] of tensors) {
    const name = tfewModuleName(key);
    if (!name) {
      // T-Few saves only trainable tensors; the frozen multi_lora_a vectors are ones and unused in (IA)3.
      if (key.endsWith('multi_lora_a')) continue;
      throw new InvalidAdapterError(`${file}: tensor "${key}" is not a T-Few (IA)3 vector (expected ...{k,v,wi_1}.multi_lora_b)`);
    }
    if (vectors.has(name)) throw new InvalidAdapterError(`${file}: module "${name}" appears twice`);
    vectors.set(name, { shape: t.shape, data: t.data });
  }
  return { vectors, source: file, ffOptional: true };
}

function inferDims(vectors: LoadedVectors['vectors'], source: string, ffOptional: boolean): IA3Dims {
  let enc = 0;
  let dec = 0;
  let inner: number | undefined;
  let dFf: number | undefined;
  for (const [name, v] of vectors) {
    const m = /^(encoder|decoder)\.block\.(\d+)\./.exec(name);
    if (!m) throw new InvalidAdapterError(`${source}: unexpected module "${name}"`);
    const block = Number(m[2]) + 1;
    if (m[1] === 'encoder') enc = Math.max(enc, block);
    else dec = Math.max(dec, block);
    const isFf = name.endsWith('DenseReluDense.wo.ia3_l');
    if (isFf && dFf === undefined) dFf = v.data.length;
    if (!isFf && inner === undefined) inner = v.data.length;
  }
  if (inner === undefined) throw new InvalidAdapterError(`${source}: no attention k/v vectors found`);
  if (dFf === undefined) {
    const why = ffOptional ? ' (a T5 v1.0 T-Few checkpoint has none)' : '';
    throw new InvalidAdapterError(`${source}: no FFN vectors${why}, so d_ff cannot be inferred: pass options.config`);
  }
  return { numLayers: enc, numDecoderLayers: dec, innerDim: inner, dFf };
}
