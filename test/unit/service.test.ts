/**
 * The gRPC service against a real grpc-js client over a unix socket (and TCP on 127.0.0.1), with
 * an in-test ImagePuller: results, the error → status table, UNIMPLEMENTED services, health,
 * concurrency, deadlines and cancels reaching the puller's signal, socket handling and stop().
 */
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { lstat, mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { ErrorCode, GuestpullError } from '../../src/errors.js';
import { silentLogger } from '../../src/log.js';
import { parseListenAddress, startServer, toGrpcStatus, type ImagePuller, type RunningServer } from '../../src/service/index.js';
import { serviceDefinition } from '../../src/service/protos.js';
import { connectClient, type PullClient } from '../helpers/grpc-client.js';

type PullFn = (image: string, bundle: string, signal: AbortSignal) => Promise<{ manifestDigest: string }>;

/** An ImagePuller whose behaviour each test sets; records every call. */
class TestPuller implements ImagePuller {
  calls: { image: string; bundle: string; signal: AbortSignal }[] = [];
  behaviour: PullFn = async (image) => ({ manifestDigest: digestOf(image) });
  pull(image: string, bundle: string, opts?: { signal?: AbortSignal }): Promise<{ manifestDigest: string }> {
    const signal = opts?.signal;
    if (!signal) throw new Error('the service must always pass a signal');
    this.calls.push({ image, bundle, signal });
    return this.behaviour(image, bundle, signal);
  }
}

function digestOf(s: string): string {
  return `sha256:${createHash('sha256').update(s).digest('hex')}`;
}

function waitForAbort(signal: AbortSignal): Promise<unknown> {
  return new Promise((resolve) => {
    if (signal.aborted) resolve(signal.reason);
    else signal.addEventListener('abort', () => resolve(signal.reason), { once: true });
  });
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function grpcError(p: Promise<unknown>): Promise<grpc.ServiceError> {
  try {
    await p;
  } catch (e) {
    return e as grpc.ServiceError;
  }
  throw new Error('expected the call to fail');
}

let tmp: string;
const toStop: RunningServer[] = [];
const toClose: PullClient[] = [];

async function serve(puller: ImagePuller, listen?: string): Promise<{ server: RunningServer; client: PullClient; socket: string }> {
  const socket = path.join(tmp, `s${toStop.length}`, 'run', 'cdh.sock');
  const server = await startServer({ listen: listen ?? `unix://${socket}`, puller, logger: silentLogger(), version: 'test' });
  toStop.push(server);
  const client = connectClient(server.address);
  toClose.push(client);
  return { server, client, socket };
}

beforeAll(async () => {
  tmp = await mkdtemp(path.join(os.tmpdir(), 'guestpull-svc-'));
});
afterEach(async () => {
  for (const c of toClose.splice(0)) c.close();
  await Promise.all(toStop.splice(0).map((s) => s.stop(100)));
});
afterAll(async () => {
  await rm(tmp, { recursive: true, force: true });
});

describe('PullImage', () => {
  it('returns the puller’s manifest digest and passes image and bundle through', async () => {
    const puller = new TestPuller();
    const { client } = await serve(puller);
    const res = await client.pullImage('registry.test/app:1', '/run/kata-containers/c1');
    expect(res).toEqual({ manifest_digest: digestOf('registry.test/app:1') });
    expect(puller.calls.map((c) => [c.image, c.bundle])).toEqual([['registry.test/app:1', '/run/kata-containers/c1']]);
    expect(puller.calls[0]!.signal.aborted).toBe(false);
  });

  // Written out independently of src/service/status.ts so a change there shows up here.
  const expected: [ErrorCode, grpc.status][] = [
    [ErrorCode.INVALID_REFERENCE, grpc.status.INVALID_ARGUMENT],
    [ErrorCode.INVALID_ARGUMENT, grpc.status.INVALID_ARGUMENT],
    [ErrorCode.ALREADY_EXISTS, grpc.status.ALREADY_EXISTS],
    [ErrorCode.NOT_FOUND, grpc.status.NOT_FOUND],
    [ErrorCode.UNAVAILABLE, grpc.status.UNAVAILABLE],
    [ErrorCode.DIGEST_MISMATCH, grpc.status.DATA_LOSS],
    [ErrorCode.BAD_IMAGE, grpc.status.DATA_LOSS],
    [ErrorCode.UNAUTHENTICATED, grpc.status.UNAUTHENTICATED],
    [ErrorCode.PERMISSION_DENIED, grpc.status.PERMISSION_DENIED],
    [ErrorCode.CONFIG, grpc.status.FAILED_PRECONDITION],
    [ErrorCode.RESOURCE_EXHAUSTED, grpc.status.RESOURCE_EXHAUSTED],
    [ErrorCode.DEADLINE_EXCEEDED, grpc.status.DEADLINE_EXCEEDED],
    [ErrorCode.CANCELLED, grpc.status.CANCELLED],
    [ErrorCode.UNIMPLEMENTED, grpc.status.UNIMPLEMENTED],
    [ErrorCode.INITDATA_MISMATCH, grpc.status.FAILED_PRECONDITION],
    [ErrorCode.INTERNAL, grpc.status.INTERNAL],
  ];

  it('covers every error code in the table', () => {
    expect(new Set(expected.map(([c]) => c))).toEqual(new Set(Object.values(ErrorCode)));
    for (const [code, status] of expected) expect(toGrpcStatus(code), code).toBe(status);
  });

  it('maps every error code to its status over the wire, with the message as details', async () => {
    const puller = new TestPuller();
    puller.behaviour = async (image) => {
      const code = image.split('/')[1]! as ErrorCode;
      throw new GuestpullError(code, `failed on purpose with ${code} for ${image}`);
    };
    const { client } = await serve(puller);
    for (const [code, status] of expected) {
      const err = await grpcError(client.pullImage(`registry.test/${code}`, '/b'));
      expect(err.code, code).toBe(status);
      expect(err.details).toBe(`failed on purpose with ${code} for registry.test/${code}`);
    }
  });

  it('maps a non-GuestpullError to INTERNAL', async () => {
    const puller = new TestPuller();
    puller.behaviour = async () => {
      throw new TypeError('undefined is not a function');
    };
    const { client } = await serve(puller);
    const err = await grpcError(client.pullImage('registry.test/x', '/b'));
    expect(err.code).toBe(grpc.status.INTERNAL);
    expect(err.details).toContain('undefined is not a function');
  });

  it('refuses empty fields with INVALID_ARGUMENT without calling the puller', async () => {
    const puller = new TestPuller();
    const { client } = await serve(puller);
    const e1 = await grpcError(client.pullImage('', '/b'));
    expect(e1.code).toBe(grpc.status.INVALID_ARGUMENT);
    expect(e1.details).toContain('image_url');
    const e2 = await grpcError(client.pullImage('registry.test/x', ''));
    expect(e2.code).toBe(grpc.status.INVALID_ARGUMENT);
    expect(e2.details).toContain('bundle_path');
    expect(puller.calls).toHaveLength(0);
  });

  it('refuses oversized requests (receive limit)', async () => {
    const puller = new TestPuller();
    const { client } = await serve(puller);
    const err = await grpcError(client.pullImage(`registry.test/${'a'.repeat(100 * 1024)}`, '/b'));
    expect(err.code).toBe(grpc.status.RESOURCE_EXHAUSTED);
    expect(puller.calls).toHaveLength(0);
  });

  it('runs two slow calls concurrently', async () => {
    const puller = new TestPuller();
    let started = 0;
    let release!: () => void;
    const bothStarted = new Promise<void>((r) => (release = r));
    const spans: { image: string; start: number; end: number }[] = [];
    puller.behaviour = async (image) => {
      const start = Date.now();
      if (++started === 2) release();
      // A serialising server would never let the second call start: fail instead of hanging.
      const ok = await Promise.race([bothStarted.then(() => true), sleep(3000).then(() => false)]);
      if (!ok) throw new GuestpullError(ErrorCode.INTERNAL, 'the second call never started');
      await sleep(200);
      spans.push({ image, start, end: Date.now() });
      return { manifestDigest: digestOf(image) };
    };
    const { client } = await serve(puller);
    const [a, b] = await Promise.all([client.pullImage('registry.test/a', '/a'), client.pullImage('registry.test/b', '/b')]);
    expect(a.manifest_digest).toBe(digestOf('registry.test/a'));
    expect(b.manifest_digest).toBe(digestOf('registry.test/b'));
    expect(spans).toHaveLength(2);
    const [s1, s2] = spans as [(typeof spans)[0], (typeof spans)[0]];
    expect(Math.max(s1.start, s2.start)).toBeLessThan(Math.min(s1.end, s2.end));
  });

  it('aborts the puller’s signal when the call deadline passes', async () => {
    const puller = new TestPuller();
    let reason: Promise<unknown> | undefined;
    puller.behaviour = async (_image, _bundle, signal) => {
      reason = waitForAbort(signal);
      await reason;
      throw new GuestpullError(ErrorCode.CANCELLED, 'stopped');
    };
    const { client } = await serve(puller);
    const t0 = Date.now();
    const err = await grpcError(client.pullImage('registry.test/slow', '/b', { deadlineMs: 300 }));
    expect(err.code).toBe(grpc.status.DEADLINE_EXCEEDED);
    expect(reason).toBeDefined();
    const r = await reason;
    expect(r).toBeInstanceOf(GuestpullError);
    expect((r as GuestpullError).code).toBe(ErrorCode.DEADLINE_EXCEEDED);
    expect(Date.now() - t0).toBeGreaterThanOrEqual(250);
  });

  it('aborts the puller’s signal when the client cancels', async () => {
    const puller = new TestPuller();
    let entered!: () => void;
    const inPull = new Promise<void>((r) => (entered = r));
    let reason: Promise<unknown> | undefined;
    puller.behaviour = async (_image, _bundle, signal) => {
      reason = waitForAbort(signal);
      entered();
      await reason;
      throw new GuestpullError(ErrorCode.CANCELLED, 'stopped');
    };
    const { server } = await serve(puller);
    const raw = new grpc.Client(server.address, grpc.credentials.createInsecure());
    const def = serviceDefinition('api.ImagePullService')['PullImage']!;
    const failed = new Promise<grpc.ServiceError | null>((resolve) => {
      const call = raw.makeUnaryRequest(
        def.path,
        def.requestSerialize,
        def.responseDeserialize,
        { image_url: 'registry.test/c', bundle_path: '/b' },
        (err: grpc.ServiceError | null) => resolve(err),
      );
      void inPull.then(() => call.cancel());
    });
    const err = await failed;
    raw.close();
    expect(err?.code).toBe(grpc.status.CANCELLED);
    const r = await reason;
    expect((r as GuestpullError).code).toBe(ErrorCode.CANCELLED);
  });
});

describe('other services', () => {
  it.each(['SealedSecretService', 'GetResourceService', 'SecureMountService'] as const)('%s answers UNIMPLEMENTED naming itself', async (svc) => {
    const { client } = await serve(new TestPuller());
    const err = await grpcError(client.call(svc));
    expect(err.code).toBe(grpc.status.UNIMPLEMENTED);
    expect(err.details).toContain(`api.${svc} is not implemented by guestpull`);
    expect(err.details).toContain('api.ImagePullService');
  });

  it('health: SERVING for the server and ImagePullService, NOT_FOUND otherwise', async () => {
    const { client } = await serve(new TestPuller());
    expect(await client.health()).toBe('SERVING');
    expect(await client.health('api.ImagePullService')).toBe('SERVING');
    const err = await grpcError(client.health('api.SealedSecretService'));
    expect(err.code).toBe(grpc.status.NOT_FOUND);
  });
});

describe('listening and stopping', () => {
  it('creates the socket directory, binds 0600, and stop() removes the socket', async () => {
    const { server, client, socket } = await serve(new TestPuller());
    expect(server.address).toBe(`unix://${socket}`);
    expect((await lstat(socket)).isSocket()).toBe(true);
    expect((await stat(socket)).mode & 0o777).toBe(0o600);
    expect((await stat(path.dirname(socket))).mode & 0o777).toBe(0o755);
    expect(await client.health()).toBe('SERVING');
    await server.stop();
    await expect(lstat(socket)).rejects.toMatchObject({ code: 'ENOENT' });
  });

  it('replaces a stale socket left by a dead process', async () => {
    const socket = path.join(tmp, 'stale.sock');
    // A child binds the socket and is SIGKILLed: the file stays, nobody listens.
    const child = spawn(process.execPath, [
      '-e',
      `require('net').createServer().listen(${JSON.stringify(socket)}, () => process.kill(process.pid, 'SIGKILL'))`,
    ]);
    await new Promise((r) => child.on('exit', r));
    expect((await lstat(socket)).isSocket()).toBe(true);
    const { client } = await serve(new TestPuller(), `unix://${socket}`);
    expect(await client.health()).toBe('SERVING');
  });

  it('refuses to remove a regular file at the socket path', async () => {
    const file = path.join(tmp, 'not-a-socket');
    await writeFile(file, 'precious');
    await expect(startServer({ listen: `unix://${file}`, puller: new TestPuller(), logger: silentLogger(), version: 't' })).rejects.toMatchObject({
      code: ErrorCode.CONFIG,
      message: expect.stringContaining('not a unix socket'),
    });
    expect(await readFile(file, 'utf8')).toBe('precious');
  });

  it('refuses a socket another server is listening on', async () => {
    const socket = path.join(tmp, 'live.sock');
    const other = net.createServer();
    await new Promise<void>((r) => other.listen(socket, r));
    try {
      await expect(startServer({ listen: `unix://${socket}`, puller: new TestPuller(), logger: silentLogger(), version: 't' })).rejects.toMatchObject({
        code: ErrorCode.CONFIG,
        message: expect.stringContaining('already listening'),
      });
    } finally {
      await new Promise((r) => other.close(r));
    }
  });

  it('listens on TCP 127.0.0.1 with a real port', async () => {
    const { server, client } = await serve(new TestPuller(), '127.0.0.1:0');
    expect(server.address).toMatch(/^127\.0\.0\.1:[1-9]\d*$/);
    expect(await client.pullImage('registry.test/t', '/b')).toEqual({ manifest_digest: digestOf('registry.test/t') });
  });

  it('stop() lets a running pull finish within the grace period', async () => {
    const puller = new TestPuller();
    let entered!: () => void;
    const inPull = new Promise<void>((r) => (entered = r));
    puller.behaviour = async (image, _b, signal) => {
      entered();
      await sleep(300);
      if (signal.aborted) throw new GuestpullError(ErrorCode.CANCELLED, 'aborted');
      return { manifestDigest: digestOf(image) };
    };
    const { server, client, socket } = await serve(puller);
    const pending = client.pullImage('registry.test/finish', '/b');
    await inPull;
    await server.stop(5000);
    expect(await pending).toEqual({ manifest_digest: digestOf('registry.test/finish') });
    await expect(lstat(socket)).rejects.toMatchObject({ code: 'ENOENT' });
  });

  it('stop() aborts pulls still running after the grace period', async () => {
    const puller = new TestPuller();
    let entered!: () => void;
    const inPull = new Promise<void>((r) => (entered = r));
    let reason: Promise<unknown> | undefined;
    puller.behaviour = async (_i, _b, signal) => {
      reason = waitForAbort(signal);
      entered();
      await reason;
      throw new GuestpullError(ErrorCode.CANCELLED, 'aborted');
    };
    const { server, client, socket } = await serve(puller);
    const pending = grpcError(client.pullImage('registry.test/forever', '/b'));
    await inPull;
    const t0 = Date.now();
    await server.stop(200);
    expect(Date.now() - t0).toBeGreaterThanOrEqual(190);
    expect(((await reason) as GuestpullError).code).toBe(ErrorCode.UNAVAILABLE);
    const err = await pending;
    expect(err.code).toBe(grpc.status.UNAVAILABLE);
    expect(err.details).toContain('shutting down');
    await expect(lstat(socket)).rejects.toMatchObject({ code: 'ENOENT' });
  });
});

describe('parseListenAddress', () => {
  it('accepts unix paths, host:port and [v6]:port', () => {
    expect(parseListenAddress('unix:///run/x/cdh.sock')).toMatchObject({ kind: 'unix', path: '/run/x/cdh.sock' });
    expect(parseListenAddress('127.0.0.1:50000')).toMatchObject({ kind: 'tcp', host: '127.0.0.1', port: 50000 });
    expect(parseListenAddress('[::1]:0')).toMatchObject({ kind: 'tcp', host: '::1', port: 0, target: '[::1]:0' });
    expect(parseListenAddress('localhost:8080')).toMatchObject({ kind: 'tcp', host: 'localhost' });
  });
  it.each(['unix://relative.sock', '127.0.0.1', ':80', 'host:99999', '[zz]:1', 'http://h:1', `unix:///${'x'.repeat(120)}`])(
    'refuses %s',
    (addr) => {
      expect(() => parseListenAddress(addr)).toThrow(GuestpullError);
    },
  );
});
