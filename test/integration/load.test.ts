/**
 * Issue 8 §3: load and a full disk, against the real registry and the built daemon (root, default
 * snapshotter `auto` → overlay here).
 *
 * 1. Twenty concurrent PullImage calls: one image into several bundles, different images, images
 *    sharing base layers (the same layer blobs, pushed to different repositories), the same bundle
 *    + image twice (coalesced: both OK, one pull in the daemon log) and one bundle asked for two
 *    images (one wins, the other is ALREADY_EXISTS). Every rootfs equals the expected tree; every
 *    layer blob is fetched from the registry once (its access log); the daemon's peak RSS
 *    (VmHWM) is printed and bounded.
 * 2. A work dir on an 8 MiB tmpfs and an image bigger than that: RESOURCE_EXHAUSTED naming the
 *    work dir and what to do, no half-published layer, empty staging, a clean bundle; then a small
 *    image pulls fine. The same in copy mode with the bundle on a small tmpfs.
 * Every tmpfs is mounted below the test's temp dir and taken down with it (removeTree).
 */
import { status as Status } from '@grpc/grpc-js';
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, readdir, readFile, realpath, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { mount } from '../../src/native/index.js';
import { readMounts } from '../../src/pull/store/mountinfo.js';
import { accessLog, settledLogs } from '../helpers/access-log.js';
import { removeTree } from '../helpers/cleanup.js';
import { startDaemon, type RunningDaemon } from '../helpers/daemon.js';
import { connectClient, type PullClient } from '../helpers/grpc-client.js';
import { assembleImage, buildLayer, type BuiltImage, type BuiltLayer, type EntrySpec } from '../helpers/image-builder.js';
import { pushImage } from '../helpers/push.js';
import { hasRegistryBinary, startRegistry, type RunningRegistry } from '../helpers/registry.js';
import { diffTrees, expectedTreeFromLayers, snapshotTree } from '../helpers/tree.js';

const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const MiB = 1024 * 1024;
/** Generous: the daemon has measured ~130-150 MiB pulling a 300 MiB image. */
const RSS_BOUND_MIB = 400;

let tmp: string;
let registry: RunningRegistry;

interface Img {
  repo: string;
  ref: string;
  specs: EntrySpec[][];
  built: BuiltImage;
}

/** A layer of `files` incompressible files of `size` bytes under `dir`, with its spec. */
async function layer(dir: string, files: number, size: number): Promise<{ spec: EntrySpec[]; built: BuiltLayer }> {
  const spec: EntrySpec[] = [{ type: 'dir', path: dir }];
  for (let i = 0; i < files; i++) spec.push({ type: 'file', path: `${dir}/f${i}`, content: randomBytes(size) });
  return { spec, built: await buildLayer(spec) };
}

async function image(repo: string, layers: { spec: EntrySpec[]; built: BuiltLayer }[]): Promise<Img> {
  const built = assembleImage(
    layers.map((l) => l.built),
    { config: { Cmd: [`/${repo}`] } },
  );
  await pushImage(registry.url, `load/${repo}`, 'v1', built);
  return { repo, ref: `${registry.host}/load/${repo}:v1`, specs: layers.map((l) => l.spec), built };
}

interface Outcome {
  ok: boolean;
  digest?: string;
  code?: number;
  details?: string;
}

async function attempt(client: PullClient, ref: string, bundle: string): Promise<Outcome> {
  try {
    return { ok: true, digest: (await client.pullImage(ref, bundle, { deadlineMs: 120_000 })).manifest_digest };
  } catch (e) {
    const err = e as { code: number; details: string };
    return { ok: false, code: err.code, details: err.details };
  }
}

async function expectTree(bundle: string, img: Img): Promise<void> {
  const diffs = diffTrees(expectedTreeFromLayers(img.specs), await snapshotTree(path.join(bundle, 'rootfs')), { ignore: (p) => p === '.' });
  expect(diffs, `${bundle} (${img.ref})`).toEqual([]);
  const spec = JSON.parse(await readFile(path.join(bundle, 'config.json'), 'utf8')) as { process: { args: string[] } };
  expect(spec.process.args).toEqual([`/${img.repo}`]);
}

/** The daemon's JSON log lines. */
function logLines(daemon: RunningDaemon): Record<string, unknown>[] {
  const out: Record<string, unknown>[] = [];
  for (const line of daemon.logs().split('\n')) {
    if (!line.startsWith('{')) continue;
    try {
      out.push(JSON.parse(line) as Record<string, unknown>);
    } catch {
      // a line cut by a chunk boundary: not one of ours to count
    }
  }
  return out;
}

async function peakRssMiB(pid: number): Promise<number> {
  const status = await readFile(`/proc/${pid}/status`, 'utf8');
  const m = /^VmHWM:\s+(\d+) kB$/m.exec(status);
  if (!m) throw new Error(`no VmHWM in /proc/${pid}/status`);
  return Number(m[1]) / 1024;
}

async function mountTmpfs(dir: string, size: string): Promise<void> {
  await mkdir(dir, { recursive: true });
  mount('tmpfs', dir, 'tmpfs', 0, `size=${size},mode=0755`);
}

async function cdhToml(name: string, workDir: string, snapshotter: 'auto' | 'copy'): Promise<string> {
  const file = path.join(tmp, `${name}.toml`);
  await writeFile(
    file,
    [
      '[image]',
      `work_dir = "${workDir}"`,
      `snapshotter = "${snapshotter}"`,
      '[[image.registry_config.registry]]',
      `location = "${registry.host}"`,
      'insecure = true',
      '',
    ].join('\n'),
  );
  return file;
}

let small: Img;
let big: Img;

beforeAll(async () => {
  if (process.getuid?.() !== 0) throw new Error('the load test needs root (overlay mounts, tmpfs)');
  if (!hasRegistryBinary()) throw new Error('docker-registry is not installed: apt-get install docker-registry');
  tmp = await realpath(await mkdtemp(path.join(os.tmpdir(), 'guestpull-load-')));
  registry = await startRegistry();
  small = await image('small', [await layer('small', 3, 1024)]);
  big = await image('big', [await layer('big-a', 4, 512 * 1024), await layer('big-b', 20, 512 * 1024)]);
}, 120_000);

afterAll(async () => {
  await registry?.stop();
  if (tmp) await removeTree(tmp);
});

describe('20 concurrent PullImage calls', () => {
  let daemon: RunningDaemon;
  let client: PullClient;

  afterAll(async () => {
    client?.close();
    await daemon?.stop();
  });

  it('all correct, shared layers fetched once, identical requests coalesced, bounded memory', async () => {
    const base = await layer('base', 12, 128 * 1024);
    const mid = await layer('mid', 6, 128 * 1024);
    const imgs = {
      a: await image('a', [base, await layer('a', 4, 64 * 1024)]),
      b: await image('b', [base, await layer('b', 4, 64 * 1024)]),
      c: await image('c', [base, mid, await layer('c', 2, 64 * 1024)]),
      d: await image('d', [base, mid, await layer('d', 2, 64 * 1024)]),
      e: await image('e', [await layer('e', 8, 128 * 1024)]),
      f: await image('f', [base]),
      twin: await image('twin', [await layer('twin-a', 16, 256 * 1024), await layer('twin-b', 16, 256 * 1024)]),
    };
    const work = path.join(tmp, 'work');
    const bundles = path.join(tmp, 'bundles');
    await mkdir(bundles);
    daemon = await startDaemon({ repoRoot, socket: path.join(tmp, 'load.sock'), config: await cdhToml('load', work, 'auto'), extraArgs: ['--bundle-root', bundles] });
    client = connectClient(daemon.address);

    const plan: { img: Img; bundle: string }[] = [
      ...['a1', 'a2', 'a3', 'a4'].map((b) => ({ img: imgs.a, bundle: b })),
      ...['b1', 'b2', 'b3'].map((b) => ({ img: imgs.b, bundle: b })),
      ...['c1', 'c2', 'c3'].map((b) => ({ img: imgs.c, bundle: b })),
      ...['d1', 'd2'].map((b) => ({ img: imgs.d, bundle: b })),
      ...['e1', 'e2', 'e3'].map((b) => ({ img: imgs.e, bundle: b })),
      { img: imgs.f, bundle: 'f1' },
      { img: imgs.twin, bundle: 'twin' },
      { img: imgs.twin, bundle: 'twin' },
      { img: imgs.twin, bundle: 'clash' },
      { img: imgs.e, bundle: 'clash' },
    ].map((p) => ({ img: p.img, bundle: path.join(bundles, p.bundle) }));
    expect(plan).toHaveLength(20);

    const t0 = Date.now();
    const outcomes = await Promise.all(plan.map((p) => attempt(client, p.img.ref, p.bundle)));
    const ms = Date.now() - t0;

    // Everything but the clash succeeded with the image's own manifest digest, and is correct.
    for (const [i, p] of plan.entries()) {
      if (path.basename(p.bundle) === 'clash') continue;
      expect(outcomes[i], `${p.img.ref} → ${p.bundle}`).toEqual({ ok: true, digest: p.img.built.manifest.digest });
    }
    for (const p of new Map(plan.filter((p) => path.basename(p.bundle) !== 'clash').map((p) => [p.bundle, p])).values()) await expectTree(p.bundle, p.img);

    // The clash: exactly one of the two images won the bundle, and the bundle holds that one.
    const clash = plan.map((p, i) => ({ ...p, out: outcomes[i]! })).filter((p) => path.basename(p.bundle) === 'clash');
    const winners = clash.filter((c) => c.out.ok);
    const losers = clash.filter((c) => !c.out.ok);
    expect(winners).toHaveLength(1);
    expect(losers).toHaveLength(1);
    expect(losers[0]!.out.code).toBe(Status.ALREADY_EXISTS);
    expect(losers[0]!.out.details).toMatch(new RegExp(`bundle ${path.join(bundles, 'clash')} (is being filled by a pull of ${winners[0]!.img.ref}|already holds)`));
    await expectTree(path.join(bundles, 'clash'), winners[0]!.img);

    // Overlay mode really: the rootfs are overlay mounts.
    expect(readMounts().find((m) => m.mountPoint === path.join(bundles, 'a1', 'rootfs'))?.fstype).toBe('overlay');

    // The twin requests were coalesced: one pull, one join, both answered.
    const lines = logLines(daemon);
    const twin = path.join(bundles, 'twin');
    expect(lines.filter((l) => l['msg'] === 'pull complete' && l['bundle'] === twin)).toHaveLength(1);
    expect(lines.filter((l) => l['msg'] === 'joining identical pull already in progress' && l['bundle'] === twin)).toHaveLength(1);
    expect(lines.filter((l) => l['msg'] === 'PullImage done' && l['bundle'] === twin)).toHaveLength(2);

    // Every layer blob was fetched once, whichever repository it was asked for through.
    const gets = accessLog(await settledLogs(registry)).filter((e) => e.method === 'GET' && e.path.includes('/blobs/'));
    const layerDigests = new Set(Object.values(imgs).flatMap((i) => i.built.layers.map((l) => l.digest)));
    const fetches = [...layerDigests].map((d) => ({ d, n: gets.filter((g) => g.path.endsWith(`/blobs/${d}`) && g.status === 200).length }));
    expect(fetches.filter((f) => f.n !== 1), 'layer blobs not fetched exactly once').toEqual([]);
    // The store unpacked each distinct layer stack once too.
    const unpacked = lines.filter((l) => l['msg'] === 'layer unpacked into the store').map((l) => String(l['chainId']));
    expect(unpacked.length).toBe(new Set(unpacked).size);

    const rss = await peakRssMiB(daemon.pid);
    const mib = Object.values(imgs).reduce((n, i) => n + i.built.layers.reduce((s, l) => s + l.size, 0), 0) / MiB;
    console.log(`load: 20 concurrent PullImage calls (${layerDigests.size} distinct layers, ${mib.toFixed(1)} MiB) in ${ms} ms; daemon peak RSS (VmHWM) ${rss.toFixed(1)} MiB`);
    expect(rss).toBeGreaterThan(10);
    expect(rss).toBeLessThan(RSS_BOUND_MIB);
  }, 240_000);

  it("one caller's deadline fails only that caller: the joined identical call still gets the bundle", async () => {
    const slow = await image('slow', [await layer('slow-a', 32, 512 * 1024), await layer('slow-b', 32, 512 * 1024)]);
    const bundle = path.join(tmp, 'bundles', 'slow');
    const [short, patient] = await Promise.all([
      client.pullImage(slow.ref, bundle, { deadlineMs: 150 }).then(
        () => ({ code: Status.OK, details: '' }),
        (e: { code: number; details: string }) => e,
      ),
      attempt(client, slow.ref, bundle),
    ]);
    expect(short.code).toBe(Status.DEADLINE_EXCEEDED);
    expect(patient).toEqual({ ok: true, digest: slow.built.manifest.digest });
    await expectTree(bundle, slow);
    const lines = logLines(daemon);
    expect(lines.filter((l) => l['msg'] === 'pull complete' && l['bundle'] === bundle)).toHaveLength(1);
    expect(lines.some((l) => l['msg'] === 'every caller of this pull has gone: stopping it' && l['bundle'] === bundle)).toBe(false);
  }, 120_000);
});

/** Layer directories without a record (half-published) and what is left in staging. */
async function storeLeftovers(work: string): Promise<{ halfLayers: string[]; staging: string[]; layers: number }> {
  const layersDir = path.join(work, 'layers');
  const layers = existsSync(layersDir) ? await readdir(layersDir) : [];
  const halfLayers = layers.filter((l) => !existsSync(path.join(layersDir, l, 'layer.json')));
  const stagingDir = path.join(work, 'staging');
  return { halfLayers, staging: existsSync(stagingDir) ? await readdir(stagingDir) : [], layers: layers.length };
}

async function bundleClean(bundle: string): Promise<void> {
  if (existsSync(bundle)) expect(await readdir(bundle)).toEqual([]);
}

describe('a full disk', () => {
  it('overlay: a work dir on an 8 MiB tmpfs fills up → RESOURCE_EXHAUSTED, nothing half-published, then a small pull works', async () => {
    const work = path.join(tmp, 'small-work');
    await mountTmpfs(work, '8m');
    const bundles = path.join(tmp, 'full-bundles');
    await mkdir(bundles);
    const daemon = await startDaemon({ repoRoot, socket: path.join(tmp, 'full.sock'), config: await cdhToml('full', work, 'auto') });
    const client = connectClient(daemon.address);
    try {
      const bundle = path.join(bundles, 'big');
      const out = await attempt(client, big.ref, bundle);
      expect(out.ok).toBe(false);
      expect(out.code).toBe(Status.RESOURCE_EXHAUSTED);
      expect(out.details).toContain(`pull of ${big.ref} into ${bundle} ran out of space`);
      expect(out.details).toContain(`work dir ${work}`);
      expect(out.details).toMatch(/Layers are unpacked into the work dir \S+: free space there, give it a larger filesystem/);
      expect(out.details).toContain('guestpull gc --drop-unused');
      const left = await storeLeftovers(work);
      expect(left.halfLayers).toEqual([]);
      expect(left.staging).toEqual([]);
      await bundleClean(bundle);
      expect(readMounts().some((m) => m.mountPoint.startsWith(bundle + '/'))).toBe(false);

      const ok = path.join(bundles, 'small');
      expect(await attempt(client, small.ref, ok)).toEqual({ ok: true, digest: small.built.manifest.digest });
      await expectTree(ok, small);
      expect((await storeLeftovers(work)).halfLayers).toEqual([]);
    } finally {
      client.close();
      await daemon.stop();
    }
  }, 120_000);

  it('copy: a bundle on a small tmpfs fills up → RESOURCE_EXHAUSTED, the bundle left clean, then a small pull works', async () => {
    const work = path.join(tmp, 'copy-work');
    const bundles = path.join(tmp, 'copy-bundles');
    await mountTmpfs(bundles, '6m');
    const daemon = await startDaemon({ repoRoot, socket: path.join(tmp, 'copy.sock'), config: await cdhToml('copy', work, 'copy') });
    const client = connectClient(daemon.address);
    try {
      const bundle = path.join(bundles, 'big');
      const out = await attempt(client, big.ref, bundle);
      expect(out.ok).toBe(false);
      expect(out.code).toBe(Status.RESOURCE_EXHAUSTED);
      expect(out.details).toContain(`pull of ${big.ref} into ${bundle} ran out of space`);
      expect(out.details).toContain(`Copy bundles are unpacked into the bundle: free space on the filesystem of ${bundle} or give it a larger one`);
      expect(existsSync(bundle)).toBe(false);
      expect(await readdir(bundles)).toEqual([]);

      const ok = path.join(bundles, 'small');
      expect(await attempt(client, small.ref, ok)).toEqual({ ok: true, digest: small.built.manifest.digest });
      await expectTree(ok, small);
      expect((await storeLeftovers(work)).layers).toBe(0);
    } finally {
      client.close();
      await daemon.stop();
    }
  }, 120_000);
});
