/**
 * Which route a request takes, decided only from the configuration (`[image] image_pull_proxy`;
 * environment variables play no part): an https origin goes through `https_proxy`, an http origin
 * through `http_proxy`, and straight to the origin when `no_proxy` matches or no proxy is set for
 * that scheme. Pure: building the dispatchers for a route is ./dispatchers.ts's job.
 */
import { ErrorCode, GuestpullError } from '../../../errors.js';
import { effectivePort, noProxyMatches, parseNoProxy, type NoProxyRule } from './noproxy.js';

export interface ProxySettings {
  /** Proxy for https registries, e.g. `http://user:pass@10.0.0.1:3128` or `https://proxy:3129`. */
  httpsProxy?: string;
  /** Proxy for plain-http registries (`insecure = true`); reached with CONNECT as well. */
  httpProxy?: string;
  /** Comma list, see ./noproxy.ts. */
  noProxy?: string;
}

export type Route = { kind: 'direct' } | { kind: 'proxy'; proxy: URL };

/** How a proxy is named in messages and logs: scheme, host and port, never the credentials. */
export function proxyLabel(proxy: URL): string {
  return `${proxy.protocol}//${proxy.host}`;
}

/** The proxy URL, or a CONFIG error naming the key. Userinfo is kept: it becomes Proxy-Authorization. */
function parseProxyUrl(value: string, key: string): URL {
  let u: URL;
  try {
    u = new URL(value);
  } catch {
    throw new GuestpullError(ErrorCode.CONFIG, `[image] image_pull_proxy.${key}: not a URL; expected e.g. "http://10.0.0.1:3128"`);
  }
  const shown = proxyLabel(u);
  if (u.protocol !== 'http:' && u.protocol !== 'https:') {
    throw new GuestpullError(ErrorCode.CONFIG, `[image] image_pull_proxy.${key}: ${shown} is not an http:// or https:// proxy URL`);
  }
  if (u.hostname === '' || (u.pathname !== '/' && u.pathname !== '') || u.search !== '' || u.hash !== '') {
    throw new GuestpullError(ErrorCode.CONFIG, `[image] image_pull_proxy.${key}: ${shown} must be scheme://[user:password@]host[:port] with no path or query`);
  }
  return u;
}

export class ProxyRouter {
  private readonly https: URL | undefined;
  private readonly http: URL | undefined;
  private readonly noProxy: NoProxyRule[];

  constructor(settings: ProxySettings = {}) {
    this.https = settings.httpsProxy ? parseProxyUrl(settings.httpsProxy, 'https_proxy') : undefined;
    this.http = settings.httpProxy ? parseProxyUrl(settings.httpProxy, 'http_proxy') : undefined;
    const parsed = parseNoProxy(settings.noProxy ?? '');
    if (parsed.invalid.length > 0) {
      throw new GuestpullError(
        ErrorCode.CONFIG,
        `[image] image_pull_proxy.no_proxy: ${parsed.invalid.map((e) => JSON.stringify(e.slice(0, 100))).join(', ')} ` +
          'not understood; use host names, .domain or *.domain, IP addresses, CIDR ranges, optionally with :port, or * alone',
      );
    }
    this.noProxy = parsed.rules;
  }

  /** True when any proxy is configured. */
  get enabled(): boolean {
    return this.https !== undefined || this.http !== undefined;
  }

  routeFor(url: URL): Route {
    const proxy = url.protocol === 'https:' ? this.https : url.protocol === 'http:' ? this.http : undefined;
    if (!proxy) return { kind: 'direct' };
    if (noProxyMatches(this.noProxy, url.hostname, effectivePort(url))) return { kind: 'direct' };
    return { kind: 'proxy', proxy };
  }
}
