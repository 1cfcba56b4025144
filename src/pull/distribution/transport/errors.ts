/**
 * Network failures in words. Turns whatever undici or Node's net/tls layers throw (errno codes,
 * UND_ERR_* codes, TLS verification codes, a proxy's answer to CONNECT, aborts) into one
 * GuestpullError that names the endpoint's origin, the proxy when one was in the way, the cause a
 * person can act on, and what to do about it.
 */
import { ErrorCode, GuestpullError } from '../../../errors.js';
import { isProxySideError, isTunnelError } from './dispatchers.js';
import { effectivePort } from './noproxy.js';
import { proxyLabel } from './proxy.js';

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
 * The status a proxy answered to CONNECT when it was not 200, found in undici's error message
 * ("Proxy response (407) !== 200 when HTTP Tunneling") anywhere in the cause chain.
 */
export function connectStatus(e: unknown): number | undefined {
  let x: unknown = e;
  for (let depth = 0; depth < 6 && x instanceof Error; depth++) {
    const m = /Proxy response \((\d{3})\) !== 200/.exec(x.message);
    if (m) return Number(m[1]);
    x = x.cause;
  }
  return undefined;
}

interface Cause {
  cause: string;
  hint: string;
}

/** The cause in words for the connection to `host` (the registry's, or the proxy's). */
function describe(codes: string[], e: unknown, host: string, timeouts: TimeoutsMs, who: 'registry' | 'proxy'): Cause {
  const has = (...c: string[]): boolean => codes.some((x) => c.includes(x));
  const subject = who === 'proxy' ? `proxy ${host}` : host;
  let hint = 'check that the registry is up and reachable from the guest (proxy settings in [image] image_pull_proxy)';
  if (has('ECONNREFUSED')) return { cause: 'connection refused', hint };
  if (has('ENOTFOUND')) return { cause: `host not found (DNS lookup of ${host} failed)`, hint: 'check the registry name and the guest DNS or proxy configuration' };
  if (has('EAI_AGAIN')) return { cause: `host not found (temporary DNS failure looking up ${host})`, hint: 'check the guest DNS or proxy configuration' };
  if (has('UND_ERR_CONNECT_TIMEOUT', 'ETIMEDOUT')) return { cause: `timed out connecting after ${timeouts.connect} ms`, hint };
  if (has('UND_ERR_HEADERS_TIMEOUT')) return { cause: `stalled, timed out waiting ${timeouts.headers} ms for response headers (headers_timeout_secs)`, hint };
  if (has('UND_ERR_BODY_TIMEOUT')) return { cause: `stalled, timed out: no response body data for ${timeouts.body} ms (idle_timeout_secs)`, hint };
  if (has('UND_ERR_RES_CONTENT_LENGTH_MISMATCH')) return { cause: 'Content-Length mismatch: the response body is shorter or longer than announced', hint };
  if (has('ECONNRESET', 'EPIPE')) return { cause: 'connection reset (closed by the other side)', hint };
  if (has('UND_ERR_SOCKET', 'UND_ERR_CLOSED')) return { cause: 'connection reset (closed by the other side before the response was complete)', hint };
  if (has('EHOSTUNREACH', 'ENETUNREACH')) return { cause: 'network unreachable', hint };
  const untrusted = codes.find((c) => UNTRUSTED_CERT_CODES.has(c));
  if (untrusted) {
    hint = `add ${who === 'proxy' ? "the proxy's" : 'its'} CA (PEM) to [image] extra_root_certificates in cdh.toml`;
    return { cause: `the certificate of ${subject} is not trusted (${untrusted})`, hint };
  }
  if (has('CERT_HAS_EXPIRED', 'CERT_NOT_YET_VALID')) {
    return { cause: `the certificate of ${subject} is expired or not yet valid`, hint: `check the ${who} certificate and the guest clock` };
  }
  const msgText = e instanceof Error ? e.message : String(e);
  if (has('ERR_SSL_WRONG_VERSION_NUMBER') || /wrong version number/i.test(msgText)) {
    return {
      cause: `${subject} did not answer with TLS (it looks like a plain-HTTP server)`,
      hint:
        who === 'proxy'
          ? 'if the proxy speaks plain HTTP, write its URL as http://… in [image] image_pull_proxy'
          : 'if it is a plain-HTTP registry, list it in [image.registry_config] with insecure = true',
    };
  }
  if (has('ERR_TLS_CERT_ALTNAME_INVALID')) {
    return { cause: `the certificate of ${subject} does not name that host`, hint: 'use the host name the certificate was issued for' };
  }
  const msg = e instanceof Error ? e.message : String(e);
  return { cause: `network error: ${msg.slice(0, 300)}${codes.length ? ` (${codes[0]})` : ''}`, hint };
}

/** A failure on a route through `proxy`: the proxy's own fault, its answer to CONNECT, or the registry's behind it. */
function proxiedError(e: unknown, url: URL, proxy: URL, codes: string[], timeouts: TimeoutsMs): GuestpullError {
  const origin = url.origin;
  const via = proxyLabel(proxy);
  // What the CONNECT line named: host:port, the port always explicit.
  const target = `${url.hostname}:${effectivePort(url)}`;
  const key = `[image] image_pull_proxy.${url.protocol === 'https:' ? 'https_proxy' : 'http_proxy'}`;
  const ctx = { endpoint: origin, proxy: via };
  const opts = { cause: e };
  const status = connectStatus(e);
  if (status === 407) {
    const hint =
      proxy.username !== '' || proxy.password !== ''
        ? `the user:password in ${key} was refused; check them`
        : `put user:password in the proxy URL in ${key} (http://user:password@host:port)`;
    return new GuestpullError(ErrorCode.UNAUTHENTICATED, `proxy ${via} requires authentication (HTTP 407 to CONNECT ${target} for ${origin}); ${hint}`, ctx, opts);
  }
  if (status === 403) {
    return new GuestpullError(
      ErrorCode.PERMISSION_DENIED,
      `proxy ${via} refused to open a tunnel to ${origin} (HTTP 403 to CONNECT ${target}); allow CONNECT to ${target} in the proxy's access rules, ` +
        'or list the host in [image] image_pull_proxy.no_proxy if the guest may reach it directly',
      ctx,
      opts,
    );
  }
  if (status !== undefined) {
    return new GuestpullError(
      ErrorCode.UNAVAILABLE,
      `proxy ${via} could not open a tunnel to ${origin} (HTTP ${status} to CONNECT ${target}); check that the registry is up and reachable from the proxy`,
      ctx,
      opts,
    );
  }
  if (isProxySideError(e)) {
    const d = describe(codes, e, proxy.host, timeouts, 'proxy');
    const hint = d.hint.startsWith('add ') ? d.hint : `check ${key} and that the proxy is up and reachable from the guest`;
    return new GuestpullError(ErrorCode.UNAVAILABLE, `cannot connect to proxy ${via} (for ${origin}): ${d.cause}; ${hint}`, ctx, opts);
  }
  if (isTunnelError(e)) {
    const d = describe(codes, e, proxy.host, timeouts, 'proxy');
    return new GuestpullError(
      ErrorCode.UNAVAILABLE,
      `proxy ${via} failed while opening a tunnel to ${origin} (CONNECT ${target}): ${d.cause}; check ${key}, that the proxy is up and that it allows CONNECT to ${target}`,
      ctx,
      opts,
    );
  }
  const d = describe(codes, e, url.host, timeouts, 'registry');
  return new GuestpullError(ErrorCode.UNAVAILABLE, `cannot reach ${origin} through proxy ${via}: ${d.cause}; ${d.hint}`, ctx, opts);
}

/**
 * Map a failure of a request (or of reading its body) to `url` into a GuestpullError.
 * GuestpullErrors pass through; an aborted `signal` wins over whatever undici reported. `proxy` is
 * the proxy the request went through, if any.
 */
export function networkError(e: unknown, url: string, timeouts: TimeoutsMs, signal?: AbortSignal, proxy?: URL): GuestpullError {
  if (e instanceof GuestpullError) return e;
  if (signal?.aborted) return abortError(signal, url);
  const codes = errorCodes(e);
  if (proxy) {
    let u: URL | undefined;
    try {
      u = new URL(url);
    } catch {
      u = undefined;
    }
    if (u) return proxiedError(e, u, proxy, codes, timeouts);
  }
  const d = describe(codes, e, hostOf(url), timeouts, 'registry');
  return new GuestpullError(ErrorCode.UNAVAILABLE, `cannot reach ${originOf(url)}: ${d.cause}; ${d.hint}`, { endpoint: originOf(url) }, { cause: e });
}
