/**
 * HTTP for registry traffic: undici dispatchers with explicit TLS trust, timeouts and keep-alive,
 * redirects followed by our own code (never https → http, Authorization only ever sent to the
 * origin it was meant for), and every network failure turned into a GuestpullError in words.
 * Which dispatcher serves a URL is decided in one place, `dispatcherFor`, where per-endpoint
 * proxies will plug in.
 */
import { PassThrough, Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { X509Certificate } from 'node:crypto';
import tls from 'node:tls';
import { Agent, type Dispatcher } from 'undici';
import { ErrorCode, GuestpullError } from '../../../errors.js';
import type { Logger } from '../../../log.js';
import { abortError, networkError, type TimeoutsMs } from './errors.js';
import { loggableUrl, REDIRECT_STATUSES, redirectTarget, sameOrigin } from './redirect.js';

export { networkError, abortError } from './errors.js';
export { redirectTarget, sameOrigin, loggableUrl } from './redirect.js';

export interface TransportOptions {
  /** PEM strings trusted in addition to the system roots (tls.rootCertificates). */
  extraRootCertificates?: string[];
  /** Default 30 000. */
  connectTimeoutMs?: number;
  /** Default 60 000. */
  headersTimeoutMs?: number;
  /** Longest idle time between body chunks; default 60 000. */
  bodyTimeoutMs?: number;
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
}

export interface HttpResponse {
  statusCode: number;
  headers: Record<string, string | string[] | undefined>;
  /** Errors on this stream are GuestpullErrors (UNAVAILABLE, CANCELLED) already. */
  body: Readable;
  /** Final URL after redirects. */
  url: string;
}

const DEFAULTS = { connect: 30_000, headers: 60_000, body: 60_000, maxRedirects: 5 };
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

/** Every entry must hold at least one PEM certificate, each of which parses (OpenSSL would skip bad ones silently). */
function checkCertificates(pems: string[]): void {
  pems.forEach((pem, i) => {
    const blocks = pem.match(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g) ?? [];
    try {
      if (blocks.length === 0) throw new Error('no BEGIN CERTIFICATE block');
      for (const b of blocks) new X509Certificate(b);
    } catch (e) {
      throw new GuestpullError(
        ErrorCode.CONFIG,
        `[image] extra_root_certificates entry ${i + 1} is not a usable PEM certificate: ${(e as Error).message}`,
      );
    }
  });
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
  private readonly agent: Agent;
  private readonly timeouts: TimeoutsMs;
  private readonly maxRedirects: number;
  private readonly userAgent: string;

  constructor(
    opts: TransportOptions,
    private readonly logger: Logger,
  ) {
    this.timeouts = {
      connect: opts.connectTimeoutMs ?? DEFAULTS.connect,
      headers: opts.headersTimeoutMs ?? DEFAULTS.headers,
      body: opts.bodyTimeoutMs ?? DEFAULTS.body,
    };
    this.maxRedirects = opts.maxRedirects ?? DEFAULTS.maxRedirects;
    this.userAgent = opts.userAgent ?? `guestpull/${opts.version ?? 'unknown'}`;
    const extra = opts.extraRootCertificates ?? [];
    checkCertificates(extra);
    this.agent = new Agent({
      connect: {
        timeout: this.timeouts.connect,
        ...(extra.length > 0 ? { ca: [...tls.rootCertificates, ...extra] } : {}),
      },
      headersTimeout: this.timeouts.headers,
      bodyTimeout: this.timeouts.body,
      keepAliveTimeout: 30_000,
      pipelining: 1,
      connections: 8,
    });
  }

  /** The dispatcher (connection policy: TLS trust, proxy) that serves `url`. */
  dispatcherFor(url: URL): Dispatcher {
    void url;
    return this.agent;
  }

  async request(req: HttpRequest): Promise<HttpResponse> {
    const started = performance.now();
    const original = parseHttpUrl(req.url);
    const signal = req.signal;
    let method = req.method ?? 'GET';
    let body = req.body;
    const baseHeaders: Record<string, string> = { 'user-agent': this.userAgent };
    for (const [k, v] of Object.entries(req.headers ?? {})) baseHeaders[k.toLowerCase()] = v;
    let url = original;
    for (let hop = 0; ; hop++) {
      if (signal?.aborted) throw abortError(signal, url.href);
      const headers = { ...baseHeaders };
      // Credentials belong to the origin they were given for; a redirect elsewhere gets none.
      if (!sameOrigin(url, original)) delete headers.authorization;
      if (body === undefined) delete headers['content-type'];
      let res: Dispatcher.ResponseData;
      try {
        res = await this.dispatcherFor(url).request({
          origin: url.origin,
          path: `${url.pathname}${url.search}`,
          method,
          headers,
          body: body ?? null,
          signal: signal ?? null,
        });
      } catch (e) {
        throw networkError(e, url.href, this.timeouts, signal);
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
      const finalUrl = url.href;
      this.logger.debug(
        { method, url: loggableUrl(url), status: res.statusCode, redirects: hop, ms: Math.round(performance.now() - started) },
        'http request',
      );
      const out = new MappedBody((e) => networkError(e, finalUrl, this.timeouts, signal));
      pipeline(res.body, out).catch(() => undefined);
      return { statusCode: res.statusCode, headers: res.headers, body: out, url: finalUrl };
    }
  }

  async close(): Promise<void> {
    await this.agent.close();
  }
}
