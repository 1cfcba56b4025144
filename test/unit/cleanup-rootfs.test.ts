/**
 * Store cleanup (src/pull/store/cleanup.ts) of an overlay pull killed between `mkdir
 * <bundle>/rootfs` and the mount: the dead pending record goes, and so does that rootfs when it is
 * an empty, unmounted real directory made after the record, in a bundle without config.json that
 * no live pull uses; in every other case the rootfs is kept.
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { MNT_DETACH, mount, umount } from '../../src/native/index.js';
import { collectGarbage, removeEmptyRootfs } from '../../src/pull/store/cleanup.js';
import { Layout } from '../../src/pull/store/layout.js';
import { ownerTag, processStart } from '../../src/pull/store/lock.js';
import { mountsUnder, readMounts, type MountEntry } from '../../src/pull/store/mountinfo.js';
import { BundleRecord, writeJsonAtomic } from '../../src/pull/store/records.js';

const isRoot = process.getuid?.() === 0;
const DIGEST = `sha256:${'a'.repeat(64)}`;

let tmp: string;
let layout: Layout;
let dead: string;
let n = 0;

beforeEach(async () => {
  tmp = fs.realpathSync(fs.mkdtempSync(path.join(os.tmpdir(), 'guestpull-cleanup-rootfs-')));
  layout = new Layout(path.join(tmp, 'work'));
  for (const d of [layout.layersDir, layout.configsDir, layout.stagingDir, layout.bundlesDir]) fs.mkdirSync(d, { recursive: true });
  const child = spawn('true', { stdio: 'ignore' });
  await new Promise((r) => child.once('spawn', r));
  dead = `${child.pid}-${processStart(child.pid!) ?? '0'}`;
  await new Promise((r) => child.once('exit', r));
});

afterEach(() => {
  for (const m of mountsUnder(readMounts(), tmp)) umount(m.mountPoint, MNT_DETACH);
  fs.rmSync(tmp, { recursive: true, force: true });
});

/** A bundle record as leaseBundle writes it (state pending unless told), its directories, and its bundle. */
async function record(bundle: string, opts: { owner?: string; state?: 'pending' | 'mounted'; created?: Date } = {}): Promise<BundleRecord> {
  const id = (++n).toString(16).padStart(16, '0');
  const rec: BundleRecord = {
    version: 1, id, state: opts.state ?? 'pending', owner: opts.owner ?? dead, bundle,
    rootfs: opts.state === 'mounted' ? path.join(bundle, 'rootfs') : '', layers: [], image: 'img',
    manifestDigest: DIGEST, configDigest: DIGEST, created: (opts.created ?? new Date(Date.now() - 5000)).toISOString(),
  };
  for (const d of ['upper', 'work']) fs.mkdirSync(path.join(layout.bundleDir(id), d), { recursive: true });
  await writeJsonAtomic(layout.bundleRecord(id), rec);
  return rec;
}

/** A bundle directory with an empty rootfs in it, as a pull killed before its mount leaves it. */
function killedBundle(name: string): string {
  const bundle = path.join(tmp, 'bundles', name);
  fs.mkdirSync(path.join(bundle, 'rootfs'), { recursive: true });
  return bundle;
}

const gc = (mounts?: () => MountEntry[]) => collectGarbage(layout, { dropUnused: false, ...(mounts ? { mounts } : {}) });

describe('cleanup of a dead pending bundle record', () => {
  it('removes its empty, unmounted rootfs (and the record), so the bundle can be pulled again', async () => {
    const bundle = killedBundle('b');
    const rec = await record(bundle);
    const r = await gc();
    expect(r).toMatchObject({ deadBundles: 1, emptyRootfs: 1, liveBundles: 0 });
    expect(fs.readdirSync(bundle)).toEqual([]);
    expect(fs.existsSync(layout.bundleRecord(rec.id))).toBe(false);
    expect(fs.existsSync(layout.bundleDir(rec.id))).toBe(false);
  });

  it('keeps a rootfs that is not empty', async () => {
    const bundle = killedBundle('b');
    fs.writeFileSync(path.join(bundle, 'rootfs/f'), 'x');
    const rec = await record(bundle);
    expect((await removeEmptyRootfs(rec, [], new Set())).reason).toBe('rootfs is not empty');
    expect(await gc()).toMatchObject({ deadBundles: 1, emptyRootfs: 0 });
    expect(fs.readdirSync(path.join(bundle, 'rootfs'))).toEqual(['f']);
  });

  it('keeps an empty rootfs when the bundle has a config.json', async () => {
    const bundle = killedBundle('b');
    fs.writeFileSync(path.join(bundle, 'config.json'), '{}');
    await record(bundle);
    expect(await gc()).toMatchObject({ deadBundles: 1, emptyRootfs: 0 });
    expect(fs.existsSync(path.join(bundle, 'rootfs'))).toBe(true);
  });

  it('keeps an empty rootfs that the mount table shows as a mount point', async () => {
    const bundle = killedBundle('b');
    const rootfs = path.join(bundle, 'rootfs');
    const rec = await record(bundle);
    const fake: MountEntry = { id: 9, parent: 1, mountPoint: rootfs, fstype: 'tmpfs', source: 'none', superOptions: new Map() };
    expect(await gc(() => [...readMounts(), fake])).toMatchObject({ deadBundles: 1, emptyRootfs: 0 });
    expect(fs.existsSync(rootfs)).toBe(true);
    expect((await removeEmptyRootfs(rec, [fake], new Set())).reason).toMatch(/mount/);
  });

  it.skipIf(!isRoot)('keeps an empty rootfs that something else is really mounted on', async () => {
    const bundle = killedBundle('b');
    const rootfs = path.join(bundle, 'rootfs');
    mount('none', rootfs, 'tmpfs', 0, 'size=1m');
    await record(bundle);
    expect(await gc()).toMatchObject({ deadBundles: 1, emptyRootfs: 0 });
    expect(mountsUnder(readMounts(), rootfs).map((m) => m.fstype)).toEqual(['tmpfs']);
  });

  it('keeps a rootfs symlink and what it points to', async () => {
    const bundle = path.join(tmp, 'bundles', 'b');
    const target = path.join(tmp, 'empty-target');
    fs.mkdirSync(bundle, { recursive: true });
    fs.mkdirSync(target);
    fs.symlinkSync(target, path.join(bundle, 'rootfs'));
    const rec = await record(bundle);
    expect((await removeEmptyRootfs(rec, [], new Set())).reason).toBe('rootfs is not a directory');
    expect(await gc()).toMatchObject({ deadBundles: 1, emptyRootfs: 0 });
    expect(fs.lstatSync(path.join(bundle, 'rootfs')).isSymbolicLink()).toBe(true);
    expect(fs.existsSync(target)).toBe(true);
  });

  it('keeps the rootfs of a bundle reached through a symlink (the bundle itself or a parent)', async () => {
    const real = killedBundle('real');
    fs.symlinkSync(real, path.join(tmp, 'alias'));
    fs.symlinkSync(path.join(tmp, 'bundles'), path.join(tmp, 'parent-alias'));
    const viaBundle = await record(path.join(tmp, 'alias'));
    const viaParent = await record(path.join(tmp, 'parent-alias', 'real'));
    expect((await removeEmptyRootfs(viaBundle, [], new Set())).reason).toBe('the bundle is not a directory');
    expect((await removeEmptyRootfs(viaParent, [], new Set())).reason).toBe('the bundle path goes through a symlink');
    expect(await gc()).toMatchObject({ deadBundles: 2, emptyRootfs: 0 });
    expect(fs.existsSync(path.join(real, 'rootfs'))).toBe(true);
  });

  it('keeps a rootfs older than the record (not made by that pull)', async () => {
    const bundle = killedBundle('b');
    await record(bundle, { created: new Date(Date.now() + 60_000) });
    expect(await gc()).toMatchObject({ deadBundles: 1, emptyRootfs: 0 });
    expect(fs.existsSync(path.join(bundle, 'rootfs'))).toBe(true);
  });

  it('keeps the rootfs when a live pull uses the same bundle, and leaves live pending records alone', async () => {
    const bundle = killedBundle('b');
    await record(bundle);
    const live = await record(bundle, { owner: ownerTag() });
    expect(await gc()).toMatchObject({ deadBundles: 1, emptyRootfs: 0, liveBundles: 1 });
    expect(fs.existsSync(path.join(bundle, 'rootfs'))).toBe(true);
    expect(fs.existsSync(layout.bundleRecord(live.id))).toBe(true);
  });

  it('does not touch the rootfs of a dead mounted record (the runtime unmounted it)', async () => {
    const bundle = killedBundle('b');
    await record(bundle, { state: 'mounted' });
    expect(await gc()).toMatchObject({ deadBundles: 1, emptyRootfs: 0 });
    expect(fs.existsSync(path.join(bundle, 'rootfs'))).toBe(true);
  });

  it('is quiet about a record whose bundle is gone', async () => {
    const rec = await record(path.join(tmp, 'never-made'));
    expect(await gc()).toMatchObject({ deadBundles: 1, emptyRootfs: 0 });
    expect((await removeEmptyRootfs(rec, [], new Set())).reason).toBe('the bundle directory is gone');
  });
});
