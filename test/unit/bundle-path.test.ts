import { mkdir, mkdtemp, readFile, readdir, realpath, rm, stat, symlink, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ErrorCode, GuestpullError } from '../../src/errors.js';
import { checkBundleFree, checkBundleRoots, checkNoSymlinks, resolveBundleRoots, validateBundlePath, writeFileAtomic } from '../../src/pull/bundle/path.js';

async function codeOf(p: Promise<unknown>): Promise<string> {
  try {
    await p;
  } catch (e) {
    expect(e).toBeInstanceOf(GuestpullError);
    return (e as GuestpullError).code;
  }
  return 'OK';
}

function syncCode(f: () => unknown): string {
  try {
    f();
  } catch (e) {
    expect(e).toBeInstanceOf(GuestpullError);
    return (e as GuestpullError).code;
  }
  return 'OK';
}

describe('validateBundlePath', () => {
  const ok: [string, string][] = [
    ['/run/kata-containers/abc', '/run/kata-containers/abc'],
    ['/run//kata-containers/./abc/', '/run/kata-containers/abc'],
    ['/a/...', '/a/...'],
    ['/a/..b/c', '/a/..b/c'],
    ['/' + 'a'.repeat(4095), '/' + 'a'.repeat(4095)],
  ];
  it.each(ok)('accepts %j as %j', (input, want) => {
    expect(validateBundlePath(input)).toBe(want);
  });

  const bad: [string, string][] = [
    ['empty', ''],
    ['relative', 'run/kata'],
    ['dot-relative', './run/kata'],
    ['dotdot in the middle', '/run/../etc'],
    ['dotdot at the end', '/run/kata/..'],
    ['dotdot at the start', '/../run'],
    ['NUL byte', '/run/kata\0/x'],
    ['longer than 4096', '/' + 'a'.repeat(4096)],
    ['the root', '/'],
    ['the root, spelt oddly', '//./'],
  ];
  it.each(bad)('refuses %s', (_name, input) => {
    expect(syncCode(() => validateBundlePath(input))).toBe(ErrorCode.INVALID_ARGUMENT);
  });
});

describe('checkBundleFree', () => {
  let tmp: string;
  beforeAll(async () => {
    tmp = await mkdtemp(path.join(os.tmpdir(), 'guestpull-bundle-path-'));
  });
  afterAll(async () => {
    await rm(tmp, { recursive: true, force: true });
  });

  async function dir(name: string): Promise<string> {
    const d = path.join(tmp, name);
    await mkdir(d, { recursive: true });
    return d;
  }

  it('accepts a missing bundle directory', async () => {
    expect(await codeOf(checkBundleFree(path.join(tmp, 'missing', 'deeper')))).toBe('OK');
  });

  it('accepts an empty directory and one holding unrelated files', async () => {
    expect(await codeOf(checkBundleFree(await dir('empty')))).toBe('OK');
    const d = await dir('other');
    await writeFile(path.join(d, 'state.json'), '{}');
    await mkdir(path.join(d, 'shm'));
    expect(await codeOf(checkBundleFree(d))).toBe('OK');
  });

  it('refuses an existing config.json, naming it', async () => {
    const d = await dir('has-config');
    await writeFile(path.join(d, 'config.json'), '{}');
    await expect(checkBundleFree(d)).rejects.toMatchObject({ code: ErrorCode.ALREADY_EXISTS, message: expect.stringContaining('config.json') });
    await expect(checkBundleFree(d)).rejects.not.toMatchObject({ message: expect.stringContaining('rootfs') });
  });

  it('refuses an existing rootfs, naming it', async () => {
    const d = await dir('has-rootfs');
    await mkdir(path.join(d, 'rootfs'));
    await expect(checkBundleFree(d)).rejects.toMatchObject({ code: ErrorCode.ALREADY_EXISTS, message: expect.stringContaining('rootfs') });
  });

  it('counts a dangling rootfs symlink as existing', async () => {
    const d = await dir('dangling-rootfs');
    await symlink('/nonexistent/target', path.join(d, 'rootfs'));
    expect(await codeOf(checkBundleFree(d))).toBe(ErrorCode.ALREADY_EXISTS);
  });

  it('names both when both exist', async () => {
    const d = await dir('has-both');
    await writeFile(path.join(d, 'config.json'), '{}');
    await mkdir(path.join(d, 'rootfs'));
    await expect(checkBundleFree(d)).rejects.toThrow(/config\.json and rootfs/);
  });

  it('refuses a bundle path that is a regular file', async () => {
    const f = path.join(tmp, 'a-file');
    await writeFile(f, 'x');
    expect(await codeOf(checkBundleFree(f))).toBe(ErrorCode.INVALID_ARGUMENT);
  });

  it('refuses a bundle path that is a symlink, even to an empty directory', async () => {
    const target = await dir('link-target');
    const link = path.join(tmp, 'link-bundle');
    await symlink(target, link);
    await expect(checkBundleFree(link)).rejects.toMatchObject({ code: ErrorCode.INVALID_ARGUMENT, message: expect.stringContaining('symbolic link') });
  });

  it('refuses a bundle path below a regular file', async () => {
    const f = path.join(tmp, 'file-parent');
    await writeFile(f, 'x');
    expect(await codeOf(checkBundleFree(path.join(f, 'bundle')))).toBe(ErrorCode.INVALID_ARGUMENT);
  });
});

describe('writeFileAtomic', () => {
  let tmp: string;
  beforeAll(async () => {
    tmp = await mkdtemp(path.join(os.tmpdir(), 'guestpull-atomic-'));
  });
  afterAll(async () => {
    await rm(tmp, { recursive: true, force: true });
  });

  it('writes the data with the exact mode and leaves no temp file', async () => {
    const d = path.join(tmp, 'w1');
    await mkdir(d);
    const f = path.join(d, 'config.json');
    await writeFileAtomic(f, '{"a":1}', 0o600);
    expect(await readFile(f, 'utf8')).toBe('{"a":1}');
    expect((await stat(f)).mode & 0o777).toBe(0o600);
    expect(await readdir(d)).toEqual(['config.json']);
  });

  it('defaults to mode 0644 and replaces an existing file', async () => {
    const d = path.join(tmp, 'w2');
    await mkdir(d);
    const f = path.join(d, 'config.json');
    await writeFile(f, 'old', { mode: 0o600 });
    await writeFileAtomic(f, Buffer.from('new'));
    expect(await readFile(f, 'utf8')).toBe('new');
    expect((await stat(f)).mode & 0o777).toBe(0o644);
    expect(await readdir(d)).toEqual(['config.json']);
  });

  it('fails with a typed error when the target directory is missing', async () => {
    const f = path.join(tmp, 'no-such-dir', 'config.json');
    await expect(writeFileAtomic(f, 'x')).rejects.toMatchObject({ message: expect.stringContaining(f) });
    await expect(readdir(path.join(tmp, 'no-such-dir'))).rejects.toThrow();
  });

  it('removes the temp file when the rename fails', async () => {
    const d = path.join(tmp, 'w3');
    await mkdir(d);
    // The target is a non-empty directory: the temp file is created and written, rename fails.
    const f = path.join(d, 'config.json');
    await mkdir(f);
    await writeFile(path.join(f, 'keep'), 'k');
    await expect(writeFileAtomic(f, 'data')).rejects.toBeInstanceOf(GuestpullError);
    expect(await readdir(d)).toEqual(['config.json']);
    expect(await readdir(f)).toEqual(['keep']);
  });
});

describe('bundle roots', () => {
  let tmp: string;
  beforeAll(async () => {
    tmp = await mkdtemp(path.join(os.tmpdir(), 'guestpull-bundle-roots-'));
    await mkdir(path.join(tmp, 'real', 'kata'), { recursive: true });
    await symlink(path.join(tmp, 'real'), path.join(tmp, 'alias'));
    await writeFile(path.join(tmp, 'a-file'), 'x');
  });
  afterAll(async () => {
    await rm(tmp, { recursive: true, force: true });
  });

  it('resolves roots through symlinks, normalises them and drops duplicates', () => {
    const real = path.join(tmp, 'real', 'kata');
    expect(resolveBundleRoots([path.join(tmp, 'alias', 'kata'), `${real}/`, path.join(tmp, 'real', '.', 'kata')])).toEqual([real]);
    expect(resolveBundleRoots([])).toEqual([]);
  });

  it('refuses a missing, relative or non-directory root at start-up, naming it', () => {
    const missing = path.join(tmp, 'nope');
    expect(() => resolveBundleRoots([path.join(tmp, 'real'), missing])).toThrow(
      expect.objectContaining({ code: ErrorCode.CONFIG, message: expect.stringMatching(new RegExp(`${missing} \\(--bundle-root\\) does not exist`)) }),
    );
    expect(syncCode(() => resolveBundleRoots(['run/kata']))).toBe(ErrorCode.CONFIG);
    expect(syncCode(() => resolveBundleRoots(['']))).toBe(ErrorCode.CONFIG);
    expect(() => resolveBundleRoots([path.join(tmp, 'a-file')])).toThrow(expect.objectContaining({ code: ErrorCode.CONFIG, message: expect.stringContaining('a-file') }));
  });

  it('allows any path without roots, and only paths strictly below a root with them', () => {
    expect(syncCode(() => checkBundleRoots('/anywhere/at/all', undefined))).toBe('OK');
    expect(syncCode(() => checkBundleRoots('/anywhere/at/all', []))).toBe('OK');
    const roots = ['/run/kata-containers', '/srv/bundles'];
    expect(syncCode(() => checkBundleRoots('/run/kata-containers/c1', roots))).toBe('OK');
    expect(syncCode(() => checkBundleRoots('/srv/bundles/a/b', roots))).toBe('OK');
    for (const bad of ['/run/kata-containers', '/run/kata-containers-evil/c1', '/run/kata', '/etc/c1', '/srv']) {
      expect(syncCode(() => checkBundleRoots(bad, roots))).toBe(ErrorCode.PERMISSION_DENIED);
    }
    expect(syncCode(() => checkBundleRoots('/x', ['/']))).toBe('OK');
  });

  it('names the path, the roots and the flag when refusing', () => {
    expect(() => checkBundleRoots('/etc/c1', ['/run/kata-containers', '/srv/b'])).toThrow(
      expect.objectContaining({ message: expect.stringMatching(/"\/etc\/c1".*\/run\/kata-containers, \/srv\/b.*--bundle-root/) }),
    );
  });
});

describe('checkNoSymlinks', () => {
  let tmp: string;
  beforeAll(async () => {
    tmp = await realpath(await mkdtemp(path.join(os.tmpdir(), 'guestpull-nosymlinks-')));
    await mkdir(path.join(tmp, 'real', 'deep'), { recursive: true });
    await symlink(path.join(tmp, 'real'), path.join(tmp, 'link'));
    await symlink('real/deep', path.join(tmp, 'rel-link'));
    await symlink(path.join(tmp, 'nowhere'), path.join(tmp, 'dangling'));
    await writeFile(path.join(tmp, 'file'), 'x');
  });
  afterAll(async () => {
    await rm(tmp, { recursive: true, force: true });
  });

  it('accepts real directories, and paths whose tail does not exist yet', async () => {
    expect(await codeOf(checkNoSymlinks(path.join(tmp, 'real', 'deep')))).toBe('OK');
    expect(await codeOf(checkNoSymlinks(path.join(tmp, 'real', 'deep', 'new', 'bundle')))).toBe('OK');
    expect(await codeOf(checkNoSymlinks(path.join(tmp, 'missing', 'x')))).toBe('OK');
  });

  it('refuses a symlinked ancestor, naming it', async () => {
    const link = path.join(tmp, 'link');
    await expect(checkNoSymlinks(path.join(link, 'deep', 'c1'))).rejects.toMatchObject({
      code: ErrorCode.INVALID_ARGUMENT,
      message: expect.stringContaining(`component ${link} is a symbolic link`),
    });
    await expect(checkNoSymlinks(path.join(tmp, 'rel-link', 'c1'))).rejects.toMatchObject({ code: ErrorCode.INVALID_ARGUMENT });
  });

  it('refuses the bundle itself being a symlink, dangling ones included', async () => {
    await expect(checkNoSymlinks(path.join(tmp, 'link'))).rejects.toMatchObject({ code: ErrorCode.INVALID_ARGUMENT, message: expect.stringContaining('it is a symbolic link') });
    expect(await codeOf(checkNoSymlinks(path.join(tmp, 'dangling')))).toBe(ErrorCode.INVALID_ARGUMENT);
    expect(await codeOf(checkNoSymlinks(path.join(tmp, 'dangling', 'below')))).toBe(ErrorCode.INVALID_ARGUMENT);
  });

  it('refuses a path below a regular file', async () => {
    await expect(checkNoSymlinks(path.join(tmp, 'file', 'c1'))).rejects.toMatchObject({ code: ErrorCode.INVALID_ARGUMENT, message: expect.stringContaining('is not a directory') });
  });
});

