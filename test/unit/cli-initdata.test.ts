/**
 * `guestpull initdata digest|pack|annotation|check` and the init-data flags of serve/pull: argument
 * parsing as pure functions; digest vectors for every algorithm and platform against `openssl dgst`
 * with the padding done here; the image and annotation formats decoded here; exit codes and help as a
 * user sees them (through tsx from src/).
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdir, mkdtemp, readFile, readdir, rm, stat, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { gunzipSync } from 'node:zlib';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { exitCodeFor } from '../../src/cli/exit-codes.js';
import { parseInitdataArgs, runInitdata } from '../../src/cli/initdata.js';
import { parsePullArgs } from '../../src/cli/pull.js';
import { parseServeArgs } from '../../src/cli/serve.js';
import { loadSettings } from '../../src/cli/settings.js';
import { ErrorCode, GuestpullError } from '../../src/errors.js';
import { DEFAULT_INITDATA_DIR, TDX_MRCONFIGID_SYSFS } from '../../src/initdata/index.js';
import { silentLogger } from '../../src/log.js';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const CLI = path.join(root, 'src', 'cli.ts');

const ALGORITHMS = ['sha256', 'sha384', 'sha512'] as const;
const FIELDS = { snp: 32, tdx: 48, cca: 64, se: 256 } as const;

function run(...args: string[]): { status: number | null; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, ['--import', 'tsx', CLI, ...args], { cwd: root, encoding: 'utf8', timeout: 30_000 });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

/** Run in-process: the exit code (failures mapped as main() does) and stdout. */
async function runIn(...args: string[]): Promise<{ code: number; stdout: string; error?: GuestpullError }> {
  let stdout = '';
  const sink = { write: (s: string) => ((stdout += s), true) } as unknown as NodeJS.WritableStream;
  try {
    return { code: await runInitdata(args, sink), stdout };
  } catch (e) {
    if (!(e instanceof GuestpullError)) throw e;
    return { code: exitCodeFor(e.code), stdout, error: e };
  }
}

function openssl(file: string, algorithm: string): Buffer {
  const out = execFileSync('openssl', ['dgst', `-${algorithm}`, '-r', file], { encoding: 'utf8' });
  return Buffer.from(out.split(' ')[0]!, 'hex');
}

/** The TEE field by hand: truncate, or zero-pad at the end. */
function fit(d: Buffer, length: number): Buffer {
  return Buffer.concat([d, Buffer.alloc(Math.max(0, length - d.length))]).subarray(0, length);
}

function documentText(algorithm: string): string {
  return `version = "0.1.0"\nalgorithm = "${algorithm}"\n\n[data]\n"cdh.toml" = '''\n[image]\nmax_concurrent_layer_downloads_per_image = 2\n'''\n"aa.toml" = "x"\n`;
}

let tmp: string;
const docs: Record<string, string> = {};
beforeAll(async () => {
  tmp = await mkdtemp(path.join(os.tmpdir(), 'guestpull-cli-initdata-'));
  for (const a of ALGORITHMS) {
    docs[a] = path.join(tmp, `${a}.toml`);
    await writeFile(docs[a]!, documentText(a));
  }
});
afterAll(async () => {
  await rm(tmp, { recursive: true, force: true });
});

describe('parseInitdataArgs', () => {
  it('digest: FILE resolved, platform and encoding default to none and hex', () => {
    expect(parseInitdataArgs(['digest', 'doc.toml'])).toEqual({ kind: 'digest', file: path.resolve('doc.toml'), platform: 'none', encoding: 'hex' });
    expect(parseInitdataArgs(['digest', '/d.toml', '--platform', 'tdx', '--encoding', 'base64'])).toMatchObject({ platform: 'tdx', encoding: 'base64' });
  });

  it('pack, annotation, check', () => {
    expect(parseInitdataArgs(['pack', '/a.toml', 'out.img'])).toEqual({ kind: 'pack', file: '/a.toml', out: path.resolve('out.img'), force: false });
    expect(parseInitdataArgs(['pack', '/a.toml', '/o.img', '--force'])).toMatchObject({ force: true });
    expect(parseInitdataArgs(['annotation', '/a.toml'])).toEqual({ kind: 'annotation', file: '/a.toml' });
    const check = parseInitdataArgs(['check', '/a.toml', '--digest', '0xAB01', '--platform', 'snp']);
    expect(check).toMatchObject({ kind: 'check', file: '/a.toml', platform: 'snp', expectedText: '0xAB01' });
    expect(check.kind === 'check' && check.expected.toString('hex')).toBe('ab01');
    expect(parseInitdataArgs(['check', '/a.toml', '--digest', 'qwE='])).not.toHaveProperty('platform');
  });

  it('--help anywhere gives the help text', () => {
    for (const args of [['--help'], ['-h'], ['digest', '--help'], ['pack', '-h'], ['annotation', '--help'], ['check', '--help']]) {
      expect(parseInitdataArgs(args).kind, args.join(' ')).toBe('help');
    }
  });

  it.each([
    [[], /expected a command/],
    [['frob'], /unknown initdata command "frob"/],
    [['toString', 'x'], /unknown initdata command "toString"/],
    [['digest'], /expected FILE, got 0/],
    [['digest', 'a', 'b'], /got 2/],
    [['digest', 'a', '--platform', 'sev'], /--platform "sev" is not one of none, snp, tdx, cca, se/],
    [['digest', 'a', '--encoding', 'b32'], /--encoding "b32" must be hex or base64/],
    [['pack', 'a'], /expected FILE and OUT\.img/],
    [['pack', 'a', 'a'], /must not be FILE itself/],
    [['annotation', ''], /FILE must not be empty/],
    [['check', 'a'], /--digest VALUE is required/],
    [['check', 'a', '--digest', 'not hex!'], /--digest: .*neither hex nor base64/],
    [['check', 'a', '--digest', 'ab', '--frob'], /--frob/],
  ])('%j is a usage error', (args, message) => {
    let err: unknown;
    try {
      parseInitdataArgs(args);
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(GuestpullError);
    expect((err as GuestpullError).code).toBe(ErrorCode.INVALID_ARGUMENT);
    expect((err as Error).message).toMatch(message);
  });
});

describe('init-data flags of serve and pull', () => {
  it('--initdata with its defaults; paths resolved; `auto` kept', () => {
    expect(parseServeArgs(['--initdata', 'doc.toml'])).toEqual({
      help: false,
      initdata: { spec: path.resolve('doc.toml'), allowUnmeasured: false, dir: DEFAULT_INITDATA_DIR },
    });
    const full = parsePullArgs([
      'reg.test/a:1', '/b', '--initdata', 'auto', '--initdata-digest', 'ABCDEF', '--allow-unmeasured-initdata',
      '--initdata-dir', 'idir', '--initdata-max-bytes', '65536',
    ]);
    expect(full.initdata).toEqual({ spec: 'auto', expectedDigest: 'ABCDEF', allowUnmeasured: true, dir: path.resolve('idir'), maxBytes: 65536 });
    expect(parseServeArgs([])).toEqual({ help: false });
  });

  it.each([
    [['--config', '/etc/cdh.toml', '--initdata', 'auto'], /--config and --initdata cannot be used together/],
    [['--initdata-digest', 'ab'], /--initdata-digest needs --initdata/],
    [['--allow-unmeasured-initdata'], /--allow-unmeasured-initdata needs --initdata/],
    [['--initdata-dir', '/x'], /--initdata-dir needs --initdata/],
    [['--initdata', ''], /--initdata must not be empty/],
    [['--initdata', 'auto', '--initdata-digest', 'zz!'], /--initdata-digest: /],
    [['--initdata', 'auto', '--initdata-max-bytes', '0'], /--initdata-max-bytes "0"/],
    [['--initdata', 'auto', '--initdata-max-bytes', '1e6'], /--initdata-max-bytes "1e6"/],
    [['--initdata', 'auto', '--initdata-max-bytes', '999999999'], /from 1 to/],
  ])('serve %j is a usage error', (args, message) => {
    expect(() => parseServeArgs(args)).toThrow(message);
    try {
      parseServeArgs(args);
    } catch (e) {
      expect((e as GuestpullError).code).toBe(ErrorCode.INVALID_ARGUMENT);
    }
  });
});

describe('initdata digest: vectors for every algorithm and platform', () => {
  it.each(ALGORITHMS)('%s: raw and fitted values equal openssl dgst, truncated or zero-padded here', async (alg) => {
    const file = docs[alg]!;
    const d = openssl(file, alg);
    expect(d.length).toBe({ sha256: 32, sha384: 48, sha512: 64 }[alg]);
    const none = await runIn('digest', file);
    expect(none).toEqual({ code: 0, stdout: `${d.toString('hex')}\n` });
    expect((await runIn('digest', file, '--platform', 'none')).stdout).toBe(none.stdout);
    for (const [platform, length] of Object.entries(FIELDS)) {
      const want = fit(d, length);
      const hex = await runIn('digest', file, '--platform', platform);
      expect(hex.stdout, `${alg} ${platform}`).toBe(`${want.toString('hex')}\n`);
      const b64 = await runIn('digest', file, '--platform', platform, '--encoding', 'base64');
      expect(b64.stdout, `${alg} ${platform} base64`).toBe(`${want.toString('base64')}\n`);
    }
  });

  it('a packed image digests the same as its TOML (the digest is over the document, not the image)', async () => {
    const img = path.join(tmp, 'digest.img');
    expect((await runIn('pack', docs.sha384!, img)).code).toBe(0);
    expect((await runIn('digest', img, '--platform', 'tdx')).stdout).toBe((await runIn('digest', docs.sha384!, '--platform', 'tdx')).stdout);
  });

  it('an invalid document is refused (exit 3), naming the problem', async () => {
    const bad = path.join(tmp, 'bad-alg.toml');
    await writeFile(bad, 'version = "0.1.0"\nalgorithm = "SHA256"\n[data]\n');
    const r = await runIn('digest', bad);
    expect(r.code).toBe(3);
    expect(r.stdout).toBe('');
    expect(r.error?.message).toMatch(/algorithm/);
  });
});

describe('initdata pack and annotation', () => {
  it('pack writes magic, u64 LE length, gzip(FILE), zero padding to 512', async () => {
    const out = path.join(tmp, 'layout.img');
    expect((await runIn('pack', docs.sha256!, out)).code).toBe(0);
    const img = await readFile(out);
    const doc = await readFile(docs.sha256!);
    expect(img.length % 512).toBe(0);
    expect(img.subarray(0, 8).toString('latin1')).toBe('initdata');
    const n = Number(img.readBigUInt64LE(8));
    expect(n).toBeGreaterThan(0);
    expect(16 + n).toBeLessThanOrEqual(img.length);
    expect(img.length - (16 + n)).toBeLessThan(512);
    expect(gunzipSync(img.subarray(16, 16 + n)).equals(doc)).toBe(true);
    expect(img.subarray(16 + n).every((b) => b === 0)).toBe(true);
  });

  it('pack refuses to overwrite OUT without --force (exit 2), and overwrites with it', async () => {
    const out = path.join(tmp, 'exists.img');
    await writeFile(out, 'precious');
    const refused = await runIn('pack', docs.sha256!, out);
    expect(refused.code).toBe(2);
    expect(refused.error?.message).toMatch(/already exists; pass --force/);
    expect(await readFile(out, 'utf8')).toBe('precious');
    expect((await runIn('pack', docs.sha256!, out, '--force')).code).toBe(0);
    expect((await readFile(out)).subarray(0, 8).toString()).toBe('initdata');
  });

  it('pack validates the document first and writes nothing for a bad one', async () => {
    const bad = path.join(tmp, 'bad-version.toml');
    await writeFile(bad, 'version = "0.2.0"\nalgorithm = "sha256"\n[data]\n');
    const out = path.join(tmp, 'never.img');
    expect((await runIn('pack', bad, out)).code).toBe(3);
    await expect(stat(out)).rejects.toMatchObject({ code: 'ENOENT' });
  });

  it('annotation prints base64(gzip(FILE)) on one line', async () => {
    const r = await runIn('annotation', docs.sha512!);
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/^[A-Za-z0-9+/]+=*\n$/);
    expect(gunzipSync(Buffer.from(r.stdout.trim(), 'base64')).equals(await readFile(docs.sha512!))).toBe(true);
  });
});

describe('initdata check', () => {
  it('matches the raw digest, a value fitted to any field, hex or base64: exit 0', async () => {
    const d = openssl(docs.sha384!, 'sha384');
    for (const value of [d.toString('hex'), d.toString('base64'), fit(d, 32).toString('hex'), fit(d, 256).toString('base64')]) {
      const r = await runIn('check', docs.sha384!, '--digest', value);
      expect(r.code, value).toBe(0);
      expect(r.stdout).toMatch(/^match: .*\n$/);
    }
    expect((await runIn('check', docs.sha384!, '--digest', fit(d, 48).toString('hex'), '--platform', 'tdx')).code).toBe(0);
  });

  it('a mismatch prints one line with both values and exits 1', async () => {
    const d = openssl(docs.sha256!, 'sha256');
    const wrong = Buffer.from(d);
    wrong[31] ^= 1;
    const r = await runIn('check', docs.sha256!, '--digest', wrong.toString('hex'));
    expect(r.code).toBe(1);
    expect(r.stdout.split('\n').filter(Boolean)).toHaveLength(1);
    expect(r.stdout).toMatch(/^mismatch: /);
    expect(r.stdout).toContain(d.toString('hex'));
    expect(r.stdout).toContain(wrong.toString('hex'));
  });

  it('--platform demands the whole field: the raw digest is not the SNP field of a sha512 document', async () => {
    const d = openssl(docs.sha512!, 'sha512');
    expect((await runIn('check', docs.sha512!, '--digest', d.toString('hex'), '--platform', 'snp')).code).toBe(1);
    expect((await runIn('check', docs.sha512!, '--digest', fit(d, 32).toString('hex'), '--platform', 'snp')).code).toBe(0);
    // The SE field is the digest zero-padded: a value that differs only in the padding is a mismatch.
    const se = fit(d, 256);
    se[255] = 1;
    expect((await runIn('check', docs.sha512!, '--digest', se.toString('hex'), '--platform', 'se')).code).toBe(1);
    expect((await runIn('check', docs.sha512!, '--digest', se.toString('hex'))).code).toBe(1);
  });

  it('a tampered document (one byte changed) no longer matches', async () => {
    const d = openssl(docs.sha256!, 'sha256').toString('hex');
    const tampered = path.join(tmp, 'tampered.toml');
    await writeFile(tampered, (await readFile(docs.sha256!, 'utf8')).replace('= 2', '= 3'));
    expect((await runIn('check', tampered, '--digest', d)).code).toBe(1);
  });
});

describe('loadSettings with init-data (in-process, a fake TDX sysfs)', () => {
  let n = 0;
  /** `mrconfigid`, given the document file, is the TDX field the fake sysfs reports. */
  async function setup(doc: string, mrconfigid?: (file: string) => Buffer) {
    const dir = path.join(tmp, `settings-${++n}`);
    await mkdir(dir);
    const file = path.join(dir, 'doc.toml');
    await writeFile(file, doc);
    const sysfsRoot = path.join(dir, 'sys');
    if (mrconfigid) {
      const p = path.join(sysfsRoot, TDX_MRCONFIGID_SYSFS);
      await mkdir(path.dirname(p), { recursive: true });
      await writeFile(p, mrconfigid(file));
    }
    const cmdlinePath = path.join(dir, 'cmdline');
    await writeFile(cmdlinePath, 'agent.https_proxy=http://10.6.6.6:3128\n');
    const hooks = { logger: silentLogger(), cmdlinePath, tee: { sysfsRoot, configfsRoot: path.join(dir, 'no-configfs') } };
    const initdata = (extra: Partial<{ allowUnmeasured: boolean }> = {}) => ({
      help: false,
      initdata: { spec: file, allowUnmeasured: extra.allowUnmeasured ?? false, dir: path.join(dir, 'installed') },
    });
    return { dir, file, hooks, initdata, installed: path.join(dir, 'installed') };
  }

  it('expected value from the TEE: measured; installed; its cdh.toml is the config; the kernel command line is ignored', async () => {
    const u = await setup(documentText('sha256'), (file) => fit(openssl(file, 'sha256'), 48));
    const s = await loadSettings(u.initdata(), u.hooks);
    expect(s.initdata).toMatchObject({ measured: true, digestHex: openssl(u.file, 'sha256').toString('hex') });
    expect(s.initdata?.expectedFrom).toContain('mrconfigid');
    expect(s.loaded.config.image.maxConcurrentLayerDownloadsPerImage).toBe(2);
    expect(s.loaded.config.image.imagePullProxy).toBeUndefined();
    expect(s.loaded.warnings).toEqual([expect.stringMatching(/agent\.https_proxy ignored: init-data is in use/)]);
    expect(s.pullWarnings).toEqual([]);
    expect(s.source).toBe('init-data cdh.toml');
    expect((await readdir(u.installed)).sort()).toEqual(['aa.toml', 'cdh.toml', 'initdata.toml']);
  });

  it('a TEE value that does not match: INITDATA_MISMATCH, nothing installed', async () => {
    const u = await setup(documentText('sha256'), () => Buffer.alloc(48, 7));
    await expect(loadSettings(u.initdata(), u.hooks)).rejects.toMatchObject({ code: ErrorCode.INITDATA_MISMATCH });
    await expect(stat(u.installed)).rejects.toMatchObject({ code: 'ENOENT' });
  });

  it('no TEE value: CONFIG error, or with --allow-unmeasured-initdata a per-pull warning', async () => {
    const u = await setup(documentText('sha512'));
    await expect(loadSettings(u.initdata(), u.hooks)).rejects.toMatchObject({ code: ErrorCode.CONFIG });
    await expect(stat(u.installed)).rejects.toMatchObject({ code: 'ENOENT' });
    const s = await loadSettings(u.initdata({ allowUnmeasured: true }), u.hooks);
    expect(s.initdata?.measured).toBe(false);
    expect(s.pullWarnings).toHaveLength(1);
    expect(s.pullWarnings[0]).toMatch(/^configuration is unmeasured: init-data from .* was not checked against the TEE/);
    expect(s.pullWarnings[0]).toContain(openssl(u.file, 'sha512').toString('hex'));
    // Said once at start-up by the verifier itself, not a second time.
    expect(s.startupWarnings).toEqual([]);
  });

  it('a document without cdh.toml: the defaults, with a warning', async () => {
    const doc = 'version = "0.1.0"\nalgorithm = "sha256"\n[data]\n"aa.toml" = "x"\n';
    const u = await setup(doc);
    const s = await loadSettings(u.initdata({ allowUnmeasured: true }), u.hooks);
    expect(s.loaded.config.image.maxConcurrentLayerDownloadsPerImage).toBe(3);
    expect(s.loaded.warnings).toContainEqual(expect.stringMatching(/has no "cdh\.toml" entry in \[data\]: using the default configuration/));
  });

  it('--work-dir still overrides the init-data work_dir', async () => {
    const u = await setup(documentText('sha256'));
    const s = await loadSettings({ ...u.initdata({ allowUnmeasured: true }), workDir: '/tmp/override' }, u.hooks);
    expect(s.loaded.config.image.workDir).toBe('/tmp/override');
  });
});

describe('as a process', () => {
  it('help: the main help lists initdata; each subcommand has its own', () => {
    const main = run('--help');
    expect(main.stdout).toMatch(/^\s+initdata\s/m);
    const overview = run('initdata', '--help');
    expect(overview.status).toBe(0);
    for (const sub of ['digest', 'pack', 'annotation', 'check']) expect(overview.stdout).toContain(`  ${sub} FILE`);
    for (const sub of ['digest', 'pack', 'annotation', 'check']) {
      const r = run('initdata', sub, '--help');
      expect(r.status, sub).toBe(0);
      expect(r.stdout).toMatch(new RegExp(`^Usage: guestpull initdata ${sub} FILE`));
      expect(run('help', 'initdata', sub).stdout).toBe(r.stdout);
    }
    const serve = run('serve', '--help');
    for (const flag of ['--initdata', '--initdata-digest', '--allow-unmeasured-initdata', '--initdata-dir', '--initdata-max-bytes']) {
      expect(serve.stdout).toContain(flag);
    }
    expect(serve.stdout).toMatch(/^\s+8\s+init-data refused/m);
  });

  it('digest prints exactly what openssl computes; check exits 0 and 1; errors exit 2 and 3', async () => {
    const d = openssl(docs.sha256!, 'sha256').toString('hex');
    const digest = run('initdata', 'digest', docs.sha256!);
    expect(digest).toMatchObject({ status: 0, stdout: `${d}\n`, stderr: '' });
    expect(run('initdata', 'check', docs.sha256!, '--digest', d).status).toBe(0);
    const mismatch = run('initdata', 'check', docs.sha256!, '--digest', '00'.repeat(32));
    expect(mismatch.status).toBe(1);
    expect(mismatch.stdout).toMatch(/^mismatch: /);
    const usage = run('initdata', 'digest', docs.sha256!, '--platform', 'sgx');
    expect(usage.status).toBe(2);
    expect(usage.stderr).toMatch(/^guestpull: INVALID_ARGUMENT: --platform "sgx"/);
    const missing = run('initdata', 'digest', path.join(tmp, 'missing.toml'));
    expect(missing.status).toBe(3);
    expect(missing.stderr.trim().split('\n')).toHaveLength(1);
  });

  it('serve with both --config and --initdata exits 2', () => {
    const r = run('serve', '--config', docs.sha256!, '--initdata', docs.sha256!);
    expect(r.status).toBe(2);
    expect(r.stderr).toMatch(/^guestpull: INVALID_ARGUMENT: --config and --initdata cannot be used together/);
  });
});
