/**
 * Garbage collection of the work dir, run under the work dir mutex by every process when it opens
 * the store (everything but `dropUnused`) and by `guestpull gc`:
 *   - staging directories of processes that are gone: mounts left in them are detached, then they go;
 *   - a layer directory without a valid record (or without its tree), anything else under layers/;
 *   - bundle records that are dead: `mounted` ones whose overlay is no longer mounted at their
 *     rootfs (the runtime unmounted it), and half-made ones: `pending` whose process is gone, or
 *     `mounted` without a config.json whose process is gone (killed before the pull finished; their
 *     overlay is unmounted and its empty rootfs directory removed, so the bundle can be pulled again);
 *     with their upper and work directories. A dead `pending` record's pull may have been killed
 *     between `mkdir <bundle>/rootfs` and the mount (../bundle/overlay.ts): that rootfs is removed
 *     too (see removeEmptyRootfs for when exactly), so a retry into the same bundle works;
 *   - with `dropUnused`: layers and configs that no live bundle record uses.
 * What a live process has in progress (its staging directories, its pending records and the
 * layers they name) is never touched. Nothing is removed below a directory with a mount inside it.
 */
import { existsSync } from 'node:fs';
import { lstat, readdir, realpath, rm, rmdir } from 'node:fs/promises';
import path from 'node:path';
import type { Logger } from '../../log.js';
import { chainHex, isChainHex, type Layout } from './layout.js';
import { ownerAlive } from './lock.js';
import { isOverlayMounted, isUpperInUse, mountsUnder, readMounts, type MountEntry } from './mountinfo.js';
import { unmountQuietly } from './overlay.js';
import { BundleRecord, LayerRecord, readRecord } from './records.js';

export interface GcOptions {
  dropUnused: boolean;
  logger?: Logger;
  /** Tests: another view of the mount table. */
  mounts?: () => MountEntry[];
}

export interface GcReport {
  /** Staging directories of processes that are gone (build mounts in them detached). */
  staging: number;
  /** Layer directories without a valid record and tree. */
  incompleteLayers: number;
  /** Bundle records (and their upper/work directories) whose overlay or process is gone. */
  deadBundles: number;
  /** Empty, never-mounted `<bundle>/rootfs` directories of dead pending bundle records. */
  emptyRootfs: number;
  /** Layers no live bundle uses (only with dropUnused). */
  unusedLayers: number;
  /** Cached image configs no live bundle uses (only with dropUnused). */
  unusedConfigs: number;
  /** Anything else that is not ours to keep (temp files of interrupted writes, unknown names). */
  strays: number;
  /** Layers left. */
  layers: number;
  /** Bundle records left (mounted, or pending in a live process). */
  liveBundles: number;
}

const STAGING_NAME = /^(\d{1,10}-\d{1,20})-[0-9a-f]{8,64}$/;
const BUNDLE_ID = /^[0-9a-f]{16,64}$/;

async function entries(dir: string): Promise<string[]> {
  try {
    return await readdir(dir);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw e;
  }
}

async function isDir(p: string): Promise<boolean> {
  try {
    return (await lstat(p)).isDirectory();
  } catch {
    return false;
  }
}

/** The staging directory name for a new piece of work of the process `owner`. */
export function stagingName(owner: string, random: string): string {
  return `${owner}-${random}`;
}

/** The valid record of layer `hex` (and its tree is a directory), or undefined. */
export async function validLayer(layout: Layout, hex: string): Promise<LayerRecord | undefined> {
  if (!isChainHex(hex)) return undefined;
  const rec = await readRecord(layout.layerRecord(hex), LayerRecord);
  if (!rec || rec.hex !== hex || chainHex(rec.chainId) !== hex) return undefined;
  return (await isDir(layout.layerDiff(hex))) ? rec : undefined;
}

/** Whether a bundle record still holds its layers (see the module comment). */
export function bundleLive(layout: Layout, rec: BundleRecord, mounts: readonly MountEntry[]): boolean {
  if (rec.state === 'pending') return ownerAlive(rec.owner);
  if (!isOverlayMounted(mounts, rec.rootfs, layout.bundleUpper(rec.id))) return false;
  // Mounted: finished (config.json written), or still being finished by a live process.
  return existsSync(path.join(rec.bundle, 'config.json')) || ownerAlive(rec.owner);
}

/** Take down what a half-made bundle mounted: its overlay (wherever it is) and an empty `rootfs` mount point. */
async function unmountHalfMade(layout: Layout, id: string, mounts: readonly MountEntry[], log?: Logger): Promise<void> {
  const upper = layout.bundleUpper(id);
  for (const m of mounts) {
    if (m.fstype !== 'overlay' || m.superOptions.get('upperdir') !== upper) continue;
    unmountQuietly(m.mountPoint);
    if (path.basename(m.mountPoint) === 'rootfs') await rmdir(m.mountPoint).catch(() => undefined);
    log?.warn({ rootfs: m.mountPoint, bundleId: id }, 'unmounted the rootfs of a pull that did not finish');
  }
}

/** How much earlier than its record's `created` a rootfs may look made (coarse file timestamps). */
const CLOCK_SLACK_MS = 1000;

/**
 * A dead `pending` bundle record's pull was killed before its overlay was recorded as mounted; if
 * it got as far as `mkdir <bundle>/rootfs` (../bundle/overlay.ts: prepare the bundle directory,
 * mkdir rootfs, mount), that directory is left. Remove it with rmdir only when all of these hold,
 * else keep it and say why: no live record names the same bundle; the bundle path is absolute and
 * has no symlink in it (its real path is itself); the bundle has no config.json; `rootfs` is a
 * directory (not a symlink) on the bundle's own filesystem, nothing is mounted at or below it, it
 * is empty, and it was made after the record was written (birth time, or ctime where the
 * filesystem has none). `mounts` is the mount table after half-made overlays were taken down.
 */
export async function removeEmptyRootfs(rec: BundleRecord, mounts: readonly MountEntry[], liveBundles: ReadonlySet<string>): Promise<{ removed: boolean; rootfs: string; reason?: string }> {
  const bundle = rec.bundle;
  const rootfs = path.join(bundle, 'rootfs');
  const keep = (reason: string): { removed: false; rootfs: string; reason: string } => ({ removed: false, rootfs, reason });
  if (rec.state !== 'pending' || ownerAlive(rec.owner)) return keep('the record is not a dead pending one');
  if (!path.isAbsolute(bundle) || path.resolve(bundle) !== bundle) return keep('the bundle path is not absolute and normal');
  if (liveBundles.has(bundle)) return keep('a live pull uses the same bundle');
  try {
    const bst = await lstat(bundle).catch(() => undefined);
    if (bst === undefined) return keep('the bundle directory is gone');
    if (!bst.isDirectory()) return keep('the bundle is not a directory');
    if ((await realpath(bundle)) !== bundle) return keep('the bundle path goes through a symlink');
    if ((await lstat(path.join(bundle, 'config.json')).catch(() => undefined)) !== undefined) return keep('the bundle has a config.json');
    const st = await lstat(rootfs).catch(() => undefined);
    if (st === undefined) return keep('there is no rootfs');
    if (!st.isDirectory()) return keep('rootfs is not a directory');
    if (st.dev !== bst.dev || mountsUnder(mounts, rootfs).length > 0) return keep('rootfs is a mount point or has mounts below it');
    const created = Date.parse(rec.created);
    const made = st.birthtimeMs > 0 ? st.birthtimeMs : st.ctimeMs;
    if (!Number.isFinite(created) || made < created - CLOCK_SLACK_MS) return keep('rootfs is older than the record');
    if ((await readdir(rootfs)).length > 0) return keep('rootfs is not empty');
    // rmdir: removes only an empty directory, never a symlink's target, refuses a mount point.
    await rmdir(rootfs);
    return { removed: true, rootfs };
  } catch (e) {
    return keep(`cannot inspect or remove it: ${(e as Error).message}`);
  }
}

/** Collect garbage; the caller holds the work dir mutex. */
export async function collectGarbage(layout: Layout, opts: GcOptions): Promise<GcReport> {
  const report: GcReport = { staging: 0, incompleteLayers: 0, deadBundles: 0, emptyRootfs: 0, unusedLayers: 0, unusedConfigs: 0, strays: 0, layers: 0, liveBundles: 0 };
  const mountsNow = opts.mounts ?? (() => readMounts());
  const log = opts.logger;
  let mounts = mountsNow();
  const remove = async (p: string): Promise<boolean> => {
    if (mountsUnder(mounts, p).length > 0) {
      log?.warn({ path: p }, 'not removing: something is mounted below it');
      return false;
    }
    await rm(p, { recursive: true, force: true });
    return true;
  };

  // 1. Staging directories of processes that are gone, after detaching what they left mounted.
  for (const name of await entries(layout.stagingDir)) {
    const owner = STAGING_NAME.exec(name)?.[1];
    if (owner !== undefined && ownerAlive(owner)) continue;
    const dir = path.join(layout.stagingDir, name);
    for (const m of mountsUnder(mounts, dir)) {
      unmountQuietly(m.mountPoint);
      log?.warn({ mountPoint: m.mountPoint }, 'detached a mount a killed process left in the work dir');
    }
    mounts = mountsNow();
    if (await remove(dir)) report.staging++;
  }

  // 2. Layers: a tree and its record, published together, or nothing.
  const valid = new Set<string>();
  for (const name of await entries(layout.layersDir)) {
    if (await validLayer(layout, name)) {
      valid.add(name);
      continue;
    }
    if (await remove(path.join(layout.layersDir, name))) {
      if (isChainHex(name)) report.incompleteLayers++;
      else report.strays++;
    }
  }

  // 3. Bundle records.
  mounts = mountsNow();
  const bundleNames = await entries(layout.bundlesDir);
  const live = new Map<string, BundleRecord>();
  const deadPending: BundleRecord[] = [];
  for (const name of bundleNames) {
    if (!name.endsWith('.json') || !BUNDLE_ID.test(name.slice(0, -5))) continue;
    const id = name.slice(0, -5);
    const rec = await readRecord(layout.bundleRecord(id), BundleRecord);
    if (!rec || rec.id !== id) continue;
    if (bundleLive(layout, rec, mounts)) live.set(id, rec);
    else if (rec.state === 'pending') deadPending.push(rec);
  }
  const halfMade = bundleNames.filter((n) => n.endsWith('.json') && !live.has(n.slice(0, -5))).map((n) => n.slice(0, -5));
  for (const id of halfMade) if (BUNDLE_ID.test(id)) await unmountHalfMade(layout, id, mounts, log);
  mounts = mountsNow();
  // Before their records go: an interrupted removal is retried by the next cleanup.
  const liveBundles = new Set([...live.values()].map((r) => path.resolve(r.bundle)));
  for (const rec of deadPending) {
    const r = await removeEmptyRootfs(rec, mounts, liveBundles);
    if (r.removed) {
      report.emptyRootfs++;
      log?.warn({ rootfs: r.rootfs, bundleId: rec.id }, 'removed the empty rootfs directory of a pull killed before its mount');
    } else if (r.reason !== 'there is no rootfs' && r.reason !== 'the bundle directory is gone') {
      log?.info({ rootfs: r.rootfs, bundleId: rec.id, reason: r.reason }, 'kept the rootfs path of a pull killed before its mount');
    }
  }
  for (const name of bundleNames) {
    const isRecord = name.endsWith('.json');
    const id = isRecord ? name.slice(0, -5) : name;
    if (live.has(id)) continue;
    if (!isRecord && BUNDLE_ID.test(id) && isUpperInUse(mounts, layout.bundleUpper(id))) continue;
    if (!(await remove(path.join(layout.bundlesDir, name)))) continue;
    if (isRecord && BUNDLE_ID.test(id)) {
      report.deadBundles++;
      log?.info({ bundleId: id }, 'removed the record of an overlay bundle that is no longer mounted');
    } else if (!BUNDLE_ID.test(id)) {
      report.strays++;
    }
  }
  report.liveBundles = live.size;

  // 4. Layers and configs no live bundle uses.
  const usedLayers = new Set<string>();
  const usedConfigs = new Set<string>();
  for (const rec of live.values()) {
    for (const h of rec.layers) usedLayers.add(h);
    usedConfigs.add(rec.configDigest);
  }
  for (const hex of [...valid]) {
    if (!opts.dropUnused || usedLayers.has(hex)) continue;
    // Record first: from then on the directory is an incomplete layer, never trusted.
    await rm(layout.layerRecord(hex), { force: true });
    if (await remove(layout.layerDir(hex))) {
      valid.delete(hex);
      report.unusedLayers++;
    }
  }
  report.layers = valid.size;
  for (const algo of await entries(layout.configsDir)) {
    const dir = path.join(layout.configsDir, algo);
    if (!(await isDir(dir))) {
      await rm(dir, { force: true });
      report.strays++;
      continue;
    }
    for (const name of await entries(dir)) {
      const isConfig = /^[0-9a-f]{64}$|^[0-9a-f]{128}$/.test(name);
      if (isConfig && (!opts.dropUnused || usedConfigs.has(`${algo}:${name}`))) continue;
      await rm(path.join(dir, name), { recursive: true, force: true });
      if (isConfig) report.unusedConfigs++;
      else report.strays++;
    }
  }
  return report;
}
