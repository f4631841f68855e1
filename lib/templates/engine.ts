// Prompt templates in Jinja syntax, rendered by nunjucks (a maintained JavaScript port of Jinja2), so P3-style
// templates and PromptSource's can be written as plain data:
//
//   {{ premise }}                      a field of the example (HF field names)
//   {{ target.span1_text }}            nested fields; {{ endings[2] }}, {{ endings[-1] }} list items
//   {{ fields["Paper title"] }}        any column, also names that are not identifiers
//   {{ hypothesis | lower }}           nunjucks' filters, Jinja's versions of lower, upper, capitalize, trim, join,
//                                      replace, plus ucfirst, lcfirst, rstrip(".")
//   {% if question == "cause" %}...{% elif ... %}...{% else %}...{% endif %}, {% for %}, {% set %}, and/or/not
//   {{ answer_choices | join(" or ") }}  the rendered answer choices; {{ label }} the gold index
//
// A template has an input (the encoder text) and answer choices (each one a template too). The target is
// always answer_choices[label], as in rank classification; PromptSource's `jinja: "input ||| target"` form
// is accepted and its target part ignored.
//
// Stricter than Jinja's defaults, because a typo in a field name should fail loudly rather than silently change
// the prompt: every field a template names must exist in the example (except under `is defined` or `default`),
// and printing an undefined value (a missing nested field or list element) is an error.
import * as nunjucks from 'nunjucks';
import { InvalidArgumentError } from '../errors';
import type { Example, FieldValue } from '../tasks/types';

// ---------------------------------------------------------------------------------------------------
// The environment

// Prompts are plain text: no HTML escaping, whitespace exactly as written, and no loaders, so templates
// cannot read files ({% include %} fails).
const env = new nunjucks.Environment([], {
  autoescape: false,
  throwOnUndefined: true,
  trimBlocks: false,
  lstripBlocks: false,
});

/** A value as a prompt shows it; undefined means the template reached past the data. */
function text(value: unknown, filter: string): string {
  if (value === undefined) throw new InvalidArgumentError(`filter "${filter}" got an undefined value`);
  return value === null ? '' : String(value);
}

/** Python's str.rstrip / str.strip: `chars` is a set of characters, default whitespace. */
function stripChars(s: string, chars: unknown, left: boolean): string {
  if (chars === undefined || chars === null) return left ? s.trim() : s.trimEnd();
  const set = String(chars);
  let end = s.length;
  while (end > 0 && set.includes(s[end - 1])) end--;
  let start = 0;
  while (left && start < end && set.includes(s[start])) start++;
  return s.slice(start, end);
}

// nunjucks' own lower/upper/capitalize/trim fail on numbers and its join fails on strings; these follow Jinja,
// which converts the value to text first. nunjucks' replace already matches Python's str.replace.
env.addFilter('lower', (v: unknown) => text(v, 'lower').toLowerCase());
env.addFilter('upper', (v: unknown) => text(v, 'upper').toUpperCase());
env.addFilter('capitalize', (v: unknown) => {
  const s = text(v, 'capitalize').toLowerCase();
  return s.charAt(0).toUpperCase() + s.slice(1);
});
env.addFilter('trim', (v: unknown, chars?: unknown) => stripChars(text(v, 'trim'), chars, true));
env.addFilter('join', (v: unknown, separator: unknown = '', attribute?: unknown) => {
  const items = typeof v === 'string' ? Array.from(v) : Array.isArray(v) ? v : [text(v, 'join')];
  const picked = attribute === undefined ? items : items.map((x) => (x as Record<string, unknown>)[String(attribute)]);
  return picked.map((x) => text(x, 'join')).join(text(separator, 'join'));
});
// Not Jinja filters, but handy for prompts (and kept from this project's earlier template language).
env.addFilter('ucfirst', (v: unknown) => {
  const s = text(v, 'ucfirst');
  return s.charAt(0).toUpperCase() + s.slice(1);
});
env.addFilter('lcfirst', (v: unknown) => {
  const s = text(v, 'lcfirst');
  return s.charAt(0).toLowerCase() + s.slice(1);
});
env.addFilter('rstrip', (v: unknown, chars?: unknown) => stripChars(text(v, 'rstrip'), chars, false));

// ---------------------------------------------------------------------------------------------------
// Checking a template: which fields it needs, and whether its filters and tests exist

/** nunjucks' parse tree (its parser is public but untyped): every node lists its child fields. */
interface AstNode {
  readonly typename: string;
  readonly fields: readonly string[];
  readonly [field: string]: unknown;
}
const { parser } = nunjucks as unknown as { parser: { parse(src: string, extensions: unknown[], opts: object): AstNode } };
const envTests = env as unknown as { getTest(name: string): unknown };

const isNode = (v: unknown): v is AstNode => typeof v === 'object' && v !== null && typeof (v as AstNode).typename === 'string';
const symbolName = (v: unknown): string | undefined =>
  isNode(v) && v.typename === 'Symbol' ? String(v.value) : undefined;

/**
 * The example fields a template names: free variables that are not set or looped over in the template, not
 * nunjucks globals (range, ...), and not only tested with `is defined` / passed to `default`. Throws for
 * unknown filters and tests, which nunjucks would only report when rendering.
 */
function requiredFields(source: string, where: string): string[] {
  const used = new Set<string>();
  const bound = new Set<string>(['loop', 'caller']);
  const optional = new Set<string>();
  const bind = (target: unknown): void => {
    const name = symbolName(target);
    if (name !== undefined) bound.add(name);
    else if (Array.isArray(target)) target.forEach(bind);
    else if (isNode(target)) target.fields.forEach((f) => bind(target[f]));
  };
  const visit = (v: unknown): void => {
    if (Array.isArray(v)) return v.forEach(visit);
    if (!isNode(v)) return;
    switch (v.typename) {
      case 'Symbol':
        used.add(String(v.value));
        return;
      case 'Pair': // dict and keyword-argument keys are names, not variables
        return visit(v.value);
      case 'Filter': {
        const name = symbolName(v.name) ?? '';
        try {
          env.getFilter(name);
        } catch {
          throw new InvalidArgumentError(`${where}: unknown filter "${name}"`);
        }
        const input = symbolName(((v.args as AstNode).children as unknown[])[0]);
        if ((name === 'default' || name === 'd') && input !== undefined) optional.add(input);
        return visit(v.args);
      }
      case 'Is': {
        // The right side names a test, possibly called with arguments: `x is divisibleby(3)`.
        const test = isNode(v.right) ? (symbolName(v.right.name) ?? String(v.right.value)) : '';
        try {
          envTests.getTest(test);
        } catch {
          throw new InvalidArgumentError(`${where}: unknown test "${test}"`);
        }
        const input = symbolName(v.left);
        if ((test === 'defined' || test === 'undefined') && input !== undefined) optional.add(input);
        visit(v.left);
        return isNode(v.right) ? visit(v.right.args) : undefined;
      }
      case 'For':
      case 'AsyncEach':
      case 'AsyncAll':
        bind(v.name);
        break;
      case 'Set':
        bind(v.targets);
        visit(v.body); // a block {% set %} keeps its body outside `fields`
        break;
      case 'Macro':
        bind(v.name);
        bind(v.args);
        return visit(v.body);
    }
    v.fields.forEach((f) => visit(v[f]));
  };
  visit(parser.parse(source, [], {}));
  const isGlobal = (name: string): boolean => {
    try {
      env.getGlobal(name);
      return true;
    } catch {
      return false;
    }
  };
  return [...used].filter((n) => !bound.has(n) && !optional.has(n) && !isGlobal(n));
}

/**
 * nunjucks' messages read "(unknown path) [Line L, Column C]\n  Template render error: ..."; keep the message,
 * and name the tag that failed where nunjucks gives its position.
 */
function describeError(error: unknown, source: string): string {
  const message = error instanceof Error ? error.message : String(error);
  let detail = message
    .replace(/\(unknown path\)( \[Line \d+, Column \d+\])?|Template render error:|\b(InvalidArgument)?Error: /g, ' ')
    .replace(/\s+/g, ' ')
    .trim();
  if (detail === 'attempted to output null or undefined value') detail = 'renders an undefined value (a missing field or list element)';
  const position = /\[Line (\d+), Column (\d+)\]/.exec(message);
  if (!position) return detail;
  const [line, column] = [Number(position[1]), Number(position[2])];
  const offset = source.split('\n').slice(0, line - 1).reduce((n, l) => n + l.length + 1, 0) + column - 1;
  const tag = /^(\{\{[\s\S]*?\}\}|\{%[\s\S]*?%\})/.exec(source.slice(offset));
  return `${detail} at ${tag ? tag[0] : `line ${line}, column ${column}`}`;
}

/** One template string, parsed and compiled once. */
class CompiledText {
  private readonly template: nunjucks.Template;
  private readonly fields: string[];

  constructor(private readonly source: string, where: string) {
    try {
      this.template = new nunjucks.Template(source, env, undefined, true);
    } catch (e) {
      throw new InvalidArgumentError(`${where}: ${describeError(e, source)} in "${source}"`);
    }
    this.fields = requiredFields(source, where);
  }

  render(scope: Record<string, unknown>, where: string): string {
    for (const name of this.fields) {
      if (!Object.prototype.hasOwnProperty.call(scope, name)) throw new InvalidArgumentError(`${where}: the example has no field "${name}"`);
    }
    try {
      return this.template.render(scope);
    } catch (e) {
      throw new InvalidArgumentError(`${where}: ${describeError(e, this.source)}`);
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Example values as templates see them

// Lists print as "a, b, c" and take Python's negative indexes (endings[-1]); nunjucks would print "a,b,c" and
// give undefined for [-1].
const LIST_VIEW: ProxyHandler<unknown[]> = {
  get(list, key, receiver) {
    if (key === 'toString') return () => list.map(String).join(', ');
    if (typeof key === 'string' && /^-\d+$/.test(key)) return list[list.length + Number(key)];
    return Reflect.get(list, key, receiver);
  },
};

/** null prints as empty text, records as JSON, lists as above. */
function templateValue(value: FieldValue): unknown {
  if (value === null) return '';
  if (Array.isArray(value)) return new Proxy(value.map(templateValue), LIST_VIEW);
  if (typeof value === 'object') return templateRecord(value);
  return value;
}

function templateRecord(record: Record<string, FieldValue>): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(record)) out[k] = templateValue(v);
  Object.defineProperty(out, 'toString', { value: () => JSON.stringify(record) });
  return out;
}

// ---------------------------------------------------------------------------------------------------
// Templates

/** A prompt rendered for one example. */
export interface RenderedPrompt {
  /** The encoder input as pieces; most templates have one. Pieces are tokenized separately, then joined. */
  input: string[];
  /** The answer choices (decoder targets), in label order. */
  choices: string[];
  /** Index of the gold choice, -1 when unlabelled. */
  label: number;
}

/** Anything that turns an example into a prompt with answer choices. */
export interface Template {
  readonly name: string;
  /** True for templates that pose the dataset's original task (T-Few evaluates only those). */
  readonly originalTask: boolean;
  render(example: Example): RenderedPrompt;
}

/** The data form of a template (built-ins and user template files). */
export interface TemplateSpec {
  name: string;
  /** The encoder input. */
  input?: string;
  /** PromptSource form "input ||| target": accepted in place of `input`; the target part is ignored. */
  jinja?: string;
  /** Answer choices: a list of templates or one string separated by "|||" (PromptSource form). */
  choices?: string | string[];
  /** PromptSource's key for `choices`. */
  answer_choices?: string | string[];
  /** Answer choices taken verbatim, no template syntax (e.g. label names of a user's data). */
  literalChoices?: string[];
  originalTask?: boolean;
}

/** A template compiled from a TemplateSpec. */
export class TextTemplate implements Template {
  readonly name: string;
  readonly originalTask: boolean;
  private readonly input: CompiledText;
  /** A compiled template per choice, or the text itself for literal choices. */
  private readonly choices: (CompiledText | string)[];

  constructor(spec: TemplateSpec) {
    if (!spec || typeof spec.name !== 'string' || spec.name === '') {
      throw new InvalidArgumentError('a template needs a non-empty "name"');
    }
    this.name = spec.name;
    this.originalTask = spec.originalTask ?? true;
    const where = `template "${spec.name}"`;
    const inputText = spec.input ?? (spec.jinja !== undefined ? spec.jinja.split('|||')[0] : undefined);
    if (typeof inputText !== 'string') throw new InvalidArgumentError(`${where}: needs "input" (or "jinja")`);
    const choices = spec.choices ?? spec.answer_choices;
    const choiceList = spec.literalChoices ?? (typeof choices === 'string' ? choices.split('|||') : choices);
    if (!Array.isArray(choiceList) || choiceList.length < 2) {
      throw new InvalidArgumentError(`${where}: needs at least two answer "choices"`);
    }
    this.input = new CompiledText(inputText, where);
    this.choices = choiceList.map((c, i) => {
      if (typeof c !== 'string') throw new InvalidArgumentError(`${where}: choice ${i} is not a string`);
      return spec.literalChoices ? c : new CompiledText(c.trim(), `${where}, choice ${i}`);
    });
  }

  render(example: Example): RenderedPrompt {
    const where = `template "${this.name}" on example ${example.id}`;
    const fields = templateRecord(example.fields);
    // `fields` reaches columns whose names are not identifiers: {{ fields["Paper title"] }}.
    const scope: Record<string, unknown> = { fields, ...fields, label: example.label };
    const choices = this.choices.map((c, i) => (typeof c === 'string' ? c : c.render(scope, `${where}, choice ${i}`)).trim());
    choices.forEach((c, i) => {
      if (c === '') throw new InvalidArgumentError(`${where}: answer choice ${i} rendered empty`);
    });
    if (example.label >= choices.length) {
      throw new InvalidArgumentError(`${where}: label ${example.label} but only ${choices.length} choices`);
    }
    scope.answer_choices = templateValue(choices);
    const input = this.input.render(scope, where).trim();
    return { input: [input], choices, label: example.label };
  }
}

/** Compiles a spec, or returns a Template unchanged. */
export function toTemplate(t: Template | TemplateSpec): Template {
  return typeof (t as Template).render === 'function' ? (t as Template) : new TextTemplate(t as TemplateSpec);
}
