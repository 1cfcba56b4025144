/**
 * Transport: redirects by hand (relative, cross-origin credential drop, https → http refusal,
 * hop limit), network failures in words (refused, DNS, timeouts, reset, untrusted TLS), aborts,
 * and logging without header values. Every server here is a tiny node:http/https server on
 * 127.0.0.1 started and stopped by the test.
 */
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import http from 'node:http';
import https from 'node:https';
import net, { type AddressInfo } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { Writable } from 'node:stream';
import { pino } from 'pino';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { ErrorCode, GuestpullError } from '../../src/errors.js';
import { silentLogger } from '../../src/log.js';
import { closeDelimited, loggableUrl, redirectTarget, sameOrigin, Transport, type TransportOptions } from '../../src/pull/distribution/transport/index.js';
import { createPki, type Pki } from '../helpers/tls.js';

type Handler = (req: http.IncomingMessage, res: http.ServerResponse) => void;
interface TestServer {
  url: string;
  close: () => Promise<void>;
}

const cleanups: Array<() => Promise<void>> = [];
afterEach(async () => {
  while (cleanups.length) await cleanups.pop()!();
});

let pki: Pki;
beforeAll(() => {
  pki = createPki('guestpull-transport-pki-');
});
afterAll(() => pki.cleanup());

async function listen(server: http.Server | https.Server, scheme: 'http' | 'https'): Promise<TestServer> {
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;
  const close = async (): Promise<void> => {
    server.closeAllConnections();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  };
  cleanups.push(close);
  return { url: `${scheme}://127.0.0.1:${port}`, close };
}

function serve(handler: Handler): Promise<TestServer> {
  return listen(http.createServer(handler), 'http');
}

function transport(opts: TransportOptions = {}, logger = silentLogger()): Transport {
  const t = new Transport(opts, logger);
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

async function freePort(): Promise<number> {
  const s = http.createServer();
  await new Promise<void>((resolve) => s.listen(0, '127.0.0.1', resolve));
  const { port } = s.address() as AddressInfo;
  await new Promise<void>((resolve) => s.close(() => resolve()));
  return port;
}

describe('redirects', () => {
  it('follows a relative Location and reports the final URL', async () => {
    const seen: string[] = [];
    const srv = await serve((req, res) => {
      seen.push(req.url!);
      if (req.url === '/v2/a') {
        res.writeHead(302, { location: '../v2/b?x=1' }).end('moved');
      } else res.end(`final ${req.url}`);
    });
    const res = await transport().request({ url: `${srv.url}/v2/a` });
    expect(res.statusCode).toBe(200);
    expect(res.url).toBe(`${srv.url}/v2/b?x=1`);
    expect(await text(res.body)).toBe('final /v2/b?x=1');
    expect(seen).toEqual(['/v2/a', '/v2/b?x=1']);
  });

  it('keeps Authorization on the same origin and drops it on another', async () => {
    const authSeen: Record<string, string | undefined> = {};
    const storage = await serve((req, res) => {
      authSeen[`storage${req.url}`] = req.headers.authorization;
      res.end('blob');
    });
    const registry = await serve((req, res) => {
      authSeen[`registry${req.url}`] = req.headers.authorization;
      if (req.url === '/same') res.writeHead(307, { location: '/here' }).end();
      else if (req.url === '/away') res.writeHead(307, { location: `${storage.url}/blob?sig=secret` }).end();
      else res.end('here');
    });
    const t = transport();
    const a = await t.request({ url: `${registry.url}/same`, headers: { Authorization: 'Bearer tok' } });
    expect(await text(a.body)).toBe('here');
    const b = await t.request({ url: `${registry.url}/away`, headers: { Authorization: 'Bearer tok' } });
    expect(await text(b.body)).toBe('blob');
    expect(authSeen).toEqual({
      'registry/same': 'Bearer tok',
      'registry/here': 'Bearer tok',
      'registry/away': 'Bearer tok',
      'storage/blob?sig=secret': undefined,
    });
  });

  it('refuses https → http by URL pair, allows the other hops', () => {
    const from = new URL('https://registry.example/v2/x/blobs/sha256:aa');
    let err: unknown;
    try {
      redirectTarget(from, 'http://storage.example/blob');
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(GuestpullError);
    expect((err as GuestpullError).code).toBe(ErrorCode.PERMISSION_DENIED);
    expect((err as GuestpullError).message).toContain('https://registry.example/v2/x/blobs/sha256:aa');
    expect((err as GuestpullError).message).toContain('http://storage.example/blob');
    expect(redirectTarget(new URL('http://a.example/x'), 'https://b.example/y').href).toBe('https://b.example/y');
    expect(redirectTarget(from, '/other').href).toBe('https://registry.example/other');
    expect(() => redirectTarget(new URL('http://a.example/x'), 'file:///etc/passwd')).toThrow(/only http and https/);
    expect(sameOrigin(new URL('https://a.example:443/x'), new URL('https://a.example/y'))).toBe(true);
    expect(sameOrigin(new URL('https://a.example/x'), new URL('https://a.example:8443/x'))).toBe(false);
    expect(sameOrigin(new URL('http://a.example/x'), new URL('https://a.example/x'))).toBe(false);
  });

  it('stops after maxRedirects hops', async () => {
    let hits = 0;
    const srv = await serve((req, res) => {
      hits++;
      res.writeHead(301, { location: `/hop${hits}` }).end();
    });
    const err = await rejection(transport({ maxRedirects: 3 }).request({ url: `${srv.url}/start` }));
    expect(err.code).toBe(ErrorCode.UNAVAILABLE);
    expect(err.message).toMatch(/too many redirects \(more than 3\)/);
    expect(hits).toBe(4);
  });

  it('turns a POST into a GET on 303 and keeps it on 307', async () => {
    const seen: string[] = [];
    const srv = await serve((req, res) => {
      let body = '';
      req.on('data', (c: Buffer) => (body += c.toString()));
      req.on('end', () => {
        seen.push(`${req.method} ${req.url} ${body}`);
        if (req.url === '/see') res.writeHead(303, { location: '/done' }).end();
        else if (req.url === '/temp') res.writeHead(307, { location: '/done' }).end();
        else res.end();
      });
    });
    const t = transport();
    await text((await t.request({ url: `${srv.url}/see`, method: 'POST', body: 'a=1', headers: { 'content-type': 'application/x-www-form-urlencoded' } })).body);
    await text((await t.request({ url: `${srv.url}/temp`, method: 'POST', body: 'b=2' })).body);
    expect(seen).toEqual(['POST /see a=1', 'GET /done ', 'POST /temp b=2', 'POST /done b=2']);
  });
});

describe('network errors', () => {
  it('names a refused connection and the origin', async () => {
    const port = await freePort();
    const err = await rejection(transport({ maxAttempts: 1 }).request({ url: `http://127.0.0.1:${port}/v2/` }));
    expect(err.code).toBe(ErrorCode.UNAVAILABLE);
    expect(err.message).toContain(`http://127.0.0.1:${port}`);
    expect(err.message).toContain('connection refused');
  });

  it('says a plain-HTTP server did not answer TLS and how to allow it', async () => {
    const srv = await serve((_req, res) => res.end('plain'));
    const httpsUrl = srv.url.replace('http://', 'https://');
    const err = await rejection(transport({ maxAttempts: 1 }).request({ url: `${httpsUrl}/v2/` }));
    expect(err.code).toBe(ErrorCode.UNAVAILABLE);
    expect(err.message).toContain(httpsUrl);
    expect(err.message).toContain('did not answer with TLS');
    expect(err.message).toContain('insecure = true');
  });

  it('names a host that does not resolve', async () => {
    const err = await rejection(transport().request({ url: 'http://registry.nonexistent.invalid/v2/' }));
    expect(err.code).toBe(ErrorCode.UNAVAILABLE);
    expect(err.message).toMatch(/host not found/);
    expect(err.message).toContain('registry.nonexistent.invalid');
  });

  it('times out waiting for headers', async () => {
    const srv = await serve(() => undefined);
    const err = await rejection(transport({ headersTimeoutMs: 200, maxAttempts: 1 }).request({ url: `${srv.url}/slow` }));
    expect(err.code).toBe(ErrorCode.UNAVAILABLE);
    expect(err.message).toMatch(/timed out waiting 200 ms for response headers/);
  });

  it('times out when the body stalls, as an error on the body stream', async () => {
    const srv = await serve((_req, res) => {
      res.writeHead(200, { 'content-length': '100' });
      res.write('x'.repeat(10));
    });
    const res = await transport({ bodyTimeoutMs: 200 }).request({ url: `${srv.url}/stall` });
    const err = await rejection(text(res.body));
    expect(err.code).toBe(ErrorCode.UNAVAILABLE);
    expect(err.message).toMatch(/timed out: no response body data for 200 ms/);
  });

  it('reports a connection closed mid-body', async () => {
    const srv = await serve((req, res) => {
      res.writeHead(200, { 'content-length': '1000' });
      res.write('x'.repeat(10), () => req.socket.destroy());
    });
    const res = await transport().request({ url: `${srv.url}/cut` });
    const err = await rejection(text(res.body));
    expect(err.code).toBe(ErrorCode.UNAVAILABLE);
    expect(err.message).toContain(srv.url);
  });

  it('cancels on abort, and passes a GuestpullError reason through', async () => {
    const srv = await serve(() => undefined);
    const t = transport();
    const ac = new AbortController();
    const p = t.request({ url: `${srv.url}/hang`, signal: ac.signal });
    setTimeout(() => ac.abort(), 50);
    expect((await rejection(p)).code).toBe(ErrorCode.CANCELLED);

    const ac2 = new AbortController();
    const p2 = t.request({ url: `${srv.url}/hang`, signal: ac2.signal });
    const reason = new GuestpullError(ErrorCode.DEADLINE_EXCEEDED, 'pull deadline passed');
    setTimeout(() => ac2.abort(reason), 50);
    expect(await rejection(p2)).toBe(reason);
  });

  it('rejects an unusable extra root certificate at construction, naming its index', () => {
    const good = readFileSync(path.join(pki.dir, 'ca.pem'), 'utf8');
    const cases: Array<[string[], RegExp]> = [
      [['-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n'], /^\[image\] extra_root_certificates\[0\]: not a PEM certificate: /],
      [[good, good, 'hello'], /^\[image\] extra_root_certificates\[2\]: not a PEM certificate: no "-----BEGIN CERTIFICATE-----"/],
      [[good, `${good}-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n`], /extra_root_certificates\[1\]/],
    ];
    for (const [pems, re] of cases) {
      let err: unknown;
      try {
        new Transport({ extraRootCertificates: pems }, silentLogger());
      } catch (e) {
        err = e;
      }
      expect(err).toBeInstanceOf(GuestpullError);
      expect((err as GuestpullError).code).toBe(ErrorCode.CONFIG);
      expect((err as GuestpullError).message).toMatch(re);
    }
    expect(() => transport({ extraRootCertificates: [good, pki.selfSignedCaLeaf.cert] })).not.toThrow();
  });
});

describe('TLS', () => {
  it('trusts a server certificate signed by a private CA only when the CA is configured', async () => {
    const srv = await listen(https.createServer({ cert: pki.server.cert, key: pki.server.key }, (_req, res) => res.end('ca-signed')), 'https');
    const err = await rejection(transport().request({ url: `${srv.url}/v2/` }));
    expect(err.message).toMatch(/the certificate of 127\.0\.0\.1:\d+ is not trusted \(UNABLE_TO_(?:VERIFY_LEAF_SIGNATURE|GET_ISSUER_CERT_LOCALLY)\)/);
    expect(err.message).toContain('[image] extra_root_certificates');
    const res = await transport({ extraRootCertificates: [pki.ca.cert] }).request({ url: `${srv.url}/v2/` });
    expect(await text(res.body)).toBe('ca-signed');
    // The server's own certificate is not a CA: trusting it instead of its issuer does not help.
    const wrong = await rejection(transport({ extraRootCertificates: [pki.server.cert] }).request({ url: `${srv.url}/v2/` }));
    expect(wrong.message).toContain('not trusted');
  });

  it('accepts a self-signed CA:TRUE certificate used directly as the server certificate', async () => {
    const leaf = pki.selfSignedCaLeaf;
    const srv = await listen(https.createServer({ cert: leaf.cert, key: leaf.key }, (_req, res) => res.end('self-signed')), 'https');
    const err = await rejection(transport().request({ url: `${srv.url}/v2/` }));
    expect(err.message).toMatch(/not trusted \(DEPTH_ZERO_SELF_SIGNED_CERT\)/);
    const res = await transport({ extraRootCertificates: [leaf.cert] }).request({ url: `${srv.url}/v2/` });
    expect(await text(res.body)).toBe('self-signed');
  });

  let dir: string;
  let cert: string;
  let key: string;
  beforeAll(() => {
    dir = mkdtempSync(path.join(os.tmpdir(), 'guestpull-transport-'));
    execFileSync(
      'openssl',
      [
        'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
        '-keyout', path.join(dir, 'key.pem'), '-out', path.join(dir, 'cert.pem'),
        '-days', '2', '-subj', '/CN=127.0.0.1', '-addext', 'subjectAltName=IP:127.0.0.1',
      ],
      { stdio: 'ignore' },
    );
    cert = readFileSync(path.join(dir, 'cert.pem'), 'utf8');
    key = readFileSync(path.join(dir, 'key.pem'), 'utf8');
  });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  function serveTls(handler: Handler): Promise<TestServer> {
    return listen(https.createServer({ cert, key }, handler), 'https');
  }

  it('says the certificate is not trusted and where to add the CA', async () => {
    const srv = await serveTls((_req, res) => res.end('ok'));
    const err = await rejection(transport().request({ url: `${srv.url}/v2/` }));
    expect(err.code).toBe(ErrorCode.UNAVAILABLE);
    expect(err.message).toContain('the certificate of 127.0.0.1');
    expect(err.message).toContain('not trusted');
    expect(err.message).toContain('[image] extra_root_certificates');
  });

  it('trusts extraRootCertificates in addition to the system roots', async () => {
    const srv = await serveTls((_req, res) => res.end('ok'));
    const res = await transport({ extraRootCertificates: [cert] }).request({ url: `${srv.url}/v2/` });
    expect(res.statusCode).toBe(200);
    expect(await text(res.body)).toBe('ok');
  });

  it('refuses a real https → http redirect', async () => {
    let plainHits = 0;
    const plain = await serve((_req, res) => {
      plainHits++;
      res.end('plain');
    });
    const srv = await serveTls((_req, res) => res.writeHead(302, { location: `${plain.url}/blob` }).end());
    const err = await rejection(transport({ extraRootCertificates: [cert] }).request({ url: `${srv.url}/v2/x` }));
    expect(err.code).toBe(ErrorCode.PERMISSION_DENIED);
    expect(err.message).toContain(`${srv.url}/v2/x`);
    expect(err.message).toContain(`${plain.url}/blob`);
    expect(plainHits).toBe(0);
  });
});

describe('headers and logging', () => {
  it('sends the user agent and logs one line per request without header values or query secrets', async () => {
    const lines: string[] = [];
    const sink = new Writable({
      write(chunk: Buffer, _enc, cb) {
        lines.push(chunk.toString('utf8'));
        cb();
      },
    });
    const logger = pino({ level: 'debug' }, sink);
    let ua: string | undefined;
    const srv = await serve((req, res) => {
      ua = req.headers['user-agent'];
      if (req.url === '/r') res.writeHead(302, { location: '/final?X-Amz-Signature=s3cr3t' }).end();
      else res.end('ok');
    });
    const res = await transport({ version: '9.9.9' }, logger).request({ url: `${srv.url}/r`, headers: { authorization: 'Bearer TOPSECRET' } });
    await text(res.body);
    expect(ua).toBe('guestpull/9.9.9');
    const events = lines.map((l) => JSON.parse(l) as Record<string, unknown>);
    expect(events.map((e) => e.msg)).toEqual(['route to registry: direct', 'http request']);
    expect(events[0]).toMatchObject({ origin: srv.url, route: 'direct' });
    const ev = events[1]!;
    expect(ev).toMatchObject({ method: 'GET', status: 200, redirects: 1, url: `${srv.url}/final?…` });
    expect(typeof ev.ms).toBe('number');
    expect(lines.join('')).not.toContain('TOPSECRET');
    expect(lines.join('')).not.toContain('s3cr3t');
    expect(loggableUrl('https://u:p@h.example/a?b=c')).toBe('https://***:***@h.example/a?…');
  });
});

describe('Transport: bodies delimited only by closing the connection', () => {
  it('closeDelimited tells the framings apart', () => {
    const r = (statusCode: number, headers: Record<string, string>): { statusCode: number; headers: Record<string, string> } => ({ statusCode, headers });
    expect(closeDelimited('GET', r(200, {}))).toBe(true);
    expect(closeDelimited('GET', r(200, { 'content-length': '5' }))).toBe(false);
    expect(closeDelimited('GET', r(200, { 'transfer-encoding': 'gzip, chunked' }))).toBe(false);
    expect(closeDelimited('HEAD', r(200, {}))).toBe(false);
    expect(closeDelimited('GET', r(204, {}))).toBe(false);
    expect(closeDelimited('GET', r(304, {}))).toBe(false);
  });

  it('refuses such a body (UNAVAILABLE naming the endpoint and the fix), retries, and takes a framed answer', async () => {
    let calls = 0;
    // A raw server: the first answer has neither Content-Length nor chunked framing and ends by
    // closing (as a stripping proxy or a hostile host would send); the second is framed.
    const server = net.createServer((sock) => {
      sock.on('error', () => undefined); // the client hangs up on the refused body
      sock.once('data', () => {
        calls++;
        if (calls === 1) {
          sock.end('HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n' + 'x'.repeat(200_000));
        } else {
          sock.end('HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok');
        }
      });
    });
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    cleanups.push(() => new Promise<void>((r) => server.close(() => r())));
    const url = `http://127.0.0.1:${(server.address() as AddressInfo).port}/v2/x/blobs/sha256:${'a'.repeat(64)}`;
    const t = transport({ maxAttempts: 3, backoff: { baseDelayMs: 1, maxDelayMs: 1, maxRetryAfterMs: 1, random: () => 0 } });
    const res = await t.request({ url });
    expect(await text(res.body)).toBe('ok');
    expect(calls).toBe(2);

    calls = 0;
    const once = transport({ maxAttempts: 1 });
    const err = await rejection(once.request({ url }));
    expect(err.code).toBe(ErrorCode.UNAVAILABLE);
    expect(err.message).toMatch(/127\.0\.0\.1:\d+.* answered HTTP 200 with a body that ends only when the connection closes .*Content-Length or chunked/);
  });
});
