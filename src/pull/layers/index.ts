/**
 * Apply one image layer into a flattened rootfs (copy mode), verified and bounded:
 *
 *   source → gunzip | zstd (./zstd.ts) | nothing → HashCounter (diff_id digest, size and ratio bounds)
 *          → TarFeeder (tar-stream, framing checks) → LayerApplier (whiteouts, links, owners,
 *            xattrs, devices; see ./apply.ts for the layer semantics)
 *
 * The diff_id is checked over every decompressed byte once the stream has ended; the entries
 * have been written by then, so on any failure the caller discards the whole staging rootfs.
 * Bounds come from `limits` (src/config's Config.image.limits has the same field names; each
 * message names the cdh.toml key that raises the bound).
 */
import path from 'node:path';
import type { Readable, TransformOptions } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import zlib from 'node:zlib';
import { asGuestpullError, ErrorCode, GuestpullError } from '../../errors.js';
import { layerCompression, parseDigest } from '../../oci.js';
import { LayerApplier } from './apply.js';
import { DEFAULT_LAYER_LIMITS, type LayerContext, type LayerLimits } from './entry.js';
import { HashCounter } from './hash.js';
import { TarFeeder } from './tarfeed.js';
import { zstdDecompress } from './zstd.js';

export { DEFAULT_LAYER_LIMITS, LIMIT_KEYS, type LayerLimits } from './entry.js';

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
}

export interface ApplyLayerResult {
  entries: number;
  uncompressedBytes: number;
  /** Extended attributes set, and those left out (see ./apply.ts for which and why). */
  xattrs: number;
  ignoredXattrs: number;
  ms: number;
}

const GUNZIP_CHUNK = 256 * 1024;
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
    applier = new LayerApplier(path.resolve(opts.rootfs), ctx, limits, { root: process.getuid?.() === 0 });
  } catch (e) {
    opts.source.destroy();
    const ge = asGuestpullError(e);
    throw new GuestpullError(ge.code, `cannot unpack layer ${opts.layerDigest} of ${opts.image} into ${opts.rootfs}: ${ge.message}`, context, { cause: e });
  }
  const hasher = new HashCounter(expected.algorithm, opts.compressedSize, limits, ctx, compression !== 'none');
  const feeder = new TarFeeder(ctx, (header, body) => applier.apply(header, body), limits);

  let sourceError: unknown = null;
  let gunzipError: unknown = null;
  opts.source.once('error', (e) => {
    sourceError ??= e;
  });
  const pipelineOpts = opts.signal ? { signal: opts.signal } : {};
  try {
    if (compression === 'gzip') {
      // A deep readable buffer lets inflation (thread pool) run ahead of hashing and writing (main thread).
      const gunzipOpts: zlib.ZlibOptions & TransformOptions = { chunkSize: GUNZIP_CHUNK, readableHighWaterMark: GUNZIP_READ_AHEAD };
      const gunzip = zlib.createGunzip(gunzipOpts);
      gunzip.once('error', (e) => {
        gunzipError ??= e;
      });
      await pipeline(opts.source, gunzip, hasher, feeder, pipelineOpts);
    } else if (compression === 'zstd') {
      await pipeline(opts.source, zstdDecompress(ctx), hasher, feeder, pipelineOpts);
    } else {
      await pipeline(opts.source, hasher, feeder, pipelineOpts);
    }
  } catch (e) {
    await feeder.settled();
    if (opts.signal?.aborted) {
      throw new GuestpullError(ErrorCode.CANCELLED, `unpacking layer ${opts.layerDigest} of ${opts.image} was cancelled`, context, { cause: e });
    }
    if (e instanceof GuestpullError) throw e;
    if (e === gunzipError) {
      throw new GuestpullError(
        ErrorCode.BAD_IMAGE,
        `layer ${opts.layerDigest} of ${opts.image} is not valid gzip: ${(e as Error).message}`,
        context,
        { cause: e },
      );
    }
    if (e === sourceError) {
      const ge = asGuestpullError(e, ErrorCode.UNAVAILABLE);
      throw new GuestpullError(ge.code, `downloading layer ${opts.layerDigest} of ${opts.image} failed: ${ge.message}`, { ...context, ...ge.context }, { cause: e });
    }
    const ge = asGuestpullError(e);
    throw new GuestpullError(ge.code, `unpacking layer ${opts.layerDigest} of ${opts.image} failed: ${ge.message}`, { ...context, ...ge.context }, { cause: e });
  }
  await feeder.settled();

  const actual = hasher.digestHex();
  if (actual !== expected.hex) {
    throw new GuestpullError(
      ErrorCode.DIGEST_MISMATCH,
      `layer ${opts.layerDigest} of ${opts.image}: the uncompressed content has digest ${expected.algorithm}:${actual}, but the image config's diff_id is ${opts.diffId}; the layer or the config is corrupt or was tampered with`,
      { ...context, expected: opts.diffId, actual: `${expected.algorithm}:${actual}` },
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
    { image: opts.image, layer: opts.layerDigest, entries: applier.entries, bytes: hasher.bytes, xattrs: applier.xattrs, ms },
    'layer unpacked',
  );
  return { entries: applier.entries, uncompressedBytes: hasher.bytes, xattrs: applier.xattrs, ignoredXattrs: applier.ignoredXattrs, ms };
}
