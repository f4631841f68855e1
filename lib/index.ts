// @tfew/cuda — T-Few ((IA)3 few-shot fine-tuning of T0/T5) for Node.js.
export { T5Model, TrainingSession, backendInfo } from './model';
export type { TrainingSessionOptions, TrainingStepOptions, TrainingStepResult, LoadOptions, RankClassifyOptions, RankClassifyResult, LossBatch, LossOptions, LossResult, DeviceOption, AdapterOption, Recompute } from './model';
export { IA3Adapter, ia3Modules } from './adapter';
export type { IA3Module } from './adapter';
export { T5Tokenizer } from './tokenizer';
export { parseT5Config, readT5Config } from './config';
export type { T5ModelConfig } from './config';
export { resolveCheckpoint } from './checkpoint';
export type { CudaOptions, CudaProbe } from './native';
export * from './errors';
export { RankBatcher, QueueFullError } from './serve';
export type { RankBatcherOptions, RankRequestOptions, RankOneResult, RankBatcherStats } from './serve';
export { Trainer } from './trainer';
export type { TrainerOptions, TrainExample, TrainResult, StepEvent, EvalEvent, DoneEvent, TrainerEvents, TrainableModel, TrainingSessionLike, EvaluationResult } from './trainer';
export * from './optim';
export * from './tasks';
export * from './templates';
export * from './pipeline';
