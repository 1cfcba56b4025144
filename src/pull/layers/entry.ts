/**
 * One tar header, as tar-stream decoded it, checked and turned into a typed entry: cleaned path
 * components, kind, owner, mode, times. Everything here is untrusted layer content; whatever this
 * module does not accept becomes BAD_IMAGE naming the entry, the layer and the image.
 */
import type { Header } from 'tar-stream';
import { ErrorCode, GuestpullError } from '../../errors.js';
import { cleanEntryPath } from './rootpath.js';

export interface LayerLimits {
  /** Entries in one layer (every tar header that reaches the applier, whiteouts included). */
  maxEntries: number;
  /** Bytes in an entry name or link name. */
  maxPathLength: number;
  /** Components in an entry name. */
  maxPathDepth: number;
  /** Uncompressed bytes of one layer (hard bound). */
  maxUncompressedBytes: number;
  /** uncompressed / compressed, checked once more than 1 MiB has been inflated. */
  maxRatio: number;
}

export const DEFAULT_LAYER_LIMITS: LayerLimits = Object.freeze({
  maxEntries: 1_000_000,
  maxPathLength: 4096,
  maxPathDepth: 256,
  maxUncompressedBytes: 64 * 1024 ** 3,
  maxRatio: 1000,
});

/** Who we are talking about in messages. */
export interface LayerContext {
  image: string;
  layer: string;
}

export type EntryKind = 'file' | 'directory' | 'symlink' | 'link';

export interface LayerEntry {
  /** The name as it stood in the archive (for messages). */
  name: string;
  /** Cleaned components; empty for the root itself. */
  components: string[];
  kind: EntryKind;
  size: number;
  /** Symlink target (verbatim) or hardlink target (archive name). */
  linkname: string;
  /** 12 permission bits. */
  mode: number;
  uid: number;
  gid: number;
  /** Seconds since the epoch, fractional from PAX. */
  atime: number;
  mtime: number;
  /** PAX xattr records (`SCHILY.xattr.*`, `LIBARCHIVE.xattr.*`) carried by the entry; not applied yet: Node has no xattr API. */
  xattrs: number;
}

/** The largest id chown(2) takes; (uid_t)-1 means "leave unchanged". */
const MAX_ID = 0xfffffffe;

export function badEntry(ctx: LayerContext, name: string, what: string): GuestpullError {
  return new GuestpullError(
    ErrorCode.BAD_IMAGE,
    `layer ${ctx.layer} of ${ctx.image}: entry ${JSON.stringify(name.slice(0, 300))} ${what}; the image cannot be unpacked safely, rebuild or choose another image`,
    { image: ctx.image, layer: ctx.layer },
  );
}

/** PAX records as a plain string map (tar-stream types them as unknown). */
export function paxRecords(h: Header): Record<string, string> | null {
  const pax: unknown = h.pax;
  if (pax === null || pax === undefined || typeof pax !== 'object') return null;
  const out: Record<string, string> = {};
  for (const [k, v] of Object.entries(pax)) if (typeof v === 'string') out[k] = v;
  return out;
}

function parseId(ctx: LayerContext, h: Header, pax: Record<string, string> | null, key: 'uid' | 'gid'): number {
  const text = pax?.[key];
  let v: number;
  if (text !== undefined) {
    if (!/^[0-9]{1,10}$/.test(text)) throw badEntry(ctx, h.name, `has an invalid PAX ${key} ${JSON.stringify(text.slice(0, 40))}`);
    v = Number(text);
  } else {
    v = h[key];
  }
  if (!Number.isInteger(v) || v < 0 || v > MAX_ID) throw badEntry(ctx, h.name, `has an invalid ${key} ${String(v)}`);
  return v;
}

function parseTime(ctx: LayerContext, name: string, text: string | undefined, key: string): number | undefined {
  if (text === undefined) return undefined;
  if (!/^-?[0-9]{1,19}(\.[0-9]{0,19})?$/.test(text)) throw badEntry(ctx, name, `has an invalid PAX ${key} ${JSON.stringify(text.slice(0, 40))}`);
  const v = Number(text);
  if (!Number.isFinite(v)) throw badEntry(ctx, name, `has an invalid PAX ${key}`);
  return v;
}

function byteLength(s: string): number {
  return Buffer.byteLength(s, 'utf8');
}

/**
 * Check one header and type it. Device nodes, FIFOs, sparse and unknown types are refused here,
 * before anything touches the rootfs.
 */
export function parseEntry(ctx: LayerContext, h: Header, limits: LayerLimits): LayerEntry {
  const name = h.name;
  if (typeof name !== 'string' || name.length === 0) throw badEntry(ctx, String(name), 'has an empty name');
  if (name.includes('\0')) throw badEntry(ctx, name, 'has a NUL byte in its name');
  if (byteLength(name) > limits.maxPathLength) {
    throw badEntry(ctx, name, `has a name longer than ${limits.maxPathLength} bytes (maxPathLength)`);
  }
  const components = cleanEntryPath(name);
  if (components.length > limits.maxPathDepth) {
    throw badEntry(ctx, name, `is nested deeper than ${limits.maxPathDepth} components (maxPathDepth)`);
  }

  let kind: EntryKind;
  switch (h.type) {
    case 'file':
      kind = 'file';
      break;
    case 'directory':
      kind = 'directory';
      break;
    case 'symlink':
      kind = 'symlink';
      break;
    case 'link':
      kind = 'link';
      break;
    case 'character-device':
    case 'block-device':
    case 'fifo':
      throw badEntry(ctx, name, `is a ${h.type}: device nodes are not supported yet`);
    default:
      throw badEntry(ctx, name, `has an unsupported tar entry type ${JSON.stringify(String(h.type))}`);
  }

  const pax = paxRecords(h);
  let xattrs = 0;
  if (pax) {
    for (const key of Object.keys(pax)) {
      if (key.startsWith('GNU.sparse.')) throw badEntry(ctx, name, 'is a sparse file: sparse files are not supported');
      if (key.startsWith('SCHILY.xattr.') || key.startsWith('LIBARCHIVE.xattr.')) xattrs++;
    }
  }

  const linkname = h.linkname ?? '';
  if (kind === 'symlink' || kind === 'link') {
    if (linkname.length === 0) throw badEntry(ctx, name, `is a ${kind} with an empty target`);
    if (linkname.includes('\0')) throw badEntry(ctx, name, 'has a NUL byte in its link target');
    if (byteLength(linkname) > limits.maxPathLength) {
      throw badEntry(ctx, name, `has a link target longer than ${limits.maxPathLength} bytes (maxPathLength)`);
    }
  }

  const size = h.size;
  if (!Number.isSafeInteger(size) || size < 0) throw badEntry(ctx, name, `has an invalid size ${String(size)}`);
  if (kind !== 'file' && size !== 0) throw badEntry(ctx, name, `is a ${kind} with a non-zero size ${size}`);

  const headerMtime = h.mtime instanceof Date ? h.mtime.getTime() / 1000 : Number.NaN;
  const mtime = parseTime(ctx, name, pax?.mtime, 'mtime') ?? headerMtime;
  if (!Number.isFinite(mtime)) throw badEntry(ctx, name, 'has an invalid mtime');
  const paxAtime = parseTime(ctx, name, pax?.atime, 'atime');
  // As containerd does: the access time is the later of atime and mtime.
  const atime = paxAtime !== undefined && paxAtime > mtime ? paxAtime : mtime;

  const mode = h.mode;
  if (!Number.isInteger(mode) || mode < 0) throw badEntry(ctx, name, `has an invalid mode ${String(mode)}`);

  return {
    name,
    components,
    kind,
    size,
    linkname,
    mode: mode & 0o7777,
    uid: parseId(ctx, h, pax, 'uid'),
    gid: parseId(ctx, h, pax, 'gid'),
    atime,
    mtime,
    xattrs,
  };
}
