import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { resolveCheckpoint } from '../lib/checkpoint';
import { InvalidArgumentError } from '../lib/errors';
import { readSafetensorsF64, readSafetensorsHeader } from '../lib/safetensors';
import { buildTinyT5, tinyVocabulary } from '../lib/tiny';
import { T5Tokenizer } from '../lib/tokenizer';

const WORDS = ['The movie was great!', 'the movie was terrible.', 'Positive', 'negative', 'Is it good? Yes, no'];

let root: string;
beforeAll(() => { root = fs.mkdtempSync(path.join(os.tmpdir(), 'tfew-tiny-')); });
afterAll(() => fs.rmSync(root, { recursive: true, force: true }));

function std(values: Float64Array): number {
  let s = 0;
  for (const v of values) s += v * v;
  return Math.sqrt(s / values.length);
}

describe('buildTinyT5', () => {
  test('builds a checkpoint that resolves like a real one, with the T0 layout', async () => {
    const { dir, config } = buildTinyT5(path.join(root, 'a'), { words: WORDS, seed: 7 });
    const resolved = await resolveCheckpoint(dir);
    expect(resolved.config).toEqual(config);
    expect(config).toMatchObject({
      dModel: 64, dFf: 128, numHeads: 4, dKv: 16, numLayers: 2, numDecoderLayers: 2, gatedGelu: true,
      tiedHead: false, scaleDecoderOutputs: false, dropoutRate: 0.1, modelType: 't5',
      vocabSize: tinyVocabulary(WORDS).length,
    });
    expect(resolved.tensors.every((t) => t.dtype === 'F32')).toBe(true);
    // exactly the tensors the engine asks for, nothing else in the file
    expect(readSafetensorsHeader(path.join(dir, 'model.safetensors')).entries.size).toBe(resolved.tensors.length);
  });

  test('T5 initialisation scales', () => {
    const { dir, config } = buildTinyT5(path.join(root, 'scales'), { words: WORDS, seed: 3, dModel: 32, dFf: 256, dKv: 8 });
    const t = readSafetensorsF64(path.join(dir, 'model.safetensors'));
    const expectStd = (name: string, expected: number) => {
      const values = t.get(name)!.data;
      // sample std of n normals is within a few / sqrt(2n) of the truth
      expect(Math.abs(std(values) / expected - 1)).toBeLessThan(5 / Math.sqrt(2 * values.length));
    };
    const d = config.dModel;
    expectStd('shared.weight', 1);
    expectStd('encoder.block.0.layer.0.SelfAttention.q.weight', (d * config.dKv) ** -0.5);
    expectStd('decoder.block.1.layer.1.EncDecAttention.k.weight', d ** -0.5);
    expectStd('encoder.block.1.layer.1.DenseReluDense.wi_0.weight', d ** -0.5);
    expectStd('decoder.block.0.layer.2.DenseReluDense.wo.weight', config.dFf ** -0.5);
    expect(Array.from(t.get('decoder.final_layer_norm.weight')!.data).every((v) => v === 1)).toBe(true);
    const bias = t.get('encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight')!;
    expect(bias.shape).toEqual([32, config.numHeads]);
    expect(std(bias.data)).toBeLessThan(0.3);
    expect(std(bias.data)).toBeGreaterThan(0);
  });

  test('relu variant', async () => {
    const { dir, config } = buildTinyT5(path.join(root, 'relu'), { words: WORDS, gated: false, numLayers: 1 });
    expect(config.gatedGelu).toBe(false);
    const names = (await resolveCheckpoint(dir)).tensors.map((t) => t.name);
    expect(names).toContain('encoder.block.0.layer.1.DenseReluDense.wi.weight');
    expect(names.some((n) => n.includes('wi_0'))).toBe(false);
  });

  test('deterministic bytes for a seed; another seed gives other weights', () => {
    const a = buildTinyT5(path.join(root, 's1'), { words: WORDS, seed: 42 }).dir;
    const b = buildTinyT5(path.join(root, 's2'), { words: WORDS, seed: 42 }).dir;
    const c = buildTinyT5(path.join(root, 's3'), { words: WORDS, seed: 43 }).dir;
    for (const f of ['config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json']) {
      expect(fs.readFileSync(path.join(a, f)).equals(fs.readFileSync(path.join(b, f)))).toBe(true);
    }
    expect(fs.readFileSync(path.join(a, 'model.safetensors')).equals(fs.readFileSync(path.join(c, 'model.safetensors')))).toBe(false);
    expect(fs.readFileSync(path.join(a, 'tokenizer.json')).equals(fs.readFileSync(path.join(c, 'tokenizer.json')))).toBe(true);
  });

  test('rejects bad options', () => {
    expect(() => buildTinyT5(path.join(root, 'bad'), { words: [] })).toThrow(InvalidArgumentError);
    expect(() => buildTinyT5(path.join(root, 'bad'), { words: ['x'], dModel: 0 })).toThrow(/dModel/);
    expect(() => buildTinyT5(path.join(root, 'bad'), { words: ['x'], dropoutRate: 1 })).toThrow(/dropoutRate/);
  });
});

describe('the tiny tokenizer', () => {
  test('vocabulary: specials first, lowercased words split on whitespace and punctuation, deduplicated', () => {
    expect(tinyVocabulary(['Hello, World!', 'hello again...'])).toEqual(['<pad>', '</s>', '<unk>', 'hello', ',', 'world', '!', 'again', '...']);
  });

  test('T5Tokenizer.fromDir loads it: ids, </s>, <unk>, round trip', () => {
    const { dir, config } = buildTinyT5(path.join(root, 'tok'), { words: WORDS });
    const tok = T5Tokenizer.fromDir(dir)!;
    const vocab = tinyVocabulary(WORDS);
    expect(tok.vocabSize).toBe(config.vocabSize);
    expect(tok.eosId).toBe(1);
    expect(tok.padId).toBe(0);
    const ids = tok.encode('The movie was GREAT!');
    expect(ids).toEqual(['the', 'movie', 'was', 'great', '!'].map((w) => vocab.indexOf(w)).concat(1));
    expect(tok.decode(ids)).toBe('the movie was great !');
    expect(tok.encode('the dinosaur was great')).toEqual([vocab.indexOf('the'), 2, vocab.indexOf('was'), vocab.indexOf('great'), 1]);
    expect(tok.encode('the movie was great', { maxLength: 3 })).toEqual([vocab.indexOf('the'), vocab.indexOf('movie'), 1]);
    for (const text of ['is it good ?', 'yes , the movie was terrible .', 'positive']) expect(tok.decode(tok.encode(text))).toBe(text);
    // every id the tokenizer emits is inside the model's vocabulary
    expect(Math.max(...tok.encode(WORDS.join(' ')))).toBeLessThan(config.vocabSize);
  });
});
