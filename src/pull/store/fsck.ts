/**
 * `guestpull fsck`: checks a work dir's layer store, read-only unless asked to repair, run under
 * the work dir mutex (./lock.ts) like garbage collection.
 *
 * - Every directory under layers/ has a valid record whose `hex` is its name, whose chain ID is its
 *   parent's chain ID + its diff ID (a base layer: its diff ID), whose parent is in the store, and
 *   whose tree still matches the summary taken when it was published (`summarizeTree`); records
 *   without a summary (older versions) are `unverifiable`, a notice, not a problem.
 * - Nothing is left over: staging directories of processes that are gone, layer directories
 *   without a complete record, temp files of interrupted atomic writes, unknown names, bundle
 *   records naming missing layers, bundle directories without records, `mounted` bundle records
 *   whose rootfs is not an overlay mount any more, half-made bundles of dead processes, cached
 *   image configs that do not match their digest.
 * - `repair` removes only what garbage collection would remove anyway and nothing can be using:
 *   staging leftovers (their mounts detached first), incomplete layers, temp files and strays
 *   under layers/ and bundles/, configs that do not match their digest. The rest is reported.
 *
 * Tree summary: every entry below the root (the root itself as `.`), never following symlinks,
 * sorted by the bytes of its relative path, contributes one line to a sha256:
 *   path \0 type \0 mode \0 uid \0 gid \0 size \0 extra \0 n \0 (xattr-name \0 value-hex \0)×n \n
 * type d f l c b p s; mode the permission bits in octal; size that of a regular file, else 0;
 * extra a symlink's target, a device's rdev in decimal, else empty; xattrs sorted by name. The
 * content digest (`--deep`) hashes the same lines with the sha256 hex of each regular file's
 * content (empty for other types) inserted before the `\n`.
 */
import { createHash, type Hash } from 'node:crypto';
import { createReadStream, lstatSync, readdirSync, readlinkSync } from 'node:fs';
import { lstat, open, readdir, realpath, rm, stat } from 'node:fs/promises';
import type { BigIntStats } from 'node:fs';
import path from 'node:path';
import { pipeline } from 'node:stream/promises';
import { ErrorCode, GuestpullError } from '../../errors.js';
import type { Logger } from '../../log.js';
import { lgetxattr, llistxattr, nativeAvailable } from '../../native/index.js';
import { chainHex, isChainHex, LAYER_RECORD, Layout } from './layout.js';
import { acquireLock, ownerAlive } from './lock.js';
import { isOverlayMounted, isUpperInUse, mountsUnder, readMounts, type MountEntry } from './mountinfo.js';
import { unmountQuietly } from './overlay.js';
import { BundleRecord, LayerRecord, readRecord, TEMP_MARK, type TreeSummary } from './records.js';

export type { TreeSummary } from './records.js';

export type FsckKind =
  /** layers/<hex> has no layer.json */
  | 'record-missing'
  /** layer.json is not a valid record (JSON, schema, size) */
  | 'record-invalid'
  /** the record's hex or chain ID does not name its directory */
  | 'record-hex-mismatch'
  /** layers/<hex>/diff is missing or not a directory */
  | 'tree-missing'
  /** the chain ID is not sha256(parent chain ID + " " + diff ID), or a base layer's is not its diff ID */
  | 'chain-mismatch'
  /** the record names a parent that is not a valid layer in the store */
  | 'parent-missing'
  /** the tree differs from its recorded summary (or cannot be read) */
  | 'tree-mismatch'
  /** --deep: file contents differ from the recorded content digest */
  | 'content-mismatch'
  /** a staging directory whose process is gone */
  | 'staging-leftover'
  /** a temp file of an interrupted atomic write */
  | 'temp-file'
  /** a name that is not the store's */
  | 'stray'
  /** bundles/<id>.json is not a valid record */
  | 'bundle-record-invalid'
  /** a bundle record names a layer that is not in the store */
  | 'bundle-layer-missing'
  /** a bundle record's layers are not one chain, bottom first */
  | 'bundle-chain-mismatch'
  /** a `mounted` bundle record whose rootfs is not an overlay mount of its upper any more */
  | 'bundle-unmounted'
  /** a pending record, or a mounted one without config.json, of a process that is gone */
  | 'bundle-dead'
  /** a mounted bundle record without its upper/work directories */
  | 'bundle-dir-missing'
  /** bundles/<id>/ without a record */
  | 'bundle-orphan'
  /** a cached image config whose bytes do not match its digest */
  | 'config-mismatch'
  /** notice: a layer's tree (or, with --deep, content) has no recorded summary to compare with */
  | 'unverifiable';

export interface FsckProblem {
  kind: FsckKind;
  /** Absolute path of what is wrong. */
  path: string;
  detail: string;
  /** Whether --repair removed it. */
  repaired: boolean;
}

export interface FsckReport {
  /** Version of this report's JSON shape. */
  version: 1;
  workDir: string;
  deep: boolean;
  repair: boolean;
  /** No problems left (repaired ones do not count; unverifiable notices never do). */
  clean: boolean;
  counts: {
    /** Layer directories with a valid record. */
    layers: number;
    /** Of those, the ones whose tree matched its summary. */
    verified: number;
    /** Valid bundle records. */
    bundles: number;
    /** Cached image configs that match their digest. */
    configs: number;
    /** Staging directories and pending bundle records of live processes (not checked). */
    inProgress: number;
  };
  problems: FsckProblem[];
  unverifiable: FsckProblem[];
}

export interface FsckOptions {
  logger: Logger;
  /** Also hash every regular file's content (compared where the record has a content digest). */
  deep?: boolean;
  /** Remove the safe cases (see the module comment). */
  repair?: boolean;
  /** Tests: another view of the mount table. */
  mounts?: () => MountEntry[];
}

// ---------------------------------------------------------------------------------------------
// Tree summary

/**
 * Entries handled between two turns of the event loop (~20 µs each: a turn of at most ~80 ms). The
 * walk uses fast synchronous calls; a publish waits for its summary, so it should not give the
 * thread away every few milliseconds to another layer being unpacked (512: 60 ms -> 270 ms).
 */
const YIELD_EVERY = 4096;
const nextTurn = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));

/** Kept per entry until the sort: the path only (stats of tens of thousands of entries would not be small). */
interface Walked {
  rel: string;
  key: Buffer;
}

function typeChar(st: BigIntStats): string {
  if (st.isDirectory()) return 'd';
  if (st.isFile()) return 'f';
  if (st.isSymbolicLink()) return 'l';
  if (st.isCharacterDevice()) return 'c';
  if (st.isBlockDevice()) return 'b';
  if (st.isFIFO()) return 'p';
  return 's';
}

/** Every entry below `root` (root included as `.`), sorted by the bytes of the relative path. */
async function walk(root: string): Promise<Walked[]> {
  if (!lstatSync(root).isDirectory()) throw new Error(`${root} is not a directory`);
  const out: Walked[] = [{ rel: '.', key: Buffer.from('.') }];
  const dirs: string[] = ['.'];
  let sinceYield = 0;
  for (let d = dirs.pop(); d !== undefined; d = dirs.pop()) {
    for (const ent of readdirSync(d === '.' ? root : path.join(root, d), { withFileTypes: true })) {
      const rel = d === '.' ? ent.name : `${d}/${ent.name}`;
      out.push({ rel, key: Buffer.from(rel, 'utf8') });
      if (ent.isDirectory()) dirs.push(rel);
      if (++sinceYield >= YIELD_EVERY) {
        sinceYield = 0;
        await nextTurn();
      }
    }
  }
  return out.sort((a, b) => Buffer.compare(a.key, b.key));
}

function xattrs(abs: string): [string, Buffer][] {
  let names: string[];
  try {
    names = llistxattr(abs);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'ENOTSUP' || code === 'EOPNOTSUPP') return [];
    throw e;
  }
  const out: [string, Buffer][] = [];
  for (const name of names.sort((a, b) => Buffer.compare(Buffer.from(a, 'utf8'), Buffer.from(b, 'utf8')))) {
    const v = lgetxattr(abs, name);
    if (v !== undefined) out.push([name, v]);
  }
  return out;
}

/** Files up to this size are read into one buffer (much cheaper than a stream per small file). */
const READ_WHOLE_MAX = 1024 * 1024;

async function fileSha256(file: string, size: bigint): Promise<string> {
  const h = createHash('sha256');
  if (size > BigInt(READ_WHOLE_MAX)) {
    await pipeline(createReadStream(file), h);
    return h.digest('hex');
  }
  const fh = await open(file, 'r');
  try {
    // One byte more than lstat said, to notice a file that grew meanwhile; a larger one streams on.
    const buf = Buffer.allocUnsafe(Number(size) + 1);
    let n = 0;
    for (;;) {
      const { bytesRead } = await fh.read(buf, n, buf.length - n, null);
      if (bytesRead === 0) break;
      n += bytesRead;
      if (n === buf.length) break;
    }
    h.update(buf.subarray(0, n));
    if (n === buf.length) await pipeline(fh.createReadStream({ start: n, autoClose: false }), h);
    return h.digest('hex');
  } finally {
    await fh.close();
  }
}

/**
 * One entry's line, fed to the hash piece by piece: path bytes, NUL, type, mode (4 octal digits),
 * uid, gid, size, link target or device number, xattr count, each separated and ended by NUL, then
 * per xattr its name and hex value, each ended by NUL (the caller adds the newline). No Buffer is
 * made per entry: a layer of 50,000 entries made ~60 MiB of short-lived buffers (peak RSS) that way.
 */
function feedLine(h: Hash, key: Buffer, fields: string, extra: Buffer | string, xs: [string, Buffer][]): void {
  h.update(key);
  h.update(fields, 'latin1');
  if (typeof extra === 'string') h.update(extra, 'latin1');
  else h.update(extra);
  h.update(`\0${xs.length}\0`, 'latin1');
  for (const [name, value] of xs) {
    h.update(name, 'utf8');
    h.update(`\0${value.toString('hex')}\0`, 'latin1');
  }
}

async function summarize(dir: string, content: boolean): Promise<TreeSummary> {
  const meta = createHash('sha256');
  const full = content ? createHash('sha256') : undefined;
  let bytes = 0n;
  const entries = await walk(dir);
  let sinceYield = 0;
  for (const w of entries) {
    if (++sinceYield >= YIELD_EVERY) {
      sinceYield = 0;
      await nextTurn();
    }
    const abs = w.rel === '.' ? dir : path.join(dir, w.rel);
    const st = lstatSync(abs, { bigint: true });
    const type = typeChar(st);
    const size = type === 'f' ? st.size : 0n;
    bytes += size;
    const extra: Buffer | string = type === 'l' ? readlinkSync(abs, { encoding: 'buffer' }) : type === 'c' || type === 'b' ? st.rdev.toString() : '';
    const xs = xattrs(abs);
    const fields = `\0${type}\0${(Number(st.mode) & 0o7777).toString(8).padStart(4, '0')}\0${st.uid}\0${st.gid}\0${size}\0`;
    feedLine(meta, w.key, fields, extra, xs);
    meta.update('\n');
    if (full) {
      feedLine(full, w.key, fields, extra, xs);
      if (type === 'f') full.update(await fileSha256(abs, st.size), 'latin1');
      full.update('\n');
    }
  }
  const summary: TreeSummary = { entries: entries.length, bytes: Number(bytes), digest: meta.digest('hex') };
  if (full) summary.contentDigest = full.digest('hex');
  return summary;
}

/**
 * The metadata summary of an unpacked layer tree (see the module comment): what the store records
 * beside a layer when it publishes it. Needs the native addon (xattrs).
 */
export async function summarizeTree(dir: string): Promise<TreeSummary> {
  return summarize(dir, false);
}

/** The same with `contentDigest` (every regular file's content hashed too). */
export async function summarizeTreeWithContent(dir: string): Promise<TreeSummary> {
  return summarize(dir, true);
}

// ---------------------------------------------------------------------------------------------
// The check

/** Staging directory names: `<owner tag>-<random hex>` (./cleanup.ts stagingName). */
const STAGING_NAME = /^(\d{1,10}-\d{1,20})-[0-9a-f]{8,64}$/;
const BUNDLE_ID = /^[0-9a-f]{16,64}$/;
const CONFIG_NAME = /^[0-9a-f]{64}$|^[0-9a-f]{128}$/;
const CONFIG_ALGOS = new Set(['sha256', 'sha512']);
const LAYER_DIFF = 'diff';

async function names(dir: string): Promise<string[]> {
  try {
    return (await readdir(dir)).sort();
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw e;
  }
}

async function kindOf(p: string): Promise<'dir' | 'file' | 'missing' | 'other'> {
  try {
    const st = await lstat(p);
    return st.isDirectory() ? 'dir' : st.isFile() ? 'file' : 'other';
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return 'missing';
    throw e;
  }
}

/** sha256(parent chain ID + " " + diff ID), as image-spec config.md defines ChainID. */
function nextChainId(parentChainId: string, diffId: string): string {
  return `sha256:${createHash('sha256').update(`${parentChainId} ${diffId}`).digest('hex')}`;
}

function describeTreeDiff(want: TreeSummary, got: TreeSummary): string {
  const d: string[] = [];
  if (want.entries !== got.entries) d.push(`${got.entries} entries, recorded ${want.entries}`);
  if (want.bytes !== got.bytes) d.push(`${got.bytes} file bytes, recorded ${want.bytes}`);
  if (want.digest !== got.digest) d.push(`metadata digest ${got.digest.slice(0, 12)}…, recorded ${want.digest.slice(0, 12)}…`);
  return `the tree changed since it was published: ${d.join('; ')}`;
}

interface Pending {
  problem: FsckProblem;
  fix?: () => Promise<boolean>;
}

/** Check the store of `layout`; the caller holds the work dir mutex. */
export async function fsckStore(layout: Layout, opts: FsckOptions): Promise<FsckReport> {
  const deep = opts.deep === true;
  const mountsNow = opts.mounts ?? (() => readMounts());
  const log = opts.logger;
  const found: Pending[] = [];
  const unverifiable: FsckProblem[] = [];
  const counts = { layers: 0, verified: 0, bundles: 0, configs: 0, inProgress: 0 };
  const problem = (kind: FsckKind, p: string, detail: string, fix?: () => Promise<boolean>): void => {
    found.push({ problem: { kind, path: p, detail, repaired: false }, ...(fix ? { fix } : {}) });
  };
  /** Remove `p` unless something is mounted at or below it. */
  const remove = (p: string) => async (): Promise<boolean> => {
    if (mountsUnder(mountsNow(), p).length > 0) {
      log.warn({ path: p }, 'fsck: not removing, something is mounted below it');
      return false;
    }
    await rm(p, { recursive: true, force: true });
    return true;
  };

  // 1. Layers: each directory on its own, then chains and trees.
  const valid = new Map<string, LayerRecord>();
  for (const name of await names(layout.layersDir)) {
    const dir = layout.layerDir(name);
    const kind = await kindOf(dir);
    if (!isChainHex(name) || kind !== 'dir') {
      problem('stray', dir, `not a layer directory (${kind === 'dir' ? 'the name is not a 64-hex chain ID' : `a ${kind}`})`, remove(dir));
      continue;
    }
    for (const inside of await names(dir)) {
      if (inside === LAYER_RECORD || inside === LAYER_DIFF) continue;
      const p = path.join(dir, inside);
      if (inside.includes(TEMP_MARK)) problem('temp-file', p, 'temp file of an interrupted atomic write', remove(p));
      else problem('stray', p, 'unknown name in a layer directory');
    }
    const recFile = layout.layerRecord(name);
    const recKind = await kindOf(recFile);
    if (recKind === 'missing') {
      problem('record-missing', dir, `no ${LAYER_RECORD}: an incomplete layer, never used by pulls`, remove(dir));
      continue;
    }
    const rec = await readRecord(recFile, LayerRecord);
    if (!rec) {
      problem('record-invalid', recFile, `${LAYER_RECORD} is not a valid layer record: an incomplete layer, never used by pulls`, remove(dir));
      continue;
    }
    if (rec.hex !== name || chainHex(rec.chainId) !== name) {
      problem('record-hex-mismatch', recFile, `the record names layer ${rec.hex} (chain ID ${rec.chainId}), not ${name}: never used by pulls`, remove(dir));
      continue;
    }
    if ((await kindOf(layout.layerDiff(name))) !== 'dir') {
      problem('tree-missing', layout.layerDiff(name), 'the layer has a record but no tree directory: never used by pulls', remove(dir));
      continue;
    }
    valid.set(name, rec);
  }
  counts.layers = valid.size;
  const canSummarize = nativeAvailable();
  for (const [hex, rec] of valid) {
    const recFile = layout.layerRecord(hex);
    if (rec.parent === null) {
      if (rec.chainId !== rec.diffId) problem('chain-mismatch', recFile, `a base layer's chain ID ${rec.chainId} must be its diff ID ${rec.diffId}`);
    } else {
      const parent = valid.get(rec.parent);
      if (!parent) {
        problem('parent-missing', recFile, `parent layer ${rec.parent} is not in the store`);
      } else {
        const want = nextChainId(parent.chainId, rec.diffId);
        if (want !== rec.chainId) problem('chain-mismatch', recFile, `chain ID ${rec.chainId}, but parent ${parent.chainId} + diff ID ${rec.diffId} give ${want}`);
      }
    }
    const diff = layout.layerDiff(hex);
    if (!rec.tree) {
      unverifiable.push({ kind: 'unverifiable', path: diff, detail: 'the record has no tree summary (written by an older guestpull)', repaired: false });
      continue;
    }
    if (!canSummarize) {
      unverifiable.push({ kind: 'unverifiable', path: diff, detail: "guestpull's native addon (xattrs) is not available: the tree cannot be summarized", repaired: false });
      continue;
    }
    const withContent = deep && rec.tree.contentDigest !== undefined;
    let got: TreeSummary;
    try {
      got = await summarize(diff, withContent);
    } catch (e) {
      problem('tree-mismatch', diff, `the tree cannot be read: ${(e as Error).message}`);
      continue;
    }
    if (got.entries !== rec.tree.entries || got.bytes !== rec.tree.bytes || got.digest !== rec.tree.digest) {
      problem('tree-mismatch', diff, describeTreeDiff(rec.tree, got));
      continue;
    }
    if (withContent && got.contentDigest !== rec.tree.contentDigest) {
      problem('content-mismatch', diff, `file contents changed since the layer was published: content digest ${got.contentDigest?.slice(0, 12)}…, recorded ${rec.tree.contentDigest?.slice(0, 12)}…`);
      continue;
    }
    if (deep && !withContent) unverifiable.push({ kind: 'unverifiable', path: diff, detail: 'metadata verified; file contents were not summarized when the layer was published', repaired: false });
    counts.verified++;
  }

  // 2. Staging: work in progress of live processes, leftovers of dead ones.
  for (const name of await names(layout.stagingDir)) {
    const dir = path.join(layout.stagingDir, name);
    const owner = STAGING_NAME.exec(name)?.[1];
    if (owner !== undefined && ownerAlive(owner)) {
      counts.inProgress++;
      continue;
    }
    const inside = mountsUnder(mountsNow(), dir).length;
    problem(
      'staging-leftover',
      dir,
      owner === undefined ? 'not a staging directory name' : `left by process ${owner.split('-')[0]}, which is gone${inside > 0 ? ` (${inside} mounts inside)` : ''}`,
      async () => {
        for (const m of mountsUnder(mountsNow(), dir)) unmountQuietly(m.mountPoint);
        return remove(dir)();
      },
    );
  }

  // 3. Bundle records and directories.
  const mounts = mountsNow();
  const bundleNames = await names(layout.bundlesDir);
  const recorded = new Set<string>();
  for (const name of bundleNames) {
    const p = path.join(layout.bundlesDir, name);
    if (name.includes(TEMP_MARK)) {
      problem('temp-file', p, 'temp file of an interrupted atomic write', remove(p));
      continue;
    }
    const id = name.endsWith('.json') ? name.slice(0, -5) : undefined;
    if (id === undefined) continue; // directories: below
    if (!BUNDLE_ID.test(id)) {
      problem('stray', p, 'not a bundle record name', remove(p));
      continue;
    }
    recorded.add(id);
    const rec = await readRecord(p, BundleRecord);
    if (!rec || rec.id !== id) {
      problem('bundle-record-invalid', p, rec ? `the record is for bundle ${rec.id}` : 'not a valid bundle record');
      continue;
    }
    counts.bundles++;
    const alive = ownerAlive(rec.owner);
    if (rec.state === 'pending') {
      if (alive) {
        counts.inProgress++;
        continue; // its layers may still be on their way
      }
      problem('bundle-dead', p, `pending record of ${rec.image} for ${rec.bundle}, left by process ${rec.owner.split('-')[0]}, which is gone`);
    } else if (!isOverlayMounted(mounts, rec.rootfs, layout.bundleUpper(id))) {
      problem('bundle-unmounted', p, `recorded as mounted at ${rec.rootfs}, but no overlay with its upper directory is mounted there`);
    } else {
      if (!alive && (await kindOf(path.join(rec.bundle, 'config.json'))) === 'missing') {
        problem('bundle-dead', p, `mounted at ${rec.rootfs} without config.json, by process ${rec.owner.split('-')[0]}, which is gone: the pull never finished`);
      }
      for (const sub of ['upper', 'work']) {
        const d = path.join(layout.bundleDir(id), sub);
        if ((await kindOf(d)) !== 'dir') problem('bundle-dir-missing', d, `bundle ${id} is mounted but its ${sub} directory is missing`);
      }
    }
    const missing = rec.layers.filter((h) => !valid.has(h));
    if (missing.length > 0) problem('bundle-layer-missing', p, `names ${missing.length} layers not in the store: ${missing.join(', ')}`);
    const broken = rec.layers.findIndex((h, i) => valid.has(h) && valid.get(h)!.parent !== (i === 0 ? null : rec.layers[i - 1]));
    if (broken >= 0) problem('bundle-chain-mismatch', p, `layer ${broken} (${rec.layers[broken]}) does not sit on layer ${broken - 1} of the record`);
  }
  for (const name of bundleNames) {
    if (name.endsWith('.json') || name.includes(TEMP_MARK)) continue;
    const p = path.join(layout.bundlesDir, name);
    if (!BUNDLE_ID.test(name) || (await kindOf(p)) !== 'dir') {
      problem('stray', p, 'not a bundle directory', remove(p));
      continue;
    }
    if (recorded.has(name)) continue;
    const inUse = isUpperInUse(mounts, layout.bundleUpper(name));
    problem('bundle-orphan', p, inUse ? 'no record, but an overlay still uses its upper directory' : 'no record');
  }

  // 4. Cached image configs.
  for (const algo of await names(layout.configsDir)) {
    const dir = path.join(layout.configsDir, algo);
    if (!CONFIG_ALGOS.has(algo) || (await kindOf(dir)) !== 'dir') {
      problem('stray', dir, 'not a config digest algorithm directory');
      continue;
    }
    for (const name of await names(dir)) {
      const p = path.join(dir, name);
      if (name.includes(TEMP_MARK)) {
        problem('temp-file', p, 'temp file of an interrupted atomic write (or one being written now)');
        continue;
      }
      if (!CONFIG_NAME.test(name) || (await kindOf(p)) !== 'file') {
        problem('stray', p, 'not a cached config');
        continue;
      }
      const h = createHash(algo);
      await pipeline(createReadStream(p), h);
      if (h.digest('hex') !== name) problem('config-mismatch', p, `content does not match its digest ${algo}:${name}`, remove(p));
      else counts.configs++;
    }
  }

  if (opts.repair) {
    for (const f of found) {
      if (!f.fix) continue;
      try {
        f.problem.repaired = await f.fix();
        if (f.problem.repaired) log.info({ kind: f.problem.kind, path: f.problem.path }, 'fsck: repaired');
      } catch (e) {
        log.warn({ kind: f.problem.kind, path: f.problem.path, err: (e as Error).message }, 'fsck: could not repair');
      }
    }
  }
  const problems = found.map((f) => f.problem);
  return {
    version: 1,
    workDir: layout.root,
    deep,
    repair: opts.repair === true,
    clean: problems.every((p) => p.repaired),
    counts,
    problems,
    unverifiable,
  };
}

export interface FsckWorkDirOptions extends FsckOptions {
  workDir: string;
  /** How long to wait for the mutex (default 60 s). */
  lockWaitMs?: number;
}

/** fsckStore for a work dir another process may be using, under its mutex; undefined when it does not exist. */
export async function fsckWorkDir(opts: FsckWorkDirOptions): Promise<FsckReport | undefined> {
  let root: string;
  try {
    if (!(await stat(opts.workDir)).isDirectory()) {
      throw new GuestpullError(ErrorCode.CONFIG, `work_dir ${opts.workDir} is not a directory`, { workDir: opts.workDir });
    }
    root = await realpath(opts.workDir);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw e;
  }
  const layout = new Layout(root);
  const lock = await acquireLock(layout.lockFile, root, opts.lockWaitMs ?? 60_000);
  try {
    return await fsckStore(layout, opts);
  } finally {
    await lock.release();
  }
}

/** The human summary: one headline, then one line per problem and notice. */
export function formatFsckReport(r: FsckReport): string {
  const c = r.counts;
  const open = r.problems.filter((p) => !p.repaired).length;
  const fixed = r.problems.length - open;
  const lines = [
    `work dir ${r.workDir}: ${c.layers} layers (${c.verified} verified, ${r.unverifiable.length} unverifiable), ` +
      `${c.bundles} bundle records, ${c.configs} configs, ${c.inProgress} in progress: ` +
      (r.clean ? (fixed > 0 ? `clean after ${fixed} repairs` : 'clean') : `${open} problems${fixed > 0 ? `, ${fixed} repaired` : ''}`),
  ];
  for (const p of r.problems) lines.push(`  ${p.repaired ? 'repaired' : 'problem'} ${p.kind} ${p.path}: ${p.detail}`);
  for (const p of r.unverifiable) lines.push(`  notice ${p.kind} ${p.path}: ${p.detail}`);
  return lines.join('\n') + '\n';
}
