/**
 * The store's small JSON records (a published layer, an overlay bundle), their schemas, and the
 * one way they are written: a temp file in the same directory, fsync'ed, renamed into place. A
 * record that does not parse or does not match its file name is treated as absent, never trusted.
 */
import { readFile } from 'node:fs/promises';
import { z } from 'zod';
import { Digest } from '../../oci.js';
import { ATOMIC_TEMP_MARK, writeFileAtomic } from '../../fsutil.js';

export const RECORD_VERSION = 1;
/** Records are a few hundred bytes; anything bigger is not ours. */
const MAX_RECORD_BYTES = 256 * 1024;
/** Names of temp files made by writeJsonAtomic: `<name>.tmp-<hex>`. */
export const TEMP_MARK = ATOMIC_TEMP_MARK;

const Hex64 = z.string().regex(/^[0-9a-f]{64}$/);

/** What ./fsck.ts summarizeTree computes over a layer's `diff/` tree. */
export const TreeSummary = z.object({
  /** Entries walked, the root included. */
  entries: z.number().int().nonnegative(),
  /** Sum of the sizes of regular files (per path: hard links count once per name). */
  bytes: z.number().int().nonnegative(),
  /** sha256 hex over one line of metadata per entry (path, type, mode, owner, size, link target or device, xattrs). */
  digest: Hex64,
  /** The same with each regular file's content sha256 in its line; only where it was computed. */
  contentDigest: Hex64.optional(),
});
export type TreeSummary = z.infer<typeof TreeSummary>;

export const LayerRecord = z.object({
  version: z.literal(RECORD_VERSION),
  /** sha256:<hex> of the whole chain up to this layer (or the diff ID of a base layer). */
  chainId: Digest,
  /** The directory name under layers/. */
  hex: Hex64,
  diffId: Digest,
  /** The parent's directory name, null for a base layer. */
  parent: Hex64.nullable(),
  /** The compressed blob it was made from (any blob with the same diff ID gives the same layer). */
  layerDigest: Digest,
  mediaType: z.string(),
  compressedBytes: z.number().int().nonnegative(),
  uncompressedBytes: z.number().int().nonnegative(),
  entries: z.number().int().nonnegative(),
  created: z.string(),
  /**
   * A summary of the unpacked tree as published (./fsck.ts summarizeTree), checked by `guestpull
   * fsck`; absent in records written before it existed (fsck reports those as unverifiable).
   */
  tree: TreeSummary.optional(),
});
export type LayerRecord = z.infer<typeof LayerRecord>;

export const BundleRecord = z.object({
  version: z.literal(RECORD_VERSION),
  id: z.string().regex(/^[0-9a-f]{16,64}$/),
  /**
   * `pending` from before the pull checks its layers until the rootfs is mounted: the layers are
   * in use while the owner process lives. `mounted`: in use while the overlay is mounted at `rootfs`.
   */
  state: z.enum(['pending', 'mounted']),
  /** The process that made the record (./lock.ts ownerTag). */
  owner: z.string(),
  /** The bundle directory as the caller named it. */
  bundle: z.string(),
  /** The real path of `<bundle>/rootfs`, as /proc/self/mountinfo shows the mount point ('' while pending). */
  rootfs: z.string(),
  /** Store layer directory names, bottom first. */
  layers: z.array(Hex64),
  image: z.string(),
  manifestDigest: Digest,
  configDigest: Digest,
  created: z.string(),
});
export type BundleRecord = z.infer<typeof BundleRecord>;

/** Write `value` as JSON to `file` atomically (temp file, fsync, rename), mode 0600. */
export async function writeJsonAtomic(file: string, value: unknown): Promise<void> {
  await writeBytesAtomic(file, Buffer.from(`${JSON.stringify(value, null, 2)}\n`, 'utf8'));
}

export async function writeBytesAtomic(file: string, data: Buffer): Promise<void> {
  await writeFileAtomic(file, data, 0o600);
}

/** Parse a record file with `schema`; undefined when it is missing, too big, not JSON or not valid. */
export async function readRecord<T>(file: string, schema: z.ZodType<T>): Promise<T | undefined> {
  let buf: Buffer;
  try {
    buf = await readFile(file);
  } catch {
    return undefined;
  }
  if (buf.length > MAX_RECORD_BYTES) return undefined;
  let raw: unknown;
  try {
    raw = JSON.parse(buf.toString('utf8'));
  } catch {
    return undefined;
  }
  const r = schema.safeParse(raw);
  return r.success ? r.data : undefined;
}
