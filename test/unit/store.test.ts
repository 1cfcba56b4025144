/**
 * The layer store on the real kernel (root, overlayfs, the native addon), with stand-in unpackers
 * instead of the registry: layers are published by one rename only after `unpack` succeeds;
 * failures and crash leftovers (dead processes' staging directories with build mounts still in
 * them, layers without records, dead bundle records) are never trusted and are cleaned at open;
 * a layer wanted by concurrent pulls is unpacked once; garbage collection keeps exactly what
 * live bundles and running pulls use.
 */
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { silentLogger } from '../../src/log.js';
import { mount, umount, MNT_DETACH } from '../../src/native/index.js';
import { chainHex, chainIds, Layout } from '../../src/pull/store/layout.js';
import { ownerTag, processStart } from '../../src/pull/store/lock.js';
import { mountsUnder, readMounts } from '../../src/pull/store/mountinfo.js';
import { BundleRecord, LayerRecord, readRecord, writeJsonAtomic } from '../../src/pull/store/records.js';
import { Store, type LayerSpec } from '../../src/pull/store/store.js';

const log = silentLogger();
const diffIds = ['a', 'b', 'c'].map((c) => `sha256:${c.repeat(64)}`);
const chain = chainIds(diffIds);

let tmp: string;
let stores: Store[];

beforeEach(() => {
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'guestpull-store-'));
  stores = [];
});

afterEach(async () => {
  for (const s of stores) await s.release();
  for (const m of mountsUnder(readMounts(), tmp)) umount(m.mountPoint, MNT_DETACH);
  fs.rmSync(tmp, { recursive: true, force: true });
});

async function open(workDir = path.join(tmp, 'work')): Promise<Store> {
  const s = await Store.open({ workDir, logger: log, lockWaitMs: 2000 });
  stores.push(s);
  expect(await s.mode('overlay')).toBe('overlay');
  return s;
}

interface Calls {
  n: number;
}

/** A layer spec whose unpack writes `files` into the build mount (and can be told to wait or fail). */
function spec(i: number, files: Record<string, string>, calls: Calls, opts: { gate?: Promise<void>; fail?: Error; seen?: (root: string) => void } = {}): LayerSpec {
  return {
    chainId: chain[i]!,
    diffId: diffIds[i]!,
    layerDigest: `sha256:${String(i).repeat(64)}`,
    mediaType: 'application/vnd.oci.image.layer.v1.tar',
    compressedBytes: 100,
    async unpack(root) {
      calls.n++;
      opts.seen?.(root);
      for (const [name, content] of Object.entries(files)) {
        if (content === '<delete>') fs.rmSync(path.join(root, name), { recursive: true });
        else fs.writeFileSync(path.join(root, name), content);
      }
      await opts.gate;
      if (opts.fail) throw opts.fail;
      return { entries: Object.keys(files).length, uncompressedBytes: 1 };
    },
  };
}

/** A process that is gone, for owner tags of "crashed" work. */
async function deadOwner(): Promise<string> {
  const child = spawn('true', { stdio: 'ignore' });
  await new Promise((r) => child.once('spawn', r));
  const tag = `${child.pid}-${processStart(child.pid!) ?? '0'}`;
  await new Promise((r) => child.once('exit', r));
  return tag;
}

describe('publishing layers', () => {
  it('renames a layer into layers/ with its record only after unpack returned, each on top of its parents', async () => {
    const store = await open();
    const l = store.layout;
    const calls: Calls = { n: 0 };
    let during: string[] = ['not called'];
    const specs = [
      spec(0, { base: 'one\n', gone: 'x\n' }, calls),
      spec(1, { gone: '<delete>', top: 'two\n' }, calls, {
        seen: (root) => {
          // Layer 2 is unpacked into an overlay of layer 1: its files show through.
          expect(fs.readFileSync(path.join(root, 'base'), 'utf8')).toBe('one\n');
          during = fs.readdirSync(l.layersDir);
        },
      }),
    ];
    await store.ensureLayers(specs, log);
    expect(calls.n).toBe(2);
    expect(during).toEqual([chainHex(chain[0]!)]); // layer 2 not visible while it was being unpacked
    const h1 = chainHex(chain[1]!);
    expect(fs.readdirSync(l.layersDir).sort()).toEqual([chainHex(chain[0]!), h1].sort());
    expect(fs.readdirSync(l.layerDir(h1)).sort()).toEqual(['diff', 'layer.json']);
    const rec = await readRecord(l.layerRecord(h1), LayerRecord);
    expect(rec).toMatchObject({ chainId: chain[1], diffId: diffIds[1], parent: chainHex(chain[0]!), entries: 2 });
    // Overlay form: the deletion of a lower file is a char 0:0 whiteout in the upper layer.
    const wh = fs.lstatSync(path.join(l.layerDiff(h1), 'gone'));
    expect(wh.isCharacterDevice() && wh.rdev === 0).toBe(true);
    expect(fs.existsSync(path.join(l.layerDiff(h1), 'base'))).toBe(false);
    // Nothing left in staging, nothing mounted.
    expect(fs.readdirSync(l.stagingDir)).toEqual([]);
    expect(mountsUnder(readMounts(), l.root)).toEqual([]);
  });

  it('leaves nothing when unpack fails, and unpacks again next time', async () => {
    const store = await open();
    const calls: Calls = { n: 0 };
    await expect(store.ensureLayers([spec(0, { f: 'x' }, calls, { fail: new Error('digest mismatch') })], log)).rejects.toThrow('digest mismatch');
    expect(fs.readdirSync(store.layout.layersDir)).toEqual([]);
    expect(fs.readdirSync(store.layout.stagingDir)).toEqual([]);
    expect(mountsUnder(readMounts(), store.layout.root)).toEqual([]);
    expect(await store.layer(chain[0]!)).toBeUndefined();
    await store.ensureLayers([spec(0, { f: 'x' }, calls)], log);
    expect(calls.n).toBe(2);
    expect(await store.layer(chain[0]!)).toBeDefined();
  });

  it('does not unpack a layer that is in the store', async () => {
    const store = await open();
    const calls: Calls = { n: 0 };
    await store.ensureLayers([spec(0, { f: 'x' }, calls), spec(1, { g: 'y' }, calls)], log);
    await store.ensureLayers([spec(0, { f: 'x' }, calls), spec(1, { g: 'y' }, calls), spec(2, { h: 'z' }, calls)], log);
    expect(calls.n).toBe(3);
  });

  it('replaces a directory without a record that stands where a layer is published', async () => {
    const store = await open();
    const target = store.layout.layerDiff(chainHex(chain[0]!));
    fs.mkdirSync(target, { recursive: true });
    fs.writeFileSync(path.join(target, 'planted'), 'not from the image');
    await store.ensureLayers([spec(0, { f: 'x' }, { n: 0 })], log);
    expect(fs.readdirSync(target)).toEqual(['f']);
  });
});

describe('one unpack per layer', () => {
  it('concurrent requests for the same layers share one unpack each', async () => {
    const store = await open();
    const calls: Calls = { n: 0 };
    let open1!: () => void;
    const gate = new Promise<void>((r) => (open1 = r));
    const a = store.ensureLayers([spec(0, { f: 'x' }, calls, { gate }), spec(1, { g: 'a' }, calls)], log);
    const b = store.ensureLayers([spec(0, { f: 'x' }, calls, { gate }), spec(1, { g: 'a' }, calls)], log);
    while (calls.n === 0) await new Promise((r) => setTimeout(r, 5));
    await new Promise((r) => setTimeout(r, 50));
    expect(calls.n).toBe(1); // the second waits for the first's unpack of layer 1
    open1();
    await Promise.all([a, b]);
    expect(calls.n).toBe(2);
  });

  it('a waiter unpacks itself when the pull it waited for fails; an aborted waiter stops at once', async () => {
    const store = await open();
    const calls: Calls = { n: 0 };
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    const failing = store.ensureLayers([spec(0, { f: 'x' }, calls, { gate, fail: new Error('connection reset') })], log);
    const waiter = store.ensureLayers([spec(0, { f: 'x' }, calls)], log);
    const ac = new AbortController();
    const aborted = store.ensureLayers([spec(0, { f: 'x' }, calls)], log, ac.signal);
    await new Promise((r) => setTimeout(r, 30));
    ac.abort(new Error('client cancelled'));
    await expect(aborted).rejects.toThrow('client cancelled');
    release();
    await expect(failing).rejects.toThrow('connection reset');
    await waiter;
    expect(calls.n).toBe(2);
    expect(await store.layer(chain[0]!)).toBeDefined();
  });

  it('is one store per work dir in a process', async () => {
    const a = await open();
    const b = await open(path.join(tmp, 'work', '.', ''));
    expect(b).toBe(a);
  });
});

describe('crash leftovers', () => {
  it('are removed when the store is opened: dead staging (build mount detached), record-less layers, dead bundles; live work is kept', async () => {
    const workDir = path.join(tmp, 'work');
    const l = new Layout(workDir);
    for (const dir of [l.layersDir, l.stagingDir, l.bundlesDir]) fs.mkdirSync(dir, { recursive: true });
    const dead = await deadOwner();

    // A killed pull: its staging directory with the build mount still up.
    const killed = path.join(l.stagingDir, `${dead}-0123456789abcdef`);
    for (const d of ['lower', 'layer/diff', 'work', 'merged']) fs.mkdirSync(path.join(killed, d), { recursive: true });
    mount('overlay', path.join(killed, 'merged'), 'overlay', 0, `lowerdir=${killed}/lower,upperdir=${killed}/layer/diff,workdir=${killed}/work`);
    // A live process's staging directory (ours).
    const live = path.join(l.stagingDir, `${ownerTag()}-fedcba9876543210`);
    fs.mkdirSync(live);
    // A layer directory without a record, one with a record for another name, and a stray file.
    const h0 = chainHex(chain[0]!);
    const h1 = chainHex(chain[1]!);
    fs.mkdirSync(l.layerDiff(h0), { recursive: true });
    fs.mkdirSync(l.layerDiff(h1), { recursive: true });
    await writeJsonAtomic(l.layerRecord(h1), {
      version: 1, chainId: chain[0], hex: h1, diffId: diffIds[0], parent: null, layerDigest: diffIds[0], mediaType: 'x',
      compressedBytes: 1, uncompressedBytes: 1, entries: 1, created: 'now',
    });
    fs.writeFileSync(path.join(l.layersDir, 'stray.tmp-1234'), '');
    // Bundles: pending of a dead process, mounted but not mounted any more, pending of a live process.
    const bundle = (id: string, state: 'pending' | 'mounted', owner: string): BundleRecord => ({
      version: 1, id, state, owner, bundle: `/b/${id}`, rootfs: state === 'mounted' ? `/b/${id}/rootfs` : '', layers: [h0],
      image: 'x', manifestDigest: diffIds[0]!, configDigest: diffIds[1]!, created: 'now',
    });
    for (const [id, state, owner] of [['1111111111111111', 'pending', dead], ['2222222222222222', 'mounted', dead], ['3333333333333333', 'pending', ownerTag()]] as const) {
      fs.mkdirSync(path.join(l.bundleDir(id), 'upper'), { recursive: true });
      await writeJsonAtomic(l.bundleRecord(id), bundle(id, state, owner));
    }

    const store = await open(workDir);
    expect(mountsUnder(readMounts(), l.root)).toEqual([]);
    expect(fs.readdirSync(l.stagingDir)).toEqual([path.basename(live)]);
    expect(fs.readdirSync(l.layersDir)).toEqual([]);
    expect(fs.readdirSync(l.bundlesDir).sort()).toEqual(['3333333333333333', '3333333333333333.json']);
    expect(fs.existsSync(killed)).toBe(false);
    expect(await store.layer(chain[0]!)).toBeUndefined();
  });
});

describe('bundles of a killed pull', () => {
  it('are unmounted when they never got their config.json; finished ones stay', async () => {
    const store = await open();
    const l = store.layout;
    await store.ensureLayers([spec(0, { f: 'x' }, { n: 0 })], log);
    const dead = await deadOwner();
    const made: Record<string, string> = {};
    for (const name of ['finished', 'half']) {
      const bundle = path.join(tmp, name);
      const lease = await store.leaseBundle({ bundle, chainIds: chain.slice(0, 1), image: name, manifestDigest: diffIds[0]!, configDigest: diffIds[1]! });
      fs.mkdirSync(path.join(bundle, 'rootfs'), { recursive: true });
      await store.mountBundle(lease, path.join(bundle, 'rootfs'));
      // As if the process that pulled had been killed: the record names a dead owner.
      const rec = (await readRecord(l.bundleRecord(lease.id), BundleRecord))!;
      await writeJsonAtomic(l.bundleRecord(lease.id), { ...rec, owner: dead });
      made[name] = lease.id;
    }
    fs.writeFileSync(path.join(tmp, 'finished/config.json'), '{}');

    const r = await store.collectGarbage(false);
    expect(r).toMatchObject({ deadBundles: 1, liveBundles: 1 });
    expect(fs.readdirSync(path.join(tmp, 'half'))).toEqual([]); // unmounted, rootfs removed: can be pulled again
    expect(fs.readdirSync(path.join(tmp, 'finished/rootfs'))).toEqual(['f']);
    expect(fs.existsSync(l.bundleRecord(made.half!))).toBe(false);
    expect(fs.existsSync(l.bundleDir(made.half!))).toBe(false);
    expect(fs.existsSync(l.bundleRecord(made.finished!))).toBe(true);
  });
});

describe('garbage collection', () => {
  it('keeps the layers and configs of mounted bundles and running pulls, drops the rest only when asked', async () => {
    const store = await open();
    const l = store.layout;
    const calls: Calls = { n: 0 };
    // Image A: layers 1+2, mounted. Image B: layers 1+2+3, a pending pull of this live process.
    await store.ensureLayers([spec(0, { f: 'x' }, calls), spec(1, { g: 'y' }, calls), spec(2, { h: 'z' }, calls)], log);
    const cfg = (s: string): string => `sha256:${createHash('sha256').update(s).digest('hex')}`;
    const [cfgA, cfgB, cfgC] = [cfg('A'), cfg('B'), cfg('C')] as [string, string, string];
    for (const c of ['A', 'B', 'C']) await store.configs.put(cfg(c), Buffer.from(c));
    const leaseA = await store.leaseBundle({ bundle: path.join(tmp, 'A'), chainIds: chain.slice(0, 2), image: 'a', manifestDigest: cfgA, configDigest: cfgA });
    fs.mkdirSync(path.join(tmp, 'A/rootfs'), { recursive: true });
    await store.mountBundle(leaseA, path.join(tmp, 'A/rootfs'));
    expect(fs.readdirSync(path.join(tmp, 'A/rootfs')).sort()).toEqual(['f', 'g']);
    const leaseB = await store.leaseBundle({ bundle: path.join(tmp, 'B'), chainIds: chain.slice(0, 1), image: 'b', manifestDigest: cfgB, configDigest: cfgB });

    let r = await store.collectGarbage(false);
    expect(r).toMatchObject({ layers: 3, liveBundles: 2, unusedLayers: 0, deadBundles: 0 });
    r = await store.collectGarbage(true);
    expect(r).toMatchObject({ layers: 2, liveBundles: 2, unusedLayers: 1, unusedConfigs: 1 });
    expect(await store.layer(chain[2]!)).toBeUndefined();
    expect(await store.configs.get(cfgC, 1024)).toBeUndefined();
    expect(await store.configs.get(cfgA, 1024)).toBeDefined();

    // The runtime unmounts A; the pull of B gives up: then nothing is in use.
    umount(path.join(tmp, 'A/rootfs'), 0);
    await store.dropBundle(leaseB.id);
    r = await store.collectGarbage(false);
    expect(r).toMatchObject({ deadBundles: 1, liveBundles: 0, layers: 2 });
    expect(fs.readdirSync(l.bundlesDir)).toEqual([]);
    r = await store.collectGarbage(true);
    expect(r).toMatchObject({ unusedLayers: 2, layers: 0, unusedConfigs: 2 });
    expect(fs.readdirSync(l.layersDir)).toEqual([]);
  });
});
