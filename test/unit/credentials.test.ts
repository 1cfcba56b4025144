/**
 * Credentials and the registry configuration from URIs: auth.json parsing (every credential form,
 * legacy keys, bad input named by key and never by value), lookup (longest repository path at
 * component boundaries, then the registry; Docker Hub aliases), loading (inline wins over the
 * URI, file:// read and bounded, kbs:// refused), registries.conf loading, failure messages that
 * name the key used, and the Puller failing at construction on a bad resource.
 */
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { Writable } from 'node:stream';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { parseConfig, type Config } from '../../src/config/index.js';
import { ErrorCode, GuestpullError } from '../../src/errors.js';
import { createLogger, silentLogger, type Logger } from '../../src/log.js';
import {
  CredentialStore,
  explainAuthFailure,
  loadCredentials,
  normaliseAuthKey,
  parseAuthFile,
  MAX_AUTH_FILE_BYTES,
} from '../../src/pull/credentials/index.js';
import { Puller } from '../../src/pull/index.js';
import { loadRegistryConfiguration, MAX_REGISTRIES_CONF_BYTES } from '../../src/pull/registries/load.js';

const b64 = (s: string): string => Buffer.from(s, 'utf8').toString('base64');

let tmp: string;
beforeAll(async () => {
  tmp = await mkdtemp(path.join(os.tmpdir(), 'guestpull-cred-unit-'));
});
afterAll(async () => {
  if (tmp) await rm(tmp, { recursive: true, force: true });
});

function caught(f: () => unknown): GuestpullError {
  try {
    f();
  } catch (e) {
    expect(e).toBeInstanceOf(GuestpullError);
    return e as GuestpullError;
  }
  throw new Error('expected a GuestpullError');
}

/** A logger whose JSON lines are kept in memory. */
function memoryLogger(): { logger: Logger; lines: () => string } {
  let out = '';
  const destination = new Writable({
    write(chunk: Buffer, _enc, cb) {
      out += chunk.toString('utf8');
      cb();
    },
  });
  return { logger: createLogger({ level: 'debug', destination }), lines: () => out };
}

function image(toml: string): Config['image'] {
  return parseConfig(toml, 'test').config.image;
}

function store(auths: Record<string, unknown>): CredentialStore {
  return new CredentialStore(parseAuthFile(JSON.stringify({ auths }), 'test').entries, 'test');
}

describe('normaliseAuthKey', () => {
  it.each([
    ['registry.example.com', 'registry.example.com', ''],
    ['registry.example.com:5000/team/app', 'registry.example.com:5000', 'team/app'],
    ['Registry.Example.COM/team', 'registry.example.com', 'team'],
    ['https://index.docker.io/v1/', 'docker.io', ''],
    ['https://index.docker.io/v1', 'docker.io', ''],
    ['http://registry.example.com/v2/', 'registry.example.com', ''],
    ['https://registry.example.com/', 'registry.example.com', ''],
    ['registry.example.com/v2/', 'registry.example.com', ''],
    ['registry-1.docker.io/library', 'docker.io', 'library'],
    ['127.0.0.1:5000/private/', '127.0.0.1:5000', 'private'],
    ['[::1]:5000', '[::1]:5000', ''],
  ])('%s → %s %s', (key, registry, p) => {
    expect(normaliseAuthKey(key)).toEqual({ registry, path: p });
  });

  it('keeps a v2 namespace written without the legacy trailing slash or scheme', () => {
    expect(normaliseAuthKey('registry.example.com/v2')).toEqual({ registry: 'registry.example.com', path: 'v2' });
  });

  it.each(['', 'has space.example.com', 'example.com/Upper', 'exa_mple.com', 'example.com//x', 'example.com:99999'])(
    'refuses %j',
    (key) => {
      expect(() => normaliseAuthKey(key)).toThrow();
    },
  );
});

describe('parseAuthFile', () => {
  it('reads auth, username/password and identitytoken; identitytoken wins, then auth', () => {
    const f = parseAuthFile(
      JSON.stringify({
        auths: {
          'a.example.com': { auth: b64('alice:pa:ss') },
          'b.example.com': { username: 'bob', password: 'pw' },
          'c.example.com': { identitytoken: 'refresh-me', auth: b64('carol:x') },
          'd.example.com': { auth: b64('dave:from-auth'), username: 'other', password: 'other' },
          'e.example.com': { auth: b64('eve:x'), email: 'eve@example.com', serveraddress: 'e' },
        },
        HttpHeaders: { 'User-Agent': 'x' },
      }),
      'test',
    );
    const by = Object.fromEntries(f.entries.map((e) => [e.key, e.credentials]));
    expect(by['a.example.com']).toEqual({ username: 'alice', password: 'pa:ss' });
    expect(by['b.example.com']).toEqual({ username: 'bob', password: 'pw' });
    expect(by['c.example.com']).toEqual({ identityToken: 'refresh-me' });
    expect(by['d.example.com']).toEqual({ username: 'dave', password: 'from-auth' });
    expect(by['e.example.com']).toEqual({ username: 'eve', password: 'x' });
    expect(f.notes).toEqual([]);
  });

  it('an entry without credentials (Docker with a credsStore) is ignored with a note; so are helpers', () => {
    const f = parseAuthFile(JSON.stringify({ auths: { 'https://index.docker.io/v1/': {} }, credsStore: 'desktop' }), 'file x');
    expect(f.entries).toEqual([]);
    expect(f.notes.join('\n')).toContain('credential helpers');
    expect(f.notes.join('\n')).toContain('"https://index.docker.io/v1/"');
  });

  it('a document without auths has no entries', () => {
    expect(parseAuthFile('{}', 'test').entries).toEqual([]);
  });

  it.each([
    [{ auths: { 'x.example.com': { auth: 'not base64!!' } } }, 'not base64'],
    [{ auths: { 'x.example.com': { auth: b64('no-colon-here') } } }, 'username:password'],
    [{ auths: { 'x.example.com': { auth: b64(':only-password') } } }, 'username:password'],
    [{ auths: { 'x.example.com': { username: 'u' } } }, 'without "password"'],
    [{ auths: { 'x.example.com': { password: 'p' } } }, 'without "username"'],
    [{ auths: { 'x.example.com': { username: 'a:b', password: 'p' } } }, 'must not contain'],
    [{ auths: { 'not_a_host': { auth: b64('u:p') } } }, 'registry host'],
  ])('refuses a bad entry, naming the key but not the value (%#)', (doc, why) => {
    const e = caught(() => parseAuthFile(JSON.stringify(doc), 'auth.json file /x'));
    expect(e.code).toBe(ErrorCode.CONFIG);
    expect(e.message).toContain(why);
    expect(e.message).toContain('auth.json file /x');
    expect(e.message).toMatch(/key "(x\.example\.com|not_a_host)"/);
    expect(e.message).not.toContain(b64('no-colon-here'));
    expect(e.message).not.toContain('not base64!!');
  });

  it('refuses wrong types naming the path', () => {
    const e = caught(() => parseAuthFile(JSON.stringify({ auths: { 'x.example.com': { auth: 42 } } }), 'test'));
    expect(e.code).toBe(ErrorCode.CONFIG);
    expect(e.message).toContain('["auths"]["x.example.com"]["auth"]');
    expect(caught(() => parseAuthFile('[]', 'test')).code).toBe(ErrorCode.CONFIG);
    expect(caught(() => parseAuthFile('{"auths": []}', 'test')).message).toContain('["auths"]');
  });

  it('invalid JSON is refused without quoting the text (it may hold a secret)', () => {
    const text = '{"auths": {"x.example.com": {"auth": "c2VjcmV0LXZhbHVl" oops}}}';
    const e = caught(() => parseAuthFile(text, 'test'));
    expect(e.code).toBe(ErrorCode.CONFIG);
    expect(e.message).toContain('not valid JSON');
    expect(e.message).not.toContain('c2VjcmV0');
    expect(e.message).not.toContain('oops');
  });

  it('is bounded', () => {
    const big = JSON.stringify({ auths: {}, pad: 'x'.repeat(MAX_AUTH_FILE_BYTES) });
    expect(caught(() => parseAuthFile(big, 'test')).message).toContain(`larger than ${MAX_AUTH_FILE_BYTES}`);
  });
});

describe('CredentialStore.lookup', () => {
  const s = store({
    '127.0.0.1:5000': { auth: b64('registry:wide') },
    '127.0.0.1:5000/private': { auth: b64('private:ns') },
    '127.0.0.1:5000/private/app': { auth: b64('private:app') },
    'https://index.docker.io/v1/': { auth: b64('legacy:hub') },
    'docker.io': { auth: b64('canonical:hub') },
    'docker.io/library': { auth: b64('hub:library') },
    'quay.io/team': { auth: b64('quay:team') },
  });
  const user = (registry: string, repo: string): string | undefined => {
    const m = s.lookup(registry, repo);
    return m ? `${m.key} ${'username' in m.credentials ? m.credentials.username : ''}` : undefined;
  };

  it('the longest repository path wins, then the registry', () => {
    expect(user('127.0.0.1:5000', 'private/app')).toBe('127.0.0.1:5000/private/app private');
    expect(user('127.0.0.1:5000', 'private/app/sub')).toBe('127.0.0.1:5000/private/app private');
    expect(user('127.0.0.1:5000', 'private/other')).toBe('127.0.0.1:5000/private private');
    expect(user('127.0.0.1:5000', 'public/app')).toBe('127.0.0.1:5000 registry');
  });

  it('matches only at path-component boundaries', () => {
    expect(user('127.0.0.1:5000', 'privateer/app')).toBe('127.0.0.1:5000 registry');
    expect(user('127.0.0.1:5000', 'private/application')).toBe('127.0.0.1:5000/private private');
    expect(user('quay.io', 'teammate/app')).toBeUndefined();
    expect(user('quay.io', 'team/app')).toBe('quay.io/team quay');
  });

  it('a port names another registry; hosts compare case-insensitively', () => {
    expect(user('127.0.0.1:5001', 'private/app')).toBeUndefined();
    expect(user('127.0.0.1', 'private/app')).toBeUndefined();
    expect(user('QUAY.IO', 'team/x')).toBe('quay.io/team quay');
  });

  it('docker.io ≡ index.docker.io ≡ registry-1.docker.io; a canonical key beats the legacy spelling', () => {
    for (const r of ['docker.io', 'index.docker.io', 'registry-1.docker.io']) {
      expect(user(r, 'library/busybox')).toBe('docker.io/library hub');
      expect(user(r, 'someone/app')).toBe('docker.io canonical');
    }
    const legacyOnly = store({ 'https://index.docker.io/v1/': { auth: b64('legacy:hub') } });
    expect(legacyOnly.lookup('registry-1.docker.io', 'x/y')?.key).toBe('https://index.docker.io/v1/');
  });

  it('nothing configured: nothing found', () => {
    expect(CredentialStore.empty().lookup('docker.io', 'library/busybox')).toBeUndefined();
    expect(CredentialStore.empty().size).toBe(0);
  });
});

describe('loadCredentials', () => {
  const AUTH = JSON.stringify({ auths: { 'file.example.com': { auth: b64('fileuser:file-secret-pw') } } });
  const INLINE = JSON.stringify({ auths: { 'inline.example.com': { username: 'inl', password: 'inline-secret-pw' } } });

  it('reads file:// and logs the keys, never the secrets', async () => {
    const file = path.join(tmp, 'auth.json');
    await writeFile(file, AUTH);
    const { logger, lines } = memoryLogger();
    const s = loadCredentials(image(`[image]\nauthenticated_registry_credentials_uri = "file://${file}"\n`), logger);
    expect(s.keys()).toEqual(['file.example.com']);
    expect(s.source).toBe(`auth.json file ${file}`);
    expect(s.lookup('file.example.com', 'a/b')?.credentials).toEqual({ username: 'fileuser', password: 'file-secret-pw' });
    expect(lines()).toContain('file.example.com');
    expect(lines()).not.toContain('file-secret-pw');
    expect(lines()).not.toContain(b64('fileuser:file-secret-pw'));
  });

  it('inline wins over the URI, and says the URI was ignored', async () => {
    const { logger, lines } = memoryLogger();
    const toml = `[image]\nauthenticated_registry_credentials_uri = "file:///nonexistent/auth.json"\nauthenticated_registry_credentials = '''${INLINE}'''\n`;
    const s = loadCredentials(image(toml), logger);
    expect(s.keys()).toEqual(['inline.example.com']);
    expect(lines()).toContain('authenticated_registry_credentials_uri is ignored');
    expect(lines()).not.toContain('inline-secret-pw');
  });

  it('kbs:// → CONFIG (FAILED_PRECONDITION) saying key-broker resources are not supported yet', () => {
    const e = caught(() => loadCredentials(image('[image]\nauthenticated_registry_credentials_uri = "kbs:///default/credential/test"\n'), silentLogger()));
    expect(e.code).toBe(ErrorCode.CONFIG);
    expect(e.message).toContain('key-broker (kbs://) resources are not supported yet');
    expect(e.message).toContain('authenticated_registry_credentials_uri');
  });

  it.each([
    ['https://example.com/auth.json', 'not a supported URI'],
    ['/etc/auth.json', 'not a supported URI'],
    ['file://host/etc/auth.json', 'not a valid file URI'],
    ['file:relative/auth.json', 'not a valid file URI'],
    ['file:///nonexistent/guestpull/auth.json', 'ENOENT'],
  ])('%s → CONFIG (%s)', (uri, why) => {
    const e = caught(() => loadCredentials(image(`[image]\nauthenticated_registry_credentials_uri = "${uri}"\n`), silentLogger()));
    expect(e.code).toBe(ErrorCode.CONFIG);
    expect(e.message).toContain(why);
  });

  it('refuses a directory and an oversized file', async () => {
    const big = path.join(tmp, 'big-auth.json');
    await writeFile(big, ' '.repeat(MAX_AUTH_FILE_BYTES + 1));
    expect(caught(() => loadCredentials(image(`[image]\nauthenticated_registry_credentials_uri = "file://${big}"\n`), silentLogger())).message).toContain(
      'more than',
    );
    expect(caught(() => loadCredentials(image(`[image]\nauthenticated_registry_credentials_uri = "file://${tmp}"\n`), silentLogger())).message).toContain(
      'not a regular file',
    );
  });

  it('nothing configured → empty store', () => {
    expect(loadCredentials(image('[image]\n'), silentLogger()).size).toBe(0);
  });
});

describe('loadRegistryConfiguration', () => {
  const CONF = `unqualified-search-registries = ["registry.example.com"]\n[[registry]]\nprefix = "docker.io"\nlocation = "mirror.example.com"\n`;

  it('reads a registries.conf from file://', async () => {
    const file = path.join(tmp, 'registries.conf');
    await writeFile(file, CONF);
    const conf = loadRegistryConfiguration(image(`[image]\nregistry_configuration_uri = "file://${file}"\n`), silentLogger());
    expect(conf.unqualifiedSearchRegistries).toEqual(['registry.example.com']);
    expect(conf.registries.map((r) => `${r.prefix} → ${r.location}`)).toEqual(['docker.io → mirror.example.com']);
  });

  it('the inline table wins; the URI is logged as ignored and not read', () => {
    const { logger, lines } = memoryLogger();
    const conf = loadRegistryConfiguration(
      image(`[image]\nregistry_configuration_uri = "file:///nonexistent/registries.conf"\n[[image.registry_config.registry]]\nprefix = "quay.io"\nlocation = "q.example.com"\n`),
      logger,
    );
    expect(conf.registries.map((r) => r.prefix)).toEqual(['quay.io']);
    expect(lines()).toContain('registry_configuration_uri is ignored');
  });

  it('kbs:// → CONFIG telling to put the configuration inline', () => {
    const e = caught(() => loadRegistryConfiguration(image('[image]\nregistry_configuration_uri = "kbs:///default/registry-configuration/test"\n'), silentLogger()));
    expect(e.code).toBe(ErrorCode.CONFIG);
    expect(e.message).toContain('key-broker (kbs://) resources are not supported yet; put the registry configuration inline in cdh.toml');
  });

  it('other schemes, bad TOML, bad content and oversized files → CONFIG naming the file', async () => {
    expect(caught(() => loadRegistryConfiguration(image('[image]\nregistry_configuration_uri = "http://x/registries.conf"\n'), silentLogger())).code).toBe(
      ErrorCode.CONFIG,
    );
    const badToml = path.join(tmp, 'bad.conf');
    await writeFile(badToml, '[[registry]\nprefix = 1\n');
    const e1 = caught(() => loadRegistryConfiguration(image(`[image]\nregistry_configuration_uri = "file://${badToml}"\n`), silentLogger()));
    expect(e1.message).toContain(badToml);
    expect(e1.message).toContain('line 1');
    const badKey = path.join(tmp, 'badkey.conf');
    await writeFile(badKey, '[[registry]]\nprefix = "docker.io"\nblockd = true\n');
    const e2 = caught(() => loadRegistryConfiguration(image(`[image]\nregistry_configuration_uri = "file://${badKey}"\n`), silentLogger()));
    expect(e2.code).toBe(ErrorCode.CONFIG);
    expect(e2.message).toContain('blockd');
    expect(e2.message).toContain(badKey);
    const big = path.join(tmp, 'big.conf');
    await writeFile(big, '#'.repeat(MAX_REGISTRIES_CONF_BYTES + 1));
    expect(caught(() => loadRegistryConfiguration(image(`[image]\nregistry_configuration_uri = "file://${big}"\n`), silentLogger())).message).toContain('more than');
  });

  it('nothing configured → no rules', () => {
    expect(loadRegistryConfiguration(image('[image]\n'), silentLogger())).toEqual({ unqualifiedSearchRegistries: [], registries: [] });
  });
});

describe('explainAuthFailure', () => {
  const s = store({ '127.0.0.1:5000/private': { auth: b64('u:p') } });
  const where = { registry: '127.0.0.1:5000', repository: 'private/app', origin: 'http://127.0.0.1:5000' };

  it('names the auth.json key that was used', () => {
    const m = s.lookup('127.0.0.1:5000', 'private/app');
    const e = explainAuthFailure(new GuestpullError(ErrorCode.UNAUTHENTICATED, 'HTTP 401 after authenticating'), m, where, s);
    expect(e.code).toBe(ErrorCode.UNAUTHENTICATED);
    expect(e.message).toContain('credentials from auth.json key "127.0.0.1:5000/private" (test) were rejected by http://127.0.0.1:5000');
    expect(e.message).toContain('HTTP 401 after authenticating');
    const d = explainAuthFailure(new GuestpullError(ErrorCode.PERMISSION_DENIED, 'denied'), m, where, s);
    expect(d.code).toBe(ErrorCode.PERMISSION_DENIED);
    expect(d.message).toContain('"127.0.0.1:5000/private"');
  });

  it('says no key matched when an auth.json is configured; leaves other errors alone', () => {
    const e = explainAuthFailure(new GuestpullError(ErrorCode.UNAUTHENTICATED, 'anonymous refused'), undefined, { ...where, repository: 'public/app' }, s);
    expect(e.message).toContain('no key of the test matches 127.0.0.1:5000/public/app');
    const nf = new GuestpullError(ErrorCode.NOT_FOUND, 'nope');
    expect(explainAuthFailure(nf, s.lookup('127.0.0.1:5000', 'private/app'), where, s)).toBe(nf);
    const anon = new GuestpullError(ErrorCode.UNAUTHENTICATED, 'anonymous refused');
    expect(explainAuthFailure(anon, undefined, where, CredentialStore.empty())).toBe(anon);
  });
});

describe('Puller construction', () => {
  const base = (extra: string) => parseConfig(`[image]\nwork_dir = "${path.join(tmp, 'work')}"\n${extra}`, 'test').config;

  it('loads the URIs once, at construction: a kbs:// URI fails there, not at the first pull', () => {
    const e = caught(() => new Puller({ config: base('registry_configuration_uri = "kbs:///x/y/z"\n'), logger: silentLogger(), version: 't' }));
    expect(e.code).toBe(ErrorCode.CONFIG);
    const e2 = caught(() => new Puller({ config: base('authenticated_registry_credentials_uri = "kbs:///x/y/z"\n'), logger: silentLogger(), version: 't' }));
    expect(e2.message).toContain('key-broker');
  });

  it('accepts file:// URIs for both; still refuses the policy keys it does not enforce', async () => {
    const conf = path.join(tmp, 'p-registries.conf');
    const auth = path.join(tmp, 'p-auth.json');
    await writeFile(conf, '[[registry]]\nprefix = "docker.io"\nblocked = true\n');
    await writeFile(auth, JSON.stringify({ auths: { 'docker.io': { auth: b64('u:p') } } }));
    const p = new Puller({
      config: base(`registry_configuration_uri = "file://${conf}"\nauthenticated_registry_credentials_uri = "file://${auth}"\n`),
      logger: silentLogger(),
      version: 't',
    });
    try {
      // the file's rule is in force: docker.io is blocked
      await expect(p.pull('docker.io/library/busybox:1', path.join(tmp, 'bundle-blocked'))).rejects.toMatchObject({
        code: ErrorCode.PERMISSION_DENIED,
        message: expect.stringContaining('"docker.io"'),
      });
    } finally {
      await p.close();
    }
    const e = caught(() => new Puller({ config: base('image_security_policy_uri = "file:///policy.json"\n'), logger: silentLogger(), version: 't' }));
    expect(e.message).toContain('image_security_policy_uri');
  });
});
