/**
 * applyLayer: compression, diff_id verification, tar dialects (PAX and GNU long names) and tar
 * framing that tar-stream and Go's archive/tar would read differently.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { PassThrough, Readable } from 'node:stream';
import zlib from 'node:zlib';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { ErrorCode, GuestpullError } from '../../src/errors.js';
import { MediaType } from '../../src/oci.js';
import { applyTar, dataBlocks, LAYER_DIGEST, packTar, paxData, rawHeader, rawTar, sha256, listTree } from './_layers-tar.js';

let base: string;
let root: string;

beforeEach(() => {
  base = fs.mkdtempSync(path.join(os.tmpdir(), 'gp-layers-format-'));
  root = path.join(base, 'rootfs');
  fs.mkdirSync(root);
});
afterEach(() => {
  fs.rmSync(base, { recursive: true, force: true });
});

const at = (p: string): string => path.join(root, p);
const tree = (): string[] => listTree(root);

describe('applyLayer: compression and digests', () => {
  it('applies an uncompressed layer and reports entries and bytes', async () => {
    const t = await packTar([{ name: 'a', content: 'hello' }]);
    const r = await applyTar(root, t, { gzip: false });
    expect(r).toMatchObject({ entries: 1, uncompressedBytes: t.length });
    expect(fs.readFileSync(at('a'), 'utf8')).toBe('hello');
  });

  it('applies a Docker media type gzip layer made of several gzip members', async () => {
    const t = await packTar([
      { name: 'one', content: 'first member' },
      { name: 'two', content: Buffer.alloc(300_000, 7) },
    ]);
    const cut = 700;
    const blob = Buffer.concat([zlib.gzipSync(t.subarray(0, cut)), zlib.gzipSync(t.subarray(cut, 200_000)), zlib.gzipSync(t.subarray(200_000))]);
    const r = await applyTar(root, t, { blob, mediaType: MediaType.DOCKER_LAYER_GZIP });
    expect(r.uncompressedBytes).toBe(t.length);
    expect(fs.readFileSync(at('one'), 'utf8')).toBe('first member');
    expect(fs.readFileSync(at('two')).equals(Buffer.alloc(300_000, 7))).toBe(true);
  });

  it('fails a truncated gzip stream with BAD_IMAGE', async () => {
    const t = await packTar([{ name: 'a', content: Buffer.alloc(100_000, 1) }]);
    const gz = zlib.gzipSync(t);
    await expect(applyTar(root, t, { blob: gz.subarray(0, gz.length - 100) })).rejects.toMatchObject({
      code: 'BAD_IMAGE',
      message: expect.stringContaining('is not valid gzip'),
    });
  });

  it('fails bytes that are not gzip with BAD_IMAGE', async () => {
    const t = await packTar([{ name: 'a', content: 'a' }]);
    await expect(applyTar(root, t, { blob: t })).rejects.toMatchObject({ code: 'BAD_IMAGE', message: expect.stringContaining(LAYER_DIGEST) });
  });

  it('fails a diff_id mismatch with DIGEST_MISMATCH naming the layer, expected and actual', async () => {
    const t = await packTar([{ name: 'a', content: 'a' }]);
    const wrong = `sha256:${'0'.repeat(64)}`;
    const err = await applyTar(root, t, { diffId: wrong }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(GuestpullError);
    const ge = err as GuestpullError;
    expect(ge.code).toBe(ErrorCode.DIGEST_MISMATCH);
    expect(ge.message).toContain(LAYER_DIGEST);
    expect(ge.message).toContain(wrong);
    expect(ge.message).toContain(sha256(t));
  });

  it('hashes every decompressed byte, including padding after the end-of-archive blocks', async () => {
    const t = await packTar([{ name: 'a', content: 'a' }]);
    const padded = Buffer.concat([t, Buffer.alloc(10240)]);
    await expect(applyTar(root, padded, { diffId: sha256(t) })).rejects.toMatchObject({ code: 'DIGEST_MISMATCH' });
    const r = await applyTar(root, padded);
    expect(r.uncompressedBytes).toBe(padded.length);
  });

  it('accepts a sha512 diff_id', async () => {
    const t = await packTar([{ name: 'a', content: 'a' }]);
    const { createHash } = await import('node:crypto');
    await applyTar(root, t, { diffId: `sha512:${createHash('sha512').update(t).digest('hex')}` });
    expect(tree()).toEqual(['a']);
  });

  it('refuses unknown media types and invalid diff_ids (BAD_IMAGE) before reading', async () => {
    const t = await packTar([{ name: 'a', content: 'a' }]);
    await expect(applyTar(root, t, { mediaType: 'application/vnd.example+bzip2' })).rejects.toMatchObject({ code: 'BAD_IMAGE' });
    await expect(applyTar(root, t, { diffId: 'sha256:nothex' })).rejects.toMatchObject({ code: 'BAD_IMAGE' });
    expect(tree()).toEqual([]);
  });

  it('propagates an error of the source stream (the producer digest check) as it is', async () => {
    const t = await packTar([{ name: 'a', content: Buffer.alloc(200_000, 3) }]);
    const gz = zlib.gzipSync(t);
    const source = new PassThrough();
    source.write(gz.subarray(0, 1000));
    setTimeout(() => source.destroy(new GuestpullError(ErrorCode.DIGEST_MISMATCH, 'blob digest mismatch from producer')), 20);
    await expect(applyTar(root, t, { source })).rejects.toMatchObject({ code: 'DIGEST_MISMATCH', message: 'blob digest mismatch from producer' });
  });

  it('stops on abort with CANCELLED', async () => {
    const t = await packTar([{ name: 'a', content: 'a' }]);
    const ac = new AbortController();
    const source = new PassThrough();
    source.write(zlib.gzipSync(t).subarray(0, 10));
    setTimeout(() => ac.abort(), 20);
    await expect(applyTar(root, t, { source, signal: ac.signal })).rejects.toMatchObject({ code: 'CANCELLED' });
    await expect(applyTar(root, t, { signal: AbortSignal.abort() })).rejects.toMatchObject({ code: 'CANCELLED' });
  });

  it('streams a large file to disk in pieces (content intact)', async () => {
    const big = Buffer.alloc(5 * 1024 * 1024 + 123);
    for (let i = 0; i < big.length; i++) big[i] = (i * 31 + (i >> 12)) & 0xff;
    const t = await packTar([{ name: 'big', content: big, mode: 0o600 }]);
    await applyTar(root, t, { source: Readable.from(chunks(zlib.gzipSync(t), 777), { objectMode: false }) });
    expect(fs.readFileSync(at('big')).equals(big)).toBe(true);
  });
});

function chunks(b: Buffer, n: number): Buffer[] {
  const out: Buffer[] = [];
  for (let i = 0; i < b.length; i += n) out.push(b.subarray(i, i + n));
  return out;
}

describe('applyLayer: long names', () => {
  const longDir = `${'d'.repeat(60)}/${'e'.repeat(60)}/${'f'.repeat(60)}`;
  const longName = `${longDir}/${'n'.repeat(150)}`;

  it('PAX long names and link names (tar-stream pack)', async () => {
    await applyTar(
      root,
      await packTar([
        { name: longName, content: 'long' },
        { name: 'short-sym', type: 'symlink', linkname: `/${longName}` },
        { name: `${longDir}/hardlink-${'h'.repeat(120)}`, type: 'link', linkname: longName },
      ]),
    );
    expect(fs.readFileSync(at(longName), 'utf8')).toBe('long');
    expect(fs.readlinkSync(at('short-sym'))).toBe(`/${longName}`);
    expect(fs.lstatSync(at(`${longDir}/hardlink-${'h'.repeat(120)}`)).ino).toBe(fs.lstatSync(at(longName)).ino);
  });

  it('GNU long names and link names (L and K headers)', async () => {
    const name = Buffer.from(`${longName}\0`);
    const target = Buffer.from(`../${'t'.repeat(130)}\0`);
    const t = rawTar([
      rawHeader({ name: '././@LongLink', flag: 'L', size: name.length, format: 'gnu' }),
      dataBlocks(name),
      rawHeader({ name: longName.slice(0, 100), flag: '0', size: 4, mode: 0o640, format: 'gnu' }),
      dataBlocks('gnu!'),
      rawHeader({ name: '././@LongLink', flag: 'K', size: target.length, format: 'gnu' }),
      dataBlocks(target),
      rawHeader({ name: 'gnu-sym', flag: '2', linkname: 'x'.repeat(100), format: 'gnu' }),
    ]);
    await applyTar(root, t);
    expect(fs.readFileSync(at(longName), 'utf8')).toBe('gnu!');
    expect((fs.lstatSync(at(longName)).mode & 0o7777).toString(8)).toBe('640');
    expect(fs.readlinkSync(at('gnu-sym'))).toBe(`../${'t'.repeat(130)}`);
  });
});

describe('applyLayer: framing tar-stream and Go would read differently', () => {
  const file = (name: string, body: string): Buffer[] => [rawHeader({ name, flag: '0', size: body.length }), dataBlocks(body)];

  it('accepts trailing zero padding after the end-of-archive marker', async () => {
    await applyTar(root, Buffer.concat([rawTar(file('a', 'a')), Buffer.alloc(8192)]));
    expect(tree()).toEqual(['a']);
  });

  it('refuses an entry after the end-of-archive marker', async () => {
    const t = Buffer.concat([rawTar(file('a', 'a')), ...file('hidden', 'h'), Buffer.alloc(1024)]);
    await expect(applyTar(root, t)).rejects.toMatchObject({ code: 'BAD_IMAGE', message: expect.stringContaining('end-of-archive') });
    expect(fs.existsSync(at('hidden'))).toBe(false);
  });

  it('refuses an entry after a single zero block', async () => {
    const t = rawTar([...file('a', 'a'), Buffer.alloc(512), ...file('hidden', 'h')]);
    await expect(applyTar(root, t)).rejects.toMatchObject({ code: 'BAD_IMAGE' });
    expect(fs.existsSync(at('hidden'))).toBe(false);
  });

  it('refuses garbage after the end-of-archive marker', async () => {
    const t = Buffer.concat([rawTar(file('a', 'a')), Buffer.alloc(512, 0x41)]);
    await expect(applyTar(root, t)).rejects.toMatchObject({ code: 'BAD_IMAGE' });
  });

  it('refuses a PAX global header that renames entries, accepts a comment-only one', async () => {
    const g = paxData({ path: 'renamed' });
    const bad = rawTar([rawHeader({ name: 'pax_global_header', flag: 'g', size: g.length }), dataBlocks(g), ...file('a', 'a')]);
    await expect(applyTar(root, bad)).rejects.toMatchObject({ code: 'BAD_IMAGE', message: expect.stringContaining('global') });
    const c = paxData({ comment: 'built by git archive' });
    const ok = rawTar([rawHeader({ name: 'pax_global_header', flag: 'g', size: c.length }), dataBlocks(c), ...file('a', 'a')]);
    await applyTar(root, ok);
    expect(tree()).toEqual(['a']);
  });

  it('applies a PAX header (x) with path and uid records', async () => {
    const x = paxData({ path: 'from/pax', uid: '4000000' });
    await applyTar(root, rawTar([rawHeader({ name: 'PaxHeader', flag: 'x', size: x.length }), dataBlocks(x), ...file('ignored', 'p')]));
    expect(tree()).toEqual(['from', 'from/pax']);
    if (process.getuid?.() === 0) expect(fs.lstatSync(at('from/pax')).uid).toBe(4000000);
  });

  it('refuses an unknown extension header type before an entry', async () => {
    const n = Buffer.from('old-gnu-name\0');
    const t = rawTar([rawHeader({ name: '././@LongLink', flag: 'N', size: n.length, format: 'gnu' }), dataBlocks(n), ...file('a', 'a')]);
    await expect(applyTar(root, t)).rejects.toMatchObject({ code: 'BAD_IMAGE' });
    expect(tree()).toEqual([]);
  });

  it("reads a '0' entry named like a directory as a file, as Go does", async () => {
    await applyTar(root, rawTar([rawHeader({ name: 'looks-like-dir/', flag: '0', size: 1 }), dataBlocks('f')]));
    expect(fs.lstatSync(at('looks-like-dir')).isFile()).toBe(true);
    expect(fs.readFileSync(at('looks-like-dir'), 'utf8')).toBe('f');
  });

  it("reads a legacy NUL-typed entry named like a directory as a directory, as Go does", async () => {
    await applyTar(root, rawTar([rawHeader({ name: 'old-dir/', flag: '\0', mode: 0o750 }), ...file('old-dir/f', 'x')]));
    expect(fs.lstatSync(at('old-dir')).isDirectory()).toBe(true);
    expect(tree()).toEqual(['old-dir', 'old-dir/f']);
  });

  it('refuses a symlink with data (Go skips no data for it, tar-stream does)', async () => {
    const t = rawTar([rawHeader({ name: 's', flag: '2', linkname: 't', size: 512 }), dataBlocks(Buffer.alloc(512, 0x41))]);
    await expect(applyTar(root, t)).rejects.toMatchObject({ code: 'BAD_IMAGE' });
    expect(tree()).toEqual([]);
  });

  it('fails a tar cut in the middle of a file with BAD_IMAGE', async () => {
    const t = await packTar([{ name: 'a', content: Buffer.alloc(4096, 1) }]);
    await expect(applyTar(root, t.subarray(0, 2048))).rejects.toMatchObject({ code: 'BAD_IMAGE' });
  });

  it('fails a corrupt header checksum with BAD_IMAGE', async () => {
    const h = rawHeader({ name: 'a', flag: '0', size: 1 });
    h[0] = 0x62; // 'b': checksum no longer matches
    await expect(applyTar(root, rawTar([h, dataBlocks('a')]))).rejects.toMatchObject({ code: 'BAD_IMAGE' });
  });
});

describe('applyLayer: the rootfs argument', () => {
  it('fails with a GuestpullError when the rootfs does not exist', async () => {
    const t = await packTar([{ name: 'a', content: 'a' }]);
    const err = await applyTar(path.join(base, 'missing'), t).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(GuestpullError);
    expect((err as GuestpullError).message).toContain('missing');
  });
});

describe('applyLayer: archives without end-of-archive blocks', () => {
  it('applies them (as Go does) and still reports a failing last entry', async () => {
    const good = Buffer.concat([rawHeader({ name: 'a', flag: '0', size: 1 }), dataBlocks('a'), rawHeader({ name: 'd/', flag: '5' })]);
    await applyTar(root, good);
    expect(tree()).toEqual(['a', 'd']);
    const bad = Buffer.concat([rawHeader({ name: 'b', flag: '0', size: 1 }), dataBlocks('b'), rawHeader({ name: 'hl', flag: '1', linkname: 'missing' })]);
    await expect(applyTar(root, bad)).rejects.toMatchObject({ code: 'BAD_IMAGE', message: expect.stringContaining('does not exist') });
  });
});
