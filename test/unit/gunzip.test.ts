/**
 * gzip layers through inflateInto with BOTH gunzip implementations (ISA-L stage, Node's zlib):
 * sizes from empty to > 8 MiB, several chunkings, multi-member and pigz-like many-member blobs,
 * header fields (name, comment, extra, header CRC) are byte-identical to the input; truncation,
 * corruption, CRC / ISIZE mismatches, non-gzip and empty blobs are BAD_IMAGE naming the layer; bytes
 * after the last member are treated the same by both. ISA-L only: the path is really taken, a
 * bomb stops where the consumer stops without inflating the rest, an early return releases the
 * native handle, the read-ahead is bounded, and a source error comes out as it went in.
 */
import { createHash, randomBytes } from 'node:crypto';
import { Readable } from 'node:stream';
import v8 from 'node:v8';
import vm from 'node:vm';
import zlib from 'node:zlib';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { ErrorCode, GuestpullError } from '../../src/errors.js';
import { gunzipAvailable, gunzipUnavailableReason, openGunzipCount } from '../../src/native/index.js';
import { DEFAULT_LAYER_LIMITS, type LayerLimits } from '../../src/pull/layers/entry.js';
import { gunzipImplementation, gunzipStage, setGunzipForTests } from '../../src/pull/layers/gunzip.js';
import { inflateInto } from '../../src/pull/layers/inflate.js';

/** inflateInto sinks: chunks are valid only until the next is asked for, so a collector copies them. */
const discard = async (src: AsyncIterable<Buffer>): Promise<void> => {
  for await (const _ of src) {
    // nothing
  }
};
const collect = (into: Buffer[]) => async (src: AsyncIterable<Buffer>): Promise<void> => {
  for await (const c of src) into.push(Buffer.from(c));
};

const LAYER = `sha256:${'cd'.repeat(32)}`;
const IMAGE = 'registry.test/gunzip:1';
const ctx = { image: IMAGE, layer: LAYER };
const MiB = 1024 * 1024;
const IMPLS = ['isal', 'zlib'] as const;
type Impl = (typeof IMPLS)[number];

const isal = gunzipAvailable();
if (!isal) console.warn(`gunzip tests: ISA-L tests skipped: ${gunzipUnavailableReason() ?? ''}`);

afterEach(() => {
  setGunzipForTests(null);
});

function sha256(b: Buffer): string {
  return createHash('sha256').update(b).digest('hex');
}

/** Text-like data that compresses about 4:1. */
function compressible(n: number): Buffer {
  const words = ['layer', 'usr/bin/', 'lib', 'x86_64', 'linux', 'gnu', '.so.6', 'etc', 'share', 'doc', '\n', ' '];
  const out = Buffer.allocUnsafe(n);
  let x = 12345;
  let at = 0;
  while (at < n) {
    x = (x * 1103515245 + 12345) >>> 0;
    const w = words[x % words.length]!;
    at += out.write(w + String(x % 97), at);
  }
  return out;
}

/** `b` in pieces of `size` bytes. */
function chunks(b: Buffer, size: number): Buffer[] {
  const out: Buffer[] = [];
  for (let i = 0; i < b.length; i += size) out.push(b.subarray(i, i + size));
  return out;
}

interface Outcome {
  ok: boolean;
  out?: Buffer;
  hex?: string;
  bytes?: number;
  error?: GuestpullError;
}

async function inflate(impl: Impl, pieces: Buffer[], limits: Partial<LayerLimits> = {}, compressedSize?: number): Promise<Outcome> {
  setGunzipForTests(impl);
  const got: Buffer[] = [];
  const sink = collect(got);
  const size = compressedSize ?? pieces.reduce((n, p) => n + p.length, 0);
  try {
    const r = await inflateInto(Readable.from(pieces), sink, {
      compression: 'gzip',
      algorithm: 'sha256',
      compressedSize: size,
      limits: { ...DEFAULT_LAYER_LIMITS, ...limits },
      ctx,
    }, 4 * MiB);
    return { ok: true, out: Buffer.concat(got), hex: r.hex, bytes: r.bytes };
  } catch (e) {
    if (!(e instanceof GuestpullError)) throw e;
    return { ok: false, error: e };
  }
}

function expectBadGzip(o: Outcome): GuestpullError {
  expect(o.ok).toBe(false);
  const e = o.error!;
  expect(e.code).toBe(ErrorCode.BAD_IMAGE);
  expect(e.message).toContain(LAYER);
  expect(e.message).toContain(IMAGE);
  expect(e.message).toContain('not valid gzip');
  return e;
}

function expectSame(o: Outcome, data: Buffer): void {
  expect(o.error?.message).toBeUndefined();
  expect(o.bytes).toBe(data.length);
  expect(o.hex).toBe(sha256(data));
  expect(o.out!.equals(data)).toBe(true);
}

/** A gzip member with every optional header field (FTEXT|FHCRC|FEXTRA|FNAME|FCOMMENT) around `data`. */
function fancyMember(data: Buffer): Buffer {
  const extra = Buffer.from('AB\x04\x00wxyz', 'latin1');
  const head = Buffer.concat([
    Buffer.from([0x1f, 0x8b, 8, 0x1f, 1, 2, 3, 4, 0, 3]),
    Buffer.from([extra.length, 0]),
    extra,
    Buffer.from('layer.tar\0comment here\0', 'latin1'),
  ]);
  const hcrc = Buffer.alloc(2);
  hcrc.writeUInt16LE(zlib.crc32(head) & 0xffff);
  const trailer = Buffer.alloc(8);
  trailer.writeUInt32LE(zlib.crc32(data), 0);
  trailer.writeUInt32LE(data.length >>> 0, 4);
  return Buffer.concat([head, hcrc, zlib.deflateRawSync(data), trailer]);
}

describe.each(IMPLS)('gunzip (%s): good blobs are byte-identical', (impl) => {
  it.skipIf(impl === 'isal' && !isal)('sizes from empty to 9 MiB, random and compressible, in several chunkings', async () => {
    const inputs = [
      Buffer.alloc(0),
      Buffer.from('x'),
      randomBytes(100_000),
      compressible(3 * MiB + 17),
      Buffer.concat([randomBytes(4 * MiB), compressible(5 * MiB)]),
    ];
    for (const data of inputs) {
      const gz = zlib.gzipSync(data, { level: 6 });
      for (const size of [gz.length, 65_536, 1_000]) {
        if (size === 1_000 && gz.length > 2 * MiB) continue; // tiny pieces of a big blob add time, not coverage
        expectSame(await inflate(impl, chunks(gz, size)), data);
      }
    }
  });

  it.skipIf(impl === 'isal' && !isal)('stored (level 0) and level 9 data, one byte at a time for a small blob', async () => {
    const data = compressible(200_000);
    expectSame(await inflate(impl, [zlib.gzipSync(data, { level: 0 })]), data);
    expectSame(await inflate(impl, chunks(zlib.gzipSync(data, { level: 9 }), 65_536)), data);
    const small = compressible(3000);
    expectSame(await inflate(impl, chunks(zlib.gzipSync(small), 1)), small);
  });

  it.skipIf(impl === 'isal' && !isal)('multi-member blobs, members split across chunks, and pigz-like many small members', async () => {
    const parts = [compressible(1 * MiB), randomBytes(70_000), Buffer.alloc(0), compressible(2 * MiB + 5)];
    const gz = Buffer.concat(parts.map((p) => zlib.gzipSync(p)));
    for (const size of [gz.length, 65_536, 999]) expectSame(await inflate(impl, chunks(gz, size)), Buffer.concat(parts));

    const data = compressible(3 * MiB);
    const many = Buffer.concat(chunks(data, 1024).map((c) => zlib.gzipSync(c)));
    expectSame(await inflate(impl, chunks(many, 65_536)), data);
  });

  it.skipIf(impl === 'isal' && !isal)('a header with name, comment, extra field and header CRC', async () => {
    const data = compressible(300_000);
    const blob = Buffer.concat([fancyMember(data), fancyMember(data.subarray(0, 1000))]);
    for (const size of [blob.length, 7]) expectSame(await inflate(impl, chunks(blob, size)), Buffer.concat([data, data.subarray(0, 1000)]));
    const small = Buffer.concat([fancyMember(data.subarray(0, 5000)), fancyMember(Buffer.alloc(0))]);
    expectSame(await inflate(impl, chunks(small, 1)), data.subarray(0, 5000)); // every header field split
  });
});

describe.each(IMPLS)('gunzip (%s): bad blobs are BAD_IMAGE naming the layer', (impl) => {
  const data = compressible(2 * MiB);
  const gz = zlib.gzipSync(data);

  it.skipIf(impl === 'isal' && !isal)('truncated at several points (header, deflate data, trailer)', async () => {
    for (const at of [1, 5, 10, 200, gz.length >> 1, gz.length - 8, gz.length - 5, gz.length - 1]) {
      for (const size of [at, 4096]) expectBadGzip(await inflate(impl, chunks(gz.subarray(0, at), size)));
    }
    const second = Buffer.concat([gz, gz.subarray(0, 100)]);
    expectBadGzip(await inflate(impl, [second]));
  });

  it.skipIf(impl === 'isal' && !isal)('a flipped byte in the deflate data, a wrong CRC-32, a wrong ISIZE, a bad header CRC', async () => {
    const flipped = Buffer.from(gz);
    flipped[gz.length >> 1] ^= 0x55;
    expectBadGzip(await inflate(impl, [flipped]));

    const badCrc = Buffer.from(gz);
    badCrc.writeUInt32LE((badCrc.readUInt32LE(gz.length - 8) ^ 1) >>> 0, gz.length - 8);
    expectBadGzip(await inflate(impl, chunks(badCrc, 65_536)));

    const badSize = Buffer.from(gz);
    badSize.writeUInt32LE(data.length + 1, gz.length - 4);
    expectBadGzip(await inflate(impl, [badSize]));

    const fancy = fancyMember(data.subarray(0, 5000));
    fancy[fancy.indexOf('comment here\0', 0, 'latin1') + 13] ^= 1; // the header CRC
    expectBadGzip(await inflate(impl, [fancy]));
    expectBadGzip(await inflate(impl, chunks(fancy, 3)));

    const reserved = Buffer.from(gz);
    reserved[3] |= 0x20; // a reserved FLG bit
    expectBadGzip(await inflate(impl, [reserved]));
  });

  it.skipIf(impl === 'isal' && !isal)('not gzip at all, a non-deflate method, an empty blob', async () => {
    expectBadGzip(await inflate(impl, [Buffer.from('this is a plain tar file, honestly')]));
    expectBadGzip(await inflate(impl, [Buffer.from([0x28, 0xb5, 0x2f, 0xfd, 0, 0, 0, 0])])); // zstd magic
    const method = Buffer.from(gz);
    method[2] = 7;
    expectBadGzip(await inflate(impl, [method]));
    expectBadGzip(await inflate(impl, []));
    expectBadGzip(await inflate(impl, [Buffer.alloc(0)]));
    expectBadGzip(await inflate(impl, [Buffer.alloc(1024)])); // zeros before any member
  });
});

describe('gunzip: bytes after the last member', () => {
  const a = compressible(600_000);
  const b = Buffer.from('second member');
  const gzA = zlib.gzipSync(a);
  const gzB = zlib.gzipSync(b);
  // [name, blob, expected output or null for BAD_IMAGE]: Node's zlib rule, measured on Node 20:
  // a zero byte after a member ends the data (the rest, whatever it is, is ignored), other bytes
  // must begin a member.
  const cases: Array<[string, Buffer, Buffer | null]> = [
    ['zero padding', Buffer.concat([gzA, Buffer.alloc(512)]), a],
    ['zeros then garbage', Buffer.concat([gzA, Buffer.alloc(3), Buffer.from('garbage!')]), a],
    ['zeros then another member (ignored)', Buffer.concat([gzA, Buffer.alloc(1), gzB]), a],
    ['two members', Buffer.concat([gzA, gzB]), Buffer.concat([a, b])],
    ['garbage', Buffer.concat([gzA, Buffer.from('garbage!')]), null],
    ['one 0xff byte', Buffer.concat([gzA, Buffer.from([0xff])]), null],
    ['a lone 0x1f', Buffer.concat([gzA, Buffer.from([0x1f])]), null],
    ['magic and nothing more', Buffer.concat([gzA, Buffer.from([0x1f, 0x8b])]), null],
  ];

  it.skipIf(!isal).each(cases)('%s: both implementations agree', async (_name, blob, expected) => {
    // Whole, and split right after the first member (where the trailing bytes arrive on their own).
    for (const pieces of [[blob], [blob.subarray(0, gzA.length), blob.subarray(gzA.length)]]) {
      const results: Outcome[] = [];
      for (const impl of IMPLS) results.push(await inflate(impl, pieces));
      const [viaIsal, viaZlib] = results as [Outcome, Outcome];
      expect(viaIsal.ok).toBe(viaZlib.ok);
      if (expected === null) {
        expectBadGzip(viaIsal);
        expectBadGzip(viaZlib);
      } else {
        expectSame(viaIsal, expected);
        expectSame(viaZlib, expected);
      }
    }
  });
});

describe.skipIf(!isal)('gunzip through ISA-L', () => {
  it('is the implementation inflateInto uses on this machine, and its errors say so', async () => {
    expect(gunzipImplementation()).toBe('isal');
    const gz = zlib.gzipSync(compressible(100_000));
    gz.writeUInt32LE((gz.readUInt32LE(gz.length - 8) ^ 1) >>> 0, gz.length - 8);
    // ISA-L's checksum message vs zlib's "incorrect data check": proves which path ran.
    expect(expectBadGzip(await inflate('isal', [gz])).message).toContain('CRC-32');
    expect(expectBadGzip(await inflate('zlib', [gz])).message).toContain('incorrect data check');
    setGunzipForTests(null);
    const sink: Buffer[] = [];
    await expect(
      inflateInto(Readable.from([gz]), collect(sink), {
        compression: 'gzip', algorithm: 'sha256', compressedSize: gz.length, limits: DEFAULT_LAYER_LIMITS, ctx,
      }, MiB),
    ).rejects.toThrow(/CRC-32/);
  });

  it('a 1 GiB bomb stops where the consumer stops, without inflating the rest', async () => {
    const zeros = zlib.gzipSync(Buffer.alloc(64 * MiB), { level: 9 });
    const bomb = Buffer.concat(Array.from({ length: 16 }, () => zeros)); // 1 GiB of zeros in ~1 MB
    expect(bomb.length).toBeLessThan(2 * MiB);
    const rssBefore = process.memoryUsage().rss;
    const started = performance.now();
    let seen = 0;
    let chunksSeen = 0;
    for await (const c of gunzipStage(ctx)(Readable.from(chunks(bomb, 65_536)))) {
      expect(c.length).toBeLessThanOrEqual(MiB);
      seen += c.length;
      chunksSeen++;
      if (seen >= 8 * MiB) break;
    }
    expect(seen).toBe(8 * MiB);
    expect(chunksSeen).toBe(8);
    expect(performance.now() - started).toBeLessThan(2000);
    expect(process.memoryUsage().rss - rssBefore).toBeLessThan(128 * MiB);
    expect(openGunzipCount()).toBe(0);

    // Through inflateInto, the layer bound stops it.
    const o = await inflate('isal', chunks(bomb, 65_536), { maxUncompressedBytes: 16 * MiB }, bomb.length);
    expect(o.error?.code).toBe(ErrorCode.BAD_IMAGE);
    expect(o.error?.message).toMatch(/inflates to more than 16777216 bytes/);
    // pipeline() settles before it has closed the generator stage; the handle follows within a call.
    await vi.waitFor(() => expect(openGunzipCount()).toBe(0), { timeout: 1000, interval: 5 });
  });

  it('an early return releases the native handle; the read-ahead stays bounded', async () => {
    const data = randomBytes(24 * MiB); // stored blocks: ~1 compressed byte per output byte
    const gz = zlib.gzipSync(data, { level: 1 });
    let pulled = 0;
    async function* source(): AsyncGenerator<Buffer> {
      for (const c of chunks(gz, 65_536)) {
        pulled += c.length;
        yield c;
      }
    }
    const it = gunzipStage(ctx)(source());
    const first = await it.next();
    expect(first.done).toBe(false);
    const head = first.value as Buffer;
    expect(head.length).toBeGreaterThan(0);
    expect(head.equals(data.subarray(0, head.length))).toBe(true);
    expect(openGunzipCount()).toBe(1);
    await new Promise((r) => setTimeout(r, 200)); // the stage reads ahead while we hold it
    expect(pulled).toBeGreaterThan(MiB);
    expect(pulled).toBeLessThanOrEqual(4 * MiB); // two calls' input + the 1 MiB read-ahead + a chunk
    await it.return(undefined);
    expect(openGunzipCount()).toBe(0);
    expect(pulled).toBeLessThan(gz.length);
  });

  it('does not keep source chunks it has handed to ISA-L', async () => {
    v8.setFlagsFromString('--expose-gc');
    const gc = vm.runInNewContext('gc') as () => void;
    const gz = zlib.gzipSync(randomBytes(40 * MiB), { level: 1 });
    let first: WeakRef<Buffer> | undefined;
    async function* source(): AsyncGenerator<Buffer> {
      for (let i = 0; i < gz.length; i += 16_384) {
        const c = Buffer.from(gz.subarray(i, i + 16_384)); // a copy: only the stage refers to it
        first ??= new WeakRef(c);
        yield c;
      }
    }
    let seen = 0;
    for await (const c of gunzipStage(ctx)(source())) {
      seen += c.length;
      if (seen >= 16 * MiB) {
        await new Promise((r) => setImmediate(r));
        gc();
        expect(first?.deref()).toBeUndefined(); // 1000+ chunks later the first is garbage
        break;
      }
    }
    expect(seen).toBeGreaterThanOrEqual(16 * MiB);
  });

  it("a source error comes out as the source's own error", async () => {
    const gz = zlib.gzipSync(randomBytes(3 * MiB));
    const boom = new Error('connection reset by peer');
    async function* source(): AsyncGenerator<Buffer> {
      yield gz.subarray(0, 2 * MiB);
      throw boom;
    }
    const got: Buffer[] = [];
    const run = async (): Promise<void> => {
      for await (const c of gunzipStage(ctx)(source())) got.push(c);
    };
    await expect(run()).rejects.toBe(boom);
    expect(openGunzipCount()).toBe(0);

    // Through inflateInto both implementations classify it as a failed download of the layer.
    for (const impl of IMPLS) {
      setGunzipForTests(impl);
      const src = new Readable({ read() {} });
      src.push(gz.subarray(0, MiB));
      setTimeout(() => src.destroy(boom), 20);
      const err = await inflateInto(src, discard, {
        compression: 'gzip', algorithm: 'sha256', compressedSize: gz.length, limits: DEFAULT_LAYER_LIMITS, ctx,
      }, MiB).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(GuestpullError);
      expect((err as GuestpullError).message).toContain(`downloading layer ${LAYER}`);
      expect((err as GuestpullError).cause).toBe(boom);
    }
  });
});
