/**
 * The kernel command line fallback (src/config/cmdline.ts) and where it applies through the CLI's
 * settings loader: only without init-data and without an [image] table, each value warned as
 * unmeasured; proxy environment variables are never read by anything.
 */
import { execFileSync } from 'node:child_process';
import { mkdtemp, readFile, readdir, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { loadSettings } from '../../src/cli/settings.js';
import { applyKernelCmdline, parseKernelCmdline, readKernelCmdline, withKernelCmdline } from '../../src/config/cmdline.js';
import { defaultLoadedConfig, parseConfig } from '../../src/config/index.js';
import { ErrorCode } from '../../src/errors.js';
import { silentLogger } from '../../src/log.js';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');

const FULL =
  'console=ttyS0 quiet agent.https_proxy=http://10.0.0.1:3128 agent.http_proxy=http://10.0.0.2:3128 ' +
  'agent.no_proxy=10.0.0.0/8,.svc,localhost agent.image_registry_auth=kbs:///default/credentials/test agent.log=debug\n';

let tmp: string;
beforeAll(async () => {
  tmp = await mkdtemp(path.join(os.tmpdir(), 'guestpull-cmdline-'));
});
afterAll(async () => {
  await rm(tmp, { recursive: true, force: true });
});

async function cmdlineFile(text: string): Promise<string> {
  const f = path.join(tmp, `cmdline-${Math.random().toString(36).slice(2)}`);
  await writeFile(f, text);
  return f;
}

describe('parseKernelCmdline', () => {
  it('keeps exactly the four agent.* fallback keys, split at the first =', () => {
    expect(parseKernelCmdline(FULL)).toEqual({
      'agent.https_proxy': 'http://10.0.0.1:3128',
      'agent.http_proxy': 'http://10.0.0.2:3128',
      'agent.no_proxy': '10.0.0.0/8,.svc,localhost',
      'agent.image_registry_auth': 'kbs:///default/credentials/test',
    });
    expect(parseKernelCmdline('agent.https_proxy=http://p:1/?a=b')).toEqual({ 'agent.https_proxy': 'http://p:1/?a=b' });
  });

  it('a later occurrence wins; an empty value unsets; bare words and other keys are ignored', () => {
    expect(parseKernelCmdline('agent.http_proxy=http://a:1 agent.http_proxy=http://b:2')).toEqual({ 'agent.http_proxy': 'http://b:2' });
    expect(parseKernelCmdline('agent.no_proxy=x agent.no_proxy=')).toEqual({});
    expect(parseKernelCmdline('agent.https_proxy agent.https_proxyx=http://a:1 xagent.no_proxy=y =z')).toEqual({});
    expect(parseKernelCmdline('  \t\n')).toEqual({});
  });

  it('readKernelCmdline: a missing file means no parameters; a huge one is refused', async () => {
    expect(await readKernelCmdline(path.join(tmp, 'absent'))).toEqual({});
    expect(await readKernelCmdline(await cmdlineFile(FULL))).toMatchObject({ 'agent.no_proxy': '10.0.0.0/8,.svc,localhost' });
    const huge = await cmdlineFile(`${'x'.repeat(70 * 1024)} agent.no_proxy=a`);
    await expect(readKernelCmdline(huge)).rejects.toMatchObject({ code: ErrorCode.CONFIG });
  });
});

describe('applyKernelCmdline', () => {
  const settings = parseKernelCmdline(FULL);

  it('no configuration at all (no [image]) and no init-data: applies, one unmeasured warning per key', () => {
    const { loaded, unmeasured } = applyKernelCmdline(defaultLoadedConfig(), settings, { initdata: false });
    expect(loaded.config.image.imagePullProxy).toEqual({
      httpsProxy: 'http://10.0.0.1:3128',
      httpProxy: 'http://10.0.0.2:3128',
      noProxy: '10.0.0.0/8,.svc,localhost',
    });
    expect(loaded.config.image.authenticatedRegistryCredentialsUri).toBe('kbs:///default/credentials/test');
    expect(unmeasured).toHaveLength(4);
    for (const [param, key] of [
      ['agent.https_proxy', 'image_pull_proxy.https_proxy'],
      ['agent.http_proxy', 'image_pull_proxy.http_proxy'],
      ['agent.no_proxy', 'image_pull_proxy.no_proxy'],
      ['agent.image_registry_auth', 'authenticated_registry_credentials_uri'],
    ]) {
      const w = unmeasured.find((u) => u.includes(`(${param})`));
      expect(w, param).toMatch(/^configuration is unmeasured: /);
      expect(w).toContain(`[image] ${key}`);
      expect(w).toContain('host controls');
    }
    expect(loaded.warnings).toEqual([]);
  });

  it('a config file without [image] also gets the fallback; its other settings stay', () => {
    const base = parseConfig('socket = "unix:///tmp/x.sock"\n[log]\nlevel = "debug"\n', 'cdh.toml');
    expect(base.hasImageSection).toBe(false);
    const { loaded, unmeasured } = applyKernelCmdline(base, { 'agent.no_proxy': 'a.example' }, { initdata: false });
    expect(loaded.config.image.imagePullProxy).toEqual({ noProxy: 'a.example' });
    expect(loaded.config.socket).toBe('unix:///tmp/x.sock');
    expect(loaded.config.log.level).toBe('debug');
    expect(unmeasured).toHaveLength(1);
  });

  it('an [image] table, even an empty one, turns the fallback off (ignored, with a warning)', () => {
    const base = parseConfig('[image]\n', 'cdh.toml');
    expect(base.hasImageSection).toBe(true);
    const { loaded, unmeasured } = applyKernelCmdline(base, settings, { initdata: false });
    expect(unmeasured).toEqual([]);
    expect(loaded.config).toEqual(base.config);
    expect(loaded.warnings).toHaveLength(4);
    for (const w of loaded.warnings) expect(w).toMatch(/^kernel command line agent\.\S+ ignored: the configuration has an \[image\] table/);
  });

  it('init-data turns the fallback off even without [image]', () => {
    const base = parseConfig('[kbc]\nname = "cc_kbc"\n', 'init-data cdh.toml');
    const { loaded, unmeasured } = applyKernelCmdline(base, settings, { initdata: true });
    expect(unmeasured).toEqual([]);
    expect(loaded.config.image.imagePullProxy).toBeUndefined();
    expect(loaded.config.image.authenticatedRegistryCredentialsUri).toBeUndefined();
    expect(loaded.warnings.every((w) => w.includes('init-data is in use'))).toBe(true);
  });

  it('nothing on the command line: the configuration is returned as is', () => {
    const base = defaultLoadedConfig();
    expect(applyKernelCmdline(base, {}, { initdata: false })).toEqual({ loaded: base, unmeasured: [] });
  });

  it('a value that is not a proxy URL is a CONFIG error naming the parameter', () => {
    let err: unknown;
    try {
      applyKernelCmdline(defaultLoadedConfig(), { 'agent.https_proxy': 'socks5://10.0.0.1:1080' }, { initdata: false, source: '/proc/cmdline' });
    } catch (e) {
      err = e;
    }
    expect(err).toMatchObject({ code: ErrorCode.CONFIG });
    expect((err as Error).message).toMatch(/agent\.https_proxy: expected an http:\/\/ or https:\/\/ proxy URL/);
  });

  it('proxy credentials are not shown in the warning', () => {
    const { unmeasured } = applyKernelCmdline(defaultLoadedConfig(), { 'agent.https_proxy': 'http://user:s3cret@10.0.0.1:3128' }, { initdata: false });
    expect(unmeasured[0]).not.toContain('s3cret');
    expect(unmeasured[0]).toContain('10.0.0.1:3128');
  });

  it('withKernelCmdline reads the given file', async () => {
    const { loaded } = await withKernelCmdline(defaultLoadedConfig(), { initdata: false, path: await cmdlineFile(FULL) });
    expect(loaded.config.image.imagePullProxy?.httpsProxy).toBe('http://10.0.0.1:3128');
  });
});

describe('through the CLI settings loader', () => {
  it('no --config, no --initdata: the command line applies and its warnings go to start-up and every pull', async () => {
    const s = await loadSettings({ help: false }, { logger: silentLogger(), cmdlinePath: await cmdlineFile(FULL) });
    expect(s.loaded.config.image.imagePullProxy?.httpProxy).toBe('http://10.0.0.2:3128');
    expect(s.startupWarnings).toHaveLength(4);
    expect(s.pullWarnings).toEqual(s.startupWarnings);
  });

  it('--config with [image]: the command line is ignored', async () => {
    const cfg = path.join(tmp, 'with-image.toml');
    await writeFile(cfg, '[image]\nmax_concurrent_layer_downloads_per_image = 2\n');
    const s = await loadSettings({ help: false, config: cfg }, { logger: silentLogger(), cmdlinePath: await cmdlineFile(FULL) });
    expect(s.loaded.config.image.imagePullProxy).toBeUndefined();
    expect(s.pullWarnings).toEqual([]);
    expect(s.loaded.warnings.filter((w) => w.includes('ignored'))).toHaveLength(4);
  });
});

describe('proxy environment variables are never read', () => {
  const NAMES = ['HTTPS_PROXY', 'https_proxy', 'HTTP_PROXY', 'http_proxy', 'NO_PROXY', 'no_proxy', 'ALL_PROXY', 'all_proxy'];
  const saved = new Map<string, string | undefined>();
  afterEach(() => {
    for (const [k, v] of saved) {
      if (v === undefined) delete process.env[k];
      else process.env[k] = v;
    }
    saved.clear();
  });

  it('with every proxy variable set, the configuration has no proxy and no no_proxy', async () => {
    for (const n of NAMES) {
      saved.set(n, process.env[n]);
      process.env[n] = n.toLowerCase().includes('no_proxy') ? 'registry.example,10.0.0.0/8' : 'http://10.9.9.9:3128';
    }
    expect(defaultLoadedConfig().config.image.imagePullProxy).toBeUndefined();
    expect(parseConfig('[image]\nwork_dir = "/tmp/w"\n', 'cdh.toml').config.image.imagePullProxy).toBeUndefined();
    const empty = await cmdlineFile('console=ttyS0\n');
    const s = await loadSettings({ help: false }, { logger: silentLogger(), cmdlinePath: empty });
    expect(s.loaded.config.image.imagePullProxy).toBeUndefined();
    expect(JSON.stringify(s)).not.toContain('10.9.9.9');
    expect(s.pullWarnings).toEqual([]);
  });

  it('no source file outside src/config/ touches process.env, and none names a proxy variable', async () => {
    const files = execFileSync('find', [path.join(root, 'src'), '-name', '*.ts'], { encoding: 'utf8' }).split('\n').filter(Boolean);
    expect(files.length).toBeGreaterThan(10);
    for (const f of files) {
      // Code only: block and line comments removed (a comment may well say what is never read).
      const text = (await readFile(f, 'utf8')).replace(/\/\*[\s\S]*?\*\//g, '').replace(/(^|[^:'"`])\/\/.*$/gm, '$1');
      const rel = path.relative(root, f);
      if (!rel.startsWith(`src${path.sep}config${path.sep}`)) expect(text, rel).not.toMatch(/process\.env\b/);
      expect(text, rel).not.toMatch(/process\.env\s*(\.|\[\s*['"`])\s*(https?|no|all)_proxy/i);
      expect(text, rel).not.toMatch(/new\s+EnvHttpProxyAgent\b|import[^;]*\bEnvHttpProxyAgent\b/);
    }
    expect((await readdir(path.join(root, 'src', 'config'))).includes('cmdline.ts')).toBe(true);
  });
});
