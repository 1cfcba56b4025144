/**
 * Issue 5 §5: the layer store against the real registry, read from the registry's own access log.
 * Two images share their two base layers: pulled at the same time, each shared layer is fetched
 * once; pulled again into a new bundle (also by a fresh Puller, as after a daemon restart), only
 * the manifest is fetched; a pull that fails on a corrupt layer leaves nothing in the store;
 * `guestpull gc` (the built CLI, run while the store is open in this process) removes dead bundle
 * records, a killed process's leftovers and, with --drop-unused, exactly the layers and configs no
 * mounted bundle uses. Every mount is taken down in afterAll.
 */
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { parseConfig } from '../../src/config/index.js';
import { GuestpullError, ErrorCode } from '../../src/errors.js';
import { silentLogger } from '../../src/log.js';
import { MNT_DETACH, umount } from '../../src/native/index.js';
import { Puller } from '../../src/pull/index.js';
import { chainHex, chainIds, Layout } from '../../src/pull/store/layout.js';
import { processStart } from '../../src/pull/store/lock.js';
import { mountsUnder, readMounts } from '../../src/pull/store/mountinfo.js';
import { accessLog, settledLogs } from '../helpers/access-log.js';
import { buildImage, buildLayer, type BuiltImage } from '../helpers/image-builder.js';
import { pushImage } from '../helpers/push.js';
import { hasRegistryBinary, startRegistry, type RunningRegistry } from '../helpers/registry.js';

const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const VERSION = 'store-test';

let tmp: string;
let registry: RunningRegistry;
let imgA: BuiltImage;
let imgB: BuiltImage;
let imgBad: BuiltImage;
let bundleNo = 0;
const pullers: Puller[] = [];

const workDir = (): string => path.join(tmp, 'work');
const newBundle = (): string => path.join(tmp, 'bundles', `b${++bundleNo}`);

function puller(): Puller {
  const toml = ['[image]', `work_dir = ${JSON.stringify(workDir())}`, 'snapshotter = "overlay"', '[[image.registry_config.registry]]', `location = "${registry.host}"`, 'insecure = true', ''].join('\n');
  const p = new Puller({ config: parseConfig(toml, 'store.test').config, logger: silentLogger(), version: VERSION });
  pullers.push(p);
  return p;
}

/** The GET requests guestpull sent between two reads of the registry log. */
async function requestsDuring(fn: () => Promise<unknown>): Promise<string[]> {
  const before = accessLog(await settledLogs(registry)).length;
  await fn();
  return accessLog(await settledLogs(registry))
    .slice(before)
    .filter((e) => e.userAgent === `guestpull/${VERSION}`)
    .map((e) => `${e.method} ${e.path} ${e.status}`);
}

const blobGets = (reqs: string[], digest: string): number => reqs.filter((r) => r.startsWith('GET ') && r.includes(`/blobs/${digest} 200`)).length;

function gc(...args: string[]): { status: number | null; stdout: string; stderr: string } {
  return spawnSync(process.execPath, [path.join(repoRoot, 'dist/cli.js'), 'gc', '--work-dir', workDir(), ...args], { encoding: 'utf8', timeout: 60_000 });
}

beforeAll(async () => {
  if (!hasRegistryBinary()) throw new Error('docker-registry is not installed: apt-get install docker-registry');
  if (!existsSync(path.join(repoRoot, 'dist/cli.js'))) throw new Error('dist/cli.js is missing: run npm run build first');
  tmp = await mkdtemp(path.join(os.tmpdir(), 'guestpull-store-it-'));
  registry = await startRegistry();
  const base1 = await buildLayer([
    { type: 'dir', path: 'etc', mode: 0o755 },
    { type: 'file', path: 'etc/os-release', content: 'ID=base\n' },
    { type: 'file', path: 'etc/old', content: 'removed by layer 2\n' },
  ]);
  const base2 = await buildLayer([
    { type: 'whiteout', path: 'etc/old' },
    { type: 'dir', path: 'usr', mode: 0o755 },
    { type: 'file', path: 'usr/shared', content: 'x'.repeat(200_000) },
  ]);
  imgA = await buildImage({ layers: [base1, base2, [{ type: 'file', path: 'app-a', content: 'A\n' }]], config: { Cmd: ['/app-a'] } });
  imgB = await buildImage({ layers: [base1, base2, [{ type: 'file', path: 'app-b', content: 'B\n' }]], config: { Cmd: ['/app-b'] } });
  imgBad = await buildImage({ layers: [base1, [{ type: 'file', path: 'big', content: 'y'.repeat(100_000) }]], config: { Cmd: ['/big'] } });
  await pushImage(registry.url, 'share/a', 'v1', imgA);
  await pushImage(registry.url, 'share/b', 'v1', imgB);
  await pushImage(registry.url, 'share/bad', 'v1', imgBad);
  // Corrupt the bad image's top layer in the registry's storage, keeping its size.
  const hex = imgBad.layers[1]!.digest.slice('sha256:'.length);
  const data = path.join(registry.dir, 'data/docker/registry/v2/blobs/sha256', hex.slice(0, 2), hex, 'data');
  const bytes = readFileSync(data);
  bytes[bytes.length >> 1] ^= 0xff;
  writeFileSync(data, bytes);
}, 60_000);

afterAll(async () => {
  for (const p of pullers) await p.close();
  await registry?.stop();
  if (tmp) {
    for (const m of mountsUnder(readMounts(), tmp)) umount(m.mountPoint, MNT_DETACH);
    await rm(tmp, { recursive: true, force: true });
  }
});

describe('the layer store', () => {
  let a1: string;
  let b1: string;

  it('fetches each layer two concurrent pulls share once', async () => {
    const p = puller();
    [a1, b1] = [newBundle(), newBundle()];
    const reqs = await requestsDuring(() =>
      Promise.all([p.pull(`${registry.host}/share/a:v1`, a1), p.pull(`${registry.host}/share/b:v1`, b1)]),
    );
    for (const shared of imgA.layers.slice(0, 2)) expect(blobGets(reqs, shared.digest), `shared layer ${shared.digest}`).toBe(1);
    expect(blobGets(reqs, imgA.layers[2]!.digest)).toBe(1);
    expect(blobGets(reqs, imgB.layers[2]!.digest)).toBe(1);
    expect(readFileSync(path.join(a1, 'rootfs/app-a'), 'utf8')).toBe('A\n');
    expect(readFileSync(path.join(b1, 'rootfs/app-b'), 'utf8')).toBe('B\n');
    for (const b of [a1, b1]) {
      expect(readdirSync(path.join(b, 'rootfs')).sort()).toEqual([b === a1 ? 'app-a' : 'app-b', 'etc', 'usr']);
      expect(existsSync(path.join(b, 'rootfs/etc/old'))).toBe(false);
      expect(readdirSync(b).sort()).toEqual(['config.json', 'rootfs']);
    }
    // One store directory per layer of the two chains: 2 shared + 2 tops.
    expect(readdirSync(new Layout(workDir()).layersDir)).toHaveLength(4);
  });

  it('pulls an image whose layers are in the store with one manifest request, also after a restart', async () => {
    const again = newBundle();
    let reqs = await requestsDuring(() => pullers[0]!.pull(`${registry.host}/share/a:v1`, again));
    expect(reqs).toEqual(['GET /v2/share/a/manifests/v1 200']);
    expect(readFileSync(path.join(again, 'rootfs/app-a'), 'utf8')).toBe('A\n');
    expect(JSON.parse(await readFile(path.join(again, 'config.json'), 'utf8')).process.args).toEqual(['/app-a']);

    const restarted = puller();
    reqs = await requestsDuring(() => restarted.pull(`${registry.host}/share/b:v1`, newBundle()));
    expect(reqs).toEqual(['GET /v2/share/b/manifests/v1 200']);
  });

  it('leaves nothing in the store or the bundle when a layer is corrupt', async () => {
    const bundle = newBundle();
    const layout = new Layout(workDir());
    const before = readdirSync(layout.layersDir).sort();
    const err = await pullers[0]!.pull(`${registry.host}/share/bad:v1`, bundle).then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(GuestpullError);
    expect((err as GuestpullError).code).toBe(ErrorCode.DIGEST_MISMATCH);
    expect(existsSync(bundle)).toBe(false);
    expect(readdirSync(layout.layersDir).sort()).toEqual(before); // its base layer was already there
    const bad = chainIds([imgBad.layers[0]!.diffId, imgBad.layers[1]!.diffId]);
    expect(existsSync(layout.layerDir(chainHex(bad[1]!)))).toBe(false);
    expect(readdirSync(layout.stagingDir)).toEqual([]);
    expect(readdirSync(layout.bundlesDir).filter((n) => n.endsWith('.json'))).toHaveLength(4); // a1, b1 and the two re-pulls
    expect(mountsUnder(readMounts(), layout.root)).toEqual([]);
  });

  it('guestpull gc removes dead bundles and crash leftovers, and with --drop-unused only unused layers', async () => {
    const layout = new Layout(workDir());
    const records = (): string[] => readdirSync(layout.bundlesDir).filter((n) => n.endsWith('.json')).sort();
    const liveRecords = records();
    // The runtime unmounts every bundle of image B (and the bundle of the corrupt pull never was).
    const bBundles = readdirSync(path.join(tmp, 'bundles')).map((b) => path.join(tmp, 'bundles', b)).filter((b) => existsSync(path.join(b, 'rootfs/app-b')));
    expect(bBundles).toHaveLength(2);
    for (const b of bBundles) umount(path.join(b, 'rootfs'), 0);
    // A killed pull's leftovers: its staging directory, and a layer directory without a record.
    const dead = spawn('true');
    await new Promise((r) => dead.once('spawn', r));
    const deadTag = `${dead.pid}-${processStart(dead.pid!)}`;
    await new Promise((r) => dead.once('exit', r));
    mkdirSync(path.join(layout.stagingDir, `${deadTag}-00112233445566778899`, 'layer/diff'), { recursive: true });
    mkdirSync(layout.layerDiff('f'.repeat(64)), { recursive: true });
    await writeFile(path.join(layout.layerDiff('f'.repeat(64)), 'planted'), 'never trusted');

    let r = gc();
    expect(r.stderr).toBe('');
    expect(r.status).toBe(0);
    expect(r.stdout).toMatch(/removed 1 staging, 1 incomplete layers, 2 dead bundle records, 0 unused layers, 0 unused configs/);
    expect(r.stdout).toMatch(/kept 4 layers, 2 live bundles/);
    expect(records()).toHaveLength(liveRecords.length - 2);
    expect(readdirSync(layout.stagingDir)).toEqual([]);

    r = gc('--drop-unused');
    expect(r.status).toBe(0);
    expect(r.stdout).toMatch(/0 dead bundle records, 1 unused layers, 2 unused configs/); // B's, and the corrupt image's
    const chainA = chainIds(imgA.layers.map((l) => l.diffId)).map(chainHex);
    const chainB = chainIds(imgB.layers.map((l) => l.diffId)).map(chainHex);
    expect(readdirSync(layout.layersDir).sort()).toEqual([...chainA].sort());
    expect(existsSync(layout.layerDir(chainB[2]!))).toBe(false);
    expect(existsSync(layout.configFile(imgA.config.digest))).toBe(true);
    expect(existsSync(layout.configFile(imgB.config.digest))).toBe(false);
    expect(existsSync(layout.configFile(imgBad.config.digest))).toBe(false);
    // The bundles of A still work.
    expect(readFileSync(path.join(a1, 'rootfs/usr/shared'), 'utf8')).toHaveLength(200_000);

    // B again: only its own top layer and its config are fetched; the shared base is still there.
    const reqs = await requestsDuring(() => pullers[0]!.pull(`${registry.host}/share/b:v1`, newBundle()));
    expect(reqs.sort()).toEqual(
      ['GET /v2/share/b/manifests/v1 200', `GET /v2/share/b/blobs/${imgB.config.digest} 200`, `GET /v2/share/b/blobs/${imgB.layers[2]!.digest} 200`].sort(),
    );
    expect(b1).toBeDefined();
  });

  it('the daemon\'s sweep drops the record of a bundle the runtime removed, and keeps a mounted one', async () => {
    const p = puller();
    const [gone, kept] = [newBundle(), newBundle()];
    await p.pull(`${registry.host}/share/a:v1`, gone);
    await p.pull(`${registry.host}/share/a:v1`, kept);
    const layout = new Layout(workDir());
    const recorded = async (): Promise<string[]> => {
      const out: string[] = [];
      for (const name of readdirSync(layout.bundlesDir).filter((n) => n.endsWith('.json'))) {
        out.push((JSON.parse(await readFile(path.join(layout.bundlesDir, name), 'utf8')) as { bundle: string }).bundle);
      }
      return out;
    };
    expect(await recorded()).toEqual(expect.arrayContaining([gone, kept]));
    // What the kata agent does when a container goes: unmount and remove the bundle.
    umount(path.join(gone, 'rootfs'), 0);
    await rm(gone, { recursive: true, force: true });
    await p.sweep();
    const after = await recorded();
    expect(after).not.toContain(gone);
    expect(after).toContain(kept);
    expect(readFileSync(path.join(kept, 'rootfs/app-a'), 'utf8')).toBe('A\n');
  });

  it('guestpull gc on a work dir that does not exist has nothing to do', () => {
    const r = spawnSync(process.execPath, [path.join(repoRoot, 'dist/cli.js'), 'gc', '--work-dir', path.join(tmp, 'nowhere')], { encoding: 'utf8' });
    expect(r.status).toBe(0);
    expect(r.stdout).toContain('does not exist: nothing to collect');
    expect(existsSync(path.join(tmp, 'nowhere'))).toBe(false);
  });
});
