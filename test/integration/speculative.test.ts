/**
 * Speculative layer builds (src/pull/store/speculative.ts): a layer unpacked into its own upper
 * directory while its parents are still being unpacked must end exactly as an ordinary build
 * through an overlay of its parents. Each stack is built twice with the real store, applier and
 * overlay mounts: once one layer after another (speculative: false), once with every parent held
 * back until the layer above it has finished its own part (the whole layer, or up to the entry
 * that needs the parents), so every layer but the base is speculative. The merged views (a
 * read-only overlay of the store layers) are compared entry by entry, extended attributes too.
 * Needs root and overlayfs, like the store's overlay mode.
 */
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { GuestpullError } from '../../src/errors.js';
import { silentLogger } from '../../src/log.js';
import { llistxattr, lgetxattr, MNT_DETACH, nativeAvailable, umount } from '../../src/native/index.js';
import { applyLayer } from '../../src/pull/layers/index.js';
import { chainIds, Store, type LayerSpec, type UnpackHooks } from '../../src/pull/store/index.js';
import { summarizeTree } from '../../src/pull/store/fsck.js';
import { mountsUnder, readMounts } from '../../src/pull/store/mountinfo.js';
import { mountLowerView, unmountQuietly } from '../../src/pull/store/overlay.js';
import { buildLayer, type BuiltLayer, type EntrySpec } from '../helpers/image-builder.js';
import { randomStack } from '../helpers/random-stack.js';
import { diffTrees, snapshotTree, type TreeEntry } from '../helpers/tree.js';

const canRun = process.getuid?.() === 0 && nativeAvailable();
let tmp: string;
let n = 0;

beforeAll(async () => {
  tmp = await mkdtemp(path.join(os.tmpdir(), 'guestpull-speculative-'));
});

afterAll(async () => {
  if (!tmp) return;
  for (const m of mountsUnder(readMounts(), tmp)) umount(m.mountPoint, MNT_DETACH);
  await rm(tmp, { recursive: true, force: true });
});

interface Built {
  tree: TreeEntry[];
  xattrs: Map<string, string>;
  /** Per layer: built speculatively, and whether it needed its parents part-way. */
  layers: { speculative: boolean; switched: boolean }[];
}

/** A gate: `open()` lets every `wait()` through. */
function gate(): { wait: Promise<void>; open: () => void } {
  let open!: () => void;
  const wait = new Promise<void>((resolve) => (open = resolve));
  return { wait, open };
}

/** Extended attributes of every path in the merged view (overlay's own names are never visible). */
function xattrsOf(root: string, tree: TreeEntry[]): Map<string, string> {
  const out = new Map<string, string>();
  for (const e of tree) {
    const p = e.path === '.' ? root : path.join(root, e.path);
    for (const name of llistxattr(p).sort()) out.set(`${e.path} ${name}`, lgetxattr(p, name)?.toString('hex') ?? '');
  }
  return out;
}

async function build(layers: BuiltLayer[], speculative: boolean): Promise<Built> {
  const workDir = path.join(tmp, `w${++n}`);
  const store = await Store.open({ workDir, logger: silentLogger(), speculative });
  const chain = chainIds(layers.map((l) => l.diffId));
  const seen: Built['layers'] = layers.map(() => ({ speculative: false, switched: false }));
  // gates[i] holds layer i back until layer i + 1 is done with what it can do alone.
  const gates = layers.map(() => gate());
  gates[layers.length - 1]!.open();
  const specs: LayerSpec[] = layers.map((l, i) => ({
    chainId: chain[i]!,
    diffId: l.diffId,
    layerDigest: l.digest,
    mediaType: l.mediaType,
    compressedBytes: l.size,
    unpack: async (root: string, signal?: AbortSignal, hooks?: UnpackHooks) => {
      hooks?.started?.();
      if (speculative) await gates[i]!.wait;
      const release = (): void => gates[i - 1]?.open();
      const ask = hooks?.lower;
      seen[i]!.speculative = ask !== undefined;
      const lower = ask
        ? async (rootEntry: boolean) => {
            seen[i]!.switched = true;
            release();
            return ask(rootEntry);
          }
        : undefined;
      try {
        const r = await applyLayer({
          source: Readable.from([l.bytes]),
          mediaType: l.mediaType,
          compressedSize: l.size,
          diffId: l.diffId,
          layerDigest: l.digest,
          rootfs: root,
          image: 'speculative-test',
          logger: silentLogger(),
          ...(signal ? { signal } : {}),
          ...(lower ? { lower } : {}),
        });
        return { entries: r.entries, uncompressedBytes: r.uncompressedBytes, rootEntry: r.rootEntry, switched: r.switched };
      } finally {
        release();
      }
    },
  }));
  try {
    await store.ensureLayers(specs, silentLogger());
    const dirs = chain.map((c) => store.layout.layerDiff(c.slice('sha256:'.length))).reverse();
    // What fsck checks: every recorded tree summary is the published tree's.
    for (const c of chain) {
      const rec = await store.layer(c);
      expect(rec?.tree, `record of ${c}`).toEqual(await summarizeTree(store.layout.layerDiff(c.slice('sha256:'.length))));
    }
    let view = dirs[0]!;
    if (dirs.length > 1) {
      view = path.join(workDir, 'view');
      await mkdir(view);
      mountLowerView(dirs, view, store.layout.layersDir);
    }
    try {
      const tree = await snapshotTree(view);
      return { tree, xattrs: xattrsOf(view, tree), layers: seen };
    } finally {
      if (view !== dirs[0]) unmountQuietly(view);
    }
  } finally {
    await store.release();
  }
}

/** Both builds; a stack the ordinary build refuses must be refused the same way. Undefined then. */
async function compare(stack: EntrySpec[][], what: string): Promise<Built | undefined> {
  const layers = await Promise.all(stack.map((entries) => buildLayer(entries, { compression: 'none' })));
  const outcome = (p: Promise<Built>): Promise<Built | Error> => p.catch((e: unknown) => (e instanceof Error ? e : new Error(String(e))));
  const plain = await outcome(build(layers, false));
  const spec = await outcome(build(layers, true));
  if (plain instanceof Error) {
    expect(spec instanceof Error ? `${(spec as GuestpullError).code}: ${spec.message}` : 'built', `${what}: refused alike`).toBe(`${(plain as GuestpullError).code}: ${plain.message}`);
    return undefined;
  }
  if (spec instanceof Error) throw spec;
  expect(diffTrees(plain.tree, spec.tree), `${what}: ordinary vs speculative; layers ${JSON.stringify(stack)}`).toEqual([]);
  expect([...spec.xattrs], `${what}: xattrs`).toEqual([...plain.xattrs]);
  expect(plain.layers.every((l) => !l.speculative), `${what}: the ordinary build speculated`).toBe(true);
  expect(spec.layers.slice(1).every((l) => l.speculative), `${what}: every layer above the base is speculative`).toBe(true);
  return spec;
}

const dir = (p: string, extra: Partial<{ mode: number; uid: number }> = {}): EntrySpec => ({ type: 'dir', path: p, mode: extra.mode ?? 0o755, uid: extra.uid ?? 0, gid: extra.uid ?? 0 });
const file = (p: string, content: string): EntrySpec => ({ type: 'file', path: p, content, mode: 0o644 });
const xdir = (p: string, xattrs: Record<string, string>, mode = 0o755): EntrySpec => ({
  type: 'raw',
  header: { name: `${p}/`, type: 'directory', mode, pax: Object.fromEntries(Object.entries(xattrs).map(([k, v]) => [`SCHILY.xattr.${k}`, v])) },
});

/** The layer with a directory entry (0755, root) before the first entry beneath each directory it does not list yet. */
function withParents(layer: EntrySpec[]): EntrySpec[] {
  const listed = new Set<string>();
  const out: EntrySpec[] = [];
  for (const e of layer) {
    const p = e.type === 'raw' ? e.header.name : e.path;
    const parts = p.split('/').filter((x) => x !== '');
    const upTo = e.type === 'opaque' ? parts.length : parts.length - 1;
    for (let i = 1; i <= upTo; i++) {
      const d = parts.slice(0, i).join('/');
      if (listed.has(d)) continue;
      listed.add(d);
      out.push(dir(d));
    }
    const self = parts.join('/');
    if (e.type !== 'opaque') for (const d of [...listed]) if (d === self || d.startsWith(`${self}/`)) listed.delete(d);
    if (e.type === 'dir') listed.add(self);
    out.push(e);
  }
  return out;
}

async function compareOk(stack: EntrySpec[][], what: string): Promise<Built> {
  const r = await compare(stack, what);
  if (r === undefined) throw new Error(`${what}: the ordinary build refused the stack`);
  return r;
}

describe.skipIf(!canRun)('speculative layer builds == ordinary builds', () => {
  it('layers that need nothing below: merged directories keep lower xattrs, a directory over a file hides it, whiteouts only where something is hidden', async () => {
    const r = await compareOk(
      [
        [xdir('etc', { 'user.lower': 'L', 'user.both': 'lower' }), file('etc/a', 'a'), file('etc/b', 'b'), dir('etc/sub'), file('etc/sub/x', 'x'), file('f', 'was a file'), dir('d'), file('d/keep', 'k'), file('d/gone', 'g'), dir('g'), file('g/old', 'o')],
        [xdir('etc', { 'user.both': 'upper', 'user.own': 'U' }, 0o750), file('etc/a', 'a2'), { type: 'whiteout', path: 'etc/b' }, dir('f', { mode: 0o700 }), file('f/inner', 'i'), dir('new'), { type: 'whiteout', path: 'new/never' }, file('new/n', 'n'), dir('d'), { type: 'opaque', path: 'd' }, file('d/only', 'o'), file('g', 'a file now')],
        [dir('etc'), { type: 'whiteout', path: 'etc/sub' }, dir('new'), { type: 'whiteout', path: 'new/n' }, dir('d'), file('d/later', 'l'), { type: 'hardlink', path: 'd/later-link', target: 'd/later' }],
        [dir('g'), file('g/new', 'n')],
      ],
      'fixed',
    );
    expect(r.layers.slice(1).some((l) => !l.switched), 'some layer finished without its parents').toBe(true);
  });

  it('layers that need their parents part-way: implied directories, hard links to lower files, whiteouts of their own entries', async () => {
    const r = await compareOk(
      [
        [xdir('usr', { 'user.tag': 'base' }), dir('usr/lib'), file('usr/lib/libc', 'c'), { type: 'symlink', path: 'lib', target: 'usr/lib' }],
        [dir('opt'), file('opt/o', 'o'), file('usr/lib/implied-parent', 'p'), { type: 'hardlink', path: 'opt/libc-link', target: 'usr/lib/libc' }],
        [dir('opt'), file('opt/t', 't'), { type: 'whiteout', path: 'opt/t' }, file('lib/through-symlink', 's'), dir('opt/again'), { type: 'whiteout', path: 'opt/again' }],
      ],
      'fixed',
    );
    expect(r.layers.slice(1).every((l) => l.switched), 'every upper layer needed its parents').toBe(true);
  });

  it('random layer stacks, as they come and with every parent directory listed (as tar writers do)', async () => {
    let switched = 0;
    let alone = 0;
    let refused = 0;
    for (let seed = 2000; seed < 2030; seed++) {
      for (const [what, stack] of [
        ['as generated', randomStack(seed)],
        ['parents listed', randomStack(seed).map(withParents)],
      ] as const) {
        const r = await compare(stack, `seed ${seed} ${what}`);
        if (r === undefined) refused++;
        for (const l of r?.layers.slice(1) ?? []) (l.switched ? switched++ : alone++);
      }
    }
    // Both paths must have been taken, or the comparison proves little.
    expect(switched, 'layers that switched to their parents').toBeGreaterThan(5);
    expect(alone, 'layers unpacked entirely alone').toBeGreaterThan(5);
    expect(refused, 'stacks both builds refused').toBeLessThan(20);
  }, 120_000);
});
