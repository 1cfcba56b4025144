/**
 * The layer store's pure parts: chain IDs, the overlay option string (escaping, the one-page
 * limit, relative lower paths), /proc/self/mountinfo parsing, records, the work dir mutex and
 * owner tags.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { ErrorCode, GuestpullError } from '../../src/errors.js';
import { chainHex, chainIds, isChainHex } from '../../src/pull/store/layout.js';
import { acquireLock, ownerAlive, ownerTag, processStart } from '../../src/pull/store/lock.js';
import { isOverlayMounted, mountsUnder, parseMountinfo, unescapeOctal } from '../../src/pull/store/mountinfo.js';
import { escapeOverlayPath, MAX_MOUNT_DATA, overlayData, planMount } from '../../src/pull/store/overlay.js';
import { LayerRecord, readRecord, writeJsonAtomic } from '../../src/pull/store/records.js';

const d = (c: string): string => `sha256:${c.repeat(64)}`;
const sha = (s: string): string => createHash('sha256').update(s).digest('hex');

let tmp: string;
beforeEach(() => {
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'guestpull-store-parts-'));
});
afterEach(() => {
  fs.rmSync(tmp, { recursive: true, force: true });
});

describe('chain IDs', () => {
  it('follow image-spec config.md: the base diff ID, then sha256 of "<parent chain> <diff id>"', () => {
    const ids = chainIds([d('a'), d('b'), d('c')]);
    expect(ids[0]).toBe(d('a'));
    expect(ids[1]).toBe(`sha256:${sha(`${d('a')} ${d('b')}`)}`);
    expect(ids[2]).toBe(`sha256:${sha(`${ids[1]} ${d('c')}`)}`);
    // The same layer on another base has another chain ID (and so another store directory).
    expect(chainIds([d('b'), d('c')])[1]).not.toBe(ids[2]);
    expect(chainHex(ids[2]!)).toBe(ids[2]!.slice(7));
  });

  it('validate every diff ID before using it', () => {
    expect(() => chainIds([d('a'), 'sha256:../../etc'])).toThrow(GuestpullError);
    expect(() => chainIds(['sha256:' + 'A'.repeat(64)])).toThrow(/invalid digest/);
    expect(() => chainIds(['md5:' + 'a'.repeat(32)])).toThrow(/invalid digest/);
  });

  it('name a sha512 base layer by the sha256 of its chain ID', () => {
    const base = `sha512:${'e'.repeat(128)}`;
    expect(chainHex(base)).toBe(sha(base));
    expect(isChainHex(chainHex(base))).toBe(true);
    expect(isChainHex('g'.repeat(64))).toBe(false);
  });
});

describe('overlay options', () => {
  it('escape backslash, comma and colon in paths', () => {
    expect(escapeOverlayPath('/a,b:c\\d')).toBe('/a\\,b\\:c\\\\d');
    const data = overlayData({ lowers: ['/l/two', '/l/one:x'], upper: '/u,1', work: '/w', options: ['index=off'] });
    expect(data).toBe('lowerdir=/l/two:/l/one\\:x,upperdir=/u\\,1,workdir=/w,index=off');
  });

  it('use absolute lower paths when they fit, relative ones when only those fit, and refuse beyond', () => {
    const base = '/run/kata-containers/image/layers';
    const lower = (i: number): string => `${base}/${sha(String(i))}/diff`;
    const spec = (n: number) => ({ lowers: Array.from({ length: n }, (_, i) => lower(i)), upper: '/run/kata-containers/image/bundles/0123456789abcdef/upper', work: '/w', options: [] });
    expect(planMount(spec(3), base)).toEqual({ data: overlayData(spec(3)) });
    const rel = planMount(spec(50), base);
    expect(rel?.cwd).toBe(base);
    expect(rel?.data).toContain(`lowerdir=${sha('0')}/diff:${sha('1')}/diff:`);
    expect(Buffer.byteLength(rel!.data)).toBeLessThanOrEqual(MAX_MOUNT_DATA);
    expect(Buffer.byteLength(overlayData(spec(50)))).toBeGreaterThan(MAX_MOUNT_DATA);
    expect(planMount(spec(80), base)).toBeUndefined();
  });
});

describe('mountinfo', () => {
  const text = [
    '22 27 0:21 / /proc rw,relatime - proc proc rw',
    '45 27 0:39 / /tmp/my\\040bundle/rootfs rw,relatime shared:1 - overlay overlay rw,lowerdir=/w/layers/a/diff:/w/layers/b/diff,upperdir=/w/bundles/x\\054y/upper,workdir=/w/bundles/x/work,uuid=on',
    '46 45 0:40 / /tmp/my\\040bundle/rootfs/proc rw - proc proc rw',
    'garbage line',
    '',
  ].join('\n');

  it('parses mount points, types and overlay options, unescaping octal', () => {
    const m = parseMountinfo(text);
    expect(m).toHaveLength(3);
    expect(m[1]).toMatchObject({ id: 45, parent: 27, mountPoint: '/tmp/my bundle/rootfs', fstype: 'overlay', source: 'overlay' });
    expect(m[1]!.superOptions.get('upperdir')).toBe('/w/bundles/x,y/upper');
    expect(m[1]!.superOptions.get('lowerdir')).toBe('/w/layers/a/diff:/w/layers/b/diff');
    expect(unescapeOctal('a\\011b\\134c')).toBe('a\tb\\c');
  });

  it('finds mounts below a directory, deepest first, and a live overlay by mount point and upper', () => {
    const m = parseMountinfo(text);
    expect(mountsUnder(m, '/tmp/my bundle').map((e) => e.id)).toEqual([46, 45]);
    expect(mountsUnder(m, '/tmp/my')).toEqual([]);
    expect(isOverlayMounted(m, '/tmp/my bundle/rootfs', '/w/bundles/x,y/upper')).toBe(true);
    expect(isOverlayMounted(m, '/tmp/my bundle/rootfs', '/w/bundles/other/upper')).toBe(false);
    expect(isOverlayMounted(m, '/proc', '/w/bundles/x,y/upper')).toBe(false);
  });
});

describe('records', () => {
  const rec: LayerRecord = {
    version: 1,
    chainId: d('a'),
    hex: 'a'.repeat(64),
    diffId: d('a'),
    parent: null,
    layerDigest: d('b'),
    mediaType: 'application/vnd.oci.image.layer.v1.tar+gzip',
    compressedBytes: 10,
    uncompressedBytes: 20,
    entries: 3,
    created: '2024-01-01T00:00:00.000Z',
  };

  it('are written atomically (no temp file left) and read back; anything else reads as absent', async () => {
    const file = path.join(tmp, 'layer.json');
    await writeJsonAtomic(file, rec);
    expect(fs.readdirSync(tmp)).toEqual(['layer.json']);
    expect((fs.statSync(file).mode & 0o777).toString(8)).toBe('600');
    expect(await readRecord(file, LayerRecord)).toEqual(rec);
    fs.writeFileSync(file, JSON.stringify({ ...rec, hex: '../x' }));
    expect(await readRecord(file, LayerRecord)).toBeUndefined();
    fs.writeFileSync(file, '{"version":1,');
    expect(await readRecord(file, LayerRecord)).toBeUndefined();
    expect(await readRecord(path.join(tmp, 'missing.json'), LayerRecord)).toBeUndefined();
  });
});

describe('owners and the work dir mutex', () => {
  let child: ChildProcess | undefined;
  afterEach(() => {
    child?.kill('SIGKILL');
    child = undefined;
  });

  const sleeper = async (): Promise<string> => {
    child = spawn('sleep', ['30'], { stdio: 'ignore' });
    await new Promise((r) => child!.once('spawn', r));
    return `${child.pid}-${processStart(child.pid!)}`;
  };
  const exited = (): Promise<void> => new Promise((r) => child!.once('exit', () => r()));

  it('tell live processes from gone ones and from reused pids', async () => {
    expect(ownerAlive(ownerTag())).toBe(true);
    const tag = await sleeper();
    expect(ownerAlive(tag)).toBe(true);
    const [pid, start] = tag.split('-');
    expect(ownerAlive(`${pid}-${Number(start) + 1}`)).toBe(false); // same pid, another process
    const gone = exited();
    child!.kill('SIGKILL');
    await gone;
    expect(ownerAlive(tag)).toBe(false);
    expect(ownerAlive('not-a-tag')).toBe(false);
  });

  it('waits for a live holder, then fails naming it; takes over the lock of a process that is gone', async () => {
    const file = path.join(tmp, 'lock');
    const tag = await sleeper();
    fs.writeFileSync(file, `${tag}\n`);
    const t0 = Date.now();
    const err = await acquireLock(file, tmp, 300).then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(Date.now() - t0).toBeGreaterThanOrEqual(250);
    expect(err).toBeInstanceOf(GuestpullError);
    expect((err as GuestpullError).code).toBe(ErrorCode.UNAVAILABLE);
    expect((err as GuestpullError).message).toContain(String(child!.pid));
    expect(fs.readFileSync(file, 'utf8')).toBe(`${tag}\n`);

    const gone = exited();
    child!.kill('SIGKILL');
    await gone;
    const lock = await acquireLock(file, tmp, 0);
    expect(fs.readFileSync(file, 'utf8').trim()).toBe(ownerTag());
    await lock.release();
    expect(fs.existsSync(file)).toBe(false);
  });

  it('is released to a waiter as soon as its holder lets go', async () => {
    const file = path.join(tmp, 'lock');
    const tag = await sleeper();
    fs.writeFileSync(file, `${tag}\n`);
    setTimeout(() => fs.unlinkSync(file), 150);
    const lock = await acquireLock(file, tmp, 5000);
    expect(fs.readFileSync(file, 'utf8').trim()).toBe(ownerTag());
    await lock.release();
  });
});
