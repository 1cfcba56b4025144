/**
 * The fault-injecting proxy (test/helpers/fault-proxy.ts) against a tiny node:http server on
 * 127.0.0.1 that also tunnels CONNECT: every fault is observed from the client side (bytes,
 * timing, how the socket ended) and from the server side (whether the request reached it), and the
 * proxy's own records are checked against both.
 */
import { randomBytes } from 'node:crypto';
import http from 'node:http';
import net from 'node:net';
import { gunzipSync, gzipSync } from 'node:zlib';
import { Pool } from 'undici';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { startFaultProxy, type FaultProxy, type FaultRule } from '../helpers/fault-proxy.js';

const BLOB = randomBytes(100_000);
const GZ = gzipSync(Buffer.from('guestpull fault proxy '.repeat(5000)));
let server: http.Server;
let serverPort: number;
/** Requests and CONNECTs that reached the server. */
const seen: string[] = [];
const proxies: FaultProxy[] = [];

beforeAll(async () => {
  server = http.createServer((req, res) => {
    seen.push(`${req.method} ${req.url}`);
    const url = new URL(req.url ?? '/', 'http://x');
    if (url.pathname === '/blob') {
      const size = Number(url.searchParams.get('size') ?? BLOB.length);
      res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': size });
      res.end(BLOB.subarray(0, size));
    } else if (url.pathname === '/gzip') {
      res.writeHead(200, { 'content-type': 'application/gzip', 'content-length': GZ.length });
      res.end(GZ);
    } else if (url.pathname === '/chunked') {
      res.writeHead(200, { 'content-type': 'text/plain' });
      res.write('one,');
      setTimeout(() => res.end('two'), 20);
    } else {
      res.writeHead(404, { 'content-length': 0 });
      res.end();
    }
  });
  server.on('connect', (req: http.IncomingMessage, socket: net.Socket, head: Buffer) => {
    seen.push(`CONNECT ${req.url}`);
    const [host, port] = (req.url ?? '').split(':');
    const up = net.connect(Number(port), host, () => {
      socket.write('HTTP/1.1 200 Connection established\r\n\r\n');
      if (head.length) up.write(head);
      socket.on('data', (d: Buffer) => up.write(d));
      up.on('data', (d: Buffer) => socket.write(d));
      socket.on('close', () => up.destroy());
      up.on('close', () => socket.destroy());
    });
    up.on('error', () => socket.destroy());
    socket.on('error', () => up.destroy());
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  serverPort = (server.address() as net.AddressInfo).port;
});

afterEach(async () => {
  while (proxies.length) await proxies.pop()!.close();
  seen.length = 0;
});

afterAll(async () => {
  server.closeAllConnections();
  await new Promise<void>((resolve) => server.close(() => resolve()));
});

async function proxy(rules: FaultRule[] = []): Promise<FaultProxy> {
  const p = await startFaultProxy({ target: `127.0.0.1:${serverPort}`, rules });
  proxies.push(p);
  return p;
}

interface Exchange {
  status: number;
  headers: Record<string, string>;
  body: Buffer;
  /** How the socket ended: a FIN from the proxy, an error code, or still open after the read window. */
  ending: 'end' | 'open' | string;
  /** ms from sending to the first byte, and to the end. */
  firstByteMs: number;
  ms: number;
}

/**
 * Send raw request bytes, collect everything until the socket ends, fails, or `windowMs` passes
 * (then the socket is destroyed by us).
 */
function exchange(port: number, request: string, windowMs = 3000, extra?: (sock: net.Socket) => void): Promise<Exchange> {
  return new Promise((resolve) => {
    const sock = net.connect(port, '127.0.0.1');
    const chunks: Buffer[] = [];
    const t0 = performance.now();
    let first = -1;
    let settled = false;
    const finish = (ending: string): void => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      sock.destroy();
      const all = Buffer.concat(chunks);
      const i = all.indexOf('\r\n\r\n');
      const headText = i >= 0 ? all.subarray(0, i).toString('latin1') : '';
      const [start = '', ...lines] = headText.split('\r\n');
      const headers: Record<string, string> = {};
      for (const l of lines) headers[l.slice(0, l.indexOf(':')).toLowerCase()] = l.slice(l.indexOf(':') + 1).trim();
      resolve({ status: Number(start.split(' ')[1] ?? 0), headers, body: i >= 0 ? all.subarray(i + 4) : Buffer.alloc(0), ending, firstByteMs: first, ms: performance.now() - t0 });
    };
    const timer = setTimeout(() => finish('open'), windowMs);
    sock.on('data', (d: Buffer) => {
      if (first < 0) first = performance.now() - t0;
      chunks.push(d);
    });
    sock.on('end', () => finish('end'));
    sock.on('error', (e: NodeJS.ErrnoException) => finish(e.code ?? e.message));
    sock.on('connect', () => {
      sock.write(request);
      extra?.(sock);
    });
  });
}

const get = (path: string, close = true): string => `GET ${path} HTTP/1.1\r\nHost: registry.test\r\n${close ? 'Connection: close\r\n' : ''}\r\n`;

describe('fault proxy: pass-through', () => {
  it('forwards Content-Length and chunked responses unchanged, keep-alive, and records them', async () => {
    const p = await proxy();
    const pool = new Pool(p.url, { connections: 1 });
    try {
      for (let i = 0; i < 2; i++) {
        const r = await pool.request({ path: '/blob', method: 'GET', headers: { range: 'bytes=0-' } });
        expect(r.statusCode).toBe(200);
        expect(Buffer.compare(Buffer.from(await r.body.arrayBuffer()), BLOB)).toBe(0);
      }
      const c = await pool.request({ path: '/chunked', method: 'GET' });
      expect(await c.body.text()).toBe('one,two');
    } finally {
      await pool.close();
    }
    const s = p.stats();
    expect(s.requests).toBe(3);
    expect(s.connectionsOpened).toBe(1);
    expect(s.bytesForwarded).toBeGreaterThan(2 * BLOB.length);
    expect(s.faultsFired).toEqual({});
    const reqs = p.requests();
    expect(reqs.map((r) => [r.method, r.target, r.status])).toEqual([['GET', '/blob', 200], ['GET', '/blob', 200], ['GET', '/chunked', 200]]);
    expect(reqs[0]!.headers.range).toBe('bytes=0-');
    expect(reqs[0]!.bodyBytes).toBe(BLOB.length);
    expect(seen).toEqual(['GET /blob', 'GET /blob', 'GET /chunked']);
  });
});

describe('fault proxy: each fault', () => {
  it('cut: N body bytes then the connection closes; `times` lets the next request through whole', async () => {
    const p = await proxy([{ method: 'GET', path: /^\/blob$/, times: 1, fault: { kind: 'cut', afterBytes: 1000 } }]);
    const a = await exchange(p.port, get('/blob'));
    expect(a.status).toBe(200);
    expect(a.headers['content-length']).toBe(String(BLOB.length));
    expect(a.body.length).toBe(1000);
    expect(Buffer.compare(a.body, BLOB.subarray(0, 1000))).toBe(0);
    expect(a.ending).not.toBe('open');
    const b = await exchange(p.port, get('/blob'));
    expect(Buffer.compare(b.body, BLOB)).toBe(0);
    expect(p.stats().faultsFired).toEqual({ cut: 1 });
    expect(p.requests().map((r) => [r.fault, r.bodyBytes])).toEqual([['cut', 1000], [undefined, BLOB.length]]);
  });

  it('stall before the head for ms: the whole response arrives late', async () => {
    const p = await proxy([{ path: /^\/blob/, fault: { kind: 'stall', ms: 600 } }]);
    const a = await exchange(p.port, get('/blob?size=5000'));
    expect(a.firstByteMs).toBeGreaterThanOrEqual(590);
    expect(Buffer.compare(a.body, BLOB.subarray(0, 5000))).toBe(0);
  });

  it('stall forever after N bytes: nothing more moves; when the client leaves, both sides close', async () => {
    const p = await proxy([{ path: /^\/blob$/, fault: { kind: 'stall', afterBytes: 500 } }]);
    const a = await exchange(p.port, get('/blob'), 800);
    expect(a.ending).toBe('open');
    expect(a.body.length).toBe(500);
    const left = performance.now();
    const deadline = Date.now() + 2000;
    while (p.connections()[0]?.closedAt === undefined || p.connections()[0]?.upstreamOpen) {
      if (Date.now() > deadline) throw new Error(`proxy did not see the client leave: ${JSON.stringify(p.connections())}`);
      await new Promise((r) => setTimeout(r, 10));
    }
    const c = p.connections()[0]!;
    expect(c.closedAt! - left).toBeLessThan(500);
    expect(c.upstreamClosedAt).toBeDefined();
    expect(p.stats()).toMatchObject({ connectionsOpen: 0, upstreamsOpen: 0, faultsFired: { stall: 1 } });
    expect(p.requests()[0]!.bodyBytes).toBe(500);
  });

  it('drip: the body arrives intact at about the given rate', async () => {
    const p = await proxy([{ path: /^\/blob/, fault: { kind: 'drip', bytesPerSecond: 40_000 } }]);
    const a = await exchange(p.port, get('/blob?size=20000'));
    expect(Buffer.compare(a.body, BLOB.subarray(0, 20_000))).toBe(0);
    expect(a.ms).toBeGreaterThanOrEqual(450);
    expect(a.ms).toBeLessThan(2000);
  });

  it('reset on the request: ECONNRESET, and the target never sees it', async () => {
    const p = await proxy([{ method: 'GET', path: /^\/blob$/, fault: { kind: 'reset' } }]);
    const a = await exchange(p.port, get('/blob'));
    expect(a.ending).toBe('ECONNRESET');
    expect(a.body.length).toBe(0);
    expect(seen).toEqual([]);
    expect(p.stats().faultsFired).toEqual({ reset: 1 });
  });

  it('reset after N body bytes: the client gets N bytes, then ECONNRESET', async () => {
    const p = await proxy([{ path: /^\/blob$/, fault: { kind: 'reset', afterBytes: 3000 } }]);
    const a = await exchange(p.port, get('/blob'));
    expect(a.ending).toBe('ECONNRESET');
    // The proxy flushes the 3000 bytes and gives them a moment before the RST.
    expect(Buffer.compare(a.body, BLOB.subarray(0, 3000))).toBe(0);
    expect(p.requests()[0]!.bodyBytes).toBe(3000);
  });

  it('reset on CONNECT: the tunnel is refused with RST before the target is asked', async () => {
    const p = await proxy([{ method: 'CONNECT', path: /^127\.0\.0\.1:\d+$/, times: 1, fault: { kind: 'reset' } }]);
    const connect = `CONNECT 127.0.0.1:${serverPort} HTTP/1.1\r\nHost: 127.0.0.1:${serverPort}\r\n\r\n`;
    const a = await exchange(p.port, connect);
    expect(a.ending).toBe('ECONNRESET');
    expect(seen).toEqual([]);
    // The second CONNECT is let through and the tunnel carries a request to the server.
    const b = await exchange(p.port, connect, 3000, (sock) => sock.write(get('/blob?size=100')));
    expect(b.status).toBe(200);
    expect(b.body.toString('latin1')).toContain('HTTP/1.1 200 OK');
    expect(seen).toEqual([`CONNECT 127.0.0.1:${serverPort}`, 'GET /blob?size=100']);
    expect(p.connections()[1]!.tunnel).toBe(`127.0.0.1:${serverPort}`);
  });

  it('cut on CONNECT: counts the tunnel bytes towards the client', async () => {
    const p = await proxy([{ method: 'CONNECT', path: /.*/, fault: { kind: 'cut', afterBytes: 20_000 } }]);
    const connect = `CONNECT 127.0.0.1:${serverPort} HTTP/1.1\r\nHost: 127.0.0.1:${serverPort}\r\n\r\n`;
    const b = await exchange(p.port, connect, 3000, (sock) => sock.write(get('/blob')));
    expect(b.status).toBe(200);
    expect(b.body.length).toBe(20_000);
    expect(b.ending).not.toBe('open');
    expect(p.requests()[0]!.bodyBytes).toBe(20_000);
  });

  it('status: answers 503 with Retry-After itself, keeps the connection, target untouched', async () => {
    const p = await proxy([{ path: /^\/blob/, times: 1, fault: { kind: 'status', status: 503, retryAfter: 2 } }]);
    const pool = new Pool(p.url, { connections: 1 });
    try {
      const r1 = await pool.request({ path: '/blob?size=10', method: 'GET' });
      expect(r1.statusCode).toBe(503);
      expect(r1.headers['retry-after']).toBe('2');
      expect(JSON.parse(await r1.body.text())).toMatchObject({ errors: [{ code: 'UNAVAILABLE' }] });
      expect(seen).toEqual([]);
      const r2 = await pool.request({ path: '/blob?size=10', method: 'GET' });
      expect(r2.statusCode).toBe(200);
      await r2.body.dump();
    } finally {
      await pool.close();
    }
    expect(p.stats()).toMatchObject({ connectionsOpened: 1, requests: 2, faultsFired: { status: 1 } });
    expect(p.requests().map((r) => r.status)).toEqual([503, 200]);
    expect(seen).toEqual(['GET /blob?size=10']);
  });

  it('429 and 500 too, with the status line the client expects', async () => {
    const p = await proxy([
      { path: /a$/, fault: { kind: 'status', status: 429, retryAfter: 'Wed, 21 Oct 2015 07:28:00 GMT' } },
      { path: /b$/, fault: { kind: 'status', status: 500 } },
    ]);
    const a = await exchange(p.port, get('/a'));
    const b = await exchange(p.port, get('/b'));
    expect([a.status, a.headers['retry-after']]).toEqual([429, 'Wed, 21 Oct 2015 07:28:00 GMT']);
    expect([b.status, b.headers['retry-after']]).toEqual([500, undefined]);
  });

  it('wrong-length: Content-Length rewritten up or down, the real body sent, then the connection closed', async () => {
    const p = await proxy([
      { path: /size=1000$/, fault: { kind: 'wrong-length', delta: 100 } },
      { path: /size=2000$/, fault: { kind: 'wrong-length', delta: -100 } },
    ]);
    const up = await exchange(p.port, get('/blob?size=1000', false));
    expect(up.headers['content-length']).toBe('1100');
    expect(Buffer.compare(up.body, BLOB.subarray(0, 1000))).toBe(0);
    expect(up.ending).toBe('end');
    const down = await exchange(p.port, get('/blob?size=2000', false));
    expect(down.headers['content-length']).toBe('1900');
    expect(down.body.length).toBe(2000);
    expect(down.ending).toBe('end');
  });

  it('truncate-gzip: a complete-looking close-delimited response with a gzip stream cut short', async () => {
    const keep = Math.floor(GZ.length / 2);
    const p = await proxy([{ path: /^\/gzip$/, fault: { kind: 'truncate-gzip', keepBytes: keep } }]);
    const a = await exchange(p.port, get('/gzip', false));
    expect(a.status).toBe(200);
    expect(a.headers['content-length']).toBeUndefined();
    expect(a.headers['connection']).toBe('close');
    expect(a.ending).toBe('end');
    expect(Buffer.compare(a.body, GZ.subarray(0, keep))).toBe(0);
    expect(() => gunzipSync(a.body)).toThrow(/unexpected end of file/);
    expect(gunzipSync(GZ).length).toBeGreaterThan(0);
  });

  it('method and times: a HEAD rule does not fire on GET; a used-up rule passes traffic through', async () => {
    const p = await proxy([
      { method: 'HEAD', path: /blob/, fault: { kind: 'reset' } },
      { method: 'GET', path: /blob/, times: 2, fault: { kind: 'status', status: 502 } },
    ]);
    const codes: number[] = [];
    for (let i = 0; i < 3; i++) codes.push((await exchange(p.port, get('/blob?size=1'))).status);
    expect(codes).toEqual([502, 502, 200]);
    expect(p.stats().faultsFired).toEqual({ status: 2 });
  });

  it('close() ends every connection, stalled ones too', async () => {
    const p = await proxy([{ path: /blob/, fault: { kind: 'stall' } }]);
    const pending = exchange(p.port, get('/blob'), 5000);
    const deadline = Date.now() + 2000;
    while (p.stats().connectionsOpen === 0 || p.requests().length === 0) {
      if (Date.now() > deadline) throw new Error('no connection reached the proxy');
      await new Promise((r) => setTimeout(r, 10));
    }
    await p.close();
    const a = await pending;
    expect(a.ending).not.toBe('open');
    expect(a.ms).toBeLessThan(4000);
    expect(p.stats().connectionsOpen).toBe(0);
  });
});
