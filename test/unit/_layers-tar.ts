/**
 * Test helper for the layer tests: builds tar archives (tar-stream pack, or raw header blocks for
 * what pack cannot write: GNU long names, global headers, hostile framing), applies them with
 * applyLayer, and snapshots host directories to prove they were left alone.
 */
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { Readable } from 'node:stream';
import zlib from 'node:zlib';
import tar from 'tar-stream';
import { silentLogger, type Logger } from '../../src/log.js';
import { MediaType } from '../../src/oci.js';
import { applyLayer, type ApplyLayerResult, type LayerLimits } from '../../src/pull/layers/index.js';

export const MTIME = new Date('2024-01-02T03:04:05Z');

export interface PackEntry {
  name: string;
  type?: tar.Header['type'];
  content?: string | Buffer;
  mode?: number;
  uid?: number;
  gid?: number;
  mtime?: Date;
  linkname?: string;
  pax?: Record<string, string>;
  devmajor?: number;
  devminor?: number;
}

/** A tar built with tar-stream's pack (PAX for long names). */
export async function packTar(entries: PackEntry[]): Promise<Buffer> {
  const p = tar.pack();
  const out: Buffer[] = [];
  const collect = (async () => {
    for await (const c of p) out.push(c as Buffer);
  })();
  for (const e of entries) {
    const header: Partial<tar.Header> & { name: string } = {
      name: e.name,
      type: e.type ?? 'file',
      mode: e.mode ?? (e.type === 'directory' ? 0o755 : 0o644),
      uid: e.uid ?? 0,
      gid: e.gid ?? 0,
      mtime: e.mtime ?? MTIME,
    };
    if (e.linkname !== undefined) header.linkname = e.linkname;
    if (e.pax) header.pax = e.pax;
    if (e.devmajor !== undefined) header.devmajor = e.devmajor;
    if (e.devminor !== undefined) header.devminor = e.devminor;
    await new Promise<void>((resolve, reject) => {
      const cb = (err?: Error | null): void => (err ? reject(err) : resolve());
      if (e.content !== undefined) p.entry(header, e.content, cb);
      else p.entry(header, cb).end(undefined);
    });
  }
  p.finalize();
  await collect;
  return Buffer.concat(out);
}

function octal(b: Buffer, off: number, len: number, v: number): void {
  b.write(v.toString(8).padStart(len - 1, '0') + '\0', off, len, 'latin1');
}

export interface RawHeader {
  name: string;
  /** one character typeflag, e.g. '0', '5', 'L', 'g' */
  flag: string;
  size?: number;
  mode?: number;
  uid?: number;
  gid?: number;
  linkname?: string;
  format?: 'ustar' | 'gnu';
}

/** One 512-byte header block with a valid checksum. */
export function rawHeader(h: RawHeader): Buffer {
  const b = Buffer.alloc(512);
  b.write(h.name.slice(0, 100), 0, 100, 'utf8');
  octal(b, 100, 8, h.mode ?? 0o644);
  octal(b, 108, 8, h.uid ?? 0);
  octal(b, 116, 8, h.gid ?? 0);
  octal(b, 124, 12, h.size ?? 0);
  octal(b, 136, 12, Math.floor(MTIME.getTime() / 1000));
  b[156] = h.flag.charCodeAt(0);
  if (h.linkname) b.write(h.linkname.slice(0, 100), 157, 100, 'utf8');
  if (h.format === 'gnu') b.write('ustar  \0', 257, 8, 'latin1');
  else b.write('ustar\u000000', 257, 8, 'latin1');
  b.fill(0x20, 148, 156);
  let sum = 0;
  for (const x of b) sum += x;
  b.write(sum.toString(8).padStart(6, '0') + '\0 ', 148, 8, 'latin1');
  return b;
}

/** Data padded to whole blocks. */
export function dataBlocks(data: Buffer | string): Buffer {
  const d = typeof data === 'string' ? Buffer.from(data) : data;
  return Buffer.concat([d, Buffer.alloc((512 - (d.length % 512)) % 512)]);
}

/** A whole archive from raw parts, with the two zero blocks at the end. */
export function rawTar(parts: Buffer[]): Buffer {
  return Buffer.concat([...parts, Buffer.alloc(1024)]);
}

/** PAX records text for a `x` or `g` header. */
export function paxData(records: Record<string, string>): Buffer {
  let s = '';
  for (const [k, v] of Object.entries(records)) {
    const body = ` ${k}=${v}\n`;
    let len = Buffer.byteLength(body) + 1;
    while (String(len).length + Buffer.byteLength(body) !== len) len = String(len).length + Buffer.byteLength(body);
    s += `${len}${body}`;
  }
  return Buffer.from(s);
}

export function sha256(b: Buffer): string {
  return `sha256:${createHash('sha256').update(b).digest('hex')}`;
}

export interface ApplyOpts {
  gzip?: boolean;
  diffId?: string;
  limits?: Partial<LayerLimits>;
  mediaType?: string;
  signal?: AbortSignal;
  source?: Readable;
  /** the compressed blob, when the test wants to hand-craft it */
  blob?: Buffer;
  logger?: Logger;
}

export const LAYER_DIGEST = `sha256:${'ab'.repeat(32)}`;

export async function applyTar(rootfs: string, tarBytes: Buffer, o: ApplyOpts = {}): Promise<ApplyLayerResult> {
  const gz = o.gzip ?? true;
  const blob = o.blob ?? (gz ? zlib.gzipSync(tarBytes) : tarBytes);
  return applyLayer({
    source: o.source ?? Readable.from([blob], { objectMode: false }),
    mediaType: o.mediaType ?? (gz ? MediaType.OCI_LAYER_GZIP : MediaType.OCI_LAYER),
    compressedSize: blob.length,
    diffId: o.diffId ?? sha256(tarBytes),
    layerDigest: LAYER_DIGEST,
    rootfs,
    image: 'registry.test/layers:unit',
    logger: o.logger ?? silentLogger(),
    ...(o.signal ? { signal: o.signal } : {}),
    ...(o.limits ? { limits: o.limits } : {}),
  });
}

/** Every path under `dir` (not following symlinks) with type, mode, owner, size, content hash, mtime and inode. */
export function snapshot(dir: string): string[] {
  const out: string[] = [];
  const walk = (d: string): void => {
    for (const name of fs.readdirSync(d).sort()) {
      const p = path.join(d, name);
      const st = fs.lstatSync(p);
      const rel = path.relative(dir, p);
      let extra = '';
      if (st.isFile()) extra = createHash('sha256').update(fs.readFileSync(p)).digest('hex');
      if (st.isSymbolicLink()) extra = `-> ${fs.readlinkSync(p)}`;
      out.push(`${rel} ${st.mode.toString(8)} ${st.uid}:${st.gid} ${st.size} ${st.mtimeMs} ${st.ino} ${extra}`);
      if (st.isDirectory()) walk(p);
    }
  };
  walk(dir);
  return out;
}

/** Sorted relative paths of everything under `root` (symlinks not followed). */
export function listTree(root: string): string[] {
  const out: string[] = [];
  const walk = (d: string): void => {
    for (const n of fs.readdirSync(d)) {
      const p = path.join(d, n);
      out.push(path.relative(root, p));
      if (fs.lstatSync(p).isDirectory()) walk(p);
    }
  };
  walk(root);
  return out.sort();
}
