/**
 * HTTP for registry traffic: undici dispatchers with explicit TLS trust, timeouts and keep-alive,
 * the route (direct or through the configured proxy, see ./proxy.ts and ./dispatchers.ts) chosen
 * per request URL, redirects followed by our own code (never https → http, Authorization only ever
 * sent to the origin it was meant for), retries of idempotent requests (./retry.ts), and every
 * network failure turned into a GuestpullError in words.
 *
 * Defaults (DEFAULT_NETWORK in src/config, `[image]` keys in seconds): connect 30 s
 * (`connect_timeout_secs`, also bounds the TLS handshake through a tunnel), response headers 60 s
 * (`headers_timeout_secs`), body idle 60 s between chunks (`idle_timeout_secs`), 5 attempts per
 * request (`max_attempts`, the first included), backoff 200 ms doubling to 10 s with full jitter,
 * Retry-After honoured up to 60 s, at most 5 redirects.
 */
import { PassThrough, Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { X509Certificate } from 'node:crypto';
import tls from 'node:tls';
import type { Dispatcher } from './undici.js';
import { DEFAULT_NETWORK } from '../../../config/index.js';
import { ErrorCode, GuestpullError } from '../../../errors.js';
import type { Logger } from '../../../log.js';
import { Dispatchers } from './dispatchers.js';
import { abortError, networkError, type TimeoutsMs } from './errors.js';
import { proxyLabel, ProxyRouter, type ProxySettings, type Route } from './proxy.js';
import { loggableUrl, REDIRECT_STATUSES, redirectTarget, sameOrigin } from './redirect.js';
import { CLOSE_DELIMITED, DEFAULT_BACKOFF, parseRetryAfter, RETRY_STATUSES, retryDelay, retryReason, sleep, type BackoffOptions } from './retry.js';

export { networkError, abortError, connectStatus } from './errors.js';
export { redirectTarget, sameOrigin, loggableUrl } from './redirect.js';
export { ProxyRouter, proxyLabel, type ProxySettings, type Route } from './proxy.js';
export { parseNoProxy, noProxyMatches, type NoProxyRule } from './noproxy.js';
export { backoffDelay, parseRetryAfter, retryDelay, retryReason, sleep, RETRY_STATUSES, DEFAULT_BACKOFF, type BackoffOptions } from './retry.js';

export interface TransportOptions {
  /** PEM strings trusted in addition to the system roots (tls.rootCertificates), for registries and HTTPS proxies. */
  extraRootCertificates?: string[];
  /** `[image] image_pull_proxy`; nothing is read from the environment. */
  proxy?: ProxySettings;
  /** Default DEFAULT_NETWORK.connectTimeoutMs (30 000). */
  connectTimeoutMs?: number;
  /** Default DEFAULT_NETWORK.headersTimeoutMs (60 000). */
  headersTimeoutMs?: number;
  /** Longest idle time between body chunks; default DEFAULT_NETWORK.idleTimeoutMs (60 000). */
  bodyTimeoutMs?: number;
  /** Attempts per idempotent request, the first included; default DEFAULT_NETWORK.maxAttempts (5). 1 disables retries. */
  maxAttempts?: number;
  /** Backoff tuning (tests use small values). */
  backoff?: BackoffOptions;
  /** Default 5. */
  maxRedirects?: number;
  /** Default `guestpull/<version>`. */
  userAgent?: string;
  /** Used for the default user agent; the caller knows it, this module does not read package.json. */
  version?: string;
}

export interface HttpRequest {
  url: string;
  /** POST exists only for OAuth2 token requests (identity tokens); registry calls are GET/HEAD. */
  method?: 'GET' | 'HEAD' | 'POST';
  headers?: Record<string, string>;
  /** Request body (POST only), sent as is; set the content-type header yourself. */
  body?: string;
  signal?: AbortSignal;
  /** Retry on connection errors, 429 and 5xx; default true for GET and HEAD, always false for POST. */
  retry?: boolean;
}

export interface HttpResponse {
  statusCode: number;
  headers: Record<string, string | string[] | undefined>;
  /** Errors on this stream are GuestpullErrors (UNAVAILABLE, CANCELLED) already. */
  body: Readable;
  /** Final URL after redirects. */
  url: string;
}

const MAX_REDIRECTS = 5;
/** How much of a retried error response body we read before dropping the connection. */
const RETRY_DRAIN_BYTES = 64 * 1024;
/** How much of a redirect response body we read to keep the connection reusable. */
const REDIRECT_DRAIN_BYTES = 64 * 1024;

/** A pass-through whose errors are mapped once, whichever side of the pipeline failed. */
class MappedBody extends PassThrough {
  constructor(private readonly mapError: (e: unknown) => GuestpullError) {
    super();
  }
  override _destroy(err: Error | null, cb: (error: Error | null) => void): void {
    cb(err ? this.mapError(err) : null);
  }
}

/**
 * Every entry must hold at least one PEM certificate, each of which parses (OpenSSL would skip bad
 * ones silently). The index in the message is the TOML array index (from 0).
 */
function checkCertificates(pems: string[]): void {
  pems.forEach((pem, i) => {
    const blocks = pem.match(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g) ?? [];
    try {
      if (blocks.length === 0) throw new Error('no "-----BEGIN CERTIFICATE-----" … "-----END CERTIFICATE-----" block');
      for (const b of blocks) new X509Certificate(b);
    } catch (e) {
      throw new GuestpullError(
        ErrorCode.CONFIG,
        `[image] extra_root_certificates[${i}]: not a PEM certificate: ${(e as Error).message}; fix or remove that entry in cdh.toml`,
      );
    }
  });
}

/** Read and drop at most `limit` bytes of a body we will not use, then release it. */
async function drain(body: Readable, limit: number): Promise<void> {
  let seen = 0;
  try {
    for await (const chunk of body) {
      seen += (chunk as Buffer).length;
      if (seen > limit) break;
    }
  } catch {
    // The body failing is no reason to fail the retry.
  } finally {
    body.destroy();
  }
}

function parseHttpUrl(url: string): URL {
  let u: URL;
  try {
    u = new URL(url);
  } catch {
    throw new GuestpullError(ErrorCode.CONFIG, `invalid URL ${JSON.stringify(loggableUrl(url))}`);
  }
  if (u.protocol !== 'http:' && u.protocol !== 'https:') {
    throw new GuestpullError(ErrorCode.CONFIG, `unsupported URL scheme in ${loggableUrl(u)}: only http and https`);
  }
  return u;
}

export class Transport {
  /** Attempts per idempotent request, the first included (also the resume budget of a blob download). */
  readonly maxAttempts: number;
  private readonly dispatchers: Dispatchers;
  private readonly router: ProxyRouter;
  private readonly timeouts: TimeoutsMs;
  private readonly backoffOpts: Required<BackoffOptions>;
  private readonly maxRedirects: number;
  private readonly userAgent: string;
  /** Origins whose route has been logged. */
  private readonly routesLogged = new Set<string>();

  constructor(
    opts: TransportOptions,
    private readonly logger: Logger,
  ) {
    this.timeouts = {
      connect: opts.connectTimeoutMs ?? DEFAULT_NETWORK.connectTimeoutMs,
      headers: opts.headersTimeoutMs ?? DEFAULT_NETWORK.headersTimeoutMs,
      body: opts.bodyTimeoutMs ?? DEFAULT_NETWORK.idleTimeoutMs,
    };
    this.maxAttempts = Math.max(1, Math.floor(opts.maxAttempts ?? DEFAULT_NETWORK.maxAttempts));
    this.backoffOpts = { ...DEFAULT_BACKOFF, ...opts.backoff };
    this.maxRedirects = opts.maxRedirects ?? MAX_REDIRECTS;
    this.userAgent = opts.userAgent ?? `guestpull/${opts.version ?? 'unknown'}`;
    const extra = opts.extraRootCertificates ?? [];
    checkCertificates(extra);
    this.router = new ProxyRouter(opts.proxy);
    this.dispatchers = new Dispatchers({
      timeouts: this.timeouts,
      ca: extra.length > 0 ? [...tls.rootCertificates, ...extra] : undefined,
    });
  }

  /** The route (direct or via a proxy) for `url`. */
  routeFor(url: URL): Route {
    return this.router.routeFor(url);
  }

  /** The dispatcher (connection policy: TLS trust, proxy) that serves `url`. */
  dispatcherFor(url: URL): Dispatcher {
    return this.dispatchers.for(this.routeFor(url));
  }

  /** Delay before retry number `retry` (1 = first retry), honouring a server's Retry-After (ms). */
  backoff(retry: number, retryAfterMs?: number): number {
    return retryDelay(retry, retryAfterMs, this.backoffOpts);
  }

  /**
   * One request, following redirects, retried (GET/HEAD) on connection errors, 429 and 5xx up to
   * `maxAttempts` in all. After the last attempt a 429/5xx response is returned as it is, for the
   * caller to quote; errors on the returned body are not retried here (see RegistryClient.getBlob).
   */
  async request(req: HttpRequest): Promise<HttpResponse> {
    const method = req.method ?? 'GET';
    const attempts = method !== 'POST' && req.retry !== false ? this.maxAttempts : 1;
    const signal = req.signal;
    for (let attempt = 1; ; attempt++) {
      let reason: string;
      let retryAfterMs: number | undefined;
      try {
        const res = await this.attempt(req);
        if (attempt >= attempts || !RETRY_STATUSES.has(res.statusCode)) return res;
        reason = `HTTP ${res.statusCode}`;
        retryAfterMs = parseRetryAfter(res.headers['retry-after']);
        await drain(res.body, RETRY_DRAIN_BYTES);
      } catch (e) {
        const why = retryReason(e);
        if (attempt >= attempts || why === undefined || signal?.aborted) throw e;
        reason = why;
      }
      const delayMs = this.backoff(attempt, retryAfterMs);
      this.logger.info(
        { url: loggableUrl(req.url), method, attempt, maxAttempts: attempts, reason, delayMs, ...(retryAfterMs !== undefined ? { retryAfterMs } : {}) },
        'retrying request',
      );
      await sleep(delayMs, signal, req.url);
    }
  }

  /** One attempt: the request and its redirects. */
  private async attempt(req: HttpRequest): Promise<HttpResponse> {
    const started = performance.now();
    const original = parseHttpUrl(req.url);
    const signal = req.signal;
    let method = req.method ?? 'GET';
    let body = req.body;
    const baseHeaders: Record<string, string> = { 'user-agent': this.userAgent };
    for (const [k, v] of Object.entries(req.headers ?? {})) baseHeaders[k.toLowerCase()] = v;
    // Proxy credentials come from the proxy URL and go on CONNECT only, never to an origin.
    delete baseHeaders['proxy-authorization'];
    let url = original;
    for (let hop = 0; ; hop++) {
      if (signal?.aborted) throw abortError(signal, url.href);
      const headers = { ...baseHeaders };
      // Credentials belong to the origin they were given for; a redirect elsewhere gets none.
      if (!sameOrigin(url, original)) delete headers.authorization;
      if (body === undefined) delete headers['content-type'];
      const route = this.routeFor(url);
      const proxy = route.kind === 'proxy' ? route.proxy : undefined;
      this.logRoute(url, route);
      let res: Dispatcher.ResponseData;
      try {
        res = await this.dispatchers.for(route).request({
          origin: url.origin,
          path: `${url.pathname}${url.search}`,
          method,
          headers,
          body: body ?? null,
          signal: signal ?? null,
        });
      } catch (e) {
        throw networkError(e, url.href, this.timeouts, signal, proxy);
      }
      const location = res.headers.location;
      if (REDIRECT_STATUSES.has(res.statusCode) && typeof location === 'string' && location !== '') {
        await res.body.dump({ limit: REDIRECT_DRAIN_BYTES }).catch(() => undefined);
        if (hop >= this.maxRedirects) {
          throw new GuestpullError(
            ErrorCode.UNAVAILABLE,
            `too many redirects (more than ${this.maxRedirects}) starting at ${loggableUrl(original)}, last at ${loggableUrl(url)}`,
            { endpoint: original.origin },
          );
        }
        const next = redirectTarget(url, location);
        if (method === 'POST' && res.statusCode !== 307 && res.statusCode !== 308) {
          method = 'GET';
          body = undefined;
        }
        url = next;
        continue;
      }
      if (closeDelimited(method, res)) {
        // undici asserts (and takes the process down) when such a connection closes while the
        // parser is paused for backpressure (nodejs/undici#5360, fixed only in undici 8), and any
        // registry or proxy can send one: refuse it before a byte is read. Retried: a proxy's
        // next answer may be framed.
        res.body.destroy();
        throw new GuestpullError(
          ErrorCode.UNAVAILABLE,
          `${loggableUrl(url)} answered HTTP ${res.statusCode} with a body that ends only when the connection closes (no Content-Length, not chunked); ` +
            'guestpull does not read such bodies; make the registry or proxy send Content-Length or chunked responses',
          { endpoint: url.origin },
          { cause: Object.assign(new Error('response body delimited by connection close'), { code: CLOSE_DELIMITED }) },
        );
      }
      const finalUrl = url.href;
      this.logger.debug(
        { method, url: loggableUrl(url), status: res.statusCode, redirects: hop, ms: Math.round(performance.now() - started) },
        'http request',
      );
      const out = new MappedBody((e) => networkError(e, finalUrl, this.timeouts, signal, proxy));
      pipeline(res.body, out).catch(() => undefined);
      return { statusCode: res.statusCode, headers: res.headers, body: out, url: finalUrl };
    }
  }

  private logRoute(url: URL, route: Route): void {
    if (this.routesLogged.has(url.origin)) return;
    this.routesLogged.add(url.origin);
    if (route.kind === 'direct') this.logger.debug({ origin: url.origin, route: 'direct' }, 'route to registry: direct');
    else this.logger.debug({ origin: url.origin, route: 'proxy', proxy: proxyLabel(route.proxy) }, `route to registry: via proxy ${proxyLabel(route.proxy)}`);
  }

  async close(): Promise<void> {
    await this.dispatchers.close();
  }
}

/** A response whose body is framed only by the connection closing: no Content-Length, not chunked. */
export function closeDelimited(method: string, res: { statusCode: number; headers: Record<string, string | string[] | undefined> }): boolean {
  if (method === 'HEAD' || res.statusCode < 200 || res.statusCode === 204 || res.statusCode === 304) return false;
  if (res.headers['content-length'] !== undefined) return false;
  const te = res.headers['transfer-encoding'];
  const teText = Array.isArray(te) ? te.join(',') : (te ?? '');
  return !/\bchunked\b/i.test(teText);
}
