/**
 * The messages between the layer worker pool (./workers.ts, main thread) and a layer worker
 * (./worker.ts): a layer task, its compressed bytes in (credit-windowed), its logs and outcome
 * out; and how a GuestpullError crosses the thread boundary (code, message and a JSON-safe copy of
 * its context; the cause stays behind).
 */
import { asGuestpullError, ErrorCode, GuestpullError, type ErrorContext } from '../../errors.js';
import type { ApplyLayerOptions, ApplyLayerResult, LowerSwitch } from './index.js';

export interface SerializedError {
  code: ErrorCode;
  message: string;
  context: ErrorContext;
}

/** What a worker needs of ApplyLayerOptions: everything but the source stream, logger and signal. */
export type LayerTask = Omit<ApplyLayerOptions, 'source' | 'logger' | 'signal' | 'lower'> & {
  /** The worker asks for the parents (a `lower` message) when the applier needs them. */
  speculative?: boolean;
};

/**
 * main → worker. Every message names its task: messages of a task that has ended (late data of
 * an aborted task) are dropped. `lower`/`lowerReady`/`lowerFailed`: a speculative layer's request
 * for its parents and the answer (see ./apply.ts ApplierOptions.lower).
 */
export type ToWorker = { id: number } & (
  | { t: 'start'; task: LayerTask }
  | { t: 'data'; buf: ArrayBuffer }
  | { t: 'end' }
  | { t: 'error'; err: SerializedError }
  | { t: 'abort'; err: SerializedError }
  | { t: 'lowerReady'; sw: LowerSwitch }
  | { t: 'lowerFailed'; err: SerializedError }
);

/** worker → main. `credit`: compressed bytes the worker's pipeline has taken. */
export type FromWorker = { id: number } & (
  | { t: 'credit'; bytes: number }
  | { t: 'log'; fields: Record<string, unknown>; msg: string }
  | { t: 'done'; result: ApplyLayerResult }
  | { t: 'fail'; err: SerializedError }
  | { t: 'lower'; rootEntry: boolean }
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
