/**
 * Issue 8 §1: pulls through a fault-injecting proxy (test/helpers/fault-proxy.ts) in front of the
 * real distribution registry, by the built daemon over gRPC. For each fault the pull either
 * succeeds with the expected rootfs (retries, `Range` resume: asserted from the proxy's records)
 * or fails well before its deadline with the right status and a message naming the endpoint
 * (host:port) and the fault; in every case no staging directory survives, in the bundle root or
 * the work dir. Then the same through squid: guestpull's https_proxy is a fault proxy in front of
 * squid, which tunnels to an HTTPS registry (private CA in extra_root_certificates): reset on
 * CONNECT (once, always), a CONNECT never answered, and tunnels cut mid-blob.
 *
 * Timeouts are tuned small (connect 2 s, headers 1 s, idle 1 s, 3 attempts) so each case takes
 * seconds; snapshotter = "copy", so every pull fetches every blob.
 */
import { status as Status } from '@grpc/grpc-js';
import { mkdtemp, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { accessLog } from '../helpers/access-log.js';
import { removeTree } from '../helpers/cleanup.js';
import { startDaemon, type RunningDaemon } from '../helpers/daemon.js';
import { startFaultProxy, type FaultProxy, type FaultRule, type RequestRecord } from '../helpers/fault-proxy.js';
import { pushImage } from '../helpers/push.js';
import { hasRegistryBinary, startRegistry, type RunningRegistry } from '../helpers/registry.js';
import { hasSquid, startSquid, type RunningSquid } from '../helpers/squid.js';
import { createPki, type Pki } from '../helpers/tls.js';
import { diffTrees, snapshotTree } from '../helpers/tree.js';
import { blobPath, bundleContents, faultImage, faultToml, leftovers, startPull, within, type FixtureImage, type PullOutcome } from './fault-harness.js';

const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const REPO = 'faults/app';
const MAX_ATTEMPTS = 3;
/** Client deadline of every pull here; failures must come well before it. */
const DEADLINE_MS = 30_000;
const FAIL_WITHIN_MS = 12_000;

let tmp: string;
let pki: Pki;
let registry: RunningRegistry;
let tlsRegistry: RunningRegistry;
let squid: RunningSquid;
let direct: FaultProxy;
let viaSquid: FaultProxy;
let daemon: RunningDaemon;
let fx: FixtureImage;
let bundleNo = 0;

const workDir = (): string => path.join(tmp, 'work');
const bundleRoot = (): string => path.join(tmp, 'bundles');

beforeAll(async () => {
  if (!hasRegistryBinary()) throw new Error('docker-registry is not installed: apt-get install docker-registry');
  if (!hasSquid()) throw new Error('squid is not installed: apt-get install squid');
  tmp = await mkdtemp(path.join(os.tmpdir(), 'guestpull-faults-'));
  pki = createPki('guestpull-faults-pki-');
  [registry, tlsRegistry, squid] = await Promise.all([
    startRegistry(),
    startRegistry({ tls: { certFile: pki.server.certFile, keyFile: pki.server.keyFile } }),
    startSquid(),
  ]);
  fx = await faultImage('faults');
  await pushImage(registry.url, REPO, 'v1', fx.image);
  await pushImage(tlsRegistry.url, REPO, 'v1', fx.image, { ca: pki.ca.cert });
  direct = await startFaultProxy({ target: registry.host });
  viaSquid = await startFaultProxy({ target: new URL(squid.url).host });
  const cdhToml = path.join(tmp, 'cdh.toml');
  await writeFile(
    cdhToml,
    faultToml({ workDir: workDir(), snapshotter: 'copy', insecure: [direct.host], httpsProxy: viaSquid.url, certs: [pki.ca.cert], idleTimeoutSecs: 1, maxAttempts: MAX_ATTEMPTS }),
  );
  daemon = await startDaemon({ repoRoot, socket: path.join(tmp, 'run', 'cdh.sock'), config: cdhToml });
}, 120_000);

afterAll(async () => {
  await daemon?.stop();
  await Promise.all([direct?.close(), viaSquid?.close()]);
  await Promise.all([registry?.stop(), tlsRegistry?.stop(), squid?.stop()]);
  pki?.cleanup();
  if (tmp) await removeTree(tmp);
});

beforeEach(async () => {
  // Each case starts on fresh connections: no keep-alive connection or tunnel of an earlier case.
  for (const p of [direct, viaSquid]) {
    p.setRules([]);
    await p.dropConnections();
    p.clearRecords();
  }
  await new Promise((r) => setTimeout(r, 100));
});

const image = (host: string, ref = ':v1'): string => `${host}/${REPO}${ref}`;

interface Run {
  outcome: PullOutcome;
  bundle: string;
}

async function pull(ref: string): Promise<Run> {
  const bundle = path.join(bundleRoot(), `b${++bundleNo}`);
  const outcome = await startPull(daemon.address, ref, bundle, DEADLINE_MS).outcome;
  return { outcome, bundle };
}

/** A pull that must succeed with the expected rootfs; nothing left over. */
async function expectGood(r: Run): Promise<void> {
  if (!r.outcome.ok) throw new Error(`pull failed (${Status[r.outcome.code]}): ${r.outcome.details}\n${daemon.logs().slice(-4000)}`);
  expect(r.outcome.digest).toBe(fx.image.manifest.digest);
  expect(await bundleContents(r.bundle)).toEqual(['config.json', 'rootfs']);
  expect(diffTrees(fx.expected, await snapshotTree(path.join(r.bundle, 'rootfs')))).toEqual([]);
  expect(await leftovers(bundleRoot(), workDir())).toEqual([]);
}

/** A pull that must fail with `code` well before its deadline, naming `endpoint`; nothing left over. */
async function expectFailure(r: Run, code: Status, endpoint: string): Promise<string> {
  if (r.outcome.ok) throw new Error(`pull of ${r.bundle} unexpectedly succeeded`);
  expect({ code: Status[r.outcome.code], details: r.outcome.details }).toMatchObject({ code: Status[code] });
  expect(r.outcome.ms).toBeLessThan(FAIL_WITHIN_MS);
  expect(r.outcome.details).toContain(endpoint);
  expect(await bundleContents(r.bundle)).toEqual([]);
  expect(await leftovers(bundleRoot(), workDir())).toEqual([]);
  return r.outcome.details;
}

const blobRequests = (p: FaultProxy, digest = fx.bigDigest): RequestRecord[] => p.requests().filter((q) => q.method === 'GET' && q.target.endsWith(digest));
const manifestRequests = (p: FaultProxy): RequestRecord[] => p.requests().filter((q) => q.method === 'GET' && q.target === `/v2/${REPO}/manifests/v1`);
const rule = (r: FaultRule): FaultRule[] => [r];
const bigBlob = (): RegExp => blobPath(REPO, fx.bigDigest);

describe('direct to the registry through the fault proxy', () => {
  it('cut mid-blob once: resumed with Range from the exact byte, correct rootfs', async () => {
    direct.setRules(rule({ method: 'GET', path: bigBlob(), times: 1, fault: { kind: 'cut', afterBytes: 300_000 } }));
    await expectGood(await pull(image(direct.host)));
    const reqs = blobRequests(direct);
    // Resumed from the last byte guestpull took in: at most what the proxy sent before the cut
    // (bytes still in socket buffers when the connection broke are fetched again).
    expect(reqs.map((q) => [q.status, q.faultFired ?? false])).toEqual([
      [200, true],
      [206, false],
    ]);
    expect(reqs[0]!.bodyBytes).toBe(300_000);
    const from = Number(/^bytes=(\d+)-$/.exec(reqs[1]!.headers.range ?? '')?.[1]);
    expect(from).toBeGreaterThan(0);
    expect(from).toBeLessThanOrEqual(300_000);
    expect(reqs[1]!.bodyBytes).toBe(fx.bigSize - from);
  });

  it('cut before any body byte, every time: UNAVAILABLE after max_attempts, naming the endpoint and the reset', async () => {
    direct.setRules(rule({ method: 'GET', path: bigBlob(), fault: { kind: 'cut', afterBytes: 0 } }));
    const details = await expectFailure(await pull(image(direct.host)), Status.UNAVAILABLE, direct.host);
    expect(details).toContain(fx.bigDigest);
    expect(details).toMatch(/connection reset/);
    expect(blobRequests(direct)).toHaveLength(MAX_ATTEMPTS);
  });

  it('stall mid-blob once: the idle timeout (1 s) ends it, resumed with Range', async () => {
    direct.setRules(rule({ path: bigBlob(), times: 1, fault: { kind: 'stall', afterBytes: 200_000 } }));
    const r = await pull(image(direct.host));
    await expectGood(r);
    expect(r.outcome.ms).toBeGreaterThanOrEqual(1000);
    expect(blobRequests(direct).map((q) => q.headers.range)).toEqual([undefined, 'bytes=200000-']);
  });

  it('stall mid-blob, then every resume stalls at once: UNAVAILABLE "stalled", well before the deadline', async () => {
    direct.setRules([
      { path: bigBlob(), times: 1, fault: { kind: 'stall', afterBytes: 200_000 } },
      { path: bigBlob(), fault: { kind: 'stall', afterBytes: 0 } },
    ]);
    const details = await expectFailure(await pull(image(direct.host)), Status.UNAVAILABLE, direct.host);
    expect(details).toMatch(/stalled, timed out: no response body data for 1000 ms/);
    expect(details).toContain(`at byte 200000 of ${fx.bigSize}`);
    expect(blobRequests(direct).map((q) => q.headers.range)).toEqual([undefined, 'bytes=200000-', 'bytes=200000-']);
  });

  it('stall before the response head once: headers timeout, retried, correct rootfs', async () => {
    direct.setRules(rule({ path: /\/manifests\/v1$/, times: 1, fault: { kind: 'stall' } }));
    const r = await pull(image(direct.host));
    await expectGood(r);
    expect(manifestRequests(direct)).toHaveLength(2);
  });

  it('drip (1 MB/s on the big blob): slow but whole', async () => {
    direct.setRules(rule({ path: bigBlob(), fault: { kind: 'drip', bytesPerSecond: 1_000_000 } }));
    const r = await pull(image(direct.host));
    await expectGood(r);
    expect(r.outcome.ms).toBeGreaterThanOrEqual(900);
    expect(blobRequests(direct)).toHaveLength(1);
  });

  it('drip slower than the deadline allows: DEADLINE_EXCEEDED at the deadline, then nothing left', async () => {
    direct.setRules(rule({ path: bigBlob(), fault: { kind: 'drip', bytesPerSecond: 50_000 } }));
    const bundle = path.join(bundleRoot(), `b${++bundleNo}`);
    const outcome = await startPull(daemon.address, image(direct.host), bundle, 2500).outcome;
    expect(outcome.ok ? 'OK' : Status[outcome.code]).toBe('DEADLINE_EXCEEDED');
    expect(outcome.ms).toBeLessThan(3500);
    // The daemon stops on its own deadline timer; give it the 1 s issue 8 §4 allows.
    const t0 = performance.now();
    while ((await bundleContents(bundle)).length > 0 || (await leftovers(bundleRoot(), workDir())).length > 0) {
      if (performance.now() - t0 > 1000) throw new Error(`still there after 1 s: ${JSON.stringify(await leftovers(bundleRoot(), workDir()))}`);
      await new Promise((r) => setTimeout(r, 20));
    }
  });

  it('reset on the blob request once: retried, correct rootfs', async () => {
    direct.setRules(rule({ method: 'GET', path: bigBlob(), times: 1, fault: { kind: 'reset' } }));
    await expectGood(await pull(image(direct.host)));
    expect(blobRequests(direct).map((q) => [q.fault, q.status])).toEqual([
      ['reset', undefined],
      [undefined, 200],
    ]);
  });

  it('reset mid-body once: resumed with Range', async () => {
    direct.setRules(rule({ method: 'GET', path: bigBlob(), times: 1, fault: { kind: 'reset', afterBytes: 500_000 } }));
    await expectGood(await pull(image(direct.host)));
    expect(blobRequests(direct).map((q) => q.headers.range)).toEqual([undefined, 'bytes=500000-']);
  });

  it('reset every time: UNAVAILABLE "connection reset" naming host:port, after max_attempts requests', async () => {
    direct.setRules(rule({ method: 'GET', path: bigBlob(), fault: { kind: 'reset' } }));
    const details = await expectFailure(await pull(image(direct.host)), Status.UNAVAILABLE, direct.host);
    expect(details).toContain('connection reset');
    expect(blobRequests(direct)).toHaveLength(MAX_ATTEMPTS);
  });

  it('503 with Retry-After: 1 on the manifest once: the retry waits at least 1 s', async () => {
    direct.setRules(rule({ path: /\/manifests\/v1$/, times: 1, fault: { kind: 'status', status: 503, retryAfter: 1 } }));
    await expectGood(await pull(image(direct.host)));
    const [first, second] = manifestRequests(direct);
    expect([first?.status, second?.status]).toEqual([503, 200]);
    // Timer granularity: allow 10 ms.
    expect(second!.receivedAt - first!.respondedAt!).toBeGreaterThanOrEqual(990);
  });

  it('429 with Retry-After: 2 on the big blob once: the retry waits at least 2 s', async () => {
    direct.setRules(rule({ path: bigBlob(), times: 1, fault: { kind: 'status', status: 429, retryAfter: 2 } }));
    await expectGood(await pull(image(direct.host)));
    const [first, second] = blobRequests(direct);
    expect([first?.status, second?.status]).toEqual([429, 200]);
    expect(second!.receivedAt - first!.respondedAt!).toBeGreaterThanOrEqual(1990);
  });

  it('503 every time: UNAVAILABLE "HTTP 503" naming host:port, after max_attempts requests', async () => {
    direct.setRules(rule({ path: /\/manifests\/v1$/, fault: { kind: 'status', status: 503 } }));
    const details = await expectFailure(await pull(image(direct.host)), Status.UNAVAILABLE, direct.host);
    expect(details).toContain('HTTP 503');
    expect(manifestRequests(direct)).toHaveLength(MAX_ATTEMPTS);
  });

  it('500 on a blob every time: UNAVAILABLE "HTTP 500"', async () => {
    direct.setRules(rule({ path: bigBlob(), fault: { kind: 'status', status: 500 } }));
    const details = await expectFailure(await pull(image(direct.host)), Status.UNAVAILABLE, direct.host);
    expect(details).toContain('HTTP 500');
    expect(details).toContain(fx.bigDigest);
  });

  it('wrong Content-Length on a blob: DATA_LOSS "Content-Length mismatch", not retried', async () => {
    direct.setRules(rule({ path: bigBlob(), fault: { kind: 'wrong-length', delta: -100 } }));
    const details = await expectFailure(await pull(image(direct.host)), Status.DATA_LOSS, direct.host);
    expect(details).toContain('Content-Length mismatch');
    expect(details).toContain(`announces ${fx.bigSize - 100} bytes, the descriptor promises ${fx.bigSize}`);
    expect(blobRequests(direct)).toHaveLength(1);
  });

  it('too large a Content-Length on the manifest once: the short body is fetched again, correct rootfs', async () => {
    direct.setRules(rule({ path: /\/manifests\/v1$/, times: 1, fault: { kind: 'wrong-length', delta: 50 } }));
    await expectGood(await pull(image(direct.host)));
    expect(manifestRequests(direct).map((q) => q.fault)).toEqual(['wrong-length', undefined]);
  });

  // A body that ends only when the connection closes (no Content-Length, not chunked) is refused
  // before it is read: undici takes the process down when such a connection closes while the
  // body is paused for backpressure (nodejs/undici#5360). Refused, then retried.
  it('truncated gzip layer (close-delimited body) once: refused unread, retried whole, correct rootfs', async () => {
    direct.setRules(rule({ path: bigBlob(), times: 1, fault: { kind: 'truncate-gzip', keepBytes: 400_000 } }));
    await expectGood(await pull(image(direct.host)));
    const reqs = blobRequests(direct);
    // Two whole requests, no Range: the first answer was dropped at its headers (so the proxy may
    // not even have reached its cut point), the second read in full.
    expect(reqs.map((q) => q.headers.range)).toEqual([undefined, undefined]);
    expect(reqs[0]!.bodyBytes).toBeLessThan(fx.bigSize);
    expect(reqs[1]!.faultFired ?? false).toBe(false);
    expect(reqs[1]!.bodyBytes).toBe(fx.bigSize);
  });

  it('manifest always close-delimited: UNAVAILABLE naming host:port and the framing, the daemon still up', async () => {
    const digest = fx.image.manifest.digest;
    direct.setRules(rule({ path: new RegExp(`/manifests/${digest}$`), fault: { kind: 'truncate-gzip', keepBytes: 100 } }));
    const details = await expectFailure(await pull(image(direct.host, `@${digest}`)), Status.UNAVAILABLE, direct.host);
    expect(details).toMatch(/ends only when the connection closes \(no Content-Length, not chunked\)/);
    direct.setRules([]);
    await expectGood(await pull(image(direct.host)));
  });
});

describe('through squid, with the fault proxy between guestpull and squid', () => {
  /** squid's CONNECT lines for the TLS registry once every tunnel has been logged. */
  async function squidTunnels(): Promise<string[]> {
    await squid.sync();
    return squid.entries().filter((e) => e.method === 'CONNECT' && e.url === tlsRegistry.host).map((e) => e.result);
  }

  it('reset on CONNECT once: a new tunnel is opened, correct rootfs', async () => {
    const before = (await squidTunnels()).length;
    viaSquid.setRules(rule({ method: 'CONNECT', path: new RegExp(`^${tlsRegistry.host.replace(/\./g, '\\.')}$`), times: 1, fault: { kind: 'reset' } }));
    await expectGood(await pull(image(tlsRegistry.host)));
    const connects = viaSquid.requests().filter((q) => q.method === 'CONNECT');
    expect(connects[0]).toMatchObject({ target: tlsRegistry.host, fault: 'reset', faultFired: true });
    expect(connects.slice(1).every((q) => q.status === 200 && q.fault === undefined)).toBe(true);
    expect(connects.length).toBeGreaterThanOrEqual(2);
    // squid never saw the reset CONNECT; it tunnelled the others (logged once they close).
    await viaSquid.dropConnections();
    const tunnels = (await squidTunnels()).slice(before);
    expect(tunnels.length).toBe(connects.length - 1);
    expect(tunnels.every((t) => t === 'TCP_TUNNEL/200')).toBe(true);
  });

  it('reset on every CONNECT: UNAVAILABLE blaming the proxy, naming the registry and the reset, after max_attempts', async () => {
    viaSquid.setRules(rule({ method: 'CONNECT', path: /.*/, fault: { kind: 'reset' } }));
    const details = await expectFailure(await pull(image(tlsRegistry.host)), Status.UNAVAILABLE, tlsRegistry.host);
    expect(details).toContain(`proxy ${viaSquid.url} failed while opening a tunnel to ${tlsRegistry.url} (CONNECT ${tlsRegistry.host}): connection reset`);
    expect(viaSquid.requests().filter((q) => q.method === 'CONNECT')).toHaveLength(MAX_ATTEMPTS);
  });

  it('CONNECT never answered: UNAVAILABLE "stalled" blaming the proxy, after max_attempts', async () => {
    viaSquid.setRules(rule({ method: 'CONNECT', path: /.*/, fault: { kind: 'stall' } }));
    const details = await expectFailure(await pull(image(tlsRegistry.host)), Status.UNAVAILABLE, tlsRegistry.host);
    expect(details).toContain(`proxy ${viaSquid.url} failed while opening a tunnel to ${tlsRegistry.url}`);
    expect(details).toContain('stalled, timed out waiting 1000 ms for response headers');
    expect(viaSquid.requests().filter((q) => q.method === 'CONNECT')).toHaveLength(MAX_ATTEMPTS);
  });

  it('tunnels cut mid-blob (TLS inside): resumed with Range (206 in the registry log), correct rootfs', async () => {
    viaSquid.setRules(rule({ method: 'CONNECT', path: /.*/, fault: { kind: 'cut', afterBytes: 400_000 } }));
    const logsBefore = daemon.logs().length;
    const accessBefore = accessLog(tlsRegistry.logs()).length;
    await expectGood(await pull(image(tlsRegistry.host)));
    expect(viaSquid.stats().faultsFired.cut ?? 0).toBeGreaterThanOrEqual(1);
    // distribution logs a request once answered; the pull is over, so the lines come within moments.
    const ranged = (): boolean => accessLog(tlsRegistry.logs()).slice(accessBefore).some((e) => e.path === `/v2/${REPO}/blobs/${fx.bigDigest}` && e.status === 206);
    expect(await within(2000, ranged)).toBeDefined();
    expect(daemon.logs().slice(logsBefore)).toContain('blob download interrupted; resuming');
  });
});
