/**
 * The last stage of the layer pipeline: a Node Writable that feeds tar-stream's (streamx) parser,
 * hands each entry to an async handler one at a time, and watches the tar framing so that
 * tar-stream never sees an archive differently from Go's archive/tar (what containerd and every
 * registry-side tool use):
 *
 * - an entry after a zero block (the end-of-archive marker) is refused; tar-stream would go on
 *   parsing where Go stops;
 * - between two entries only PAX (`x`) and GNU long name/link (`L`, `K`) headers may stand; a PAX
 *   global header (`g`, which tar-stream merges into later entries and Go ignores) is accepted only
 *   with harmless records (comment, charset);
 * - a NUL-typed (pre-POSIX) entry whose name ends in `/` is a directory, as in Go (tar-stream
 *   calls it a file);
 * - one PAX or GNU long name/link header may hold at most `maxPaxHeaderBytes` (default 1 MiB, Go's
 *   own limit), and a PAX header must be well-formed (Go refuses malformed records too);
 * - the raw bytes of the PAX records reach entry.ts (setRawPax): tar-stream decodes values as
 *   UTF-8, which would mangle binary xattr values such as security.capability.
 *
 * Entry types whose data Go skips but tar-stream reads (links, devices with a size) are refused by
 * entry.ts, so both parsers agree on where every header starts.
 *
 * Everything written reaches the parser (so every byte has already been hashed upstream); trailing
 * zero padding after the end marker is fine, trailing garbage fails in tar-stream (Go would ignore it).
 */
import { Writable } from 'node:stream';
import tar, { type ExtractEvents, type Header } from 'tar-stream';
import { ErrorCode, GuestpullError } from '../../errors.js';
import { DEFAULT_LAYER_LIMITS, limitHint, setRawPax, type LayerContext, type LayerLimits } from './entry.js';

export type EntryBody = ExtractEvents['entry'][1];
export type EntryHandler = (header: Header, body: EntryBody) => Promise<void>;

const BLOCK = 512;
const ZERO_BLOCK = Buffer.alloc(BLOCK);
/** Bytes of extension headers (and their data) allowed between two entries, at least. */
export const MAX_HEADER_GAP = 16 * 1024 * 1024;
/** Extension headers that may stand before one entry and hold data: g, x, L, K (plus slack). */
const GAP_HEADERS = 4;
/** PAX global records that change nothing we read. */
const HARMLESS_GLOBAL_KEYS = new Set(['comment', 'charset', 'hdrcharset']);

const roundUp = (n: number): number => Math.ceil(n / BLOCK) * BLOCK;

function framingError(ctx: LayerContext, what: string): GuestpullError {
  return new GuestpullError(
    ErrorCode.BAD_IMAGE,
    `layer ${ctx.layer} of ${ctx.image} is not a well-formed tar archive: ${what}; rebuild or choose another image`,
    { image: ctx.image, layer: ctx.layer },
  );
}

/** A numeric header field the way tar-stream reads it (octal text, or base-256 when the high bit is set). */
export function decodeNumeric(field: Buffer): number {
  if (field[0]! & 0x80) {
    if (field[0] !== 0x80 && field[0] !== 0xff) return Number.NaN;
    const positive = field[0] === 0x80;
    let sum = 0;
    for (let i = 1; i < field.length; i++) sum = sum * 256 + (positive ? field[i]! : 0xff - field[i]!);
    return positive ? sum : -sum;
  }
  let start = 0;
  while (start < field.length && field[start] === 0x20) start++;
  let end = field.indexOf(0x20, start);
  if (end === -1) end = field.length;
  while (start < end && field[start] === 0) start++;
  if (start === end) return 0;
  return parseInt(field.subarray(start, end).toString('latin1'), 8);
}

/** Strict PAX record parser (`<len> <key>=<value>\n`...); null when malformed. */
export function parsePaxRecords(buf: Buffer): Map<string, string> | null {
  const raw = parsePaxRecordsRaw(buf);
  return raw === null ? null : new Map([...raw].map(([k, v]) => [k, v.toString('utf8')]));
}

/** The same, values as raw bytes (a later record with the same key wins, as in Go and tar-stream). */
export function parsePaxRecordsRaw(buf: Buffer): Map<string, Buffer> | null {
  const out = new Map<string, Buffer>();
  let at = 0;
  while (at < buf.length) {
    const sp = buf.indexOf(0x20, at);
    if (sp === -1 || sp - at > 20) return null;
    const lenText = buf.subarray(at, sp).toString('latin1');
    if (!/^[0-9]+$/.test(lenText)) return null;
    const len = Number(lenText);
    if (len <= sp - at + 2 || at + len > buf.length || buf[at + len - 1] !== 0x0a) return null;
    const record = buf.subarray(sp + 1, at + len - 1);
    const eq = record.indexOf(0x3d);
    if (eq <= 0) return null;
    out.set(record.subarray(0, eq).toString('utf8'), Buffer.from(record.subarray(eq + 1)));
    at += len;
  }
  return out;
}

/**
 * Keeps the bytes between the end of the last entry's data and the next entry's header, and checks
 * them when tar-stream reports that entry. Memory: at most MAX_HEADER_GAP plus one chunk.
 */
export class FramingGuard {
  private chunks: Buffer[] = [];
  /** Absolute offset of chunks[0]. */
  private chunksStart = 0;
  /** Absolute offset after the last byte pushed. */
  private pos = 0;
  /** Where tar-stream reads its next header: the end of the last entry (data padded). */
  private keepFrom = 0;
  /** A zero block stood where a header was due: the archive has ended. */
  ended = false;
  private readonly maxHeaderBytes: number;
  private readonly maxGap: number;

  constructor(
    private readonly ctx: LayerContext,
    limits: Pick<LayerLimits, 'maxPaxHeaderBytes'> = DEFAULT_LAYER_LIMITS,
  ) {
    this.maxHeaderBytes = limits.maxPaxHeaderBytes;
    this.maxGap = Math.max(MAX_HEADER_GAP, GAP_HEADERS * (BLOCK + roundUp(limits.maxPaxHeaderBytes)));
  }

  /** Record a chunk about to be written to the parser. */
  push(chunk: Buffer): void {
    const start = this.pos;
    this.pos += chunk.length;
    if (this.ended || this.pos <= this.keepFrom) return;
    if (this.chunks.length === 0) this.chunksStart = start;
    this.chunks.push(chunk);
    if (this.pos - Math.max(this.keepFrom, this.chunksStart) > this.maxGap) {
      throw framingError(this.ctx, `more than ${this.maxGap} bytes of extension headers before one entry ${limitHint('maxPaxHeaderBytes')}`);
    }
    this.checkEnd();
  }

  /** Check the framing before tar-stream's entry `header` whose header block starts at `offset`. */
  onEntry(header: Header, offset: number): void {
    if (this.ended) throw framingError(this.ctx, `entry ${JSON.stringify(header.name.slice(0, 200))} follows the end-of-archive marker`);
    let p = this.keepFrom;
    let pax: Map<string, Buffer> | null = null;
    while (p < offset) {
      const blk = this.read(p, BLOCK);
      if (blk.equals(ZERO_BLOCK)) {
        throw framingError(this.ctx, `entry ${JSON.stringify(header.name.slice(0, 200))} follows a zero block (end-of-archive marker)`);
      }
      const flag = String.fromCharCode(blk[156]!);
      const size = decodeNumeric(blk.subarray(124, 136));
      if (!Number.isSafeInteger(size) || size < 0) throw framingError(this.ctx, 'an extension header has an invalid size');
      if (size > this.maxHeaderBytes) {
        throw framingError(
          this.ctx,
          `a ${flag === 'L' || flag === 'K' ? 'GNU long name' : 'PAX'} header of ${size} bytes before entry ${JSON.stringify(header.name.slice(0, 200))} is larger than ${this.maxHeaderBytes} bytes ${limitHint('maxPaxHeaderBytes')}`,
        );
      }
      if (flag === 'x') {
        // The last `x` header before an entry is the one that applies (Go and tar-stream agree).
        pax = parsePaxRecordsRaw(this.read(p + BLOCK, size));
        if (pax === null) throw framingError(this.ctx, `malformed PAX header before entry ${JSON.stringify(header.name.slice(0, 200))}`);
      } else if (flag === 'g') {
        const records = parsePaxRecords(this.read(p + BLOCK, size));
        if (records === null) throw framingError(this.ctx, 'malformed PAX global header');
        for (const key of records.keys()) {
          if (!HARMLESS_GLOBAL_KEYS.has(key)) {
            throw framingError(this.ctx, `PAX global header record ${JSON.stringify(key.slice(0, 100))} is not supported`);
          }
        }
      } else if (flag !== 'L' && flag !== 'K') {
        throw framingError(this.ctx, `unexpected header type ${JSON.stringify(flag)} before entry ${JSON.stringify(header.name.slice(0, 200))}`);
      }
      p += BLOCK + roundUp(size);
    }
    if (p !== offset) throw framingError(this.ctx, `extension headers do not end where entry ${JSON.stringify(header.name.slice(0, 200))} starts`);
    if (pax !== null) setRawPax(header, pax);
    if (this.read(offset, BLOCK)[156] === 0 && header.type === 'file' && header.name.endsWith('/')) {
      if (header.size !== 0) throw framingError(this.ctx, `directory entry ${JSON.stringify(header.name.slice(0, 200))} has data`);
      header.type = 'directory';
    }
    // tar-stream skips no data for directories (whatever their size) and header.size otherwise.
    const dataLength = header.type === 'directory' ? 0 : header.size;
    this.keepFrom = (header as Header & { byteOffset: number }).byteOffset + roundUp(dataLength);
    this.drop();
    this.checkEnd();
  }

  private checkEnd(): void {
    if (this.ended || this.pos < this.keepFrom + BLOCK || this.chunks.length === 0 || this.chunksStart > this.keepFrom) return;
    if (this.read(this.keepFrom, BLOCK).equals(ZERO_BLOCK)) {
      this.ended = true;
      this.chunks = [];
    }
  }

  private drop(): void {
    while (this.chunks.length > 0 && this.chunksStart + this.chunks[0]!.length <= this.keepFrom) {
      this.chunksStart += this.chunks.shift()!.length;
    }
  }

  /** `n` bytes at absolute offset `at`, which must be retained. */
  private read(at: number, n: number): Buffer {
    if (at < this.chunksStart || at + n > this.pos) throw framingError(this.ctx, 'tar framing is out of step with the parser');
    const parts: Buffer[] = [];
    let base = this.chunksStart;
    let need = n;
    let from = at;
    for (const c of this.chunks) {
      const end = base + c.length;
      if (end > from && need > 0) {
        const s = from - base;
        const take = Math.min(c.length - s, need);
        parts.push(c.subarray(s, s + take));
        need -= take;
        from += take;
      }
      base = end;
      if (need === 0) break;
    }
    return parts.length === 1 ? parts[0]! : Buffer.concat(parts);
  }
}

/**
 * Feeds tar-stream and runs `handler` for each entry, strictly one after the other. A handler
 * failure destroys the parser and fails this stream with the handler's error; a parser failure
 * becomes BAD_IMAGE. The stream only finishes after the last handler has settled.
 */
export class TarFeeder extends Writable {
  private readonly extract = tar.extract();
  private readonly guard: FramingGuard;
  private failure: Error | null = null;
  private running: Promise<void> = Promise.resolve();
  private waiters: Array<(err: Error | null) => void> = [];
  private finished = false;
  private tearingDown = false;

  constructor(
    private readonly ctx: LayerContext,
    handler: EntryHandler,
    limits: Pick<LayerLimits, 'maxPaxHeaderBytes'> = DEFAULT_LAYER_LIMITS,
  ) {
    super({ highWaterMark: 256 * 1024 });
    this.guard = new FramingGuard(ctx, limits);
    this.extract.on('entry', (header, body, next) => {
      // The handler reads errors through iteration; without a listener a destroyed body would throw.
      body.on('error', () => {});
      // Failures are recorded before the parser hears of them: streamx reports a destroy a tick
      // later, and this stream may already be finishing.
      const failed = (e: unknown): void => {
        this.fail(e instanceof Error ? e : new Error(String(e)));
        next(this.failure);
      };
      try {
        this.guard.onEntry(header, body.offset);
      } catch (e) {
        failed(e);
        return;
      }
      this.running = handler(header, body).then(() => next(), failed);
    });
    this.extract.on('error', (e: Error) => this.fail(e));
    this.extract.on('drain', () => this.wake(null));
    this.extract.on('finish', () => {
      this.finished = true;
      this.wake(null);
    });
    this.extract.on('close', () => this.wake(this.failure ?? (this.finished ? null : framingError(this.ctx, 'the tar parser stopped early'))));
  }

  /** Resolves once no entry handler is running (never rejects). */
  settled(): Promise<void> {
    return this.running;
  }

  private fail(e: Error): void {
    if (this.failure) return;
    if (e instanceof GuestpullError || this.tearingDown) this.failure = e;
    else this.failure = framingError(this.ctx, e.message);
    this.wake(this.failure);
  }

  private wake(err: Error | null): void {
    const ws = this.waiters;
    this.waiters = [];
    for (const w of ws) w(err);
  }

  private wait(): Promise<void> {
    return new Promise((resolve, reject) => {
      this.waiters.push((err) => (err ? reject(err) : resolve()));
    });
  }

  override _write(chunk: Buffer, _enc: BufferEncoding, cb: (err?: Error | null) => void): void {
    if (this.failure) return cb(this.failure);
    try {
      this.guard.push(chunk);
    } catch (e) {
      this.fail(e as Error);
      this.extract.destroy(this.failure);
      return cb(this.failure);
    }
    if (this.extract.write(chunk)) return cb();
    if (this.failure) return cb(this.failure);
    this.wait().then(() => cb(), (e: Error) => cb(e));
  }

  override _final(cb: (err?: Error | null) => void): void {
    this.finalize().then(() => cb(this.failure), (e: Error) => cb(e));
  }

  /** End the parser, wait for it to finish (not merely drain) and for the last handler. */
  private async finalize(): Promise<void> {
    try {
      if (this.failure) return;
      this.extract.end(undefined);
      while (!this.finished && !this.failure) {
        if (this.extract.destroyed) throw framingError(this.ctx, 'the tar parser stopped early');
        await this.wait();
      }
    } finally {
      await this.running;
    }
  }

  override _destroy(err: Error | null, cb: (err?: Error | null) => void): void {
    this.tearingDown = true;
    if (!this.extract.destroyed) this.extract.destroy(err);
    this.running.then(() => cb(err));
  }
}
