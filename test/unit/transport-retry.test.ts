/**
 * Retries and resumed downloads. Pure parts (backoff bounds, Retry-After parsing, what counts as
 * retryable) by value; the rest against tiny loopback servers written here that fail a given
 * number of times (503, 503 + Retry-After, 429, a dropped connection), and blob servers that cut
 * the connection after N bytes and either honour Range or ignore it. Every test asserts the exact
 * requests the server saw.
 */
import { createHash } from 'node:crypto';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { Writable } from 'node:stream';
import { pino } from 'pino';
import { afterEach, describe, expect, it } from 'vitest';
import { ErrorCode, GuestpullError } from '../../src/errors.js';
import { silentLogger, type Logger } from '../../src/log.js';
import { MediaType, type Descriptor } from '../../src/oci.js';
import { RegistryClient } from '../../src/pull/distribution/index.js';
import {
  backoffDelay,
  DEFAULT_BACKOFF,
  parseRetryAfter,
  retryDelay,
  retryReason,
  Transport,
  type TransportOptions,
} from '../../src/pull/distribution/transport/index.js';

const cleanups: Array<() => Promise<void>> = [];
afterEach(async () => {
  while (cleanups.length) await cleanups.pop()!();
});

interface Hit {
  method: string;
  url: string;
  range: string | undefined;
}

type Handler = (req: http.IncomingMessage, res: http.ServerResponse, n: number) => void;

async function serve(handler: Handler): Promise<{ url: string; hits: Hit[] }> {
  const hits: Hit[] = [];
  const server = http.createServer((req, res) => {
    hits.push({ method: req.method ?? '', url: req.url ?? '', range: req.headers.range });
    handler(req, res, hits.length);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  cleanups.push(async () => {
    server.closeAllConnections();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  });
  return { url: `http://127.0.0.1:${(server.address() as AddressInfo).port}`, hits };
}

function capture(): { logger: Logger; events: () => Array<Record<string, unknown>> } {
  const lines: string[] = [];
  const logger = pino({ level: 'info' }, new Writable({ write: (c: Buffer, _e, cb) => (lines.push(c.toString()), cb()) }));
  return { logger, events: () => lines.map((l) => JSON.parse(l) as Record<string, unknown>) };
}

function transport(opts: TransportOptions = {}, logger: Logger = silentLogger()): Transport {
  const t = new Transport({ backoff: { baseDelayMs: 5, maxDelayMs: 20 }, ...opts }, logger);
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

describe('backoff and Retry-After (pure)', () => {
  it('full jitter stays within [0, min(cap, base·2^(n-1))]', () => {
    const top = (n: number): number => backoffDelay(n, { ...DEFAULT_BACKOFF, random: () => 0.999999 });
    expect([1, 2, 3, 4, 5, 6, 7, 8].map(top)).toEqual([199, 399, 799, 1599, 3199, 6399, 9999, 9999]);
    expect(backoffDelay(3, { ...DEFAULT_BACKOFF, random: () => 0 })).toBe(0);
    expect(backoffDelay(2, { ...DEFAULT_BACKOFF, random: () => 0.5 })).toBe(200);
    for (let i = 0; i < 200; i++) {
      const d = backoffDelay(4);
      expect(d).toBeGreaterThanOrEqual(0);
      expect(d).toBeLessThan(1600);
    }
  });

  it('parses Retry-After as seconds or an HTTP date, and caps it', () => {
    const now = Date.parse('2025-01-01T00:00:00Z');
    expect(parseRetryAfter('7', now)).toBe(7000);
    expect(parseRetryAfter(' 0 ', now)).toBe(0);
    expect(parseRetryAfter('Wed, 01 Jan 2025 00:00:30 GMT', now)).toBe(30_000);
    expect(parseRetryAfter('Tue, 31 Dec 2024 23:00:00 GMT', now)).toBe(0);
    expect(parseRetryAfter(['2', '9'], now)).toBe(2000);
    for (const bad of [undefined, '', '-1', '1.5', 'soon', '12345678901', '2025-01-01']) expect(parseRetryAfter(bad, now)).toBeUndefined();
    expect(retryDelay(1, 3_600_000)).toBe(60_000);
    expect(retryDelay(1, 1500)).toBe(1500);
    expect(retryDelay(9, 0)).toBe(0);
  });

  it('classifies errors: connection trouble is retryable, trust and refusals are not', () => {
    const coded = (code: string): Error => Object.assign(new Error(code), { code });
    expect(retryReason(coded('ECONNRESET'))).toBe('connection reset');
    expect(retryReason(new GuestpullError(ErrorCode.UNAVAILABLE, 'x', {}, { cause: coded('UND_ERR_BODY_TIMEOUT') }))).toBe('body idle timeout');
    expect(retryReason(new Error('Proxy response (503) !== 200 when HTTP Tunneling'))).toBe('proxy answered 503 to CONNECT');
    expect(retryReason(new Error('Proxy response (407) !== 200 when HTTP Tunneling'))).toBeUndefined();
    expect(retryReason(coded('ENOTFOUND'))).toBeUndefined();
    expect(retryReason(coded('UNABLE_TO_VERIFY_LEAF_SIGNATURE'))).toBeUndefined();
    expect(retryReason(new GuestpullError(ErrorCode.PERMISSION_DENIED, 'refused redirect'))).toBeUndefined();
  });
});

describe('request retries', () => {
  it('retries 503 with backoff and logs each retry at info', async () => {
    const srv = await serve((_req, res, n) => (n <= 2 ? res.writeHead(503).end('busy') : res.end('ok')));
    const log = capture();
    const res = await transport({}, log.logger).request({ url: `${srv.url}/v2/x` });
    expect(res.statusCode).toBe(200);
    expect(await text(res.body)).toBe('ok');
    expect(srv.hits.map((h) => h.url)).toEqual(['/v2/x', '/v2/x', '/v2/x']);
    const retries = log.events().filter((e) => e.msg === 'retrying request');
    expect(retries).toEqual([
      expect.objectContaining({ level: 30, attempt: 1, maxAttempts: 5, reason: 'HTTP 503', url: `${srv.url}/v2/x` }),
      expect.objectContaining({ level: 30, attempt: 2, maxAttempts: 5, reason: 'HTTP 503' }),
    ]);
    for (const r of retries) expect(r.delayMs).toEqual(expect.any(Number));
  });

  it('honours Retry-After in seconds on 503', async () => {
    const srv = await serve((_req, res, n) => (n === 1 ? res.writeHead(503, { 'retry-after': '1' }).end() : res.end('later')));
    const t0 = performance.now();
    const res = await transport().request({ url: `${srv.url}/v2/` });
    const waited = performance.now() - t0;
    expect(await text(res.body)).toBe('later');
    expect(srv.hits).toHaveLength(2);
    expect(waited).toBeGreaterThanOrEqual(950);
    expect(waited).toBeLessThan(5000);
  });

  it('retries 429, caps a long Retry-After, and does not retry other 4xx', async () => {
    const srv = await serve((req, res, n) => {
      if (req.url === '/missing') res.writeHead(404).end();
      else if (n === 1) res.writeHead(429, { 'retry-after': '3600' }).end();
      else res.end('ok');
    });
    const t = transport({ backoff: { maxRetryAfterMs: 50 } });
    const t0 = performance.now();
    expect((await t.request({ url: `${srv.url}/limited` })).statusCode).toBe(200);
    expect(performance.now() - t0).toBeLessThan(2000);
    expect((await t.request({ url: `${srv.url}/missing` })).statusCode).toBe(404);
    expect(srv.hits.map((h) => h.url)).toEqual(['/limited', '/limited', '/missing']);
  });

  it('returns the last 5xx after maxAttempts, and never retries a POST', async () => {
    const srv = await serve((_req, res) => res.writeHead(502).end('bad gateway'));
    const t = transport({ maxAttempts: 3 });
    const res = await t.request({ url: `${srv.url}/get` });
    expect(res.statusCode).toBe(502);
    expect(await text(res.body)).toBe('bad gateway');
    const post = await t.request({ url: `${srv.url}/post`, method: 'POST', body: 'x' });
    expect(post.statusCode).toBe(502);
    await text(post.body);
    expect(srv.hits.map((h) => `${h.method} ${h.url}`)).toEqual(['GET /get', 'GET /get', 'GET /get', 'POST /post']);
  });

  it('retries a connection dropped before the response', async () => {
    const srv = await serve((req, res, n) => (n <= 2 ? req.socket.destroy() : res.end('third time')));
    const log = capture();
    const res = await transport({}, log.logger).request({ url: `${srv.url}/v2/` });
    expect(await text(res.body)).toBe('third time');
    expect(srv.hits).toHaveLength(3);
    expect(log.events().filter((e) => e.msg === 'retrying request').map((e) => e.reason)).toEqual(['connection closed', 'connection closed']);
  });

  it('the caller\'s abort ends a Retry-After sleep at once', async () => {
    const srv = await serve((_req, res) => res.writeHead(503, { 'retry-after': '30' }).end());
    const ac = new AbortController();
    const reason = new GuestpullError(ErrorCode.DEADLINE_EXCEEDED, 'pull deadline passed');
    setTimeout(() => ac.abort(reason), 150);
    const t0 = performance.now();
    const err = await rejection(transport().request({ url: `${srv.url}/v2/`, signal: ac.signal }));
    expect(err).toBe(reason);
    expect(performance.now() - t0).toBeLessThan(2000);
    expect(srv.hits).toHaveLength(1);
  });
});

// ---------- resumed blob downloads ----------

const REPO = 'test/blob';

function blobOf(size: number): { bytes: Buffer; desc: Descriptor } {
  const bytes = Buffer.alloc(size);
  for (let i = 0; i < size; i++) bytes[i] = (i * 7 + (i >> 8)) & 0xff;
  const digest = `sha256:${createHash('sha256').update(bytes).digest('hex')}`;
  return { bytes, desc: { mediaType: MediaType.OCI_LAYER_GZIP, digest, size } };
}

function client(baseUrl: string, t: Transport, logger: Logger = silentLogger()): RegistryClient {
  return new RegistryClient({ baseUrl: `${baseUrl}/v2/`, repository: REPO, transport: t, logger, image: `127.0.0.1/${REPO}:v1` });
}

async function collect(body: NodeJS.ReadableStream): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const c of body) chunks.push(c as Buffer);
  return Buffer.concat(chunks);
}

/** Send `bytes[from..]` with the given status and headers, cutting the connection after `cutAfter` body bytes. */
function sendPart(req: http.IncomingMessage, res: http.ServerResponse, bytes: Buffer, from: number, status: 200 | 206, extra: http.OutgoingHttpHeaders, cutAfter?: number): void {
  const part = bytes.subarray(from);
  res.writeHead(status, { 'content-length': part.length, 'content-type': 'application/octet-stream', ...extra });
  if (cutAfter === undefined || cutAfter >= part.length) {
    res.end(part);
    return;
  }
  res.write(part.subarray(0, cutAfter), () => setTimeout(() => req.socket.destroy(), 20));
}

function rangeStart(req: http.IncomingMessage): number | undefined {
  const m = /^bytes=(\d+)-$/.exec(req.headers.range ?? '');
  return m ? Number(m[1]) : undefined;
}

describe('blob downloads resume', () => {
  it('resumes with Range after each cut when the server supports it; one seamless verified stream', async () => {
    const { bytes, desc } = blobOf(100_000);
    const srv = await serve((req, res) => {
      const from = rangeStart(req);
      const headers = { 'accept-ranges': 'bytes' };
      if (from === undefined) sendPart(req, res, bytes, 0, 200, headers, 30_000);
      else sendPart(req, res, bytes, from, 206, { ...headers, 'content-range': `bytes ${from}-${bytes.length - 1}/${bytes.length}` }, 30_000);
    });
    const log = capture();
    const got = await collect(await client(srv.url, transport({}, log.logger), log.logger).getBlob(desc));
    expect(got.equals(bytes)).toBe(true);
    expect(srv.hits.map((h) => h.range)).toEqual([undefined, 'bytes=30000-', 'bytes=60000-', 'bytes=90000-']);
    expect(srv.hits.every((h) => h.url === `/v2/${REPO}/blobs/${desc.digest}`)).toBe(true);
    const resumes = log.events().filter((e) => e.msg === 'blob download interrupted; resuming');
    expect(resumes.map((e) => [e.attempt, e.received])).toEqual([[2, 30000], [3, 60000], [4, 90000]]);
    expect(resumes.every((e) => e.level === 30 && typeof e.delayMs === 'number' && typeof e.reason === 'string')).toBe(true);
  });

  it('restarts from 0 when the server ignores Range (200), dropping the bytes the consumer already has', async () => {
    const { bytes, desc } = blobOf(64_000);
    const srv = await serve((req, res, n) => sendPart(req, res, bytes, 0, 200, {}, n === 1 ? 20_000 : undefined));
    const got = await collect(await client(srv.url, transport()).getBlob(desc));
    expect(got.length).toBe(bytes.length);
    expect(got.equals(bytes)).toBe(true);
    expect(srv.hits.map((h) => h.range)).toEqual([undefined, 'bytes=20000-']);
  });

  it('fails DIGEST_MISMATCH when a restarted 200 sends different content after the part already delivered', async () => {
    const { bytes, desc } = blobOf(50_000);
    const other = Buffer.from(bytes);
    other[40_000] = other[40_000]! ^ 0xff;
    const srv = await serve((req, res, n) => sendPart(req, res, n === 1 ? bytes : other, 0, 200, {}, n === 1 ? 10_000 : undefined));
    const err = await rejection(collect(await client(srv.url, transport()).getBlob(desc)));
    expect(err.code).toBe(ErrorCode.DIGEST_MISMATCH);
    expect(srv.hits).toHaveLength(2);
  });

  it('resumes after an idle timeout mid-body', async () => {
    const { bytes, desc } = blobOf(20_000);
    const srv = await serve((req, res) => {
      const from = rangeStart(req);
      if (from === undefined) {
        res.writeHead(200, { 'content-length': bytes.length, 'accept-ranges': 'bytes' });
        res.write(bytes.subarray(0, 5000)); // then stall
      } else sendPart(req, res, bytes, from, 206, { 'content-range': `bytes ${from}-${bytes.length - 1}/${bytes.length}` });
    });
    const got = await collect(await client(srv.url, transport({ bodyTimeoutMs: 300 })).getBlob(desc));
    expect(got.equals(bytes)).toBe(true);
    expect(srv.hits.map((h) => h.range)).toEqual([undefined, 'bytes=5000-']);
  });

  it('gives up after maxAttempts interruptions without progress, with the network error', async () => {
    const { bytes, desc } = blobOf(10_000);
    const srv = await serve((req, res) => {
      const from = rangeStart(req) ?? 0;
      // 1000 bytes the first time, then nothing before the cut.
      sendPart(req, res, bytes, from, from === 0 ? 200 : 206, { 'accept-ranges': 'bytes', 'content-range': `bytes ${from}-${bytes.length - 1}/${bytes.length}` }, from === 0 ? 1000 : 0);
    });
    const err = await rejection(collect(await client(srv.url, transport({ maxAttempts: 3 })).getBlob(desc)));
    expect(err.code).toBe(ErrorCode.UNAVAILABLE);
    expect(err.message).toContain(srv.url);
    // The first attempt made progress and opens a series of at most maxAttempts (3) attempts; the
    // two resumes that follow bring nothing, and the series ends.
    expect(srv.hits.map((h) => h.range)).toEqual([undefined, 'bytes=1000-', 'bytes=1000-']);
  });

  it('refuses a 206 that does not start where the download stopped', async () => {
    const { bytes, desc } = blobOf(10_000);
    const srv = await serve((req, res) => {
      const from = rangeStart(req);
      if (from === undefined) sendPart(req, res, bytes, 0, 200, { 'accept-ranges': 'bytes' }, 4000);
      else sendPart(req, res, bytes, 0, 206, { 'content-range': `bytes 0-${bytes.length - 1}/${bytes.length}` });
    });
    const err = await rejection(collect(await client(srv.url, transport()).getBlob(desc)));
    expect(err.code).toBe(ErrorCode.UNAVAILABLE);
    expect(err.message).toMatch(/asked for bytes 4000-9999 to resume an interrupted download, the registry sent Content-Range "bytes 0-9999\/10000"/);
    expect(srv.hits).toHaveLength(2);
  });

  it('does not resume with Range when the server said Accept-Ranges: none, and not at all with maxAttempts 1', async () => {
    const { bytes, desc } = blobOf(8000);
    const srv = await serve((req, res, n) => sendPart(req, res, bytes, 0, 200, { 'accept-ranges': 'none' }, n === 1 ? 3000 : undefined));
    const got = await collect(await client(srv.url, transport()).getBlob(desc));
    expect(got.equals(bytes)).toBe(true);
    expect(srv.hits.map((h) => h.range)).toEqual([undefined, undefined]);

    const once = await serve((req, res) => sendPart(req, res, bytes, 0, 200, {}, 3000));
    const err = await rejection(collect(await client(once.url, transport({ maxAttempts: 1 })).getBlob(desc)));
    expect(err.code).toBe(ErrorCode.UNAVAILABLE);
    expect(once.hits).toHaveLength(1);
  });

  it("the caller's abort stops a resume in its backoff", async () => {
    const { bytes, desc } = blobOf(8000);
    const srv = await serve((req, res) => sendPart(req, res, bytes, 0, 200, {}, 2000));
    const ac = new AbortController();
    const t = transport({ backoff: { baseDelayMs: 60_000, maxDelayMs: 60_000, random: () => 0.9 } });
    const body = await client(srv.url, t).getBlob(desc, ac.signal);
    setTimeout(() => ac.abort(), 300);
    const t0 = performance.now();
    const err = await rejection(collect(body));
    expect(err.code).toBe(ErrorCode.CANCELLED);
    expect(performance.now() - t0).toBeLessThan(3000);
    expect(srv.hits).toHaveLength(1);
  });
});
