// User-defined templates, from a JSON file. Format (docs/pipeline.md has the full description):
//
//   [
//     { "name": "sentiment",
//       "input": "Review: {{text}}\nIs this review positive or negative?",
//       "choices": ["negative", "positive"] },
//     { "name": "from-promptsource",
//       "jinja": "{{premise}} Question: {{hypothesis}} True or False? ||| {{ answer_choices[label] }}",
//       "answer_choices": "True ||| False" }
//   ]
//
// A single object, or { "templates": [...] }, is accepted too. When "choices" is left out the task's label
// names are the answer choices; "literalChoices" gives choices that are not parsed as templates. Strings are Jinja templates
// rendered by nunjucks (lib/templates/engine.ts).
import * as fs from 'fs';
import { FileFormatError, InvalidArgumentError } from '../errors';
import { TextTemplate, type Template, type TemplateSpec } from './engine';

/** Builds templates from specs; specs without choices get `defaultChoices` (the label names). */
export function templatesFromSpecs(specs: unknown, defaultChoices?: string[]): Template[] {
  const list = Array.isArray(specs)
    ? specs
    : specs && typeof specs === 'object' && Array.isArray((specs as { templates?: unknown }).templates)
      ? (specs as { templates: unknown[] }).templates
      : [specs];
  if (list.length === 0) throw new InvalidArgumentError('no templates given');
  return list.map((raw, i) => {
    if (!raw || typeof raw !== 'object') throw new InvalidArgumentError(`template ${i} is not an object`);
    const spec = { ...(raw as TemplateSpec) };
    if (spec.name === undefined) spec.name = `template-${i}`;
    if (spec.choices === undefined && spec.answer_choices === undefined && spec.literalChoices === undefined) {
      if (!defaultChoices) throw new InvalidArgumentError(`template "${spec.name}" has no choices and the task has no label names`);
      // Label names are literal text, not template syntax.
      spec.literalChoices = defaultChoices.slice();
    }
    return new TextTemplate(spec);
  });
}

/** Reads a JSON template file. */
export function loadTemplateFile(file: string, defaultChoices?: string[]): Template[] {
  let json: unknown;
  try {
    json = JSON.parse(fs.readFileSync(file, 'utf8'));
  } catch (e) {
    throw new FileFormatError(`cannot read templates from ${file}: ${(e as Error).message}`);
  }
  return templatesFromSpecs(json, defaultChoices);
}

/**
 * The template used for a custom task without one: every non-label column as "Column: value", then
 * "Label:", choices = the label names (RAFT's layout without an instruction unless one is given).
 */
export function defaultTemplateFor(columns: string[], labelNames: string[], options: { exclude?: string[]; instruction?: string } = {}): Template {
  const exclude = new Set(options.exclude ?? []);
  const shown = columns.filter((c) => !exclude.has(c));
  if (shown.length === 0) throw new InvalidArgumentError('the data has no text columns besides the label');
  const lines = shown.map((c) => `${c}: {{ ${/^[A-Za-z_][A-Za-z0-9_]*$/.test(c) ? c : `fields[${JSON.stringify(c)}]`} }}`);
  const head = options.instruction ? `${options.instruction.trim()}\n` : '';
  return new TextTemplate({
    name: 'default',
    input: `${head}${lines.join('\n')}\nLabel:`,
    literalChoices: labelNames.slice(),
  });
}
