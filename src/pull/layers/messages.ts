/**
 * The messages between the layer worker pool (./workers.ts, main thread) and a layer worker
 * (./worker.ts): compressed bytes in, the tar stream out, each direction credit-windowed; and how
 * a GuestpullError crosses the thread boundary (code, message and a JSON-safe copy of its context;
 * the cause stays behind).
 */
import { asGuestpullError, ErrorCode, GuestpullError, type ErrorContext } from '../../errors.js';
import type { InflateResult, InflateTask } from './inflate.js';

export interface SerializedError {
  code: ErrorCode;
  message: string;
  context: ErrorContext;
}

/**
 * main → worker. `credit`: output bytes the main thread has taken. Every message names its task:
 * messages of a task that has ended (late credits, data of an aborted task) are dropped.
 */
export type ToWorker = { id: number } & (
  | { t: 'start'; task: InflateTask }
  | { t: 'data'; buf: ArrayBuffer }
  | { t: 'end' }
  | { t: 'error'; err: SerializedError }
  | { t: 'abort'; err: SerializedError }
  | { t: 'credit'; bytes: number }
);

/** worker → main. `credit`: input bytes the worker has taken; `data`: decompressed tar bytes. */
export type FromWorker = { id: number } & (
  | { t: 'credit'; bytes: number }
  | { t: 'data'; buf: ArrayBuffer }
  | { t: 'done'; result: InflateResult }
  | { t: 'fail'; err: SerializedError }
);

function jsonSafe(context: ErrorContext): ErrorContext {
  try {
    return JSON.parse(JSON.stringify(context)) as ErrorContext;
  } catch {
    return {};
  }
}

export function serializeError(e: unknown): SerializedError {
  const g = asGuestpullError(e);
  return { code: g.code, message: g.message, context: jsonSafe(g.context) };
}

export function deserializeError(s: SerializedError): GuestpullError {
  const code = (Object.values(ErrorCode) as string[]).includes(s.code) ? s.code : ErrorCode.INTERNAL;
  return new GuestpullError(code, s.message, s.context);
}
