// A T5 SentencePiece model (spiece.model) as a tokenizer.json, for model directories that ship only the
// SentencePiece file (older T5 repositories: no tokenizer.json). The result is what transformers' T5 converter
// writes for the same file (Unigram vocabulary with the sentinel <extra_id_*> tokens appended, the model's
// precompiled normalizer, Metaspace pre-tokenizer and decoder, "$A </s>" template), so @huggingface/tokenizers
// tokenizes as T5TokenizerFast does. The protobuf is decoded with protobufjs; only the fields used are declared.
import * as protobuf from 'protobufjs';
import { FileFormatError } from './errors';

// The parts of sentencepiece_model.proto (google/sentencepiece) read here; protobuf skips the other fields.
const SCHEMA = `
syntax = "proto2";
message TrainerSpec {
  optional int32 model_type = 3 [default = 1];  // UNIGRAM = 1, BPE = 2, WORD = 3, CHAR = 4
  optional int32 unk_id = 40 [default = 0];
}
message NormalizerSpec {
  optional string name = 1;
  optional bytes precompiled_charsmap = 2;
}
message SentencePiece {
  optional string piece = 1;
  optional float score = 2;
  optional int32 type = 3 [default = 1];    // NORMAL = 1, UNKNOWN = 2, CONTROL = 3, USER_DEFINED = 4, BYTE = 6
}
message ModelProto {
  repeated SentencePiece pieces = 1;
  optional TrainerSpec trainer_spec = 2;
  optional NormalizerSpec normalizer_spec = 3;
}
`;

let modelProto: protobuf.Type | undefined;

interface DecodedModel {
  pieces: { piece: string; score: number; type: number }[];
  trainerSpec?: { modelType?: number; unkId?: number };
  normalizerSpec?: { precompiledCharsmap?: Uint8Array };
}

/** What tokenizer_config.json (and added_tokens.json) say that changes the conversion (T5 defaults when absent). */
export interface SentencePieceOptions {
  /** transformers' `legacy` (default true): the Metaspace prefix on every split ("always") and sentinels that
   *  strip the spaces around them, or ("first", false) the non-legacy behaviour. */
  legacy?: boolean;
  /** `add_prefix_space` (default true): false prepends no "▁" to the text. */
  addPrefixSpace?: boolean;
  /** Sentinel tokens <extra_id_0> .. appended to the vocabulary (T5: 100). */
  extraIds?: number;
  /** `additional_special_tokens`: those not in the vocabulary are added after it, in order, as special tokens. */
  additionalSpecialTokens?: string[];
  /** added_tokens.json's tokens by id (ids from the end of the vocabulary on, one after another). */
  addedTokens?: Record<string, number>;
}

/** The tokenizer.json object for the SentencePiece model `bytes` (`file` names it in errors). */
export function sentencePieceToTokenizerJson(bytes: Uint8Array, file: string, options: SentencePieceOptions = {}): object {
  modelProto ??= protobuf.parse(SCHEMA).root.lookupType('ModelProto');
  let m: DecodedModel;
  try {
    m = modelProto.toObject(modelProto.decode(bytes), { defaults: true }) as DecodedModel;
  } catch (e) {
    throw new FileFormatError(`${file}: not a SentencePiece model: ${(e as Error).message}`);
  }
  const modelType = m.trainerSpec?.modelType ?? 1;
  if (m.pieces.length === 0) throw new FileFormatError(`${file}: not a SentencePiece model (no pieces)`);
  if (modelType !== 1) throw new FileFormatError(`${file}: a SentencePiece model of type ${modelType}; only Unigram models (T5's) are read`);
  const legacy = options.legacy ?? true;
  const extraIds = options.extraIds ?? 100;

  // sentinels after the pieces, highest first: <extra_id_0> is the last id (as T5's vocabulary has them)
  const vocab: [string, number][] = m.pieces.map((p) => [p.piece, p.score]);
  for (let i = extraIds - 1; i >= 0; i--) vocab.push([`<extra_id_${i}>`, 0]);
  const token = (id: number, content: string, strip: boolean, special: boolean) =>
    ({ id, content, single_word: false, lstrip: strip, rstrip: strip, normalized: false, special });
  // the unknown and control pieces (<unk>, <pad>, </s>) and the sentinels are special tokens, user-defined pieces
  // plain added tokens (matched before the model splits the text)
  const addedTokens = m.pieces.flatMap((p, id) => (p.type === 2 || p.type === 3 ? [token(id, p.piece, false, true)]
    : p.type === 4 ? [token(id, p.piece, false, false)] : []));
  for (let id = m.pieces.length; id < vocab.length; id++) addedTokens.push(token(id, vocab[id][0], legacy, true));
  // tokens transformers adds beyond the model's vocabulary: added_tokens.json's, then new additional special tokens
  const known = new Set(vocab.map(([piece]) => piece));
  let next = vocab.length;
  for (const [content, id] of Object.entries(options.addedTokens ?? {}).sort((a, b) => a[1] - b[1])) {
    if (known.has(content)) continue;
    if (id !== next) throw new FileFormatError(`${file}: added_tokens.json gives "${content}" id ${id}, but the next free id is ${next}`);
    addedTokens.push(token(next++, content, false, false));
    known.add(content);
  }
  for (const content of options.additionalSpecialTokens ?? []) {
    if (known.has(content)) continue;
    addedTokens.push(token(next++, content, false, true));
    known.add(content);
  }

  const charsmap = m.normalizerSpec?.precompiledCharsmap;
  const normalizers: object[] = [
    ...(charsmap && charsmap.length > 0 ? [{ type: 'Precompiled', precompiled_charsmap: Buffer.from(charsmap).toString('base64') }] : []),
    { type: 'Strip', strip_left: false, strip_right: true },
    { type: 'Replace', pattern: { Regex: ' {2,}' }, content: '\u2581' },
  ];
  const addPrefix = options.addPrefixSpace ?? true;
  const metaspace = (scheme: string) => ({ type: 'Metaspace', replacement: '\u2581', prepend_scheme: addPrefix ? scheme : 'never', split: true });
  const eos = vocab.findIndex(([piece]) => piece === '</s>');
  if (eos < 0) throw new FileFormatError(`${file}: the SentencePiece vocabulary has no </s>, so it is not a T5 tokenizer`);
  return {
    version: '1.0',
    truncation: null,
    padding: null,
    added_tokens: addedTokens,
    normalizer: { type: 'Sequence', normalizers },
    pre_tokenizer: metaspace(legacy ? 'always' : 'first'),
    post_processor: {
      type: 'TemplateProcessing',
      single: [{ Sequence: { id: 'A', type_id: 0 } }, { SpecialToken: { id: '</s>', type_id: 0 } }],
      pair: [{ Sequence: { id: 'A', type_id: 0 } }, { SpecialToken: { id: '</s>', type_id: 0 } },
             { Sequence: { id: 'B', type_id: 0 } }, { SpecialToken: { id: '</s>', type_id: 0 } }],
      special_tokens: { '</s>': { id: '</s>', ids: [eos], tokens: ['</s>'] } },
    },
    decoder: metaspace('always'),
    model: { type: 'Unigram', unk_id: m.trainerSpec?.unkId ?? 0, vocab, byte_fallback: false },
  };
}
