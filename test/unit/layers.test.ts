/**
 * applyLayer: what a layer leaves in the rootfs (types, modes, owners, content, links, times) and
 * the layer rules (whiteouts, opaque markers, replacement), each asserted on the resulting tree.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { createLogger } from '../../src/log.js';
import { applyTar, packTar, type PackEntry, listTree } from './_layers-tar.js';

const isRoot = process.getuid?.() === 0;
let base: string;
let root: string;

beforeEach(() => {
  base = fs.mkdtempSync(path.join(os.tmpdir(), 'gp-layers-'));
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
/** Sorted relative paths of everything under the root. */
const tree = (): string[] => listTree(root);
function expectFile(p: string, content: string, mode: number, uid = 0, gid = 0): fs.Stats {
  const st = fs.lstatSync(at(p));
  expect(st.isFile(), `${p} is a file`).toBe(true);
  expect((st.mode & 0o7777).toString(8), `${p} mode`).toBe(mode.toString(8));
  if (isRoot) expect([st.uid, st.gid], `${p} owner`).toEqual([uid, gid]);
  expect(fs.readFileSync(at(p), 'utf8')).toBe(content);
  return st;
}
function expectDir(p: string, mode: number, uid = 0, gid = 0): fs.Stats {
  const st = fs.lstatSync(at(p));
  expect(st.isDirectory(), `${p} is a directory`).toBe(true);
  expect((st.mode & 0o7777).toString(8), `${p} mode`).toBe(mode.toString(8));
  if (isRoot) expect([st.uid, st.gid], `${p} owner`).toEqual([uid, gid]);
  return st;
}
function expectSymlink(p: string, target: string): fs.Stats {
  const st = fs.lstatSync(at(p));
  expect(st.isSymbolicLink(), `${p} is a symlink`).toBe(true);
  expect(fs.readlinkSync(at(p))).toBe(target);
  return st;
}

describe('applyLayer: entries', () => {
  it('creates files, directories, symlinks and hardlinks with content, modes and owners', async () => {
    const r = await applyTar(
      root,
      await packTar([
        { name: 'etc/', type: 'directory', mode: 0o755 },
        { name: 'etc/secret', content: 'top', mode: 0o640, uid: 1000, gid: 1000 },
        { name: 'bin/', type: 'directory', mode: 0o755 },
        { name: 'bin/su', content: 'su-binary', mode: 0o4755 },
        { name: 'bin/sgid', content: 'g', mode: 0o2711, gid: 42 },
        { name: 'tmp/', type: 'directory', mode: 0o1777 },
        { name: 'home/big/', type: 'directory', mode: 0o700, uid: 70000, gid: 70001 },
        { name: 'home/big/f', content: 'x', mode: 0o600, uid: 70000, gid: 70001 },
        { name: 'etc/abs', type: 'symlink', linkname: '/etc/secret', uid: 1000, gid: 1000 },
        { name: 'etc/rel', type: 'symlink', linkname: '../bin/su' },
        { name: 'etc/dangling', type: 'symlink', linkname: 'nowhere/at/all' },
        { name: 'bin/su-link', type: 'link', linkname: 'bin/su', mode: 0o4755 },
        { name: 'empty', content: '', mode: 0o444 },
      ]),
    );
    expect(r.entries).toBe(13);
    expect(r.uncompressedBytes % 512).toBe(0);
    expect(tree()).toEqual([
      'bin', 'bin/sgid', 'bin/su', 'bin/su-link', 'empty', 'etc', 'etc/abs', 'etc/dangling', 'etc/rel', 'etc/secret',
      'home', 'home/big', 'home/big/f', 'tmp',
    ]);
    expectDir('etc', 0o755);
    expectFile('etc/secret', 'top', 0o640, 1000, 1000);
    const su = expectFile('bin/su', 'su-binary', 0o4755);
    expectFile('bin/sgid', 'g', 0o2711, 0, 42);
    expectDir('tmp', 0o1777);
    expectDir('home', 0o755); // made as a missing parent
    expectDir('home/big', 0o700, 70000, 70001);
    expectFile('home/big/f', 'x', 0o600, 70000, 70001);
    const abs = expectSymlink('etc/abs', '/etc/secret');
    if (isRoot) expect([abs.uid, abs.gid]).toEqual([1000, 1000]);
    expectSymlink('etc/rel', '../bin/su');
    expectSymlink('etc/dangling', 'nowhere/at/all');
    const link = expectFile('bin/su-link', 'su-binary', 0o4755);
    expect(link.ino).toBe(su.ino);
    expect(link.nlink).toBe(2);
    expectFile('empty', '', 0o444);
  });

  it('applies uids and gids from PAX records beyond the octal field', async () => {
    await apply([{ name: 'f', content: 'p', mode: 0o644, pax: { uid: '3000000', gid: '3000001' } }]);
    const st = expectFile('f', 'p', 0o644, 3000000, 3000001);
    expect(st.size).toBe(1);
  });

  it('keeps setuid when the owner changes (chmod after chown)', async () => {
    await apply([{ name: 'suid', content: 's', mode: 0o6755, uid: 1000, gid: 1000 }]);
    expectFile('suid', 's', 0o6755, 1000, 1000);
  });

  it('sets mtimes of files, symlinks and directories (directories after their contents)', async () => {
    const t1 = new Date('2001-02-03T04:05:06Z');
    const t2 = new Date('2002-03-04T05:06:07Z');
    const t3 = new Date('2003-04-05T06:07:08Z');
    await apply([
      { name: 'd/', type: 'directory', mtime: t1 },
      { name: 'd/sub/', type: 'directory', mtime: t2 },
      { name: 'd/sub/f', content: 'x', mtime: t3 },
      { name: 'd/l', type: 'symlink', linkname: 'sub/f', mtime: t3 },
      { name: 'd/sub/g', content: 'y', mtime: t3 },
    ]);
    expect(fs.lstatSync(at('d')).mtime.getTime()).toBe(t1.getTime());
    expect(fs.lstatSync(at('d/sub')).mtime.getTime()).toBe(t2.getTime());
    expect(fs.lstatSync(at('d/sub/f')).mtime.getTime()).toBe(t3.getTime());
    expect(fs.lstatSync(at('d/l')).mtime.getTime()).toBe(t3.getTime());
  });

  it('takes sub-second mtimes from PAX', async () => {
    await apply([{ name: 'f', content: 'x', pax: { mtime: '1700000000.25' } }]);
    expect(fs.lstatSync(at('f')).mtimeMs).toBe(1700000000250);
  });

  it('applies metadata of a root entry ("./") without changing its type', async () => {
    await apply([
      { name: './', type: 'directory', mode: 0o750, uid: 5, gid: 6, mtime: new Date('2010-01-01T00:00:00Z') },
      { name: './a', content: 'a' },
    ]);
    const st = expectDir('.', 0o750, 5, 6);
    expect(st.mtime.getTime()).toBe(new Date('2010-01-01T00:00:00Z').getTime());
    expectFile('a', 'a', 0o644);
    expect(tree()).toEqual(['a']);
  });

  it('strips leading slashes and ./, and clamps .. at the root', async () => {
    await apply([
      { name: '/abs/file', content: '1' },
      { name: './dot/file', content: '2' },
      { name: 'x/../../../clamped', content: '3' },
    ]);
    expect(tree()).toEqual(['abs', 'abs/file', 'clamped', 'dot', 'dot/file']);
    expectFile('clamped', '3', 0o644);
  });

  it('merges a directory over a directory, updating its metadata and keeping its contents', async () => {
    await apply([
      { name: 'd/', type: 'directory', mode: 0o755 },
      { name: 'd/old', content: 'old' },
    ]);
    await apply([
      { name: 'd/', type: 'directory', mode: 0o700, uid: 1000, gid: 1000 },
      { name: 'd/new', content: 'new' },
    ]);
    expect(tree()).toEqual(['d', 'd/new', 'd/old']);
    expectDir('d', 0o700, 1000, 1000);
    expectFile('d/old', 'old', 0o644);
  });

  it('replaces a directory by a file, and a file by a directory', async () => {
    await apply([
      { name: 'a/', type: 'directory' },
      { name: 'a/deep/inner', content: 'i' },
      { name: 'b', content: 'file b' },
    ]);
    await apply([
      { name: 'a', content: 'now a file', mode: 0o600 },
      { name: 'b/', type: 'directory', mode: 0o711 },
      { name: 'b/c', content: 'c' },
    ]);
    expect(tree()).toEqual(['a', 'b', 'b/c']);
    expectFile('a', 'now a file', 0o600);
    expectDir('b', 0o711);
    expectFile('b/c', 'c', 0o644);
  });

  it('replaces a file by a symlink and a symlink by a file', async () => {
    await apply([
      { name: 'f', content: 'f' },
      { name: 's', type: 'symlink', linkname: 'f' },
    ]);
    await apply([
      { name: 'f', type: 'symlink', linkname: '/elsewhere' },
      { name: 's', content: 'real' },
    ]);
    expectSymlink('f', '/elsewhere');
    expectFile('s', 'real', 0o644);
    expect(tree()).toEqual(['f', 's']);
  });

  it('replaces a same-layer file later in the same layer (last entry wins)', async () => {
    await apply([
      { name: 'f', content: 'first' },
      { name: 'f', content: 'second', mode: 0o600 },
    ]);
    expectFile('f', 'second', 0o600);
  });

  it('hardlinks to a lower-layer file and to a symlink', async () => {
    await apply([
      { name: 'lower', content: 'L', mode: 0o644 },
      { name: 'sym', type: 'symlink', linkname: 'lower' },
    ]);
    await apply([
      { name: 'dir/hl', type: 'link', linkname: '/lower', mode: 0o644 },
      { name: 'dir/hs', type: 'link', linkname: './sym' },
    ]);
    expect(fs.lstatSync(at('dir/hl')).ino).toBe(fs.lstatSync(at('lower')).ino);
    expectFile('dir/hl', 'L', 0o644);
    const hs = expectSymlink('dir/hs', 'lower');
    expect(hs.ino).toBe(fs.lstatSync(at('sym')).ino);
  });

  it('a hard link entry never changes the owner or mode of the file it names', async () => {
    await apply([{ name: 'bin/su', content: 'S', mode: 0o4755, uid: 0, gid: 0 }]);
    await apply([{ name: 'bin/su-link', type: 'link', linkname: 'bin/su', mode: 0o777, uid: 1000, gid: 1000 }]);
    const st = fs.lstatSync(at('bin/su'));
    expect(st.ino).toBe(fs.lstatSync(at('bin/su-link')).ino);
    expect(st.mode & 0o7777).toBe(0o4755);
    expect([st.uid, st.gid]).toEqual([0, 0]);
  });

  it('resolves parents through in-root symlinks (absolute and relative)', async () => {
    await apply([
      { name: 'usr/lib/', type: 'directory' },
      { name: 'lib', type: 'symlink', linkname: 'usr/lib' },
      { name: 'usr/lib64', type: 'symlink', linkname: '/usr/lib' },
    ]);
    await apply([
      { name: 'lib/a.so', content: 'a' },
      { name: 'usr/lib64/b.so', content: 'b' },
    ]);
    expect(tree()).toEqual(['lib', 'usr', 'usr/lib', 'usr/lib/a.so', 'usr/lib/b.so', 'usr/lib64']);
  });
});

describe('applyLayer: whiteouts', () => {
  it('removes a lower-layer file and a lower-layer directory with its contents', async () => {
    await apply([
      { name: 'etc/keep', content: 'k' },
      { name: 'etc/gone', content: 'g' },
      { name: 'var/cache/', type: 'directory' },
      { name: 'var/cache/a/b', content: 'b' },
      { name: 'var/cache/l', type: 'symlink', linkname: '/etc' },
    ]);
    await apply([
      { name: 'etc/.wh.gone', content: '' },
      { name: 'var/.wh.cache', content: '' },
      { name: '.wh.nothing-here', content: '' },
      { name: 'missing/parent/.wh.x', content: '' },
    ]);
    expect(tree()).toEqual(['etc', 'etc/keep', 'var']);
  });

  it('removes a lower-layer symlink itself, not its target', async () => {
    await apply([
      { name: 'target/', type: 'directory' },
      { name: 'target/f', content: 'f' },
      { name: 'link', type: 'symlink', linkname: 'target' },
    ]);
    await apply([{ name: '.wh.link', content: '' }]);
    expect(tree()).toEqual(['target', 'target/f']);
  });

  it('leaves a file written by the same layer in place', async () => {
    await apply([{ name: 'd/f', content: 'lower' }]);
    await apply([
      { name: 'd/f', content: 'upper' },
      { name: 'd/.wh.f', content: '' },
      { name: 'd/g', content: 'g' },
      { name: 'd/.wh.g', content: '' },
    ]);
    expect(tree()).toEqual(['d', 'd/f', 'd/g']);
    expectFile('d/f', 'upper', 0o644);
  });

  it('a whiteout before the same-layer entry removes the lower one and keeps the new one', async () => {
    await apply([{ name: 'd/', type: 'directory' }, { name: 'd/old', content: 'o' }]);
    await apply([
      { name: '.wh.d', content: '' },
      { name: 'd/', type: 'directory', mode: 0o700 },
      { name: 'd/new', content: 'n' },
    ]);
    expect(tree()).toEqual(['d', 'd/new']);
    expectDir('d', 0o700);
  });

  it('whiting out a directory merged in this layer removes only its lower-layer contents', async () => {
    await apply([
      { name: 'd/', type: 'directory' },
      { name: 'd/lower', content: 'l' },
      { name: 'd/sub/lower', content: 'l' },
    ]);
    await apply([
      { name: 'd/', type: 'directory', mode: 0o750 },
      { name: 'd/upper', content: 'u' },
      { name: 'd/sub/upper', content: 'u' },
      { name: '.wh.d', content: '' },
    ]);
    expect(tree()).toEqual(['d', 'd/sub', 'd/sub/upper', 'd/upper']);
    expectDir('d', 0o750);
  });

  it('an opaque marker after its siblings hides lower children and keeps same-layer ones', async () => {
    await apply([
      { name: 'd/', type: 'directory' },
      { name: 'd/lower1', content: '1' },
      { name: 'd/lowerdir/x', content: 'x' },
      { name: 'd/mixed/lower', content: 'l' },
      { name: 'other/stays', content: 's' },
    ]);
    await apply([
      { name: 'd/', type: 'directory', mode: 0o755 },
      { name: 'd/new', content: 'n' },
      { name: 'd/mixed/', type: 'directory' },
      { name: 'd/mixed/upper', content: 'u' },
      { name: 'd/.wh..wh..opq', content: '' },
    ]);
    expect(tree()).toEqual(['d', 'd/mixed', 'd/mixed/upper', 'd/new', 'other', 'other/stays']);
  });

  it('an opaque marker before its siblings hides lower children; later siblings are created', async () => {
    await apply([
      { name: 'd/lower', content: 'l' },
      { name: 'd/sub/lower', content: 'l' },
    ]);
    await apply([
      { name: 'd/.wh..wh..opq', content: '' },
      { name: 'd/sub/upper', content: 'u' },
      { name: 'd/upper', content: 'u' },
    ]);
    expect(tree()).toEqual(['d', 'd/sub', 'd/sub/upper', 'd/upper']);
  });

  it('an opaque marker keeps lower directories that hold same-layer entries, but only those entries', async () => {
    await apply([{ name: 'd/keepdir/lower', content: 'l' }]);
    await apply([
      { name: 'd/keepdir/upper', content: 'u' },
      { name: 'd/.wh..wh..opq', content: '' },
    ]);
    expect(tree()).toEqual(['d', 'd/keepdir', 'd/keepdir/upper']);
  });

  it('an opaque marker keeps directories this layer created as missing parents', async () => {
    await apply([{ name: 'd/lower', content: 'l' }]);
    await apply([
      { name: 'd/made/for/f', content: 'f' },
      { name: 'd/.wh..wh..opq', content: '' },
    ]);
    expect(tree()).toEqual(['d', 'd/made', 'd/made/for', 'd/made/for/f']);
    expectDir('d/made', 0o755);
  });

  describe('a directory implied by this layer over a lower directory it whites out is fresh (0755, root), in either order', () => {
    const lower = async (): Promise<void> => {
      await apply([
        { name: 'a/', type: 'directory', mode: 0o700, uid: 1234, gid: 4321 },
        { name: 'a/old', content: 'o' },
        { name: 'a/b/', type: 'directory', mode: 0o750, uid: 77, gid: 78 },
        { name: 'a/b/old', content: 'o' },
        { name: 'a/b/c/', type: 'directory', mode: 0o711, uid: 5, gid: 6 },
        { name: 'a/b/c/old', content: 'o' },
      ]);
    };
    for (const whiteoutFirst of [true, false]) {
      const order = whiteoutFirst ? 'whiteout first' : 'whiteout last';
      it(`.wh.a with a/new and a/b/c/new (${order})`, async () => {
        await lower();
        const wh = { name: '.wh.a', content: '' };
        const news: PackEntry[] = [{ name: 'a/new', content: 'n' }, { name: 'a/b/c/new', content: 'n' }];
        await apply(whiteoutFirst ? [wh, ...news] : [...news, wh]);
        expect(tree()).toEqual(['a', 'a/b', 'a/b/c', 'a/b/c/new', 'a/new']);
        expectDir('a', 0o755);
        expectDir('a/b', 0o755);
        expectDir('a/b/c', 0o755);
      });
      it(`a/.wh.b with a/b/new (${order}) keeps a as it was`, async () => {
        await lower();
        const wh = { name: 'a/.wh.b', content: '' };
        const news: PackEntry[] = [{ name: 'a/b/c/new', content: 'n' }];
        await apply(whiteoutFirst ? [wh, ...news] : [...news, wh]);
        expect(tree()).toEqual(['a', 'a/b', 'a/b/c', 'a/b/c/new', 'a/old']);
        expectDir('a', 0o700, 1234, 4321);
        expectDir('a/b', 0o755);
        expectDir('a/b/c', 0o755);
      });
      it(`a/.wh..wh..opq with a/b/new (${order}) renews a/b but keeps a`, async () => {
        await lower();
        const wh = { name: 'a/.wh..wh..opq', content: '' };
        const news: PackEntry[] = [{ name: 'a/b/new', content: 'n' }];
        await apply(whiteoutFirst ? [wh, ...news] : [...news, wh]);
        expect(tree()).toEqual(['a', 'a/b', 'a/b/new']);
        expectDir('a', 0o700, 1234, 4321);
        expectDir('a/b', 0o755);
      });
      it(`.wh.a with an explicit a/ entry (${order}) takes the entry's metadata`, async () => {
        await lower();
        const wh = { name: '.wh.a', content: '' };
        const news: PackEntry[] = [{ name: 'a/', type: 'directory', mode: 0o751, uid: 9, gid: 10 }, { name: 'a/b/new', content: 'n' }];
        await apply(whiteoutFirst ? [wh, ...news] : [...news, wh]);
        expect(tree()).toEqual(['a', 'a/b', 'a/b/new']);
        expectDir('a', 0o751, 9, 10);
        expectDir('a/b', 0o755);
      });
    }
  });

  it('an opaque marker at the root hides every lower entry', async () => {
    await apply([{ name: 'a/b', content: 'b' }, { name: 'c', content: 'c' }]);
    await apply([{ name: 'n', content: 'n' }, { name: '.wh..wh..opq', content: '' }]);
    expect(tree()).toEqual(['n']);
  });

  it('refuses a whiteout of ".", ".." or an empty name', async () => {
    for (const name of ['d/.wh.', 'd/.wh..', 'd/.wh...']) {
      await expect(apply([{ name, content: '' }])).rejects.toMatchObject({ code: 'BAD_IMAGE' });
    }
  });

  it('never leaves whiteout files in the rootfs', async () => {
    await apply([{ name: 'x/.wh.y', content: '' }, { name: '.wh..wh..opq', content: '' }, { name: 'x/.wh..wh..opq', content: '' }]);
    expect(tree()).toEqual([]);
  });

  it('a whiteout entry with content is drained, not written', async () => {
    await apply([{ name: 'f', content: 'f' }]);
    await apply([{ name: '.wh.f', content: 'x'.repeat(5000) }, { name: 'after', content: 'a' }]);
    expect(tree()).toEqual(['after']);
    expectFile('after', 'a', 0o644);
  });
});
