import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { parseT5Config, readT5Config } from '../lib/config';
import { InvalidModelError } from '../lib/errors';
import { fixturesDir } from './helpers/paths';

describe('readT5Config on the fixture checkpoints', () => {
  test('gated-gelu, untied, no rescale', () => {
    const dir = path.join(fixturesDir(), 'tiny-gated-gelu-untied');
    const raw = JSON.parse(fs.readFileSync(path.join(dir, 'config.json'), 'utf8'));
    const c = readT5Config(dir);
    expect(c.gatedGelu).toBe(true);
    expect(c.tiedHead).toBe(false);
    expect(c.scaleDecoderOutputs).toBe(false);
    expect(c.feedForwardProj).toBe('gated-gelu');
    expect(c.vocabSize).toBe(raw.vocab_size);
    expect(c.dModel).toBe(raw.d_model);
    expect(c.dFf).toBe(raw.d_ff);
    expect(c.dKv).toBe(raw.d_kv);
    expect(c.numHeads).toBe(raw.num_heads);
    expect(c.numLayers).toBe(raw.num_layers);
    expect(c.numDecoderLayers).toBe(raw.num_decoder_layers);
    expect(c.dropoutRate).toBe(raw.dropout_rate);
    expect(c.raw).toEqual(raw);
  });

  test('relu, tied, rescaled', () => {
    const c = readT5Config(path.join(fixturesDir(), 'tiny-relu-tied'));
    expect(c.gatedGelu).toBe(false);
    expect(c.tiedHead).toBe(true);
    expect(c.scaleDecoderOutputs).toBe(true);
    expect(c.modelType).toBe('t5');
  });

  test('missing config.json names the directory', () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tfew-cfg-'));
    try {
      expect(() => readT5Config(dir)).toThrow(InvalidModelError);
      expect(() => readT5Config(dir)).toThrow(`no config.json in ${dir}`);
      fs.writeFileSync(path.join(dir, 'config.json'), '{ not json');
      expect(() => readT5Config(dir)).toThrow(/invalid JSON/);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('parseT5Config', () => {
  test('HF T5Config defaults for a sparse config', () => {
    const c = parseT5Config({ model_type: 't5' }, 'x.json');
    expect(c).toMatchObject({
      vocabSize: 32128, dModel: 512, dKv: 64, dFf: 2048, numLayers: 6, numDecoderLayers: 6, numHeads: 8,
      numBuckets: 32, maxDistance: 128, dropoutRate: 0.1, layerNormEps: 1e-6, gatedGelu: false,
      tiedHead: true, scaleDecoderOutputs: true, padTokenId: 0, eosTokenId: 1, decoderStartTokenId: 0,
      feedForwardProj: 'relu',
    });
  });

  test('num_decoder_layers follows num_layers when absent', () => {
    expect(parseT5Config({ model_type: 't5', num_layers: 3 }, 'x').numDecoderLayers).toBe(3);
    expect(parseT5Config({ model_type: 't5', num_layers: 3, num_decoder_layers: 5 }, 'x').numDecoderLayers).toBe(5);
  });

  test('T0-3B style config (no scale_decoder_outputs key): rescale iff tied', () => {
    const t0 = {
      model_type: 't5', d_model: 2048, d_ff: 5120, d_kv: 64, num_heads: 32, num_layers: 24,
      vocab_size: 32128, feed_forward_proj: 'gated-gelu', tie_word_embeddings: false,
    };
    const c = parseT5Config(t0, 'T0_3B/config.json');
    expect(c.gatedGelu).toBe(true);
    expect(c.tiedHead).toBe(false);
    expect(c.scaleDecoderOutputs).toBe(false);
    expect(c.numDecoderLayers).toBe(24);
    // an explicit key wins over the tie rule
    expect(parseT5Config({ ...t0, scale_decoder_outputs: true }, 'x').scaleDecoderOutputs).toBe(true);
  });

  test('flan-t5 style gated-gelu with dense_act_fn gelu_new', () => {
    const c = parseT5Config({ model_type: 't5', feed_forward_proj: 'gated-gelu', dense_act_fn: 'gelu_new', is_gated_act: true }, 'x');
    expect(c.gatedGelu).toBe(true);
  });

  test.each([
    [{ model_type: 'bert' }, /model_type "bert"/],
    [{ model_type: 'gpt2' }, /model_type "gpt2"/],
    [{ architectures: ['BertModel'] }, /no model_type/],
    [{ model_type: 't5', feed_forward_proj: 'gated-silu' }, /unsupported feed_forward_proj "gated-silu"/],
    [{ model_type: 't5', feed_forward_proj: 'gelu' }, /unsupported feed_forward_proj "gelu"/],
    [{ model_type: 't5', d_model: -4 }, /"d_model"/],
    [{ model_type: 't5', num_heads: 2.5 }, /"num_heads"/],
    [{ model_type: 't5', tie_word_embeddings: 'no' }, /"tie_word_embeddings"/],
    [{ model_type: 't5', dropout_rate: 1.5 }, /"dropout_rate"/],
    [{ model_type: 't5', vocab_size: 10, eos_token_id: 12 }, /eosTokenId 12/],
    // position buckets outside the table otherwise (no exact bucket; a log spacing dividing by log(1) or going negative)
    [{ model_type: 't5', relative_attention_num_buckets: 2 }, /num_buckets 2 and relative_attention_max_distance 128 do not make/],
    [{ model_type: 't5', relative_attention_num_buckets: 32, relative_attention_max_distance: 16 }, /at least 4 buckets, and max_distance above num_buckets \/ 2/],
    [{ model_type: 't5', relative_attention_num_buckets: 32, relative_attention_max_distance: 4 }, /max_distance 4 do not make/],
    [[1, 2], /JSON object/],
  ])('rejects %j', (json, message) => {
    expect(() => parseT5Config(json, 'some/config.json')).toThrow(InvalidModelError);
    expect(() => parseT5Config(json, 'some/config.json')).toThrow(message);
    expect(() => parseT5Config(json, 'some/config.json')).toThrow(/some\/config\.json/);
  });

  test('a config without model_type but with a T5 architecture is accepted', () => {
    expect(parseT5Config({ architectures: ['T5ForConditionalGeneration'] }, 'x').modelType).toBe('t5');
  });
});
