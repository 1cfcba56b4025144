/**
 * The addon's ISA-L gunzip itself (src/native/index.ts openGunzip): a call inflates into the
 * caller's buffer and reports consumed / produced / memberEnd / ended; a second call while one
 * runs is refused (EBUSY); close during a call frees the state only after it and refuses later
 * calls (EBADF); arguments are checked. It works in a worker thread, and without the addon the
 * layer code falls back to Node's zlib; terminating a worker during a call does not crash.
 */
import { createHash, randomBytes } from 'node:crypto';
import { Readable } from 'node:stream';
import { Worker } from 'node:worker_threads';
import zlib from 'node:zlib';
import { afterEach, describe, expect, it } from 'vitest';
import {
  ADDON_PATH,
  gunzipAvailable,
  gunzipErrorText,
  gunzipUnavailableReason,
  nativeAvailable,
  openGunzip,
  openGunzipCount,
  setAddonPathForTests,
} from '../../src/native/index.js';
import { ErrorCode, GuestpullError } from '../../src/errors.js';
import { DEFAULT_LAYER_LIMITS } from '../../src/pull/layers/entry.js';
import { gunzipImplementation } from '../../src/pull/layers/gunzip.js';
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

const isal = gunzipAvailable();
if (!isal) console.warn(`native gunzip tests skipped: ${gunzipUnavailableReason() ?? ''}`);

afterEach(() => {
  setAddonPathForTests(ADDON_PATH);
});

describe.skipIf(!isal)('native gunzip (ISA-L)', () => {
  it('inflates across calls and member ends, and reports where it is', async () => {
    const a = randomBytes(300_000);
    const b = Buffer.from('second member\n');
    const gz = Buffer.concat([zlib.gzipSync(a), zlib.gzipSync(b)]);
    const g = openGunzip();
    try {
      const out = Buffer.alloc(200_000);
      const r1 = await g.run(gz.subarray(0, 1000), out);
      expect(r1).toMatchObject({ consumed: 1000, memberEnd: false, ended: false, code: 0 });
      expect(out.subarray(0, r1.produced).equals(a.subarray(0, r1.produced))).toBe(true);

      const got = [out.subarray(0, r1.produced)];
      let rest = gz.subarray(1000);
      let last = r1;
      for (let i = 0; i < 20 && (rest.length > 0 || last.produced === 200_000); i++) {
        const o = Buffer.alloc(200_000);
        last = await g.run(rest, o);
        expect(last.code).toBe(0);
        got.push(o.subarray(0, last.produced));
        rest = rest.subarray(last.consumed);
      }
      expect(Buffer.concat(got).equals(Buffer.concat([a, b]))).toBe(true);
      expect(last.memberEnd).toBe(true);

      const z = await g.run(Buffer.from([0, 1, 2, 3]), Buffer.alloc(16)); // a zero after a member: the end
      expect(z).toMatchObject({ consumed: 0, produced: 0, ended: true, code: 0 });
    } finally {
      g.close();
    }
    expect(openGunzipCount()).toBe(0);
  });

  it('reports errors as codes and stays failed', async () => {
    const gz = zlib.gzipSync(Buffer.from('hello'));
    gz[gz.length - 1] ^= 1; // ISIZE
    const g = openGunzip();
    const r = await g.run(gz, Buffer.alloc(64));
    expect(r.code).toBe(-6);
    expect(gunzipErrorText(r.code)).toMatch(/CRC-32 or the length/);
    expect((await g.run(gz, Buffer.alloc(64))).code).toBe(-6);
    g.close();

    const h = openGunzip();
    expect((await h.run(Buffer.from('PK\x03\x04 a zip file'), Buffer.alloc(64))).code).toBe(-4);
    h.close();
  });

  it('refuses a second call while one runs; close during a call frees after it and refuses later calls', async () => {
    const gz = zlib.gzipSync(randomBytes(4 * 1024 * 1024), { level: 1 });
    const g = openGunzip();
    const running = g.run(gz, Buffer.alloc(4 * 1024 * 1024));
    await expect(g.run(gz, Buffer.alloc(16))).rejects.toMatchObject({ code: 'EBUSY' });
    g.close();
    g.close(); // twice is fine
    expect(openGunzipCount()).toBe(0);
    const r = await running; // the work finished on a live state
    expect(r.code).toBe(0);
    expect(r.produced).toBe(4 * 1024 * 1024);
    await expect(g.run(gz, Buffer.alloc(16))).rejects.toMatchObject({ code: 'EBADF' });
  });

  it('hashes on the pool what it is given, in order, beside a running inflate; the digest once', async () => {
    const data = randomBytes(3 * 1024 * 1024 + 17);
    for (const algorithm of ['sha256', 'sha512'] as const) {
      const g = openGunzip(algorithm);
      try {
        const gz = zlib.gzipSync(data);
        const out = Buffer.alloc(data.length + 1024);
        const running = g.run(gz, out); // an inflate and hashes at once on one handle
        for (let at = 0; at < data.length; at += 1024 * 1024) await g.hash(data.subarray(at, at + 1024 * 1024));
        const step = await running;
        expect(out.subarray(0, step.produced).equals(data)).toBe(true);
        expect(g.digest().toString('hex')).toBe(createHash(algorithm).update(data).digest('hex'));
        // once only
        expect(() => g.digest()).toThrow(/already taken/);
        await expect(g.hash(data.subarray(0, 10))).rejects.toThrow(/already taken/);
      } finally {
        g.close();
      }
    }
    // one hash at a time; a digest not while one runs; none without an algorithm
    const h = openGunzip('sha256');
    const first = h.hash(data);
    await expect(h.hash(data)).rejects.toMatchObject({ code: 'EBUSY' });
    expect(() => h.digest()).toThrow(/still running/);
    await first;
    expect(h.digest().toString('hex')).toBe(createHash('sha256').update(data).digest('hex'));
    h.close();
    const none = openGunzip();
    await expect(none.hash(data)).rejects.toThrow(/without a digest/);
    none.close();
    expect(() => openGunzip('md5' as 'sha256')).toThrow(/digest must be/);
  });

  it('checks its arguments', async () => {
    const g = openGunzip();
    await expect(g.run(Buffer.alloc(4), Buffer.alloc(0))).rejects.toThrow(/output must not be empty/);
    await expect(g.run('abc' as unknown as Buffer, Buffer.alloc(4))).rejects.toThrow(/input must be a Buffer/);
    await expect(g.run(Buffer.alloc(4), new Uint16Array(4) as unknown as Buffer)).rejects.toThrow(/output must be a Buffer/);
    g.close();
  });

  it('works in a worker thread (its own Node-API environment)', async () => {
    const code = `
      const { parentPort, workerData } = require('node:worker_threads');
      const zlib = require('node:zlib');
      const addon = require(workerData.addon);
      const data = Buffer.from('inflated in a worker '.repeat(5000));
      const h = addon.gunzipOpen();
      const out = Buffer.alloc(data.length + 10);
      addon.gunzipRun(h, zlib.gzipSync(data), out).then((r) => {
        addon.gunzipClose(h);
        parentPort.postMessage({ status: addon.gunzipStatus(), r, same: out.subarray(0, r.produced).equals(data) });
      });
    `;
    const w = new Worker(code, { eval: true, workerData: { addon: ADDON_PATH } });
    const msg = await new Promise<unknown>((resolve, reject) => {
      w.once('message', resolve);
      w.once('error', reject);
    });
    await w.terminate();
    expect(msg).toMatchObject({ status: '', same: true, r: { code: 0, memberEnd: true, produced: 105_000 } });
  });

  it('survives a worker terminated while its call runs', async () => {
    const code = `
      const { parentPort, workerData } = require('node:worker_threads');
      const zlib = require('node:zlib');
      const addon = require(workerData.addon);
      const gz = zlib.gzipSync(require('node:crypto').randomBytes(32 * 1024 * 1024), { level: 1 });
      const h = addon.gunzipOpen();
      addon.gunzipRun(h, gz, Buffer.allocUnsafe(32 * 1024 * 1024));
      parentPort.postMessage('running');
    `;
    for (let i = 0; i < 3; i++) {
      const w = new Worker(code, { eval: true, workerData: { addon: ADDON_PATH } });
      await new Promise((resolve, reject) => {
        w.once('message', resolve);
        w.once('error', reject);
      });
      expect(await w.terminate()).toBe(1);
    }
    const g = openGunzip(); // this thread carries on
    expect((await g.run(zlib.gzipSync(Buffer.from('still fine')), Buffer.alloc(64))).produced).toBe(10);
    g.close();
  });
});

describe('without the addon', () => {
  it('gunzip is unavailable with a reason, and inflateInto falls back to zlib', async () => {
    setAddonPathForTests('/nonexistent/guestpull_native.node');
    expect(nativeAvailable()).toBe(false);
    expect(gunzipAvailable()).toBe(false);
    expect(gunzipUnavailableReason()).toMatch(/could not be loaded from \/nonexistent/);
    expect(() => openGunzip()).toThrow(GuestpullError);
    expect(gunzipImplementation()).toBe('zlib');

    const data = randomBytes(100_000);
    const gz = zlib.gzipSync(data);
    gz.writeUInt32LE((gz.readUInt32LE(gz.length - 8) ^ 1) >>> 0, gz.length - 8);
    const err = await inflateInto(Readable.from([gz]), discard, {
      compression: 'gzip', algorithm: 'sha256', compressedSize: gz.length, limits: DEFAULT_LAYER_LIMITS,
      ctx: { image: 'registry.test/x:1', layer: 'sha256:00' },
    }, 1024 * 1024).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(GuestpullError);
    expect((err as GuestpullError).code).toBe(ErrorCode.BAD_IMAGE);
    expect((err as GuestpullError).message).toContain('incorrect data check'); // zlib's words: the fallback ran
  });
});
