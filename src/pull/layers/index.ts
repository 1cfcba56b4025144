/**
 * Apply one image layer into a flattened rootfs (copy mode), verified and bounded:
 *
 *   source → gunzip | zstd (./zstd.ts) | nothing → HashCounter (diff_id digest, size and ratio bounds)
 *          → readTar (./tar.ts: Go's reading of tar) → LayerApplier (whiteouts, links, owners,
 *            xattrs, devices; see ./apply.ts for the layer semantics)
 *
 * The first line is ./inflate.ts. During a pull this runs in the daemon's thread or, for a layer
 * unpacked beside another, whole in a layer worker (./workers.ts).
 *
 * The diff_id is checked over every decompressed byte once the stream has ended; the entries
 * have been written by then, so on any failure the caller discards the whole staging rootfs.
 * Bounds come from `limits` (src/config's Config.image.limits has the same field names; each
 * message names the cdh.toml key that raises the bound).
 */
import path from 'node:path';
import type { Readable } from 'node:stream';
import { asGuestpullError, ErrorCode, GuestpullError } from '../../errors.js';
import { layerCompression, parseDigest } from '../../oci.js';
import { LayerApplier, type LowerSwitch } from './apply.js';
import { DEFAULT_LAYER_LIMITS, type LayerContext, type LayerLimits } from './entry.js';
import { inflateInto, type InflateResult, type InflateTask } from './inflate.js';
import { readTar } from './tar.js';

export { DEFAULT_LAYER_LIMITS, LIMIT_KEYS, type LayerLimits } from './entry.js';
export type { LowerSwitch } from './apply.js';

/** The one logging call a layer makes (a pino Logger, or a worker's forwarder). */
export interface LayerLog {
  debug(fields: Record<string, unknown>, msg: string): void;
}

export interface ApplyLayerOptions {
  /** The layer blob as downloaded (compressed per mediaType); its producer verifies the blob digest. */
  source: Readable;
  mediaType: string;
  /** Descriptor size, for the ratio bound. */
  compressedSize: number;
  /** From config.rootfs.diff_ids: the digest of the uncompressed tar. */
  diffId: string;
  layerDigest: string;
  /** Host directory, already existing, with the lower layers applied. */
  rootfs: string;
  image: string;
  logger: LayerLog;
  signal?: AbortSignal;
  limits?: Partial<LayerLimits>;
  /**
   * Set when `rootfs` is the layer's own empty upper directory while its parents are still being
   * unpacked (overlay store): the applier's speculative mode, see ./apply.ts ApplierOptions.lower.
   */
  lower?: (rootEntry: boolean) => Promise<LowerSwitch>;
}

export interface ApplyLayerResult {
  entries: number;
  uncompressedBytes: number;
  /** Extended attributes set, and those left out (see ./apply.ts for which and why). */
  xattrs: number;
  ignoredXattrs: number;
  ms: number;
  /** The layer had an entry for its root directory. */
  rootEntry: boolean;
  /** Speculative mode needed the parents (`lower` was called). */
  switched: boolean;
}

/** In-thread: decompressed bytes gunzip may hold ahead of the (busy) tar applier. */
const GUNZIP_READ_AHEAD = 4 * 1024 * 1024;

export async function applyLayer(opts: ApplyLayerOptions): Promise<ApplyLayerResult> {
  const started = performance.now();
  const ctx: LayerContext = { image: opts.image, layer: opts.layerDigest };
  const context = { image: opts.image, layer: opts.layerDigest };
  const limits: LayerLimits = { ...DEFAULT_LAYER_LIMITS, ...opts.limits };

  const compression = layerCompression(opts.mediaType);
  if (compression === undefined) {
    opts.source.destroy();
    throw new GuestpullError(
      ErrorCode.BAD_IMAGE,
      `layer ${opts.layerDigest} of ${opts.image} has media type ${JSON.stringify(opts.mediaType.slice(0, 200))}, which is not a layer type guestpull can unpack`,
      context,
    );
  }
  let expected: { algorithm: 'sha256' | 'sha512'; hex: string };
  try {
    expected = parseDigest(opts.diffId);
  } catch (e) {
    opts.source.destroy();
    throw new GuestpullError(ErrorCode.BAD_IMAGE, `layer ${opts.layerDigest} of ${opts.image}: ${(e as Error).message} as its diff_id`, context);
  }
  if (opts.signal?.aborted) {
    opts.source.destroy();
    throw new GuestpullError(ErrorCode.CANCELLED, `unpacking layer ${opts.layerDigest} of ${opts.image} was cancelled`, context);
  }

  let applier: LayerApplier;
  try {
    applier = new LayerApplier(path.resolve(opts.rootfs), ctx, limits, { root: process.getuid?.() === 0, ...(opts.lower ? { lower: opts.lower } : {}) });
  } catch (e) {
    opts.source.destroy();
    const ge = asGuestpullError(e);
    throw new GuestpullError(ge.code, `cannot unpack layer ${opts.layerDigest} of ${opts.image} into ${opts.rootfs}: ${ge.message}`, context, { cause: e });
  }
  const sink = readTar(ctx, (header, body) => applier.apply(header, body), limits);
  const task: InflateTask = { compression, algorithm: expected.algorithm, compressedSize: opts.compressedSize, limits, ctx };

  let inflated: InflateResult;
  try {
    // (readTar settles only after its last entry handler: nothing writes into the rootfs after this)
    inflated = await inflateInto(opts.source, sink, task, GUNZIP_READ_AHEAD, opts.signal);
  } catch (e) {
    if (opts.signal?.aborted) {
      throw new GuestpullError(ErrorCode.CANCELLED, `unpacking layer ${opts.layerDigest} of ${opts.image} was cancelled`, context, { cause: e });
    }
    if (e instanceof GuestpullError) throw e;
    const ge = asGuestpullError(e);
    throw new GuestpullError(ge.code, `unpacking layer ${opts.layerDigest} of ${opts.image} failed: ${ge.message}`, { ...context, ...ge.context }, { cause: e });
  }
  if (inflated.hex !== expected.hex) {
    throw new GuestpullError(
      ErrorCode.DIGEST_MISMATCH,
      `layer ${opts.layerDigest} of ${opts.image}: the uncompressed content has digest ${expected.algorithm}:${inflated.hex}, but the image config's diff_id is ${opts.diffId}; the layer or the config is corrupt or was tampered with`,
      { ...context, expected: opts.diffId, actual: `${expected.algorithm}:${inflated.hex}` },
    );
  }
  await applier.finish();

  const ms = Math.round(performance.now() - started);
  if (applier.ignoredXattrs > 0) {
    opts.logger.debug(
      { image: opts.image, layer: opts.layerDigest, ignoredXattrs: applier.ignoredXattrs, names: [...applier.ignoredXattrNames] },
      'layer extended attributes left out',
    );
  }
  opts.logger.debug(
    { image: opts.image, layer: opts.layerDigest, entries: applier.entries, bytes: inflated.bytes, xattrs: applier.xattrs, ms },
    'layer unpacked',
  );
  return {
    entries: applier.entries,
    uncompressedBytes: inflated.bytes,
    xattrs: applier.xattrs,
    ignoredXattrs: applier.ignoredXattrs,
    ms,
    rootEntry: applier.rootEntry,
    switched: applier.switched,
  };
}
