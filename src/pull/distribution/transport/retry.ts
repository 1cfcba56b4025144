/**
 * Retry policy, as small pure functions plus one abortable sleep. What is retried: connection
 * failures (refused, reset, timeouts, temporary DNS failure, a proxy that cannot reach the
 * registry) and HTTP 429 / 500 / 502 / 503 / 504, for idempotent requests only (GET, HEAD). Not
 * retried: other 4xx, TLS trust failures, unknown hosts, proxy 403/407, our own refusals.
 * Delays: exponential backoff with full jitter (random in [0, min(cap, base·2^(n-1))]; defaults
 * base 200 ms, cap 10 s), or the server's `Retry-After` (seconds or an HTTP date) capped at 60 s.
 * The caller's AbortSignal (the RPC deadline) ends a sleep at once.
 */
import { GuestpullError } from '../../../errors.js';
import { abortError, connectStatus, errorCodes } from './errors.js';

export interface BackoffOptions {
  /** Default 200 ms. */
  baseDelayMs?: number;
  /** Default 10 000 ms. */
  maxDelayMs?: number;
  /** Longest `Retry-After` honoured; longer ones are cut to this. Default 60 000 ms. */
  maxRetryAfterMs?: number;
  /** Source of jitter in [0, 1); default Math.random (tests pin it). */
  random?: () => number;
}

export const DEFAULT_BACKOFF: Required<BackoffOptions> = { baseDelayMs: 200, maxDelayMs: 10_000, maxRetryAfterMs: 60_000, random: Math.random };

/** Cause code of a refused close-delimited response body (./index.ts): another attempt may be framed. */
export const CLOSE_DELIMITED = 'GP_CLOSE_DELIMITED_BODY';

export const RETRY_STATUSES: ReadonlySet<number> = new Set([429, 500, 502, 503, 504]);

/** Full-jitter delay before retry number `retry` (1 for the first retry). */
export function backoffDelay(retry: number, opts: Required<BackoffOptions> = DEFAULT_BACKOFF): number {
  const ceiling = Math.min(opts.maxDelayMs, opts.baseDelayMs * 2 ** Math.max(0, retry - 1));
  return Math.floor(opts.random() * ceiling);
}

/**
 * `Retry-After` in milliseconds from now: delta-seconds or an HTTP date (a past date is 0).
 * Undefined when absent or unparseable; negative or absurd values are not trusted.
 */
export function parseRetryAfter(value: string | string[] | undefined, now: number = Date.now()): number | undefined {
  const v = (Array.isArray(value) ? value[0] : value)?.trim();
  if (v === undefined || v === '') return undefined;
  if (/^\d{1,10}$/.test(v)) return Number(v) * 1000;
  // An HTTP date (IMF-fixdate; Date.parse also takes the obsolete forms): must name a weekday or month.
  if (!/[a-z]{3}/i.test(v)) return undefined;
  const at = Date.parse(v);
  if (Number.isNaN(at)) return undefined;
  return Math.max(0, at - now);
}

/** The delay before retry number `retry`, honouring a server's Retry-After when given. */
export function retryDelay(retry: number, retryAfterMs: number | undefined, opts: Required<BackoffOptions> = DEFAULT_BACKOFF): number {
  if (retryAfterMs !== undefined) return Math.min(retryAfterMs, opts.maxRetryAfterMs);
  return backoffDelay(retry, opts);
}

const RETRYABLE_CODES: ReadonlyMap<string, string> = new Map([
  ['ECONNREFUSED', 'connection refused'],
  ['ECONNRESET', 'connection reset'],
  ['EPIPE', 'connection reset'],
  ['UND_ERR_SOCKET', 'connection closed'],
  ['ETIMEDOUT', 'connect timeout'],
  ['UND_ERR_CONNECT_TIMEOUT', 'connect timeout'],
  ['UND_ERR_HEADERS_TIMEOUT', 'headers timeout'],
  ['UND_ERR_BODY_TIMEOUT', 'body idle timeout'],
  ['UND_ERR_RES_CONTENT_LENGTH_MISMATCH', 'body cut short'],
  ['EAI_AGAIN', 'temporary DNS failure'],
  [CLOSE_DELIMITED, 'a body delimited only by closing the connection'],
  ['EHOSTUNREACH', 'host unreachable'],
  ['ENETUNREACH', 'network unreachable'],
]);

/**
 * Why `e` is worth another attempt, in a few words, or undefined when it is not (TLS trust,
 * unknown host, a proxy's 403/407, a refused redirect, …). Looks through GuestpullError causes.
 */
export function retryReason(e: unknown): string | undefined {
  const status = connectStatus(e);
  if (status !== undefined) return status >= 500 ? `proxy answered ${status} to CONNECT` : undefined;
  if (e instanceof GuestpullError && e.cause === undefined) return undefined;
  for (const c of errorCodes(e)) {
    const reason = RETRYABLE_CODES.get(c);
    if (reason !== undefined) return reason;
  }
  return undefined;
}

/** Wait `ms`, or reject at once (with the abort reason mapped for `url`) when `signal` aborts. */
export function sleep(ms: number, signal: AbortSignal | undefined, url: string): Promise<void> {
  if (signal?.aborted) return Promise.reject(abortError(signal, url));
  return new Promise((resolve, reject) => {
    const onAbort = (): void => {
      clearTimeout(timer);
      reject(abortError(signal!, url));
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort);
      resolve();
    }, ms);
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}
