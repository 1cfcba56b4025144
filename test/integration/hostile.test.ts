/**
 * Issue 5 §8 (start): a hostile image corpus pulled for real. Each case is built with the image
 * builder (raw tar headers where needed), pushed to a real registry and pulled with the real
 * Puller, once with `snapshotter = "copy"` and once with `"overlay"`. Next to every bundle sits a
 * sentinel directory (files, a symlink, odd modes) whose full snapshot (content hashes included)
 * must be the same after every case. A case either fails with BAD_IMAGE / DIGEST_MISMATCH naming
 * what failed, leaving an empty bundle, an empty staging area and no mount under the temp dir, or
 * succeeds with everything it wrote inside the rootfs.
 */
import fs from 'node:fs';
import { mkdtemp } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { parseConfig } from '../../src/config/index.js';
import { GuestpullError } from '../../src/errors.js';
import { silentLogger } from '../../src/log.js';
import { Puller } from '../../src/pull/index.js';
import { llistxattr } from '../../src/native/index.js';
import { mountsUnder, readMounts } from '../../src/pull/store/mountinfo.js';
import { removeTree } from '../helpers/cleanup.js';
import { assembleImage, blobOf, buildImage, buildLayer, sha256, type BuiltImage, type EntrySpec } from '../helpers/image-builder.js';
import { pushImage } from '../helpers/push.js';
import { hasRegistryBinary, startRegistry, type RunningRegistry } from '../helpers/registry.js';
import { snapshotTree, type TreeEntry } from '../helpers/tree.js';

const MiB = 1024 * 1024;
type Mode = 'copy' | 'overlay';
const MODES: Mode[] = ['copy', 'overlay'];

let tmp: string;
/** Bundles are made in here, next to the sentinel. */
let area: string;
let sentinel: string;
let sentinelSnap: TreeEntry[];
let registry: RunningRegistry;
const pullers = new Map<string, Puller>();
let n = 0;

function workDir(mode: Mode, limits: string): string {
  return path.join(tmp, `work-${mode}-${limits}`);
}

/** One Puller per snapshotter and limits variant ('none', 'ratio': max_layer_ratio, 'bytes': max_layer_bytes). */
function puller(mode: Mode, limits: 'none' | 'ratio' | 'bytes'): Puller {
  const key = `${mode}-${limits}`;
  const hit = pullers.get(key);
  if (hit) return hit;
  const toml = [
    '[image]',
    `work_dir = ${JSON.stringify(workDir(mode, limits))}`,
    `snapshotter = "${mode}"`,
    ...(limits === 'ratio' ? ['max_layer_ratio = 10'] : []),
    ...(limits === 'bytes' ? [`max_layer_bytes = ${4 * MiB}`, 'max_layer_ratio = 1000000'] : []),
    '[[image.registry_config.registry]]',
    `location = "${registry.host}"`,
    'insecure = true',
    '',
  ].join('\n');
  const p = new Puller({ config: parseConfig(toml, 'hostile.test').config, logger: silentLogger(), version: 't' });
  pullers.set(key, p);
  return p;
}

beforeAll(async () => {
  if (!hasRegistryBinary()) throw new Error('docker-registry is not installed: apt-get install docker-registry');
  tmp = await mkdtemp(path.join(os.tmpdir(), 'guestpull-hostile-'));
  area = path.join(tmp, 'area');
  sentinel = path.join(area, 'sentinel');
  fs.mkdirSync(path.join(sentinel, 'sub'), { recursive: true });
  fs.writeFileSync(path.join(sentinel, 'x'), 'sentinel x');
  fs.chmodSync(path.join(sentinel, 'x'), 0o600);
  fs.writeFileSync(path.join(sentinel, 'suid'), 'suid');
  fs.chmodSync(path.join(sentinel, 'suid'), 0o4755);
  fs.writeFileSync(path.join(sentinel, 'sub', 'deep'), 'deep');
  fs.chmodSync(path.join(sentinel, 'sub'), 0o700);
  fs.symlinkSync('x', path.join(sentinel, 'link'));
  fs.symlinkSync('/etc', path.join(sentinel, 'etc-link'));
  sentinelSnap = await snapshotTree(sentinel);
  registry = await startRegistry();
}, 60_000);

afterAll(async () => {
  for (const p of pullers.values()) await p.close();
  await registry?.stop();
  if (tmp) await removeTree(tmp);
});

type Expect =
  | { fail: 'BAD_IMAGE' | 'DIGEST_MISMATCH'; message: RegExp }
  | { ok: (rootfs: string) => void };

interface Case {
  name: string;
  image: () => Promise<BuiltImage>;
  limits?: 'none' | 'ratio' | 'bytes';
  expect: Expect;
}

const layers = (...ls: EntrySpec[][]) => async (): Promise<BuiltImage> => await buildImage({ layers: ls, config: { Cmd: ['/bin/sh'] } });
const raw = (header: { name: string; type?: 'file' | 'directory' | 'symlink' | 'link' | 'character-device'; linkname?: string; mode?: number; devmajor?: number; devminor?: number }, content?: string): EntrySpec => ({
  type: 'raw',
  header: { mode: 0o644, ...header },
  ...(content !== undefined ? { content: Buffer.from(content) } : {}),
});
const has = (rootfs: string, p: string, content?: string): void => {
  const st = fs.lstatSync(path.join(rootfs, p));
  if (content !== undefined) {
    expect(st.isFile(), `${p} is a file in the rootfs`).toBe(true);
    expect(fs.readFileSync(path.join(rootfs, p), 'utf8')).toBe(content);
  }
};

/** `area/bundle-N/rootfs/../../sentinel` is the sentinel. */
const CASES: Case[] = [
  {
    name: '../ traversal names are clamped at the root',
    image: layers([raw({ name: '../../sentinel/x' }, 'pwned'), raw({ name: 'a/../../../../sentinel/y' }, 'pwned')]),
    expect: { ok: (r) => { has(r, 'sentinel/x', 'pwned'); has(r, 'sentinel/y', 'pwned'); } },
  },
  {
    name: 'absolute names land inside the root',
    image: () => layers([raw({ name: `${path.join(area, 'sentinel', 'x')}` }, 'pwned')])(),
    expect: { ok: (r) => has(r, path.join(area, 'sentinel', 'x'), 'pwned') },
  },
  {
    name: 'a symlink to / then a file beneath it',
    image: () => layers([raw({ name: 'esc', type: 'symlink', linkname: '/' }), raw({ name: `esc${path.join(area, 'sentinel', 'x')}` }, 'pwned')])(),
    expect: { ok: (r) => has(r, path.join(area, 'sentinel', 'x'), 'pwned') },
  },
  {
    name: 'a symlink to ../../.. then a file beneath it',
    image: layers([raw({ name: 'up', type: 'symlink', linkname: '../../..' }), raw({ name: 'up/sentinel/x' }, 'pwned')]),
    expect: { ok: (r) => has(r, 'sentinel/x', 'pwned') },
  },
  {
    name: 'a symlink then a hardlink through it',
    image: layers([raw({ name: 'l', type: 'symlink', linkname: '../../sentinel' }), raw({ name: 'h', type: 'link', linkname: 'l/x' })]),
    expect: { fail: 'BAD_IMAGE', message: /^layer sha256:[0-9a-f]{64} of .*entry "h" is a hard link to "l\/x"/ },
  },
  {
    name: 'a hardlink to ../../sentinel/x',
    image: layers([raw({ name: 'h', type: 'link', linkname: '../../sentinel/x' })]),
    expect: { fail: 'BAD_IMAGE', message: /^layer sha256:[0-9a-f]{64} of .*entry "h" is a hard link to "\.\.\/\.\.\/sentinel\/x"/ },
  },
  {
    name: 'a whiteout through a symlinked directory',
    image: () => layers(
      [raw({ name: 'evil', type: 'symlink', linkname: '../../sentinel' }), raw({ name: 'abs', type: 'symlink', linkname: sentinel })],
      [raw({ name: 'evil/.wh.x' }, ''), raw({ name: 'abs/.wh.x' }, ''), raw({ name: 'evil/.wh..wh..opq' }, '')],
    )(),
    expect: { ok: (r) => { expect(fs.readlinkSync(path.join(r, 'evil'))).toBe('../../sentinel'); } },
  },
  {
    name: 'a symlink replacing a directory, then a file beneath it',
    image: layers(
      [{ type: 'dir', path: 'd', mode: 0o755 }, { type: 'file', path: 'd/keep', content: 'k' }],
      [raw({ name: 'd', type: 'symlink', linkname: '../../sentinel' }), raw({ name: 'd/x' }, 'pwned')],
    ),
    expect: { ok: (r) => has(r, 'sentinel/x', 'pwned') },
  },
  {
    name: 'a whiteout of a lower symlink after a file written through it (same layer)',
    image: layers(
      [{ type: 'dir', path: 'c' }, { type: 'file', path: 'c/old', content: 'o' }, { type: 'symlink', path: 'a', target: 'c' }],
      [{ type: 'file', path: 'a/new', content: 'n' }, { type: 'whiteout', path: 'a' }],
    ),
    expect: { fail: 'BAD_IMAGE', message: /^layer sha256:[0-9a-f]{64} of .*entry "(\.\/)?\.wh\.a" would hide the lower-layer symlink "\/a", through which this layer already resolved its entry "(\.\/)?a\/new"/ },
  },
  {
    name: 'a whiteout of a lower symlink before a file beneath its name (same layer)',
    image: layers(
      [{ type: 'dir', path: 'c' }, { type: 'file', path: 'c/old', content: 'o' }, { type: 'symlink', path: 'a', target: 'c' }],
      [{ type: 'whiteout', path: 'a' }, { type: 'file', path: 'a/new', content: 'n' }],
    ),
    expect: {
      ok: (r) => {
        expect(fs.lstatSync(path.join(r, 'a')).isDirectory(), 'a is a fresh directory').toBe(true);
        has(r, 'a/new', 'n');
        expect(fs.readdirSync(path.join(r, 'c'))).toEqual(['old']);
      },
    },
  },
  {
    name: 'a lower directory written into and whited out in the same layer sheds its xattrs and mtime',
    image: layers(
      [
        { type: 'raw', header: { name: 'a/', type: 'directory', mode: 0o700, mtime: new Date('2001-01-01T00:00:00Z'), pax: { 'SCHILY.xattr.user.lower': 'a' } } },
        { type: 'raw', header: { name: 'a/b/', type: 'directory', mode: 0o700, mtime: new Date('2001-01-01T00:00:00Z'), pax: { 'SCHILY.xattr.user.lowerb': 'b' } } },
      ],
      [{ type: 'file', path: 'a/b/new', content: 'n' }, { type: 'whiteout', path: 'a' }],
    ),
    expect: {
      ok: (r) => {
        for (const d of ['a', 'a/b']) {
          const st = fs.lstatSync(path.join(r, d));
          expect((st.mode & 0o7777).toString(8), `${d} mode`).toBe('755');
          expect(st.mtime.getUTCFullYear(), `${d} mtime`).toBeGreaterThan(2001);
          expect(llistxattr(path.join(r, d)).filter((x) => x.startsWith('user.')), `${d} xattrs`).toEqual([]);
        }
        has(r, 'a/b/new', 'n');
      },
    },
  },
  {
    name: 'a renewal over a directory that a middle layer replaced (an opaque directory in overlay mode)',
    image: layers(
      [{ type: 'raw', header: { name: 'a/', type: 'directory', mode: 0o755, pax: { 'SCHILY.xattr.user.l1': '1' } } }, { type: 'file', path: 'a/old1', content: '1' }],
      [{ type: 'whiteout', path: 'a' }, { type: 'raw', header: { name: 'a/', type: 'directory', mode: 0o700, pax: { 'SCHILY.xattr.user.l2': '2' } } }, { type: 'file', path: 'a/b/mid', content: 'm' }],
      [{ type: 'file', path: 'a/b/new', content: 'n' }, { type: 'whiteout', path: 'a' }, { type: 'file', path: 'a/c', content: 'c' }],
    ),
    expect: {
      ok: (r) => {
        expect(fs.readdirSync(path.join(r, 'a')).sort()).toEqual(['b', 'c']);
        expect(fs.readdirSync(path.join(r, 'a/b'))).toEqual(['new']);
        expect((fs.lstatSync(path.join(r, 'a')).mode & 0o7777).toString(8)).toBe('755');
        expect(llistxattr(path.join(r, 'a')).filter((x) => x.startsWith('user.'))).toEqual([]);
      },
    },
  },
  {
    name: 'a char device 0:0',
    image: layers([raw({ name: 'etc/passwd', type: 'character-device', devmajor: 0, devminor: 0 })]),
    expect: { fail: 'BAD_IMAGE', message: /^layer sha256:[0-9a-f]{64} of .*entry "etc\/passwd" is a character device 0:0/ },
  },
  {
    name: 'an entry replacing the root (a file named ./)',
    image: layers([raw({ name: './' }, 'root?')]),
    expect: { fail: 'BAD_IMAGE', message: /^layer sha256:[0-9a-f]{64} of .*entry "\.\/" names the root directory/ },
  },
  {
    name: 'an entry replacing the root (a symlink named .)',
    image: layers([raw({ name: '.', type: 'symlink', linkname: '../../sentinel' })]),
    expect: { fail: 'BAD_IMAGE', message: /^layer sha256:[0-9a-f]{64} of .*entry "\." names the root directory/ },
  },
  {
    name: 'a gzip bomb stops at max_layer_ratio',
    limits: 'ratio',
    image: layers([{ type: 'file', path: 'zeros', content: Buffer.alloc(24 * MiB) }]),
    expect: { fail: 'BAD_IMAGE', message: /^layer sha256:[0-9a-f]{64} of .*inflates more than 10 times.*max_layer_ratio/ },
  },
  {
    name: 'a gzip bomb stops at max_layer_bytes',
    limits: 'bytes',
    image: layers([{ type: 'file', path: 'zeros', content: Buffer.alloc(24 * MiB) }]),
    expect: { fail: 'BAD_IMAGE', message: /^layer sha256:[0-9a-f]{64} of .*inflates to more than 4194304 bytes.*max_layer_bytes/ },
  },
  {
    name: 'a layer whose diff_id is wrong',
    image: async () => {
      const l = await buildLayer([{ type: 'file', path: 'f', content: 'f' }], { compression: 'gzip' });
      return assembleImage([{ ...l, diffId: sha256('not this layer') }], { config: { Cmd: ['/bin/sh'] } });
    },
    expect: { fail: 'DIGEST_MISMATCH', message: /^layer sha256:[0-9a-f]{64} of .*but the image config's diff_id is sha256:/ },
  },
  {
    name: 'a manifest whose layer count differs from diff_ids',
    image: async () => {
      const l1 = await buildLayer([{ type: 'file', path: 'a', content: 'a' }], { compression: 'gzip' });
      const l2 = await buildLayer([{ type: 'file', path: 'b', content: 'b' }], { compression: 'gzip' });
      const two = assembleImage([l1, l2], {});
      const one = assembleImage([l1], {});
      const m = JSON.parse(two.manifest.bytes.toString('utf8')) as { config: unknown };
      m.config = { mediaType: one.config.mediaType, digest: one.config.digest, size: one.config.size };
      return { ...two, config: one.config, manifest: blobOf(Buffer.from(JSON.stringify(m)), two.manifest.mediaType) };
    },
    expect: { fail: 'BAD_IMAGE', message: /2 layers but the config has 1 diff_ids/ },
  },
];

function mountsBelowTmp(): string[] {
  return mountsUnder(readMounts(), tmp).map((m) => m.mountPoint);
}

/** What is in `<work_dir>/<sub>` (nothing when it does not exist). */
function listWork(work: string, sub: string): string[] {
  const dir = path.join(work, sub);
  return fs.existsSync(dir) ? fs.readdirSync(dir).sort() : [];
}

describe('hostile images: nothing leaves the rootfs, failures leave nothing behind', () => {
  CASES.forEach((c, i) => {
    for (const mode of MODES) {
      it(`${c.name} (${mode})`, async () => {
        const repo = `hostile/c${i}`;
        if (mode === MODES[0]) await pushImage(registry.url, repo, 'v1', await c.image());
        const bundle = path.join(area, `bundle-${++n}`);
        const limits = c.limits ?? 'none';
        const work = workDir(mode, limits);
        const bundlesBefore = listWork(work, 'bundles');
        let err: unknown = null;
        try {
          await puller(mode, limits).pull(`${registry.host}/${repo}:v1`, bundle);
        } catch (e) {
          err = e;
        }
        expect(await snapshotTree(sentinel)).toEqual(sentinelSnap);
        if ('fail' in c.expect) {
          expect(err, 'the pull fails').toBeInstanceOf(GuestpullError);
          const g = err as GuestpullError;
          expect(g.code).toBe(c.expect.fail);
          expect(g.message).toMatch(c.expect.message);
          expect(fs.existsSync(bundle) ? fs.readdirSync(bundle) : [], 'the bundle holds nothing').toEqual([]);
          expect(listWork(work, 'staging'), 'staging leftovers').toEqual([]);
          expect(listWork(work, 'bundles'), 'bundle records left by the failed pull').toEqual(bundlesBefore);
          expect(mountsBelowTmp(), 'mounts left under the temp dir').toEqual([]);
        } else {
          if (err) throw err;
          const rootfs = path.join(bundle, 'rootfs');
          expect(mountsBelowTmp().includes(rootfs), 'the rootfs is a mount exactly in overlay mode').toBe(mode === 'overlay');
          c.expect.ok(rootfs);
          expect(listWork(work, 'staging'), 'staging leftovers').toEqual([]);
          await removeTree(bundle);
          expect(mountsBelowTmp(), 'mounts left under the temp dir').toEqual([]);
        }
        expect(await snapshotTree(sentinel)).toEqual(sentinelSnap);
      }, 60_000);
    }
  });
});
