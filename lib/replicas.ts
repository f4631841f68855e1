// Replicas of one model (the same checkpoint loaded on several GPUs) sharing a list of jobs: the pipeline's
// evaluate() and classify() and `tfew train --cuda-devices` use this one scheme.
import { InvalidArgumentError } from './errors';

/** `model` as a list of replicas (one model: a list of one); `what` names the caller in the error for none. */
export function asReplicas<M>(model: M | readonly M[], what: string): readonly M[] {
  const models: readonly M[] = Array.isArray(model) ? model : [model as M];
  if (models.length === 0) throw new InvalidArgumentError(`${what} needs a model`);
  return models;
}

/**
 * Runs jobs 0 .. count - 1, each replica taking the next one as it finishes one (one replica: in order). After a
 * job fails, or once `stopped()` says so, no new job starts; the jobs in flight finish, then the first failure (by
 * replica) is thrown.
 */
export async function shareOut<M>(models: readonly M[], count: number, run: (model: M, job: number) => Promise<void>,
                                  stopped: () => boolean = () => false): Promise<void> {
  let next = 0;
  let failed = false;
  const settled = await Promise.allSettled(models.map(async (model) => {
    while (next < count && !failed && !stopped()) {
      try {
        await run(model, next++);
      } catch (e) {
        failed = true;
        throw e;
      }
    }
  }));
  const failure = settled.find((r): r is PromiseRejectedResult => r.status === 'rejected');
  if (failure) throw failure.reason;
}
