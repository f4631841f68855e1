// Prompt templates: the template language, built-in P3-style templates, RAFT's prompt, user templates.
export {
  TextTemplate, toTemplate, type Template, type TemplateSpec, type RenderedPrompt,
} from './engine';
export { BUILTIN_TEMPLATES } from './builtin';
export { RaftTemplate, readRaftPromptSettings, type RaftTemplateOptions, type RaftLabelsInInput } from './raft';
export { loadTemplateFile, templatesFromSpecs, defaultTemplateFor } from './user';
