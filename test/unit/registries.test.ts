import { parse as parseToml } from 'smol-toml';
import { describe, expect, it } from 'vitest';
import { parseRegistriesConf, RegistriesConfSchema, type RegistriesConf } from '../../src/config/registries.js';
import { ErrorCode, GuestpullError } from '../../src/errors.js';
import { candidatesFor, type Candidate } from '../../src/pull/registries/index.js';
import { parseReference } from '../../src/reference.js';

const D = `sha256:${'c'.repeat(64)}`;

function toml(text: string): RegistriesConf {
  return parseRegistriesConf(parseToml(text), 'registry_config');
}

function configError(raw: unknown): GuestpullError {
  try {
    parseRegistriesConf(raw, 'registry_config');
  } catch (e) {
    expect(e).toBeInstanceOf(GuestpullError);
    expect((e as GuestpullError).code).toBe(ErrorCode.CONFIG);
    return e as GuestpullError;
  }
  throw new Error('expected a CONFIG error');
}

/** Compact view of candidates: "<baseUrl> <repository> <reference>[ mirror]". */
function urls(image: string, conf: RegistriesConf): string[] {
  return candidatesFor(parseReference(image), conf).map(
    (c: Candidate) => `${c.baseUrl} ${c.repository} ${c.reference}${c.mirror ? ' mirror' : ''}`,
  );
}

function thrown(f: () => unknown): GuestpullError {
  try {
    f();
  } catch (e) {
    expect(e).toBeInstanceOf(GuestpullError);
    return e as GuestpullError;
  }
  throw new Error('expected an error');
}

const EMPTY: RegistriesConf = { unqualifiedSearchRegistries: [], registries: [] };

// The example of image-rs/docs/registry_configuration.md, as CoCo documents it.
const COCO_DOC = `
unqualified-search-registries = ["docker.io", "example1.com"]

[[registry]]
prefix = "example.com/banned"
blocked = true

[[registry]]
prefix = "example.com/foo"
insecure = false
blocked = false

[[registry.mirror]]
location = "example-mirror-0.local/mirror-for-foo"

[[registry.mirror]]
location = "example-mirror-1.local/mirrors/foo"
insecure = true

[[registry]]
prefix = "registry.com"
location = "remapping.registry.com"

[[registry]]
location = "localhost:5000"
insecure = true
`;

describe('parseRegistriesConf', () => {
  it('parses the CoCo documentation example with defaults filled', () => {
    const c = toml(COCO_DOC);
    expect(c.unqualifiedSearchRegistries).toEqual(['docker.io', 'example1.com']);
    expect(c.registries).toEqual([
      { prefix: 'example.com/banned', location: 'example.com/banned', insecure: false, blocked: true, mirrors: [], skipFallback: false },
      {
        prefix: 'example.com/foo',
        location: 'example.com/foo',
        insecure: false,
        blocked: false,
        skipFallback: false,
        mirrors: [
          { location: 'example-mirror-0.local/mirror-for-foo', insecure: false, overridePath: false, pullFromMirror: 'all' },
          { location: 'example-mirror-1.local/mirrors/foo', insecure: true, overridePath: false, pullFromMirror: 'all' },
        ],
      },
      { prefix: 'registry.com', location: 'remapping.registry.com', insecure: false, blocked: false, mirrors: [], skipFallback: false },
      { prefix: 'localhost:5000', location: 'localhost:5000', insecure: true, blocked: false, mirrors: [], skipFallback: false },
    ]);
  });

  it('is usable as a zod schema (config/index.ts calls safeParse)', () => {
    const ok = RegistriesConfSchema.safeParse({ registry: [{ location: 'r.io' }] });
    expect(ok.success && ok.data.registries[0]!.prefix).toBe('r.io');
    const bad = RegistriesConfSchema.safeParse({ registry: [{ location: 1 }] });
    expect(bad.success).toBe(false);
    expect(bad.error?.issues[0]?.path).toEqual(['registry', 0, 'location']);
  });

  it('accepts an empty table', () => {
    expect(parseRegistriesConf({}, 'x')).toEqual(EMPTY);
  });

  it('normalises: trailing slashes, domain case, Docker Hub aliases', () => {
    const c = parseRegistriesConf(
      {
        'unqualified-search-registries': ['Index.Docker.IO/', 'Quay.io'],
        registry: [
          { prefix: 'Example.COM/foo/', location: 'Mirror.Local/ns/' },
          { prefix: 'index.docker.io/library', location: 'registry-1.docker.io/library' },
          { prefix: '*.Example.ORG' },
        ],
      },
      'x',
    );
    expect(c.unqualifiedSearchRegistries).toEqual(['docker.io', 'quay.io']);
    expect(c.registries.map((r) => [r.prefix, r.location])).toEqual([
      ['example.com/foo', 'mirror.local/ns'],
      ['docker.io/library', 'docker.io/library'],
      ['*.example.org', ''],
    ]);
  });

  it('keeps our extensions and maps mirror-by-digest-only onto every mirror', () => {
    const c = toml(`
[[registry]]
prefix = "docker.io"
skip-fallback = true
[[registry.mirror]]
location = "http://harbor/v2/proxy-docker.io/"
insecure = true
override-path = true
pull-from-mirror = "tag-only"

[[registry]]
prefix = "quay.io"
mirror-by-digest-only = true
[[registry.mirror]]
location = "m1.local"
[[registry.mirror]]
location = "m2.local"
`);
    expect(c.registries[0]).toMatchObject({
      skipFallback: true,
      mirrors: [{ location: 'http://harbor/v2/proxy-docker.io', overridePath: true, pullFromMirror: 'tag-only', insecure: true }],
    });
    expect(c.registries[1]!.mirrors.map((m) => m.pullFromMirror)).toEqual(['digest-only', 'digest-only']);
  });

  it('accepts upstream keys that do not change where images come from', () => {
    const c = toml(`
unqualified-search-registries = ["quay.io"]
short-name-mode = "enforcing"
credential-helpers = ["containers-auth.json"]
[aliases]
`);
    expect(c.unqualifiedSearchRegistries).toEqual(['quay.io']);
  });

  it.each<[string, unknown, string]>([
    ['a wrong type, with the key path', { registry: [{ location: 'a.io' }, { location: 'b.io', mirror: [{ location: 5 }] }] },
      'registry_config.registry[1].mirror[0].location: expected string, got number'],
    ['a missing mirror location', { registry: [{ location: 'a.io', mirror: [{}] }] }, 'registry_config.registry[0].mirror[0].location: required'],
    ['a non-boolean flag', { registry: [{ location: 'a.io', blocked: 'yes' }] }, 'registry[0].blocked: expected boolean'],
    ['registry not an array', { registry: { location: 'a.io' } }, 'registry_config.registry: expected an array'],
    ['a misspelt key in a registry', { registry: [{ location: 'a.io', blockd: true }] }, 'registry[0]: unknown key "blockd" in [[registry]]'],
    ['a misspelt key in a mirror', { registry: [{ location: 'a.io', mirror: [{ location: 'm.io', insecur: true }] }] }, 'unknown key "insecur" in [[registry.mirror]]'],
    ['an unknown top-level key', { registrys: [] }, 'unknown key "registrys"'],
    ['neither prefix nor location', { registry: [{ insecure: true }] }, 'registry[0]: a [[registry]] needs a prefix or a location'],
    ['a wildcard with a port', { registry: [{ prefix: '*.example.com:5000' }] }, 'registry[0].prefix: wildcard prefix'],
    ['a wildcard with a path', { registry: [{ prefix: '*.example.com/foo', location: 'x.io' }] }, 'wildcard prefix'],
    ['a wildcard in the middle', { registry: [{ prefix: 'a.*.example.com', location: 'x.io' }] }, 'registry[0].prefix: prefix "a.*.example.com"'],
    ['a URL prefix', { registry: [{ prefix: 'https://a.io', location: 'b.io' }] }, 'registry[0].prefix: prefix "https://a.io" must not be a URL'],
    ['a URL location without prefix', { registry: [{ location: 'http://a.io:5000' }] }, 'registry[0].prefix: a prefix is required when the location is a URL'],
    ['an uppercase repository in a prefix', { registry: [{ prefix: 'a.io/Foo', location: 'b.io' }] }, 'repository path "Foo"'],
    ['a bad host', { registry: [{ location: 'a b.io' }] }, 'whitespace'],
    ['credentials in a URL', { registry: [{ prefix: 'a.io', mirror: [{ location: 'https://u:p@m.io' }] }] }, 'must not carry credentials'],
    ['a query in a URL', { registry: [{ prefix: 'a.io', mirror: [{ location: 'https://m.io/x?y=1' }] }] }, 'query'],
    ['an unsupported scheme', { registry: [{ prefix: 'a.io', mirror: [{ location: 'ftp://m.io' }] }] }, 'not a valid host'],
    ['an empty mirror location', { registry: [{ prefix: 'a.io', mirror: [{ location: '' }] }] }, 'mirror[0].location: a mirror location must not be empty'],
    ['a mirror with a tag', { registry: [{ prefix: 'a.io', mirror: [{ location: 'm.io/x:1' }] }] }, 'must not carry a tag or digest'],
    ['override-path without a URL', { registry: [{ prefix: 'a.io', mirror: [{ location: 'harbor.io/v2/p', 'override-path': true }] }] },
      'mirror[0].override-path: override-path needs the mirror location to be a URL with a path'],
    ['an http:// mirror without insecure', { registry: [{ prefix: 'a.io', mirror: [{ location: 'http://m.io:5000' }] }] }, 'registry[0].mirror[0].location: an http:// location is plain HTTP: set insecure = true'],
    ['an http:// location without insecure', { registry: [{ prefix: 'a.io', location: 'http://b.io:5000' }] }, 'registry[0].location: an http:// location is plain HTTP: set insecure = true'],
    ['override-path without a path', { registry: [{ prefix: 'a.io', mirror: [{ location: 'http://harbor', 'override-path': true }] }] }, 'URL with a path'],
    ['a bad pull-from-mirror', { registry: [{ prefix: 'a.io', mirror: [{ location: 'm.io', 'pull-from-mirror': 'digest' }] }] },
      'pull-from-mirror: expected one of "all", "digest-only", "tag-only", got "digest"'],
    ['pull-from-mirror on a registry', { registry: [{ prefix: 'a.io', 'pull-from-mirror': 'all' }] }, 'registry[0].pull-from-mirror: pull-from-mirror is only valid inside'],
    ['mirror-by-digest-only with pull-from-mirror', { registry: [{ prefix: 'a.io', 'mirror-by-digest-only': true, mirror: [{ location: 'm.io', 'pull-from-mirror': 'all' }] }] },
      'cannot be set when the registry sets mirror-by-digest-only'],
    ['skip-fallback without mirrors', { registry: [{ prefix: 'a.io', 'skip-fallback': true }] }, 'registry[0].skip-fallback: skip-fallback = true needs at least one'],
    ['a duplicate prefix', { registry: [{ prefix: 'a.io' }, { prefix: 'a.io/', location: 'b.io' }] }, 'registry[1].prefix: prefix "a.io" is already used by registry[0]'],
    ['a bad search registry', { 'unqualified-search-registries': ['quay.io', 'not a host'] }, 'unqualified-search-registries[1]: "not a host" is not a host[:port]'],
    ['a URL search registry', { 'unqualified-search-registries': ['https://quay.io'] }, 'unqualified-search-registries[0]'],
    ['the v1 format', { registries: { search: { registries: ['a.io'] } } }, 'registry_config.registries: the version 1 format'],
    ['aliases', { aliases: { busybox: 'quay.io/busybox' } }, 'registry_config.aliases: short-name aliases are not supported'],
    ['a bad short-name-mode', { 'short-name-mode': 'prompt' }, 'short-name-mode: expected "enforcing", "permissive" or "disabled"'],
    ['not a table', ['a'], 'registry_config: expected a table'],
  ])('rejects %s', (_what, raw, message) => {
    expect(configError(raw).message).toContain(message);
  });

  it('reports several problems at once', () => {
    const e = configError({ registry: [{ blocked: 1 }, { location: 'ok.io', mirror: [{ location: 2 }] }] });
    expect(e.message).toContain('registry[0].blocked');
    expect(e.message).toContain('registry[1].mirror[0].location');
  });
});

describe('candidatesFor: basics', () => {
  it('no rule: the original location over HTTPS, Docker Hub via registry-1.docker.io', () => {
    expect(urls('busybox', EMPTY)).toEqual(['https://registry-1.docker.io/v2/ library/busybox latest']);
    expect(urls('127.0.0.1:5000/app:tag', EMPTY)).toEqual(['https://127.0.0.1:5000/v2/ app tag']);
    const [c] = candidatesFor(parseReference('quay.io/a/b:1'), EMPTY);
    expect(c).toEqual({
      baseUrl: 'https://quay.io/v2/',
      registry: 'quay.io',
      repository: 'a/b',
      reference: '1',
      mirror: false,
      description: 'quay.io (original location)',
    });
  });

  it('asks for the digest when the reference has one, even with a tag', () => {
    expect(urls(`r.io/a:t@${D}`, EMPTY)).toEqual([`https://r.io/v2/ a ${D}`]);
  });

  it('insecure = true means plain HTTP', () => {
    const c = toml('[[registry]]\nlocation = "localhost:5000"\ninsecure = true\n');
    expect(urls('localhost:5000/app', c)).toEqual(['http://localhost:5000/v2/ app latest']);
    expect(candidatesFor(parseReference('localhost:5000/app'), c)[0]!.description).toBe('localhost:5000 (original location, rule localhost:5000)');
    // the rule does not reach another port
    expect(urls('localhost:5001/app', c)).toEqual(['https://localhost:5001/v2/ app latest']);
  });

  it('matches domains case-insensitively', () => {
    const c = toml('[[registry]]\nprefix = "localdomain"\nlocation = "m.local"\n');
    expect(urls('LOCALDOMAIN/app', c)).toEqual(['https://m.local/v2/ app latest']);
  });
});

describe('candidatesFor: prefix matching', () => {
  const c = toml(`
[[registry]]
prefix = "example.com"
location = "all.local"
[[registry]]
prefix = "example.com/foo"
location = "foo.local/x"
[[registry]]
prefix = "example.com/foo/special:v1"
location = "special.local/s:v9"
[[registry]]
prefix = "example.com/bar@${D}"
location = "pinned.local/bar"
`);
  it.each<[string, string]>([
    ['example.com/app', 'https://all.local/v2/ app latest'],
    ['example.com/foo', 'https://foo.local/v2/ x latest'],
    ['example.com/foo:1', 'https://foo.local/v2/ x 1'],
    [`example.com/foo@${D}`, `https://foo.local/v2/ x ${D}`],
    ['example.com/foo/bar:2', 'https://foo.local/v2/ x/bar 2'],
    ['example.com/foobar', 'https://all.local/v2/ foobar latest'],
    ['example.com/foo/special:v1', 'https://special.local/v2/ s v9'],
    ['example.com/foo/special:v2', 'https://foo.local/v2/ x/special v2'],
    [`example.com/bar@${D}`, `https://pinned.local/v2/ bar ${D}`],
    ['example.com/bar:1', 'https://all.local/v2/ bar 1'],
    ['example.com:5000/app', 'https://example.com:5000/v2/ app latest'],
    ['example.community/app', 'https://example.community/v2/ app latest'],
    ['sub.example.com/app', 'https://sub.example.com/v2/ app latest'],
  ])('%s → %s', (image, want) => {
    expect(urls(image, c)).toEqual([want]);
  });

  it('describes a remapped location', () => {
    expect(candidatesFor(parseReference('example.com/foo/a'), c)[0]!.description).toBe('https://foo.local/x (location remapped by rule example.com/foo)');
  });

  it('needs the explicit library/ namespace for Docker Hub official images (upstream note)', () => {
    const hub = toml('[[registry]]\nprefix = "docker.io/alpine"\nlocation = "m.local/alpine"\n');
    expect(urls('alpine', hub)).toEqual(['https://registry-1.docker.io/v2/ library/alpine latest']);
    expect(urls('docker.io/alpine/git', hub)).toEqual(['https://m.local/v2/ alpine/git latest']);
    const lib = toml('[[registry]]\nprefix = "docker.io/library/alpine"\nlocation = "m.local/alpine"\n');
    expect(urls('alpine:3', lib)).toEqual(['https://m.local/v2/ alpine 3']);
  });
});

describe('candidatesFor: wildcard prefixes', () => {
  const c = toml(`
[[registry]]
prefix = "*.example.com"
insecure = true
[[registry.mirror]]
location = "wild-mirror.local/w"
[[registry]]
prefix = "*.b.example.com"
location = "deep.local"
[[registry]]
prefix = "a.example.com"
location = "exact.local"
`);
  it('matches subdomains, keeps the original location when it has none', () => {
    expect(urls('x.example.com/app:1', c)).toEqual(['https://wild-mirror.local/v2/ w/app 1 mirror', 'http://x.example.com/v2/ app 1']);
    expect(urls('y.x.example.com/n/app', c)).toEqual(['https://wild-mirror.local/v2/ w/n/app latest mirror', 'http://y.x.example.com/v2/ n/app latest']);
  });
  it('does not match the apex, another port or a look-alike', () => {
    expect(urls('example.com/app', c)).toEqual(['https://example.com/v2/ app latest']);
    expect(urls('x.example.com:5000/app', c)).toEqual(['https://x.example.com:5000/v2/ app latest']);
    expect(urls('x.example.com.evil.org/app', c)).toEqual(['https://x.example.com.evil.org/v2/ app latest']);
    expect(urls('xexample.com/app', c)).toEqual(['https://xexample.com/v2/ app latest']);
  });
  it('an exact prefix beats a wildcard of the same length; a longer wildcard wins', () => {
    expect(urls('a.example.com/app', c)).toEqual(['https://exact.local/v2/ app latest']);
    expect(urls('c.b.example.com/app', c)).toEqual(['https://deep.local/v2/ app latest']);
  });
});

describe('candidatesFor: mirrors and remapping (containers-registries.conf example)', () => {
  const c = toml(`
unqualified-search-registries = ["example.com"]
[[registry]]
prefix = "example.com/foo"
insecure = false
blocked = false
location = "internal-registry-for-example.com/bar"
[[registry.mirror]]
location = "example-mirror-0.local/mirror-for-foo"
[[registry.mirror]]
location = "example-mirror-1.local/mirrors/foo"
insecure = true
`);
  it('tries each mirror in order, then the remapped location', () => {
    const list = candidatesFor(parseReference('example.com/foo/image:latest'), c);
    expect(list.map((x) => `${x.baseUrl} ${x.repository} ${x.reference} ${x.mirror}`)).toEqual([
      'https://example-mirror-0.local/v2/ mirror-for-foo/image latest true',
      'http://example-mirror-1.local/v2/ mirrors/foo/image latest true',
      'https://internal-registry-for-example.com/v2/ bar/image latest false',
    ]);
    expect(list.map((x) => x.registry)).toEqual(['example-mirror-0.local', 'example-mirror-1.local', 'internal-registry-for-example.com']);
    expect(list[1]!.description).toBe('mirror http://example-mirror-1.local/mirrors/foo (rule example.com/foo)');
  });
  it('expands an unqualified name through the search registries first', () => {
    expect(urls('foo/image', c)).toEqual([
      'https://example-mirror-0.local/v2/ mirror-for-foo/image latest mirror',
      'http://example-mirror-1.local/v2/ mirrors/foo/image latest mirror',
      'https://internal-registry-for-example.com/v2/ bar/image latest',
    ]);
    expect(candidatesFor(parseReference('foo/image'), c)[0]!.description).toContain('unqualified-search');
  });
});

describe('candidatesFor: the CoCo documentation example', () => {
  const c = toml(COCO_DOC);
  it('blocks a namespace with PERMISSION_DENIED naming the image and the rule', () => {
    const e = thrown(() => candidatesFor(parseReference('example.com/banned/repo:tag'), c));
    expect(e.code).toBe(ErrorCode.PERMISSION_DENIED);
    expect(e.message).toContain('example.com/banned/repo:tag');
    expect(e.message).toContain('"example.com/banned"');
    expect(e.message).toContain('blocked by registry_config');
  });
  it('does not block a look-alike namespace', () => {
    expect(urls('example.com/banned-suffix/image:tag', c)).toEqual(['https://example.com/v2/ banned-suffix/image tag']);
    expect(urls('example.com/no-banned/image:tag', c)).toEqual(['https://example.com/v2/ no-banned/image tag']);
  });
  it('mirrors a prefix without location: mirrors, then the original', () => {
    expect(urls('example.com/foo/app:1', c)).toEqual([
      'https://example-mirror-0.local/v2/ mirror-for-foo/app 1 mirror',
      'http://example-mirror-1.local/v2/ mirrors/foo/app 1 mirror',
      'https://example.com/v2/ foo/app 1',
    ]);
  });
  it('remaps a registry', () => {
    expect(urls('registry.com/ns/app', c)).toEqual(['https://remapping.registry.com/v2/ ns/app latest']);
  });
  it('resolves short names on each search registry, library/ only on Docker Hub', () => {
    expect(urls('alpine', c)).toEqual(['https://registry-1.docker.io/v2/ library/alpine latest', 'https://example1.com/v2/ alpine latest']);
    expect(urls('repo/alpine:3', c)).toEqual(['https://registry-1.docker.io/v2/ repo/alpine 3', 'https://example1.com/v2/ repo/alpine 3']);
  });
  it('does not search for a qualified name', () => {
    expect(urls('docker.io/library/alpine', c)).toEqual(['https://registry-1.docker.io/v2/ library/alpine latest']);
  });
});

describe('candidatesFor: image-rs test configuration (Docker Hub mirror + search)', () => {
  const c = toml(`
unqualified-search-registries = ["docker.io", "example1.com"]
[[registry]]
location = "docker.io"
[[registry.mirror]]
location = "123456.mirror.aliyuncs.com"
`);
  it.each<[string, string[]]>([
    ['bar:tag', ['https://123456.mirror.aliyuncs.com/v2/ library/bar tag mirror', 'https://registry-1.docker.io/v2/ library/bar tag', 'https://example1.com/v2/ bar tag']],
    ['foo/bar:tag', ['https://123456.mirror.aliyuncs.com/v2/ foo/bar tag mirror', 'https://registry-1.docker.io/v2/ foo/bar tag', 'https://example1.com/v2/ foo/bar tag']],
  ])('%s', (image, want) => {
    expect(urls(image, c)).toEqual(want);
  });
});

describe('candidatesFor: remapping documentation example (one internal mirror for all)', () => {
  const c = toml(`
[[registry]]
prefix = "quay.io"
location = "internal.registry.mirror/quay"
[[registry]]
prefix = "docker.io"
location = "internal.registry.mirror/docker"
`);
  it('puts each upstream under its namespace', () => {
    expect(urls('busybox:1.36', c)).toEqual(['https://internal.registry.mirror/v2/ docker/library/busybox 1.36']);
    expect(urls('quay.io/coreos/etcd', c)).toEqual(['https://internal.registry.mirror/v2/ quay/coreos/etcd latest']);
  });
});

describe('candidatesFor: pull-from-mirror and skip-fallback', () => {
  const c = toml(`
[[registry]]
prefix = "r.io"
[[registry.mirror]]
location = "digest.local"
pull-from-mirror = "digest-only"
[[registry.mirror]]
location = "tag.local"
pull-from-mirror = "tag-only"
[[registry.mirror]]
location = "all.local"

[[registry]]
prefix = "only.io"
skip-fallback = true
[[registry.mirror]]
location = "http://10.0.0.1:5000"
insecure = true
pull-from-mirror = "digest-only"
`);
  it('uses digest-only mirrors for digests and tag-only mirrors for tags', () => {
    expect(urls('r.io/a:1', c)).toEqual(['https://tag.local/v2/ a 1 mirror', 'https://all.local/v2/ a 1 mirror', 'https://r.io/v2/ a 1']);
    expect(urls(`r.io/a@${D}`, c)).toEqual([`https://digest.local/v2/ a ${D} mirror`, `https://all.local/v2/ a ${D} mirror`, `https://r.io/v2/ a ${D}`]);
    expect(urls(`r.io/a:1@${D}`, c)[0]).toBe(`https://digest.local/v2/ a ${D} mirror`);
  });
  it('skip-fallback leaves only the mirrors', () => {
    expect(urls(`only.io/a@${D}`, c)).toEqual([`http://10.0.0.1:5000/v2/ a ${D} mirror`]);
  });
  it('skip-fallback with no usable mirror is a CONFIG error that explains', () => {
    const e = thrown(() => candidatesFor(parseReference('only.io/a:1'), c));
    expect(e.code).toBe(ErrorCode.CONFIG);
    expect(e.message).toContain('only.io/a:1');
    expect(e.message).toContain('skip-fallback');
    expect(e.message).toContain('pull by digest');
  });
});

describe('candidatesFor: schemes and paths', () => {
  const c = toml(`
[[registry]]
prefix = "a.io"
location = "https://real-a.io:8443"
insecure = true
[[registry.mirror]]
location = "https://secure-mirror.local"
insecure = true
[[registry.mirror]]
location = "http://plain-mirror.local/ns/sub"
insecure = true
[[registry.mirror]]
location = "mirror.example.com/ns"
[[registry.mirror]]
location = "registry-1.docker.io/mirrored"
`);
  it('a URL keeps its scheme; a mirror path is a namespace prefix; Docker Hub goes to its API host', () => {
    expect(urls('a.io/app:1', c)).toEqual([
      'https://secure-mirror.local/v2/ app 1 mirror',
      'http://plain-mirror.local/v2/ ns/sub/app 1 mirror',
      'https://mirror.example.com/v2/ ns/app 1 mirror',
      'https://registry-1.docker.io/v2/ mirrored/app 1 mirror',
      'https://real-a.io:8443/v2/ app 1',
    ]);
  });
});

describe('candidatesFor: Talos pull-through caches (seed)', () => {
  // One distribution registry in proxy mode per upstream, as in the Talos guide.
  const perUpstream = toml(`
[[registry]]
prefix = "docker.io"
[[registry.mirror]]
location = "http://10.5.0.1:5000"
insecure = true
[[registry]]
prefix = "registry.k8s.io"
[[registry.mirror]]
location = "http://10.5.0.1:5001"
insecure = true
[[registry]]
prefix = "gcr.io"
[[registry.mirror]]
location = "http://10.5.0.1:5003"
insecure = true
[[registry]]
prefix = "ghcr.io"
[[registry.mirror]]
location = "http://10.5.0.1:5004"
insecure = true
`);
  it.each<[string, string[]]>([
    ['busybox:1.36', ['http://10.5.0.1:5000/v2/ library/busybox 1.36 mirror', 'https://registry-1.docker.io/v2/ library/busybox 1.36']],
    ['registry.k8s.io/pause:3.9', ['http://10.5.0.1:5001/v2/ pause 3.9 mirror', 'https://registry.k8s.io/v2/ pause 3.9']],
    ['gcr.io/distroless/static', ['http://10.5.0.1:5003/v2/ distroless/static latest mirror', 'https://gcr.io/v2/ distroless/static latest']],
    ['ghcr.io/siderolabs/installer:v1.7', ['http://10.5.0.1:5004/v2/ siderolabs/installer v1.7 mirror', 'https://ghcr.io/v2/ siderolabs/installer v1.7']],
    ['quay.io/coreos/etcd', ['https://quay.io/v2/ coreos/etcd latest']],
  ])('%s', (image, want) => {
    expect(urls(image, perUpstream)).toEqual(want);
  });

  it('describes the mirror and the original', () => {
    const list = candidatesFor(parseReference('busybox'), perUpstream);
    expect(list.map((x) => x.description)).toEqual(['mirror http://10.5.0.1:5000 (rule docker.io)', 'docker.io (original location, rule docker.io)']);
    expect(list[0]!.registry).toBe('10.5.0.1:5000');
  });

  // Harbor proxy projects: one endpoint, the project in the path, overridePath so no /v2 is added.
  const harbor = toml(`
[[registry]]
prefix = "docker.io"
skip-fallback = true
[[registry.mirror]]
location = "http://harbor/v2/proxy-docker.io"
insecure = true
override-path = true
[[registry]]
prefix = "ghcr.io"
[[registry.mirror]]
location = "http://harbor/v2/proxy-ghcr.io"
insecure = true
override-path = true
[[registry]]
prefix = "docker.io/library/nginx"
[[registry.mirror]]
location = "http://harbor/v2/proxy-docker.io/library/nginx"
insecure = true
override-path = true
`);
  it('Harbor override-path: the URL is the base of the repositories', () => {
    expect(urls('busybox:1.36', harbor)).toEqual(['http://harbor/v2/proxy-docker.io/ library/busybox 1.36 mirror']);
    expect(urls('ghcr.io/a/b:1', harbor)).toEqual(['http://harbor/v2/proxy-ghcr.io/ a/b 1 mirror', 'https://ghcr.io/v2/ a/b 1']);
    const [h] = candidatesFor(parseReference('busybox'), harbor);
    expect(h!.registry).toBe('harbor');
    expect(h!.description).toBe('mirror http://harbor/v2/proxy-docker.io (rule docker.io)');
  });
  it('Harbor override-path when the prefix covers the whole repository', () => {
    expect(urls('nginx:1.27', harbor)).toEqual([
      'http://harbor/v2/proxy-docker.io/library/ nginx 1.27 mirror',
      'https://registry-1.docker.io/v2/ library/nginx 1.27',
    ]);
  });
});

describe('candidatesFor: unqualified search edge cases', () => {
  it('skips a blocked search registry, refuses when all are blocked', () => {
    const c = toml(`
unqualified-search-registries = ["bad.io", "good.io"]
[[registry]]
prefix = "bad.io"
blocked = true
`);
    expect(urls('app', c)).toEqual(['https://good.io/v2/ app latest']);
    const all = toml('unqualified-search-registries = ["bad.io"]\n[[registry]]\nprefix = "bad.io"\nblocked = true\n');
    expect(thrown(() => candidatesFor(parseReference('app'), all)).code).toBe(ErrorCode.PERMISSION_DENIED);
    const two = toml('unqualified-search-registries = ["bad.io", "worse.io"]\n[[registry]]\nprefix = "bad.io"\nblocked = true\n[[registry]]\nprefix = "worse.io"\nblocked = true\n');
    const e = thrown(() => candidatesFor(parseReference('app'), two));
    expect(e.code).toBe(ErrorCode.PERMISSION_DENIED);
    expect(e.message).toContain('"bad.io"');
    expect(e.message).toContain('"worse.io"');
  });
  it('drops duplicate candidates', () => {
    const c: RegistriesConf = { unqualifiedSearchRegistries: ['docker.io', 'docker.io'], registries: [] };
    expect(urls('app', c)).toEqual(['https://registry-1.docker.io/v2/ library/app latest']);
  });
  it('an unqualified name with no search registries goes to Docker Hub, a qualified one is blocked outright', () => {
    const c = toml('[[registry]]\nprefix = "docker.io"\nblocked = true\n');
    expect(thrown(() => candidatesFor(parseReference('app'), c)).code).toBe(ErrorCode.PERMISSION_DENIED);
    expect(thrown(() => candidatesFor(parseReference('docker.io/x/app'), c)).code).toBe(ErrorCode.PERMISSION_DENIED);
  });
  it('a rule that rewrites to an invalid reference is a CONFIG error', () => {
    const c = toml('[[registry]]\nprefix = "docker.io/library/busybox"\nlocation = "m.local"\n');
    const e = thrown(() => candidatesFor(parseReference('busybox:1'), c));
    expect(e.code).toBe(ErrorCode.CONFIG);
    expect(e.message).toContain('"docker.io/library/busybox"');
  });
});
