// Built-in prompt templates for the T-Few evaluation tasks, in the P3 / PromptSource style T-Few uses:
// a natural-language question around the example's fields, and answer choices scored by rank
// classification. Several per task, because the paper reports the median over templates and seeds.
//
// These are this project's own wordings of the usual prompt shapes (entailment questions, "because/so"
// for COPA, continuation for HellaSwag and Story Cloze, ...), not PromptSource's files. To reproduce the
// paper's numbers exactly, load PromptSource's original-task templates through the user template format
// (lib/templates/user.ts accepts their `jinja` / `answer_choices` fields).
//
// Answer-choice order always follows the dataset's integer labels (HF `datasets` conventions).
import type { TemplateSpec } from './engine';

const YES_NO = ['Yes', 'No'];
const NO_YES = ['No', 'Yes'];

/** RTE: 0 entailment, 1 not_entailment. */
const rte: TemplateSpec[] = [
  { name: 'does-this-imply', input: '{{premise}}\nQuestion: Does this imply that "{{hypothesis}}"? Yes or no?', choices: YES_NO },
  { name: 'based-on-passage', input: '{{premise}} Based on the passage above, is it true that "{{hypothesis}}"? Yes or no?', choices: YES_NO },
  { name: 'premise-hypothesis', input: 'Premise: {{premise}}\nHypothesis: {{hypothesis}}\nDoes the premise entail the hypothesis? Yes or no?', choices: YES_NO },
  { name: 'true-or-false', input: '{{premise}}\nQuestion: {{hypothesis}} True or False?', choices: ['True', 'False'] },
  { name: 'can-we-conclude', input: 'Suppose {{premise}} Can we conclude that "{{hypothesis}}"? Yes or no?', choices: YES_NO },
];

/** Three-way NLI prompts; `order` maps the dataset's label ids onto (entail, contradict, neutral). */
function nli3(order: 'cb' | 'anli'): TemplateSpec[] {
  // CB: 0 entailment, 1 contradiction, 2 neutral. ANLI: 0 entailment, 1 neutral, 2 contradiction.
  const pick = (entail: string, contradict: string, neutral: string) =>
    order === 'cb' ? [entail, contradict, neutral] : [entail, neutral, contradict];
  return [
    { name: 'does-this-imply', input: '{{premise}}\nQuestion: Does this imply that "{{hypothesis}}"? Yes, no, or maybe?', choices: pick('Yes', 'No', 'Maybe') },
    { name: 'based-on-passage', input: '{{premise}} Based on the passage above, is it true that "{{hypothesis}}"? Yes, no, or maybe?', choices: pick('Yes', 'No', 'Maybe') },
    { name: 'true-false-neither', input: '{{premise}}\nQuestion: {{hypothesis}} True, False, or Neither?', choices: pick('True', 'False', 'Neither') },
    { name: 'guaranteed-possible-impossible', input: 'Assume that {{premise}} Is "{{hypothesis}}" then guaranteed, possible, or impossible?', choices: pick('Guaranteed', 'Impossible', 'Possible') },
    { name: 'can-we-conclude', input: 'Suppose {{premise}} Can we conclude that "{{hypothesis}}"? Yes, no, or maybe?', choices: pick('Yes', 'No', 'Maybe') },
  ];
}

/** COPA: 0 choice1, 1 choice2; `question` is "cause" or "effect". */
const copa: TemplateSpec[] = [
  {
    name: 'cause-or-result',
    input: '{{premise}} {% if question == "cause" %}What was the cause of this?{% else %}What happened as a result?{% endif %}',
    choices: ['{{choice1}}', '{{choice2}}'],
  },
  {
    name: 'because-so',
    input: '{{premise | rstrip(".")}} {% if question == "cause" %}because{% else %}so{% endif %}',
    choices: ['{{choice1 | lcfirst}}', '{{choice2 | lcfirst}}'],
  },
  {
    name: 'more-plausible',
    input: 'Pick the more plausible {{question}}.\nPremise: {{premise}}\nOption 1: {{choice1}}\nOption 2: {{choice2}}',
    choices: ['{{choice1}}', '{{choice2}}'],
  },
  {
    name: 'which-alternative',
    input: '"{{choice1}}" or "{{choice2}}"? {{premise | rstrip(".")}} {% if question == "cause" %}because{% else %}so{% endif %}...',
    choices: ['{{choice1}}', '{{choice2}}'],
  },
];

/** WiC: 0 different meaning, 1 same meaning. */
const wic: TemplateSpec[] = [
  { name: 'same-meaning', input: 'Does the word "{{word}}" mean the same thing in these two sentences? Yes or no?\n{{sentence1}}\n{{sentence2}}', choices: NO_YES },
  { name: 'sentence-a-b', input: 'Sentence A: {{sentence1}}\nSentence B: {{sentence2}}\nIs "{{word}}" used with the same meaning in A and B? Yes or no?', choices: NO_YES },
  { name: 'true-or-false', input: "{{sentence1}}\n{{sentence2}}\nQuestion: Is the word '{{word}}' used in the same sense in the two sentences above? True or False?", choices: ['False', 'True'] },
  { name: 'several-meanings', input: 'The word "{{word}}" has several meanings. Does it have the same meaning in "{{sentence1}}" and in "{{sentence2}}"? Yes or no?', choices: NO_YES },
];

/** WSC: 0 the pronoun does not refer to span1, 1 it does. */
const wsc: TemplateSpec[] = [
  { name: 'does-pronoun-refer', input: '{{text}}\nIn the passage above, does the pronoun "{{span2_text}}" refer to {{span1_text}}? Yes or no?', choices: NO_YES },
  { name: 'who-is', input: '{{text}}\nQuestion: Who or what is "{{span2_text}}"? Is it {{span1_text}}? Yes or no?', choices: NO_YES },
  { name: 'true-or-false', input: 'Passage: {{text}}\nIs it correct that "{{span2_text}}" means "{{span1_text}}"? True or False?', choices: ['False', 'True'] },
  { name: 'by-they-mean', input: '{{text}} Here, by "{{span2_text}}" they mean "{{span1_text}}". Yes or no?', choices: NO_YES },
];

/** WinoGrande: 0 option1, 1 option2; the sentence has a "_" blank. */
const winogrande: TemplateSpec[] = [
  { name: 'underscore-refers-to', input: '{{sentence}}\nWhat does the _ in the sentence above refer to? {{option1}} or {{option2}}?', choices: ['{{option1}}', '{{option2}}'] },
  { name: 'fill-in-the-blank', input: 'Fill in the blank: {{sentence}}\nOption 1: {{option1}}\nOption 2: {{option2}}', choices: ['{{option1}}', '{{option2}}'] },
  { name: 'replace-blank', input: '{{sentence}}\nReplace the _ with the right option: {{option1}} or {{option2}}.', choices: ['{{option1}}', '{{option2}}'] },
];

/** HellaSwag: the label picks one of four endings. */
const hswag: TemplateSpec[] = [
  { name: 'continuation', input: '{{ctx}}', choices: ['{{endings[0]}}', '{{endings[1]}}', '{{endings[2]}}', '{{endings[3]}}'] },
  { name: 'how-does-it-continue', input: 'How does this description continue? {{ctx}}', choices: ['{{endings[0]}}', '{{endings[1]}}', '{{endings[2]}}', '{{endings[3]}}'] },
  { name: 'activity-ending', input: '{{activity_label}}: {{ctx}}\nWhich ending makes the most sense?', choices: ['{{endings[0]}}', '{{endings[1]}}', '{{endings[2]}}', '{{endings[3]}}'] },
  { name: 'complete-description', input: 'Complete the description with the most appropriate ending: {{ctx}} ...', choices: ['{{endings[0]}}', '{{endings[1]}}', '{{endings[2]}}', '{{endings[3]}}'] },
];

/** Story Cloze: 0 sentence_quiz1, 1 sentence_quiz2. */
const STORY = '{{input_sentence_1}} {{input_sentence_2}} {{input_sentence_3}} {{input_sentence_4}}';
const storycloze: TemplateSpec[] = [
  { name: 'continuation', input: STORY, choices: ['{{sentence_quiz1}}', '{{sentence_quiz2}}'] },
  { name: 'what-comes-next', input: `${STORY}\nWhat is a possible continuation for the story above?`, choices: ['{{sentence_quiz1}}', '{{sentence_quiz2}}'] },
  { name: 'which-ending', input: `Story: ${STORY}\nWhich ending fits the story best?\n- {{sentence_quiz1}}\n- {{sentence_quiz2}}`, choices: ['{{sentence_quiz1}}', '{{sentence_quiz2}}'] },
  { name: 'pick-the-ending', input: `Read the story and pick the ending that makes sense.\n${STORY}`, choices: ['{{sentence_quiz1}}', '{{sentence_quiz2}}'] },
];

/** BoolQ: 0 False, 1 True. */
const boolq: TemplateSpec[] = [
  { name: 'passage-question', input: '{{passage}}\nQuestion: {{question}}? Yes or no?', choices: NO_YES },
  { name: 'based-on-passage', input: 'Based on the following passage, {{question}}? {{passage}}', choices: NO_YES },
  { name: 'true-or-false', input: 'Passage: {{passage}}\nAfter reading this passage, is it true that {{question}}? True or False?', choices: ['False', 'True'] },
];

/** SST-2: 0 negative, 1 positive. */
const sst2: TemplateSpec[] = [
  { name: 'review-sentiment', input: 'Review: {{sentence}}\nIs this review positive or negative?', choices: ['negative', 'positive'] },
  { name: 'feeling', input: '{{sentence}} How does the writer feel about the movie?', choices: ['bad', 'good'] },
  { name: 'great-or-terrible', input: '{{sentence}} All in all, the movie was', choices: ['terrible', 'great'] },
];

/** Built-in template specs by task name. */
export const BUILTIN_TEMPLATES: Record<string, TemplateSpec[]> = {
  rte,
  cb: nli3('cb'),
  'anli-r1': nli3('anli'),
  'anli-r2': nli3('anli'),
  'anli-r3': nli3('anli'),
  copa,
  wic,
  wsc,
  winogrande,
  'h-swag': hswag,
  storycloze,
  boolq,
  sst2,
};
