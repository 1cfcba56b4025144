/**
 * Issue 5 §6: overlay and copy bundles give the same tree. Every image is pushed to the real
 * registry and pulled twice through the real Puller, once with `snapshotter = "overlay"` (rootfs an
 * overlay mount of store layers, each unpacked through an overlay of its parents) and once with
 * `snapshotter = "copy"` (layers applied in order into a plain directory); the two trees are
 * compared entry by entry (type, mode, owner, size, content, symlink target, hard link groups).
 * Images: the rich fixture (also against `umoci unpack`), layers that lean on their parents
 * (symlinked and implied parent directories, hard links to lower files, whiteouts and opaque
 * markers in directories the layer does not list), and random layer stacks whose seed is printed
 * on failure. Every mount is taken down in afterAll.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { parseConfig } from '../../src/config/index.js';
import { ErrorCode, GuestpullError } from '../../src/errors.js';
import { silentLogger } from '../../src/log.js';
import { MNT_DETACH, umount } from '../../src/native/index.js';
import { Puller } from '../../src/pull/index.js';
import { mountsUnder, readMounts } from '../../src/pull/store/mountinfo.js';
import { buildImage, type EntrySpec } from '../helpers/image-builder.js';
import { pushImage } from '../helpers/push.js';
import { hasRegistryBinary, startRegistry, type RunningRegistry } from '../helpers/registry.js';
import { randomStack } from '../helpers/random-stack.js';
import { diffTrees, expectedTreeFromLayers, snapshotTree, type TreeEntry } from '../helpers/tree.js';
import { hasSkopeoUmoci, referenceUnpack } from '../helpers/umoci.js';
import { richImage } from './fixtures.js';

let tmp: string;
let registry: RunningRegistry;
let overlay: Puller;
let copy: Puller;
let n = 0;

function puller(snapshotter: 'overlay' | 'copy' | 'auto'): Puller {
  const toml = [
    '[image]',
    `work_dir = ${JSON.stringify(path.join(tmp, `work-${snapshotter}`))}`,
    `snapshotter = "${snapshotter}"`,
    '[[image.registry_config.registry]]',
    `location = "${registry.host}"`,
    'insecure = true',
    '',
  ].join('\n');
  return new Puller({ config: parseConfig(toml, 'overlay.test').config, logger: silentLogger(), version: 'overlay-test' });
}

beforeAll(async () => {
  if (!hasRegistryBinary()) throw new Error('docker-registry is not installed: apt-get install docker-registry');
  tmp = await mkdtemp(path.join(os.tmpdir(), 'guestpull-overlay-'));
  registry = await startRegistry();
  overlay = puller('overlay');
  copy = puller('copy');
}, 60_000);

afterAll(async () => {
  await overlay?.close();
  await copy?.close();
  await registry?.stop();
  if (tmp) {
    for (const m of mountsUnder(readMounts(), tmp)) umount(m.mountPoint, MNT_DETACH);
    await rm(tmp, { recursive: true, force: true });
  }
});

/** Pull `repo:v1` in both modes; the two rootfs trees. */
async function pullBoth(repo: string): Promise<{ overlayTree: TreeEntry[]; copyTree: TreeEntry[]; overlayRootfs: string }> {
  const image = `${registry.host}/${repo}:v1`;
  const a = path.join(tmp, 'bundles', `o${++n}`);
  const b = path.join(tmp, 'bundles', `c${n}`);
  expect((await overlay.pull(image, a)).snapshotter).toBe('overlay');
  expect((await copy.pull(image, b)).snapshotter).toBe('copy');
  const overlayRootfs = path.join(a, 'rootfs');
  // Really an overlay mount of the store, and really a plain directory.
  expect(readMounts().some((m) => m.mountPoint === overlayRootfs && m.fstype === 'overlay')).toBe(true);
  expect(readMounts().some((m) => m.mountPoint === path.join(b, 'rootfs'))).toBe(false);
  return { overlayTree: await snapshotTree(overlayRootfs), copyTree: await snapshotTree(path.join(b, 'rootfs')), overlayRootfs };
}

async function push(repo: string, layers: EntrySpec[][]): Promise<void> {
  await pushImage(registry.url, repo, 'v1', await buildImage({ layers, config: { Cmd: ['/bin/sh'] } }));
}

describe('overlay bundle == copy bundle', () => {
  it('for the rich fixture, and both equal umoci unpack', async () => {
    await pushImage(registry.url, 'fixtures/rich', 'v1', await richImage('oci'));
    const { overlayTree, copyTree } = await pullBoth('fixtures/rich');
    expect(diffTrees(copyTree, overlayTree)).toEqual([]);
    expect(overlayTree.length).toBeGreaterThan(20);
    if (!hasSkopeoUmoci()) throw new Error('skopeo and umoci are required: apt-get install skopeo umoci');
    const ref = await referenceUnpack(registry.host, 'fixtures/rich', 'v1', await mkdtemp(path.join(tmp, 'umoci-')));
    expect(diffTrees(await snapshotTree(ref.rootfs), overlayTree)).toEqual([]);
  });

  it('for layers that lean on their parents', async () => {
    const layers: EntrySpec[][] = [
      [
        { type: 'dir', path: 'usr', mode: 0o755 },
        { type: 'dir', path: 'usr/lib', mode: 0o750, uid: 7, gid: 8 },
        { type: 'symlink', path: 'lib', target: 'usr/lib' },
        { type: 'dir', path: 'deep', mode: 0o700, uid: 1000, gid: 1000 },
        { type: 'dir', path: 'deep/er', mode: 0o711, uid: 1001, gid: 1001 },
        { type: 'file', path: 'deep/er/old', content: 'old\n' },
        { type: 'file', path: 'deep/er/keep', content: 'keep\n' },
        { type: 'dir', path: 'opq', mode: 0o755 },
        { type: 'file', path: 'opq/hidden', content: 'hidden\n' },
        { type: 'file', path: 'shared', content: 'linked from above\n', mode: 0o640, uid: 5, gid: 6 },
        { type: 'dir', path: 'flip', mode: 0o755 },
        { type: 'file', path: 'flip/child', content: 'gone with its parent\n' },
      ],
      [
        // through the lower symlink lib -> usr/lib, without listing lib or usr/lib
        { type: 'file', path: 'lib/libx.so', content: 'via symlink\n' },
        // in a directory the layer only implies: its owner and mode come from below
        { type: 'file', path: 'deep/er/new', content: 'new\n' },
        // a whiteout and an opaque marker in directories this layer does not list
        { type: 'whiteout', path: 'deep/er/old' },
        { type: 'opaque', path: 'opq' },
        // a hard link to a lower file
        { type: 'hardlink', path: 'shared-link', target: 'shared' },
        // a directory replaced by a file, and a file by a directory
        { type: 'file', path: 'flip', content: 'now a file\n' },
        { type: 'dir', path: 'shared-dir', mode: 0o755 },
      ],
      [
        { type: 'whiteout', path: 'flip' },
        { type: 'dir', path: 'flip', mode: 0o700 },
        { type: 'file', path: 'flip/again', content: 'a directory again\n' },
        { type: 'hardlink', path: 'deep/er/keep2', target: 'deep/er/keep' },
      ],
    ];
    await push('fixtures/leaning', layers);
    const { overlayTree, copyTree } = await pullBoth('fixtures/leaning');
    expect(diffTrees(copyTree, overlayTree)).toEqual([]);
    const get = (p: string): TreeEntry | undefined => overlayTree.find((e) => e.path === p);
    expect(get('usr/lib/libx.so')?.type).toBe('file');
    expect(get('lib')?.type).toBe('symlink');
    expect(get('deep/er')).toMatchObject({ mode: 0o711, uid: 1001, gid: 1001 });
    expect(get('deep/er/old')).toBeUndefined();
    expect(get('opq/hidden')).toBeUndefined();
    expect(get('shared-link')?.linkGroup).toBe(get('shared')?.linkGroup);
    expect(get('shared-link')?.linkGroup).toBeDefined();
    expect(get('flip/child')).toBeUndefined();
    expect(get('flip/again')?.type).toBe('file');
  });

  it('for deep images (lower directories passed relative to the store), and deeper ones fall back to copy under auto', async () => {
    const deep = (n: number): EntrySpec[][] =>
      Array.from({ length: n }, (_, i) => [
        { type: 'dir', path: 'layers', mode: 0o755 },
        { type: 'file', path: `layers/${i}`, content: `layer ${i}\n` },
        ...(i > 0 ? [{ type: 'whiteout' as const, path: `layers/${i - 1}` }] : []),
      ]);
    await push('fixtures/deep40', deep(40));
    const { overlayTree, copyTree } = await pullBoth('fixtures/deep40');
    expect(diffTrees(copyTree, overlayTree)).toEqual([]);
    expect(overlayTree.filter((e) => e.path.startsWith('layers/')).map((e) => e.path)).toEqual(['layers/39']);

    await push('fixtures/deep70', deep(70));
    const image = `${registry.host}/fixtures/deep70:v1`;
    const err = await overlay.pull(image, path.join(tmp, 'bundles', 'deep70-overlay')).then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(GuestpullError);
    expect((err as GuestpullError).code).toBe(ErrorCode.UNIMPLEMENTED);
    expect((err as GuestpullError).message).toMatch(/70 layers.*snapshotter/);
    const auto = puller('auto');
    try {
      const r = await auto.pull(image, path.join(tmp, 'bundles', 'deep70-auto'));
      expect(r.snapshotter).toBe('copy');
    } finally {
      await auto.close();
    }
  });

  it('for random layer stacks', async () => {
    const seeds = Array.from({ length: 24 }, (_, i) => 1000 + i);
    for (const seed of seeds) {
      const layers = randomStack(seed);
      await push(`random/s${seed}`, layers);
      const { overlayTree, copyTree } = await pullBoth(`random/s${seed}`);
      expect(diffTrees(copyTree, overlayTree), `seed ${seed}: overlay vs copy; layers ${JSON.stringify(layers)}`).toEqual([]);
      expect(overlayTree.length, `seed ${seed}`).toBeGreaterThan(1);
    }
  }, 120_000);
});
