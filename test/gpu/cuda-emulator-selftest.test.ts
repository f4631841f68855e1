// The CUDA emulator's own checks (cuda/emu, README "The CUDA emulator"): each scenario makes one mistake that a
// GPU would fault or misbehave on, and the emulator must report it. The GPU tests rely on these checks when they
// pass on the emulator. Runs only on the emulator addon (the cuda-emulator jest project).
import { native } from '../../lib/native';
import { emulated } from './helpers';

interface SelfTest {
  error: string;
  message: string;
}

const selfTest = (name: string): SelfTest =>
  (native()._testing as unknown as { emulatorSelfTest: (n: string) => SelfTest }).emulatorSelfTest(name);

const describeEmulator = emulated() ? describe : describe.skip;

describeEmulator('CUDA emulator self-test', () => {
  test('a __syncthreads that not every thread reaches is a launch failure naming the kernel', () => {
    const r = selfTest('barrier-deadlock');
    expect(r.error).toBe('cudaErrorLaunchFailure');
    expect(r.message).toMatch(/only_thread_zero_waits: barrier deadlock/);
  });

  test('a write past the end of an allocation is an illegal address', () => {
    const r = selfTest('write-past-allocation');
    expect(r.error).toBe('cudaErrorIllegalAddress');
    expect(r.message).toMatch(/past the end of the device allocation of 400 bytes/);
  });

  test('more dynamic shared memory than the kernel was opened up to is a launch error', () => {
    expect(selfTest('shared-memory-limit').error).toBe('cudaErrorInvalidValue');
  });

  test('a copy from pageable memory inside a graph capture fails and invalidates the capture', () => {
    const r = selfTest('pageable-copy-in-capture');
    expect(r.error).toBe('cudaErrorStreamCaptureUnsupported');
    expect(r.message).toMatch(/end capture: cudaErrorStreamCaptureInvalidated/);
  });

  test('device memory that was never written reads as NaN', () => {
    expect(selfTest('fresh-memory-is-nan').message).toMatch(/read NaN/);
  });

  test('a WMMA load from a misaligned pointer is a misaligned address', () => {
    expect(selfTest('misaligned-wmma').error).toBe('cudaErrorMisalignedAddress');
  });

  test('a misaligned 16-byte vector load, cp.async or ldmatrix row is a misaligned address (each faults on a GPU)', () => {
    for (const name of ['misaligned-vector-load', 'misaligned-cp-async', 'misaligned-ldmatrix']) {
      const r = selfTest(name);
      expect(r.error).toBe('cudaErrorMisalignedAddress');
      expect(r.message).toMatch(/not a multiple of 16/);
    }
  });

  test('shared memory read before the barrier that would make it valid gives stale values', () => {
    const r = selfTest('missing-barrier');
    const right = Number(/(\d+) of 64 reads/.exec(r.message)?.[1]);
    expect(right).toBeLessThan(64);
  });

  test('mma.sync tiles are computed in the PTX fragment layout (what the attention kernel relies on)', () => {
    const r = selfTest('mma-layout');
    expect(r.error).toBe('cudaSuccess');
    expect(r.message).toMatch(/\b0 of 128 products wrong/);
  });

  test('ldmatrix gives mma.sync B fragments from a tile stored [n][k] and, with .trans, from one stored [k][n]', () => {
    const r = selfTest('ldmatrix-layout');
    expect(r.error).toBe('cudaSuccess');
    expect(r.message).toMatch(/\b0 of 256 wrong from \[n\]\[k\], 0 of 256 wrong from \[k\]\[n\]/);
  });

  test('cp.async lands only at its wait (a kernel that reads a tile before waiting sees stale data) and zero-fills', () => {
    const r = selfTest('cp-async');
    expect(r.error).toBe('cudaSuccess');
    expect(r.message).toMatch(/\b128 of 128 stale before the wait, 128 of 128 right after it/);
  });

  // kernels/launch.cuh: a kernel launched to overlap the one before it must wait for it (griddepcontrol.wait) before
  // it touches what that kernel writes; every thread of such a launch that ends without waiting is a fault.
  test('a programmatic launch of a kernel that never waits for the kernel before it is a launch failure naming it', () => {
    const r = selfTest('programmatic-launch-without-wait');
    expect(r.error).toBe('cudaErrorLaunchFailure');
    expect(r.message).toMatch(/writes_without_waiting was launched to overlap the kernel before it .* ended without wait_for_previous_kernel/);
  });

  test('a programmatic launch of a kernel that waits first runs', () => {
    const r = selfTest('programmatic-launch-with-wait');
    expect(r.error).toBe('cudaSuccess');
    expect(r.message).toMatch(/accepted/);
  });

  test('a misaligned residual stream in the fused residual add + norm is a typed internal error, not a misaligned read', () => {
    const r = selfTest('misaligned-residual-stream');
    expect(r.error).toBe('cudaSuccess');
    expect(r.message).toMatch(/E_INTERNAL: residual_add_norm: a misaligned residual stream/);
  });

  test('a misaligned q|k|v view in the fused encoder attention is a typed internal error, not a misaligned copy', () => {
    const r = selfTest('misaligned-attention-view');
    expect(r.error).toBe('cudaSuccess');
    expect(r.message).toMatch(/E_INTERNAL: fused encoder attention: a view of q\|k\|v or of the context is missing or not 16-byte aligned/);
  });

  test('after the deliberate faults the emulated context is usable again', () => {
    expect(native().probeCuda().usable).toBe(true);
    expect(selfTest('fresh-memory-is-nan').error).toBe('cudaSuccess');
  });
});
