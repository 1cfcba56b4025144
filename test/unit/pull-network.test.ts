/**
 * Issue 4 §7 end to end through the Puller: the `[image]` network keys (connect_timeout_secs,
 * headers_timeout_secs, idle_timeout_secs, max_attempts) parse into Config with their documented
 * defaults and really reach the transport; and aborting a pull (what the RPC deadline does)
 * cancels the download in flight: the server sees its connection closed, nothing is left behind.
 * The registry here is a tiny node:http server on 127.0.0.1, started and stopped by each test.
 */
import { existsSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeAll, afterAll, describe, expect, it } from 'vitest';
import { DEFAULT_NETWORK, parseConfig } from '../../src/config/index.js';
import { ErrorCode, GuestpullError } from '../../src/errors.js';
import { silentLogger } from '../../src/log.js';
import { Puller } from '../../src/pull/index.js';
import { buildImage, type BuiltImage } from '../helpers/image-builder.js';
import { goarch } from '../integration/fixtures.js';

const cleanups: Array<() => Promise<void>> = [];
afterEach(async () => {
  while (cleanups.length) await cleanups.pop()!();
});

let tmp: string;
let img: BuiltImage;
beforeAll(async () => {
  tmp = await mkdtemp(path.join(os.tmpdir(), 'guestpull-pull-network-'));
  img = await buildImage({
    layers: [[{ type: 'file', path: 'a', content: 'a\n' }], [{ type: 'file', path: 'big', content: 'x'.repeat(200_000) }]],
    architecture: goarch(),
    compression: 'none',
  });
});
afterAll(async () => {
  if (tmp) await rm(tmp, { recursive: true, force: true });
});

async function serve(handler: http.RequestListener): Promise<string> {
  const server = http.createServer(handler);
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  cleanups.push(async () => {
    server.closeAllConnections();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  });
  return `127.0.0.1:${(server.address() as AddressInfo).port}`;
}

function puller(host: string, imageToml: string): Puller {
  const toml = `[image]\nwork_dir = ${JSON.stringify(path.join(tmp, 'work'))}\n${imageToml}\n[[image.registry_config.registry]]\nlocation = "${host}"\ninsecure = true\n`;
  const p = new Puller({ config: parseConfig(toml, 'pull-network test').config, logger: silentLogger(), version: 'test' });
  cleanups.push(() => p.close());
  return p;
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

let bundleNo = 0;
const bundle = (): string => path.join(tmp, `b${++bundleNo}`);

describe('[image] network keys', () => {
  it('default to the documented values and parse seconds into milliseconds', () => {
    expect(DEFAULT_NETWORK).toEqual({ connectTimeoutMs: 30_000, headersTimeoutMs: 60_000, idleTimeoutMs: 60_000, maxAttempts: 5 });
    expect(parseConfig('', 'empty').config.image.network).toEqual(DEFAULT_NETWORK);
    const c = parseConfig('[image]\nconnect_timeout_secs = 2.5\nheaders_timeout_secs = 0.25\nidle_timeout_secs = 7\nmax_attempts = 1\n', 't').config;
    expect(c.image.network).toEqual({ connectTimeoutMs: 2500, headersTimeoutMs: 250, idleTimeoutMs: 7000, maxAttempts: 1 });
  });

  it('refuses out-of-range values naming the key', () => {
    for (const [line, key] of [['max_attempts = 0', 'image.max_attempts'], ['headers_timeout_secs = -1', 'image.headers_timeout_secs'], ['max_attempts = 2.5', 'image.max_attempts']]) {
      let err: unknown;
      try {
        parseConfig(`[image]\n${line}\n`, 't');
      } catch (e) {
        err = e;
      }
      expect(err, line).toBeInstanceOf(GuestpullError);
      expect((err as GuestpullError).code).toBe(ErrorCode.CONFIG);
      expect((err as GuestpullError).message).toContain(key);
    }
  });

  it('headers_timeout_secs and max_attempts reach the transport of a pull', async () => {
    let requests = 0;
    const host = await serve(() => {
      requests++; // never answer
    });
    const t0 = Date.now();
    const err = await rejection(puller(host, 'headers_timeout_secs = 0.3\nmax_attempts = 2').pull(`${host}/app/x:v1`, bundle()));
    expect(err.code).toBe(ErrorCode.UNAVAILABLE);
    expect(err.message).toContain('timed out waiting 300 ms for response headers');
    expect(requests).toBe(2);
    expect(Date.now() - t0).toBeLessThan(5_000);
  });

  it('idle_timeout_secs bounds a stalled layer download', async () => {
    const host = await serve(registry({ stallLayer: true }));
    const err = await rejection(puller(host, 'idle_timeout_secs = 0.3\nmax_attempts = 1').pull(`${host}/app/x:v1`, bundle()));
    expect(err.code).toBe(ErrorCode.UNAVAILABLE);
    expect(err.message).toContain('no response body data for 300 ms');
  });
});

/** A registry for `img`; with `stallLayer` the big layer sends half its bytes and then nothing. */
function registry(opts: { stallLayer?: boolean; onLayerClosed?: () => void; onLayerStarted?: () => void } = {}): http.RequestListener {
  return (req, res) => {
    const url = req.url ?? '';
    if (url.endsWith('/manifests/v1')) {
      res.writeHead(200, { 'content-type': img.manifest.mediaType, 'content-length': img.manifest.size });
      res.end(img.manifest.bytes);
      return;
    }
    const blob = [img.config, ...img.layers].find((b) => url.endsWith(`/blobs/${b.digest}`));
    if (!blob) {
      res.writeHead(404).end();
      return;
    }
    res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': blob.size });
    if (opts.stallLayer && blob === img.layers[1]) {
      opts.onLayerStarted?.();
      res.on('close', () => opts.onLayerClosed?.());
      res.write(blob.bytes.subarray(0, blob.size >> 1));
      return;
    }
    res.end(blob.bytes);
  };
}

describe('aborting a pull (the RPC deadline) cancels what is in flight', () => {
  it('the stalled download is closed at once, the pull fails with the abort reason, no rootfs is left', async () => {
    let started!: () => void;
    const layerStarted = new Promise<void>((r) => (started = r));
    let closedAt = 0;
    const host = await serve(registry({ stallLayer: true, onLayerStarted: () => started(), onLayerClosed: () => (closedAt = Date.now()) }));
    // idle timeout far beyond the test: only the abort can end the download
    const p = puller(host, 'idle_timeout_secs = 600');
    const ac = new AbortController();
    const b = bundle();
    const pulling = p.pull(`${host}/app/x:v1`, b, { signal: ac.signal });
    await layerStarted;
    const abortedAt = Date.now();
    ac.abort(new GuestpullError(ErrorCode.DEADLINE_EXCEEDED, 'deadline of the test call passed'));
    const err = await rejection(pulling);
    expect(err.code).toBe(ErrorCode.DEADLINE_EXCEEDED);
    for (let i = 0; i < 100 && closedAt === 0; i++) await new Promise((r) => setTimeout(r, 20));
    expect(closedAt).toBeGreaterThan(0);
    expect(closedAt - abortedAt).toBeLessThan(2_000);
    expect(existsSync(path.join(b, 'rootfs'))).toBe(false);
    expect(existsSync(path.join(b, 'config.json'))).toBe(false);
  });
});
