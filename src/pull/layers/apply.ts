/**
 * Applies tar entries of one layer onto a flattened rootfs (copy mode), following image-spec
 * layer.md: whiteouts and opaque markers hide lower-layer content only, a directory over a
 * directory merges, anything else replaces what was there.
 *
 * Layer semantics decided here (README "Layer semantics" says the same):
 * - Ownership, device nodes and privileged xattrs need root (uid 0, as the daemon runs in a guest).
 *   Without root, files keep our own uid/gid.
 * - Extended attributes: `SCHILY.xattr.*` PAX records (raw bytes) are set with lsetxattr after
 *   chown and chmod (chown clears security.capability): `security.capability` and `trusted.*` when
 *   root (left out otherwise), `user.*` on files and directories (the kernel allows it nowhere
 *   else). `trusted.overlay.*` and `user.overlay.*` are refused (BAD_IMAGE): an image must not forge
 *   overlayfs whiteouts or opaque directories. Every other namespace (security.selinux, system.*
 *   ACLs, ...) and `LIBARCHIVE.xattr.*` records are left out, as are xattrs on hard link entries
 *   (a link takes its target's metadata). A filesystem without xattr support (ENOTSUP) leaves them
 *   out too; an attribute the kernel refuses (EINVAL, EPERM, E2BIG) is BAD_IMAGE. "Left out" is
 *   counted and logged at debug level. A directory over a directory keeps the lower attributes and
 *   adds the upper ones (as containerd does).
 * - A lower directory this layer writes into and also hides (a whiteout of it or an opaque marker
 *   above it, in either order) is "renewed": it ends as if this layer had made it. Its lower
 *   contents go, and so do its xattrs in the namespaces an image can set (user.*, trusted.*
 *   except trusted.overlay.*, security.capability) unless this layer's own entry set them; what
 *   the filesystem labels by itself (security.selinux) stays, as a fresh directory gets it too.
 *   With a directory entry of its own it takes that entry's owner, mode and mtime; without, it is
 *   an implied parent like any other: root-owned, 0755, the time guestpull made it. In overlay
 *   build mounts the directory is already copied up (the layer wrote into it), so removing the
 *   xattrs acts on the upper copy; overlayfs hides and guards its own trusted.overlay.* names.
 * - A whiteout or opaque marker that would remove a lower-layer symlink this same layer has
 *   already resolved an entry through (writes, directories, hard link targets and whiteouts
 *   beneath `a` when `a -> c`), or a lower directory holding such a symlink, is refused
 *   (BAD_IMAGE naming both entries and the symlink). layer.md hides lower content only, so the
 *   right result is `a` a fresh directory holding the entries and `c` untouched; but the entries
 *   already went into `c`, possibly over lower files, which cannot be undone without keeping
 *   copies. Real layer writers emit the whiteout first, which works: the whiteout removes the
 *   symlink and later entries beneath `a` make a fresh directory. Symlinks the layer made itself
 *   are not lower and never count.
 * - Char and block devices are created with mknod when root and refused otherwise (BAD_IMAGE
 *   "device nodes need root"); which devices a container may open is the device cgroup's business.
 *   A char device 0:0 is refused always: it is an overlayfs whiteout in disguise. FIFOs are created
 *   with or without root. Sparse files, contiguous files and unknown entry types are refused.
 *
 * Safety: an entry's parent is resolved inside the root (symlinks followed, never above the root)
 * and then checked component by component with lstat to be real directories; the final component
 * is never followed, and everything is created exclusively (O_EXCL, mkdir, symlink, link fail on an
 * existing path), so nothing is ever written through a symlink. guestpull is the only writer of the
 * staging rootfs, so these userspace checks are not racing anyone.
 *
 * Speed: verified parent directories are cached per layer (image path → host path) and the cache is
 * dropped whenever a directory or symlink is removed. Small metadata syscalls are made synchronously
 * (a few microseconds each; a thread-pool round trip costs ten times that); file data is written
 * straight from the decompressed chunks (one write per chunk a file spans, chunks of 1 MiB).
 *
 * System calls Node lacks (mknod, lsetxattr) come from guestpull's native addon (src/native).
 */
import fs from 'node:fs';
import { rm } from 'node:fs/promises';
import path from 'node:path';
import { ErrorCode, GuestpullError } from '../../errors.js';
import { lstatOrNull } from '../../fsutil.js';
import { llistxattr, lremovexattr, lsetxattr, mknod, nativeAvailable } from '../../native/index.js';
import { badEntry, limitHint, parseEntry, type LayerContext, type LayerEntry, type LayerLimits, type Xattr } from './entry.js';
import { cleanEntryPath, MAX_SYMLINK_FOLLOWS, resolveInRoot, splitImagePath } from './rootpath.js';
import type { EntryBody, TarHeader } from './tar.js';

const WHITEOUT_PREFIX = '.wh.';
const OPAQUE_MARKER = '.wh..wh..opq';
const { O_WRONLY, O_CREAT, O_EXCL, O_NOFOLLOW } = fs.constants;
/** How many ignored xattr names to keep for the log. */
const IGNORED_NAMES_KEPT = 10;
const CREATE_FLAGS = O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW;

interface DirMeta {
  mode: number;
  atime: number;
  mtime: number;
}

/** Whether a lower layer could have set this xattr from an image (see wantXattr), so a renewed directory drops it. */
function imageXattr(name: string): boolean {
  if (name.startsWith('trusted.overlay.') || name.startsWith('user.overlay.')) return false;
  return name.startsWith('user.') || name.startsWith('trusted.') || name === 'security.capability';
}

/**
 * The walk resolveInRoot (./rootpath.ts) makes for `comps` with every component followed, done
 * again synchronously to see it: the host paths of the symlinks it follows, and where it lands.
 */
function walkSymlinks(root: string, comps: string[]): { links: string[]; resolved: string } {
  const links: string[] = [];
  const done: string[] = [];
  const queue = comps.slice().reverse();
  let missing = false;
  while (queue.length > 0) {
    const comp = queue.pop()!;
    if (comp === '..') {
      done.pop();
      missing = false;
      continue;
    }
    if (missing) {
      done.push(comp);
      continue;
    }
    const host = path.join(root, ...done, comp);
    const st = lstatOrNull(host);
    if (st === null) missing = true;
    if (st === null || !st.isSymbolicLink()) {
      done.push(comp);
      continue;
    }
    if (links.length >= MAX_SYMLINK_FOLLOWS) break;
    links.push(host);
    const target = fs.readlinkSync(host);
    if (target.startsWith('/')) done.length = 0;
    const parts = splitImagePath(target);
    for (let i = parts.length - 1; i >= 0; i--) queue.push(parts[i]!);
  }
  return { links, resolved: done.length === 0 ? root : path.join(root, ...done) };
}

function parentOf(p: string): string {
  return p.slice(0, p.lastIndexOf('/'));
}

function depth(p: string): number {
  let n = 0;
  for (let i = 0; i < p.length; i++) if (p.charCodeAt(i) === 47) n++;
  return n;
}

/** Write all of `b` at the fd's position, coping with short writes. */
function writeAll(fd: number, b: Buffer): void {
  let at = 0;
  while (at < b.length) at += fs.writeSync(fd, b, at, b.length - at);
}

export interface ApplierOptions {
  /** Running as root: apply uid/gid, create device nodes, set security.capability and trusted.* xattrs. */
  root: boolean;
  /**
   * Speculative mode (overlay store, parents still being unpacked): the root is the new layer's
   * own empty upper directory, not an overlay of its parents. Entries that need nothing from the
   * layers below are written straight into it (whiteouts as char 0:0, opaque markers as
   * `trusted.overlay.opaque=y`, as overlayfs itself writes them); at the first entry that does (a
   * parent directory the layer does not make itself, a hard link to a lower file, an entry over one
   * of its own whiteouts), `lower` is awaited: once the parents are complete, the caller merges what
   * was written so far onto them (src/pull/store/speculative.ts) and mounts the usual build overlay,
   * and the rest of the layer is applied through that mount, exactly as it would have been anyway.
   */
  lower?: (rootEntry: boolean) => Promise<LowerSwitch>;
}

/** What `lower` gives: the build overlay mount to go on in, and which of the layer's directories merge with a lower one. */
export interface LowerSwitch {
  root: string;
  /** Host paths (under the speculative root) of this layer's directories that a lower directory lies under. */
  merged: string[];
}

const OPAQUE_XATTR = 'trusted.overlay.opaque';

export class LayerApplier {
  entries = 0;
  /** Extended attributes set, and left out (with a few of the names left out, for the log). */
  xattrs = 0;
  ignoredXattrs = 0;
  readonly ignoredXattrNames = new Set<string>();
  /** Host paths this layer wrote (or created as parents), plus all their ancestors. */
  private readonly written = new Set<string>();
  /** Image directory path ('a/b') → verified real host directory. */
  private readonly dirs = new Map<string, string>();
  /** Directory modes and times, applied at the end, deepest first. */
  private readonly pendingDirs = new Map<string, DirMeta>();
  /**
   * Host directories this layer created empty: everything in them was written by this layer, so
   * a path there that is not in `written` does not exist and needs no lstat.
   */
  private readonly fresh = new Set<string>();
  /** Host directories this layer made (mkdir), and those given metadata by one of its directory entries. */
  private readonly made = new Set<string>();
  private readonly explicit = new Set<string>();
  /** Xattr names this layer's directory entries set, by host directory (a renewal keeps these). */
  private readonly ownXattrs = new Map<string, Set<string>>();
  /**
   * Lower-layer symlinks this layer resolved an entry through, and every directory above them
   * (host paths) → the symlink and that entry. A whiteout or opaque marker may not remove them.
   */
  private readonly through = new Map<string, { link: string; entry: string }>();
  /** Speculative mode (see ApplierOptions.lower) until the switch to the build overlay. */
  private speculative: boolean;
  /** Speculative mode: the whiteouts (char 0:0) this layer made, host paths. */
  private readonly ownWhiteouts = new Set<string>();
  /** The layer had an entry for the root directory itself. */
  rootEntry = false;
  /** The layer went on through the build overlay (speculative mode needed its parents). */
  switched = false;
  private root: string;

  constructor(
    root: string,
    private readonly ctx: LayerContext,
    private readonly limits: LayerLimits,
    private readonly opts: ApplierOptions,
  ) {
    this.root = root;
    this.speculative = opts.lower !== undefined;
    if (!root.startsWith('/') || root === '/' || root.endsWith('/')) {
      throw new GuestpullError(ErrorCode.INTERNAL, `rootfs must be an absolute path below / without a trailing slash, got ${JSON.stringify(root)}`);
    }
    if (fs.readdirSync(root).length === 0) this.fresh.add(root);
  }

  /** Apply one archive entry; `body` is its data (what is not read is skipped by the reader). */
  async apply(header: TarHeader, body: EntryBody): Promise<void> {
    if (++this.entries > this.limits.maxEntries) {
      throw new GuestpullError(
        ErrorCode.BAD_IMAGE,
        `layer ${this.ctx.layer} of ${this.ctx.image} has more than ${this.limits.maxEntries} entries ${limitHint('maxEntries')}; refusing it`,
        { image: this.ctx.image, layer: this.ctx.layer },
      );
    }
    const e = parseEntry(this.ctx, header, this.limits);
    this.ignoredXattrs += e.ignoredXattrs;
    if (e.ignoredXattrs > 0) this.noteIgnored('LIBARCHIVE.xattr.*');
    try {
      await this.applyEntry(e, body);
    } catch (err) {
      throw this.wrap(err, e);
    }
  }

  /** Directory modes and mtimes, deepest first, once every entry is in place. */
  async finish(): Promise<void> {
    const list = [...this.pendingDirs.entries()].sort((a, b) => depth(b[0]) - depth(a[0]));
    try {
      for (const [host, m] of list) {
        const st = lstatOrNull(host);
        if (!st?.isDirectory()) continue;
        fs.chmodSync(host, m.mode);
        fs.utimesSync(host, m.atime, m.mtime);
      }
    } catch (err) {
      throw this.wrap(err, null);
    }
  }

  private wrap(err: unknown, e: LayerEntry | null): GuestpullError {
    if (err instanceof GuestpullError) return err;
    const where = `layer ${this.ctx.layer} of ${this.ctx.image}${e ? `, entry ${JSON.stringify(e.name.slice(0, 300))}` : ''}`;
    const context = { image: this.ctx.image, layer: this.ctx.layer };
    const error = err instanceof Error ? err : new Error(String(err));
    const errno = (error as NodeJS.ErrnoException).code;
    if (errno === 'ENOSPC' || errno === 'EDQUOT') {
      return new GuestpullError(ErrorCode.RESOURCE_EXHAUSTED, `out of space unpacking ${where}: ${error.message}; free space in the work directory`, context, { cause: err });
    }
    if (typeof (error as NodeJS.ErrnoException).syscall === 'string' || error instanceof TypeError || error instanceof RangeError) {
      return new GuestpullError(ErrorCode.INTERNAL, `unpacking ${where} failed: ${error.message}`, context, { cause: err });
    }
    // Anything else came from the archive stream (truncated data, a parser error).
    return new GuestpullError(ErrorCode.BAD_IMAGE, `reading ${where} failed: ${error.message}`, context, { cause: err });
  }

  private async applyEntry(e: LayerEntry, body: EntryBody): Promise<void> {
    const comps = e.components;
    if (comps.length === 0) {
      if (e.kind !== 'directory') throw badEntry(this.ctx, e.name, `names the root directory but is a ${e.kind}`);
      this.rootEntry = true;
      if (this.opts.root) fs.chownSync(this.root, e.uid, e.gid);
      this.setXattrs(this.root, e);
      this.pendingDirs.set(this.root, { mode: e.mode, atime: e.atime, mtime: e.mtime });
      return;
    }
    for (let i = 0; i < comps.length - 1; i++) {
      if (comps[i]!.startsWith(WHITEOUT_PREFIX)) throw badEntry(this.ctx, e.name, 'has a whiteout name as a parent directory');
    }
    const base = comps[comps.length - 1]!;
    const parentComps = comps.slice(0, -1);
    if (this.speculative && !(await this.alone(e, base, parentComps))) await this.switchToLower();

    if (base.startsWith(WHITEOUT_PREFIX)) {
      await this.whiteout(e, base, parentComps);
      return;
    }

    const dir = (await this.dirFor(parentComps, true, e))!;
    const host = `${dir}/${base}`;
    const existing = this.exists(dir, host) ? lstatOrNull(host) : null;
    if (existing) {
      if (e.kind === 'directory' && existing.isDirectory()) {
        if (this.opts.root) fs.chownSync(host, e.uid, e.gid);
        this.setXattrs(host, e);
        this.pendingDirs.set(host, { mode: e.mode, atime: e.atime, mtime: e.mtime });
        this.markWritten(host);
        this.explicit.add(host);
        this.dirs.set(comps.join('/'), host);
        return;
      }
      await this.remove(host, existing.isDirectory(), existing.isSymbolicLink());
    }

    switch (e.kind) {
      case 'file':
        await this.createFile(host, e, body);
        break;
      case 'directory':
        fs.mkdirSync(host, 0o700);
        this.fresh.add(host);
        this.made.add(host);
        this.explicit.add(host);
        if (this.opts.root) fs.chownSync(host, e.uid, e.gid);
        this.setXattrs(host, e);
        this.pendingDirs.set(host, { mode: e.mode, atime: e.atime, mtime: e.mtime });
        this.dirs.set(comps.join('/'), host);
        break;
      case 'symlink':
        fs.symlinkSync(e.linkname, host);
        if (this.opts.root) fs.lchownSync(host, e.uid, e.gid);
        this.setXattrs(host, e);
        fs.lutimesSync(host, e.atime, e.mtime);
        break;
      case 'link':
        await this.createHardlink(host, e);
        break;
      case 'char':
      case 'block':
      case 'fifo':
        this.createSpecial(host, e);
        break;
    }
    this.markWritten(host);
  }

  private async createFile(host: string, e: LayerEntry, body: EntryBody): Promise<void> {
    const fd = fs.openSync(host, CREATE_FLAGS, 0o600);
    try {
      let total = 0;
      if (e.size > 0) {
        // Each slice is written before the next is asked for: it is only valid until then (./tar.ts).
        for (let next = body.read(); ; next = body.read()) {
          const b = next instanceof Promise ? await next : next;
          if (b === null) break;
          total += b.length;
          writeAll(fd, b);
        }
      }
      if (total !== e.size) throw badEntry(this.ctx, e.name, `has ${total} bytes of data but its header says ${e.size}`);
      if (this.opts.root) fs.fchownSync(fd, e.uid, e.gid);
      // After chown: chown clears setuid/setgid (and security.capability, set next).
      fs.fchmodSync(fd, e.mode);
      this.setXattrs(host, e);
      fs.futimesSync(fd, e.atime, e.mtime);
    } finally {
      fs.closeSync(fd);
    }
  }

  /** A device node or FIFO, created exclusively (mknod never follows a final symlink). */
  private createSpecial(host: string, e: LayerEntry): void {
    const type = e.kind === 'char' ? 'char' : e.kind === 'block' ? 'block' : 'fifo';
    if (type !== 'fifo' && !this.opts.root) {
      throw badEntry(this.ctx, e.name, `is a ${type} device ${e.devmajor}:${e.devminor}: device nodes need root, and guestpull is not running as root`);
    }
    mknod(host, type, 0o600, e.devmajor, e.devminor);
    if (this.opts.root) fs.lchownSync(host, e.uid, e.gid);
    // The node was just made exclusively at `host`, so chmod (which follows symlinks) acts on it.
    fs.chmodSync(host, e.mode);
    this.setXattrs(host, e);
    fs.lutimesSync(host, e.atime, e.mtime);
  }

  private noteIgnored(name: string): void {
    if (this.ignoredXattrNames.size < IGNORED_NAMES_KEPT) this.ignoredXattrNames.add(name);
  }

  /** Whether this xattr is set here (see the header comment for the policy). */
  private wantXattr(x: Xattr, e: LayerEntry): boolean {
    if (x.name === 'security.capability' || x.name.startsWith('trusted.')) return this.opts.root;
    if (x.name.startsWith('user.')) return e.kind === 'file' || e.kind === 'directory';
    return false;
  }

  /** Set the entry's xattrs on `host`, which this entry just created (or the directory it merges into). */
  private setXattrs(host: string, e: LayerEntry): void {
    for (const x of e.xattrs) {
      if (!this.wantXattr(x, e)) {
        this.ignoredXattrs++;
        this.noteIgnored(x.name);
        continue;
      }
      try {
        lsetxattr(host, x.name, x.value);
        this.xattrs++;
        if (e.kind === 'directory') {
          const own = this.ownXattrs.get(host);
          if (own) own.add(x.name);
          else this.ownXattrs.set(host, new Set([x.name]));
        }
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code;
        if (code === 'ENOTSUP' || code === 'EOPNOTSUPP') {
          this.ignoredXattrs++;
          this.noteIgnored(x.name);
        } else if (code === 'EINVAL' || code === 'EPERM' || code === 'E2BIG' || code === 'ERANGE') {
          throw badEntry(this.ctx, e.name, `has extended attribute ${JSON.stringify(x.name.slice(0, 100))}, which the kernel refuses (${code})`);
        } else {
          throw err;
        }
      }
    }
  }

  private async createHardlink(host: string, e: LayerEntry): Promise<void> {
    const tcomps = cleanEntryPath(e.linkname);
    if (tcomps.length === 0) throw badEntry(this.ctx, e.name, 'is a hard link to the root directory');
    const tdir = await this.dirFor(tcomps.slice(0, -1), false, e);
    const target = tdir === null ? null : `${tdir}/${tcomps[tcomps.length - 1]!}`;
    const tst = target === null ? null : lstatOrNull(target);
    if (target === null || tst === null) {
      throw badEntry(this.ctx, e.name, `is a hard link to ${JSON.stringify(e.linkname.slice(0, 300))}, which does not exist in the layer or below`);
    }
    if (tst.isDirectory()) throw badEntry(this.ctx, e.name, `is a hard link to the directory ${JSON.stringify(e.linkname.slice(0, 300))}`);
    fs.linkSync(target, host);
    // A hard link names an inode that already exists: its owner, mode and times stay as the
    // target's. The link header's own metadata is ignored, as GNU tar and umoci do (containerd
    // applies it); real tar writers put the target's metadata there anyway, and this way a link
    // entry in an upper layer can never re-mode or re-own a lower layer's file.
  }

  private async whiteout(e: LayerEntry, base: string, parentComps: string[]): Promise<void> {
    if (base === OPAQUE_MARKER) {
      const dir = await this.dirFor(parentComps, false, e);
      if (dir === null) return;
      // Speculative: everything in the directory is this layer's; overlayfs hides the rest.
      if (this.speculative) lsetxattr(dir, OPAQUE_XATTR, Buffer.from('y'));
      else await this.opaque(dir, e);
      return;
    }
    const name = base.slice(WHITEOUT_PREFIX.length);
    if (name === '' || name === '.' || name === '..') throw badEntry(this.ctx, e.name, 'is a whiteout of an invalid name');
    const dir = await this.dirFor(parentComps, false, e);
    if (dir === null) return;
    const target = `${dir}/${name}`;
    if (this.speculative) {
      // Nothing of this layer is there (see alone()): hide whatever the layers below have, as overlayfs does.
      if (!this.ownWhiteouts.has(target)) {
        mknod(target, 'char', 0, 0, 0);
        this.ownWhiteouts.add(target);
      }
      return;
    }
    const st = lstatOrNull(target);
    if (st === null) return;
    if (!this.written.has(target)) {
      this.checkNotThrough(target, e);
      await this.remove(target, st.isDirectory(), st.isSymbolicLink());
    } else if (st.isDirectory()) {
      this.renew(target);
      await this.opaque(target, e);
    }
    // A non-directory this layer wrote itself stays: whiteouts act on lower layers only.
  }

  /**
   * Speculative mode: whether entry `e` can be applied without the layers below: its parent
   * directory is this layer's own, it does not land on one of its own whiteouts, a whiteout hides
   * nothing this layer wrote, an opaque marker is not for the root, a hard link's target is here.
   */
  private async alone(e: LayerEntry, base: string, parentComps: string[]): Promise<boolean> {
    const dir = await this.dirFor(parentComps, false, e);
    if (dir === null) return false;
    if (base === OPAQUE_MARKER) return dir !== this.root;
    if (base.startsWith(WHITEOUT_PREFIX)) {
      const target = `${dir}/${base.slice(WHITEOUT_PREFIX.length)}`;
      return this.ownWhiteouts.has(target) || !this.written.has(target);
    }
    if (this.ownWhiteouts.has(`${dir}/${base}`)) return false;
    if (e.kind !== 'link') return true;
    const tcomps = cleanEntryPath(e.linkname);
    if (tcomps.length === 0) return true; // refused by createHardlink
    const tdir = await this.dirFor(tcomps.slice(0, -1), false, e);
    if (tdir === null) return false;
    const target = `${tdir}/${tcomps[tcomps.length - 1]!}`;
    return !this.ownWhiteouts.has(target) && lstatOrNull(target) !== null;
  }

  /**
   * Speculative mode ends: wait for the parents, have what was written merged onto them and the
   * build overlay mounted (ApplierOptions.lower), and go on in that mount with every host path
   * this applier remembers moved there. A directory that now merges with a lower one is no longer
   * one this layer made (a later whiteout of it renews it, as in an ordinary build).
   */
  private async switchToLower(): Promise<void> {
    const sw = await this.opts.lower!(this.rootEntry);
    const from = this.root;
    const to = sw.root;
    const move = (p: string): string => (p === from ? to : `${to}${p.slice(from.length)}`);
    const moveSet = (set: Set<string>): void => {
      const all = [...set];
      set.clear();
      for (const p of all) set.add(move(p));
    };
    for (const p of sw.merged) this.made.delete(p);
    moveSet(this.written);
    moveSet(this.made);
    moveSet(this.explicit);
    const dirs = [...this.pendingDirs];
    this.pendingDirs.clear();
    for (const [k, v] of dirs) this.pendingDirs.set(move(k), v);
    const own = [...this.ownXattrs];
    this.ownXattrs.clear();
    for (const [k, v] of own) this.ownXattrs.set(move(k), v);
    this.fresh.clear();
    this.dirs.clear();
    this.ownWhiteouts.clear();
    this.through.clear();
    this.root = to;
    this.speculative = false;
    this.switched = true;
  }

  /** Remove every child of `dir` this layer did not write; keep only this layer's part of children it did. */
  private async opaque(dir: string, e: LayerEntry): Promise<void> {
    for (const d of fs.readdirSync(dir, { withFileTypes: true })) {
      const child = `${dir}/${d.name}`;
      if (!this.written.has(child)) {
        this.checkNotThrough(child, e);
        await this.remove(child, d.isDirectory(), d.isSymbolicLink());
      } else if (d.isDirectory()) {
        this.renew(child);
        await this.opaque(child, e);
      }
    }
  }

  /** `host` is lower content whiteout or opaque entry `e` is about to remove: refuse if this layer resolved an entry through it. */
  private checkNotThrough(host: string, e: LayerEntry): void {
    const hit = this.through.get(host);
    if (hit === undefined) return;
    const image = (p: string): string => JSON.stringify(`/${p.slice(this.root.length + 1)}`.slice(0, 300));
    const what = hit.link === host ? `the lower-layer symlink ${image(host)}` : `${image(host)}, which holds the lower-layer symlink ${image(hit.link)}`;
    throw badEntry(
      this.ctx,
      e.name,
      `would hide ${what}, through which this layer already resolved its entry ${JSON.stringify(hit.entry.slice(0, 300))}; ` +
        'whiteouts hide lower layers only, so the result would depend on entry order (write the whiteout before the entries beneath it)',
    );
  }

  /** Remember the lower-layer symlinks met resolving `comps` (to `resolved`) for entry `e`. */
  private noteSymlinks(comps: string[], resolved: string, e: LayerEntry): void {
    const walk = walkSymlinks(this.root, comps);
    if (walk.resolved !== resolved) {
      throw new GuestpullError(ErrorCode.INTERNAL, `two resolutions of ${JSON.stringify(e.name.slice(0, 300))} in layer ${this.ctx.layer} of ${this.ctx.image} disagree`);
    }
    for (const link of walk.links) {
      if (this.written.has(link)) continue;
      for (let p = link; p.length > this.root.length && !this.through.has(p); p = parentOf(p)) this.through.set(p, { link, entry: e.name });
    }
  }

  /**
   * `host` is a lower directory this layer wrote into and now hides: the whiteout applies first
   * (layer.md), so it must end as if this layer had made it. Lower xattrs go, those of its own
   * entry stay. Without a directory entry of its own it is an implied parent: 0755, root-owned,
   * made now (a directory entry already set owner and mode, and its mtime is set in finish()).
   */
  private renew(host: string): void {
    if (this.made.has(host)) return;
    this.made.add(host);
    this.dropLowerXattrs(host);
    if (this.explicit.has(host)) return;
    if (this.opts.root) fs.chownSync(host, 0, 0);
    fs.chmodSync(host, 0o755);
    const now = Date.now() / 1000;
    fs.utimesSync(host, now, now);
  }

  /** Remove the xattrs a lower layer set on `host` (see imageXattr), keeping this layer's own. */
  private dropLowerXattrs(host: string): void {
    // Without the addon no layer could have set any (setXattrs needs it too).
    if (!nativeAvailable()) return;
    let names: string[];
    try {
      names = llistxattr(host);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === 'ENOTSUP' || code === 'EOPNOTSUPP') return;
      throw err;
    }
    const own = this.ownXattrs.get(host);
    for (const name of names) {
      if (!imageXattr(name) || own?.has(name)) continue;
      try {
        lremovexattr(host, name);
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'ENODATA') throw err;
      }
    }
  }

  private async remove(host: string, isDir: boolean, isLink: boolean): Promise<void> {
    if (isDir) {
      if (this.written.has(host)) {
        const prefix = `${host}/`;
        for (const k of this.pendingDirs.keys()) if (k === host || k.startsWith(prefix)) this.pendingDirs.delete(k);
      }
      this.fresh.delete(host);
      await rm(host, { recursive: true, force: true });
    } else {
      fs.unlinkSync(host);
    }
    if (isDir || isLink) this.dirs.clear();
  }

  /** False when `host` (a child of `dir`) certainly does not exist; true when lstat must tell. */
  private exists(dir: string, host: string): boolean {
    return !this.fresh.has(dir) || this.written.has(host);
  }

  private markWritten(host: string): void {
    if (this.written.has(host)) return;
    this.written.add(host);
    for (let p = parentOf(host); p.length > this.root.length && !this.written.has(p); p = parentOf(p)) this.written.add(p);
  }

  private makeParentDir(host: string): void {
    fs.mkdirSync(host, 0o755);
    this.fresh.add(host);
    this.made.add(host);
    if (this.opts.root) fs.chownSync(host, 0, 0);
    fs.chmodSync(host, 0o755);
    this.markWritten(host);
  }

  /**
   * The real host directory an image directory path denotes, inside the root. With `create`,
   * missing directories are made (0755, root-owned) and a non-directory is BAD_IMAGE; without,
   * anything missing or not a directory gives null.
   */
  private async dirFor(comps: string[], create: boolean, e: LayerEntry): Promise<string | null> {
    if (comps.length === 0) return this.root;
    const key = comps.join('/');
    const hit = this.dirs.get(key);
    if (hit !== undefined) return hit;
    const parent = await this.dirFor(comps.slice(0, -1), create, e);
    if (parent === null) return null;
    const host = `${parent}/${comps[comps.length - 1]!}`;
    const st = this.exists(parent, host) ? lstatOrNull(host) : null;
    let dir: string | null;
    if (st === null) {
      if (!create) return null;
      this.makeParentDir(host);
      dir = host;
    } else if (st.isDirectory()) {
      dir = host;
    } else if (st.isSymbolicLink()) {
      const resolved = await resolveInRoot(this.root, comps, { followFinal: true });
      this.noteSymlinks(comps, resolved, e);
      dir = this.verifyChain(resolved, create, e, key);
    } else {
      if (!create) return null;
      throw badEntry(this.ctx, e.name, `needs /${key} to be a directory, but it is not one`);
    }
    if (dir !== null) this.dirs.set(key, dir);
    return dir;
  }

  /** Check with lstat that every component of `resolved` below the root is a real directory. */
  private verifyChain(resolved: string, create: boolean, e: LayerEntry, key: string): string | null {
    if (resolved === this.root) return resolved;
    if (!resolved.startsWith(`${this.root}/`)) {
      throw new GuestpullError(ErrorCode.INTERNAL, `path resolution left the rootfs for entry ${JSON.stringify(e.name.slice(0, 300))} of layer ${this.ctx.layer} of ${this.ctx.image}`);
    }
    let cur = this.root;
    for (const c of resolved.slice(this.root.length + 1).split('/')) {
      cur = `${cur}/${c}`;
      const st = lstatOrNull(cur);
      if (st === null) {
        if (!create) return null;
        this.makeParentDir(cur);
      } else if (!st.isDirectory()) {
        if (!create) return null;
        throw badEntry(this.ctx, e.name, `needs /${key} to be a directory, but it resolves to a non-directory`);
      }
    }
    return resolved;
  }
}
