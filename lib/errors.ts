// Typed errors. Native failures reject with an Error whose `code` is one of cuda/core/errors.h's codes;
// fromNative() turns it into one of these classes so callers can `instanceof` them.

export class TfewError extends Error {
  readonly code: string;
  constructor(code: string, message: string) {
    super(message);
    this.name = new.target.name;
    this.code = code;
  }
}

/** Wrong shapes, unknown token ids, bad options. */
export class InvalidArgumentError extends TfewError {
  constructor(message: string) { super('E_INVALID_ARGUMENT', message); }
}
/** A checkpoint that is not a usable T5: bad config, missing or misshaped tensor, unsupported dtype. */
export class InvalidModelError extends TfewError {
  constructor(message: string) { super('E_INVALID_MODEL', message); }
}
/** An adapter that does not fit the model, or an unreadable adapter file. */
export class InvalidAdapterError extends TfewError {
  constructor(message: string) { super('E_INVALID_ADAPTER', message); }
}
/** A file that cannot be read, is truncated, or has a corrupt header. */
export class FileFormatError extends TfewError {
  constructor(message: string) { super('E_IO', message); }
}
/** The model (or trainer) was used after dispose(). */
export class DisposedError extends TfewError {
  constructor(message = 'the model has been disposed') { super('E_DISPOSED', message); }
}
export class OutOfMemoryError extends TfewError {
  constructor(message: string) { super('E_OUT_OF_MEMORY', message); }
}
/** device: 'cuda' was asked for but no usable GPU, driver or cuBLAS is present; the message says which. */
export class DeviceUnavailableError extends TfewError {
  constructor(message: string) { super('E_DEVICE_UNAVAILABLE', message); }
}
export class CudaError extends TfewError {
  constructor(message: string) { super('E_CUDA', message); }
}
/** The native addon could not be loaded at all. */
export class NativeLoadError extends TfewError {
  constructor(message: string) { super('E_NATIVE_LOAD', message); }
}
/** Work stopped by an AbortSignal. */
export class AbortError extends TfewError {
  constructor(message = 'the operation was aborted') { super('E_ABORTED', message); }
}

/** Whether `s` is an AbortSignal (by shape: test runners and other realms have their own AbortSignal class). */
export function isAbortSignal(s: unknown): s is AbortSignal {
  return typeof s === 'object' && s !== null && typeof (s as AbortSignal).aborted === 'boolean' &&
    typeof (s as AbortSignal).addEventListener === 'function';
}

const byCode: Record<string, new (m: string) => TfewError> = {
  E_INVALID_ARGUMENT: InvalidArgumentError,
  E_INVALID_MODEL: InvalidModelError,
  E_INVALID_ADAPTER: InvalidAdapterError,
  E_IO: FileFormatError,
  E_DISPOSED: DisposedError,
  E_OUT_OF_MEMORY: OutOfMemoryError,
  E_DEVICE_UNAVAILABLE: DeviceUnavailableError,
  E_CUDA: CudaError,
};

/** Maps an error thrown or rejected by the addon to its typed class (others pass through). */
export function fromNative(e: unknown): Error {
  if (e instanceof TfewError) return e;
  const err = e as { code?: string; message?: string };
  const cls = err && err.code ? byCode[err.code] : undefined;
  if (cls) return new cls(err.message ?? String(e));
  if (e instanceof Error) return new TfewError('E_INTERNAL', e.message);
  return new TfewError('E_INTERNAL', String(e));
}
