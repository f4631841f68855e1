// A small template language for prompts: a documented subset of the Jinja syntax PromptSource uses, so
// P3-style templates (and most PromptSource ones) can be written as plain data.
//
//   {{ premise }}                      a field of the example (HF field names)
//   {{ target.span1_text }}            nested fields; {{ endings[2] }} list items;
//   {{ fields["Paper title"] }}        any column, also names that are not identifiers
//   {{ hypothesis | lower }}           filters: lower, upper, capitalize (Jinja: first upper, rest lower),
//                                      ucfirst, lcfirst, trim, rstrip("."), join(", "), replace("a", "b")
//   {{ "true" }}                       string literals
//   {% if question == "cause" %}...{% elif ... %}...{% else %}...{% endif %}   (== and != and bare truthiness)
//   {{ answer_choices | join(" or ") }}  the rendered answer choices; {{ label }} the gold index
//
// A template has an input (the encoder text) and answer choices (each one a template too). The target is
// always answer_choices[label], as in rank classification; PromptSource's `jinja: "input ||| target"` form
// is accepted and its target part ignored.
import { InvalidArgumentError } from '../errors';
import type { Example, FieldValue } from '../tasks/types';

// ---------------------------------------------------------------------------------------------------
// Parsing

type Expr =
  | { kind: 'literal'; value: FieldValue }
  | { kind: 'path'; root: string; steps: (string | number)[] }
  | { kind: 'filter'; input: Expr; name: string; args: FieldValue[] };

type Cond = { left: Expr; op: '==' | '!=' | 'truthy'; right?: Expr };

type Node =
  | { kind: 'text'; text: string }
  | { kind: 'expr'; expr: Expr }
  | { kind: 'if'; branches: { cond: Cond; body: Node[] }[]; otherwise: Node[] };

const FILTERS = ['lower', 'upper', 'capitalize', 'ucfirst', 'lcfirst', 'trim', 'rstrip', 'join', 'replace'];

class ExprParser {
  private pos = 0;
  constructor(private readonly src: string, private readonly where: string) {}

  fail(msg: string): never {
    throw new InvalidArgumentError(`${this.where}: ${msg} in "${this.src}"`);
  }
  private skip(): void {
    while (this.pos < this.src.length && /\s/.test(this.src[this.pos])) this.pos++;
  }
  private peek(s: string): boolean {
    this.skip();
    return this.src.startsWith(s, this.pos);
  }
  private eat(s: string): boolean {
    if (this.peek(s)) {
      this.pos += s.length;
      return true;
    }
    return false;
  }
  done(): boolean {
    this.skip();
    return this.pos >= this.src.length;
  }

  private literal(): FieldValue | undefined {
    this.skip();
    const c = this.src[this.pos];
    if (c === '"' || c === "'") {
      let out = '';
      let i = this.pos + 1;
      for (; i < this.src.length && this.src[i] !== c; i++) {
        if (this.src[i] === '\\' && i + 1 < this.src.length) {
          const n = this.src[++i];
          out += n === 'n' ? '\n' : n === 't' ? '\t' : n;
        } else out += this.src[i];
      }
      if (i >= this.src.length) this.fail('unterminated string');
      this.pos = i + 1;
      return out;
    }
    const m = /^-?\d+/.exec(this.src.slice(this.pos));
    if (m) {
      this.pos += m[0].length;
      return Number(m[0]);
    }
    return undefined;
  }

  private identifier(): string {
    this.skip();
    const m = /^[A-Za-z_][A-Za-z0-9_]*/.exec(this.src.slice(this.pos));
    if (!m) this.fail(`expected a name at position ${this.pos}`);
    this.pos += m[0].length;
    return m[0];
  }

  expr(): Expr {
    let e: Expr;
    const lit = this.literal();
    if (lit !== undefined) e = { kind: 'literal', value: lit };
    else {
      const root = this.identifier();
      const steps: (string | number)[] = [];
      for (;;) {
        if (this.src[this.pos] === '.') {
          this.pos++;
          steps.push(this.identifier());
        } else if (this.src[this.pos] === '[') {
          this.pos++;
          const key = this.literal();
          if (key === undefined || (typeof key !== 'number' && typeof key !== 'string')) this.fail('expected an index');
          if (!this.eat(']')) this.fail('expected ]');
          steps.push(key as string | number);
        } else break;
      }
      e = { kind: 'path', root, steps };
    }
    while (this.eat('|')) {
      const name = this.identifier();
      if (!FILTERS.includes(name)) this.fail(`unknown filter "${name}" (known: ${FILTERS.join(', ')})`);
      const args: FieldValue[] = [];
      if (this.eat('(')) {
        if (!this.eat(')')) {
          for (;;) {
            const a = this.literal();
            if (a === undefined) this.fail('filter arguments must be literals');
            args.push(a);
            if (this.eat(')')) break;
            if (!this.eat(',')) this.fail('expected , or )');
          }
        }
      }
      e = { kind: 'filter', input: e, name, args };
    }
    return e;
  }

  cond(): Cond {
    const left = this.expr();
    if (this.eat('==')) return { left, op: '==', right: this.expr() };
    if (this.eat('!=')) return { left, op: '!=', right: this.expr() };
    return { left, op: 'truthy' };
  }
}

function parseExpr(src: string, where: string): Expr {
  const p = new ExprParser(src, where);
  const e = p.expr();
  if (!p.done()) p.fail('unexpected trailing text');
  return e;
}

function parseCond(src: string, where: string): Cond {
  const p = new ExprParser(src, where);
  const c = p.cond();
  if (!p.done()) p.fail('unexpected trailing text');
  return c;
}

/** Parses template text into a tree; throws InvalidArgumentError naming `where` on syntax errors. */
export function parseTemplate(text: string, where: string): Node[] {
  const tokens = text.split(/(\{\{[\s\S]*?\}\}|\{%[\s\S]*?%\})/);
  let i = 0;
  const parseBlock = (stopAt: string[]): { nodes: Node[]; stop: string; arg: string } => {
    const nodes: Node[] = [];
    while (i < tokens.length) {
      const tok = tokens[i++];
      if (tok.startsWith('{{')) {
        nodes.push({ kind: 'expr', expr: parseExpr(tok.slice(2, -2), where) });
      } else if (tok.startsWith('{%')) {
        const body = tok.slice(2, -2).trim();
        const [keyword, ...rest] = body.split(/\s+/);
        const arg = rest.join(' ');
        if (stopAt.includes(keyword)) return { nodes, stop: keyword, arg };
        if (keyword !== 'if') throw new InvalidArgumentError(`${where}: unsupported tag {% ${body} %}`);
        const branches: { cond: Cond; body: Node[] }[] = [];
        let otherwise: Node[] = [];
        let cond = parseCond(arg, where);
        for (;;) {
          const r = parseBlock(['elif', 'else', 'endif']);
          branches.push({ cond, body: r.nodes });
          if (r.stop === 'elif') {
            cond = parseCond(r.arg, where);
            continue;
          }
          if (r.stop === 'else') {
            const e = parseBlock(['endif']);
            if (e.stop !== 'endif') throw new InvalidArgumentError(`${where}: {% if %} without {% endif %}`);
            otherwise = e.nodes;
          }
          break;
        }
        nodes.push({ kind: 'if', branches, otherwise });
      } else if (tok.length > 0) {
        nodes.push({ kind: 'text', text: tok });
      }
    }
    if (stopAt.length > 0) throw new InvalidArgumentError(`${where}: {% if %} without {% endif %}`);
    return { nodes, stop: '', arg: '' };
  };
  return parseBlock([]).nodes;
}

// ---------------------------------------------------------------------------------------------------
// Rendering

type Scope = Record<string, FieldValue>;

function toText(v: FieldValue): string {
  if (v === null) return '';
  if (typeof v === 'string') return v;
  if (typeof v === 'number' || typeof v === 'boolean') return String(v);
  if (Array.isArray(v)) return v.map(toText).join(', ');
  return JSON.stringify(v);
}

function evalExpr(e: Expr, scope: Scope, where: string): FieldValue {
  if (e.kind === 'literal') return e.value;
  if (e.kind === 'path') {
    if (!(e.root in scope)) throw new InvalidArgumentError(`${where}: the example has no field "${e.root}"`);
    let v: FieldValue = scope[e.root];
    for (const step of e.steps) {
      if (typeof step === 'number' && Array.isArray(v)) v = v[step < 0 ? v.length + step : step];
      else if (typeof step === 'number' && typeof v === 'string') v = v[step < 0 ? v.length + step : step];
      else if (v !== null && typeof v === 'object' && !Array.isArray(v)) v = (v as Record<string, FieldValue>)[String(step)];
      else v = undefined as unknown as FieldValue;
      if (v === undefined) throw new InvalidArgumentError(`${where}: "${e.root}" has no element ${JSON.stringify(step)}`);
    }
    return v;
  }
  const input = evalExpr(e.input, scope, where);
  const s = () => toText(input);
  const str = (i: number, dflt: string) => (e.args[i] === undefined ? dflt : String(e.args[i]));
  switch (e.name) {
    case 'lower': return s().toLowerCase();
    case 'upper': return s().toUpperCase();
    case 'capitalize': { const t = s(); return t.charAt(0).toUpperCase() + t.slice(1).toLowerCase(); }
    case 'ucfirst': { const t = s(); return t.charAt(0).toUpperCase() + t.slice(1); }
    case 'lcfirst': { const t = s(); return t.charAt(0).toLowerCase() + t.slice(1); }
    case 'trim': return s().trim();
    case 'rstrip': {
      const chars = str(0, ' \t\n\r');
      let t = s();
      while (t.length > 0 && chars.includes(t[t.length - 1])) t = t.slice(0, -1);
      return t;
    }
    case 'join': return Array.isArray(input) ? input.map(toText).join(str(0, '')) : s();
    case 'replace': return s().split(str(0, '')).join(str(1, ''));
  }
  throw new InvalidArgumentError(`${where}: unknown filter "${e.name}"`);
}

function truthy(v: FieldValue): boolean {
  if (Array.isArray(v)) return v.length > 0;
  return v !== null && v !== '' && v !== 0 && v !== false;
}

function holds(c: Cond, scope: Scope, where: string): boolean {
  const l = evalExpr(c.left, scope, where);
  if (c.op === 'truthy') return truthy(l);
  const r = evalExpr(c.right as Expr, scope, where);
  // Compare as text so `label == 1` and `answer == "1"` both work on CSV strings and JSON numbers.
  const eq = toText(l) === toText(r);
  return c.op === '==' ? eq : !eq;
}

export function renderNodes(nodes: Node[], scope: Scope, where: string): string {
  let out = '';
  for (const n of nodes) {
    if (n.kind === 'text') out += n.text;
    else if (n.kind === 'expr') out += toText(evalExpr(n.expr, scope, where));
    else {
      const branch = n.branches.find((b) => holds(b.cond, scope, where));
      out += renderNodes(branch ? branch.body : n.otherwise, scope, where);
    }
  }
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
  private readonly inputNodes: Node[];
  private readonly choiceNodes: Node[][];

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
    this.inputNodes = parseTemplate(inputText, where);
    this.choiceNodes = choiceList.map((c, i) => {
      if (typeof c !== 'string') throw new InvalidArgumentError(`${where}: choice ${i} is not a string`);
      return spec.literalChoices ? [{ kind: 'text', text: c }] : parseTemplate(c.trim(), `${where}, choice ${i}`);
    });
  }

  render(example: Example): RenderedPrompt {
    const where = `template "${this.name}" on example ${example.id}`;
    // `fields` reaches columns whose names are not identifiers: {{ fields["Paper title"] }}.
    const scope: Scope = { fields: example.fields, ...example.fields, label: example.label };
    const choices = this.choiceNodes.map((nodes) => renderNodes(nodes, scope, where).trim());
    choices.forEach((c, i) => {
      if (c === '') throw new InvalidArgumentError(`${where}: answer choice ${i} rendered empty`);
    });
    if (example.label >= choices.length) {
      throw new InvalidArgumentError(`${where}: label ${example.label} but only ${choices.length} choices`);
    }
    scope.answer_choices = choices;
    const input = renderNodes(this.inputNodes, scope, where).trim();
    return { input: [input], choices, label: example.label };
  }
}

/** Compiles a spec, or returns a Template unchanged. */
export function toTemplate(t: Template | TemplateSpec): Template {
  return typeof (t as Template).render === 'function' ? (t as Template) : new TextTemplate(t as TemplateSpec);
}
