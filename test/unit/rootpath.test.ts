import { mkdir, mkdtemp, rm, symlink, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { cleanEntryPath, resolveInRoot } from '../../src/pull/layers/rootpath.js';

let base: string;
let root: string;

beforeEach(async () => {
  base = await mkdtemp(path.join(os.tmpdir(), 'rootpath-'));
  root = path.join(base, 'rootfs');
  await mkdir(path.join(root, 'etc'), { recursive: true });
  await writeFile(path.join(root, 'etc/passwd'), 'inside\n');
});
afterEach(async () => {
  await rm(base, { recursive: true, force: true });
});

const inside = (p: string): boolean => p === root || p.startsWith(root + path.sep);

describe('resolveInRoot', () => {
  it('keeps plain paths and clamps .. at the root', async () => {
    expect(await resolveInRoot(root, 'etc/passwd')).toBe(path.join(root, 'etc/passwd'));
    expect(await resolveInRoot(root, '../../../etc/passwd')).toBe(path.join(root, 'etc/passwd'));
    expect(await resolveInRoot(root, '/')).toBe(root);
  });

  it('interprets absolute and relative symlink targets inside the root', async () => {
    await symlink('/etc', path.join(root, 'abs'));
    await symlink('../../../../etc', path.join(root, 'rel'));
    expect(await resolveInRoot(root, 'abs/passwd')).toBe(path.join(root, 'etc/passwd'));
    expect(await resolveInRoot(root, 'rel/passwd')).toBe(path.join(root, 'etc/passwd'));
  });

  it('does not follow the final component unless asked', async () => {
    await symlink('/etc/passwd', path.join(root, 'pw'));
    expect(await resolveInRoot(root, 'pw')).toBe(path.join(root, 'pw'));
    expect(await resolveInRoot(root, 'pw', { followFinal: true })).toBe(path.join(root, 'etc/passwd'));
  });

  it('re-checks components after stepping out of a missing part (l -> missing/../evil)', async () => {
    // evil -> /etc is harmless inside the root only if it is resolved, not passed through lexically.
    await symlink(path.join(base, 'outside'), path.join(root, 'evil'));
    await mkdir(path.join(base, 'outside'));
    await writeFile(path.join(base, 'outside/passwd'), 'host\n');
    await symlink('nonexistent/../evil', path.join(root, 'l'));
    const got = await resolveInRoot(root, ['l', 'passwd'], { followFinal: true });
    expect(inside(got)).toBe(true);
    expect(got).toBe(path.join(root, base.slice(1), 'outside/passwd'));
  });

  it('refuses symlink loops', async () => {
    await symlink('b', path.join(root, 'a'));
    await symlink('a', path.join(root, 'b'));
    await expect(resolveInRoot(root, 'a/x')).rejects.toMatchObject({ code: 'BAD_IMAGE' });
  });
});

describe('cleanEntryPath', () => {
  it('strips leading slashes and dots and clamps ..', () => {
    expect(cleanEntryPath('./a/./b/')).toEqual(['a', 'b']);
    expect(cleanEntryPath('/../../x/../y')).toEqual(['y']);
    expect(cleanEntryPath('.')).toEqual([]);
  });
});
