/**
 * The layer store under `work_dir`: unpacked layers named by chain ID, shared by every image and
 * bundle that stacks them; the image config cache; the records of overlay bundles.
 *
 * - A layer is unpacked by the caller's `unpack` (download, both digests, the tar applier) under
 *   `staging/<owner>-<random>/`: into a private overlay mount of its parents (./overlay.ts: the
 *   kernel writes the whiteouts and opaque markers), a base layer straight into its directory.
 *   Only once `unpack` has returned (both digests verified) and the mount is gone is its record
 *   written beside the tree and the two renamed into `layers/` together. On any failure the staging directory is removed; if the process dies,
 *   whoever opens the store next does it.
 * - Requests for the same layer in one process share one unpack: the others wait for it (and try
 *   themselves if it fails), so a shared layer is fetched once. Processes sharing a work dir may
 *   both unpack a layer; the first rename wins and the other copy is dropped.
 * - An overlay pull first records (under the work dir mutex) the layers it is going to stack, as a
 *   `pending` bundle record; garbage collection keeps whatever a live record names.
 */
import { randomBytes } from 'node:crypto';
import { chmodSync, chownSync, lstatSync, utimesSync } from 'node:fs';
import { mkdir, realpath, rename, rm, stat } from 'node:fs/promises';
import path from 'node:path';
import type { Snapshotter } from '../../config/index.js';
import { asGuestpullError, ErrorCode, GuestpullError } from '../../errors.js';
import type { Logger } from '../../log.js';
import { collectGarbage, stagingName, validLayer, type GcReport } from './cleanup.js';
import { summarizeTree, type TreeSummary } from './fsck.js';
import { ConfigCache } from './configs.js';
import { chainHex, Layout } from './layout.js';
import { acquireLock, LocalQueue, ownerTag } from './lock.js';
import { mountsUnder, readMounts } from './mountinfo.js';
import { mountLowerView, mountOverlay, planMount, probeOverlay, unmountQuietly, type ProbeResult } from './overlay.js';
import { mergeOntoLower, type MergeResult } from './speculative.js';
import { nativeAvailable } from '../../native/index.js';
import type { LowerSwitch } from '../layers/index.js';
import { BundleRecord, LayerRecord, readRecord, RECORD_VERSION, writeJsonAtomic } from './records.js';

export type BundleMode = 'overlay' | 'copy';

export interface UnpackResult {
  entries: number;
  uncompressedBytes: number;
  /** The layer had an entry for its root directory (speculative builds: its metadata is the layer's). */
  rootEntry?: boolean;
  /** A speculative unpack asked for its parents (`lower`) and finished through the build overlay. */
  switched?: boolean;
}

/** What the store offers an unpack beside the root. */
export interface UnpackHooks {
  /** Call once the unpack holds what it needs to run (a layer slot): the next layer may start then. */
  started?: () => void;
  /**
   * Set for a speculative build: `root` is the layer's own empty upper directory, its parents are
   * still being unpacked. Call this when an entry needs them: it resolves, once they are complete,
   * with the build overlay to go on in (./speculative.ts, src/pull/layers/apply.ts).
   */
  lower?: (rootEntry: boolean) => Promise<LowerSwitch>;
}

export interface LayerSpec {
  /** Chain ID of the image's layers up to and including this one. */
  chainId: string;
  diffId: string;
  layerDigest: string;
  mediaType: string;
  compressedBytes: number;
  /** Unpack the verified layer into `root` (an overlay of its parents, or see UnpackHooks.lower); reject on any failure. */
  unpack(root: string, signal?: AbortSignal, hooks?: UnpackHooks): Promise<UnpackResult>;
}

export interface StoreOptions {
  workDir: string;
  logger: Logger;
  /** How long to wait for the work dir mutex held by another process (default 60 s). */
  lockWaitMs?: number;
  /**
   * Unpack a layer while its parents are still being unpacked (speculative builds, ./speculative.ts).
   * Default: when running as root with the native addon (what overlay builds need anyway).
   */
  speculative?: boolean;
}

/** A layer being unpacked by this process: `started` once it holds a layer slot. */
interface Building {
  done: Promise<void>;
  started: Promise<void>;
}

/** What an overlay pull reserved: a pending bundle record and its upper and work directories. */
export interface BundleLease {
  id: string;
  layers: readonly string[];
}

const DEFAULT_LOCK_WAIT_MS = 60_000;

/** Wait for `p`, but give up (with the signal's reason) as soon as `signal` aborts. */
function abortable<T>(p: Promise<T>, signal?: AbortSignal): Promise<T> {
  if (!signal) return p;
  p.catch(() => undefined);
  signal.throwIfAborted();
  return new Promise<T>((resolve, reject) => {
    const onAbort = (): void => reject(signal.reason);
    signal.addEventListener('abort', onAbort, { once: true });
    p.then(resolve, reject).finally(() => signal.removeEventListener('abort', onAbort));
  });
}

/** Give `to` the owner, mode and times of `from` (the merged root a layer or bundle starts from). */
function copyRootMeta(from: string | undefined, to: string): void {
  if (from === undefined) {
    chmodSync(to, 0o755);
    return;
  }
  const st = lstatSync(from);
  if (process.getuid?.() === 0) chownSync(to, st.uid, st.gid);
  chmodSync(to, st.mode & 0o7777);
  utimesSync(to, st.atime, st.mtime);
}

/** Stores open in this process, by the real path of their work_dir. */
const openStores = new Map<string, Promise<Store>>();

export class Store {
  readonly layout: Layout;
  readonly configs: ConfigCache;
  private readonly building = new Map<string, Building>();
  private readonly queue = new LocalQueue();
  private probe: ProbeResult | undefined;
  private modeLogged = false;
  private refs = 1;

  private constructor(
    root: string,
    private readonly logger: Logger,
    private readonly lockWaitMs: number,
    private readonly speculative: boolean,
  ) {
    this.layout = new Layout(root);
    this.configs = new ConfigCache(this.layout);
  }

  /** Open (or share, within this process) the store of `workDir`, cleaning what dead processes left. */
  static async open(opts: StoreOptions): Promise<Store> {
    let root: string;
    try {
      await mkdir(opts.workDir, { recursive: true, mode: 0o700 });
      if (!(await stat(opts.workDir)).isDirectory()) throw new Error('not a directory');
      root = await realpath(opts.workDir);
    } catch (e) {
      throw new GuestpullError(
        ErrorCode.CONFIG,
        `cannot use work_dir ${opts.workDir}: ${(e as Error).message}; set [image] work_dir in cdh.toml or --work-dir`,
        { workDir: opts.workDir },
        { cause: e },
      );
    }
    // One Store per real directory: its in-process queue is what makes the lock file a mutex here.
    const shared = openStores.get(root);
    if (shared) {
      const s = await shared;
      s.refs++;
      return s;
    }
    const p = Store.create(opts, root);
    openStores.set(root, p);
    p.catch(() => openStores.delete(root));
    return p;
  }

  private static async create(opts: StoreOptions, root: string): Promise<Store> {
    const speculative = opts.speculative ?? (process.getuid?.() === 0 && nativeAvailable());
    const store = new Store(root, opts.logger, opts.lockWaitMs ?? DEFAULT_LOCK_WAIT_MS, speculative);
    try {
      const l = store.layout;
      for (const d of [l.layersDir, l.configsDir, l.stagingDir, l.bundlesDir]) await mkdir(d, { recursive: true, mode: 0o700 });
      const report = await store.collectGarbage(false);
      opts.logger.info({ workDir: root, layers: report.layers, liveBundles: report.liveBundles, ...cleaned(report) }, 'layer store opened');
      return store;
    } catch (e) {
      const g = asGuestpullError(e);
      throw new GuestpullError(g.code, `cannot open the layer store in ${root}: ${g.message}`, { workDir: root }, { cause: e });
    }
  }

  /** Drop this user's reference. */
  async release(): Promise<void> {
    if (--this.refs > 0) return;
    openStores.delete(this.layout.root);
    await this.queue.run(async () => undefined);
  }

  /** Run `fn` holding the work dir mutex. */
  withLock<T>(fn: () => Promise<T>): Promise<T> {
    return this.queue.run(async () => {
      const lock = await acquireLock(this.layout.lockFile, this.layout.root, this.lockWaitMs);
      try {
        return await fn();
      } finally {
        await lock.release();
      }
    });
  }

  /** Garbage collection (./cleanup.ts) under the mutex. */
  collectGarbage(dropUnused: boolean): Promise<GcReport> {
    return this.withLock(() => collectGarbage(this.layout, { dropUnused, logger: this.logger }));
  }

  /**
   * What bundles are made with: `copy` as configured; `overlay` when the test mount works (an
   * error if configured and it does not); `auto` picks, and says so once.
   */
  async mode(configured: Snapshotter, logger: Logger = this.logger): Promise<BundleMode> {
    if (configured === 'copy') return 'copy';
    if (this.probe === undefined) {
      const dir = path.join(this.layout.stagingDir, stagingName(ownerTag(), randomBytes(8).toString('hex')));
      this.probe = probeOverlay(dir);
    }
    const p = this.probe;
    if (p.ok) {
      if (!this.modeLogged) logger.info({ snapshotter: 'overlay', configured, buildOptions: p.buildOptions }, 'bundles are overlay mounts of the layer store');
      this.modeLogged = true;
      return 'overlay';
    }
    if (configured === 'overlay') {
      throw new GuestpullError(
        ErrorCode.CONFIG,
        `[image] snapshotter = "overlay", but this kernel cannot do it: ${p.reason}; use snapshotter = "copy" or "auto"`,
        { workDir: this.layout.root },
      );
    }
    if (!this.modeLogged) logger.warn({ snapshotter: 'copy', configured, reason: p.reason }, 'overlay is not available: bundles are flattened copies');
    this.modeLogged = true;
    return 'copy';
  }

  /** Whether an overlay bundle of `n` store layers fits in one mount(2). */
  overlayFits(n: number): boolean {
    if (n < 1) return false;
    const lowers = Array<string>(n).fill(this.layout.layerDiff('0'.repeat(64)));
    const upper = this.layout.bundleUpper('0'.repeat(16));
    return planMount({ lowers, upper, work: upper, options: this.bundleOptions() }, this.layout.layersDir) !== undefined;
  }

  /** The record of a complete layer, or undefined (read from disk: another process may have removed it). */
  layer(chainId: string): Promise<LayerRecord | undefined> {
    return validLayer(this.layout, chainHex(chainId));
  }

  /**
   * Reserve an overlay bundle before its layers are checked: a `pending` record naming them (so
   * garbage collection keeps them) and its upper and work directories.
   */
  leaseBundle(info: { bundle: string; chainIds: readonly string[]; image: string; manifestDigest: string; configDigest: string }): Promise<BundleLease> {
    const id = randomBytes(8).toString('hex');
    const layers = info.chainIds.map(chainHex);
    const record: BundleRecord = {
      version: RECORD_VERSION,
      id,
      state: 'pending',
      owner: ownerTag(),
      bundle: info.bundle,
      rootfs: '',
      layers,
      image: info.image,
      manifestDigest: info.manifestDigest,
      configDigest: info.configDigest,
      created: new Date().toISOString(),
    };
    return this.withLock(async () => {
      const dir = this.layout.bundleDir(id);
      await mkdir(dir, { mode: 0o700 });
      await mkdir(path.join(dir, 'upper'), { mode: 0o700 });
      await mkdir(path.join(dir, 'work'), { mode: 0o700 });
      await writeJsonAtomic(this.layout.bundleRecord(id), record);
      return { id, layers };
    });
  }

  /** Mount a leased bundle's overlay at `target` and record it as mounted there. */
  async mountBundle(lease: BundleLease, target: string): Promise<void> {
    const upper = this.layout.bundleUpper(lease.id);
    const top = lease.layers[lease.layers.length - 1];
    copyRootMeta(top === undefined ? undefined : this.layout.layerDiff(top), upper);
    const rootfs = await realpath(target);
    await this.withLock(async () => {
      const rec = await readRecord(this.layout.bundleRecord(lease.id), BundleRecord);
      if (!rec) throw new GuestpullError(ErrorCode.INTERNAL, `the record of bundle ${lease.id} in ${this.layout.bundlesDir} disappeared before its rootfs was mounted`);
      mountOverlay(
        { lowers: lease.layers.map((h) => this.layout.layerDiff(h)).reverse(), upper, work: path.join(this.layout.bundleDir(lease.id), 'work'), options: this.bundleOptions() },
        target,
        this.layout.layersDir,
      );
      try {
        await writeJsonAtomic(this.layout.bundleRecord(lease.id), { ...rec, state: 'mounted', rootfs });
      } catch (e) {
        unmountQuietly(target);
        throw e;
      }
    });
  }

  /** Forget a bundle (its mount is gone, or never happened): record first, then its directories. */
  dropBundle(id: string): Promise<void> {
    return this.withLock(async () => {
      await rm(this.layout.bundleRecord(id), { force: true });
      const dir = this.layout.bundleDir(id);
      if (mountsUnder(readMounts(), dir).length === 0) await rm(dir, { recursive: true, force: true });
    });
  }

  /**
   * Make sure every layer of a stack (bottom first) is in the store. The caller has leased them
   * (leaseBundle). Missing layers are unpacked each on top of its parents; with speculative builds
   * a layer starts as soon as the one below it holds a layer slot (so the layers of one image use
   * every slot), otherwise one after another. The first failure aborts the others and is thrown
   * once every one of them has stopped (no staging is left behind).
   */
  async ensureLayers(specs: readonly LayerSpec[], logger: Logger, signal?: AbortSignal): Promise<void> {
    if (!this.speculative || specs.length < 2) {
      const done: string[] = [];
      for (const spec of specs) {
        signal?.throwIfAborted();
        await this.ensureLayer(spec, done.slice(), undefined, () => undefined, logger, signal);
        done.push(chainHex(spec.chainId));
      }
      return;
    }
    const ctl = new AbortController();
    const onAbort = (): void => ctl.abort(signal?.reason);
    if (signal?.aborted) onAbort();
    signal?.addEventListener('abort', onAbort, { once: true });
    const running: Promise<void>[] = [];
    let failure: { error: unknown } | undefined;
    try {
      const parents: string[] = [];
      let below: Promise<void> | undefined;
      for (const spec of specs) {
        if (failure || ctl.signal.aborted) break;
        let markStarted!: () => void;
        const started = new Promise<void>((resolve) => (markStarted = resolve));
        const p = this.ensureLayer(spec, parents.slice(), below, markStarted, logger, ctl.signal);
        p.then(markStarted, (e: unknown) => {
          markStarted();
          if (failure) return;
          failure = { error: e };
          ctl.abort(e);
        });
        running.push(p);
        below = p;
        parents.push(chainHex(spec.chainId));
        await started;
      }
      await Promise.allSettled(running);
    } finally {
      signal?.removeEventListener('abort', onAbort);
    }
    if (failure) throw failure.error;
    signal?.throwIfAborted();
  }

  /**
   * One layer: already in the store, being unpacked by another pull of this process (wait for
   * it), or unpacked here. `below`: the layer under it is still being ensured (a speculative
   * build waits for it before it publishes); `started`: called once the layer holds a slot or is done.
   */
  private async ensureLayer(spec: LayerSpec, parents: string[], below: Promise<void> | undefined, started: () => void, logger: Logger, signal?: AbortSignal): Promise<void> {
    const hex = chainHex(spec.chainId);
    for (;;) {
      const running = this.building.get(hex);
      if (running) {
        logger.info({ layer: spec.layerDigest, chainId: spec.chainId }, 'waiting for another pull unpacking the same layer');
        void running.started.then(started);
        try {
          await abortable(running.done, signal);
          return;
        } catch (e) {
          if (signal?.aborted) throw e;
          continue; // that pull failed: try ourselves
        }
      }
      if (await this.layer(spec.chainId)) {
        logger.debug({ layer: spec.layerDigest, chainId: spec.chainId }, 'layer already in the store');
        return;
      }
      if (this.building.has(hex)) continue; // started while we looked
      let markStarted!: () => void;
      const startedHere = new Promise<void>((resolve) => (markStarted = resolve));
      const onStarted = (): void => {
        markStarted();
        started();
      };
      const done = this.build(hex, spec, parents, below, onStarted, logger, signal).finally(() => {
        markStarted();
        this.building.delete(hex);
      });
      this.building.set(hex, { done, started: startedHere });
      done.catch(() => undefined);
      await done;
      return;
    }
  }

  private buildOptions(): readonly string[] {
    return this.probe?.ok ? this.probe.buildOptions : [];
  }

  /** Options for bundle mounts (once mode() has chosen overlay). */
  bundleOptions(): readonly string[] {
    return this.probe?.ok ? this.probe.bundleOptions : [];
  }

  private async build(hex: string, spec: LayerSpec, parents: string[], below: Promise<void> | undefined, started: () => void, logger: Logger, signal?: AbortSignal): Promise<void> {
    const t0 = performance.now();
    const dir = path.join(this.layout.stagingDir, stagingName(ownerTag(), randomBytes(8).toString('hex')));
    const layer = path.join(dir, 'layer');
    const diff = path.join(layer, 'diff');
    const work = path.join(dir, 'work');
    const merged = path.join(dir, 'merged');
    let mounted = false;
    try {
      await mkdir(dir, { mode: 0o700 });
      for (const d of [layer, diff, work, merged]) await mkdir(d, { mode: 0o700 });
      const top = parents[parents.length - 1];
      const speculative = top !== undefined && below !== undefined && (await validLayer(this.layout, top)) === undefined;
      copyRootMeta(top === undefined || speculative ? undefined : this.layout.layerDiff(top), diff);
      let result: UnpackResult;
      /** The tree summary, when a speculative build already has it. */
      let tree: TreeSummary | undefined;
      if (top === undefined) {
        // A base layer has nothing below it: an overlay over an empty lower would write exactly
        // this (the applier refuses char 0:0 devices and overlay xattrs itself), only slower.
        result = await spec.unpack(diff, signal, { started });
      } else if (speculative) {
        // The parents are still being unpacked: start on our own (./speculative.ts).
        const ready = async (): Promise<void> => {
          await abortable(below, signal);
          if ((await validLayer(this.layout, top)) === undefined) {
            throw new GuestpullError(ErrorCode.INTERNAL, `layer ${spec.layerDigest}: its parent layer ${top} is not in the store after it was unpacked`, { layer: spec.layerDigest });
          }
        };
        const lower = async (rootEntry: boolean): Promise<LowerSwitch> => {
          await ready();
          const { merged: mergedDirs } = await this.mergeSpeculative(diff, parents, rootEntry, dir);
          const lowers = parents.map((h) => this.layout.layerDiff(h)).reverse();
          mountOverlay({ lowers, upper: diff, work, options: this.buildOptions() }, merged, this.layout.layersDir);
          mounted = true;
          return { root: merged, merged: mergedDirs };
        };
        try {
          result = await spec.unpack(diff, signal, { started, lower });
        } finally {
          if (mounted) unmountQuietly(merged);
          mounted = false;
        }
        const unpacked = performance.now();
        let waitedMs = 0;
        if (!result.switched) {
          // Summarize while the parents are still busy: the merge rarely changes anything.
          const before = await summarizeTree(diff);
          await ready();
          waitedMs = Math.round(performance.now() - unpacked);
          if (!(await this.mergeSpeculative(diff, parents, result.rootEntry ?? false, dir)).changed) tree = before;
        }
        logger.debug(
          { layer: spec.layerDigest, chainId: spec.chainId, neededParents: result.switched ?? false, waitedMs, mergeMs: Math.round(performance.now() - unpacked) - waitedMs },
          'layer unpacked beside its parents',
        );
      } else {
        const lowers = parents.map((h) => this.layout.layerDiff(h)).reverse();
        try {
          mountOverlay({ lowers, upper: diff, work, options: this.buildOptions() }, merged, this.layout.layersDir);
        } catch (e) {
          const g = asGuestpullError(e);
          throw new GuestpullError(g.code, `cannot mount the overlay to unpack layer ${spec.layerDigest} on its ${parents.length} parent layers: ${g.message}`, { layer: spec.layerDigest }, { cause: e });
        }
        mounted = true;
        try {
          result = await spec.unpack(merged, signal, { started });
        } finally {
          unmountQuietly(merged);
          mounted = false;
        }
      }
      signal?.throwIfAborted();
      const summaryStart = performance.now();
      const record: LayerRecord = {
        version: RECORD_VERSION,
        chainId: spec.chainId,
        hex,
        diffId: spec.diffId,
        parent: top ?? null,
        layerDigest: spec.layerDigest,
        mediaType: spec.mediaType,
        compressedBytes: spec.compressedBytes,
        uncompressedBytes: result.uncompressedBytes,
        entries: result.entries,
        created: new Date().toISOString(),
        // What `guestpull fsck` checks the published tree against.
        tree: tree ?? (await summarizeTree(diff)),
      };
      const summaryMs = Math.round(performance.now() - summaryStart);
      await writeJsonAtomic(path.join(layer, path.basename(this.layout.layerRecord(hex))), record);
      await this.publish(hex, layer, dir);
      logger.info(
        { layer: spec.layerDigest, chainId: spec.chainId, bytes: spec.compressedBytes, uncompressed: result.uncompressedBytes, entries: result.entries, ms: Math.round(performance.now() - t0), summaryMs },
        'layer unpacked into the store',
      );
    } finally {
      if (mounted) unmountQuietly(merged);
      // Never recurse into a mount: if the build mount could not be taken down, cleanup does it later.
      if (mountsUnder(readMounts(), dir).length === 0) await rm(dir, { recursive: true, force: true }).catch(() => undefined);
    }
  }

  /**
   * Merge a speculatively unpacked upper onto its complete parents (./speculative.ts): one parent
   * is its own directory; several are seen through a read-only overlay mounted in `staging`.
   */
  private async mergeSpeculative(upper: string, parents: readonly string[], rootEntry: boolean, staging: string): Promise<MergeResult> {
    if (parents.length === 1) return mergeOntoLower(upper, this.layout.layerDiff(parents[0]!), rootEntry);
    const view = path.join(staging, 'lower');
    await mkdir(view, { mode: 0o700 });
    mountLowerView(parents.map((h) => this.layout.layerDiff(h)).reverse(), view, this.layout.layersDir);
    try {
      return mergeOntoLower(upper, view, rootEntry);
    } finally {
      unmountQuietly(view);
    }
  }

  /** Rename the complete layer (tree + record) into layers/; if another process was first, keep theirs. */
  private async publish(hex: string, layer: string, staging: string): Promise<void> {
    const target = this.layout.layerDir(hex);
    for (let attempt = 0; ; attempt++) {
      try {
        await rename(layer, target);
        return;
      } catch (e) {
        const code = (e as NodeJS.ErrnoException).code;
        if ((code !== 'ENOTEMPTY' && code !== 'EEXIST') || attempt > 0) throw e;
      }
      if (await validLayer(this.layout, hex)) return;
      // Not a complete layer (damaged): move it out of the way, into our staging to be removed with it.
      await rename(target, path.join(staging, 'damaged')).catch(() => undefined);
    }
  }
}

function cleaned(r: GcReport): Record<string, number> {
  const out: Record<string, number> = {};
  for (const k of ['staging', 'incompleteLayers', 'deadBundles', 'strays', 'emptyRootfs'] as const) if (r[k] > 0) out[k] = r[k];
  return out;
}
