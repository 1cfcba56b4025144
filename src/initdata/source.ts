/**
 * Where the init-data document comes from, as raw TOML bytes: a TOML file, a block device or disk
 * image in the kata layout, `auto` (scan /dev/vd* and /dev/sd* for the magic, as the kata agent
 * does), or the pod annotation `io.katacontainers.config.hypervisor.cc_init_data`.
 *
 * Kata block-device layout (kata agent `initdata.rs`): bytes 0..8 ASCII `initdata`, bytes 8..16 a
 * little-endian u64 length N, then N bytes of gzip(TOML), zero-padded to a multiple of 512.
 * Everything here is host-controlled: reads are bounded (never a whole device) and gunzip has a hard
 * output bound.
 */
import { constants } from 'node:fs';
import { open, readdir, stat, type FileHandle } from 'node:fs/promises';
import path from 'node:path';
import { promisify } from 'node:util';
import zlib from 'node:zlib';
import { ErrorCode, GuestpullError } from '../errors.js';
import { silentLogger, type Logger } from '../log.js';

export interface InitdataLimits {
  /** Upper bound on the declared gzip payload length of a device image (and on a decoded annotation). */
  maxDeviceBytes: number;
  /** Upper bound on the TOML document's size, after decompression or as a plain file. */
  maxDecompressedBytes: number;
}

export const DEFAULT_INITDATA_LIMITS: InitdataLimits = Object.freeze({
  maxDeviceBytes: 1024 * 1024,
  maxDecompressedBytes: 4 * 1024 * 1024,
});

export const INITDATA_MAGIC: Buffer = Buffer.from('initdata', 'ascii');
const HEADER_BYTES = 16;
const SECTOR = 512;

const gunzipAsync = promisify(zlib.gunzip);
/** O_NONBLOCK: a FIFO put where a device is expected must not hang start-up (no effect on files or disks). */
const OPEN_FLAGS = constants.O_RDONLY | constants.O_NONBLOCK;

function configError(message: string, context: Record<string, unknown> = {}, cause?: unknown): GuestpullError {
  return new GuestpullError(ErrorCode.CONFIG, message, context, cause === undefined ? undefined : { cause });
}

function resolveLimits(partial: Partial<InitdataLimits> | undefined): InitdataLimits {
  const limits = { ...DEFAULT_INITDATA_LIMITS, ...partial };
  for (const [k, v] of Object.entries(limits)) {
    if (!Number.isSafeInteger(v) || v <= 0) throw configError(`init-data limit ${k} must be a positive integer, got ${String(v)}`);
  }
  return limits;
}

/** Read up to `length` bytes at `position`; returns what was there (shorter at end of file). */
async function readAt(fh: FileHandle, length: number, position: number): Promise<Buffer> {
  const buf = Buffer.alloc(length);
  let got = 0;
  while (got < length) {
    const { bytesRead } = await fh.read(buf, got, length - got, position + got);
    if (bytesRead === 0) break;
    got += bytesRead;
  }
  return buf.subarray(0, got);
}

function gunzipError(e: unknown, limits: InitdataLimits, what: string): GuestpullError {
  const code = (e as NodeJS.ErrnoException).code;
  if (code === 'ERR_BUFFER_TOO_LARGE') {
    return configError(
      `init-data ${what}: the document decompresses to more than ${limits.maxDecompressedBytes} bytes ` +
        '(limit maxDecompressedBytes); decompression was stopped there. If the document really is that large, raise the limit',
      { source: what, limit: limits.maxDecompressedBytes },
    );
  }
  return configError(`init-data ${what}: payload is not valid gzip: ${(e as Error).message}`, { source: what }, e);
}

/** gunzip that stops (and fails) as soon as the output passes maxDecompressedBytes. */
async function gunzipBounded(data: Buffer, limits: InitdataLimits, what: string): Promise<Buffer> {
  try {
    return await gunzipAsync(data, { maxOutputLength: limits.maxDecompressedBytes });
  } catch (e) {
    throw gunzipError(e, limits, what);
  }
}

/** Parse a kata device image from an open handle (the magic already checked by the caller). */
async function readDeviceImage(fh: FileHandle, where: string, limits: InitdataLimits): Promise<Buffer> {
  const header = await readAt(fh, HEADER_BYTES, 0);
  if (header.length < HEADER_BYTES || !header.subarray(0, 8).equals(INITDATA_MAGIC)) {
    throw configError(`init-data ${where}: truncated header (${header.length} of ${HEADER_BYTES} bytes)`, { source: where });
  }
  const declared = header.readBigUInt64LE(8);
  if (declared === 0n) throw configError(`init-data ${where}: declares an empty payload (length 0)`, { source: where });
  if (declared > BigInt(limits.maxDeviceBytes)) {
    throw configError(
      `init-data ${where}: declares a ${declared} byte payload, over the ${limits.maxDeviceBytes} byte bound ` +
        '(limit maxDeviceBytes); refusing to read it. If the image is genuine, raise the limit',
      { source: where, declared: declared.toString(), limit: limits.maxDeviceBytes },
    );
  }
  const n = Number(declared);
  const payload = await readAt(fh, n, HEADER_BYTES);
  if (payload.length < n) {
    throw configError(`init-data ${where}: truncated: declares ${n} payload bytes but only ${payload.length} follow the header`, {
      source: where,
    });
  }
  return gunzipBounded(payload, limits, where);
}

async function readTomlFile(fh: FileHandle, size: number, where: string, limits: InitdataLimits): Promise<Buffer> {
  const max = limits.maxDecompressedBytes;
  // One byte more than the size (or the bound) catches a file that grows or lies about its size.
  const buf = size > max ? undefined : await readAt(fh, size + 1, 0);
  if (!buf || buf.length > max) {
    throw configError(`init-data ${where}: file is larger than ${max} bytes (limit maxDecompressedBytes)`, { source: where, limit: max });
  }
  return buf;
}

async function readPath(p: string, limits: InitdataLimits): Promise<{ raw: Buffer; source: string }> {
  let fh: FileHandle;
  try {
    fh = await open(p, OPEN_FLAGS);
  } catch (e) {
    throw configError(`init-data ${p}: cannot open: ${(e as Error).message}`, { source: p }, e);
  }
  try {
    const st = await fh.stat();
    if (!st.isFile() && !st.isBlockDevice()) {
      throw configError(`init-data ${p}: not a regular file or block device`, { source: p });
    }
    const magic = await readAt(fh, INITDATA_MAGIC.length, 0);
    if (magic.equals(INITDATA_MAGIC)) {
      const source = `${p} (kata block-device layout)`;
      return { raw: await readDeviceImage(fh, source, limits), source };
    }
    if (st.isBlockDevice()) {
      throw configError(`init-data ${p}: block device does not start with the "initdata" magic`, { source: p });
    }
    return { raw: await readTomlFile(fh, st.size, p, limits), source: p };
  } finally {
    await fh.close();
  }
}

async function hasMagic(p: string, logger: Logger): Promise<boolean> {
  try {
    const st = await stat(p);
    if (!st.isBlockDevice() && !st.isFile()) return false;
    const fh = await open(p, OPEN_FLAGS);
    try {
      return (await readAt(fh, INITDATA_MAGIC.length, 0)).equals(INITDATA_MAGIC);
    } finally {
      await fh.close();
    }
  } catch (e) {
    logger.debug({ device: p, err: (e as Error).message }, 'init-data scan: cannot read candidate');
    return false;
  }
}

/** Scan `<devRoot>/vd*` and `<devRoot>/sd*` (sorted) for the magic; the first match wins. */
async function findDevice(devRoot: string, logger: Logger): Promise<string> {
  let names: string[];
  try {
    names = await readdir(devRoot);
  } catch (e) {
    throw configError(`init-data auto: cannot list ${devRoot}: ${(e as Error).message}`, { devRoot }, e);
  }
  const candidates = names.filter((n) => n.startsWith('vd') || n.startsWith('sd')).sort();
  const found: string[] = [];
  for (const n of candidates) {
    const p = path.join(devRoot, n);
    if (await hasMagic(p, logger)) found.push(p);
  }
  if (found.length === 0) {
    throw configError(
      `init-data auto: no device under ${devRoot} (vd*, sd*; ${candidates.length} checked) starts with the "initdata" magic; ` +
        'attach the init-data disk or pass --initdata PATH',
      { devRoot },
    );
  }
  if (found.length > 1) logger.warn({ devices: found, using: found[0] }, 'init-data auto: several devices carry the magic; using the first');
  return found[0]!;
}

/** See the module comment. Returns the raw TOML bytes and a description of where they came from. */
export async function readInitdata(
  spec: string,
  opts: { limits?: Partial<InitdataLimits>; devRoot?: string; logger?: Logger } = {},
): Promise<{ raw: Buffer; source: string }> {
  const limits = resolveLimits(opts.limits);
  const logger = opts.logger ?? silentLogger();
  if (spec === '') throw configError('init-data: empty --initdata value; pass a path or "auto"');
  const p = spec === 'auto' ? await findDevice(opts.devRoot ?? '/dev', logger) : spec;
  const out = await readPath(p, limits);
  logger.debug({ source: out.source, bytes: out.raw.length }, 'init-data read');
  return out;
}

/** The kata block-device layout for `raw` (a TOML document). */
export function packInitdataImage(raw: Buffer): Buffer {
  const payload = zlib.gzipSync(raw, { level: 9 });
  const total = Math.ceil((HEADER_BYTES + payload.length) / SECTOR) * SECTOR;
  const out = Buffer.alloc(total);
  INITDATA_MAGIC.copy(out, 0);
  out.writeBigUInt64LE(BigInt(payload.length), 8);
  payload.copy(out, HEADER_BYTES);
  return out;
}

/** base64(gzip(raw)) for the pod annotation io.katacontainers.config.hypervisor.cc_init_data. */
export function encodeAnnotation(raw: Buffer): string {
  return zlib.gzipSync(raw, { level: 9 }).toString('base64');
}

/** Decode an annotation value back to the raw TOML bytes, with the same bounds as a device. */
export function decodeAnnotation(value: string, limits?: Partial<InitdataLimits>): Buffer {
  const l = resolveLimits(limits);
  const v = value.replace(/\s+/g, '');
  const where = 'annotation io.katacontainers.config.hypervisor.cc_init_data';
  if (v.length === 0 || v.length % 4 !== 0 || !/^[A-Za-z0-9+/]+={0,2}$/.test(v)) {
    throw configError(`init-data ${where}: not standard base64`, { source: where });
  }
  const decodedLength = (v.length / 4) * 3 - (v.length - v.replace(/=+$/, '').length);
  if (decodedLength > l.maxDeviceBytes) {
    throw configError(`init-data ${where}: gzip payload over the ${l.maxDeviceBytes} byte bound (limit maxDeviceBytes)`, {
      source: where,
      limit: l.maxDeviceBytes,
    });
  }
  try {
    return zlib.gunzipSync(Buffer.from(v, 'base64'), { maxOutputLength: l.maxDecompressedBytes });
  } catch (e) {
    throw gunzipError(e, l, where);
  }
}
