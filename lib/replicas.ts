// Replicas of one model (the same checkpoint loaded on several GPUs) sharing a list of jobs: the pipeline's
// evaluate() and classify() and `tfew train --cuda-devices` use this one scheme.
import { InvalidArgumentError } from './errors';

/**
 * `model` as a list of replicas (one model: a list of one), checked by assertReplicas; `what` names the caller in
 * the errors.
 */
export function asReplicas<M>(model: M | readonly M[], what: string): readonly M[] {
  const models: readonly M[] = Array.isArray(model) ? model : [model as M];
  if (models.length === 0) throw new InvalidArgumentError(`${what} needs a model`);
  assertReplicas(models, what);
  return models;
}

/**
 * Throws unless the models are distinct replicas of one model: jobs shared out among them must give the same
 * results whichever runs them. Models that can tell (T5Model.replicaMismatch) are compared with the first.
 */
export function assertReplicas<M>(models: readonly M[], what: string): void {
  if (new Set(models).size !== models.length) throw new InvalidArgumentError(`${what} replicas must be distinct models`);
  const first = models[0] as { replicaMismatch?: (other: M) => string | null };
  if (typeof first?.replicaMismatch !== 'function') return;
  for (let i = 1; i < models.length; i++) {
    const why = first.replicaMismatch(models[i]);
    if (why !== null) throw new InvalidArgumentError(`${what} replicas must be copies of one model: model ${i} is not one of model 0 (${why})`);
  }
  warnIfThreadPoolSmall(models.length, what);
}

let threadPoolWarned = false;
/**
 * Each running native call holds one of libuv's threads (UV_THREADPOOL_SIZE, 4 by default, fixed at the pool's
 * first use), which fs, zlib and dns share: replicas beyond what it holds wait for a thread instead of running, and
 * replicas that hold all but one leave fs and dns waiting. A process warning, once, unless two threads are left
 * over; `tfew ... --cuda-devices` raises the size itself.
 */
export function warnIfThreadPoolSmall(replicas: number, what: string): void {
  const size = Number(process.env.UV_THREADPOOL_SIZE) || 4;
  if (replicas <= 1 || replicas + 2 <= size || threadPoolWarned) return;
  threadPoolWarned = true;
  process.emitWarning(`${what}: ${replicas} replicas share libuv's ${size} threads with fs, dns and zlib, and each running ` +
    `call holds one: set UV_THREADPOOL_SIZE=${replicas + 4} (in the environment, before the process starts) so that ` +
    'all of them can run at once with threads to spare', { code: 'TFEW_THREADPOOL' });
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
