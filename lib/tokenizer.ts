// T5 tokenization through @huggingface/tokenizers (a faithful JS port of HF tokenizers: the Unigram model,
// the precompiled normalizer, Metaspace). We add the T5 conventions on top: </s> appended, truncation that
// keeps </s> last (as transformers does with truncation=True), pad = <pad>.
import * as fs from 'fs';
import * as path from 'path';
import { Tokenizer } from '@huggingface/tokenizers';
import { FileFormatError, InvalidArgumentError } from './errors';

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
    const json = readJson(tokenizerJsonPath, true);
    const configPath = path.join(path.dirname(tokenizerJsonPath), 'tokenizer_config.json');
    const fileConfig = fs.existsSync(configPath) ? readJson(configPath, false) ?? {} : {};
    // T5's special tokens unless the config says otherwise; word-level vocabularies need unk_token from here.
    const config = { unk_token: '<unk>', eos_token: '</s>', pad_token: '<pad>', ...(fileConfig as object) };
    let tokenizer: Tokenizer;
    try {
      tokenizer = new Tokenizer(json as object, config as object);
    } catch (e) {
      throw new FileFormatError(`${tokenizerJsonPath}: not a usable tokenizer.json: ${(e as Error).message}`);
    }
    return new T5Tokenizer(tokenizer, tokenizerJsonPath);
  }

  /** DIR/tokenizer.json, or undefined when the directory has none (ids must then be given directly). */
  static fromDir(dir: string): T5Tokenizer | undefined {
    const file = path.join(dir, 'tokenizer.json');
    return fs.existsSync(file) ? T5Tokenizer.fromFile(file) : undefined;
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
