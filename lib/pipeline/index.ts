// The few-shot pipeline: T-Few runs, evaluation with the paper's protocol, the ICL baseline, cost
// accounting, reports and RAFT submissions.
export { accuracy, quantile, median, spread, summarizeRuns, type Spread, type RunAccuracy, type AccuracySummary } from './metrics';
export { encodePrompt, encodeExamples, DEFAULT_MAX_INPUT_LENGTH, type EncodedPrompt, type PromptTokenizer } from './encode';
export {
  evaluate, withoutPredictions, type EvaluateOptions, type EvaluationReport, type EvaluationRun, type ScoringModel, type AdapterForSeed,
} from './evaluate';
export {
  runFewShot, trainAdapter, trainingExamples, type FewShotOptions, type FewShotResult, type TrainAdapterOptions,
  type TrainingRun, type RecipeOptions,
} from './fewshot';
export { evaluateIcl, buildIclInput, demonstrationText, DEFAULT_ICL_MAX_INPUT_LENGTH, type IclOptions, type IclInput } from './icl';
export { compareWithIcl, comparisonReport, comparisonJson, costRows, methodResults, type CompareOptions, type Comparison } from './compare';
export { classify, type ClassifyOptions, type Prediction } from './classify';
export {
  rankFlops, trainingFlops, parameterCount, ia3ParameterCount, measure, formatFlops, formatBytes,
  type FlopsConfig, type CostRow, type Measured,
} from './cost';
export { benchmark, type BenchOptions, type BenchResult } from './bench';
export { markdownReport, comparisonPlotSpec, renderVegaLite, writeReport, type ReportInput, type MethodResult } from './report';
export { raftSubmissionCsv, writeRaftSubmission } from './raft-submission';
export { runDemo, syntheticSentimentTask, syntheticReviews, DEMO_TEMPLATES, type DemoOptions, type DemoResult } from './demo';
