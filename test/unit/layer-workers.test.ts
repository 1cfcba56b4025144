/**
 * The layer worker pool (src/pull/layers/workers.ts) with real worker threads (a worker slot runs
 * applyLayer whole): the compiled pool
 * in dist/ is used (under the test runner the sources are TypeScript, where the pool runs
 * in-thread), so `npm run build` must have run. Results and errors must be what applyLayer gives
 * in-process: the tree, the counts, the error codes and messages, aborts, a dead worker.
 */
import { existsSync } from 'node:fs';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import { fileURLToPath } from 'node:url';
import zlib from 'node:zlib';
import { afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import type { ApplyLayerOptions, ApplyLayerResult } from '../../src/pull/layers/index.js';
import type { LayerSlot, LayerWorkers as LayerWorkersType } from '../../src/pull/layers/workers.js';
import type { GuestpullError as GuestpullErrorType } from '../../src/errors.js';
import { MediaType } from '../../src/oci.js';
import { LAYER_DIGEST, listTree, packTar, sha256 } from './_layers-tar.js';

const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const compiled = path.join(repoRoot, 'dist/pull/layers/workers.js');

type PoolCtor = new (size?: number, opts?: { mainFirst?: boolean }) => LayerWorkersType;
/** A layer applied in the slot's worker. */
const applyIn = (s: LayerSlot, o: ApplyLayerOptions): Promise<ApplyLayerResult> => {
  if (!s.apply) throw new Error('the slot has no worker');
  return s.apply(o);
};
type ErrorCtor = new (code: string, message: string) => GuestpullErrorType;
let LayerWorkers: PoolCtor;
/** The compiled GuestpullError: the pool recognises its own class, as in production. */
let GuestpullError: ErrorCtor;
let pool: LayerWorkersType;
let base: string;
let root: string;

beforeAll(async () => {
  if (!existsSync(compiled)) throw new Error(`${compiled} is missing: run npm run build first`);
  ({ LayerWorkers } = (await import(compiled)) as { LayerWorkers: PoolCtor });
  ({ GuestpullError } = (await import(path.join(repoRoot, 'dist/errors.js'))) as { GuestpullError: ErrorCtor });
});
beforeEach(() => {
  base = fs.mkdtempSync(path.join(os.tmpdir(), 'gp-layer-workers-'));
  root = path.join(base, 'rootfs');
  fs.mkdirSync(root);
  pool = new LayerWorkers(2);
});
afterEach(async () => {
  await pool.close();
  fs.rmSync(base, { recursive: true, force: true });
});

/** A deterministic tar of `files` files (~`size` bytes each, incompressible enough to take a moment). */
async function bigTar(files: number, size: number): Promise<Buffer> {
  let x = 12345;
  const bytes = (n: number): Buffer => {
    const b = Buffer.alloc(n);
    for (let i = 0; i < n; i++) {
      x = (Math.imul(x, 1103515245) + 12345) >>> 0;
      b[i] = x >>> 24;
    }
    return b;
  };
  return packTar([{ name: 'd/', type: 'directory' }, ...Array.from({ length: files }, (_, i) => ({ name: `d/f${i}`, content: bytes(size) }))]);
}

function options(source: Readable, tarBytes: Buffer, blob: Buffer, extra: Partial<ApplyLayerOptions> = {}): ApplyLayerOptions {
  const logs: string[] = [];
  return {
    source,
    mediaType: MediaType.OCI_LAYER_GZIP,
    compressedSize: blob.length,
    diffId: sha256(tarBytes),
    layerDigest: LAYER_DIGEST,
    rootfs: root,
    image: 'registry.test/workers:unit',
    logger: { debug: (_f: Record<string, unknown>, msg: string) => logs.push(msg) },
    ...extra,
  };
}

/** Feed `blob` in small chunks with a pause between them (a slow download). */
function slowSource(blob: Buffer, chunk: number, pauseMs: number, failAt?: number): Readable {
  return Readable.from(
    (async function* () {
      for (let at = 0; at < blob.length; at += chunk) {
        if (failAt !== undefined && at >= failAt) throw new GuestpullError('UNAVAILABLE', 'connection reset by 127.0.0.1:9 (test)');
        yield blob.subarray(at, at + chunk);
        await new Promise((r) => setTimeout(r, pauseMs));
      }
    })(),
  );
}

async function withSlot<T>(fn: (s: LayerSlot) => Promise<T>, signal?: AbortSignal): Promise<T> {
  const slot = await pool.acquire(signal);
  try {
    return await fn(slot);
  } finally {
    slot.release();
  }
}

describe('LayerWorkers', () => {
  it('uses worker threads for the compiled pool', () => {
    expect(pool.inThread).toBe(false);
  });

  it('applies a layer in a worker: the same tree and counts as in-process', async () => {
    const t = await packTar([
      { name: 'etc/', type: 'directory', mode: 0o755 },
      { name: 'etc/hostname', content: 'worker\n', mode: 0o644 },
      { name: 'bin/', type: 'directory' },
      { name: 'bin/sh', type: 'symlink', linkname: '/bin/busybox' },
      { name: 'etc/.wh.gone' },
    ]);
    const blob = zlib.gzipSync(t);
    const r: ApplyLayerResult = await withSlot((s) => applyIn(s, options(Readable.from([blob]), t, blob)));
    expect(r.entries).toBe(5);
    expect(r.uncompressedBytes).toBe(t.length);
    expect(fs.readFileSync(path.join(root, 'etc/hostname'), 'utf8')).toBe('worker\n');
    expect(fs.readlinkSync(path.join(root, 'bin/sh'))).toBe('/bin/busybox');
    expect(listTree(root).map((l) => l.split(' ')[0])).toEqual(expect.arrayContaining(['bin', 'bin/sh', 'etc', 'etc/hostname']));
  });

  it('carries a diff_id mismatch across the thread as DIGEST_MISMATCH', async () => {
    const t = await packTar([{ name: 'a', content: 'x' }]);
    const blob = zlib.gzipSync(t);
    const wrong = `sha256:${'0'.repeat(64)}`;
    const err = await withSlot((s) => applyIn(s, options(Readable.from([blob]), t, blob, { diffId: wrong }))).catch((e: unknown) => e);
    expect((err as Error).name).toBe('GuestpullError');
    expect((err as GuestpullErrorType).code).toBe('DIGEST_MISMATCH');
    expect((err as GuestpullErrorType).message).toContain(wrong);
  });

  it('fails with the download error itself when the source breaks (as in-process)', async () => {
    const t = await bigTar(40, 64 * 1024);
    const blob = zlib.gzipSync(t, { level: 1 });
    expect(blob.length).toBeGreaterThan(1024 * 1024);
    const err = await withSlot((s) => applyIn(s, options(slowSource(blob, 16 * 1024, 1, Math.floor(blob.length / 3)), t, blob))).catch((e: unknown) => e);
    expect((err as GuestpullErrorType).code).toBe('UNAVAILABLE');
    expect((err as GuestpullErrorType).message).toBe('connection reset by 127.0.0.1:9 (test)');
  });

  it('stops a layer promptly on abort and keeps the worker usable', async () => {
    const t = await bigTar(200, 64 * 1024);
    const blob = zlib.gzipSync(t, { level: 1 });
    const ac = new AbortController();
    setTimeout(() => ac.abort(new GuestpullError('DEADLINE_EXCEEDED', 'deadline of 50 ms passed (test)')), 50);
    const t0 = Date.now();
    const err = await withSlot((s) => applyIn(s, options(slowSource(blob, 16 * 1024, 5), t, blob, { signal: ac.signal }))).catch((e: unknown) => e);
    expect(Date.now() - t0).toBeLessThan(1000);
    expect((err as GuestpullErrorType).code).toBe('CANCELLED');
    // the same pool still works
    const small = await packTar([{ name: 'after', content: 'ok' }]);
    const sb = zlib.gzipSync(small);
    await withSlot((s) => applyIn(s, options(Readable.from([sb]), small, sb)));
    expect(fs.readFileSync(path.join(root, 'after'), 'utf8')).toBe('ok');
  });

  it('hands out at most `size` slots; a waiting acquire can be aborted', async () => {
    const a = await pool.acquire();
    const b = await pool.acquire();
    let third: LayerSlot | undefined;
    const waiting = pool.acquire().then((s) => (third = s));
    await new Promise((r) => setTimeout(r, 50));
    expect(third).toBeUndefined();
    const ac = new AbortController();
    const aborted = pool.acquire(ac.signal).catch((e: unknown) => e);
    ac.abort(new GuestpullError('CANCELLED', 'test cancel'));
    expect(((await aborted) as GuestpullErrorType).message).toBe('test cancel');
    a.release();
    await waiting;
    expect(third).toBeDefined();
    b.release();
    third!.release();
  });

  it('main first: the first slot is the calling thread (no apply), the next ones workers', async () => {
    const mf = new LayerWorkers(1, { mainFirst: true });
    try {
      const main = await mf.acquire();
      expect(main.apply).toBeUndefined();
      const w = await mf.acquire();
      expect(w.apply).toBeDefined();
      // both taken: a third waits, and gets the main slot when that is released
      let third: LayerSlot | undefined;
      const waiting = mf.acquire().then((s) => (third = s));
      await new Promise((r) => setTimeout(r, 30));
      expect(third).toBeUndefined();
      main.release();
      await waiting;
      expect(third!.apply).toBeUndefined();
      // a layer through the worker slot still applies correctly
      const t = await packTar([{ name: 'via-worker', content: 'w' }]);
      const blob = zlib.gzipSync(t);
      await applyIn(w, options(Readable.from([blob]), t, blob));
      expect(fs.readFileSync(path.join(root, 'via-worker'), 'utf8')).toBe('w');
      w.release();
      third!.release();
      // after every release the main slot is free again
      const again = await mf.acquire();
      expect(again.apply).toBeUndefined();
      again.release();
    } finally {
      await mf.close();
    }
  });

  it('fails the task of a worker that dies (INTERNAL) and replaces it', async () => {
    const t = await bigTar(200, 64 * 1024);
    const blob = zlib.gzipSync(t, { level: 1 });
    const slot = await pool.acquire();
    const running = applyIn(slot, options(slowSource(blob, 16 * 1024, 5), t, blob)).catch((e: unknown) => e);
    await new Promise((r) => setTimeout(r, 100));
    // Kill every worker the pool has (the test reaches into the pool: there is one busy worker).
    const internals = pool as unknown as { all: Set<{ worker: { terminate(): Promise<number> } }> };
    for (const w of internals.all) await w.worker.terminate();
    const err = (await running) as GuestpullErrorType;
    expect(err.code).toBe('INTERNAL');
    expect(err.message).toMatch(/worker unpacking layer sha256:ab.* stopped/);
    slot.release();
    const small = await packTar([{ name: 'again', content: 'ok' }]);
    const sb = zlib.gzipSync(small);
    await withSlot((s) => applyIn(s, options(Readable.from([sb]), small, sb)));
    expect(fs.readFileSync(path.join(root, 'again'), 'utf8')).toBe('ok');
  });
  it('a speculative layer in a worker asks the main thread for its parents once and goes on where it is told', async () => {
    const t = await packTar([
      { name: 'own/', type: 'directory', mode: 0o750 },
      { name: 'own/a', content: 'alone' },
      { name: 'own/.wh.lower-file' },
      { name: 'usr/lib/needs-parent', content: 'after' },
      { name: 'own/b', content: 'after too' },
    ]);
    const blob = zlib.gzipSync(t);
    const merged = path.join(base, 'merged');
    fs.mkdirSync(path.join(merged, 'usr/lib'), { recursive: true });
    const asked: boolean[] = [];
    const lower = async (rootEntry: boolean): Promise<{ root: string; merged: string[] }> => {
      asked.push(rootEntry);
      // What the store does: the entries so far are in the upper; go on in the "build overlay".
      fs.cpSync(root, merged, { recursive: true, filter: (src) => !fs.lstatSync(src).isCharacterDevice() });
      return { root: merged, merged: [] };
    };
    const r = await withSlot((s) => applyIn(s, options(Readable.from([blob]), t, blob, { lower })));
    expect(asked).toEqual([false]);
    expect(r.switched).toBe(true);
    expect(r.rootEntry).toBe(false);
    // before the switch: written alone into the upper, the whiteout as overlayfs writes it
    expect(fs.readFileSync(path.join(root, 'own/a'), 'utf8')).toBe('alone');
    const wh = fs.lstatSync(path.join(root, 'own/lower-file'));
    expect(wh.isCharacterDevice() && wh.rdev === 0).toBe(true);
    // from the entry that needed the parents on: in the root the main thread gave
    expect(fs.readFileSync(path.join(merged, 'usr/lib/needs-parent'), 'utf8')).toBe('after');
    expect(fs.readFileSync(path.join(merged, 'own/b'), 'utf8')).toBe('after too');
    expect(fs.existsSync(path.join(root, 'usr'))).toBe(false);
    expect(fs.statSync(path.join(merged, 'own')).mode & 0o7777).toBe(0o750);
  });

  it('a speculative layer whose parents fail fails with their error', async () => {
    const t = await packTar([{ name: 'implied/x', content: 'x' }]);
    const blob = zlib.gzipSync(t);
    const lower = (): Promise<{ root: string; merged: string[] }> => Promise.reject(new GuestpullError('UNAVAILABLE', 'parent layer sha256:cd failed: connection reset (test)'));
    const err = (await withSlot((s) => applyIn(s, options(Readable.from([blob]), t, blob, { lower }))).catch((e: unknown) => e)) as GuestpullErrorType;
    expect(err.code).toBe('UNAVAILABLE');
    expect(err.message).toContain('parent layer sha256:cd failed');
  });
  it('prewarm starts idle workers that the next acquires use (no second thread), at most the pool size', async () => {
    const internals = pool as unknown as { all: Set<unknown>; idle: unknown[] };
    pool.prewarm(5);
    expect(internals.all.size).toBe(2);
    expect(internals.idle.length).toBe(2);
    const t = await packTar([{ name: 'warm', content: 'w' }]);
    const blob = zlib.gzipSync(t);
    await withSlot((s) => applyIn(s, options(Readable.from([blob]), t, blob)));
    expect(fs.readFileSync(path.join(root, 'warm'), 'utf8')).toBe('w');
    expect(internals.all.size).toBe(2);
  });
});
