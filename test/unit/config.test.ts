/**
 * cdh.toml loading: the CoCo seed documents and the reference example parse; defaults; unknown keys
 * become warnings; wrong types and bad values fail with the key path; TOML syntax errors name the line.
 */
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DEFAULT_WORK_DIR, defaultConfig, loadConfigFile, normaliseLogLevel, parseConfig } from '../../src/config/index.js';
import { ErrorCode, GuestpullError } from '../../src/errors.js';

const PEM = `-----BEGIN CERTIFICATE-----
MIIBszCCAVmgAwIBAgIUeXamplEnotArealCertificateAtAll0wCgYIKoZIzj0E
...
-----END CERTIFICATE-----
`;

/** The cdh.toml of the CoCo "Image Pull Proxy" document (seed coco-image-pull-proxy.md). */
const SEED_PROXY = `
[kbc]
name = "cc_kbc"
url = "http://1.2.3.4:8080"

[image.image_pull_proxy]

# HTTPS proxy that will be used to pull image
https_proxy = "http://127.0.0.1:5432"

# HTTP proxy that will be used to pull image
http_proxy = "http://127.0.0.1:5432"

# No proxy env that will be used to pull image.
no_proxy = "192.168.0.1,localhost"
`;

/** The cdh.toml of the CoCo "Local Registries" document (seed coco-local-registries.md). */
const SEED_LOCAL_REGISTRIES = `
[kbc]
name = "cc_kbc"
url = "http://1.2.3.4:8080"

[image]
# To support registries with self signed certs.
extra_root_certificates = ["""
${PEM}"""]
`;

/** Every key of guest-components' confidential-data-hub/example.config.toml, with its value shapes. */
const REFERENCE = `
socket = "unix:///run/confidential-containers/cdh.sock"
services_dir = "/run/guest-services"

[aa]
aa_socket = "unix:///run/confidential-containers/attestation-agent/attestation-agent.sock"

[kbc]
name = "cc_kbc"
url = "http://example.io:8080"
kbs_cert = """
${PEM}"""

[[credentials]]
path = "/run/confidential-containers/cdh/kbs/kms-credential/aliyun/ecsRamRole.json"
resource_uri = "kbs:///default/aliyun/ecs_ram_role"

[[credentials]]
path = "/run/confidential-containers/cdh/kbs/test/file"
resource_uri = "kbs:///default/test/file"

[image]
max_concurrent_layer_downloads_per_image = 3
extra_root_certificates = ["""
${PEM}"""]
work_dir = "/run/image-rs"
sigstore_config_uri = "kbs:///default/sigstore-config/test"
image_security_policy_uri = "kbs:///default/security-policy/test"
authenticated_registry_credentials_uri = "kbs:///default/credential/test"
anonymous_fallback_on_unauthorized = false
registry_configuration_uri = "kbs:///default/registry-configuration/test"

[image.registry_config]
unqualified-search-registries = ["docker.io", "example1.com"]

[[image.registry_config.registry]]
prefix = "example.com/banned"
blocked = true

[[image.registry_config.registry]]
prefix = "example.com/foo"
insecure = false
blocked = false
location = "internal-registry-for-example.com/bar"

[[image.registry_config.registry.mirror]]
location = "example-mirror-0.local/mirror-for-foo"

[[image.registry_config.registry.mirror]]
location = "example-mirror-1.local/mirrors/foo"
insecure = true

[[image.registry_config.registry]]
location = "docker.io"

[[image.registry_config.registry.mirror]]
location = "123456.mirror.aliyuncs.com"

[image.image_pull_proxy]
https_proxy = "http://127.0.0.1:5432"
http_proxy = "http://127.0.0.1:5432"
no_proxy = "192.168.0.1,localhost"

[log]
level = "info"
`;

function configError(text: string): GuestpullError {
  try {
    parseConfig(text, 'test.toml');
  } catch (e) {
    expect(e).toBeInstanceOf(GuestpullError);
    const err = e as GuestpullError;
    expect(err.code).toBe(ErrorCode.CONFIG);
    return err;
  }
  throw new Error(`expected a CONFIG error for:\n${text}`);
}

describe('parseConfig: real documents', () => {
  it('parses the image pull proxy seed', () => {
    const { config, warnings, ignored } = parseConfig(SEED_PROXY, 'seed');
    expect(config.image.imagePullProxy).toEqual({
      httpsProxy: 'http://127.0.0.1:5432',
      httpProxy: 'http://127.0.0.1:5432',
      noProxy: '192.168.0.1,localhost',
    });
    expect(config.image.workDir).toBe(DEFAULT_WORK_DIR);
    expect(warnings).toEqual([]);
    expect(ignored).toEqual(['kbc']);
  });

  it('parses the local registries seed (extra root certificates)', () => {
    const { config, warnings } = parseConfig(SEED_LOCAL_REGISTRIES, 'seed');
    expect(config.image.extraRootCertificates).toHaveLength(1);
    expect(config.image.extraRootCertificates[0]).toContain('-----BEGIN CERTIFICATE-----');
    expect(config.image.extraRootCertificates[0]).toContain('-----END CERTIFICATE-----');
    expect(config.image.imagePullProxy).toBeUndefined();
    expect(warnings).toEqual([]);
  });

  it('parses every key of the reference example.config.toml', () => {
    const { config, warnings, ignored } = parseConfig(REFERENCE, 'example.config.toml');
    expect(warnings).toEqual([]);
    expect(config.socket).toBe('unix:///run/confidential-containers/cdh.sock');
    expect(config.log.level).toBe('info');
    expect(config.image.workDir).toBe('/run/image-rs');
    expect(config.image.maxConcurrentLayerDownloadsPerImage).toBe(3);
    expect(config.image.extraRootCertificates).toHaveLength(1);
    expect(config.image.sigstoreConfigUri).toBe('kbs:///default/sigstore-config/test');
    expect(config.image.imageSecurityPolicyUri).toBe('kbs:///default/security-policy/test');
    expect(config.image.authenticatedRegistryCredentialsUri).toBe('kbs:///default/credential/test');
    expect(config.image.registryConfigurationUri).toBe('kbs:///default/registry-configuration/test');
    expect(config.image.imagePullProxy?.noProxy).toBe('192.168.0.1,localhost');
    const reg = config.image.registryConfig;
    expect(reg?.unqualifiedSearchRegistries).toEqual(['docker.io', 'example1.com']);
    expect(reg?.registries.map((r) => r.prefix)).toEqual(['example.com/banned', 'example.com/foo', 'docker.io']);
    expect(reg?.registries[0]?.blocked).toBe(true);
    expect(reg?.registries[1]?.mirrors.map((m) => [m.location, m.insecure])).toEqual([
      ['example-mirror-0.local/mirror-for-foo', false],
      ['example-mirror-1.local/mirrors/foo', true],
    ]);
    expect(ignored).toEqual(['services_dir', 'aa', 'kbc', 'credentials', 'image.anonymous_fallback_on_unauthorized']);
  });

  it('keeps an inline image_security_policy string', () => {
    const { config } = parseConfig('[image]\nimage_security_policy = """\n{"default": [{"type": "reject"}]}\n"""\n', 't');
    expect(JSON.parse(config.image.imageSecurityPolicy ?? 'null')).toEqual({ default: [{ type: 'reject' }] });
  });
});

describe('parseConfig: defaults', () => {
  it('an empty document gives the defaults', () => {
    const { config, warnings, ignored } = parseConfig('', 'empty');
    expect(config).toEqual(defaultConfig());
    expect(config.image.workDir).toBe('/run/kata-containers/image/');
    expect(config.image.maxConcurrentLayerDownloadsPerImage).toBe(3);
    expect(config.image.extraRootCertificates).toEqual([]);
    expect(config.socket).toBeUndefined();
    expect(warnings).toEqual([]);
    expect(ignored).toEqual([]);
  });

  it('unpack_threads: unset by default (the daemon picks cores - 2), 0 and numbers kept', () => {
    expect(parseConfig('', 't').config.image.unpackThreads).toBeUndefined();
    expect(parseConfig('[image]\nunpack_threads = 0\n', 't').config.image.unpackThreads).toBe(0);
    expect(parseConfig('[image]\nunpack_threads = 3\n', 't').config.image.unpackThreads).toBe(3);
  });

  it('an empty [image.image_pull_proxy] table means no proxy', () => {
    expect(parseConfig('[image.image_pull_proxy]\n', 't').config.image.imagePullProxy).toBeUndefined();
  });

  it('normalises log levels spelled the reference way', () => {
    expect(parseConfig('[log]\nlevel = "DEBUG"\n', 't').config.log.level).toBe('debug');
    expect(parseConfig('[log]\nlevel = "off"\n', 't').config.log.level).toBe('silent');
    expect(normaliseLogLevel('Warn')).toBe('warn');
    expect(normaliseLogLevel('loud')).toBeUndefined();
  });
});

describe('parseConfig: unknown keys are warnings with their path', () => {
  it('reports top-level, nested and array-of-table keys', () => {
    const { warnings, config } = parseConfig(
      [
        'sockett = "x"',
        '[image]',
        'work_dir = "/w"',
        'some_undefined_field = "unknown value"',
        '[image.image_pull_proxy]',
        'ftp_proxy = "x"',
        '[[credentials]]',
        'resource_uri = "kbs:///a/b/c"',
        'path = "/p"',
        'mode = 1',
      ].join('\n'),
      'w.toml',
    );
    expect(config.image.workDir).toBe('/w');
    expect(warnings).toHaveLength(4);
    expect(warnings.join('\n')).toMatch(/\bsockett\b/);
    expect(warnings.join('\n')).toMatch(/image\.some_undefined_field/);
    expect(warnings.join('\n')).toMatch(/image\.image_pull_proxy\.ftp_proxy/);
    expect(warnings.join('\n')).toMatch(/credentials\[0\]\.mode/);
    for (const w of warnings) expect(w).toContain('w.toml');
  });
});

describe('parseConfig: wrong types and values fail with the key path', () => {
  const cases: [string, string, RegExp][] = [
    ['string for an integer', '[image]\nmax_concurrent_layer_downloads_per_image = "3"', /image\.max_concurrent_layer_downloads_per_image: expected a number, got a string \("3"\)/],
    ['zero downloads', '[image]\nmax_concurrent_layer_downloads_per_image = 0', /image\.max_concurrent_layer_downloads_per_image: .*>=1/],
    ['fractional downloads', '[image]\nmax_concurrent_layer_downloads_per_image = 2.5', /image\.max_concurrent_layer_downloads_per_image: expected an integer, got a float/],
    ['negative unpack_threads', '[image]\nunpack_threads = -1', /image\.unpack_threads: .*>=0/],
    ['relative work_dir', '[image]\nwork_dir = "run/x"', /image\.work_dir: expected an absolute path/],
    ['integer work_dir', '[image]\nwork_dir = 5', /image\.work_dir: expected a string, got an integer/],
    ['certificates as a string', `[image]\nextra_root_certificates = "x"`, /image\.extra_root_certificates: expected an array, got a string/],
    ['certificate that is not PEM', `[image]\nextra_root_certificates = ["not a cert"]`, /image\.extra_root_certificates\[0\]: expected a PEM certificate/],
    ['proxy without scheme', '[image.image_pull_proxy]\nhttps_proxy = "127.0.0.1:3128"', /image\.image_pull_proxy\.https_proxy: expected an http/],
    ['socks proxy', '[image.image_pull_proxy]\nhttp_proxy = "socks5://127.0.0.1:1080"', /image\.image_pull_proxy\.http_proxy/],
    ['no_proxy as array', '[image.image_pull_proxy]\nno_proxy = ["a"]', /image\.image_pull_proxy\.no_proxy: expected a string, got an array/],
    ['image as a string', 'image = "x"', /\bimage: expected a table, got a string/],
    ['bad log level', '[log]\nlevel = "loud"', /log\.level: expected one of trace/],
    ['socket as a date', 'socket = 1979-05-27', /\bsocket: expected a string, got a date/],
    ['socket as an integer', 'socket = 1', /\bsocket: expected a string, got an integer/],
    ['credentials without resource_uri', '[[credentials]]\npath = "/p"', /credentials\[0\]\.resource_uri: missing; expected a string/],
    ['kbc.url as a boolean', '[kbc]\nname = "cc_kbc"\nurl = true', /kbc\.url: expected a string, got a boolean/],
    ['registry_config as a string', '[image]\nregistry_config = "x"', /image\.registry_config: expected a table, got a string/],
    ['registry_config contents', '[[image.registry_config.registry]]\nprefix = "example.com"\nblocked = "yes"', /image\.registry_config\.registry\[0\]\.blocked: expected a boolean/],
  ];
  it.each(cases)('%s', (_name, text, message) => {
    const err = configError(text);
    expect(err.message).toMatch(message);
    expect(err.message).toContain('test.toml');
  });

  it('names the TOML line and column for syntax errors', () => {
    const err = configError('[image]\nwork_dir = "/a"\nmax_concurrent_layer_downloads_per_image = = 3\n');
    expect(err.message).toMatch(/line 3, column \d+/);
    expect(err.message).toContain('max_concurrent_layer_downloads_per_image = = 3');
    expect(err.context).toMatchObject({ line: 3 });
  });

  it('rejects a table defined twice', () => {
    expect(configError('[image]\nwork_dir = "/a"\n[image]\nwork_dir = "/b"\n').message).toMatch(/line 3/);
  });
});

describe('loadConfigFile', () => {
  let dir: string;
  beforeAll(async () => {
    dir = await mkdtemp(path.join(os.tmpdir(), 'guestpull-config-'));
  });
  afterAll(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it('reads a file and names it in warnings', async () => {
    const file = path.join(dir, 'cdh.toml');
    await writeFile(file, '[image]\nwork_dir = "/tmp/w"\ncolour = "blue"\n');
    const { config, warnings } = await loadConfigFile(file);
    expect(config.image.workDir).toBe('/tmp/w');
    expect(warnings).toEqual([`unknown key image.colour in ${file} (ignored)`]);
  });

  it('a missing file is a CONFIG error naming the path', async () => {
    const missing = path.join(dir, 'nope.toml');
    await expect(loadConfigFile(missing)).rejects.toMatchObject({ code: ErrorCode.CONFIG, message: expect.stringContaining(missing) });
  });

  it('invalid UTF-8 is a CONFIG error', async () => {
    const file = path.join(dir, 'latin1.toml');
    await writeFile(file, Buffer.from([0x61, 0x20, 0x3d, 0x20, 0x22, 0xe9, 0x22, 0x0a]));
    await expect(loadConfigFile(file)).rejects.toMatchObject({ code: ErrorCode.CONFIG, message: expect.stringMatching(/UTF-8/) });
  });
});
