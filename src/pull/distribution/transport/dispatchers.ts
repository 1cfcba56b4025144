/**
 * The undici dispatchers behind each route, built once and cached: one `Agent` for direct
 * connections and one `ProxyAgent` per proxy URL. Every proxied origin, https or http, is reached
 * through a CONNECT tunnel (`proxyTunnel: true`), so only the CONNECT line and, when the proxy URL
 * carries user:password, `Proxy-Authorization` are visible to the proxy; the registry's own headers
 * travel inside the tunnel (inside TLS for https registries). Trust: system roots plus
 * `extra_root_certificates` for registries (direct and tunnelled: `requestTls`) and for HTTPS
 * proxies (`proxyTls`). Errors raised while connecting to the proxy itself, or while it is asked
 * to open a tunnel, are remembered so the messages can blame the proxy rather than the registry.
 */
import net from 'node:net';
import { Agent, buildConnector, Pool, ProxyAgent, type BuildConnector, type Dispatcher } from './undici.js';
import type { TimeoutsMs } from './errors.js';
import type { Route } from './proxy.js';

/** Errors raised while connecting (TCP or TLS) to a proxy, as opposed to the registry behind it. */
const proxySideErrors = new WeakSet<object>();

/** Errors of the CONNECT exchange with a proxy (reset, closed or stalled before it answered). */
const tunnelErrors = new WeakSet<object>();

function inChain(set: WeakSet<object>, e: unknown): boolean {
  let x: unknown = e;
  for (let depth = 0; depth < 6 && typeof x === 'object' && x !== null; depth++) {
    if (set.has(x)) return true;
    x = x instanceof Error ? x.cause : undefined;
  }
  return false;
}

/** Was `e` (or anything in its cause chain) raised connecting to a proxy? */
export function isProxySideError(e: unknown): boolean {
  return inChain(proxySideErrors, e);
}

/** Was `e` raised while a proxy was asked to open a tunnel (before it answered the CONNECT)? */
export function isTunnelError(e: unknown): boolean {
  return inChain(tunnelErrors, e);
}

/** The pool to a proxy, with the failures of its CONNECT requests remembered as the proxy's. */
function markTunnelErrors(pool: Pool): Pool {
  const connect = pool.connect.bind(pool);
  const marked = async (options: Dispatcher.ConnectOptions): Promise<Dispatcher.ConnectData> => {
    try {
      return await connect(options);
    } catch (e) {
      if (typeof e === 'object' && e !== null) tunnelErrors.add(e);
      throw e;
    }
  };
  // ProxyAgent opens each tunnel with `await pool.connect(options)`.
  return Object.assign(pool, { connect: marked });
}

export interface DispatcherOptions {
  timeouts: TimeoutsMs;
  /** `[...tls.rootCertificates, ...extra]`, or undefined for Node's default roots. */
  ca: string[] | undefined;
}

const POOL = { keepAliveTimeout: 30_000, pipelining: 1, connections: 8 } as const;

/** `Basic base64(user:password)` from a URL's (percent-encoded) userinfo, or undefined. */
export function proxyAuthorization(proxy: URL): string | undefined {
  if (proxy.username === '' && proxy.password === '') return undefined;
  const user = decodeURIComponent(proxy.username);
  const pass = decodeURIComponent(proxy.password);
  return `Basic ${Buffer.from(`${user}:${pass}`).toString('base64')}`;
}

export class Dispatchers {
  private direct: Agent | undefined;
  private readonly proxies = new Map<string, ProxyAgent>();

  constructor(private readonly opts: DispatcherOptions) {}

  for(route: Route): Dispatcher {
    if (route.kind === 'direct') return (this.direct ??= this.directAgent());
    const key = route.proxy.href;
    let agent = this.proxies.get(key);
    if (!agent) {
      agent = this.proxyAgent(route.proxy);
      this.proxies.set(key, agent);
    }
    return agent;
  }

  async close(): Promise<void> {
    const all: Dispatcher[] = [...this.proxies.values(), ...(this.direct ? [this.direct] : [])];
    this.proxies.clear();
    this.direct = undefined;
    await Promise.all(all.map((d) => d.close()));
  }

  private tlsOptions(): { timeout: number; ca?: string[] } {
    return { timeout: this.opts.timeouts.connect, ...(this.opts.ca ? { ca: this.opts.ca } : {}) };
  }

  private directAgent(): Agent {
    return new Agent({
      connect: this.tlsOptions(),
      headersTimeout: this.opts.timeouts.headers,
      bodyTimeout: this.opts.timeouts.body,
      ...POOL,
    });
  }

  private proxyAgent(proxy: URL): ProxyAgent {
    const uri = new URL(proxy.href);
    uri.username = '';
    uri.password = '';
    const token = proxyAuthorization(proxy);
    const tlsOpts = this.tlsOptions();
    // Our own connector to the proxy: the same TLS trust, no IP-address SNI (RFC 6066), and every
    // failure marked as the proxy's.
    const toProxy = buildConnector(tlsOpts);
    const connect: BuildConnector.connector = (o, cb) => {
      // '' lets undici derive the name from the host, which it leaves empty for IP addresses.
      const servername = o.servername !== undefined && net.isIP(o.servername) === 0 ? o.servername : '';
      toProxy({ ...o, servername }, (...args) => {
        const err = args[0];
        if (err) proxySideErrors.add(err);
        cb(...args);
      });
    };
    return new ProxyAgent({
      uri: uri.href,
      ...(token !== undefined ? { token } : {}),
      proxyTunnel: true,
      proxyTls: tlsOpts,
      requestTls: tlsOpts,
      clientFactory: (origin: URL) => markTunnelErrors(new Pool(origin, { connect, headersTimeout: this.opts.timeouts.headers, connections: POOL.connections })),
      headersTimeout: this.opts.timeouts.headers,
      bodyTimeout: this.opts.timeouts.body,
      ...POOL,
    });
  }
}
