import { describe, expect, it } from 'vitest';
import { ErrorCode, GuestpullError } from '../../src/errors.js';
import { firstInvalidUtf8, parseInitdataDocument, parseInitdataHeader } from '../../src/initdata/document.js';

// The seed's image-pull-proxy document (trimmed policy), as an operator would write it.
const SEED = `version = "0.1.0"
algorithm = "sha256"
[data]
"policy.rego" = '''
package agent_policy

default PullImageRequest := true
'''
"aa.toml" = '''
[token_configs]
[token_configs.kbs]
url = "http://1.2.3.4:8080"
'''

"cdh.toml" = '''
[kbc]
name = "cc_kbc"
url = "http://1.2.3.4:8080"

[image.image_pull_proxy]
https_proxy = "http://127.0.0.1:5432"
no_proxy = "192.168.0.1,localhost"
'''
`;

function configErr(f: () => unknown): string {
  try {
    f();
  } catch (e) {
    expect(e).toBeInstanceOf(GuestpullError);
    expect((e as GuestpullError).code).toBe(ErrorCode.CONFIG);
    return (e as GuestpullError).message;
  }
  throw new Error('expected a CONFIG error');
}

const b = (s: string) => Buffer.from(s, 'utf8');

describe('parseInitdataHeader', () => {
  it('reads the seed document', () => {
    expect(parseInitdataHeader(b(SEED), 'seed')).toEqual({ version: '0.1.0', algorithm: 'sha256' });
  });

  it.each([
    ['quoted keys, literal strings, comments, CRLF', `# init-data\r\n'algorithm' = 'sha512' # alg\r\n"version"="0.1.0"\r\n\r\n[data]\r\n`, 'sha512'],
    ['escaped basic string', 'version = "0.1.0"\nalgorithm = "sha\\u0033\\u0038\\u0034"\n[data]\n', 'sha384'],
    ['header followed by an inline data table', 'version = "0.1.0"\nalgorithm = "sha256"\ndata = { a = "b" }\n', 'sha256'],
  ])('accepts %s', (_n, doc, alg) => {
    expect(parseInitdataHeader(b(doc), 't').algorithm).toBe(alg);
  });

  it.each([
    ['wrong version', 'version = "0.2.0"\nalgorithm = "sha256"\n', /line 1: unsupported version "0\.2\.0"/],
    ['version as a number', 'version = 0.1\nalgorithm = "sha256"\n', /line 1: `version` must be a string/],
    ['SHA256', 'version = "0.1.0"\nalgorithm = "SHA256"\n', /line 2: unknown algorithm "SHA256"/],
    ['sha-256', 'version = "0.1.0"\nalgorithm = "sha-256"\n', /line 2: unknown algorithm "sha-256"/],
    ['sha1', 'version = "0.1.0"\n\nalgorithm = "sha1"\n', /line 3: unknown algorithm "sha1"/],
    ['missing algorithm', 'version = "0.1.0"\n[data]\n', /missing `algorithm`.*before line 2/],
    ['missing version', 'algorithm = "sha256"\n', /missing `version`/],
    ['algorithm only after another key', 'version = "0.1.0"\nfoo = "x"\nalgorithm = "sha256"\n', /missing `algorithm`.*before line 2/],
    ['duplicate version', 'version = "0.1.0"\nversion = "0.1.0"\nalgorithm = "sha256"\n', /line 2: duplicate key `version` \(first set on line 1\)/],
    ['duplicate algorithm, quoted', 'algorithm = "sha256"\nversion = "0.1.0"\n"algorithm" = "sha512"\n', /line 3: duplicate key `algorithm`/],
    ['multi-line string', 'version = """0.1.0"""\nalgorithm = "sha256"\n', /line 1: `version` must be a single-line string/],
    ['trailing garbage', 'version = "0.1.0" x\nalgorithm = "sha256"\n', /line 1: unexpected text/],
    ['unterminated', 'version = "0.1.0\nalgorithm = "sha256"\n', /line 1: `version` unterminated string/],
    ['invalid UTF-8', 'version = "0.1.0"\nalgorithm = "sha\xff256"\n', /line 2: invalid UTF-8/],
    ['byte-order mark', '\uFEFFversion = "0.1.0"\nalgorithm = "sha256"\n', /line 1: starts with a byte-order mark/],
    ['empty document', '', /missing `version`/],
  ])('refuses %s', (_n, doc, re) => {
    const raw = _n === 'invalid UTF-8' ? Buffer.from(doc, 'latin1') : b(doc);
    expect(configErr(() => parseInitdataHeader(raw, 'doc.toml'))).toMatch(re);
  });

  it('never looks past the header: garbage after [data] does not matter', () => {
    const raw = Buffer.concat([b('version = "0.1.0"\nalgorithm = "sha384"\n[data]\nthis is = = not toml\n'), Buffer.from([0xff, 0xfe])]);
    expect(parseInitdataHeader(raw, 't').algorithm).toBe('sha384');
  });
});

describe('parseInitdataDocument', () => {
  it('parses the seed document into a table of strings', () => {
    const doc = parseInitdataDocument(b(SEED), 'seed');
    expect(Object.keys(doc.data).sort()).toEqual(['aa.toml', 'cdh.toml', 'policy.rego']);
    expect(doc.data['cdh.toml']).toContain('https_proxy = "http://127.0.0.1:5432"');
    expect(doc.raw.equals(b(SEED))).toBe(true);
    expect(doc.algorithm).toBe('sha256');
  });

  it.each([
    ['duplicate data key', 'version = "0.1.0"\nalgorithm = "sha256"\n[data]\n"cdh.toml" = "a"\n"cdh.toml" = "b"\n', /line 5, column 1: invalid TOML: .*redefine.*\(key "cdh\.toml"\)/],
    ['integer value', 'version = "0.1.0"\nalgorithm = "sha256"\n[data]\nretries = 3\n', /data\."retries" must be a string, got integer/],
    ['nested table value', 'version = "0.1.0"\nalgorithm = "sha256"\n[data.sub]\nx = "y"\n', /data\."sub" must be a string, got table/],
    ['array value', 'version = "0.1.0"\nalgorithm = "sha256"\n[data]\nlist = ["a"]\n', /data\."list" must be a string, got array/],
    ['data not a table', 'version = "0.1.0"\nalgorithm = "sha256"\ndata = "x"\n', /`data` must be a table of strings, got string/],
    ['missing data', 'version = "0.1.0"\nalgorithm = "sha256"\n', /missing the \[data\] table/],
    ['unknown top-level key', 'version = "0.1.0"\nalgorithm = "sha256"\nextra = "x"\n[data]\n', /unknown top-level key `extra`/],
    ['invalid TOML', 'version = "0.1.0"\nalgorithm = "sha256"\n[data]\n"cdh.toml" = \'\'\'\nx\n\'\'\'\nthis line is not toml\n', /line 7, column \d+: invalid TOML/],
    ['invalid UTF-8 in data', 'version = "0.1.0"\nalgorithm = "sha256"\n[data]\nk = "\xc3\x28"\n', /line 4: invalid UTF-8/],
    ['__proto__ key', 'version = "0.1.0"\nalgorithm = "sha256"\n[data]\n__proto__ = "x"\n', /invalid TOML/],
  ])('refuses %s, naming the key or line', (_n, doc, re) => {
    const raw = /UTF-8/.test(_n) ? Buffer.from(doc, 'latin1') : b(doc);
    expect(configErr(() => parseInitdataDocument(raw, 'doc.toml'))).toMatch(re);
  });

  it('accepts an empty [data] table', () => {
    expect(parseInitdataDocument(b('version = "0.1.0"\nalgorithm = "sha512"\n[data]\n'), 't').data).toEqual({});
  });
});

describe('firstInvalidUtf8', () => {
  it.each([
    ['ascii', [0x61, 0x62], -1],
    ['2-byte', [0xc3, 0xa9], -1],
    ['4-byte', [0xf0, 0x9f, 0x98, 0x80], -1],
    ['overlong', [0x61, 0xc0, 0xaf], 1],
    ['surrogate', [0xed, 0xa0, 0x80], 0],
    ['truncated', [0x61, 0xe2, 0x82], 1],
    ['bad continuation', [0xe2, 0x28, 0xa1], 0],
    ['above U+10FFFF', [0xf4, 0x90, 0x80, 0x80], 0],
  ])('%s', (_n, bytes, want) => {
    expect(firstInvalidUtf8(Uint8Array.from(bytes))).toBe(want);
  });
});
