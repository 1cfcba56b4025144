/**
 * applyLayer against hostile layers: every breakout attempt must stay inside the rootfs (a sentinel
 * directory beside it is snapshotted before and after), and refused content fails with BAD_IMAGE.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { applyTar, packTar, snapshot, type PackEntry, listTree } from './_layers-tar.js';

let base: string;
let root: string;
let sentinel: string;
let before: string[];

beforeEach(() => {
  base = fs.mkdtempSync(path.join(os.tmpdir(), 'gp-layers-safety-'));
  root = path.join(base, 'rootfs');
  sentinel = path.join(base, 'sentinel');
  fs.mkdirSync(root);
  fs.mkdirSync(path.join(sentinel, 'etc'), { recursive: true });
  fs.writeFileSync(path.join(sentinel, 'victim'), 'must survive');
  fs.writeFileSync(path.join(sentinel, 'etc', 'passwd'), 'host passwd');
  fs.writeFileSync(path.join(base, 'outside'), 'outside file');
  before = snapshot(base).filter((l) => !l.startsWith('rootfs'));
});
afterEach(() => {
  try {
    // The sentinel and everything beside the rootfs are exactly as they were.
    expect(snapshot(base).filter((l) => !l.startsWith('rootfs'))).toEqual(before);
  } finally {
    fs.rmSync(base, { recursive: true, force: true });
  }
});

const at = (p: string): string => path.join(root, p);
const apply = async (entries: PackEntry[]): Promise<void> => {
  await applyTar(root, await packTar(entries));
};
const tree = (): string[] => listTree(root);

describe('applyLayer: breakout attempts stay inside the rootfs', () => {
  it('clamps ../../x to the root', async () => {
    await apply([{ name: '../../x', content: 'x' }, { name: '../sentinel/victim', content: 'pwned' }]);
    expect(tree()).toEqual(['sentinel', 'sentinel/victim', 'x']);
    expect(fs.readFileSync(at('sentinel/victim'), 'utf8')).toBe('pwned');
  });

  it('writes beneath a symlink to / inside the root (evil -> /, evil/etc/x)', async () => {
    const name = `gp-breakout-${process.pid}-${Date.now()}`;
    await apply([
      { name: 'evil', type: 'symlink', linkname: '/' },
      { name: `evil/etc/${name}`, content: 'x' },
    ]);
    expect(fs.existsSync(path.join('/etc', name))).toBe(false);
    expect(tree()).toEqual(['etc', `etc/${name}`, 'evil']);
    expect(fs.readlinkSync(at('evil'))).toBe('/');
  });

  it('writes beneath a symlink climbing out (evil -> ../../..) inside the root', async () => {
    await apply([
      { name: 'evil', type: 'symlink', linkname: '../../..' },
      { name: 'evil/victim', content: 'in root' },
      { name: 'up', type: 'symlink', linkname: '../sentinel' },
      { name: 'up/etc/passwd', content: 'in root too' },
    ]);
    expect(tree()).toEqual(['evil', 'sentinel', 'sentinel/etc', 'sentinel/etc/passwd', 'up', 'victim']);
    expect(fs.readFileSync(at('victim'), 'utf8')).toBe('in root');
    expect(fs.readFileSync(at('sentinel/etc/passwd'), 'utf8')).toBe('in root too');
  });

  it('hardlinks through a symlinked directory resolve inside the root', async () => {
    await apply([{ name: 'etc/passwd', content: 'image passwd' }]);
    await apply([
      { name: 'evil', type: 'symlink', linkname: '../sentinel' },
      { name: 'sys', type: 'symlink', linkname: '/' },
      { name: 'hl', type: 'link', linkname: 'sys/etc/passwd' },
    ]);
    expect(fs.lstatSync(at('hl')).ino).toBe(fs.lstatSync(at('etc/passwd')).ino);
    expect(fs.lstatSync(at('hl')).ino).not.toBe(fs.lstatSync(path.join(sentinel, 'etc/passwd')).ino);
    // evil -> ../sentinel names root/sentinel, which does not exist in the image
    await expect(apply([{ name: 'hl2', type: 'link', linkname: 'evil/etc/passwd' }])).rejects.toMatchObject({
      code: 'BAD_IMAGE',
      message: expect.stringContaining('does not exist'),
    });
    expect(fs.existsSync(at('hl2'))).toBe(false);
  });

  it('a hardlink entry placed beneath a symlink lands inside the root', async () => {
    await apply([
      { name: 'f', content: 'f' },
      { name: 'evil', type: 'symlink', linkname: '../sentinel' },
      { name: 'evil/link', type: 'link', linkname: 'f' },
    ]);
    expect(tree()).toEqual(['evil', 'f', 'sentinel', 'sentinel/link']);
    expect(fs.lstatSync(at('sentinel/link')).ino).toBe(fs.lstatSync(at('f')).ino);
  });

  it('a hardlink to ../../outside is clamped to the root and refused when missing there', async () => {
    await expect(apply([{ name: 'hl', type: 'link', linkname: '../../outside' }])).rejects.toMatchObject({ code: 'BAD_IMAGE' });
    expect(tree()).toEqual([]);
    await apply([{ name: 'outside', content: 'image file' }, { name: 'hl', type: 'link', linkname: '../../outside' }]);
    expect(fs.lstatSync(at('hl')).ino).toBe(fs.lstatSync(at('outside')).ino);
    expect(fs.readFileSync(at('hl'), 'utf8')).toBe('image file');
  });

  it('a whiteout through a symlinked directory acts inside the root', async () => {
    await apply([{ name: 'sentinel/victim', content: 'image victim' }, { name: 'keep', content: 'k' }]);
    await apply([
      { name: 'evil', type: 'symlink', linkname: '../sentinel' },
      { name: 'evil/.wh.victim', content: '' },
      { name: 'abs', type: 'symlink', linkname: '/../../sentinel' },
      { name: 'abs/.wh..wh..opq', content: '' },
    ]);
    expect(tree()).toEqual(['abs', 'evil', 'keep', 'sentinel']);
  });

  it('a symlink replacing a directory does not let later entries write through it', async () => {
    await apply([{ name: 'd/', type: 'directory' }, { name: 'd/f', content: 'f' }]);
    await apply([
      { name: 'd', type: 'symlink', linkname: '../sentinel' },
      { name: 'd/victim', content: 'redirected into the root' },
      { name: 'd/etc/passwd', content: 'also in the root' },
    ]);
    expect(tree()).toEqual(['d', 'sentinel', 'sentinel/etc', 'sentinel/etc/passwd', 'sentinel/victim']);
    expect(fs.readlinkSync(at('d'))).toBe('../sentinel');
  });

  it('a directory replaced by a symlink within the same layer is not reused as a parent (cache dropped)', async () => {
    await apply([
      { name: 'd/', type: 'directory' },
      { name: 'd/f', content: 'f' },
      { name: 'd', type: 'symlink', linkname: '../sentinel/etc' },
      { name: 'd/passwd', content: 'in the root' },
      { name: 'e/x/', type: 'directory' },
      { name: 'e/x/f', content: 'f' },
      { name: 'e/x', type: 'symlink', linkname: '../../sentinel' },
      { name: 'e/x/victim', content: 'also in the root' },
    ]);
    expect(tree()).toEqual(['d', 'e', 'e/x', 'sentinel', 'sentinel/etc', 'sentinel/etc/passwd', 'sentinel/victim']);
    expect(fs.readFileSync(at('sentinel/etc/passwd'), 'utf8')).toBe('in the root');
  });

  it('a file over an existing symlink replaces the link and never writes through it', async () => {
    await apply([{ name: 'victim', type: 'symlink', linkname: '../sentinel/victim' }]);
    // Make the link really point at the host sentinel, as a hostile lower layer could.
    fs.unlinkSync(at('victim'));
    fs.symlinkSync(path.join(sentinel, 'victim'), at('victim'));
    await apply([{ name: 'victim', content: 'replaced', mode: 0o600 }]);
    const st = fs.lstatSync(at('victim'));
    expect(st.isFile()).toBe(true);
    expect(fs.readFileSync(at('victim'), 'utf8')).toBe('replaced');
  });

  it('a parent reached through `missing/..` and a host-pointing symlink stays inside the root', async () => {
    // A lower layer as a hostile host could leave it: root/evil points at the host sentinel.
    fs.symlinkSync(sentinel, at('evil'));
    await apply([{ name: 'l', type: 'symlink', linkname: 'nonexistent/../evil' }]);
    // l/victim resolves l → evil → <sentinel path> interpreted inside the root (afterEach checks the
    // real sentinel is untouched).
    await apply([{ name: 'l/victim', content: 'contained' }]);
    const landed = at(path.join(sentinel.slice(1), 'victim'));
    expect(fs.readFileSync(landed, 'utf8')).toBe('contained');
    await apply([{ name: 'hl', type: 'link', linkname: 'l/victim' }]);
    expect(fs.lstatSync(at('hl')).ino).toBe(fs.lstatSync(landed).ino);
    await apply([{ name: 'l/.wh.victim', content: '' }]);
    expect(fs.existsSync(landed)).toBe(false);
  });

  it('refuses to change the type of the root', async () => {
    for (const e of [
      { name: './', content: 'x' },
      { name: '.', type: 'symlink' as const, linkname: '/' },
      { name: '..', type: 'link' as const, linkname: 'x' },
    ]) {
      await expect(apply([e])).rejects.toMatchObject({ code: 'BAD_IMAGE', message: expect.stringContaining('root') });
    }
    expect(fs.lstatSync(root).isDirectory()).toBe(true);
    expect(tree()).toEqual([]);
  });

  it('refuses an entry whose parent is a file', async () => {
    await apply([{ name: 'f', content: 'f' }]);
    await expect(apply([{ name: 'f/x', content: 'x' }])).rejects.toMatchObject({
      code: 'BAD_IMAGE',
      message: expect.stringMatching(/f\/x.*not (a directory|one)/),
    });
  });

  it('refuses hardlinks to directories and to the root', async () => {
    await apply([{ name: 'd/', type: 'directory' }]);
    await expect(apply([{ name: 'hl', type: 'link', linkname: 'd' }])).rejects.toMatchObject({ code: 'BAD_IMAGE' });
    await expect(apply([{ name: 'hl', type: 'link', linkname: '/' }])).rejects.toMatchObject({ code: 'BAD_IMAGE' });
    expect(tree()).toEqual(['d']);
  });

  it('refuses whiteout names used as directories', async () => {
    await expect(apply([{ name: '.wh.x/y', content: 'y' }])).rejects.toMatchObject({ code: 'BAD_IMAGE' });
    expect(tree()).toEqual([]);
  });
});

describe('applyLayer: refused entry types and bounds', () => {
  it('refuses sparse files and contiguous files', async () => {
    await expect(apply([{ name: 's', content: 'x', pax: { 'GNU.sparse.major': '1', 'GNU.sparse.minor': '0' } }])).rejects.toMatchObject({
      code: 'BAD_IMAGE',
      message: expect.stringContaining('sparse'),
    });
    await expect(apply([{ name: 'c', type: 'contiguous-file', content: 'x' }])).rejects.toMatchObject({ code: 'BAD_IMAGE' });
  });

  it('bounds the number of entries', async () => {
    const entries = Array.from({ length: 6 }, (_, i) => ({ name: `f${i}`, content: String(i) }));
    await expect(applyTar(root, await packTar(entries), { limits: { maxEntries: 5 } })).rejects.toMatchObject({
      code: 'BAD_IMAGE',
      message: expect.stringContaining('maxEntries'),
    });
    expect(tree()).toEqual(['f0', 'f1', 'f2', 'f3', 'f4']);
    fs.rmSync(root, { recursive: true });
    fs.mkdirSync(root);
    const r = await applyTar(root, await packTar(entries), { limits: { maxEntries: 6 } });
    expect(r.entries).toBe(6);
  });

  it('bounds path length and depth', async () => {
    await expect(applyTar(root, await packTar([{ name: 'a'.repeat(200), content: '' }]), { limits: { maxPathLength: 100 } })).rejects.toMatchObject({
      code: 'BAD_IMAGE',
      message: expect.stringContaining('maxPathLength'),
    });
    await expect(
      applyTar(root, await packTar([{ name: 'l', type: 'symlink', linkname: 'b'.repeat(200) }]), { limits: { maxPathLength: 100 } }),
    ).rejects.toMatchObject({ code: 'BAD_IMAGE', message: expect.stringContaining('maxPathLength') });
    await expect(applyTar(root, await packTar([{ name: 'a/b/c/d/e', content: '' }]), { limits: { maxPathDepth: 4 } })).rejects.toMatchObject({
      code: 'BAD_IMAGE',
      message: expect.stringContaining('maxPathDepth'),
    });
    expect(tree()).toEqual([]);
  });

  it('bounds the uncompressed size and the compression ratio', async () => {
    const tarBytes = await packTar([{ name: 'zeros', content: Buffer.alloc(4 * 1024 * 1024) }]);
    await expect(applyTar(root, tarBytes, { limits: { maxUncompressedBytes: 1024 * 1024 } })).rejects.toMatchObject({
      code: 'BAD_IMAGE',
      message: expect.stringContaining('maxUncompressedBytes'),
    });
    await expect(applyTar(root, tarBytes, { limits: { maxRatio: 100 } })).rejects.toMatchObject({
      code: 'BAD_IMAGE',
      message: expect.stringContaining('maxRatio'),
    });
    // Uncompressed layers are not held to the ratio; the same tar passes with the defaults.
    await applyTar(root, tarBytes, { gzip: false, limits: { maxRatio: 1 } });
    expect(fs.statSync(at('zeros')).size).toBe(4 * 1024 * 1024);
  });
});
