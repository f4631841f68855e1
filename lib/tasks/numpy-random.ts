// NumPy's legacy RandomState (MT19937) as far as few-shot sampling needs it.
//
// T-Few draws its few-shot subsets with `np.random.seed(seed); np.random.shuffle(rows); rows[:k]` and ships
// the results as data/few_shot/<task>/<k>_shot/<seed>_seed.jsonl. Reproducing that draw bit for bit lets us
// (a) check our readers against those files and (b) sample user data the same way for tasks without files.
// Algorithms: Matsumoto & Nishimura's MT19937 (seeded with init_genrand, as RandomState(int) does) and
// NumPy's `random_interval` rejection sampler used by the legacy shuffle.

const N = 624;
const M = 397;
const UPPER_MASK = 0x80000000;
const LOWER_MASK = 0x7fffffff;
const MATRIX_A = 0x9908b0df;

export class NumpyRandomState {
  private readonly mt = new Uint32Array(N);
  private index = N;

  constructor(seed: number) {
    if (!Number.isInteger(seed) || seed < 0 || seed > 0xffffffff) {
      throw new RangeError(`seed must be an integer in [0, 2^32 - 1], got ${seed}`);
    }
    this.mt[0] = seed >>> 0;
    for (let i = 1; i < N; i++) {
      const prev = this.mt[i - 1] ^ (this.mt[i - 1] >>> 30);
      this.mt[i] = (Math.imul(1812433253, prev) + i) >>> 0;
    }
    this.index = N;
  }

  /** The next raw 32-bit output (genrand_int32), as an unsigned number. */
  nextUint32(): number {
    if (this.index >= N) this.twist();
    let y = this.mt[this.index++];
    y ^= y >>> 11;
    y ^= (y << 7) & 0x9d2c5680;
    y ^= (y << 15) & 0xefc60000;
    y ^= y >>> 18;
    return y >>> 0;
  }

  /** A uniform integer in [0, max] by masked rejection, exactly as NumPy's random_interval (max < 2^32). */
  interval(max: number): number {
    if (max === 0) return 0;
    let mask = max;
    mask |= mask >>> 1;
    mask |= mask >>> 2;
    mask |= mask >>> 4;
    mask |= mask >>> 8;
    mask |= mask >>> 16;
    mask >>>= 0;
    for (;;) {
      const value = (this.nextUint32() & mask) >>> 0;
      if (value <= max) return value;
    }
  }

  /** In-place Fisher-Yates from the end, the order NumPy's legacy shuffle consumes random numbers in. */
  shuffle<T>(items: T[]): T[] {
    for (let i = items.length - 1; i > 0; i--) {
      const j = this.interval(i);
      const tmp = items[i];
      items[i] = items[j];
      items[j] = tmp;
    }
    return items;
  }

  private twist(): void {
    const mt = this.mt;
    for (let k = 0; k < N; k++) {
      const y = (mt[k] & UPPER_MASK) | (mt[(k + 1) % N] & LOWER_MASK);
      mt[k] = (mt[(k + M) % N] ^ (y >>> 1) ^ (y & 1 ? MATRIX_A : 0)) >>> 0;
    }
    this.index = 0;
  }
}

/**
 * T-Few's few-shot draw: shuffle a copy of `pool` with NumPy's legacy RNG seeded by `seed`, keep the first
 * `numShots`. Given the same pool order this returns the same examples as T-Few's split files.
 */
export function sampleFewShot<T>(pool: readonly T[], numShots: number, seed: number): T[] {
  const copy = pool.slice();
  new NumpyRandomState(seed).shuffle(copy);
  return copy.slice(0, Math.min(numShots, copy.length));
}
