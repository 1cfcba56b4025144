/**
 * The tar reader (src/pull/layers/tar.ts) on its own: the same entries whatever the chunking, no
 * byte of a chunk read after the next chunk was asked for (the contract that lets ISA-L's stage
 * reuse its buffers), and Go's archive/tar reading where it differs from tar-stream's.
 */
import { randomBytes } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { ErrorCode, GuestpullError } from '../../src/errors.js';
import { decodeNumeric, readTar, type EntryBody, type TarHeader } from '../../src/pull/layers/tar.js';
import { dataBlocks, packTar, paxData, rawHeader, rawTar } from './_layers-tar.js';

const ctx = { image: 'registry.test/tar:unit', layer: `sha256:${'cd'.repeat(32)}` };

interface Seen {
  header: Omit<TarHeader, 'paxRaw'>;
  data: string;
}

/**
 * A source that hands out `bytes` in pieces of the given sizes (cycled) and, when asked for the
 * next piece, overwrites the one before with 0xEE: a reader that still looked at it would see garbage.
 */
async function* poisoned(bytes: Buffer, sizes: number[]): AsyncGenerator<Buffer> {
  let at = 0;
  let i = 0;
  while (at < bytes.length) {
    const n = Math.min(sizes[i++ % sizes.length]!, bytes.length - at);
    const piece = Buffer.from(bytes.subarray(at, at + n));
    at += n;
    yield piece;
    piece.fill(0xee);
  }
}

async function readAll(bytes: Buffer, sizes: number[] = [bytes.length || 1], handler?: (h: TarHeader, b: EntryBody) => Promise<void>): Promise<Seen[]> {
  const seen: Seen[] = [];
  await readTar(ctx, handler ?? (async (h, body) => {
    const parts: Buffer[] = [];
    for await (const b of body) parts.push(Buffer.from(b));
    const { paxRaw: _raw, ...header } = h;
    seen.push({ header, data: Buffer.concat(parts).toString('hex') });
  }))(poisoned(bytes, sizes));
  return seen;
}

/** Recompute a raw header's checksum after editing it. */
function resum(b: Buffer, signed = false): Buffer {
  b.fill(0x20, 148, 156);
  let sum = 0;
  for (const x of b) sum += signed ? (x << 24) >> 24 : x;
  b.write(sum.toString(8).padStart(6, '0') + '\0 ', 148, 8, 'latin1');
  return b;
}

async function failure(p: Promise<unknown>): Promise<GuestpullError> {
  const e = await p.then(() => null, (err: unknown) => err);
  expect(e).toBeInstanceOf(GuestpullError);
  expect((e as GuestpullError).code).toBe(ErrorCode.BAD_IMAGE);
  return e as GuestpullError;
}

describe('readTar: chunks', () => {
  it('reads the same entries whatever the chunking, never looking back at a chunk it has passed', async () => {
    const big = randomBytes(1024 * 1024 + 3);
    const t = await packTar([
      { name: 'empty', content: '' },
      { name: 'one', content: 'x' },
      { name: 'block', content: Buffer.alloc(512, 1) },
      { name: 'block-and-one', content: Buffer.alloc(513, 2) },
      { name: 'dir/', type: 'directory' },
      { name: `dir/${'long-name-'.repeat(20)}`, content: 'pax path' },
      { name: 'link', type: 'symlink', linkname: `${'t'.repeat(150)}` },
      { name: 'xattr', content: 'x', pax: { 'SCHILY.xattr.user.k': 'v' } },
      { name: 'big', content: big },
      { name: 'tail', content: randomBytes(700) },
    ]);
    const whole = await readAll(t);
    expect(whole.map((s) => s.header.name)).toEqual(['empty', 'one', 'block', 'block-and-one', 'dir/', `dir/${'long-name-'.repeat(20)}`, 'link', 'xattr', 'big', 'tail']);
    expect(whole.find((s) => s.header.name === 'big')!.data).toBe(big.toString('hex'));
    for (const sizes of [[1], [7], [511], [512], [513], [4096], [1000, 1, 65536, 3], [1024 * 1024]]) {
      expect(await readAll(t, sizes), `chunks of ${sizes.join(',')}`).toEqual(whole);
    }
  });

  it('skips the data a handler does not read, and goes on with the next entry', async () => {
    const t = await packTar([
      { name: 'skipped', content: randomBytes(300_000) },
      { name: 'read', content: 'kept' },
    ]);
    const names: string[] = [];
    let kept = '';
    await readTar(ctx, async (h, body) => {
      names.push(h.name);
      if (h.name === 'read') for await (const b of body) kept += b.toString();
    })(poisoned(t, [4096]));
    expect(names).toEqual(['skipped', 'read']);
    expect(kept).toBe('kept');
  });

  it("stops at a handler's error with that error, after the handler has settled, and runs no later entry", async () => {
    const t = await packTar([{ name: 'a', content: randomBytes(100_000) }, { name: 'b', content: 'b' }]);
    const boom = new Error('handler failed');
    const names: string[] = [];
    let settled = false;
    const err = await readTar(ctx, async (h, body) => {
      names.push(h.name);
      await body.read();
      await new Promise((r) => setTimeout(r, 20));
      settled = true;
      throw boom;
    })(poisoned(t, [1000])).catch((e: unknown) => e);
    expect(err).toBe(boom);
    expect(settled).toBe(true);
    expect(names).toEqual(['a']);
  });

  it("fails a handler's pending read with the source's error, and rejects with the source's error", async () => {
    const t = await packTar([{ name: 'a', content: randomBytes(100_000) }]);
    const cut = new Error('download failed');
    async function* source(): AsyncGenerator<Buffer> {
      yield t.subarray(0, 10_000);
      throw cut;
    }
    let handlerSaw: unknown = null;
    const err = await readTar(ctx, async (_h, body) => {
      try {
        for await (const _ of body) {
          // read on
        }
      } catch (e) {
        handlerSaw = e;
        throw e;
      }
    })(source()).catch((e: unknown) => e);
    expect(err).toBe(cut);
    expect(handlerSaw).toBe(cut);
  });
});

describe("readTar: Go's reading", () => {
  const file = (name: string, body: string, flag = '0'): Buffer[] => [rawHeader({ name, flag, size: body.length }), dataBlocks(body)];

  it('a GNU long name wins over a PAX path (Go merges PAX first, then the GNU names)', async () => {
    const x = paxData({ path: 'from-pax', linkpath: 'pax-target' });
    const l = Buffer.from('from-gnu\0');
    const t = rawTar([
      rawHeader({ name: 'PaxHeader', flag: 'x', size: x.length }), dataBlocks(x),
      rawHeader({ name: '././@LongLink', flag: 'L', size: l.length, format: 'gnu' }), dataBlocks(l),
      rawHeader({ name: 'short', flag: '2', linkname: 'short-target' }),
    ]);
    const [s] = await readAll(t);
    expect(s!.header.name).toBe('from-gnu');
    expect(s!.header.linkname).toBe('pax-target');
  });

  it('an empty GNU long name changes nothing', async () => {
    const empty = Buffer.from('\0');
    const t = rawTar([rawHeader({ name: '././@LongLink', flag: 'L', size: empty.length, format: 'gnu' }), dataBlocks(empty), ...file('kept', 'k')]);
    expect((await readAll(t)).map((s) => s.header.name)).toEqual(['kept']);
  });

  it('an empty PAX value keeps the header field; the last x header before an entry applies', async () => {
    const first = paxData({ path: 'never' });
    const last = paxData({ path: '', uid: '7' });
    const t = rawTar([
      rawHeader({ name: 'P1', flag: 'x', size: first.length }), dataBlocks(first),
      rawHeader({ name: 'P2', flag: 'x', size: last.length }), dataBlocks(last),
      ...file('header-name', 'h'),
    ]);
    const [s] = await readAll(t);
    expect(s!.header.name).toBe('header-name');
    expect(s!.header.pax).toEqual({ path: '', uid: '7' });
  });

  it('a PAX global header ends the extension headers pending before it (Go returns it as an entry)', async () => {
    const x = paxData({ path: 'renamed' });
    const g = paxData({ comment: 'git archive' });
    const t = rawTar([
      rawHeader({ name: 'P', flag: 'x', size: x.length }), dataBlocks(x),
      rawHeader({ name: 'pax_global_header', flag: 'g', size: g.length }), dataBlocks(g),
      ...file('plain', 'p'),
    ]);
    const [s] = await readAll(t);
    expect(s!.header.name).toBe('plain');
    expect(s!.header.pax).toBeNull();
  });

  it('accepts a signed checksum, a V7 header and a STAR prefix', async () => {
    const signed = rawHeader({ name: 'sign\u00e9', flag: '0', size: 1 });
    resum(signed, true);
    const v7 = rawHeader({ name: 'v7-file', flag: '0', size: 2 });
    v7.fill(0, 257, 265); // no magic: V7
    resum(v7);
    const starH = rawHeader({ name: 'star-name', flag: '0', size: 3 });
    starH.write('star-prefix', 345, 'latin1');
    starH.write('tar\0', 508, 'latin1');
    resum(starH);
    const t = rawTar([signed, dataBlocks('s'), v7, dataBlocks('vv'), starH, dataBlocks('sss')]);
    expect((await readAll(t)).map((s) => [s.header.name, Buffer.from(s.data, 'hex').toString()])).toEqual([
      ['sign\u00e9', 's'],
      ['v7-file', 'vv'],
      ['star-prefix/star-name', 'sss'],
    ]);
  });

  it('reads base-256 numbers and refuses fields that do not parse', async () => {
    const b = Buffer.alloc(8);
    b[0] = 0x80;
    b.writeUInt32BE(5_000_000, 4);
    expect(decodeNumeric(b)).toBe(5_000_000);
    expect(decodeNumeric(Buffer.from([0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfe]))).toBe(-2);
    expect(decodeNumeric(Buffer.from(' 0755 \0\0', 'latin1'))).toBe(0o755);
    expect(decodeNumeric(Buffer.from('0758\0', 'latin1'))).toBeNaN();

    const big = rawHeader({ name: 'big-uid', flag: '0', size: 1 });
    b.copy(big, 108);
    resum(big);
    const [s] = await readAll(rawTar([big, dataBlocks('u')]));
    expect(s!.header.uid).toBe(5_000_000);

    const badMode = rawHeader({ name: 'bad-mode', flag: '0', size: 1 });
    badMode.write('0009999\0', 100, 'latin1');
    resum(badMode);
    expect((await failure(readAll(rawTar([badMode, dataBlocks('m')])))).message).toContain('invalid mode');

    const negative = rawHeader({ name: 'negative-size', flag: '0' });
    Buffer.from([0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00]).copy(negative, 124);
    resum(negative);
    expect((await failure(readAll(rawTar([negative])))).message).toContain('invalid size');
  });

  it('header-only types have no data, whatever their size says', async () => {
    // Go skips no data for a symlink: the next header stands right after it.
    const t = rawTar([rawHeader({ name: 's', flag: '2', linkname: 't', size: 700 }), ...file('next', 'n')]);
    const seen = await readAll(t);
    expect(seen.map((s) => [s.header.name, s.header.size, s.header.dataSize])).toEqual([
      ['s', 700, 0],
      ['next', 1, 1],
    ]);
  });

  it('refuses truncated data, a truncated padding, a dangling extension header and data after the end', async () => {
    const [h, d] = file('f', 'abc');
    await failure(readAll(Buffer.concat([h!, d!.subarray(0, 2)])));
    await failure(readAll(Buffer.concat([h!, d!.subarray(0, 100)])));
    const x = paxData({ path: 'p' });
    await failure(readAll(Buffer.concat([rawHeader({ name: 'P', flag: 'x', size: x.length }), dataBlocks(x)])));
    expect((await failure(readAll(Buffer.concat([rawTar(file('a', 'a')), Buffer.from([0, 0, 1])])))).message).toContain('end-of-archive');
    // Zero padding of any length after the end is fine, and so is no end marker at all.
    expect(await readAll(Buffer.concat([rawTar(file('a', 'a')), Buffer.alloc(700)]))).toHaveLength(1);
    expect(await readAll(Buffer.concat(file('a', 'a')))).toHaveLength(1);
  });

  it('bounds an extension header by maxPaxHeaderBytes', async () => {
    const x = paxData({ comment: 'c'.repeat(5000) });
    const t = rawTar([rawHeader({ name: 'P', flag: 'x', size: x.length }), dataBlocks(x), ...file('a', 'a')]);
    const e = await failure(readTar(ctx, async () => {}, { maxPaxHeaderBytes: 4096 })(poisoned(t, [t.length])));
    expect(e.message).toContain('max_pax_header_bytes');
  });
});
