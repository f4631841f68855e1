// T5 tokenization through @huggingface/tokenizers (a faithful JS port of HF tokenizers: the Unigram model,
// the precompiled normalizer, Metaspace). We add the T5 conventions on top: </s> appended, truncation that
// keeps </s> last (as transformers does with truncation=True), pad = <pad>.
import * as fs from 'fs';
import * as path from 'path';
import { Tokenizer } from '@huggingface/tokenizers';
import { FileFormatError, InvalidArgumentError } from './errors';
import { sentencePieceToTokenizerJson } from './spiece';

export interface EncodeOptions {
  /** Append </s> (default true, as T5 tokenizers do). */
  addEos?: boolean;
  /** Truncate to at most this many ids, </s> included. */
  maxLength?: number;
}

export interface DecodeOptions {
  /** Drop <pad>, </s>, <unk>-style special tokens (default true). */
  skipSpecialTokens?: boolean;
  /** Remove spaces before punctuation (" ." -> "."), the transformers 4 default; default false as in transformers 5. */
  cleanUpSpaces?: boolean;
}

export class T5Tokenizer {
  readonly vocabSize: number;
  readonly eosId: number;
  readonly padId: number;
  readonly file: string;
  private readonly tokenizer: Tokenizer;

  private constructor(tokenizer: Tokenizer, file: string) {
    this.tokenizer = tokenizer;
    this.file = file;
    const vocab = tokenizer.get_vocab(true);
    let maxId = -1;
    for (const id of vocab.values()) if (id > maxId) maxId = id;
    this.vocabSize = maxId + 1;
    const eos = tokenizer.token_to_id('</s>');
    const pad = tokenizer.token_to_id('<pad>');
    if (eos === undefined) throw new FileFormatError(`${file}: the vocabulary has no </s> token, so it is not a T5 tokenizer`);
    this.eosId = eos;
    this.padId = pad ?? 0;
  }

  /** Loads a tokenizer.json (and the tokenizer_config.json next to it, when present). */
  static fromFile(tokenizerJsonPath: string): T5Tokenizer {
    return T5Tokenizer.fromJson(readJson(tokenizerJsonPath, true), tokenizerJsonPath);
  }

  /**
   * Loads a SentencePiece model (spiece.model, as older T5 repositories ship it without a tokenizer.json), converted
   * as transformers converts it for T5TokenizerFast (lib/spiece.ts); tokenizer_config.json next to it gives `legacy`
   * and `extra_ids`.
   */
  static fromSentencePiece(spieceModelPath: string): T5Tokenizer {
    let bytes: Buffer;
    try {
      bytes = fs.readFileSync(spieceModelPath);
    } catch (e) {
      throw new FileFormatError(`${spieceModelPath}: cannot read: ${(e as Error).message}`);
    }
    const dir = path.dirname(spieceModelPath);
    const configFile = path.join(dir, 'tokenizer_config.json');
    const config = tokenizerConfig(dir) as Record<string, unknown>;
    const option = <V>(key: string, ok: (v: unknown) => boolean, what: string): V | undefined => {
      if (config[key] === undefined || config[key] === null) return undefined;
      if (!ok(config[key])) throw new FileFormatError(`${configFile}: ${key} must be ${what}, got ${JSON.stringify(config[key])}`);
      return config[key] as V;
    };
    const isBool = (v: unknown) => typeof v === 'boolean';
    const specialTokens = option<unknown[]>('additional_special_tokens', Array.isArray, 'a list');
    const addedFile = path.join(dir, 'added_tokens.json');
    const added = fs.existsSync(addedFile) ? readJson(addedFile, true) : undefined;
    if (added !== undefined && (typeof added !== 'object' || added === null || Array.isArray(added) ||
        !Object.values(added).every((id) => Number.isInteger(id)))) {
      throw new FileFormatError(`${addedFile}: must map tokens to integer ids`);
    }
    const json = sentencePieceToTokenizerJson(bytes, spieceModelPath, {
      legacy: option<boolean>('legacy', isBool, 'true or false'),
      addPrefixSpace: option<boolean>('add_prefix_space', isBool, 'true or false'),
      extraIds: option<number>('extra_ids', (v) => Number.isInteger(v) && (v as number) >= 0 && (v as number) <= 10000, 'an integer in [0, 10000]'),
      // (entries may be strings or AddedToken objects with a "content")
      additionalSpecialTokens: specialTokens?.map((t) => (typeof t === 'object' && t !== null ? (t as { content?: unknown }).content : t))
        .filter((t): t is string => typeof t === 'string'),
      addedTokens: added as Record<string, number> | undefined,
    });
    return T5Tokenizer.fromJson(json, spieceModelPath);
  }

  /** DIR/tokenizer.json, else DIR/spiece.model, or undefined when the directory has neither (ids must then be given directly). */
  static fromDir(dir: string): T5Tokenizer | undefined {
    const file = path.join(dir, 'tokenizer.json');
    if (fs.existsSync(file)) return T5Tokenizer.fromFile(file);
    const spiece = path.join(dir, 'spiece.model');
    return fs.existsSync(spiece) ? T5Tokenizer.fromSentencePiece(spiece) : undefined;
  }

  /**
   * A model directory's tokenizer as fromDir finds it, except that an unusable spiece.model (a Git LFS pointer, say)
   * leaves it without one, as before spiece.model was read; `missing` says why there is none (for the error of a
   * text given to such a model). A bad tokenizer.json still throws.
   */
  static forModel(dir: string): { tokenizer: T5Tokenizer | undefined; missing: string } {
    try {
      return { tokenizer: T5Tokenizer.fromDir(dir), missing: `${dir} has no tokenizer.json or spiece.model` };
    } catch (e) {
      if (!(e instanceof FileFormatError) || fs.existsSync(path.join(dir, 'tokenizer.json'))) throw e;
      return { tokenizer: undefined, missing: `${dir} has no tokenizer.json, and its spiece.model is not usable (${e.message})` };
    }
  }

  // `json`: a tokenizer.json's content, from `source` (named in errors); the tokenizer_config.json beside it applies.
  private static fromJson(json: unknown, source: string): T5Tokenizer {
    // T5's special tokens unless the config says otherwise; word-level vocabularies need unk_token from here.
    const config = { unk_token: '<unk>', eos_token: '</s>', pad_token: '<pad>', ...tokenizerConfig(path.dirname(source)) };
    let tokenizer: Tokenizer;
    try {
      tokenizer = new Tokenizer(json as object, config as object);
    } catch (e) {
      throw new FileFormatError(`${source}: not a usable ${source.endsWith('.json') ? 'tokenizer.json' : 'tokenizer'}: ${(e as Error).message}`);
    }
    return new T5Tokenizer(tokenizer, source);
  }

  encode(text: string, options: EncodeOptions = {}): number[] {
    if (typeof text !== 'string') throw new InvalidArgumentError(`encode() needs a string, got ${typeof text}`);
    const addEos = options.addEos ?? true;
    const { maxLength } = options;
    if (maxLength !== undefined && (!Number.isInteger(maxLength) || maxLength < (addEos ? 1 : 0))) {
      throw new InvalidArgumentError(`maxLength must be an integer >= ${addEos ? 1 : 0}, got ${maxLength}`);
    }
    // Encode without the post-processor and append </s> ourselves, so truncation can keep it last.
    let ids = this.tokenizer.encode(text, { add_special_tokens: false }).ids;
    if (maxLength !== undefined) ids = ids.slice(0, addEos ? maxLength - 1 : maxLength);
    return addEos ? [...ids, this.eosId] : ids;
  }

  decode(ids: number[], options: DecodeOptions = {}): string {
    for (const id of ids) {
      if (!Number.isInteger(id) || id < 0) throw new InvalidArgumentError(`decode(): invalid token id ${id}`);
    }
    return this.tokenizer.decode(ids, {
      skip_special_tokens: options.skipSpecialTokens ?? true,
      clean_up_tokenization_spaces: options.cleanUpSpaces ?? false,
    });
  }

  /** The sub-word pieces of a text (no </s>). */
  tokenize(text: string): string[] {
    return this.tokenizer.tokenize(text, { add_special_tokens: false });
  }

  tokenToId(token: string): number | undefined {
    return this.tokenizer.token_to_id(token);
  }

  idToToken(id: number): string | undefined {
    return this.tokenizer.id_to_token(id);
  }
}

// DIR/tokenizer_config.json, or {} when there is none.
function tokenizerConfig(dir: string): object {
  const configPath = path.join(dir, 'tokenizer_config.json');
  return (fs.existsSync(configPath) ? readJson(configPath, false) ?? {} : {}) as object;
}

function readJson(file: string, required: boolean): unknown {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (e) {
    if (!required) return undefined;
    throw new FileFormatError(`${file}: cannot read: ${(e as Error).message}`);
  }
  try {
    return JSON.parse(text);
  } catch (e) {
    throw new FileFormatError(`${file}: invalid JSON: ${(e as Error).message}`);
  }
}
