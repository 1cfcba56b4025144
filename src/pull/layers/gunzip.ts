/**
 * Streaming gunzip for `tar+gzip` layers through Intel ISA-L (guestpull's native addon runs
 * `isal_inflate` on the libuv thread pool), about 1.5 times as fast as Node's zlib. Used whenever
 * the addon and libisal.so.2 load (`gunzipImplementation()`); ./inflate.ts falls back to zlib.
 *
 * A pipeline stage (an async generator), shaped like ./zstd.ts:
 *   - output in 1 MiB chunks, each yielded and awaited, so a bomb inflates only as far as the
 *     downstream bound (HashCounter: max_layer_bytes, max_layer_ratio) lets it;
 *   - output buffers are reused: a chunk is written again once the stage after has asked for the
 *     next one (the tar reader holds nothing of it by then: ./tar.ts) and its hash is done. Three
 *     buffers per layer; fresh 1 MiB buffers were page faults and garbage for the collector (a
 *     700 MB layer made 700 of them);
 *   - input read ahead (at most 1 MiB of compressed bytes queued) while the previous call runs,
 *     and handed to each call in batches of up to 1 MiB (network chunks are often 16-64 KiB);
 *   - double-buffered: the next call already runs on the pool while the consumer (tar apply, on
 *     the JavaScript thread) handles the chunk just yielded;
 *   - with `digest`, the diff_id hash is taken on the pool too (OutputDigest), beside the next
 *     inflate, not on the JavaScript thread, where it was about a quarter of a layer's work.
 *
 * Members are read in sequence (pigz, concatenated files). After a member, a zero byte ends the
 * gzip data and the rest of the blob is read but ignored (padding), anything else must be another
 * member: the rule of Node's zlib gunzip, so both paths accept and refuse the same blobs. Corrupt
 * data, a bad header, a CRC-32 or length mismatch, a truncated member and an empty blob are
 * BAD_IMAGE naming the layer; an error of the source is passed on untouched.
 */
import { ErrorCode, GuestpullError } from '../../errors.js';
import { gunzipAvailable, gunzipErrorText, openGunzip, type GunzipStep, type NativeGunzip } from '../../native/index.js';
import type { LayerContext } from './entry.js';

/** Output bytes per native call (and per yielded chunk). */
const OUT_CHUNK = 1024 * 1024;
/** Compressed bytes handed to one native call at most. */
const IN_BATCH = 1024 * 1024;
/**
 * Compressed bytes read ahead of the inflater at most: one call's worth. 4 MiB made no pull
 * faster and kept more network chunks alive (about 15 MiB more resident on a 700 MB layer).
 */
const READ_AHEAD = 1024 * 1024;

const EMPTY = Buffer.alloc(0);

let forced: 'isal' | 'zlib' | null = null;

/** Which gunzip ./inflate.ts uses: 'isal' iff the native addon and ISA-L load. */
export function gunzipImplementation(): 'isal' | 'zlib' {
  return forced ?? (gunzipAvailable() ? 'isal' : 'zlib');
}

/** Tests only: force one implementation (null: back to detection). */
export function setGunzipForTests(impl: 'isal' | 'zlib' | null): void {
  forced = impl;
}

function notGzip(ctx: LayerContext, what: string): GuestpullError {
  return new GuestpullError(
    ErrorCode.BAD_IMAGE,
    `layer ${ctx.layer} of ${ctx.image} is not valid gzip: ${what}; the blob is corrupt or its media type is wrong`,
    { image: ctx.image, layer: ctx.layer },
  );
}

/**
 * Reads the source ahead into a bounded queue, in the background. The first error of the source
 * is kept and thrown, as it was, by the next take.
 */
class ReadAhead {
  /** Compressed bytes the source has delivered. */
  total = 0;
  /** Queued chunks from `head` on (an index, not shift(): a source may deliver millions of tiny chunks). */
  private chunks: Buffer[] = [];
  private head = 0;
  private queued = 0;
  private done = false;
  private failed = false;
  private error: unknown = undefined;
  private discarding = false;
  private stopped = false;
  /**
   * Two reusable batch buffers (small network chunks are copied into one for a call). Only the
   * leftover of the call just completed can be in use when a batch is made, so the other is free.
   */
  private readonly slabs: Buffer[] = [];
  private dataWaiter: (() => void) | null = null;
  private spaceWaiter: (() => void) | null = null;
  private readonly pumping: Promise<void>;

  constructor(
    source: AsyncIterable<Buffer>,
    private readonly limit: number,
  ) {
    this.pumping = this.pump(source);
  }

  private async pump(source: AsyncIterable<Buffer>): Promise<void> {
    try {
      for await (const chunk of source) {
        if (this.stopped) return;
        this.total += chunk.length;
        if (!this.discarding && chunk.length > 0) {
          this.chunks.push(chunk);
          this.queued += chunk.length;
        }
        this.wakeData();
        while (this.queued >= this.limit && !this.stopped && !this.discarding) {
          await new Promise<void>((resolve) => {
            this.spaceWaiter = resolve;
          });
        }
      }
    } catch (e) {
      this.failed = true;
      this.error = e;
    } finally {
      this.done = true;
      this.wakeData();
    }
  }

  private wakeData(): void {
    const w = this.dataWaiter;
    this.dataWaiter = null;
    w?.();
  }

  private wakeSpace(): void {
    const w = this.spaceWaiter;
    this.spaceWaiter = null;
    w?.();
  }

  /** `leftover` plus queued input, up to IN_BATCH bytes (copied together when more than one piece); may be empty. */
  takeNow(leftover: Buffer): Buffer {
    if (this.failed) throw this.error;
    if (this.head === this.chunks.length || leftover.length >= IN_BATCH) return leftover;
    const parts: Buffer[] = leftover.length > 0 ? [leftover] : [];
    let n = leftover.length;
    while (n < IN_BATCH && this.head < this.chunks.length) {
      const c = this.chunks[this.head]!;
      const want = IN_BATCH - n;
      if (c.length <= want) {
        this.chunks[this.head++] = EMPTY; // drop our reference now: the slot may live on until compaction
        parts.push(c);
        n += c.length;
        this.queued -= c.length;
      } else {
        this.chunks[this.head] = c.subarray(want);
        parts.push(c.subarray(0, want));
        n += want;
        this.queued -= want;
      }
    }
    if (this.head === this.chunks.length) {
      this.chunks = [];
      this.head = 0;
    } else if (this.head >= 1024) {
      this.chunks = this.chunks.slice(this.head);
      this.head = 0;
    }
    if (this.queued < this.limit) this.wakeSpace();
    if (parts.length === 1) return parts[0]!;
    const slab = this.freeSlab(leftover);
    let at = 0;
    for (const p of parts) at += p.copy(slab, at);
    return slab.subarray(0, n);
  }

  private freeSlab(inUse: Buffer): Buffer {
    for (const s of this.slabs) if (s.buffer !== inUse.buffer) return s;
    const s = Buffer.allocUnsafeSlow(IN_BATCH);
    this.slabs.push(s);
    return s;
  }

  /** Like takeNow, but waits for input; empty only at the end of the source. */
  async take(leftover: Buffer): Promise<Buffer> {
    for (;;) {
      const b = this.takeNow(leftover);
      if (b.length > 0 || this.done) return b;
      await new Promise<void>((resolve) => {
        this.dataWaiter = resolve;
      });
    }
  }

  /** Read the rest of the source and drop it (its producer verifies the blob digest at its end). */
  async discardRest(): Promise<void> {
    this.discarding = true;
    this.chunks = [];
    this.head = 0;
    this.queued = 0;
    this.wakeSpace();
    await this.pumping;
    if (this.failed) throw this.error;
  }

  /** Stop reading (the stage is being torn down); the pump leaves at its next chunk. */
  stop(): void {
    this.stopped = true;
    this.wakeSpace();
  }
}

/**
 * The digest of the output, computed by the addon on a pool thread while the next inflate runs
 * (the bytes yielded are exactly the bytes hashed, and nothing writes to a chunk once yielded);
 * `done` gets it in hex once the data has ended.
 */
export interface OutputDigest {
  algorithm: 'sha256' | 'sha512';
  done: (hex: string) => void;
}

interface Job {
  input: Buffer;
  output: Buffer;
  step: Promise<GunzipStep>;
}

function launch(gz: NativeGunzip, input: Buffer, output: Buffer): Job {
  const step = gz.run(input, output);
  step.catch(() => {}); // awaited later; never an unhandled rejection while the consumer holds us at a yield
  return { input, output, step };
}

async function firstInput(input: ReadAhead, ctx: LayerContext): Promise<Buffer> {
  const first = await input.take(EMPTY);
  if (first.length === 0) throw notGzip(ctx, 'the blob is empty');
  return first;
}

/** A pipeline stage: gzip-compressed chunks in, decompressed chunks out (through ISA-L). */
export function gunzipStage(ctx: LayerContext, digest?: OutputDigest): (source: AsyncIterable<Buffer>) => AsyncGenerator<Buffer> {
  return async function* gunzip(source: AsyncIterable<Buffer>): AsyncGenerator<Buffer> {
    const input = new ReadAhead(source, READ_AHEAD);
    let gz: NativeGunzip | null = null;
    let job: Job | null = null;
    /** Output buffers free to be written (see the header: when one comes back). */
    const free: Buffer[] = [];
    const output = (): Buffer => free.pop() ?? Buffer.allocUnsafeSlow(OUT_CHUNK);
    /** The hash of the output so far (one at a time, in order, beside the next inflate). */
    let hashing: Promise<void> = Promise.resolve();
    const hashOut = async (g: NativeGunzip, out: Buffer): Promise<void> => {
      await hashing; // at most one chunk waits to be hashed: a slow hash slows the stage, not memory
      if (digest === undefined || out.length === 0) return;
      hashing = g.hash(out);
      hashing.catch(() => undefined); // awaited by the next chunk or at the end
    };
    /** `buf` was yielded and the consumer has asked for more: free once its hash is done. */
    const recycle = (buf: Buffer): void => {
      void hashing.then(
        () => free.push(buf),
        () => undefined,
      );
    };
    const finish = async (g: NativeGunzip): Promise<void> => {
      await hashing;
      digest?.done(g.digest().toString('hex'));
    };
    try {
      gz = openGunzip(digest?.algorithm);
      job = launch(gz, await firstInput(input, ctx), output()); // (no local: the generator would keep the chunk)
      for (;;) {
        const r = await job.step;
        const done: Job = job;
        job = null;
        if (r.code !== 0) throw notGzip(ctx, gunzipErrorText(r.code));
        const out = done.output.subarray(0, r.produced);
        if (r.ended) {
          await hashOut(gz, out);
          if (out.length > 0) yield out;
          recycle(done.output);
          await input.discardRest();
          await finish(gz);
          return;
        }
        const leftover = done.input.subarray(r.consumed);
        const outputFull = r.produced === done.output.length;
        if (!outputFull && leftover.length > 0) throw notGzip(ctx, 'the decoder made no progress');
        // Start the next call before handing this output on, so both run at once.
        const ready = input.takeNow(leftover);
        if (ready.length > 0 || outputFull) job = launch(gz, ready, output());
        await hashOut(gz, out);
        if (out.length > 0) yield out;
        recycle(done.output);
        if (job === null) {
          const more = await input.take(EMPTY);
          if (more.length === 0) {
            if (!r.memberEnd) throw notGzip(ctx, 'the data ends in the middle of a gzip member (truncated)');
            await finish(gz);
            return;
          }
          job = launch(gz, more, output());
        }
      }
    } finally {
      input.stop();
      if (job !== null) await job.step.catch(() => undefined); // never leave a call running on a closed handle
      await hashing.catch(() => undefined);
      gz?.close();
    }
  };
}
