/**
 * Transport through a proxy: a tiny CONNECT proxy written here (plain or TLS, optionally
 * demanding Basic credentials, refusing or failing chosen targets) records every CONNECT and
 * every non-tunnelled request it sees; tiny origins record the headers they receive. Asserted:
 * which route each request takes (proxy by scheme, no_proxy, never the environment), that https
 * and http origins are both tunnelled, that Proxy-Authorization goes on CONNECT only and
 * Authorization only to the origin, HTTPS proxies with their own CA, errors naming the proxy,
 * and redirects through the proxy.
 */
import http from 'node:http';
import https from 'node:https';
import net from 'node:net';
import type { AddressInfo } from 'node:net';
import { Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { pino } from 'pino';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { ErrorCode, GuestpullError } from '../../src/errors.js';
import { silentLogger, type Logger } from '../../src/log.js';
import { Transport, type TransportOptions } from '../../src/pull/distribution/transport/index.js';
import { createPki, issueServerCert, makeCa, type CertFiles, type Pki } from '../helpers/tls.js';

const cleanups: Array<() => Promise<void>> = [];
afterEach(async () => {
  while (cleanups.length) await cleanups.pop()!();
});

let pki: Pki;
let proxyCa: CertFiles;
let proxyCert: CertFiles;
beforeAll(() => {
  pki = createPki('guestpull-proxy-pki-');
  proxyCa = makeCa(pki.dir, 'proxy-ca');
  proxyCert = issueServerCert(proxyCa, pki.dir, 'proxy');
});
afterAll(() => pki.cleanup());

interface Seen {
  method: string;
  url: string;
  headers: http.IncomingHttpHeaders;
}

interface Origin {
  url: string;
  seen: Seen[];
}

async function listen(server: http.Server | https.Server): Promise<number> {
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  cleanups.push(async () => {
    server.closeAllConnections();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  });
  return (server.address() as AddressInfo).port;
}

async function origin(handler: (req: http.IncomingMessage, res: http.ServerResponse) => void, tls?: CertFiles): Promise<Origin> {
  const seen: Seen[] = [];
  const h = (req: http.IncomingMessage, res: http.ServerResponse): void => {
    seen.push({ method: req.method ?? '', url: req.url ?? '', headers: req.headers });
    handler(req, res);
  };
  const server = tls ? https.createServer({ cert: tls.cert, key: tls.key }, h) : http.createServer(h);
  const port = await listen(server);
  return { url: `${tls ? 'https' : 'http'}://127.0.0.1:${port}`, seen };
}

interface FakeProxy {
  /** http(s)://127.0.0.1:PORT */
  url: string;
  connects: Array<{ target: string; headers: http.IncomingHttpHeaders }>;
  /** Requests that were not CONNECT (absolute-form GETs and the like). */
  plain: Seen[];
}

interface FakeProxyOptions {
  /** Required Proxy-Authorization value; 407 otherwise. */
  auth?: string;
  /** A status to answer CONNECT with instead of opening the tunnel. */
  refuse?: (target: string) => number | undefined;
  tls?: CertFiles;
}

async function fakeProxy(opts: FakeProxyOptions = {}): Promise<FakeProxy> {
  const connects: FakeProxy['connects'] = [];
  const plain: Seen[] = [];
  const sockets = new Set<net.Socket>();
  const onRequest = (req: http.IncomingMessage, res: http.ServerResponse): void => {
    plain.push({ method: req.method ?? '', url: req.url ?? '', headers: req.headers });
    res.writeHead(502).end('this proxy only tunnels');
  };
  const server = opts.tls ? https.createServer({ cert: opts.tls.cert, key: opts.tls.key }, onRequest) : http.createServer(onRequest);
  server.on('connect', (req: http.IncomingMessage, client: net.Socket, head: Buffer) => {
    const target = req.url ?? '';
    connects.push({ target, headers: req.headers });
    sockets.add(client);
    client.on('error', () => undefined);
    const answer = (status: number, extra = ''): void => {
      client.end(`HTTP/1.1 ${status} ${http.STATUS_CODES[status] ?? ''}\r\n${extra}Content-Length: 0\r\nConnection: close\r\n\r\n`);
    };
    if (opts.auth !== undefined && req.headers['proxy-authorization'] !== opts.auth) {
      answer(407, 'Proxy-Authenticate: Basic realm="fake"\r\n');
      return;
    }
    const refused = opts.refuse?.(target);
    if (refused !== undefined) {
      answer(refused);
      return;
    }
    const m = /^(.+):(\d+)$/.exec(target);
    const upstream = net.connect(Number(m?.[2] ?? 0), m?.[1] ?? '');
    sockets.add(upstream);
    upstream.once('error', () => answer(503));
    upstream.once('connect', () => {
      client.write('HTTP/1.1 200 Connection Established\r\n\r\n');
      if (head.length) upstream.write(head);
      pipeline(client, upstream).catch(() => undefined);
      pipeline(upstream, client).catch(() => undefined);
    });
  });
  const port = await listen(server);
  cleanups.push(async () => {
    for (const s of sockets) s.destroy();
  });
  return { url: `${opts.tls ? 'https' : 'http'}://127.0.0.1:${port}`, connects, plain };
}

function transport(opts: TransportOptions = {}, logger: Logger = silentLogger()): Transport {
  const t = new Transport({ backoff: { baseDelayMs: 1, maxDelayMs: 5 }, ...opts }, logger);
  cleanups.push(() => t.close());
  return t;
}

async function text(body: NodeJS.ReadableStream): Promise<string> {
  let s = '';
  for await (const c of body) s += (c as Buffer).toString('utf8');
  return s;
}

async function rejection(p: Promise<unknown>): Promise<GuestpullError> {
  try {
    await p;
  } catch (e) {
    expect(e).toBeInstanceOf(GuestpullError);
    return e as GuestpullError;
  }
  throw new Error('expected a rejection');
}

async function closedPort(): Promise<number> {
  const s = net.createServer();
  await new Promise<void>((resolve) => s.listen(0, '127.0.0.1', resolve));
  const { port } = s.address() as AddressInfo;
  await new Promise<void>((resolve) => s.close(() => resolve()));
  return port;
}

function hostOf(url: string): string {
  return new URL(url).host;
}

const basic = (user: string, pass: string): string => `Basic ${Buffer.from(`${user}:${pass}`).toString('base64')}`;

describe('route and credentials', () => {
  it('tunnels an https registry through https_proxy: Proxy-Authorization on CONNECT only, Authorization only inside', async () => {
    const reg = await origin((_req, res) => res.end('over tls'), pki.server);
    const proxy = await fakeProxy({ auth: basic('proxy user', 'p@ss:word') });
    const proxyUrl = new URL(proxy.url);
    proxyUrl.username = encodeURIComponent('proxy user');
    proxyUrl.password = encodeURIComponent('p@ss:word');
    const t = transport({ extraRootCertificates: [pki.ca.cert], proxy: { httpsProxy: proxyUrl.href } });
    for (let i = 0; i < 2; i++) {
      const res = await t.request({ url: `${reg.url}/v2/`, headers: { Authorization: 'Bearer registry-token' } });
      expect(await text(res.body)).toBe('over tls');
    }
    // Every tunnel goes to the registry and carries the proxy's credentials, and only those.
    expect(proxy.connects.length).toBeGreaterThanOrEqual(1);
    for (const c of proxy.connects) {
      expect(c.target).toBe(hostOf(reg.url));
      expect(c.headers['proxy-authorization']).toBe(basic('proxy user', 'p@ss:word'));
      expect(c.headers.authorization).toBeUndefined();
    }
    expect(proxy.plain).toEqual([]);
    expect(reg.seen).toHaveLength(2);
    for (const s of reg.seen) {
      expect(s.headers.authorization).toBe('Bearer registry-token');
      expect(s.headers['proxy-authorization']).toBeUndefined();
    }
  });

  it('tunnels a plain-http registry through http_proxy with CONNECT too (nothing crosses the proxy in clear)', async () => {
    const reg = await origin((_req, res) => res.end('plain'));
    const proxy = await fakeProxy({ auth: basic('u', 'pw') });
    const t = transport({ proxy: { httpProxy: proxy.url.replace('http://', 'http://u:pw@'), httpsProxy: 'http://127.0.0.1:9' } });
    const res = await t.request({ url: `${reg.url}/v2/x`, headers: { authorization: 'Basic cmVnOnNlY3JldA==', 'proxy-authorization': 'Basic bGVhaw==' } });
    expect(await text(res.body)).toBe('plain');
    expect(proxy.plain).toEqual([]);
    expect(proxy.connects.map((c) => c.target)).toEqual([hostOf(reg.url)]);
    expect(proxy.connects[0]!.headers['proxy-authorization']).toBe(basic('u', 'pw'));
    expect(proxy.connects[0]!.headers.authorization).toBeUndefined();
    expect(reg.seen[0]!.headers.authorization).toBe('Basic cmVnOnNlY3JldA==');
    // A caller's own Proxy-Authorization is dropped, never forwarded to the origin.
    expect(reg.seen[0]!.headers['proxy-authorization']).toBeUndefined();
  });

  it('goes direct for hosts matched by no_proxy, and for schemes without a proxy', async () => {
    const https1 = await origin((_req, res) => res.end('a'), pki.server);
    const plain = await origin((_req, res) => res.end('b'));
    const proxy = await fakeProxy();
    const t = transport({ extraRootCertificates: [pki.ca.cert], proxy: { httpsProxy: proxy.url, noProxy: `example.com, ${hostOf(https1.url)}` } });
    expect(await text((await t.request({ url: `${https1.url}/v2/` })).body)).toBe('a');
    expect(await text((await t.request({ url: `${plain.url}/v2/` })).body)).toBe('b');
    expect(proxy.connects).toEqual([]);
    expect(proxy.plain).toEqual([]);
    const u = new URL(https1.url);
    expect(t.routeFor(u).kind).toBe('direct');
    expect(t.routeFor(new URL(`https://127.0.0.1:${Number(u.port) + 1}/`)).kind).toBe('proxy');
  });

  it('ignores proxy environment variables entirely', async () => {
    const reg = await origin((_req, res) => res.end('direct'));
    const proxy = await fakeProxy();
    const saved = { ...process.env };
    Object.assign(process.env, { HTTP_PROXY: proxy.url, http_proxy: proxy.url, HTTPS_PROXY: proxy.url, https_proxy: proxy.url, NO_PROXY: '', no_proxy: '' });
    try {
      const res = await transport().request({ url: `${reg.url}/v2/` });
      expect(await text(res.body)).toBe('direct');
    } finally {
      for (const k of ['HTTP_PROXY', 'http_proxy', 'HTTPS_PROXY', 'https_proxy', 'NO_PROXY', 'no_proxy']) {
        if (saved[k] === undefined) delete process.env[k];
        else process.env[k] = saved[k];
      }
    }
    expect(proxy.connects).toEqual([]);
    expect(proxy.plain).toEqual([]);
    expect(reg.seen).toHaveLength(1);
  });

  it('logs the route once per origin at debug, naming the proxy without its credentials', async () => {
    const lines: string[] = [];
    const logger = pino({ level: 'debug' }, new Writable({ write: (c: Buffer, _e, cb) => (lines.push(c.toString()), cb()) }));
    const reg = await origin((_req, res) => res.end('x'));
    const proxy = await fakeProxy();
    const t = transport({ proxy: { httpProxy: proxy.url.replace('http://', 'http://alice:hunter2@') } }, logger);
    for (let i = 0; i < 3; i++) await text((await t.request({ url: `${reg.url}/v2/${i}` })).body);
    const routes = lines.map((l) => JSON.parse(l) as Record<string, unknown>).filter((e) => String(e.msg).startsWith('route to registry'));
    expect(routes).toEqual([expect.objectContaining({ origin: reg.url, route: 'proxy', proxy: proxy.url, msg: `route to registry: via proxy ${proxy.url}` })]);
    expect(lines.join('')).not.toContain('hunter2');
    expect(lines.join('')).not.toContain('alice');
  });
});

describe('proxy failures', () => {
  it('names an unreachable proxy and the origin, and never its credentials', async () => {
    const port = await closedPort();
    const t = transport({ maxAttempts: 2, proxy: { httpsProxy: `http://bob:s3cret@127.0.0.1:${port}` } });
    const err = await rejection(t.request({ url: 'https://registry.example.test/v2/' }));
    expect(err.code).toBe(ErrorCode.UNAVAILABLE);
    expect(err.message).toBe(
      `cannot connect to proxy http://127.0.0.1:${port} (for https://registry.example.test): connection refused; ` +
        'check [image] image_pull_proxy.https_proxy and that the proxy is up and reachable from the guest',
    );
    expect(err.context).toMatchObject({ endpoint: 'https://registry.example.test', proxy: `http://127.0.0.1:${port}` });
  });

  it('407 without credentials: UNAUTHENTICATED naming the proxy, not retried', async () => {
    const proxy = await fakeProxy({ auth: basic('u', 'right') });
    const err = await rejection(transport({ proxy: { httpsProxy: proxy.url } }).request({ url: 'https://registry.example.test/v2/' }));
    expect(err.code).toBe(ErrorCode.UNAUTHENTICATED);
    expect(err.message).toContain(`proxy ${proxy.url} requires authentication (HTTP 407 to CONNECT registry.example.test:443`);
    expect(err.message).toContain('put user:password in the proxy URL in [image] image_pull_proxy.https_proxy');
    expect(proxy.connects).toHaveLength(1);
  });

  it('407 with wrong credentials says they were refused', async () => {
    const proxy = await fakeProxy({ auth: basic('u', 'right') });
    const t = transport({ proxy: { httpProxy: proxy.url.replace('http://', 'http://u:wrong@') } });
    const err = await rejection(t.request({ url: 'http://127.0.0.1:5000/v2/' }));
    expect(err.code).toBe(ErrorCode.UNAUTHENTICATED);
    expect(err.message).toContain('the user:password in [image] image_pull_proxy.http_proxy was refused');
    expect(err.message).not.toContain('wrong');
    expect(proxy.connects[0]!.headers['proxy-authorization']).toBe(basic('u', 'wrong'));
  });

  it('CONNECT refused (403): PERMISSION_DENIED naming proxy and origin, not retried', async () => {
    const proxy = await fakeProxy({ refuse: () => 403 });
    const err = await rejection(transport({ proxy: { httpsProxy: proxy.url } }).request({ url: 'https://blocked.example.test:8443/v2/' }));
    expect(err.code).toBe(ErrorCode.PERMISSION_DENIED);
    expect(err.message).toContain(`proxy ${proxy.url} refused to open a tunnel to https://blocked.example.test:8443`);
    expect(err.message).toContain('no_proxy');
    expect(proxy.connects).toHaveLength(1);
  });

  it('a proxy that cannot reach the registry (503 to CONNECT) is retried, then UNAVAILABLE naming both', async () => {
    const proxy = await fakeProxy();
    const port = await closedPort();
    const err = await rejection(transport({ maxAttempts: 3, proxy: { httpProxy: proxy.url } }).request({ url: `http://127.0.0.1:${port}/v2/` }));
    expect(err.code).toBe(ErrorCode.UNAVAILABLE);
    expect(err.message).toBe(
      `proxy ${proxy.url} could not open a tunnel to http://127.0.0.1:${port} (HTTP 503 to CONNECT 127.0.0.1:${port}); ` +
        'check that the registry is up and reachable from the proxy',
    );
    expect(proxy.connects).toHaveLength(3);
  });

  it('an untrusted registry certificate behind the tunnel names the registry, the proxy and the option', async () => {
    const reg = await origin((_req, res) => res.end('x'), pki.server);
    const proxy = await fakeProxy();
    const err = await rejection(transport({ proxy: { httpsProxy: proxy.url } }).request({ url: `${reg.url}/v2/` }));
    expect(err.code).toBe(ErrorCode.UNAVAILABLE);
    expect(err.message).toMatch(
      new RegExp(`^cannot reach ${reg.url} through proxy ${proxy.url}: the certificate of ${hostOf(reg.url)} is not trusted \\(\\w+\\); add its CA \\(PEM\\) to \\[image\\] extra_root_certificates`),
    );
    expect(proxy.connects).toHaveLength(1);
  });
});

describe('HTTPS proxy', () => {
  it('verifies the proxy certificate against extra_root_certificates and tunnels through TLS-in-TLS', async () => {
    const reg = await origin((_req, res) => res.end('through an https proxy'), pki.server);
    const proxy = await fakeProxy({ tls: proxyCert, auth: basic('u', 'p') });
    expect(proxy.url).toMatch(/^https:/);
    const t = transport({ extraRootCertificates: [pki.ca.cert, proxyCa.cert], proxy: { httpsProxy: proxy.url.replace('https://', 'https://u:p@') } });
    const res = await t.request({ url: `${reg.url}/v2/`, headers: { authorization: 'Bearer t' } });
    expect(await text(res.body)).toBe('through an https proxy');
    expect(proxy.connects.map((c) => c.target)).toEqual([hostOf(reg.url)]);
    expect(proxy.connects[0]!.headers['proxy-authorization']).toBe(basic('u', 'p'));
    expect(reg.seen[0]!.headers['proxy-authorization']).toBeUndefined();
    expect(reg.seen[0]!.headers.authorization).toBe('Bearer t');
  });

  it("an untrusted proxy certificate names the proxy and the option; nothing reaches the proxy's CONNECT handler", async () => {
    const proxy = await fakeProxy({ tls: proxyCert });
    const err = await rejection(transport({ extraRootCertificates: [pki.ca.cert], proxy: { httpsProxy: proxy.url } }).request({ url: 'https://registry.example.test/v2/' }));
    expect(err.code).toBe(ErrorCode.UNAVAILABLE);
    expect(err.message).toMatch(
      new RegExp(`^cannot connect to proxy ${proxy.url} \\(for https://registry\\.example\\.test\\): the certificate of proxy ${hostOf(proxy.url)} is not trusted \\(\\w+\\); add the proxy's CA \\(PEM\\) to \\[image\\] extra_root_certificates`),
    );
    expect(proxy.connects).toEqual([]);
  });
});

describe('redirects through a proxy', () => {
  it('follows a cross-origin redirect through the proxy, dropping Authorization at the new origin', async () => {
    const storage = await origin((_req, res) => res.end('blob bytes'), pki.server);
    const reg = await origin((_req, res) => res.writeHead(307, { location: `${storage.url.replace('127.0.0.1', 'localhost')}/blob?sig=x` }).end(), pki.server);
    const proxy = await fakeProxy();
    const t = transport({ extraRootCertificates: [pki.ca.cert], proxy: { httpsProxy: proxy.url } });
    const res = await t.request({ url: `${reg.url}/v2/r/blobs/sha256:aa`, headers: { authorization: 'Bearer reg' } });
    expect(await text(res.body)).toBe('blob bytes');
    expect(proxy.connects.map((c) => c.target)).toEqual([hostOf(reg.url), `localhost:${new URL(storage.url).port}`]);
    expect(reg.seen[0]!.headers.authorization).toBe('Bearer reg');
    expect(storage.seen[0]!.headers.authorization).toBeUndefined();
    expect(storage.seen[0]!.url).toBe('/blob?sig=x');
  });

  it('refuses https → http through the proxy before opening a second tunnel', async () => {
    const plain = await origin((_req, res) => res.end('plain'));
    const reg = await origin((_req, res) => res.writeHead(302, { location: `${plain.url}/blob` }).end(), pki.server);
    const proxy = await fakeProxy();
    const t = transport({ extraRootCertificates: [pki.ca.cert], proxy: { httpsProxy: proxy.url, httpProxy: proxy.url } });
    const err = await rejection(t.request({ url: `${reg.url}/v2/x` }));
    expect(err.code).toBe(ErrorCode.PERMISSION_DENIED);
    expect(err.message).toContain('a downgrade from https to plain http');
    expect(proxy.connects.map((c) => c.target)).toEqual([hostOf(reg.url)]);
    expect(plain.seen).toEqual([]);
  });
});
