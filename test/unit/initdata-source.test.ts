import { execFileSync } from 'node:child_process';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import zlib from 'node:zlib';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ErrorCode, GuestpullError } from '../../src/errors.js';
import { parseInitdataHeader } from '../../src/initdata/document.js';
import {
  DEFAULT_INITDATA_LIMITS,
  decodeAnnotation,
  encodeAnnotation,
  INITDATA_MAGIC,
  packInitdataImage,
  readInitdata,
} from '../../src/initdata/source.js';

const DOC = Buffer.from('version = "0.1.0"\nalgorithm = "sha384"\n[data]\n"cdh.toml" = \'\'\'\n[image]\nwork_dir = "/run/x"\n\'\'\'\n');
const OTHER = Buffer.from('version = "0.1.0"\nalgorithm = "sha256"\n[data]\n');

let tmp: string;
beforeAll(async () => {
  tmp = await mkdtemp(path.join(os.tmpdir(), 'guestpull-initdata-source-'));
});
afterAll(async () => {
  await rm(tmp, { recursive: true, force: true });
});

async function put(name: string, content: Buffer | string): Promise<string> {
  const p = path.join(tmp, name);
  await mkdir(path.dirname(p), { recursive: true });
  await writeFile(p, content);
  return p;
}

/** A kata image whose header declares `declared` bytes, followed by `payload`. */
function image(declared: bigint, payload: Buffer): Buffer {
  const h = Buffer.alloc(16);
  INITDATA_MAGIC.copy(h);
  h.writeBigUInt64LE(declared, 8);
  return Buffer.concat([h, payload]);
}

async function configMessage(p: Promise<unknown>): Promise<string> {
  try {
    await p;
  } catch (e) {
    expect(e).toBeInstanceOf(GuestpullError);
    expect((e as GuestpullError).code).toBe(ErrorCode.CONFIG);
    return (e as GuestpullError).message;
  }
  throw new Error('expected a CONFIG error');
}

describe('packInitdataImage', () => {
  it('writes the kata layout: magic, u64 LE length, gzip payload, zero padding to 512', () => {
    const img = packInitdataImage(DOC);
    expect(img.subarray(0, 8).toString('ascii')).toBe('initdata');
    const n = Number(img.readBigUInt64LE(8));
    expect(img.length % 512).toBe(0);
    expect(img.length).toBe(Math.ceil((16 + n) / 512) * 512);
    expect(zlib.gunzipSync(img.subarray(16, 16 + n)).equals(DOC)).toBe(true);
    expect(img.subarray(16 + n).every((x) => x === 0)).toBe(true);
  });
});

describe('readInitdata', () => {
  it('reads a TOML file as is', async () => {
    const p = await put('plain.toml', DOC);
    const r = await readInitdata(p);
    expect(r.raw.equals(DOC)).toBe(true);
    expect(r.source).toBe(p);
  });

  it('round-trips a packed image: the raw bytes come back exactly', async () => {
    const p = await put('disk.img', packInitdataImage(DOC));
    const r = await readInitdata(p);
    expect(r.raw.equals(DOC)).toBe(true);
    expect(r.source).toContain('kata block-device layout');
  });

  it('refuses a truncated image', async () => {
    const full = packInitdataImage(DOC);
    const n = Number(full.readBigUInt64LE(8));
    const p = await put('trunc.img', full.subarray(0, 16 + Math.floor(n / 2)));
    expect(await configMessage(readInitdata(p))).toMatch(new RegExp(`truncated: declares ${n} payload bytes but only ${Math.floor(n / 2)}`));
  });

  it('refuses an image cut inside its header', async () => {
    const p = await put('trunc-header.img', packInitdataImage(DOC).subarray(0, 12));
    expect(await configMessage(readInitdata(p))).toMatch(/truncated header \(12 of 16 bytes\)/);
  });

  it('refuses a declared length over the bound without reading it', async () => {
    const p = await put('huge.img', image(BigInt(DEFAULT_INITDATA_LIMITS.maxDeviceBytes) + 1n, Buffer.alloc(10)));
    expect(await configMessage(readInitdata(p))).toMatch(/declares a 1048577 byte payload, over the 1048576 byte bound \(limit maxDeviceBytes\)/);
    const q = await put('huger.img', image(0xffffffffffffffffn, Buffer.alloc(10)));
    expect(await configMessage(readInitdata(q))).toMatch(/over the 1048576 byte bound/);
    // The bound is configurable.
    expect(await configMessage(readInitdata(p, { limits: { maxDeviceBytes: 100 } }))).toMatch(/over the 100 byte bound/);
  });

  it('refuses a zero declared length and a payload that is not gzip', async () => {
    expect(await configMessage(readInitdata(await put('zero.img', image(0n, Buffer.alloc(0)))))).toMatch(/empty payload/);
    expect(await configMessage(readInitdata(await put('notgz.img', image(4n, Buffer.from('abcd')))))).toMatch(/not valid gzip/);
  });

  it('stops a gzip bomb at the decompression bound', async () => {
    const bomb = zlib.gzipSync(Buffer.alloc(64 * 1024 * 1024), { level: 9 });
    expect(bomb.length).toBeLessThan(DEFAULT_INITDATA_LIMITS.maxDeviceBytes);
    const p = await put('bomb.img', image(BigInt(bomb.length), bomb));
    const t0 = Date.now();
    const msg = await configMessage(readInitdata(p));
    expect(msg).toMatch(/decompresses to more than 4194304 bytes \(limit maxDecompressedBytes\)/);
    expect(msg).toMatch(/raise the limit/);
    expect(Date.now() - t0).toBeLessThan(5000);
  });

  it('applies the decompression bound exactly', async () => {
    const doc = Buffer.alloc(1000, 0x61);
    const p = await put('exact.img', packInitdataImage(doc));
    expect((await readInitdata(p, { limits: { maxDecompressedBytes: 1000 } })).raw.length).toBe(1000);
    expect(await configMessage(readInitdata(p, { limits: { maxDecompressedBytes: 999 } }))).toMatch(/more than 999 bytes/);
  });

  it('bounds a plain TOML file too', async () => {
    const p = await put('big.toml', Buffer.alloc(2000, 0x20));
    expect(await configMessage(readInitdata(p, { limits: { maxDecompressedBytes: 1999 } }))).toMatch(/larger than 1999 bytes/);
  });

  it('treats a wrong magic as TOML, which the header parser then refuses', async () => {
    const bad = packInitdataImage(DOC);
    bad.write('initdatX', 0, 'ascii');
    const p = await put('wrong-magic.img', bad);
    const r = await readInitdata(p);
    expect(r.source).toBe(p);
    expect(() => parseInitdataHeader(r.raw, r.source)).toThrow(GuestpullError);
  });

  it('refuses missing files, directories and bad limits', async () => {
    expect(await configMessage(readInitdata(path.join(tmp, 'nope.toml')))).toMatch(/cannot open/);
    await mkdir(path.join(tmp, 'adir'), { recursive: true });
    expect(await configMessage(readInitdata(path.join(tmp, 'adir')))).toMatch(/not a regular file or block device/);
    execFileSync('mkfifo', [path.join(tmp, 'fifo')]);
    expect(await configMessage(readInitdata(path.join(tmp, 'fifo')))).toMatch(/not a regular file or block device/);
    expect(await configMessage(readInitdata(path.join(tmp, 'plain.toml'), { limits: { maxDeviceBytes: -1 } }))).toMatch(/positive integer/);
  });
});

describe('readInitdata auto', () => {
  it('finds the one device carrying the magic among several', async () => {
    const dev = path.join(tmp, 'dev1');
    await put('dev1/vda', Buffer.alloc(4096));
    await put('dev1/vdb', DOC); // TOML, no magic
    await put('dev1/vdc', packInitdataImage(DOC));
    await put('dev1/sda', Buffer.from('initdat'));
    await put('dev1/nvme0n1', packInitdataImage(OTHER)); // not a vd*/sd* name: never scanned
    await put('dev1/loop0', packInitdataImage(OTHER));
    await mkdir(path.join(dev, 'sdz'), { recursive: true }); // a directory: skipped
    execFileSync('mkfifo', [path.join(dev, 'vdz')]); // a FIFO: skipped, and must not hang the scan
    const r = await readInitdata('auto', { devRoot: dev });
    expect(r.raw.equals(DOC)).toBe(true);
    expect(r.source).toContain(path.join(dev, 'vdc'));
  });

  it('takes the first in sorted order when several carry the magic', async () => {
    await put('dev2/vdb', packInitdataImage(OTHER));
    await put('dev2/sdb', packInitdataImage(DOC));
    const r = await readInitdata('auto', { devRoot: path.join(tmp, 'dev2') });
    expect(r.raw.equals(DOC)).toBe(true);
  });

  it('says so when no device carries the magic', async () => {
    await put('dev3/vda', Buffer.alloc(512));
    await put('dev3/nvme0n1', packInitdataImage(DOC));
    expect(await configMessage(readInitdata('auto', { devRoot: path.join(tmp, 'dev3') }))).toMatch(/no device under .*dev3 \(vd\*, sd\*; 1 checked\)/);
  });
});

describe('annotation', () => {
  it('round-trips base64(gzip(raw))', () => {
    const v = encodeAnnotation(DOC);
    expect(zlib.gunzipSync(Buffer.from(v, 'base64')).equals(DOC)).toBe(true);
    expect(decodeAnnotation(v).equals(DOC)).toBe(true);
    expect(decodeAnnotation(`${v.slice(0, 10)}\n${v.slice(10)}`).equals(DOC)).toBe(true);
  });

  it('refuses bad base64, non-gzip, oversize and bombs', () => {
    const err = (f: () => unknown) => {
      try {
        f();
      } catch (e) {
        expect((e as GuestpullError).code).toBe(ErrorCode.CONFIG);
        return (e as GuestpullError).message;
      }
      throw new Error('expected error');
    };
    expect(err(() => decodeAnnotation('not base64!'))).toMatch(/not standard base64/);
    expect(err(() => decodeAnnotation(Buffer.from('plain').toString('base64')))).toMatch(/not valid gzip/);
    expect(err(() => decodeAnnotation(encodeAnnotation(DOC), { maxDeviceBytes: 8 }))).toMatch(/over the 8 byte bound/);
    const bomb = zlib.gzipSync(Buffer.alloc(32 * 1024 * 1024)).toString('base64');
    expect(err(() => decodeAnnotation(bomb))).toMatch(/more than 4194304 bytes/);
  });
});
