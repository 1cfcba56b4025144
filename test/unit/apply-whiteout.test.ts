/**
 * LayerApplier: whiteouts and opaque markers against what this same layer did before them.
 * - A whiteout or opaque marker that would remove a lower-layer symlink (or a lower directory
 *   holding one) that earlier entries of the layer were resolved through is refused: the result
 *   would depend on entry order, and the writes already went into the symlink's target.
 * - A directory kept under a whiteout or opaque marker ("renewed") ends as if the layer had made
 *   it: no lower xattrs, the layer's own mtime, or a fresh one when the layer only implies it.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { lgetxattr, llistxattr } from '../../src/native/index.js';
import { applyTar, LAYER_DIGEST, listTree, packTar, snapshot, type PackEntry } from './_layers-tar.js';

const isRoot = process.getuid?.() === 0;
let base: string;
let root: string;

beforeEach(() => {
  base = fs.mkdtempSync(path.join(os.tmpdir(), 'gp-apply-wh-'));
  root = path.join(base, 'rootfs');
  fs.mkdirSync(root);
});
afterEach(() => {
  fs.rmSync(base, { recursive: true, force: true });
});

const at = (p: string): string => path.join(root, p);
const apply = async (entries: PackEntry[]): Promise<void> => {
  await applyTar(root, await packTar(entries));
};
const wh = (name: string): PackEntry => ({ name, content: '' });
/** The BAD_IMAGE refusal, naming the whiteout entry, the symlink, the earlier entry and the layer. */
function refusal(entry: string, link: string, earlier: string): Record<string, unknown> {
  const q = (s: string): string => JSON.stringify(s).replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
  return {
    code: 'BAD_IMAGE',
    message: expect.stringMatching(
      new RegExp(`^layer ${LAYER_DIGEST} of .*entry ${q(entry)} .*lower-layer symlink ${q(link)}.*entry ${q(earlier)}`),
    ),
  };
}

/** Lower layer: directory c with a file, a -> c, x/l -> ../c, chain p -> q -> c. */
async function lowerWithLinks(): Promise<void> {
  await apply([
    { name: 'c/', type: 'directory' },
    { name: 'c/old', content: 'o' },
    { name: 'a', type: 'symlink', linkname: 'c' },
    { name: 'x/', type: 'directory' },
    { name: 'x/l', type: 'symlink', linkname: '../c' },
    { name: 'p', type: 'symlink', linkname: 'q' },
    { name: 'q', type: 'symlink', linkname: '/c' },
    { name: 'other', content: 'other' },
  ]);
}

describe('whiteouts after entries resolved through a lower-layer symlink', () => {
  const refused: [string, PackEntry[], Record<string, unknown>][] = [
    ['a whiteout of the symlink after a file written through it', [{ name: 'a/new', content: 'n' }, wh('.wh.a')], refusal('.wh.a', '/a', 'a/new')],
    ['a whiteout of the symlink after a directory made through it', [{ name: 'a/sub/', type: 'directory' }, wh('.wh.a')], refusal('.wh.a', '/a', 'a/sub/')],
    ['an opaque marker at the root after a file written through it', [{ name: 'a/new', content: 'n' }, wh('.wh..wh..opq')], refusal('.wh..wh..opq', '/a', 'a/new')],
    ['a whiteout of the directory holding the symlink', [{ name: 'x/l/new', content: 'n' }, wh('.wh.x')], refusal('.wh.x', '/x/l', 'x/l/new')],
    ['an opaque marker in the directory holding the symlink', [{ name: 'x/l/new', content: 'n' }, wh('x/.wh..wh..opq')], refusal('x/.wh..wh..opq', '/x/l', 'x/l/new')],
    [
      'an opaque marker above a directory this layer wrote that holds the symlink',
      [{ name: 'x/mine', content: 'm' }, { name: 'x/l/new', content: 'n' }, wh('.wh..wh..opq')],
      refusal('.wh..wh..opq', '/x/l', 'x/l/new'),
    ],
    ['a whiteout of the second link of a chain', [{ name: 'p/new', content: 'n' }, wh('.wh.q')], refusal('.wh.q', '/q', 'p/new')],
    ['a whiteout through the symlink, then of the symlink', [wh('a/.wh.old'), wh('.wh.a')], refusal('.wh.a', '/a', 'a/.wh.old')],
    ['a hard link through the symlink, then a whiteout of it', [{ name: 'h', type: 'link', linkname: 'a/old' }, wh('.wh.a')], refusal('.wh.a', '/a', 'h')],
  ];
  for (const [what, entries, expected] of refused) {
    it(`refuses ${what}`, async () => {
      await lowerWithLinks();
      await expect(apply(entries)).rejects.toMatchObject(expected);
    });
  }

  it('allows a whiteout of a symlink the layer made itself, and whiteouts of what it did not go through', async () => {
    await lowerWithLinks();
    await apply([
      { name: 'mine', type: 'symlink', linkname: 'c' },
      { name: 'mine/new', content: 'n' },
      wh('.wh.mine'),
      { name: 'a/viaa', content: 'v' },
      wh('.wh.other'),
      wh('.wh.p'),
      wh('x/.wh.nothing'),
    ]);
    expect(listTree(root)).toEqual(['a', 'c', 'c/new', 'c/old', 'c/viaa', 'mine', 'q', 'x', 'x/l']);
  });

  it('a whiteout of the symlink target directory keeps what the layer wrote through the link (either order gives the same)', async () => {
    for (const first of [true, false]) {
      fs.rmSync(root, { recursive: true });
      fs.mkdirSync(root);
      await lowerWithLinks();
      const news: PackEntry[] = [{ name: 'a/new', content: 'n' }];
      await apply(first ? [wh('.wh.c'), ...news] : [...news, wh('.wh.c')]);
      expect(listTree(root), first ? 'whiteout first' : 'whiteout last').toEqual(['a', 'c', 'c/new', 'other', 'p', 'q', 'x', 'x/l']);
    }
  });

  it('a whiteout of the symlink before entries beneath its name gives a fresh directory and leaves the target alone', async () => {
    await lowerWithLinks();
    const before = snapshot(at('c'));
    await apply([wh('.wh.a'), { name: 'a/new', content: 'n' }, wh('.wh.x'), { name: 'x/l/new', content: 'n' }]);
    const a = fs.lstatSync(at('a'));
    expect(a.isDirectory()).toBe(true);
    expect((a.mode & 0o7777).toString(8)).toBe('755');
    expect(fs.readFileSync(at('a/new'), 'utf8')).toBe('n');
    expect(fs.lstatSync(at('x/l')).isDirectory()).toBe(true);
    expect(fs.readFileSync(at('x/l/new'), 'utf8')).toBe('n');
    expect(snapshot(at('c'))).toEqual(before);
    expect(listTree(root)).toEqual(['a', 'a/new', 'c', 'c/old', 'other', 'p', 'q', 'x', 'x/l', 'x/l/new']);
  });

  it('an opaque marker at the root before entries beneath a lower symlink gives fresh directories', async () => {
    await lowerWithLinks();
    await apply([wh('.wh..wh..opq'), { name: 'a/new', content: 'n' }]);
    expect(listTree(root)).toEqual(['a', 'a/new']);
  });
});

const T0 = new Date('2001-02-03T04:05:06Z');
const T1 = new Date('2011-12-13T14:15:16Z');
const xattr = (name: string, value: string): Record<string, string> => ({ [`SCHILY.xattr.${name}`]: value });

describe('a renewed directory sheds lower xattrs and mtime', () => {
  /** Lower: a/ and a/b/ with user xattrs and an old mtime, and nothing else in a (so nothing removed touches its mtime). */
  const lower = async (): Promise<void> => {
    await apply([
      { name: 'a/', type: 'directory', mode: 0o700, mtime: T0, pax: { ...xattr('user.lower', '1'), ...xattr('user.both', 'lower') } },
      { name: 'a/b/', type: 'directory', mode: 0o700, mtime: T0, pax: xattr('user.lowerb', '1') },
      { name: 'a/b/old', content: 'o' },
    ]);
    if (isRoot) expect(llistxattr(at('a')).sort()).toEqual(['user.both', 'user.lower']);
  };
  const userXattrs = (p: string): string[] => llistxattr(at(p)).filter((n) => n.startsWith('user.')).sort();

  for (const first of [true, false]) {
    const order = first ? 'whiteout first' : 'whiteout last';

    it.skipIf(!isRoot)(`.wh.a with a/b/new (${order}): a and a/b carry no lower xattrs and a fresh mtime`, async () => {
      await lower();
      const started = Date.now();
      const news: PackEntry[] = [{ name: 'a/b/new', content: 'n' }];
      await apply(first ? [wh('.wh.a'), ...news] : [...news, wh('.wh.a')]);
      expect(listTree(root)).toEqual(['a', 'a/b', 'a/b/new']);
      for (const d of ['a', 'a/b']) {
        expect(userXattrs(d), `${d} xattrs`).toEqual([]);
        const st = fs.lstatSync(at(d));
        expect((st.mode & 0o7777).toString(8)).toBe('755');
        expect(st.mtimeMs, `${d} mtime`).toBeGreaterThanOrEqual(started - 2000);
      }
    });

    it.skipIf(!isRoot)(`.wh.a with an explicit a/ entry (${order}): a has only the entry's xattrs and mtime`, async () => {
      await lower();
      const news: PackEntry[] = [
        { name: 'a/', type: 'directory', mode: 0o751, mtime: T1, pax: { ...xattr('user.upper', '2'), ...xattr('user.both', 'upper') } },
        { name: 'a/b/new', content: 'n' },
      ];
      await apply(first ? [wh('.wh.a'), ...news] : [...news, wh('.wh.a')]);
      expect(userXattrs('a')).toEqual(['user.both', 'user.upper']);
      expect(lgetxattr(at('a'), 'user.both')?.toString()).toBe('upper');
      expect(userXattrs('a/b')).toEqual([]);
      const st = fs.lstatSync(at('a'));
      expect((st.mode & 0o7777).toString(8)).toBe('751');
      expect(st.mtimeMs).toBe(T1.getTime());
    });

    it.skipIf(!isRoot)(`a/.wh..wh..opq with a/b/new (${order}): a/b is renewed, a keeps its own xattrs`, async () => {
      await lower();
      const news: PackEntry[] = [{ name: 'a/b/new', content: 'n' }];
      await apply(first ? [wh('a/.wh..wh..opq'), ...news] : [...news, wh('a/.wh..wh..opq')]);
      expect(listTree(root)).toEqual(['a', 'a/b', 'a/b/new']);
      expect(userXattrs('a')).toEqual(['user.both', 'user.lower']);
      expect((fs.lstatSync(at('a')).mode & 0o7777).toString(8)).toBe('700');
      expect(userXattrs('a/b')).toEqual([]);
    });
  }

  it('a renewed directory without xattrs anywhere (any user) gets 0755 and a fresh mtime', async () => {
    await apply([{ name: 'a/', type: 'directory', mode: 0o700, mtime: T0 }, { name: 'a/b/', type: 'directory', mtime: T0 }]);
    const started = Date.now();
    await apply([{ name: 'a/b/new', content: 'n' }, wh('.wh.a')]);
    const st = fs.lstatSync(at('a'));
    expect((st.mode & 0o7777).toString(8)).toBe('755');
    expect(st.mtimeMs).toBeGreaterThanOrEqual(started - 2000);
  });
});
