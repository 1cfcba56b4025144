/**
 * Typed errors. Every failure that leaves a module is a GuestpullError with a stable `code`;
 * service/ maps codes to gRPC status exactly once (see service/status.ts), the CLI maps them to
 * exit codes. Messages say what failed, for which image and endpoint, and what to do.
 */

export const ErrorCode = {
  /** Malformed image reference. */
  INVALID_REFERENCE: 'INVALID_REFERENCE',
  /** Bad bundle path or other bad request argument. */
  INVALID_ARGUMENT: 'INVALID_ARGUMENT',
  /** The bundle already holds a config.json or rootfs. */
  ALREADY_EXISTS: 'ALREADY_EXISTS',
  /** Unknown repository, tag, digest, or no manifest for this platform. */
  NOT_FOUND: 'NOT_FOUND',
  /** Network failure: refused, reset, DNS, TLS, timeout talking to a registry or proxy. */
  UNAVAILABLE: 'UNAVAILABLE',
  /** A digest or size did not match what was promised. */
  DIGEST_MISMATCH: 'DIGEST_MISMATCH',
  /** Image content that breaks the rules (hostile tar entry, bad manifest, unsupported format). */
  BAD_IMAGE: 'BAD_IMAGE',
  /** The registry wants credentials we do not have, or rejected them. */
  UNAUTHENTICATED: 'UNAUTHENTICATED',
  /** Refused by configuration or policy (blocked registry, insecure not allowed, ...). */
  PERMISSION_DENIED: 'PERMISSION_DENIED',
  /** Configuration is invalid or names something we cannot use. */
  CONFIG: 'CONFIG',
  /** Out of disk, memory bound or similar. */
  RESOURCE_EXHAUSTED: 'RESOURCE_EXHAUSTED',
  /** Deadline passed. */
  DEADLINE_EXCEEDED: 'DEADLINE_EXCEEDED',
  /** The caller cancelled. */
  CANCELLED: 'CANCELLED',
  /** A feature we do not implement (yet). */
  UNIMPLEMENTED: 'UNIMPLEMENTED',
  /** The init-data document's digest does not match the value bound into the TEE. */
  INITDATA_MISMATCH: 'INITDATA_MISMATCH',
  /** A bug or an unexpected local failure. */
  INTERNAL: 'INTERNAL',
} as const;

export type ErrorCode = (typeof ErrorCode)[keyof typeof ErrorCode];

export interface ErrorContext {
  image?: string;
  endpoint?: string;
  layer?: string;
  [key: string]: unknown;
}

export class GuestpullError extends Error {
  readonly code: ErrorCode;
  readonly context: ErrorContext;

  constructor(code: ErrorCode, message: string, context: ErrorContext = {}, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'GuestpullError';
    this.code = code;
    this.context = context;
  }
}

export function isGuestpullError(e: unknown): e is GuestpullError {
  return e instanceof GuestpullError;
}

/** Wrap anything thrown into a GuestpullError, keeping typed errors as they are. */
export function asGuestpullError(e: unknown, fallback: ErrorCode = ErrorCode.INTERNAL): GuestpullError {
  if (e instanceof GuestpullError) return e;
  if (e instanceof Error) {
    const errno = (e as NodeJS.ErrnoException).code;
    if (errno === 'ENOSPC' || errno === 'EDQUOT') {
      return new GuestpullError(ErrorCode.RESOURCE_EXHAUSTED, `out of space: ${e.message}`, {}, { cause: e });
    }
    if (e.name === 'AbortError') {
      return new GuestpullError(ErrorCode.CANCELLED, `cancelled: ${e.message}`, {}, { cause: e });
    }
    return new GuestpullError(fallback, e.message, {}, { cause: e });
  }
  return new GuestpullError(fallback, String(e));
}
