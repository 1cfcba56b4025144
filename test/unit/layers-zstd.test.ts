/**
 * applyLayer on `tar+zstd` layers: blobs made by the real zstd CLI and by zstd-napi, single and
 * multi-frame (with a skippable frame), verified against the diff_id; corrupt, truncated, empty
 * and oversized-window blobs are BAD_IMAGE; a zstd bomb stops at its bound with memory to spare.
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { CompressStream, compress } from 'zstd-napi';
import { MediaType } from '../../src/oci.js';
import { applyTar, listTree, packTar, rawHeader, sha256 } from './_layers-tar.js';

let base: string;
let root: string;

beforeEach(() => {
  base = fs.mkdtempSync(path.join(os.tmpdir(), 'guestpull-zstd-'));
  root = path.join(base, 'rootfs');
  fs.mkdirSync(root);
});
afterEach(() => {
  fs.rmSync(base, { recursive: true, force: true });
});

const at = (p: string): string => path.join(root, p);

/** The zstd command line tool, reading `input` from stdin (so frames carry no content size). */
function zstdCli(input: Buffer, ...args: string[]): Buffer {
  return execFileSync('zstd', ['-q', '-c', ...args], { input, maxBuffer: 64 * 1024 * 1024 });
}

/** A skippable frame (magic 0x184D2A50..5F) with `data` as its user data. */
function skippableFrame(data: Buffer): Buffer {
  const h = Buffer.alloc(8);
  h.writeUInt32LE(0x184d2a53, 0);
  h.writeUInt32LE(data.length, 4);
  return Buffer.concat([h, data]);
}

async function sampleTar(): Promise<Buffer> {
  return packTar([
    { name: 'etc/', type: 'directory' },
    { name: 'etc/hostname', content: 'zstd-layer\n' },
    { name: 'bin/', type: 'directory' },
    { name: 'bin/tool', content: Buffer.from(Array.from({ length: 400_000 }, (_, i) => (i * 7919) % 251)), mode: 0o755 },
    { name: 'bin/link', type: 'symlink', linkname: 'tool' },
  ]);
}

function expectSample(): void {
  expect(listTree(root)).toEqual(['bin', 'bin/link', 'bin/tool', 'etc', 'etc/hostname']);
  expect(fs.readFileSync(at('etc/hostname'), 'utf8')).toBe('zstd-layer\n');
  const tool = fs.readFileSync(at('bin/tool'));
  expect(tool.length).toBe(400_000);
  expect(tool[1000]).toBe((1000 * 7919) % 251);
  expect(fs.statSync(at('bin/tool')).mode & 0o777).toBe(0o755);
  expect(fs.readlinkSync(at('bin/link'))).toBe('tool');
}

describe('applyLayer: zstd layers', () => {
  it('applies a layer compressed by the zstd CLI (with checksum) and verifies its diff_id', async () => {
    const t = await sampleTar();
    const blob = zstdCli(t, '-19', '--check');
    expect(blob.readUInt32LE(0)).toBe(0xfd2fb528);
    const r = await applyTar(root, t, { blob, mediaType: MediaType.OCI_LAYER_ZSTD });
    expect(r).toMatchObject({ entries: 5, uncompressedBytes: t.length });
    expectSample();
  });

  it('applies a multi-frame layer (with a skippable frame) delivered in small chunks', async () => {
    const t = await sampleTar();
    const cuts = [0, 300, 1024, 200_000, t.length];
    const frames: Buffer[] = [];
    for (let i = 0; i + 1 < cuts.length; i++) {
      frames.push(compress(t.subarray(cuts[i], cuts[i + 1])));
      if (i === 1) frames.push(skippableFrame(Buffer.from('not layer data')));
    }
    const blob = Buffer.concat(frames);
    const chunks: Buffer[] = [];
    for (let i = 0; i < blob.length; i += 777) chunks.push(blob.subarray(i, i + 777));
    const r = await applyTar(root, t, {
      blob,
      source: Readable.from(chunks, { objectMode: false }),
      mediaType: MediaType.OCI_LAYER_ND_ZSTD,
    });
    expect(r.uncompressedBytes).toBe(t.length);
    expectSample();
  });

  it('fails a diff_id mismatch with DIGEST_MISMATCH', async () => {
    const t = await sampleTar();
    const other = await packTar([{ name: 'x', content: 'x' }]);
    await expect(applyTar(root, t, { blob: compress(t), mediaType: MediaType.OCI_LAYER_ZSTD, diffId: sha256(other) })).rejects.toMatchObject({
      code: 'DIGEST_MISMATCH',
    });
  });

  it('fails corrupt, truncated, empty and non-zstd blobs with BAD_IMAGE', async () => {
    const t = await sampleTar();
    const good = zstdCli(t, '--check');
    const corrupt = Buffer.from(good);
    for (let i = 100; i < 140; i++) corrupt[i] = corrupt[i]! ^ 0x5a;
    // Corrupt bytes zstd does not notice at once (its checksum is at the frame's end) inflate to
    // garbage, and the tar reader, which takes each chunk before the next is inflated, may see it first.
    const cases: Array<[string, Buffer, RegExp]> = [
      ['corrupt', corrupt, /not valid zstd|not a well-formed tar archive: a header checksum does not match/],
      ['truncated', good.subarray(0, good.length - 10), /middle of a frame/],
      ['empty', Buffer.alloc(0), /empty/],
      ['gzip bytes', Buffer.from('1f8b0800000000000003', 'hex'), /not valid zstd/],
    ];
    for (const [what, blob, text] of cases) {
      const dir = path.join(base, what.replace(/ /g, '-'));
      fs.mkdirSync(dir);
      await expect(applyTar(dir, t, { blob, mediaType: MediaType.OCI_LAYER_ZSTD }), what).rejects.toMatchObject({
        code: 'BAD_IMAGE',
        message: expect.stringMatching(text),
      });
    }
  });

  it('refuses a frame that needs a window above 128 MiB', async () => {
    const t = await sampleTar();
    const blob = zstdCli(t, '--long=30');
    await expect(applyTar(root, t, { blob, mediaType: MediaType.OCI_LAYER_ZSTD })).rejects.toMatchObject({
      code: 'BAD_IMAGE',
      message: expect.stringMatching(/not valid zstd.*memory/i),
    });
  });
});

describe('applyLayer: zstd bombs', () => {
  const GiB = 1024 ** 3;
  let bomb: Buffer;
  let bombTar: string;

  /** One file of `size` zero bytes in a tar, zstd-compressed as a stream (never held uncompressed). */
  async function zeroBomb(size: number): Promise<Buffer> {
    const header = rawHeader({ name: 'zeros', flag: '0', size });
    const zero = Buffer.alloc(4 * 1024 * 1024);
    async function* tarStream(): AsyncGenerator<Buffer> {
      yield header;
      for (let left = size; left > 0; left -= zero.length) yield left >= zero.length ? zero : zero.subarray(0, left);
      yield Buffer.alloc(1024);
    }
    const out: Buffer[] = [];
    const cs = new CompressStream({ compressionLevel: 3 });
    const collect = (async () => {
      for await (const c of cs) out.push(c as Buffer);
    })();
    for await (const c of tarStream()) if (!cs.write(c)) await new Promise((r) => cs.once('drain', r));
    cs.end();
    await collect;
    return Buffer.concat(out);
  }

  beforeEach(async () => {
    bomb ??= await zeroBomb(2 * GiB);
    bombTar = `sha256:${'0'.repeat(64)}`;
  });

  it('stops a 2 GiB zstd bomb delivered as one chunk at the ratio bound, naming the cdh.toml key', async () => {
    expect(bomb.length).toBeLessThan(2 * 1024 * 1024);
    const rssBefore = process.memoryUsage().rss;
    await expect(applyTar(root, Buffer.alloc(0), { blob: bomb, mediaType: MediaType.OCI_LAYER_ZSTD, diffId: bombTar })).rejects.toMatchObject({
      code: 'BAD_IMAGE',
      message: expect.stringContaining('max_layer_ratio'),
    });
    // Bounded: nothing near the 2 GiB was held in memory or written.
    expect(process.memoryUsage().rss - rssBefore).toBeLessThan(256 * 1024 * 1024);
    const written = fs.existsSync(at('zeros')) ? fs.statSync(at('zeros')).size : 0;
    expect(written).toBeLessThan(256 * 1024 * 1024);
  });

  it('stops it at max_layer_bytes when the ratio bound is raised', async () => {
    await expect(
      applyTar(root, Buffer.alloc(0), {
        blob: bomb,
        mediaType: MediaType.OCI_LAYER_ZSTD,
        diffId: bombTar,
        limits: { maxRatio: 1e9, maxUncompressedBytes: 32 * 1024 * 1024 },
      }),
    ).rejects.toMatchObject({ code: 'BAD_IMAGE', message: expect.stringContaining('max_layer_bytes') });
    expect(fs.statSync(at('zeros')).size).toBeLessThanOrEqual(32 * 1024 * 1024);
  });
});
