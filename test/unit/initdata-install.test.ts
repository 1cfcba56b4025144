import { mkdir, mkdtemp, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ErrorCode, GuestpullError } from '../../src/errors.js';
import { parseInitdataDocument } from '../../src/initdata/document.js';
import { DEFAULT_INITDATA_DIR, installInitdata } from '../../src/initdata/install.js';

const RAW = Buffer.from(`version = "0.1.0"
algorithm = "sha256"
[data]
"cdh.toml" = '''
[image]
work_dir = "/run/w"
'''
"aa.toml" = "[token_configs]\\n"
"policy.rego" = "package agent_policy\\n"
"other.txt" = "not installed"
`);

let tmp: string;
beforeAll(async () => {
  tmp = await mkdtemp(path.join(os.tmpdir(), 'guestpull-initdata-install-'));
});
afterAll(async () => {
  await rm(tmp, { recursive: true, force: true });
});

const mode = async (p: string) => (await stat(p)).mode & 0o777;

describe('installInitdata', () => {
  it('defaults to the kata agent directory', () => {
    expect(DEFAULT_INITDATA_DIR).toBe('/run/confidential-containers/initdata');
  });

  it('writes the raw document and the known files, dirs 0700, files 0600, no temp files left', async () => {
    const dir = path.join(tmp, 'a', 'b', 'initdata');
    const doc = parseInitdataDocument(RAW, 'test');
    const written = await installInitdata(doc, dir);
    expect(written.map((p) => path.basename(p))).toEqual(['initdata.toml', 'cdh.toml', 'aa.toml', 'policy.rego']);
    expect((await readFile(path.join(dir, 'initdata.toml'))).equals(RAW)).toBe(true);
    expect(await readFile(path.join(dir, 'cdh.toml'), 'utf8')).toBe('[image]\nwork_dir = "/run/w"\n');
    expect(await readFile(path.join(dir, 'aa.toml'), 'utf8')).toBe('[token_configs]\n');
    expect(await readFile(path.join(dir, 'policy.rego'), 'utf8')).toBe('package agent_policy\n');
    expect(await mode(dir)).toBe(0o700);
    expect(await mode(path.join(tmp, 'a'))).toBe(0o700);
    for (const p of written) expect(await mode(p)).toBe(0o600);
    expect((await readdir(dir)).sort()).toEqual(['aa.toml', 'cdh.toml', 'initdata.toml', 'policy.rego']);
  });

  it('replaces files atomically, tightens an existing directory, and removes files the new document lacks', async () => {
    const dir = path.join(tmp, 'existing');
    await mkdir(dir, { mode: 0o755 });
    await writeFile(path.join(dir, 'aa.toml'), 'stale', { mode: 0o644 });
    await writeFile(path.join(dir, 'cdh.toml'), 'old', { mode: 0o644 });
    const doc = parseInitdataDocument(Buffer.from('version = "0.1.0"\nalgorithm = "sha512"\n[data]\n"cdh.toml" = "new"\n'), 't');
    const written = await installInitdata(doc, dir);
    expect(written.map((p) => path.basename(p))).toEqual(['initdata.toml', 'cdh.toml']);
    expect(await readFile(path.join(dir, 'cdh.toml'), 'utf8')).toBe('new');
    expect(await mode(path.join(dir, 'cdh.toml'))).toBe(0o600);
    expect(await mode(dir)).toBe(0o700);
    expect((await readdir(dir)).sort()).toEqual(['cdh.toml', 'initdata.toml']);
  });

  it('fails with CONFIG when the directory cannot be used, leaving no temp file', async () => {
    const file = path.join(tmp, 'a-file');
    await writeFile(file, 'x');
    const doc = parseInitdataDocument(RAW, 'test');
    await expect(installInitdata(doc, file)).rejects.toSatisfy(
      (e: unknown) => e instanceof GuestpullError && e.code === ErrorCode.CONFIG && e.message.includes(file),
    );
    // A target that is a directory cannot be renamed over: the temp file is cleaned up.
    const dir = path.join(tmp, 'blocked');
    await mkdir(path.join(dir, 'cdh.toml'), { recursive: true });
    await writeFile(path.join(dir, 'cdh.toml', 'keep'), 'x');
    await expect(installInitdata(doc, dir)).rejects.toThrow(GuestpullError);
    expect((await readdir(dir)).filter((n) => n.includes('.tmp-'))).toEqual([]);
  });
});
