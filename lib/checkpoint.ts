// Resolves a Hugging Face T5 checkpoint directory into the exact tensor list the native engine asks for:
// config.json + model.safetensors (or a sharded model.safetensors.index.json), or else PyTorch's
// pytorch_model.bin (or pytorch_model.bin.index.json), as many hub repositories, T0_3B's among them, still ship
// it. Only headers are read (for .bin files: the zip directory and the pickle); the engine maps the data
// itself from (file, offset, byteLength).
import * as fs from 'fs';
import * as path from 'path';
import { readT5Config, T5ModelConfig } from './config';
import { InvalidModelError } from './errors';
import type { NativeConfig, NativeDType, NativeTensorSpec } from './native';
import { readSafetensorsHeader, SafetensorsEntry } from './safetensors';
import { indexTorchCheckpoint } from './torch-pt';

export interface ResolvedCheckpoint {
  config: T5ModelConfig;
  tensors: NativeTensorSpec[];
  files: string[];
}

const SUPPORTED_DTYPES: ReadonlySet<string> = new Set<NativeDType>(['F64', 'F32', 'F16', 'BF16']);

/** Every tensor the engine needs for `config`, with its shape, in a fixed order. */
export function requiredTensors(config: NativeConfig): Array<{ name: string; shape: number[] }> {
  const d = config.dModel;
  const inner = config.numHeads * config.dKv;
  const out: Array<{ name: string; shape: number[] }> = [];
  const add = (name: string, shape: number[]) => out.push({ name, shape });

  const attention = (prefix: string) => {
    for (const p of ['q', 'k', 'v']) add(`${prefix}.${p}.weight`, [inner, d]);
    add(`${prefix}.o.weight`, [d, inner]);
  };
  const ffn = (prefix: string) => {
    if (config.gatedGelu) {
      add(`${prefix}.DenseReluDense.wi_0.weight`, [config.dFf, d]);
      add(`${prefix}.DenseReluDense.wi_1.weight`, [config.dFf, d]);
    } else {
      add(`${prefix}.DenseReluDense.wi.weight`, [config.dFf, d]);
    }
    add(`${prefix}.DenseReluDense.wo.weight`, [d, config.dFf]);
  };

  add('shared.weight', [config.vocabSize, d]);
  if (!config.tiedHead) add('lm_head.weight', [config.vocabSize, d]);
  for (let i = 0; i < config.numLayers; i++) {
    const b = `encoder.block.${i}`;
    attention(`${b}.layer.0.SelfAttention`);
    if (i === 0) add(`${b}.layer.0.SelfAttention.relative_attention_bias.weight`, [config.numBuckets, config.numHeads]);
    add(`${b}.layer.0.layer_norm.weight`, [d]);
    ffn(`${b}.layer.1`);
    add(`${b}.layer.1.layer_norm.weight`, [d]);
  }
  add('encoder.final_layer_norm.weight', [d]);
  for (let i = 0; i < config.numDecoderLayers; i++) {
    const b = `decoder.block.${i}`;
    attention(`${b}.layer.0.SelfAttention`);
    if (i === 0) add(`${b}.layer.0.SelfAttention.relative_attention_bias.weight`, [config.numBuckets, config.numHeads]);
    add(`${b}.layer.0.layer_norm.weight`, [d]);
    attention(`${b}.layer.1.EncDecAttention`);
    add(`${b}.layer.1.layer_norm.weight`, [d]);
    ffn(`${b}.layer.2`);
    add(`${b}.layer.2.layer_norm.weight`, [d]);
  }
  add('decoder.final_layer_norm.weight', [d]);
  return out;
}

// Where each tensor name lives: one file, or the shards named by the index's weight_map; safetensors first.
function locateWeights(dir: string): { fileOf: (name: string) => string | undefined; files: string[]; torch: boolean } {
  for (const [name, torch] of [['model.safetensors', false], ['pytorch_model.bin', true]] as const) {
    const single = path.join(dir, name);
    const index = `${single}.index.json`;
    if (fs.existsSync(single)) return { fileOf: () => single, files: [single], torch };
    if (fs.existsSync(index)) return { ...shardsOf(dir, index), torch };
  }
  for (const other of ['tf_model.h5', 'flax_model.msgpack']) {
    if (fs.existsSync(path.join(dir, other))) {
      throw new InvalidModelError(
        `${dir} has ${other} but neither model.safetensors nor pytorch_model.bin: convert the weights first ` +
          `(e.g. in Python: T5ForConditionalGeneration.from_pretrained(dir).save_pretrained(dir, safe_serialization=True))`,
      );
    }
  }
  throw new InvalidModelError(`no model.safetensors (or model.safetensors.index.json, pytorch_model.bin) in ${dir}`);
}

function shardsOf(dir: string, index: string): { fileOf: (name: string) => string | undefined; files: string[] } {
  let weightMap: unknown;
  try {
    weightMap = (JSON.parse(fs.readFileSync(index, 'utf8')) as { weight_map?: unknown }).weight_map;
  } catch (e) {
    throw new InvalidModelError(`${index}: invalid JSON: ${(e as Error).message}`);
  }
  if (typeof weightMap !== 'object' || weightMap === null || Array.isArray(weightMap)) {
    throw new InvalidModelError(`${index}: no "weight_map" object`);
  }
  const map = new Map<string, string>();
  for (const [name, shard] of Object.entries(weightMap as Record<string, unknown>)) {
    if (typeof shard !== 'string' || shard.includes('..') || path.isAbsolute(shard)) {
      throw new InvalidModelError(`${index}: weight_map entry for "${name}" is not a file name in ${dir}`);
    }
    map.set(name, path.join(dir, shard));
  }
  const files = [...new Set(map.values())];
  for (const f of files) {
    if (!fs.existsSync(f)) throw new InvalidModelError(`${index}: shard ${path.basename(f)} is listed but missing from ${dir}`);
  }
  return { fileOf: (name) => map.get(name), files };
}

/** Reads config.json and the weight files' headers of DIR and checks every tensor the engine needs. */
export async function resolveCheckpoint(dir: string): Promise<ResolvedCheckpoint> {
  const config = readT5Config(dir);
  const { fileOf, files, torch } = locateWeights(dir);

  // (a torch file's entry may say why it cannot be memory-mapped; a safetensors entry always can be)
  type Entry = SafetensorsEntry & { unmappable?: string };
  const headers = new Map<string, Map<string, Entry>>();
  for (const f of files) headers.set(f, torch ? await indexTorchCheckpoint(f) : readSafetensorsHeader(f).entries);
  const find = (name: string): { file: string; entry: Entry } | undefined => {
    const f = fileOf(name);
    const entry = f ? headers.get(f)?.get(name) : undefined;
    return f && entry ? { file: f, entry } : undefined;
  };
  const refuseUnmappable = (what: string, file: string, entry: Entry) => {
    if (entry.unmappable) throw new InvalidModelError(`${what} in ${file} cannot be memory-mapped: ${entry.unmappable}`);
  };
  const where = files.length === 1 ? files[0] : `${path.join(dir, torch ? 'pytorch_model.bin.index.json' : 'model.safetensors.index.json')}`;

  const tensors: NativeTensorSpec[] = [];
  for (const { name, shape } of requiredTensors(config)) {
    let found = find(name);
    // Some exports store the embedding only under the encoder's (tied) name.
    if (!found && name === 'shared.weight') found = find('encoder.embed_tokens.weight') ?? find('decoder.embed_tokens.weight');
    if (!found) throw new InvalidModelError(`missing tensor "${name}" in ${where}`);
    const { file, entry } = found;
    const alias = entry.name === name ? '' : ` (stored as "${entry.name}")`;
    refuseUnmappable(`tensor "${name}"${alias}`, file, entry);
    if (!SUPPORTED_DTYPES.has(entry.dtype)) {
      throw new InvalidModelError(`tensor "${name}"${alias} in ${file} has unsupported dtype ${entry.dtype} (supported: F32, F16, BF16, F64)`);
    }
    if (entry.shape.length !== shape.length || entry.shape.some((v, i) => v !== shape[i])) {
      throw new InvalidModelError(
        `tensor "${name}"${alias} in ${file} has shape [${entry.shape.join(', ')}], expected [${shape.join(', ')}] from config.json`,
      );
    }
    tensors.push({ name, file, offset: entry.offset, byteLength: entry.byteLength, dtype: entry.dtype as NativeDType, shape: [...shape] });
  }
  // Untied checkpoints may carry encoder/decoder embeddings that differ from shared.weight (the engine
  // prefers them when present); in tied ones they are copies of shared.weight.
  const embedShape = [config.vocabSize, config.dModel];
  for (const name of ['encoder.embed_tokens.weight', 'decoder.embed_tokens.weight']) {
    const found = find(name);
    if (!found || !SUPPORTED_DTYPES.has(found.entry.dtype)) continue;
    refuseUnmappable(`tensor "${name}"`, found.file, found.entry);
    if (found.entry.shape.length !== 2 || found.entry.shape[0] !== embedShape[0] || found.entry.shape[1] !== embedShape[1]) {
      throw new InvalidModelError(`tensor "${name}" in ${found.file} has shape [${found.entry.shape.join(', ')}], expected [${embedShape.join(', ')}] from config.json`);
    }
    tensors.push({ name, file: found.file, offset: found.entry.offset, byteLength: found.entry.byteLength, dtype: found.entry.dtype as NativeDType, shape: embedShape });
  }
  const used = [...new Set(tensors.map((t) => t.file))];
  return { config, tensors, files: used };
}
