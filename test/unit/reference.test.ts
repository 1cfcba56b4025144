import { describe, expect, it } from 'vitest';
import { ErrorCode, GuestpullError } from '../../src/errors.js';
import {
  formatReference,
  manifestReference,
  parseReference,
  parseRemoteName,
  withRegistry,
  type ImageReference,
} from '../../src/reference.js';

const H64 = 'a'.repeat(64);
const D = `sha256:${H64}`;
const D512 = `sha512:${'b'.repeat(128)}`;

/** [input, canonical output, domainGiven] */
const good: Array<[string, string, boolean]> = [
  ['busybox', 'docker.io/library/busybox:latest', false],
  ['busybox:1.36', 'docker.io/library/busybox:1.36', false],
  ['ns/app', 'docker.io/ns/app:latest', false],
  ['library/debian', 'docker.io/library/debian:latest', false],
  ['docker.io/library/busybox:1.36', 'docker.io/library/busybox:1.36', true],
  ['docker.io/foo', 'docker.io/library/foo:latest', true],
  ['docker.io/ns/foo', 'docker.io/ns/foo:latest', true],
  ['index.docker.io/foo', 'docker.io/library/foo:latest', true],
  ['index.docker.io/ns/foo:t', 'docker.io/ns/foo:t', true],
  ['registry-1.docker.io/library/alpine', 'docker.io/library/alpine:latest', true],
  ['127.0.0.1:5000/app:tag', '127.0.0.1:5000/app:tag', true],
  ['127.0.0.1:5000/debian', '127.0.0.1:5000/debian:latest', true],
  [`host:5000/ns/app@${D}`, `host:5000/ns/app@${D}`, true],
  [`r.io/a:t@${D}`, `r.io/a:t@${D}`, true],
  [`busybox@${D}`, `docker.io/library/busybox@${D}`, false],
  [`quay.io/x/y@${D512}`, `quay.io/x/y@${D512}`, true],
  ['localhost/app', 'localhost/app:latest', true],
  ['localhost:5000/a/b/c:v1.2.3-rc_1', 'localhost:5000/a/b/c:v1.2.3-rc_1', true],
  ['LOCALDOMAIN/fooo', 'LOCALDOMAIN/fooo:latest', true],
  ['INDEX.Docker.io/fooo', 'docker.io/library/fooo:latest', true],
  ['Example.COM/app', 'Example.COM/app:latest', true],
  ['[::1]:5000/app', '[::1]:5000/app:latest', true],
  ['[2001:db8::1]/repo:tag', '[2001:db8::1]/repo:tag', true],
  ['[fc00:1:2:3:4:5:6:7]:5000/library/debian', '[fc00:1:2:3:4:5:6:7]:5000/library/debian:latest', true],
  ['docker.io/1a3f5e7d9c1b3a5f7e9d1c3b5a7f9e1d3c5b7a9f1e3d5d7c9b1a3f5e7d9c1b3a', 'docker.io/library/1a3f5e7d9c1b3a5f7e9d1c3b5a7f9e1d3c5b7a9f1e3d5d7c9b1a3f5e7d9c1b3a:latest', true],
  ['docker---rules/dock__er', 'docker.io/docker---rules/dock__er:latest', false],
  ['lowercase:Uppercase', 'docker.io/library/lowercase:Uppercase', false],
  ['b.gcr.io/test.example.com/my-app:test.example.com', 'b.gcr.io/test.example.com/my-app:test.example.com', true],
  // single component with ':' is name:tag (distribution's rule), never host:port
  ['foo_bar.com:8080', 'docker.io/library/foo_bar.com:8080', false],
  ['192.168.1.1:5000', 'docker.io/library/192.168.1.1:5000', false],
  ['test_com/foo', 'docker.io/test_com/foo:latest', false],
  ['xn--n3h.com:18080/foo', 'xn--n3h.com:18080/foo:latest', true],
  [`example.com/${'a'.repeat(243)}`, `example.com/${'a'.repeat(243)}:latest`, true],
  [`r.io/a:${'t'.repeat(128)}`, `r.io/a:${'t'.repeat(128)}`, true],
];

/** [input, fragment of the error message] */
const bad: Array<[string, string]> = [
  ['', 'empty'],
  [' busybox', 'whitespace'],
  ['busybox ', 'whitespace'],
  ['busy box', 'whitespace'],
  ['busybox\n', 'whitespace'],
  ['busy\u0000box', 'control'],
  ['busy\u007fbox', 'control'],
  ['bus\u00fcbox', 'non-ASCII'],
  ['x'.repeat(4097), '4096 bytes'],
  ['Uppercase:tag', 'must be lowercase'],
  ['docker/Docker', 'must be lowercase'],
  ['docker.io/docker/Docker', 'must be lowercase'],
  ['test:5000/Uppercase/lowercase:tag', 'must be lowercase'],
  ['-docker', 'path component "-docker"'],
  ['-docker.io/docker/docker', 'not a valid host'],
  ['docker///docker', 'empty path component'],
  ['docker/', 'empty path component'],
  ['dock..er/docker', 'not a valid host'],
  ['dock..er/docker', 'not a valid host'],
  ['_docker/_docker', 'path component "_docker"'],
  ['aa/asdf$$^/aa', 'path component'],
  [':justtag', 'repository name is empty'],
  [`@${D}`, 'repository name is empty'],
  ['repo@sha256:ffffffffffffffffffffffffffffffffff', 'not supported'],
  [`repo@sha256:${'A'.repeat(64)}`, 'not supported'],
  [`validname@invaliddigest:${'f'.repeat(64)}`, 'not supported'],
  ['repo@notadigest', 'malformed'],
  ['repo:', 'tag ""'],
  ['repo:-bad', 'tag "-bad"'],
  [`repo:${'t'.repeat(129)}`, 'is invalid'],
  ['r.io/a:t:u', 'path component "a:t"'],
  ['https://github.com/docker/docker', 'URL'],
  ['[fc00::1]', 'tag "1]"'],
  ['[fc00::1]:5000', 'path component'],
  ['fc00::1:5000/debian', 'not a valid host'],
  ['[fe80::1%eth0]:5000/debian', 'not a valid host'],
  ['[2001:db8:3:4::192.0.2.33]:5000/debian', 'not a valid host'],
  ['host:99999/app', 'not a valid host'],
  ['host:0/app', 'not a valid host'],
  [H64, '64-hex'],
  [`example.com/${'a'.repeat(244)}`, 'more than 255'],
  [`${'a/'.repeat(127)}a:tag`, 'more than 255'],
];

describe('parseReference', () => {
  it.each(good)('%s → %s', (input, canonical, domainGiven) => {
    const ref = parseReference(input);
    expect(formatReference(ref)).toBe(canonical);
    expect(ref.domainGiven).toBe(domainGiven);
    // the canonical form parses to itself
    expect(formatReference(parseReference(canonical))).toBe(canonical);
  });

  it.each(bad)('rejects %j', (input, fragment) => {
    let err: unknown;
    try {
      parseReference(input);
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(GuestpullError);
    const g = err as GuestpullError;
    expect(g.code).toBe(ErrorCode.INVALID_REFERENCE);
    expect(g.message).toContain(fragment);
    expect(g.message).toContain('invalid image reference');
  });

  it('names the input in the error', () => {
    expect(() => parseReference('docker/Docker')).toThrow(/"docker\/Docker"/);
  });

  it('splits into fields', () => {
    expect(parseReference(`127.0.0.1:5000/ns/app:v1@${D}`)).toEqual({
      registry: '127.0.0.1:5000',
      repository: 'ns/app',
      tag: 'v1',
      digest: D,
      domainGiven: true,
    });
    expect(parseReference(`app@${D}`)).toEqual({
      registry: 'docker.io',
      repository: 'library/app',
      digest: D,
      domainGiven: false,
    });
    expect(parseReference('busybox')).toEqual({
      registry: 'docker.io',
      repository: 'library/busybox',
      tag: 'latest',
      domainGiven: false,
    });
  });
});

describe('manifestReference', () => {
  it('is the digest when present, else the tag', () => {
    expect(manifestReference(parseReference(`r.io/a:t@${D}`))).toBe(D);
    expect(manifestReference(parseReference('r.io/a:t'))).toBe('t');
    expect(manifestReference(parseReference('r.io/a'))).toBe('latest');
  });
});

describe('withRegistry', () => {
  const ref: ImageReference = parseReference(`busybox:1.36`);
  it('moves tag and digest to another registry and repository', () => {
    const moved = withRegistry(parseReference(`a/b:t@${D}`), 'Mirror.Local:5000', 'x/b');
    expect(moved).toEqual({ registry: 'Mirror.Local:5000', repository: 'x/b', tag: 't', digest: D, domainGiven: true });
  });
  it('applies the Docker Hub library/ rule and alias normalisation', () => {
    expect(formatReference(withRegistry(ref, 'index.docker.io', 'busybox'))).toBe('docker.io/library/busybox:1.36');
    expect(formatReference(withRegistry(ref, 'example1.com', 'busybox'))).toBe('example1.com/busybox:1.36');
  });
  it('rejects bad registries and repositories', () => {
    expect(() => withRegistry(ref, 'bad host', 'x')).toThrow(GuestpullError);
    expect(() => withRegistry(ref, 'r.io', 'X')).toThrow(/invalid/);
    expect(() => withRegistry(ref, 'r.io', '')).toThrow(/invalid/);
  });
});

describe('parseRemoteName', () => {
  it('parses the part after a known registry (no domain detection)', () => {
    expect(formatReference(parseRemoteName('harbor', 'v2/proxy/app:1'))).toBe('harbor/v2/proxy/app:1');
    expect(formatReference(parseRemoteName('docker.io', 'alpine'))).toBe('docker.io/library/alpine:latest');
    expect(() => parseRemoteName('harbor', ':1')).toThrow(/repository name is empty/);
  });
});
