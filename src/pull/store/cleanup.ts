/**
 * Garbage collection of the work dir, run under the work dir mutex by every process when it opens
 * the store (everything but `dropUnused`) and by `guestpull gc`:
 *   - staging directories of processes that are gone: mounts left in them are detached, then they go;
 *   - a layer directory without a valid record (or without its tree), anything else under layers/;
 *   - bundle records that are dead: `mounted` ones whose overlay is no longer mounted at their
 *     rootfs (the runtime unmounted it), and half-made ones: `pending` whose process is gone, or
 *     `mounted` without a config.json whose process is gone (killed before the pull finished; their
 *     overlay is unmounted and its empty rootfs directory removed, so the bundle can be pulled again);
 *     with their upper and work directories;
 *   - with `dropUnused`: layers and configs that no live bundle record uses.
 * What a live process has in progress (its staging directories, its pending records and the
 * layers they name) is never touched. Nothing is removed below a directory with a mount inside it.
 */
import { existsSync } from 'node:fs';
import { lstat, readdir, rm, rmdir } from 'node:fs/promises';
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

/** Collect garbage; the caller holds the work dir mutex. */
export async function collectGarbage(layout: Layout, opts: GcOptions): Promise<GcReport> {
  const report: GcReport = { staging: 0, incompleteLayers: 0, deadBundles: 0, unusedLayers: 0, unusedConfigs: 0, strays: 0, layers: 0, liveBundles: 0 };
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
  for (const name of bundleNames) {
    if (!name.endsWith('.json') || !BUNDLE_ID.test(name.slice(0, -5))) continue;
    const id = name.slice(0, -5);
    const rec = await readRecord(layout.bundleRecord(id), BundleRecord);
    if (rec && rec.id === id && bundleLive(layout, rec, mounts)) live.set(id, rec);
  }
  const halfMade = bundleNames.filter((n) => n.endsWith('.json') && !live.has(n.slice(0, -5))).map((n) => n.slice(0, -5));
  for (const id of halfMade) if (BUNDLE_ID.test(id)) await unmountHalfMade(layout, id, mounts, log);
  mounts = mountsNow();
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
