// Tasks: readers for the T-Few evaluation sets, RAFT and user data, and the few-shot sampler.
export * from './types';
export { resolveDataDir, dataAvailable } from './files';
export { NumpyRandomState, sampleFewShot } from './numpy-random';
export {
  readFewShotSplit, listSplitSeeds, readSuperGlue, readAnli, readStoryCloze, readHellaSwag, cleanHellaSwagText,
  readWinogrande, readRaft, readRaftInfo, readSst2, type RaftTaskInfo,
} from './readers';
export { readUserData, type UserData, type UserDataOptions } from './custom';
export {
  getTask, createCustomTask, listTasks, RAFT_TASKS, TFEW_EVAL_TASKS, TFEW_SEEDS,
  type Task, type TaskRecipe, type CustomTaskOptions, type RaftTaskOptions,
} from './registry';
