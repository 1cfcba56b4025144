/**
 * The native addon on the real kernel: mknod (overlay whiteouts, FIFOs, devices), xattrs that do
 * not follow symlinks (trusted.overlay.opaque included), and an overlay mount whose whiteouts and
 * opaque directory hide lower content. Needs root (as the daemon in a guest runs).
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import {
  ADDON_PATH,
  lgetxattr,
  lsetxattr,
  llistxattr,
  lremovexattr,
  MNT_DETACH,
  mknod,
  mount,
  MS_RDONLY,
  nativeAvailable,
  setAddonPathForTests,
  umount,
} from '../../src/native/index.js';

const isRoot = process.getuid?.() === 0;

let dir: string;
let mounts: string[];

beforeEach(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'guestpull-native-'));
  mounts = [];
});

afterEach(() => {
  for (const m of mounts.reverse()) {
    try {
      umount(m, MNT_DETACH);
    } catch {
      // already unmounted by the test
    }
  }
  fs.rmSync(dir, { recursive: true, force: true });
});

/** A directory where trusted.* xattrs work: the temp dir itself, or a tmpfs mounted on it. */
function xattrDir(): string {
  const d = path.join(dir, 'x');
  fs.mkdirSync(d);
  try {
    lsetxattr(d, 'trusted.guestpull-probe', Buffer.from('1'));
    return d;
  } catch {
    mount('tmpfs', d, 'tmpfs', 0, 'size=4m,mode=0755');
    mounts.push(d);
    return d;
  }
}

describe('native addon', () => {
  it('is built and loads', () => {
    expect(fs.existsSync(ADDON_PATH)).toBe(true);
    expect(nativeAvailable()).toBe(true);
    expect(MS_RDONLY).toBe(1);
    expect(MNT_DETACH).toBe(2);
  });

  it('throws UNIMPLEMENTED naming the build command when the addon is missing', () => {
    setAddonPathForTests(path.join(dir, 'missing.node'));
    try {
      expect(nativeAvailable()).toBe(false);
      expect(() => mknod(path.join(dir, 'w'), 'fifo', 0o644, 0, 0)).toThrow(
        expect.objectContaining({ code: 'UNIMPLEMENTED', message: expect.stringContaining('npm run build:native') }),
      );
      expect(fs.existsSync(path.join(dir, 'w'))).toBe(false);
    } finally {
      setAddonPathForTests(ADDON_PATH);
    }
    expect(nativeAvailable()).toBe(true);
  });
});

describe.skipIf(!isRoot)('mknod', () => {
  it('creates an overlay whiteout (char 0:0), a FIFO and a block device', () => {
    const w = path.join(dir, 'whiteout');
    mknod(w, 'char', 0, 0, 0);
    const ws = fs.lstatSync(w);
    expect(ws.isCharacterDevice()).toBe(true);
    expect(ws.rdev).toBe(0);

    const f = path.join(dir, 'fifo');
    mknod(f, 'fifo', 0o640, 0, 0);
    const fst = fs.lstatSync(f);
    expect(fst.isFIFO()).toBe(true);
    expect(fst.mode & 0o777).toBe(0o640 & ~process.umask());

    const b = path.join(dir, 'loop9');
    mknod(b, 'block', 0o600, 7, 9);
    const bs = fs.lstatSync(b);
    expect(bs.isBlockDevice()).toBe(true);
    expect(bs.rdev).toBe((7 << 8) | 9);
  });

  it('fails with the errno name as code, never following a symlink', () => {
    const w = path.join(dir, 'w');
    mknod(w, 'char', 0, 0, 0);
    expect(() => mknod(w, 'char', 0, 0, 0)).toThrow(expect.objectContaining({ code: 'EEXIST', syscall: 'mknod', path: w }));
    const link = path.join(dir, 'link');
    fs.symlinkSync(path.join(dir, 'target'), link);
    expect(() => mknod(link, 'fifo', 0o644, 0, 0)).toThrow(expect.objectContaining({ code: 'EEXIST' }));
    expect(fs.existsSync(path.join(dir, 'target'))).toBe(false);
    expect(() => mknod(path.join(dir, 'no/such/dir'), 'fifo', 0o644, 0, 0)).toThrow(expect.objectContaining({ code: 'ENOENT' }));
  });

  it('refuses bad arguments instead of truncating them', () => {
    expect(() => mknod(`${dir}/a\0b`, 'fifo', 0o644, 0, 0)).toThrow(/must not contain NUL/);
    expect(fs.readdirSync(dir)).toEqual([]);
    expect(() => mknod(path.join(dir, 'x'), 'socket' as 'fifo', 0o644, 0, 0)).toThrow(/type must be/);
    expect(() => mknod(path.join(dir, 'x'), 'fifo', 0o170644, 0, 0)).toThrow(/permission bits/);
    expect(() => mknod(path.join(dir, 'x'), 'char', 0, -1, 0)).toThrow(/major must be an integer/);
    expect(fs.readdirSync(dir)).toEqual([]);
  });
});

describe.skipIf(!isRoot)('xattrs', () => {
  it('round-trips binary values, trusted.overlay.opaque included', () => {
    const d = xattrDir();
    const sub = path.join(d, 'sub');
    fs.mkdirSync(sub);
    const binary = Buffer.from([0x01, 0x00, 0x00, 0x02, 0x80, 0xff, 0x00, 0x20]);
    lsetxattr(sub, 'trusted.overlay.opaque', Buffer.from('y'));
    lsetxattr(sub, 'user.guestpull', binary);
    lsetxattr(sub, 'user.empty', Buffer.alloc(0));
    expect(lgetxattr(sub, 'trusted.overlay.opaque')?.toString()).toBe('y');
    expect(lgetxattr(sub, 'user.guestpull')).toEqual(binary);
    expect(lgetxattr(sub, 'user.empty')).toEqual(Buffer.alloc(0));
    expect(lgetxattr(sub, 'user.absent')).toBeUndefined();
    expect(llistxattr(sub).sort()).toEqual(['trusted.overlay.opaque', 'user.empty', 'user.guestpull']);
    expect(() => lgetxattr(path.join(d, 'missing'), 'user.x')).toThrow(expect.objectContaining({ code: 'ENOENT' }));
  });

  it('acts on a symlink itself, not on its target', () => {
    const d = xattrDir();
    const target = path.join(d, 'target');
    fs.writeFileSync(target, 'x');
    const link = path.join(d, 'link');
    fs.symlinkSync(target, link);
    lsetxattr(link, 'trusted.guestpull', Buffer.from('on-link'));
    expect(lgetxattr(link, 'trusted.guestpull')?.toString()).toBe('on-link');
    expect(lgetxattr(target, 'trusted.guestpull')).toBeUndefined();
    expect(llistxattr(target)).not.toContain('trusted.guestpull');
    // The kernel allows user.* only on files and directories: a symlink refuses it.
    expect(() => lsetxattr(link, 'user.x', Buffer.from('1'))).toThrow(expect.objectContaining({ code: 'EPERM' }));
  });
});

describe.skipIf(!isRoot)('lremovexattr', () => {
  it('removes one attribute and keeps the others; ENODATA when absent', () => {
    const d = xattrDir();
    const sub = path.join(d, 'sub');
    fs.mkdirSync(sub);
    lsetxattr(sub, 'user.a', Buffer.from('1'));
    lsetxattr(sub, 'user.b', Buffer.from('2'));
    lsetxattr(sub, 'trusted.c', Buffer.from('3'));
    lremovexattr(sub, 'user.a');
    lremovexattr(sub, 'trusted.c');
    expect(llistxattr(sub)).toEqual(['user.b']);
    expect(lgetxattr(sub, 'user.a')).toBeUndefined();
    expect(() => lremovexattr(sub, 'user.a')).toThrow(expect.objectContaining({ code: 'ENODATA', syscall: 'lremovexattr', path: sub }));
    expect(() => lremovexattr(path.join(d, 'missing'), 'user.b')).toThrow(expect.objectContaining({ code: 'ENOENT' }));
  });

  it('acts on a symlink itself, not on its target', () => {
    const d = xattrDir();
    const target = path.join(d, 'target');
    fs.writeFileSync(target, 'x');
    lsetxattr(target, 'trusted.t', Buffer.from('on-target'));
    const link = path.join(d, 'link');
    fs.symlinkSync(target, link);
    lsetxattr(link, 'trusted.t', Buffer.from('on-link'));
    lremovexattr(link, 'trusted.t');
    expect(llistxattr(link)).not.toContain('trusted.t');
    expect(lgetxattr(target, 'trusted.t')?.toString()).toBe('on-target');
  });

  it('refuses a name with NUL instead of cutting it short', () => {
    const d = xattrDir();
    lsetxattr(d, 'user.a', Buffer.from('1'));
    expect(() => lremovexattr(d, 'user.a\0b')).toThrow(/must not contain NUL/);
    expect(() => lremovexattr(`${d}\0x`, 'user.a')).toThrow(/must not contain NUL/);
    expect(lgetxattr(d, 'user.a')?.toString()).toBe('1');
  });
});

describe.skipIf(!isRoot)('overlay mount', () => {
  it('mounts an overlay of two layers whose whiteout and opaque directory hide lower content', () => {
    const base = xattrDir();
    const lower = path.join(base, 'lower');
    const upper = path.join(base, 'upper');
    const merged = path.join(base, 'merged');
    for (const d of [lower, upper, merged]) fs.mkdirSync(d);
    fs.writeFileSync(path.join(lower, 'kept'), 'lower');
    fs.writeFileSync(path.join(lower, 'deleted'), 'lower');
    fs.mkdirSync(path.join(lower, 'opq'));
    fs.writeFileSync(path.join(lower, 'opq', 'hidden'), 'lower');
    fs.writeFileSync(path.join(upper, 'added'), 'upper');
    mknod(path.join(upper, 'deleted'), 'char', 0, 0, 0);
    fs.mkdirSync(path.join(upper, 'opq'));
    fs.writeFileSync(path.join(upper, 'opq', 'new'), 'upper');
    lsetxattr(path.join(upper, 'opq'), 'trusted.overlay.opaque', Buffer.from('y'));

    mount('overlay', merged, 'overlay', MS_RDONLY, `lowerdir=${upper}:${lower}`);
    mounts.push(merged);
    expect(fs.readdirSync(merged).sort()).toEqual(['added', 'kept', 'opq']);
    expect(fs.readFileSync(path.join(merged, 'kept'), 'utf8')).toBe('lower');
    expect(fs.readFileSync(path.join(merged, 'added'), 'utf8')).toBe('upper');
    expect(fs.readdirSync(path.join(merged, 'opq'))).toEqual(['new']);
    expect(() => fs.writeFileSync(path.join(merged, 'x'), 'x')).toThrow(expect.objectContaining({ code: 'EROFS' }));

    umount(merged, 0);
    mounts.pop();
    expect(fs.readdirSync(merged)).toEqual([]);
    expect(() => umount(merged, 0)).toThrow(expect.objectContaining({ code: 'EINVAL', syscall: 'umount2' }));
  });

  it('reports a failed mount with its errno', () => {
    const target = path.join(dir, 'm');
    fs.mkdirSync(target);
    expect(() => mount('overlay', target, 'overlay', 0, `lowerdir=${path.join(dir, 'absent')}`)).toThrow(
      expect.objectContaining({ code: 'ENOENT', syscall: 'mount' }),
    );
    expect(() => mount('none', target, 'no-such-fs', 0, '')).toThrow(expect.objectContaining({ code: 'ENODEV' }));
  });
});
