/**
 * Network failures in words. Turns whatever undici or Node's net/tls layers throw (errno codes,
 * UND_ERR_* codes, TLS verification codes, aborts) into one GuestpullError that names the
 * endpoint's origin, the cause a person can act on, and what to do about it.
 */
import { ErrorCode, GuestpullError } from '../../../errors.js';

/** TLS verification failures where the fix is to trust another CA. */
const UNTRUSTED_CERT_CODES = new Set([
  'UNABLE_TO_VERIFY_LEAF_SIGNATURE',
  'UNABLE_TO_GET_ISSUER_CERT',
  'UNABLE_TO_GET_ISSUER_CERT_LOCALLY',
  'SELF_SIGNED_CERT_IN_CHAIN',
  'DEPTH_ZERO_SELF_SIGNED_CERT',
  'CERT_UNTRUSTED',
  'CERT_SIGNATURE_FAILURE',
  'CERT_CHAIN_TOO_LONG',
  'INVALID_CA',
]);

export interface TimeoutsMs {
  connect: number;
  headers: number;
  body: number;
}

/** The error codes found on `e`, its `cause` chain and AggregateError members, outermost first. */
export function errorCodes(e: unknown): string[] {
  const out: string[] = [];
  const seen = new Set<unknown>();
  const visit = (x: unknown, depth: number): void => {
    if (depth > 5 || x === null || typeof x !== 'object' || seen.has(x)) return;
    seen.add(x);
    const code = (x as { code?: unknown }).code;
    if (typeof code === 'string') out.push(code);
    if (x instanceof AggregateError) for (const m of x.errors) visit(m, depth + 1);
    if (x instanceof Error) visit(x.cause, depth + 1);
  };
  visit(e, 0);
  return out;
}

function originOf(url: string): string {
  try {
    return new URL(url).origin;
  } catch {
    return url;
  }
}

function hostOf(url: string): string {
  try {
    return new URL(url).host;
  } catch {
    return url;
  }
}

/** The caller's abort, as the error to throw: its reason when it is already ours, else CANCELLED. */
export function abortError(signal: AbortSignal, url: string): GuestpullError {
  const reason: unknown = signal.reason;
  if (reason instanceof GuestpullError) return reason;
  return new GuestpullError(ErrorCode.CANCELLED, `request to ${originOf(url)} cancelled`, { endpoint: originOf(url) }, { cause: reason });
}

/**
 * Map a failure of a request (or of reading its body) to `url` into a GuestpullError.
 * GuestpullErrors pass through; an aborted `signal` wins over whatever undici reported.
 */
export function networkError(e: unknown, url: string, timeouts: TimeoutsMs, signal?: AbortSignal): GuestpullError {
  if (e instanceof GuestpullError) return e;
  if (signal?.aborted) return abortError(signal, url);
  const origin = originOf(url);
  const host = hostOf(url);
  const codes = errorCodes(e);
  const has = (...c: string[]): boolean => codes.some((x) => c.includes(x));
  let cause: string;
  let hint = 'check that the registry is up and reachable from the guest (proxy settings in [image] image_pull_proxy)';
  if (has('ECONNREFUSED')) {
    cause = 'connection refused';
  } else if (has('ENOTFOUND')) {
    cause = `host not found (DNS lookup of ${host} failed)`;
    hint = 'check the registry name and the guest DNS or proxy configuration';
  } else if (has('EAI_AGAIN')) {
    cause = `host not found (temporary DNS failure looking up ${host})`;
    hint = 'check the guest DNS or proxy configuration';
  } else if (has('UND_ERR_CONNECT_TIMEOUT', 'ETIMEDOUT')) {
    cause = `timed out connecting after ${timeouts.connect} ms`;
  } else if (has('UND_ERR_HEADERS_TIMEOUT')) {
    cause = `timed out waiting ${timeouts.headers} ms for response headers`;
  } else if (has('UND_ERR_BODY_TIMEOUT')) {
    cause = `timed out: no response body data for ${timeouts.body} ms`;
  } else if (has('ECONNRESET', 'EPIPE', 'UND_ERR_SOCKET', 'UND_ERR_CLOSED')) {
    cause = 'connection reset (closed by the other side)';
  } else if (has('UND_ERR_RES_CONTENT_LENGTH_MISMATCH')) {
    cause = 'response body shorter or longer than its Content-Length';
  } else if (has('EHOSTUNREACH', 'ENETUNREACH')) {
    cause = 'network unreachable';
  } else if (codes.some((c) => UNTRUSTED_CERT_CODES.has(c))) {
    cause = `the certificate of ${host} is not trusted (${codes.find((c) => UNTRUSTED_CERT_CODES.has(c))})`;
    hint = `add its CA (PEM) to [image] extra_root_certificates in cdh.toml`;
  } else if (has('CERT_HAS_EXPIRED', 'CERT_NOT_YET_VALID')) {
    cause = `the certificate of ${host} is expired or not yet valid`;
    hint = 'check the registry certificate and the guest clock';
  } else if (has('ERR_TLS_CERT_ALTNAME_INVALID')) {
    cause = `the certificate of ${host} does not name that host`;
    hint = 'use the host name the certificate was issued for';
  } else {
    const msg = e instanceof Error ? e.message : String(e);
    cause = `network error: ${msg.slice(0, 300)}${codes.length ? ` (${codes[0]})` : ''}`;
  }
  return new GuestpullError(ErrorCode.UNAVAILABLE, `cannot reach ${origin}: ${cause}; ${hint}`, { endpoint: origin }, { cause: e });
}
