/**
 * The BUILT daemon (`node dist/cli.js serve --initdata …`) as a process: a tampered document is
 * refused with exit 8 and one line giving both digests, before anything is written or listens; a
 * good document delivered as a packed disk image is verified, installed (0700 dir, 0600 files) and
 * its cdh.toml used; without an expected value it refuses (exit 3) unless
 * --allow-unmeasured-initdata, which it then warns about at start-up and at every pull.
 * Digests are computed here with `openssl dgst`; images are packed by the built CLI.
 * Run `npm run build` first.
 */
import { execFileSync, spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { lstat, mkdir, mkdtemp, readFile, readdir, rm, stat, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startDaemon } from '../helpers/daemon.js';
import { connectClient } from '../helpers/grpc-client.js';
import { freePort } from '../helpers/ports.js';
import { removeTree } from '../helpers/cleanup.js';

const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const CLI = path.join(repoRoot, 'dist', 'cli.js');

let tmp: string;
let caseNo = 0;

interface Case {
  dir: string;
  socket: string;
  initdataDir: string;
  workDir: string;
}

async function newCase(): Promise<Case> {
  const dir = path.join(tmp, `c${++caseNo}`);
  await mkdir(dir);
  return { dir, socket: path.join(dir, 'run', 'cdh.sock'), initdataDir: path.join(dir, 'initdata'), workDir: path.join(dir, 'work') };
}

function documentText(algorithm: string, cdh: string): string {
  return [
    '# init-data for the guestpull process tests',
    'version = "0.1.0"',
    `algorithm = "${algorithm}"`,
    '',
    '[data]',
    `"cdh.toml" = '''\n${cdh}'''`,
    `"aa.toml" = '''\n[token_configs]\n[token_configs.kbs]\nurl = "http://127.0.0.1:1"\n'''`,
    `"policy.rego" = '''\npackage agent_policy\n\ndefault PullImageRequest := true\n'''`,
    '',
  ].join('\n');
}

function opensslHex(file: string, algorithm: string): string {
  return execFileSync('openssl', ['dgst', `-${algorithm}`, '-r', file], { encoding: 'utf8' }).split(' ')[0]!;
}

/** Run the built CLI to completion. */
function runCli(args: string[], timeoutMs = 20_000): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [CLI, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`guestpull ${args.join(' ')} did not exit within ${timeoutMs} ms:\n${stderr}`));
    }, timeoutMs);
    child.on('error', reject);
    child.on('exit', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
  });
}

function jsonLines(text: string): Record<string, unknown>[] {
  return text
    .split('\n')
    .filter((l) => l.startsWith('{'))
    .map((l) => JSON.parse(l) as Record<string, unknown>);
}

beforeAll(async () => {
  if (!existsSync(CLI)) throw new Error(`${CLI} is missing: run npm run build first`);
  tmp = await mkdtemp(path.join(os.tmpdir(), 'gp-initdata-'));
});
afterAll(async () => {
  await removeTree(tmp);
});

describe('guestpull serve --initdata (built daemon, as a process)', () => {
  it('a tampered document: exit 8, one stderr line with both digests, nothing written, nothing listening', async () => {
    const c = await newCase();
    const file = path.join(c.dir, 'initdata.toml');
    await writeFile(file, documentText('sha256', '[image]\nmax_concurrent_layer_downloads_per_image = 2\n'));
    const expected = opensslHex(file, 'sha256');
    // The host changes one byte after the digest was bound into the TEE.
    const bytes = await readFile(file);
    const at = bytes.indexOf('= 2');
    expect(at).toBeGreaterThan(0);
    bytes[at + 2] = '3'.charCodeAt(0);
    await writeFile(file, bytes);
    const computed = opensslHex(file, 'sha256');
    expect(computed).not.toBe(expected);

    const r = await runCli([
      'serve', '--initdata', file, '--initdata-digest', expected, '--initdata-dir', c.initdataDir,
      '--listen', `unix://${c.socket}`, '--work-dir', c.workDir,
    ]);
    expect(r.code, r.stderr).toBe(8);
    expect(r.stdout).toBe('');
    const lines = r.stderr.split('\n').filter((l) => l !== '');
    expect(lines, r.stderr).toHaveLength(1);
    expect(lines[0]).toMatch(/^guestpull: INITDATA_MISMATCH: /);
    expect(lines[0]).toContain(computed);
    expect(lines[0]).toContain(expected);
    expect(existsSync(c.socket)).toBe(false);
    expect(existsSync(path.dirname(c.socket))).toBe(false);
    expect(existsSync(c.initdataDir)).toBe(false);
    expect(existsSync(c.workDir)).toBe(false);
    expect((await readdir(c.dir)).sort()).toEqual(['initdata.toml']);
  });

  it('the same refusal for a tampered disk image checked against an SNP HOST_DATA value', async () => {
    const c = await newCase();
    const file = path.join(c.dir, 'doc.toml');
    await writeFile(file, documentText('sha512', '[log]\nlevel = "info"\n'));
    const hostData = opensslHex(file, 'sha512').slice(0, 64); // SNP: the first 32 bytes
    await writeFile(file, (await readFile(file, 'utf8')).replace('"info"', '"warn"'));
    const img = path.join(c.dir, 'doc.img');
    expect((await runCli(['initdata', 'pack', file, img])).code).toBe(0);

    const r = await runCli(['serve', '--initdata', img, '--initdata-digest', hostData, '--initdata-dir', c.initdataDir, '--listen', `unix://${c.socket}`]);
    expect(r.code, r.stderr).toBe(8);
    const lines = r.stderr.split('\n').filter((l) => l !== '');
    expect(lines).toHaveLength(1);
    expect(lines[0]).toContain(hostData);
    expect(lines[0]).toContain(opensslHex(file, 'sha512').slice(0, 64));
    expect(existsSync(c.socket)).toBe(false);
    expect(existsSync(c.initdataDir)).toBe(false);
  });

  it('a good document as a packed disk image: verified, installed 0700/0600, its cdh.toml used, serves, SIGTERM exits 0', async () => {
    const c = await newCase();
    const file = path.join(c.dir, 'good.toml');
    const initdataWorkDir = path.join(c.dir, 'work-from-initdata');
    await writeFile(file, documentText('sha384', `[image]\nwork_dir = "${initdataWorkDir}"\n`));
    const raw = await readFile(file);
    const img = path.join(c.dir, 'good.img');
    const packed = await runCli(['initdata', 'pack', file, img]);
    expect(packed.code, packed.stderr).toBe(0);
    // TDX MRCONFIGID: 48 bytes, exactly the sha384 digest; given in base64 here.
    const mrconfigid = Buffer.from(opensslHex(file, 'sha384'), 'hex').toString('base64');

    const daemon = await startDaemon({
      repoRoot,
      socket: c.socket,
      logLevel: 'info',
      extraArgs: ['--initdata', img, '--initdata-digest', mrconfigid, '--initdata-dir', c.initdataDir],
    });
    try {
      const client = connectClient(daemon.address);
      expect(await client.health()).toBe('SERVING');
      expect(await client.health('api.ImagePullService')).toBe('SERVING');
      client.close();

      expect((await stat(c.initdataDir)).mode & 0o777).toBe(0o700);
      const names = (await readdir(c.initdataDir)).sort();
      expect(names).toEqual(['aa.toml', 'cdh.toml', 'initdata.toml', 'policy.rego']);
      for (const n of names) {
        const st = await lstat(path.join(c.initdataDir, n));
        expect(st.isFile(), n).toBe(true);
        expect(st.mode & 0o777, n).toBe(0o600);
      }
      expect((await readFile(path.join(c.initdataDir, 'initdata.toml'))).equals(raw)).toBe(true);
      expect(await readFile(path.join(c.initdataDir, 'cdh.toml'), 'utf8')).toBe(`[image]\nwork_dir = "${initdataWorkDir}"\n`);
      expect(await readFile(path.join(c.initdataDir, 'policy.rego'), 'utf8')).toContain('package agent_policy');

      const logs = jsonLines(daemon.logs());
      expect(logs.find((l) => l.event === 'listening')).toMatchObject({ workDir: initdataWorkDir });
      expect(logs.filter((l) => l.level === 'warn')).toEqual([]);
      expect(daemon.logs()).not.toMatch(/unmeasured/i);
    } finally {
      expect(await daemon.stop()).toBe(0);
    }
    expect(existsSync(c.socket)).toBe(false);
  });

  it('no expected digest and no TEE: refuses with exit 3, writing nothing', async () => {
    const c = await newCase();
    const file = path.join(c.dir, 'doc.toml');
    await writeFile(file, documentText('sha256', '[image]\n'));
    const r = await runCli(['serve', '--initdata', file, '--initdata-dir', c.initdataDir, '--listen', `unix://${c.socket}`, '--work-dir', c.workDir]);
    expect(r.code, r.stderr).toBe(3);
    const lines = r.stderr.split('\n').filter((l) => l !== '');
    expect(lines).toHaveLength(1);
    expect(lines[0]).toMatch(/^guestpull: CONFIG: .*--allow-unmeasured-initdata/);
    expect(existsSync(c.socket)).toBe(false);
    expect(existsSync(c.initdataDir)).toBe(false);
  });

  it('--allow-unmeasured-initdata: serves, warns once at start-up and again at every pull', async () => {
    const c = await newCase();
    const file = path.join(c.dir, 'doc.toml');
    // One attempt per request, so the pull of an unreachable image fails fast.
    await writeFile(file, documentText('sha256', '[image]\nmax_attempts = 1\nconnect_timeout_secs = 5\n'));
    const digest = opensslHex(file, 'sha256');
    const daemon = await startDaemon({
      repoRoot,
      socket: c.socket,
      workDir: c.workDir,
      logLevel: 'info',
      extraArgs: ['--initdata', file, '--allow-unmeasured-initdata', '--initdata-dir', c.initdataDir],
    });
    try {
      const client = connectClient(daemon.address);
      expect(await client.health()).toBe('SERVING');
      const startup = jsonLines(daemon.logs()).filter((l) => l.level === 'warn');
      expect(startup, daemon.logs()).toHaveLength(1);
      expect(String(startup[0]!.msg)).toMatch(/unmeasured/i);
      expect(JSON.stringify(startup[0])).toContain(digest);
      expect(existsSync(path.join(c.initdataDir, 'initdata.toml'))).toBe(true);

      const dead = `127.0.0.1:${await freePort()}`;
      const bundle = path.join(c.dir, 'bundle');
      await mkdir(bundle);
      for (let i = 1; i <= 2; i++) {
        await expect(client.pullImage(`${dead}/nothing/here:${i}`, bundle, { deadlineMs: 30_000 })).rejects.toBeTruthy();
        const perPull = jsonLines(daemon.logs()).filter(
          (l) => l.level === 'warn' && typeof l.msg === 'string' && l.msg.startsWith('configuration is unmeasured: ') && l.image !== undefined,
        );
        expect(perPull, daemon.logs()).toHaveLength(i);
        expect(String(perPull[i - 1]!.image)).toContain(`nothing/here:${i}`);
      }
      client.close();
    } finally {
      expect(await daemon.stop()).toBe(0);
    }
  });
});
