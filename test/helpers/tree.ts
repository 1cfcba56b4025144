/**
 * Test helper: snapshot an unpacked rootfs (never following symlinks), diff two snapshots in
 * human-readable lines, and compute the tree that applying layer specs must give (image-spec
 * layer rules: whiteouts and opaque markers act on lower layers only, a non-directory over an
 * existing path replaces it, directories over directories keep their contents).
 */
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { lstat, readdir, readlink } from 'node:fs/promises';
import path from 'node:path';
import { pipeline } from 'node:stream/promises';
import { toTarEntry, type EntrySpec } from './image-builder.js';

export interface TreeEntry {
  path: string;
  type: 'file' | 'dir' | 'symlink' | 'other';
  /** permission bits, 12 bits */
  mode: number;
  uid: number;
  gid: number;
  /** file size; 0 for everything but files */
  size: number;
  /** hex sha256 of a file's content */
  sha256?: string;
  target?: string;
  /** paths sharing an inode (2 or more in this tree) share a group, numbered by first appearance in path order */
  linkGroup?: number;
  mtimeMs?: number;
  /** for type 'other' */
  kind?: 'char' | 'block' | 'fifo' | 'socket';
  /** device number of a char/block device (`rdev` of lstat) */
  rdev?: number;
}

/** Path order: '.' first, then component by component, so a directory's contents follow it. */
export function comparePaths(a: string, b: string): number {
  if (a === b) return 0;
  if (a === '.') return -1;
  if (b === '.') return 1;
  const pa = a.split('/');
  const pb = b.split('/');
  for (let i = 0; i < Math.min(pa.length, pb.length); i++) {
    if (pa[i] !== pb[i]) return pa[i]! < pb[i]! ? -1 : 1;
  }
  return pa.length - pb.length;
}

/** Numbers the inode keys shared by 2+ entries, in path order, and sets linkGroup. */
function assignLinkGroups(entries: TreeEntry[], keyOf: (e: TreeEntry, i: number) => string | undefined): void {
  const keys = entries.map(keyOf);
  const counts = new Map<string, number>();
  for (const k of keys) if (k !== undefined) counts.set(k, (counts.get(k) ?? 0) + 1);
  const ids = new Map<string, number>();
  entries.forEach((e, i) => {
    const k = keys[i];
    if (k === undefined || (counts.get(k) ?? 0) < 2) return;
    if (!ids.has(k)) ids.set(k, ids.size + 1);
    e.linkGroup = ids.get(k)!;
  });
}

async function hashFile(file: string): Promise<string> {
  const h = createHash('sha256');
  await pipeline(createReadStream(file), h);
  return h.digest('hex');
}

export async function snapshotTree(root: string, opts: { mtimes?: boolean } = {}): Promise<TreeEntry[]> {
  const out: TreeEntry[] = [];
  const inodes: (string | undefined)[] = [];
  async function visit(rel: string): Promise<void> {
    const abs = rel === '.' ? root : path.join(root, rel);
    const st = await lstat(abs);
    const e: TreeEntry = { path: rel, type: 'other', mode: st.mode & 0o7777, uid: st.uid, gid: st.gid, size: 0 };
    if (opts.mtimes) e.mtimeMs = Math.floor(st.mtimeMs);
    let inode: string | undefined;
    if (st.isFile()) {
      e.type = 'file';
      e.size = st.size;
      e.sha256 = await hashFile(abs);
    } else if (st.isDirectory()) {
      e.type = 'dir';
    } else if (st.isSymbolicLink()) {
      e.type = 'symlink';
      e.target = await readlink(abs);
    } else {
      e.kind = st.isCharacterDevice() ? 'char' : st.isBlockDevice() ? 'block' : st.isFIFO() ? 'fifo' : 'socket';
      if (e.kind === 'char' || e.kind === 'block') e.rdev = st.rdev;
    }
    if (!st.isDirectory() && st.nlink > 1) inode = `${st.dev}:${st.ino}`;
    out.push(e);
    inodes.push(inode);
    if (st.isDirectory()) {
      for (const name of await readdir(abs)) await visit(rel === '.' ? name : `${rel}/${name}`);
    }
  }
  await visit('.');
  const order = out.map((_, i) => i).sort((x, y) => comparePaths(out[x]!.path, out[y]!.path));
  const sorted = order.map((i) => out[i]!);
  const sortedInodes = order.map((i) => inodes[i]);
  assignLinkGroups(sorted, (_, i) => sortedInodes[i]);
  return sorted;
}

function linkPeers(entries: TreeEntry[]): Map<string, string> {
  const groups = new Map<number, string[]>();
  for (const e of entries) if (e.linkGroup !== undefined) groups.set(e.linkGroup, [...(groups.get(e.linkGroup) ?? []), e.path]);
  const peers = new Map<string, string>();
  for (const members of groups.values()) for (const m of members) peers.set(m, members.filter((x) => x !== m).join(', '));
  return peers;
}

const oct = (n: number): string => '0' + n.toString(8).padStart(3, '0');

/** Differences from `a` (expected) to `b` (actual), one line each; empty when the trees agree. */
export function diffTrees(a: TreeEntry[], b: TreeEntry[], opts: { ignore?: (path: string) => boolean } = {}): string[] {
  const keep = (e: TreeEntry): boolean => !(opts.ignore?.(e.path) ?? false);
  const ma = new Map(a.filter(keep).map((e) => [e.path, e]));
  const mb = new Map(b.filter(keep).map((e) => [e.path, e]));
  const pa = linkPeers([...ma.values()]);
  const pb = linkPeers([...mb.values()]);
  const paths = [...new Set([...ma.keys(), ...mb.keys()])].sort(comparePaths);
  const diffs: string[] = [];
  for (const p of paths) {
    const x = ma.get(p);
    const y = mb.get(p);
    if (!y) { diffs.push(`${p}: missing (expected ${x!.type})`); continue; }
    if (!x) { diffs.push(`${p}: unexpected ${y.type}`); continue; }
    if (x.type !== y.type) { diffs.push(`${p}: type ${x.type} != ${y.type}`); continue; }
    const d: string[] = [];
    if (x.mode !== y.mode) d.push(`mode ${oct(x.mode)} != ${oct(y.mode)}`);
    if (x.uid !== y.uid || x.gid !== y.gid) d.push(`owner ${x.uid}:${x.gid} != ${y.uid}:${y.gid}`);
    if (x.type === 'file' && x.size !== y.size) d.push(`size ${x.size} != ${y.size}`);
    if (x.sha256 !== undefined && y.sha256 !== undefined && x.sha256 !== y.sha256) d.push('content differs');
    if (x.target !== y.target) d.push(`target ${JSON.stringify(x.target)} != ${JSON.stringify(y.target)}`);
    if (x.kind !== y.kind || x.rdev !== y.rdev) d.push(`device ${x.kind}:${x.rdev} != ${y.kind}:${y.rdev}`);
    if ((pa.get(p) ?? '') !== (pb.get(p) ?? '')) d.push(`hardlinked with [${pa.get(p) ?? ''}] != [${pb.get(p) ?? ''}]`);
    if (x.mtimeMs !== undefined && y.mtimeMs !== undefined && x.mtimeMs !== y.mtimeMs) d.push(`mtime ${new Date(x.mtimeMs).toISOString()} != ${new Date(y.mtimeMs).toISOString()}`);
    if (d.length) diffs.push(`${p}: ${d.join('; ')}`);
  }
  return diffs;
}

interface Inode { type: TreeEntry['type']; mode: number; uid: number; gid: number; content?: Buffer; target?: string }

function cleanPath(p: string): string {
  const parts: string[] = [];
  for (const s of p.split('/')) {
    if (s === '' || s === '.') continue;
    if (s === '..') parts.pop();
    else parts.push(s);
  }
  return parts.length ? parts.join('/') : '.';
}

/** The tree that applying these layers (bottom first) in order must give. Throws on specs a correct unpacker must refuse. */
export function expectedTreeFromLayers(layers: EntrySpec[][]): TreeEntry[] {
  const tree = new Map<string, Inode>([['.', { type: 'dir', mode: 0o755, uid: 0, gid: 0 }]]);
  const removeTree = (p: string): void => {
    for (const k of [...tree.keys()]) if (k === p || (p === '.' ? k !== '.' : k.startsWith(p + '/'))) tree.delete(k);
    if (p === '.') tree.set('.', { type: 'dir', mode: 0o755, uid: 0, gid: 0 });
  };
  const ensureParents = (p: string): void => {
    const parts = p.split('/');
    for (let i = 1; i < parts.length; i++) {
      const dir = parts.slice(0, i).join('/');
      const existing = tree.get(dir);
      if (!existing) tree.set(dir, { type: 'dir', mode: 0o755, uid: 0, gid: 0 });
      else if (existing.type !== 'dir') throw new Error(`expectedTreeFromLayers: ${p} needs ${dir} to be a directory, it is a ${existing.type}`);
    }
  };
  const put = (p: string, node: Inode): void => {
    if (p !== '.') ensureParents(p);
    const existing = tree.get(p);
    if (existing && existing.type === 'dir' && node.type === 'dir') {
      tree.set(p, { ...existing, mode: node.mode, uid: node.uid, gid: node.gid });
      return;
    }
    if (p === '.') throw new Error('expectedTreeFromLayers: the root can only be a directory');
    if (existing) removeTree(p);
    tree.set(p, node);
  };
  for (const layer of layers) {
    const entries = layer.map(toTarEntry).map((e) => ({ ...e, path: cleanPath(e.header.name) }));
    const base = (p: string): string => p.slice(p.lastIndexOf('/') + 1);
    const dirOf = (p: string): string => (p.includes('/') ? p.slice(0, p.lastIndexOf('/')) : '.');
    // Pass 1: whiteouts and opaque markers remove lower-layer content only.
    for (const e of entries) {
      const name = base(e.path);
      if (name === '.wh..wh..opq') {
        const dir = dirOf(e.path);
        for (const k of [...tree.keys()]) if (k !== dir && (dir === '.' ? k !== '.' : k.startsWith(dir + '/'))) tree.delete(k);
      } else if (name.startsWith('.wh.')) {
        const dir = dirOf(e.path);
        removeTree(dir === '.' ? name.slice(4) : `${dir}/${name.slice(4)}`);
      }
    }
    // Pass 2: the layer's own entries, in order.
    for (const e of entries) {
      const h = e.header;
      const name = base(e.path);
      if (name === '.wh..wh..opq') {
        const dir = dirOf(e.path);
        if (!tree.has(dir)) put(dir, { type: 'dir', mode: 0o755, uid: 0, gid: 0 });
        continue;
      }
      if (name.startsWith('.wh.')) continue;
      const meta = { mode: (h.mode ?? 0) & 0o7777, uid: h.uid ?? 0, gid: h.gid ?? 0 };
      switch (h.type) {
        case 'directory':
          put(e.path, { type: 'dir', ...meta });
          break;
        case 'symlink':
          put(e.path, { type: 'symlink', ...meta, mode: 0o777, target: h.linkname ?? '' });
          break;
        case 'link': {
          const target = tree.get(cleanPath(h.linkname ?? ''));
          if (!target || target.type === 'dir') throw new Error(`expectedTreeFromLayers: hardlink ${e.path} -> ${h.linkname}: no such non-directory`);
          if (cleanPath(h.linkname ?? '') !== e.path) put(e.path, target);
          break;
        }
        case 'file':
        case 'contiguous-file':
        case undefined:
        case null:
          put(e.path, { type: 'file', ...meta, content: e.content ?? Buffer.alloc(0) });
          break;
        default:
          put(e.path, { type: 'other', ...meta });
      }
    }
  }
  const paths = [...tree.keys()].sort(comparePaths);
  const nodes = paths.map((p) => tree.get(p)!);
  const ids = new Map<Inode, number>();
  const result = paths.map((p, i): TreeEntry => {
    const n = nodes[i]!;
    if (!ids.has(n)) ids.set(n, ids.size);
    const e: TreeEntry = { path: p, type: n.type, mode: n.mode, uid: n.uid, gid: n.gid, size: n.content?.length ?? 0 };
    if (n.content) e.sha256 = createHash('sha256').update(n.content).digest('hex');
    if (n.target !== undefined) e.target = n.target;
    return e;
  });
  assignLinkGroups(result, (e, i) => (e.type === 'dir' ? undefined : String(ids.get(nodes[i]!))));
  return result;
}
