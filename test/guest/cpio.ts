/**
 * Guest test: a small writer for the cpio "newc" format the kernel unpacks as initramfs
 * (Documentation/driver-api/early-userspace/buffer-format.rst). Written here rather than calling
 * cpio(1) so the archive can hold root-owned files and device nodes (/dev/console) without
 * privileges, and is byte-for-byte deterministic (inode numbers by order, mtime 0).
 */
import { createReadStream } from 'node:fs';
import { stat } from 'node:fs/promises';
import path from 'node:path';

export type CpioEntry =
  | { type: 'dir'; path: string; mode?: number }
  | { type: 'file'; path: string; mode?: number; source: string }
  | { type: 'file'; path: string; mode?: number; data: Buffer }
  | { type: 'symlink'; path: string; target: string }
  | { type: 'char'; path: string; mode?: number; major: number; minor: number };

const S_IFDIR = 0o040000;
const S_IFREG = 0o100000;
const S_IFLNK = 0o120000;
const S_IFCHR = 0o020000;
const MAX_FIELD = 0xffffffff;

function hex8(n: number): string {
  if (!Number.isInteger(n) || n < 0 || n > MAX_FIELD) throw new Error(`cpio: field value ${n} does not fit 8 hex digits`);
  return n.toString(16).padStart(8, '0');
}

const pad4 = (n: number): Buffer => Buffer.alloc((4 - (n % 4)) % 4);

interface Header { ino: number; mode: number; nlink: number; size: number; rdevMajor?: number; rdevMinor?: number; name: string }

function header(h: Header): Buffer {
  const name = Buffer.from(h.name + '\0', 'utf8');
  const fields = [h.ino, h.mode, 0, 0, h.nlink, 0, h.size, 0, 0, h.rdevMajor ?? 0, h.rdevMinor ?? 0, name.length, 0];
  const head = Buffer.from('070701' + fields.map(hex8).join(''), 'ascii');
  return Buffer.concat([head, name, pad4(head.length + name.length)]);
}

/** Archive paths are relative ('bin/sh'); the root itself is '.'. */
function archivePath(p: string): string {
  const clean = path.posix.normalize(p.replace(/^\/+/, ''));
  if (clean === '' || clean === '.' || clean.startsWith('..')) throw new Error(`cpio: bad archive path ${JSON.stringify(p)}`);
  return clean;
}

/**
 * The archive bytes for `entries`, in order, with missing parent directories (0755) inserted
 * before their first child and duplicate paths refused. All entries are owned by root.
 */
export async function* cpioArchive(entries: Iterable<CpioEntry>): AsyncGenerator<Buffer> {
  const seen = new Set<string>();
  let ino = 1;
  const dir = (p: string, mode = 0o755): Buffer => header({ ino: ino++, mode: S_IFDIR | mode, nlink: 2, size: 0, name: p });
  function* parents(p: string): Generator<Buffer> {
    const parts = p.split('/');
    for (let i = 1; i < parts.length; i++) {
      const d = parts.slice(0, i).join('/');
      if (!seen.has(d)) {
        seen.add(d);
        yield dir(d);
      }
    }
  }
  for (const e of entries) {
    const p = archivePath(e.path);
    if (seen.has(p)) throw new Error(`cpio: ${p} added twice`);
    yield* parents(p);
    seen.add(p);
    switch (e.type) {
      case 'dir':
        yield dir(p, e.mode ?? 0o755);
        break;
      case 'symlink': {
        const target = Buffer.from(e.target, 'utf8');
        yield header({ ino: ino++, mode: S_IFLNK | 0o777, nlink: 1, size: target.length, name: p });
        yield target;
        yield pad4(target.length);
        break;
      }
      case 'char':
        yield header({ ino: ino++, mode: S_IFCHR | (e.mode ?? 0o600), nlink: 1, size: 0, rdevMajor: e.major, rdevMinor: e.minor, name: p });
        break;
      case 'file': {
        const mode = S_IFREG | (e.mode ?? 0o644);
        if ('data' in e) {
          yield header({ ino: ino++, mode, nlink: 1, size: e.data.length, name: p });
          yield e.data;
          yield pad4(e.data.length);
          break;
        }
        const { size } = await stat(e.source);
        yield header({ ino: ino++, mode, nlink: 1, size, name: p });
        let copied = 0;
        for await (const chunk of createReadStream(e.source, { highWaterMark: 1 << 20 })) {
          const b = chunk as Buffer;
          copied += b.length;
          yield b;
        }
        if (copied !== size) throw new Error(`cpio: ${e.source} changed size while being archived (${size} → ${copied})`);
        yield pad4(size);
        break;
      }
    }
  }
  yield header({ ino: 0, mode: 0, nlink: 1, size: 0, name: 'TRAILER!!!' });
}
