/**
 * The bundle directory during a pull. Copy mode builds the rootfs in a private staging directory
 * inside the bundle and publishes it by rename, then config.json is written atomically; overlay
 * mode mounts the rootfs in place (./bundle/overlay.ts) and only needs the bundle directory. On any
 * failure everything the pull made is removed (the bundle directory too, if the pull created it),
 * so a bundle holds either nothing of ours or a complete rootfs + config.json.
 *
 * A killed process cannot remove its staging, so the directory carries its owner:
 * `.guestpull-staging-<pid>-<start time>-<random>` (the tag of ./store/lock.ts). Every new staging
 * first removes the staging directories in the same bundle whose owner is gone (the retry of a
 * killed pull is the one that finds them); a live owner's staging is never touched, whichever
 * process it is (two daemons may share a bundle directory). Names from before owner tags
 * (`.guestpull-staging-<12 hex>`) cannot be attributed: they are removed once neither the
 * directory nor its rootfs changed for STALE_UNOWNED_MS (10 minutes). Only real directories are
 * removed (never through a symlink), and none with a mount below it. Anything else in the bundle
 * is left alone. A dead pull's staging marked PUBLISHED (its rootfs renamed into the bundle, maybe
 * no config.json yet) takes that rootfs with it unless config.json exists.
 */
import { randomBytes } from 'node:crypto';
import { chmod, lstat, mkdir, readdir, rename, rm, writeFile } from 'node:fs/promises';
import path from 'node:path';
import type { Logger } from '../log.js';
import { prepareBundleDir } from './bundle/dir.js';
import { ownerAlive, ownerTag } from './store/lock.js';
import { mountsUnder, readMounts, type MountEntry } from './store/mountinfo.js';

export interface Staging {
  bundle: string;
  /** The staging rootfs: layers are applied here. */
  rootfs: string;
  /** Staging directories of dead processes removed from the bundle before this one was made. */
  cleaned: string[];
  /**
   * Move the staging rootfs to `<bundle>/rootfs`. The staging directory stays, marked PUBLISHED,
   * until `complete()`: if the process dies before config.json is written, the next pull into this
   * bundle finds the mark and removes the published rootfs with the staging directory.
   */
  publishRootfs(): Promise<string>;
  /** config.json is written: the staging directory goes. */
  complete(): Promise<void>;
  /** Remove everything this staging created; safe to call more than once. */
  discard(): Promise<void>;
}

export const STAGING_PREFIX = '.guestpull-staging-';
/** How long an owner-less (old-style) staging directory must have been idle before it is removed. */
export const STALE_UNOWNED_MS = 10 * 60_000;

/** In a staging directory: its rootfs has been renamed to `<bundle>/rootfs`, config.json may not be written. */
export const PUBLISHED_MARK = 'published';
const OWNED = /^\.guestpull-staging-(\d{1,10}-\d{1,20})-[0-9a-f]{12}$/;
const UNOWNED = /^\.guestpull-staging-[0-9a-f]{12}$/;

/** The staging directory name of a new pull by the process `owner`. */
export function stagingDirName(owner: string, random = randomBytes(6).toString('hex')): string {
  return `${STAGING_PREFIX}${owner}-${random}`;
}

/** What a name in a bundle is: our staging with its owner tag, old-style staging, or not ours. */
export function parseStagingName(name: string): { owner: string } | 'unowned' | undefined {
  const m = OWNED.exec(name);
  if (m) return { owner: m[1]! };
  return UNOWNED.test(name) ? 'unowned' : undefined;
}

export interface StaleStagingOptions {
  logger?: Logger;
  /** Tests: the clock and another view of the mount table. */
  now?: number;
  mounts?: () => MountEntry[];
}

async function idleSince(dir: string): Promise<number> {
  const own = (await lstat(dir)).mtimeMs;
  const root = await lstat(path.join(dir, 'rootfs')).then((s) => s.mtimeMs, () => 0);
  return Math.max(own, root);
}

/**
 * Remove the staging directories in `bundle` left by processes that are gone (see the module
 * comment); returns their paths. Best effort: what cannot be inspected or removed is left.
 */
export async function removeStaleStaging(bundle: string, opts: StaleStagingOptions = {}): Promise<string[]> {
  const names = await readdir(bundle).catch(() => [] as string[]);
  const removed: string[] = [];
  let mounts: MountEntry[] | undefined;
  for (const name of names) {
    const kind = parseStagingName(name);
    if (kind === undefined) continue;
    const dir = path.join(bundle, name);
    try {
      if (!(await lstat(dir)).isDirectory()) continue;
      if (kind === 'unowned') {
        if ((opts.now ?? Date.now()) - (await idleSince(dir)) < STALE_UNOWNED_MS) continue;
      } else if (ownerAlive(kind.owner)) {
        continue;
      }
      mounts ??= (opts.mounts ?? (() => readMounts()))();
      if (mountsUnder(mounts, dir).length > 0) {
        opts.logger?.warn({ bundle, staging: dir }, 'not removing a dead pull staging directory: something is mounted below it');
        continue;
      }
      await removeHalfPublished(bundle, dir, mounts, opts.logger);
      await rm(dir, { recursive: true, force: true });
      removed.push(dir);
      opts.logger?.warn({ bundle, staging: dir }, 'removed the staging directory of a pull that did not finish');
    } catch (e) {
      opts.logger?.warn({ bundle, staging: dir, err: (e as Error).message }, 'could not remove the staging directory of a pull that did not finish');
    }
  }
  return removed;
}

/**
 * A dead pull marked its staging PUBLISHED: it renamed its rootfs into the bundle and may have died
 * before config.json. Without config.json that rootfs is half a bundle: remove it (a real
 * directory, nothing mounted below), so the bundle can be pulled again.
 */
async function removeHalfPublished(bundle: string, staging: string, mounts: MountEntry[], logger?: Logger): Promise<void> {
  if (!(await lstat(path.join(staging, PUBLISHED_MARK)).then((st) => st.isFile(), () => false))) return;
  if (await lstat(path.join(bundle, 'config.json')).then(() => true, () => false)) return;
  const rootfs = path.join(bundle, 'rootfs');
  if (!(await lstat(rootfs).then((st) => st.isDirectory(), () => false))) return;
  if (mountsUnder(mounts, rootfs).length > 0) return;
  await rm(rootfs, { recursive: true, force: true });
  logger?.warn({ bundle, rootfs }, 'removed the rootfs of a pull that died before writing config.json');
}

export async function createStaging(bundle: string, opts: { logger?: Logger } = {}): Promise<Staging> {
  const dirOfBundle = await prepareBundleDir(bundle);
  const cleaned = await removeStaleStaging(bundle, opts.logger ? { logger: opts.logger } : {});
  const dir = path.join(bundle, stagingDirName(ownerTag()));
  await mkdir(dir, { mode: 0o700 });
  const rootfs = path.join(dir, 'rootfs');
  await mkdir(rootfs);
  // Not subject to the umask: the same root mode an overlay bundle starts from.
  await chmod(rootfs, 0o755);
  let published: string | undefined;
  return {
    bundle,
    rootfs,
    cleaned,
    async publishRootfs() {
      const target = path.join(bundle, 'rootfs');
      await writeFile(path.join(dir, PUBLISHED_MARK), 'rootfs\n', { mode: 0o600 });
      await rename(rootfs, target);
      published = target;
      return target;
    },
    async complete() {
      published = undefined;
      await rm(dir, { recursive: true, force: true });
    },
    async discard() {
      await rm(dir, { recursive: true, force: true });
      if (published) await rm(published, { recursive: true, force: true });
      published = undefined;
      await dirOfBundle.removeIfCreated();
    },
  };
}
