/**
 * The tar reader of the layer pipeline: decompressed chunks in, one entry at a time out to an async
 * handler. It reads archives the way Go's archive/tar does (what containerd and every registry-side
 * tool use), so an image can never mean one thing to guestpull and another to the tools that built
 * or scanned it:
 *
 * - V7, USTAR, STAR, GNU and PAX headers; the checksum may be the unsigned or the signed sum; every
 *   numeric field is octal or base-256 and must parse (a bad one is BAD_IMAGE, not zero);
 * - extension headers stand before their entry: PAX `x` (the last one applies; an empty value keeps
 *   the header's field), GNU long name `L` and long link `K` (which win over PAX path/linkpath, as
 *   in Go); a PAX global header `g` is accepted only with records that change nothing we read
 *   (comment, charset), and, as in Go, ends the extension headers pending before it;
 * - a NUL-typed (pre-POSIX) entry whose final name ends in `/` is a directory; link, symlink,
 *   device, directory and FIFO entries have no data whatever their size says (entry.ts refuses a
 *   non-zero size for them);
 * - the archive ends at a zero block; after it only zero bytes may follow (Go stops reading there:
 *   an entry or garbage after it is refused rather than silently ignored). An archive that just
 *   stops at an entry boundary, without end blocks, is read as Go reads it.
 *
 * Bounds: one extension header's data is at most `maxPaxHeaderBytes` (Go's own limit is 1 MiB),
 * and the extension headers before one entry at most MAX_HEADER_GAP bytes together.
 *
 * Memory: nothing is copied except a header or an extension header that straddles two chunks. A
 * chunk is read to its end before the next one is asked for, and by then nobody holds a piece of
 * it: an entry's data reaches the handler as slices of the chunks (EntryBody), each valid only
 * until the handler asks for the next one or settles. So the stage before may reuse a chunk's
 * memory as soon as it is asked for the next (./gunzip.ts does).
 */
import { ErrorCode, GuestpullError } from '../../errors.js';
import { DEFAULT_LAYER_LIMITS, limitHint, type LayerContext, type LayerLimits } from './entry.js';

const BLOCK = 512;
/** Bytes of extension headers (and their data) allowed before one entry, at least. */
export const MAX_HEADER_GAP = 16 * 1024 * 1024;
/** Extension headers that may stand before one entry and hold data: g, x, L, K (plus slack). */
const GAP_HEADERS = 4;
/** PAX global records that change nothing we read. */
const HARMLESS_GLOBAL_KEYS = new Set(['comment', 'charset', 'hdrcharset']);

/** Entry types, named as tar-stream names them (entry.ts maps them to its kinds). */
export type TarEntryType =
  | 'file'
  | 'link'
  | 'symlink'
  | 'character-device'
  | 'block-device'
  | 'directory'
  | 'fifo'
  | 'contiguous-file'
  | 'gnu-sparse'
  | `unknown type ${string}`;

export interface TarHeader {
  /** After PAX path, GNU long name and USTAR prefix. */
  name: string;
  linkname: string;
  type: TarEntryType;
  /** Bytes of data in the archive (0 for header-only types whatever the header says). */
  dataSize: number;
  /** The size the header (or its PAX record) states. */
  size: number;
  mode: number;
  uid: number;
  gid: number;
  /** Seconds since the epoch (the header's field; PAX mtime is in `pax`). */
  mtime: number;
  devmajor: number;
  devminor: number;
  /** The entry's own PAX records, values decoded as UTF-8; null without an `x` header. */
  pax: Record<string, string> | null;
  /** The same records with their raw values (binary xattrs such as security.capability). */
  paxRaw: ReadonlyMap<string, Buffer> | null;
}

function framingError(ctx: LayerContext, what: string): GuestpullError {
  return new GuestpullError(
    ErrorCode.BAD_IMAGE,
    `layer ${ctx.layer} of ${ctx.image} is not a well-formed tar archive: ${what}; rebuild or choose another image`,
    { image: ctx.image, layer: ctx.layer },
  );
}

const quote = (s: string): string => JSON.stringify(s.slice(0, 200));

/** A NUL-terminated string field (the whole field when it has no NUL). */
function cstr(b: Buffer, off: number, len: number): string {
  let end = b.indexOf(0, off);
  if (end === -1 || end > off + len) end = off + len;
  return end === off ? '' : b.toString('utf8', off, end);
}

/**
 * A numeric header field as Go reads it: base-256 two's complement when the high bit of the first
 * byte is set, else octal text (leading and trailing spaces and NULs trimmed, cut at a NUL);
 * NaN when it does not parse or is not a safe integer.
 */
export function decodeNumeric(b: Buffer, off = 0, len = b.length - off): number {
  const first = b[off]!;
  if (first & 0x80) {
    const inv = first & 0x40 ? 0xff : 0;
    let x = 0;
    for (let i = 0; i < len; i++) {
      let c = b[off + i]! ^ inv;
      if (i === 0) c &= 0x7f;
      x = x * 256 + c;
      if (x > Number.MAX_SAFE_INTEGER) return Number.NaN;
    }
    return inv ? -x - 1 : x;
  }
  let s = off;
  let e = off + len;
  while (s < e && (b[s] === 0x20 || b[s] === 0)) s++;
  while (e > s && (b[e - 1] === 0x20 || b[e - 1] === 0)) e--;
  let x = 0;
  for (let i = s; i < e; i++) {
    const c = b[i]!;
    if (c === 0) break;
    if (c < 0x30 || c > 0x37) return Number.NaN;
    x = x * 8 + (c - 0x30);
    if (x > Number.MAX_SAFE_INTEGER) return Number.NaN;
  }
  return x;
}

/**
 * Strict PAX records (`<len> <key>=<value>\n`...), values as raw bytes (a later record with the
 * same key wins, as in Go); null when malformed. As in Go, a key may not be empty or hold a NUL,
 * and the path, linkpath, uname and gname values may not hold a NUL.
 */
export function parsePaxRecordsRaw(buf: Buffer): Map<string, Buffer> | null {
  const out = new Map<string, Buffer>();
  let at = 0;
  while (at < buf.length) {
    const sp = buf.indexOf(0x20, at);
    if (sp === -1 || sp === at || sp - at > 20) return null;
    let len = 0;
    for (let i = at; i < sp; i++) {
      const c = buf[i]!;
      if (c < 0x30 || c > 0x39) return null;
      len = len * 10 + (c - 0x30);
    }
    if (len <= sp - at + 2 || at + len > buf.length || buf[at + len - 1] !== 0x0a) return null;
    const eq = buf.indexOf(0x3d, sp + 1);
    if (eq <= sp + 1 || eq >= at + len - 1) return null;
    const key = buf.toString('utf8', sp + 1, eq);
    const value = Buffer.from(buf.subarray(eq + 1, at + len - 1));
    if (key.includes('\0')) return null;
    if ((key === 'path' || key === 'linkpath' || key === 'uname' || key === 'gname') && value.includes(0)) return null;
    out.set(key, value);
    at += len;
  }
  return out;
}

const TYPES: Record<number, TarEntryType> = {
  0x30: 'file',
  0x31: 'link',
  0x32: 'symlink',
  0x33: 'character-device',
  0x34: 'block-device',
  0x35: 'directory',
  0x36: 'fifo',
  0x37: 'contiguous-file',
  0x53: 'gnu-sparse',
};
/** Types Go reads no data for, whatever their size. */
const HEADER_ONLY = new Set<TarEntryType>(['link', 'symlink', 'character-device', 'block-device', 'directory', 'fifo']);

/**
 * An entry's data, as slices of the decompressed chunks. A slice is valid until the next read()
 * (or until the handler settles): the reader goes on, and the chunk under it may be reused.
 */
export class EntryBody {
  private queued: Buffer | null = null;
  /** No data after `queued`. */
  private finished: boolean;
  private failure: Error | null = null;
  private waiting: { resolve: (b: Buffer | null) => void; reject: (e: Error) => void } | null = null;
  private released: (() => void) | null = null;
  private detached = false;

  /** @internal The reader makes bodies; `whole` is all the data at once (or null: none). */
  constructor(whole: Buffer | null, streaming: boolean) {
    this.queued = whole;
    this.finished = !streaming;
  }

  /** The next slice of data, or null after the last. */
  read(): Buffer | null | Promise<Buffer | null> {
    const r = this.released;
    if (r !== null) {
      this.released = null;
      r();
    }
    const q = this.queued;
    if (q !== null) {
      this.queued = null;
      return q;
    }
    if (this.finished) return null;
    if (this.failure !== null) return Promise.reject(this.failure);
    return new Promise((resolve, reject) => {
      this.waiting = { resolve, reject };
    });
  }

  async *[Symbol.asyncIterator](): AsyncGenerator<Buffer> {
    for (;;) {
      const b = await this.read();
      if (b === null) return;
      yield b;
    }
  }

  /** @internal Hands over one slice; resolves once the handler asks for more (or has settled). */
  supply(slice: Buffer, last: boolean): Promise<void> {
    if (this.detached) return Promise.resolve();
    if (last) this.finished = true;
    const w = this.waiting;
    if (w !== null) {
      this.waiting = null;
      w.resolve(slice);
    } else {
      this.queued = slice;
    }
    if (last) return Promise.resolve();
    return new Promise((resolve) => {
      this.released = resolve;
    });
  }

  /** @internal The handler has settled: nothing of ours is held any more. */
  detach(): void {
    this.detached = true;
    this.queued = null;
    const r = this.released;
    this.released = null;
    r?.();
  }

  /** @internal The archive cannot go on: a pending or later read fails with `e`. */
  fail(e: Error): void {
    this.failure ??= e;
    this.queued = null;
    const w = this.waiting;
    this.waiting = null;
    w?.reject(e);
  }
}

export type EntryHandler = (header: TarHeader, body: EntryBody) => Promise<void>;

const enum State {
  Header,
  Ext,
  Data,
  Skip,
  Zero,
  End,
}

/**
 * A pipeline's last stage: reads the archive from `source` and runs `handler` for each entry,
 * strictly one after the other. Resolves after the source has ended and the last handler has
 * settled; rejects with the handler's error, a BAD_IMAGE framing error, or the source's error.
 */
export function readTar(
  ctx: LayerContext,
  handler: EntryHandler,
  limits: Pick<LayerLimits, 'maxPaxHeaderBytes'> = DEFAULT_LAYER_LIMITS,
): (source: AsyncIterable<Buffer>) => Promise<void> {
  return (source) => new TarReader(ctx, handler, limits).run(source);
}

class TarReader {
  private state = State.Header;
  /** A header straddling two chunks, and how much of it we have. */
  private readonly hdr = Buffer.allocUnsafe(BLOCK);
  private hdrFill = 0;
  /** Bytes still due in the Ext, Data and Skip states (Skip: data nobody reads, then padding). */
  private due = 0;
  /** Padding after the current data or extension data. */
  private pad = 0;
  private ext: Buffer | null = null;
  private extFill = 0;
  private extType = 0;
  private extName = '';
  /** Pending extension header results, for the next entry. */
  private pax: Map<string, Buffer> | null = null;
  private longName: string | null = null;
  private longLink: string | null = null;
  /** Bytes of extension headers since the last entry. */
  private gap = 0;
  private readonly maxExt: number;
  private readonly maxGap: number;
  private body: EntryBody | null = null;
  private entryName = '';
  private running: Promise<void> | null = null;
  private failure: unknown = null;
  private failed = false;

  constructor(
    private readonly ctx: LayerContext,
    private readonly handler: EntryHandler,
    limits: Pick<LayerLimits, 'maxPaxHeaderBytes'>,
  ) {
    this.maxExt = limits.maxPaxHeaderBytes;
    this.maxGap = Math.max(MAX_HEADER_GAP, GAP_HEADERS * (BLOCK + roundUp(limits.maxPaxHeaderBytes)));
  }

  async run(source: AsyncIterable<Buffer>): Promise<void> {
    try {
      for await (const chunk of source) {
        let p = 0;
        const n = chunk.length;
        while (p < n) {
          switch (this.state) {
            case State.Header: {
              if (this.hdrFill === 0 && n - p >= BLOCK) {
                const block = chunk.subarray(p, p + BLOCK);
                p += BLOCK;
                const start = this.onHeader(block);
                if (start) p = await this.startEntry(chunk, p);
              } else {
                const take = Math.min(BLOCK - this.hdrFill, n - p);
                chunk.copy(this.hdr, this.hdrFill, p, p + take);
                p += take;
                this.hdrFill += take;
                if (this.hdrFill === BLOCK) {
                  this.hdrFill = 0;
                  if (this.onHeader(this.hdr)) p = await this.startEntry(chunk, p);
                }
              }
              break;
            }
            case State.Data: {
              const take = Math.min(this.due, n - p);
              this.due -= take;
              const slice = chunk.subarray(p, p + take);
              p += take;
              await this.body!.supply(slice, this.due === 0);
              this.checkFailure();
              if (this.due === 0) {
                await this.settle();
                this.due = this.pad;
                this.state = this.due > 0 ? State.Skip : State.Header;
              }
              break;
            }
            case State.Skip: {
              const take = Math.min(this.due, n - p);
              this.due -= take;
              p += take;
              if (this.due === 0) this.state = State.Header;
              break;
            }
            case State.Ext: {
              const take = Math.min(this.due, n - p);
              chunk.copy(this.ext!, this.extFill, p, p + take);
              this.extFill += take;
              this.due -= take;
              p += take;
              if (this.due === 0) {
                this.onExtension();
                this.due = this.pad;
                this.state = this.due > 0 ? State.Skip : State.Header;
              }
              break;
            }
            case State.Zero: {
              // One zero block seen: the next block must be zero too (or the archive ends here).
              const take = Math.min(BLOCK - this.hdrFill, n - p);
              for (let i = p; i < p + take; i++) {
                if (chunk[i] !== 0) throw framingError(this.ctx, 'an entry follows a zero block (end-of-archive marker)');
              }
              p += take;
              this.hdrFill += take;
              if (this.hdrFill === BLOCK) {
                this.hdrFill = 0;
                this.state = State.End;
              }
              break;
            }
            case State.End: {
              for (let i = p; i < n; i++) {
                if (chunk[i] !== 0) throw framingError(this.ctx, 'data follows the end-of-archive marker (two zero blocks)');
              }
              p = n;
              break;
            }
          }
        }
      }
      this.atEnd();
    } catch (e) {
      this.failed = true;
      this.failure ??= e;
      this.body?.fail(e instanceof Error ? e : new Error(String(e)));
    } finally {
      if (this.running !== null) await this.running;
    }
    if (this.failed) throw this.failure;
  }

  /** The source has ended: where we stand must be a place an archive may end. */
  private atEnd(): void {
    switch (this.state) {
      case State.Header:
        if (this.hdrFill > 0) throw framingError(this.ctx, 'the archive ends in the middle of a header');
        if (this.pax !== null || this.longName !== null || this.longLink !== null) {
          throw framingError(this.ctx, 'the archive ends after an extension header, without its entry');
        }
        return;
      case State.Zero:
      case State.End:
        return;
      case State.Ext:
        throw framingError(this.ctx, 'the archive ends in the middle of an extension header');
      case State.Data:
      case State.Skip:
        throw framingError(this.ctx, `the archive ends in the middle of entry ${quote(this.entryName)} (truncated)`);
    }
  }

  private checkFailure(): void {
    if (this.failed) throw this.failure;
  }

  /** Wait for the running handler; its failure becomes ours. */
  private async settle(): Promise<void> {
    const r = this.running;
    if (r === null) return;
    await r;
    this.running = null;
    this.body = null;
    this.checkFailure();
  }

  /**
   * One header block. Extension headers are taken in here (state Ext or Skip); true when it is an
   * entry, whose handler startEntry() then runs.
   */
  private onHeader(b: Buffer): boolean {
    let total = 0;
    let field = 0;
    for (let i = 0; i < BLOCK; i++) total += b[i]!;
    if (total === 0) {
      if (this.pax !== null || this.longName !== null || this.longLink !== null) {
        throw framingError(this.ctx, 'an extension header is followed by the end-of-archive marker instead of its entry');
      }
      this.state = State.Zero;
      return false;
    }
    for (let i = 148; i < 156; i++) field += b[i]!;
    const unsigned = total - field + 8 * 0x20;
    const stored = decodeNumeric(b, 148, 8);
    if (stored !== unsigned) {
      let signed = 8 * 0x20;
      for (let i = 0; i < BLOCK; i++) if (i < 148 || i >= 156) signed += (b[i]! << 24) >> 24;
      if (stored !== signed) throw framingError(this.ctx, 'a header checksum does not match (corrupt data, or not a tar archive)');
    }
    const flag = b[156]!;
    const size = decodeNumeric(b, 124, 12);
    if (!Number.isSafeInteger(size) || size < 0) throw framingError(this.ctx, `a header has an invalid size near ${quote(cstr(b, 0, 100))}`);

    if (flag === 0x78 || flag === 0x67 || flag === 0x4c || flag === 0x4b) {
      // x, g, L, K: data is the extension itself.
      this.gap += BLOCK + roundUp(size);
      if (this.gap > this.maxGap) {
        throw framingError(this.ctx, `more than ${this.maxGap} bytes of extension headers before one entry ${limitHint('maxPaxHeaderBytes')}`);
      }
      if (size > this.maxExt) {
        throw framingError(
          this.ctx,
          `a ${flag === 0x4c || flag === 0x4b ? 'GNU long name' : 'PAX'} header of ${size} bytes is larger than ${this.maxExt} bytes ${limitHint('maxPaxHeaderBytes')}`,
        );
      }
      this.extType = flag;
      this.extName = cstr(b, 0, 100);
      this.ext = Buffer.allocUnsafe(size);
      this.extFill = 0;
      this.due = size;
      this.pad = roundUp(size) - size;
      if (size === 0) {
        this.onExtension();
        this.due = this.pad;
        this.state = this.due > 0 ? State.Skip : State.Header;
      } else {
        this.state = State.Ext;
      }
      return false;
    }

    const magic = b.toString('latin1', 257, 263);
    const ustar = magic === 'ustar\0';
    const star = ustar && b[508] === 0x74 && b[509] === 0x61 && b[510] === 0x72 && b[511] === 0;
    const gnu = magic === 'ustar ' && b[263] === 0x20 && b[264] === 0;
    let name = cstr(b, 0, 100);
    let linkname = cstr(b, 157, 100);
    const h = {
      mode: decodeNumeric(b, 100, 8),
      uid: decodeNumeric(b, 108, 8),
      gid: decodeNumeric(b, 116, 8),
      mtime: decodeNumeric(b, 136, 12),
      devmajor: 0,
      devminor: 0,
    };
    if (ustar || gnu) {
      h.devmajor = decodeNumeric(b, 329, 8);
      h.devminor = decodeNumeric(b, 337, 8);
      const prefix = star ? cstr(b, 345, 131) : ustar ? cstr(b, 345, 155) : '';
      if (prefix.length > 0) name = `${prefix}/${name}`;
    }
    for (const [k, v] of Object.entries(h)) {
      if (Number.isNaN(v)) throw framingError(this.ctx, `entry ${quote(name)} has an invalid ${k} field`);
    }

    let sizeNow = size;
    let pax: Record<string, string> | null = null;
    const raw = this.pax;
    if (raw !== null) {
      pax = {};
      for (const [k, v] of raw) {
        const text = v.toString('utf8');
        pax[k] = text;
        if (text === '') continue; // an empty value keeps the header's field (Go)
        if (k === 'path') name = text;
        else if (k === 'linkpath') linkname = text;
        else if (k === 'size') {
          if (!/^[0-9]{1,16}$/.test(text) || !Number.isSafeInteger(Number(text))) throw framingError(this.ctx, `entry ${quote(name)} has an invalid PAX size ${quote(text)}`);
          sizeNow = Number(text);
        }
      }
    }
    // An empty GNU long name or link changes nothing (Go).
    if (this.longName !== null && this.longName !== '') name = this.longName;
    if (this.longLink !== null && this.longLink !== '') linkname = this.longLink;
    this.pax = null;
    this.longName = null;
    this.longLink = null;
    this.gap = 0;

    let type: TarEntryType;
    if (flag === 0) type = name.endsWith('/') ? 'directory' : 'file';
    else type = TYPES[flag] ?? `unknown type ${JSON.stringify(String.fromCharCode(flag))}`;
    const dataSize = HEADER_ONLY.has(type) ? 0 : sizeNow;

    this.pending = { name, linkname, type, dataSize, size: sizeNow, ...h, pax, paxRaw: raw };
    return true;
  }

  private pending: TarHeader | null = null;

  /** Run the handler for the pending entry; hand it the data in `chunk` from `p` on. Returns the new position. */
  private async startEntry(chunk: Buffer, p: number): Promise<number> {
    const h = this.pending!;
    this.pending = null;
    this.entryName = h.name;
    const data = h.dataSize;
    const pad = roundUp(data) - data;
    const here = chunk.length - p;
    let body: EntryBody;
    if (data <= here) {
      // All the data is in this chunk (or there is none): one slice, no round trips.
      body = new EntryBody(data > 0 ? chunk.subarray(p, p + data) : null, false);
      this.start(h, body);
      await this.settle();
      p += data;
      const skip = Math.min(pad, chunk.length - p);
      p += skip;
      this.due = pad - skip;
      this.state = this.due > 0 ? State.Skip : State.Header;
      return p;
    }
    body = new EntryBody(null, true);
    this.start(h, body);
    this.due = data;
    this.pad = pad;
    this.state = State.Data;
    return p;
  }

  private start(h: TarHeader, body: EntryBody): void {
    this.body = body;
    let promise: Promise<void>;
    try {
      promise = this.handler(h, body);
    } catch (e) {
      promise = Promise.reject(e);
    }
    this.running = promise.then(
      () => body.detach(),
      (e: unknown) => {
        if (!this.failed) {
          this.failed = true;
          this.failure = e;
        }
        body.detach();
      },
    );
  }

  private onExtension(): void {
    const data = this.ext!;
    this.ext = null;
    switch (this.extType) {
      case 0x78: {
        // The last `x` header before an entry is the one that applies (Go).
        const records = parsePaxRecordsRaw(data);
        if (records === null) throw framingError(this.ctx, `malformed PAX header ${quote(this.extName)}`);
        this.pax = records;
        return;
      }
      case 0x67: {
        const records = parsePaxRecordsRaw(data);
        if (records === null) throw framingError(this.ctx, 'malformed PAX global header');
        for (const key of records.keys()) {
          if (!HARMLESS_GLOBAL_KEYS.has(key)) throw framingError(this.ctx, `PAX global header record ${quote(key)} is not supported`);
        }
        // Go returns a global header as an entry of its own: what stood before it is dropped.
        this.pax = null;
        this.longName = null;
        this.longLink = null;
        return;
      }
      case 0x4c:
        this.longName = cstr(data, 0, data.length);
        return;
      case 0x4b:
        this.longLink = cstr(data, 0, data.length);
        return;
    }
  }
}

function roundUp(n: number): number {
  return Math.ceil(n / BLOCK) * BLOCK;
}
