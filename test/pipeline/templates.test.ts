// Template rendering, answer-choice construction, RAFT's prompt format, user templates and truncation.
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { InvalidArgumentError } from '../../lib/errors';
import { encodePrompt, type PromptTokenizer } from '../../lib/pipeline/encode';
import { BUILTIN_TEMPLATES } from '../../lib/templates/builtin';
import { TextTemplate } from '../../lib/templates/engine';
import { RaftTemplate } from '../../lib/templates/raft';
import { defaultTemplateFor, loadTemplateFile, templatesFromSpecs } from '../../lib/templates/user';
import type { Example } from '../../lib/tasks/types';

const ex = (fields: Example['fields'], label = 0, id = 'x'): Example => ({ id, fields, label });

describe('template language', () => {
  test('substitutes fields, nested fields, list items and literals', () => {
    const t = new TextTemplate({
      name: 't',
      input: '{{premise}} | {{target.span1_text}} | {{endings[1]}} | {{endings[-1]}} | {{ "lit" }} | {{ fields["Paper title"] }}',
      choices: ['a', 'b'],
    });
    const r = t.render(ex({ premise: 'P.', target: { span1_text: 'S' }, endings: ['e0', 'e1', 'e2'], 'Paper title': 'T' }));
    expect(r.input).toEqual(['P. | S | e1 | e2 | lit | T']);
  });

  test('filters', () => {
    const t = new TextTemplate({
      name: 'f',
      input: '{{a | lower}} {{a | upper}} {{b | capitalize}} {{b | ucfirst}} {{a | lcfirst}} [{{c | trim}}] {{d | rstrip(".")}} {{xs | join(" or ")}} {{d | replace("end", "END")}}',
      choices: ['x', 'y'],
    });
    const r = t.render(ex({ a: 'Hello World', b: 'hELLO', c: '  pad  ', d: 'the end...', xs: ['p', 'q', 'r'] }));
    expect(r.input[0]).toBe('hello world HELLO WORLD Hello HELLO hello World [pad] the end p or q or r the END...');
  });

  test('if / elif / else on field values, compared as text', () => {
    const t = new TextTemplate({
      name: 'c',
      input: '{% if question == "cause" %}because{% elif question == "effect" %}so{% else %}?{% endif %}{% if n != 1 %} not-one{% endif %}{% if flag %} flag{% endif %}',
      choices: ['a', 'b'],
    });
    expect(t.render(ex({ question: 'cause', n: 1, flag: false })).input[0]).toBe('because');
    expect(t.render(ex({ question: 'effect', n: '2', flag: true })).input[0]).toBe('so not-one flag');
    expect(t.render(ex({ question: 'other', n: 1, flag: '' })).input[0]).toBe('?');
  });

  test('answer choices are templates too, and answer_choices / label are in scope', () => {
    const t = new TextTemplate({
      name: 'ac',
      input: 'Pick: {{ answer_choices | join(", ") }} (gold {{label}})',
      choices: ['{{choice1 | lcfirst | rstrip(".")}}', '{{choice2 | lcfirst | rstrip(".")}}'],
    });
    const r = t.render(ex({ choice1: 'He ran away.', choice2: 'She stayed.' }, 1));
    expect(r.choices).toEqual(['he ran away', 'she stayed']);
    expect(r.input[0]).toBe('Pick: he ran away, she stayed (gold 1)');
    expect(r.label).toBe(1);
  });

  test('PromptSource form: jinja "input ||| target" and answer_choices "A ||| B"', () => {
    const [t] = templatesFromSpecs({
      name: 'ps',
      jinja: '{{premise}} Question: {{hypothesis}} True or False? ||| {{ answer_choices[label] }}',
      answer_choices: 'True ||| False',
    });
    const r = t.render(ex({ premise: 'A dog barks.', hypothesis: 'An animal makes noise.' }, 0));
    expect(r.input).toEqual(['A dog barks. Question: An animal makes noise. True or False?']);
    expect(r.choices).toEqual(['True', 'False']);
  });

  test('errors are typed and name the template', () => {
    expect(() => new TextTemplate({ name: 'bad', input: '{{ a | nosuch }}', choices: ['a', 'b'] })).toThrow(InvalidArgumentError);
    expect(() => new TextTemplate({ name: 'bad', input: '{% if a %}x', choices: ['a', 'b'] })).toThrow(/endif/);
    expect(() => new TextTemplate({ name: 'one', input: 'x', choices: ['only'] })).toThrow(/two answer/);
    const t = new TextTemplate({ name: 'missing', input: '{{nope}}', choices: ['a', 'b'] });
    expect(() => t.render(ex({}))).toThrow(/template "missing".*no field "nope"/);
    const empty = new TextTemplate({ name: 'empty', input: 'x', choices: ['{{a}}', 'b'] });
    expect(() => empty.render(ex({ a: '' }))).toThrow(/rendered empty/);
    const three = new TextTemplate({ name: 'lbl', input: 'x', choices: ['a', 'b'] });
    expect(() => three.render(ex({}, 2))).toThrow(/label 2/);
  });

  // The template language is nunjucks (Jinja syntax); docs/pipeline.md lists what the project relies on.
  const render = (input: string, fields: Example['fields']) => new TextTemplate({ name: 'n', input, choices: ['a', 'b'] }).render(ex(fields)).input[0];

  test('Jinja statements and expressions beyond if: for/loop, set, macro, and/or/not/in, inline if, ~', () => {
    expect(render('{% for e in endings %}{{ loop.index }}. {{ e }}\n{% endfor %}', { endings: ['x', 'y'] })).toBe('1. x\n2. y');
    expect(render('{% set q = premise | upper %}{{ q ~ "!" }}', { premise: 'p' })).toBe('P!');
    expect(render('{% macro ask(s, end="?") %}{{ s }}{{ end }}{% endmacro %}{{ ask(a) }} {{ ask(a, end="!") }}', { a: 'A' })).toBe('A? A!');
    const cond = '{% if a and not b %}yes{% endif %}{% if "x" in xs %} in{% endif %} {{ "on" if flag else "off" }}';
    expect(render(cond, { a: 1, b: 0, xs: ['x'], flag: false })).toBe('yes in off');
    expect(render(cond, { a: 1, b: 1, xs: ['y'], flag: true })).toBe('on');
  });

  test('whitespace is kept as written; {%- -%} trims it', () => {
    // Neither trimBlocks (newline after a tag) nor lstripBlocks (indent before a tag) applies.
    expect(render('x{% if a %}\n  A\n  {% endif %}\n|', { a: 1 })).toBe('x\n  A\n  \n|');
    expect(render('x{% if a %}  A  {% endif %}|', { a: 1 })).toBe('x  A  |');
    expect(render('x {%- if a %}  A  {%- endif -%}  |', { a: 1 })).toBe('x  A|');
  });

  test('nunjucks built-in filters, and Jinja behaviour on numbers and strings', () => {
    expect(render('{{ a | title }} {{ xs | length }} {{ xs | first }} {{ xs | sort | join(",") }}', { a: 'hello world', xs: ['c', 'a', 'b'] })).toBe('Hello World 3 c a,b,c');
    expect(render('{{ n | lower }} {{ s | join("-") }} {{ d | trim(".") }} {{ d | replace(".", "!", 1) }}', { n: 5, s: 'ab', d: '..x..' })).toBe('5 a-b x !.x..');
  });

  test('values: lists print comma-separated, negative indexes count from the end, null reads as empty', () => {
    expect(render('{{ xs }} | {{ xs[-2] }} | [{{ n }}] | {{ nested[0][-1] }}', { xs: ['a', 'b', 'c'], n: null, nested: [['p', 'q']] })).toBe('a, b, c | b | [] | q');
    expect(() => render('{{ xs[-4] }}', { xs: ['a', 'b', 'c'] })).toThrow(/template "n".*undefined value.*\{\{ xs\[-4\] \}\}/);
  });

  test('every named field must exist, also in conditions; is defined / default make one optional', () => {
    expect(() => render('{% if questoin == "cause" %}because{% endif %}', { question: 'cause' })).toThrow(/no field "questoin"/);
    expect(render('{% if extra is defined %}{{ extra }}{% else %}none{% endif %} {{ other | default("D") }}', {})).toBe('none D');
    expect(render('{% if extra is defined %}{{ extra }}{% endif %}', { extra: 'E' })).toBe('E');
    expect(() => render('{{ t.nope | lower }}', { t: {} })).toThrow(/filter "lower" got an undefined value/);
  });

  test('unknown tests, syntax errors and file access are typed errors naming the template', () => {
    expect(() => render('{{ a is nosuchtest }}', { a: 1 })).toThrow(/template "n": unknown test "nosuchtest"/);
    expect(() => render('{{ a + }}', { a: 1 })).toThrow(InvalidArgumentError);
    expect(() => render('{% include "x.txt" %}', {})).toThrow(/template "n" on example x: template not found/);
  });
});

describe('built-in templates: answer choices follow the dataset labels', () => {
  // One hand-made example per task, in HF field names.
  const samples: Record<string, Example['fields']> = {
    rte: { premise: 'The cat sat on the mat.', hypothesis: 'A cat sat.' },
    cb: { premise: 'The cat sat on the mat.', hypothesis: 'A cat sat.' },
    'anli-r1': { premise: 'The cat sat.', hypothesis: 'A cat sat.' },
    'anli-r2': { premise: 'The cat sat.', hypothesis: 'A cat sat.' },
    'anli-r3': { premise: 'The cat sat.', hypothesis: 'A cat sat.' },
    copa: { premise: 'The man broke his toe.', choice1: 'He dropped a hammer on his foot.', choice2: 'He got a hole in his sock.', question: 'cause' },
    wic: { word: 'bank', sentence1: 'The bank was closed.', sentence2: 'We sat on the river bank.' },
    wsc: { text: 'Mark told Pete many lies about himself.', span1_text: 'Mark', span2_text: 'himself' },
    winogrande: { sentence: 'Sarah was a better surgeon than Maria so _ got the harder cases.', option1: 'Sarah', option2: 'Maria' },
    'h-swag': { activity_label: 'Cooking', ctx: 'A man cracks an egg into a bowl. He', endings: ['whisks it.', 'sleeps.', 'paints the egg.', 'runs away.'] },
    storycloze: { input_sentence_1: 'A.', input_sentence_2: 'B.', input_sentence_3: 'C.', input_sentence_4: 'D.', sentence_quiz1: 'E1.', sentence_quiz2: 'E2.' },
    boolq: { passage: 'Water boils at 100 C.', question: 'does water boil at 100 c' },
    sst2: { sentence: 'a charming movie' },
  };

  test('every task has several templates that render non-empty prompts and distinct choices', () => {
    for (const [task, specs] of Object.entries(BUILTIN_TEMPLATES)) {
      expect(specs.length).toBeGreaterThanOrEqual(3);
      const names = new Set(specs.map((s) => s.name));
      expect(names.size).toBe(specs.length);
      for (const spec of specs) {
        const r = new TextTemplate(spec).render(ex(samples[task], 0));
        expect(r.input[0].length).toBeGreaterThan(0);
        expect(new Set(r.choices).size).toBe(r.choices.length);
      }
    }
  });

  test('three-way NLI: CB orders (entailment, contradiction, neutral), ANLI (entailment, neutral, contradiction)', () => {
    for (const spec of BUILTIN_TEMPLATES.cb) {
      const c = new TextTemplate(spec).render(ex(samples.cb)).choices;
      const a = new TextTemplate(BUILTIN_TEMPLATES['anli-r1'].find((s) => s.name === spec.name)!).render(ex(samples['anli-r1'])).choices;
      expect([a[0], a[1], a[2]]).toEqual([c[0], c[2], c[1]]);
    }
    const yesNoMaybe = new TextTemplate(BUILTIN_TEMPLATES.cb[0]).render(ex(samples.cb)).choices;
    expect(yesNoMaybe).toEqual(['Yes', 'No', 'Maybe']);
  });

  test('binary tasks whose label 1 means "yes" (WiC, WSC, BoolQ) put the negative answer first', () => {
    for (const task of ['wic', 'wsc', 'boolq']) {
      for (const spec of BUILTIN_TEMPLATES[task]) {
        const [neg, pos] = new TextTemplate(spec).render(ex(samples[task])).choices;
        expect(['No', 'False']).toContain(neg);
        expect(['Yes', 'True']).toContain(pos);
      }
    }
    // RTE: label 0 = entailment = yes.
    for (const spec of BUILTIN_TEMPLATES.rte) expect(['Yes', 'True']).toContain(new TextTemplate(spec).render(ex(samples.rte)).choices[0]);
  });

  test('COPA asks for a cause or an effect and its choices are the alternatives', () => {
    const spec = BUILTIN_TEMPLATES.copa.find((s) => s.name === 'because-so')!;
    const t = new TextTemplate(spec);
    const cause = t.render(ex({ ...samples.copa, question: 'cause' }));
    const effect = t.render(ex({ ...samples.copa, question: 'effect' }));
    expect(cause.input[0]).toBe('The man broke his toe because');
    expect(effect.input[0]).toBe('The man broke his toe so');
    expect(cause.choices).toEqual(['he dropped a hammer on his foot.', 'he got a hole in his sock.']);
  });

  test('HellaSwag choices are the four endings, Story Cloze the two quiz sentences', () => {
    for (const spec of BUILTIN_TEMPLATES['h-swag']) {
      expect(new TextTemplate(spec).render(ex(samples['h-swag'])).choices).toEqual(samples['h-swag'].endings);
    }
    for (const spec of BUILTIN_TEMPLATES.storycloze) {
      expect(new TextTemplate(spec).render(ex(samples.storycloze)).choices).toEqual(['E1.', 'E2.']);
    }
  });
});

describe('RAFT prompt (tfew-spec.md)', () => {
  const base = {
    instruction: '  Label the sentence.  ',
    promptFields: ['Title', 'Abstract'], // deliberately not in column order
    dataColumns: ['Abstract', 'Url', 'Title'],
    labelNames: ['included', 'not included'],
  };

  test('instruction + comma-joined labels, then "Field: value" pieces in column order, "\\nLabel:" last', () => {
    const r = new RaftTemplate(base).render(ex({ Abstract: ' An abstract. ', Url: 'http://x', Title: 'A title' }, 1));
    expect(r.input).toEqual(['Label the sentence. Possible labels: included, not included', 'Abstract: An abstract.', 'Title: A title\nLabel:']);
    expect(r.choices).toEqual(['included', 'not included']);
    expect(r.label).toBe(1);
  });

  test('empty fields are skipped; with none left the label cue goes on the instruction', () => {
    const r = new RaftTemplate(base).render(ex({ Abstract: '  ', Title: '' }, -1));
    expect(r.input).toEqual(['Label the sentence. Possible labels: included, not included\nLabel:']);
  });

  test('newline and none label modes, and Banking77 label cleaning', () => {
    const nl = new RaftTemplate({ ...base, labelsInInput: 'newline' }).render(ex({ Title: 'T' }));
    expect(nl.input[0]).toBe('Label the sentence.\nPossible labels:\n1. included\n2. not included');
    const none = new RaftTemplate({ ...base, labelsInInput: 'none' }).render(ex({ Title: 'T' }));
    expect(none.input[0]).toBe('Label the sentence.');
    const clean = new RaftTemplate({ ...base, labelNames: ['card_arrival', 'Refund_not_showing_up'], cleanLabelNames: true }).render(ex({ Title: 'T' }));
    expect(clean.choices).toEqual(['card arrival', 'Refund not showing up']);
  });
});

describe('user templates', () => {
  test('a JSON file with several templates; choices default to the label names', () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tfew-tpl-'));
    const file = path.join(dir, 't.json');
    fs.writeFileSync(file, JSON.stringify({ templates: [
      { name: 'review', input: 'Review: {{text}}\nPositive or negative?', choices: ['negative', 'positive'] },
      { name: 'labels', input: '{{text}} =>' },
    ] }));
    const [a, b] = loadTemplateFile(file, ['bad', 'good']);
    expect(a.render(ex({ text: 'Great.' }, 1))).toEqual({ input: ['Review: Great.\nPositive or negative?'], choices: ['negative', 'positive'], label: 1 });
    expect(b.render(ex({ text: 'Meh.' })).choices).toEqual(['bad', 'good']);
    fs.writeFileSync(file, '{ not json');
    expect(() => loadTemplateFile(file)).toThrow(/cannot read templates/);
  });

  test('label names with template syntax stay literal', () => {
    const [t] = templatesFromSpecs([{ name: 'x', input: '{{text}}' }], ['{{weird}}', 'a "quoted" one']);
    expect(t.render(ex({ text: 'hi' })).choices).toEqual(['{{weird}}', 'a "quoted" one']);
  });

  test('the default template for a custom task lists the columns, label column excluded', () => {
    const t = defaultTemplateFor(['text', 'Paper title', 'label'], ['no', 'yes'], { exclude: ['label'], instruction: 'Decide.' });
    expect(t.render(ex({ text: 'abc', 'Paper title': 'T', label: 'yes' }, 1)).input).toEqual(['Decide.\ntext: abc\nPaper title: T\nLabel:']);
  });
});

describe('encodePrompt truncation (T-Few: 256 tokens, eos kept)', () => {
  // A whitespace tokenizer with eos = 1: token ids are word positions + 100, so truncation is visible.
  const tok: PromptTokenizer = {
    encode(text, o = {}) {
      let ids = text.split(/\s+/).filter(Boolean).map((_, i) => 100 + i);
      const addEos = o.addEos ?? true;
      if (o.maxLength !== undefined) ids = ids.slice(0, addEos ? o.maxLength - 1 : o.maxLength);
      return addEos ? [...ids, 1] : ids;
    },
  };
  const words = (n: number) => Array.from({ length: n }, (_, i) => `w${i}`).join(' ');

  test('a single input is cut to maxInputLength with eos last; choices end with eos', () => {
    const e = encodePrompt(tok, { input: [words(10)], choices: ['yes', 'no way'], label: 1 }, 4);
    expect(e.inputIds).toEqual([100, 101, 102, 1]);
    expect(e.choiceIds).toEqual([[100, 1], [100, 101, 1]]);
    expect(encodePrompt(tok, { input: [words(300)], choices: ['a', 'b'], label: 0 }).inputIds.length).toBe(256);
  });

  test('multi-piece (RAFT) inputs: each piece cut on its own, only the last gets eos', () => {
    const e = encodePrompt(tok, { input: [words(5), words(5), words(5)], choices: ['a', 'b'], label: 0 }, 3);
    expect(e.inputIds).toEqual([100, 101, 102, 100, 101, 102, 100, 101, 1]);
  });
});
