/**
 * One tar header, as the tar reader (./tar.ts) decoded it, checked and turned into a typed entry: cleaned path
 * components, kind, owner, mode, times, device numbers, extended attributes. Everything here is
 * untrusted layer content; whatever this module does not accept becomes BAD_IMAGE naming the
 * entry, the layer and the image. Also: the layer bounds (LayerLimits) with the cdh.toml key that
 * raises each one.
 */
import { ErrorCode, GuestpullError } from '../../errors.js';
import { cleanEntryPath } from './rootpath.js';
import type { TarHeader } from './tar.js';

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
  /** Bytes of one PAX (`x`, `g`) or GNU long name/link (`L`, `K`) header's data. */
  maxPaxHeaderBytes: number;
}

/** The cdh.toml `[image]` key that sets each bound (src/config maps them onto these fields). */
export const LIMIT_KEYS: Readonly<Record<keyof LayerLimits, string>> = Object.freeze({
  maxEntries: 'max_layer_entries',
  maxPathLength: 'max_path_length',
  maxPathDepth: 'max_path_depth',
  maxUncompressedBytes: 'max_layer_bytes',
  maxRatio: 'max_layer_ratio',
  maxPaxHeaderBytes: 'max_pax_header_bytes',
});

/** "(maxEntries; raise [image] max_layer_entries in cdh.toml if the image is trusted)", for messages. */
export function limitHint(limit: keyof LayerLimits): string {
  return `(${limit}; if the image is legitimate, raise [image] ${LIMIT_KEYS[limit]} in cdh.toml)`;
}

export const DEFAULT_LAYER_LIMITS: LayerLimits = Object.freeze({
  maxEntries: 1_000_000,
  maxPathLength: 4096,
  maxPathDepth: 256,
  maxUncompressedBytes: 64 * 1024 ** 3,
  maxRatio: 1000,
  maxPaxHeaderBytes: 1024 * 1024,
});

/** Who we are talking about in messages. */
export interface LayerContext {
  image: string;
  layer: string;
}

export type EntryKind = 'file' | 'directory' | 'symlink' | 'link' | 'char' | 'block' | 'fifo';

/** One `SCHILY.xattr.<name>` PAX record, its value as raw bytes. */
export interface Xattr {
  name: string;
  value: Buffer;
}

/** Linux limits (XATTR_NAME_MAX, XATTR_SIZE_MAX) and device numbers (12-bit major, 20-bit minor). */
const XATTR_NAME_MAX = 255;
const XATTR_SIZE_MAX = 65536;
const MAX_MAJOR = 0xfff;
const MAX_MINOR = 0xfffff;

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
  /** Device numbers of a char or block device (0 otherwise). */
  devmajor: number;
  devminor: number;
  /** `SCHILY.xattr.*` records, in archive order (the applier decides which it sets). */
  xattrs: Xattr[];
  /** `LIBARCHIVE.xattr.*` records: ignored, as Go's archive/tar and containerd ignore them. */
  ignoredXattrs: number;
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

function parseId(ctx: LayerContext, h: TarHeader, pax: Record<string, string> | null, key: 'uid' | 'gid'): number {
  const text = pax?.[key] || undefined; // an empty record keeps the header's value (Go)
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
  if (text === undefined || text === '') return undefined;
  if (!/^-?[0-9]{1,19}(\.[0-9]{0,19})?$/.test(text)) throw badEntry(ctx, name, `has an invalid PAX ${key} ${JSON.stringify(text.slice(0, 40))}`);
  const v = Number(text);
  if (!Number.isFinite(v)) throw badEntry(ctx, name, `has an invalid PAX ${key}`);
  return v;
}

function byteLength(s: string): number {
  return Buffer.byteLength(s, 'utf8');
}

/**
 * The entry's `SCHILY.xattr.*` records with raw values. An image may not carry overlayfs metadata
 * (`trusted.overlay.*`, `user.overlay.*`): it would forge whiteouts or opaque directories in the
 * layer store, so it is refused.
 */
function parseXattrs(ctx: LayerContext, h: TarHeader, pax: Record<string, string> | null): Xattr[] {
  if (!pax) return [];
  const raw = h.paxRaw;
  const out: Xattr[] = [];
  for (const key of Object.keys(pax)) {
    if (!key.startsWith('SCHILY.xattr.')) continue;
    const name = key.slice('SCHILY.xattr.'.length);
    const value = raw?.get(key);
    if (value === undefined) throw badEntry(ctx, h.name, `has an extended attribute record ${JSON.stringify(key.slice(0, 100))} outside its own PAX header`);
    if (name.length === 0 || name.includes('\0') || Buffer.byteLength(name) > XATTR_NAME_MAX) {
      throw badEntry(ctx, h.name, `has an invalid extended attribute name ${JSON.stringify(name.slice(0, 100))}`);
    }
    if (name.startsWith('trusted.overlay.') || name.startsWith('user.overlay.')) {
      throw badEntry(ctx, h.name, `carries the overlayfs attribute ${JSON.stringify(name.slice(0, 100))}: an image may not forge overlay whiteouts or opaque directories`);
    }
    if (value.length > XATTR_SIZE_MAX) {
      throw badEntry(ctx, h.name, `has extended attribute ${JSON.stringify(name.slice(0, 100))} of ${value.length} bytes, more than Linux allows (${XATTR_SIZE_MAX})`);
    }
    out.push({ name, value });
  }
  return out;
}

function parseDevice(ctx: LayerContext, h: TarHeader, kind: EntryKind): { devmajor: number; devminor: number } {
  if (kind !== 'char' && kind !== 'block') return { devmajor: 0, devminor: 0 };
  const devmajor = h.devmajor ?? 0;
  const devminor = h.devminor ?? 0;
  if (!Number.isInteger(devmajor) || devmajor < 0 || devmajor > MAX_MAJOR || !Number.isInteger(devminor) || devminor < 0 || devminor > MAX_MINOR) {
    throw badEntry(ctx, h.name, `has invalid device numbers ${String(devmajor)}:${String(devminor)}`);
  }
  if (kind === 'char' && devmajor === 0 && devminor === 0) {
    throw badEntry(ctx, h.name, 'is a character device 0:0, which is an overlayfs whiteout in disguise; images delete files with .wh. entries');
  }
  return { devmajor, devminor };
}

/**
 * Check one header and type it. Sparse files, contiguous files and unknown types are refused
 * here, before anything touches the rootfs; so are char devices 0:0 and overlayfs xattrs.
 */
export function parseEntry(ctx: LayerContext, h: TarHeader, limits: LayerLimits): LayerEntry {
  const name = h.name;
  if (typeof name !== 'string' || name.length === 0) throw badEntry(ctx, String(name), 'has an empty name');
  if (name.includes('\0')) throw badEntry(ctx, name, 'has a NUL byte in its name');
  if (byteLength(name) > limits.maxPathLength) {
    throw badEntry(ctx, name, `has a name longer than ${limits.maxPathLength} bytes ${limitHint('maxPathLength')}`);
  }
  const components = cleanEntryPath(name);
  if (components.length > limits.maxPathDepth) {
    throw badEntry(ctx, name, `is nested deeper than ${limits.maxPathDepth} components ${limitHint('maxPathDepth')}`);
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
      kind = 'char';
      break;
    case 'block-device':
      kind = 'block';
      break;
    case 'fifo':
      kind = 'fifo';
      break;
    default:
      throw badEntry(ctx, name, `has an unsupported tar entry type ${JSON.stringify(String(h.type))}`);
  }

  const pax = h.pax;
  let ignoredXattrs = 0;
  if (pax) {
    for (const key of Object.keys(pax)) {
      if (key.startsWith('GNU.sparse.')) throw badEntry(ctx, name, 'is a sparse file: sparse files are not supported');
      if (key.startsWith('LIBARCHIVE.xattr.')) ignoredXattrs++;
    }
  }
  const xattrs = parseXattrs(ctx, h, pax);
  const { devmajor, devminor } = parseDevice(ctx, h, kind);

  const linkname = h.linkname ?? '';
  if (kind === 'symlink' || kind === 'link') {
    if (linkname.length === 0) throw badEntry(ctx, name, `is a ${kind} with an empty target`);
    if (linkname.includes('\0')) throw badEntry(ctx, name, 'has a NUL byte in its link target');
    if (byteLength(linkname) > limits.maxPathLength) {
      throw badEntry(ctx, name, `has a link target longer than ${limits.maxPathLength} bytes ${limitHint('maxPathLength')}`);
    }
  }

  const size = h.size;
  if (!Number.isSafeInteger(size) || size < 0) throw badEntry(ctx, name, `has an invalid size ${String(size)}`);
  if (kind !== 'file' && size !== 0) throw badEntry(ctx, name, `is a ${kind} with a non-zero size ${size}`);

  const mtime = parseTime(ctx, name, pax?.['mtime'], 'mtime') ?? h.mtime;
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
    devmajor,
    devminor,
    xattrs,
    ignoredXattrs,
  };
}
