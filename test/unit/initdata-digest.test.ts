import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { ErrorCode, GuestpullError } from '../../src/errors.js';
import type { InitdataAlgorithm } from '../../src/initdata/document.js';
import { digestMatches, FIELD_LENGTH, fitToField, initdataDigest, parseDigestValue, type TeePlatform } from '../../src/initdata/digest.js';

const tmp = mkdtempSync(path.join(os.tmpdir(), 'guestpull-initdata-digest-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

// A document with CRLF, a trailing space and non-ASCII: the digest is over these exact bytes.
const DOC = Buffer.from('version = "0.1.0"\r\nalgorithm = "sha384"\n[data]\n"cdh.toml" = \'\'\'\n# é ü \n\'\'\'\n ', 'utf8');
const docPath = path.join(tmp, 'doc.toml');
writeFileSync(docPath, DOC);

function opensslDigest(alg: InitdataAlgorithm, file: string): Buffer {
  return execFileSync('openssl', ['dgst', `-${alg}`, '-binary', file]);
}

/** Independent fitting: explicit truncation or zero padding at the end. */
function fitByHand(d: Buffer, len: number): Buffer {
  return d.length >= len ? d.subarray(0, len) : Buffer.concat([d, Buffer.alloc(len - d.length, 0)]);
}

const LENGTHS: Record<Exclude<TeePlatform, 'none'>, number> = { snp: 32, tdx: 48, cca: 64, se: 256 };
const ALGS: InitdataAlgorithm[] = ['sha256', 'sha384', 'sha512'];
const PLATFORMS: TeePlatform[] = ['none', 'snp', 'tdx', 'cca', 'se'];

describe('initdata digest vectors (openssl dgst + explicit fitting)', () => {
  it('field lengths are the documented ones', () => {
    expect({ ...FIELD_LENGTH }).toEqual(LENGTHS);
  });

  for (const alg of ALGS) {
    const want = opensslDigest(alg, docPath);
    it(`${alg} over the raw bytes matches openssl`, () => {
      expect(initdataDigest(DOC, alg).toString('hex')).toBe(want.toString('hex'));
      // Not a re-serialisation: one byte more changes it.
      expect(initdataDigest(Buffer.concat([DOC, Buffer.from('\n')]), alg).equals(want)).toBe(false);
    });
    for (const p of PLATFORMS) {
      it(`${alg} fitted to ${p}`, () => {
        const expected = p === 'none' ? want : fitByHand(want, LENGTHS[p]);
        const got = fitToField(initdataDigest(DOC, alg), p);
        expect(got.toString('hex')).toBe(expected.toString('hex'));
        if (p !== 'none') expect(got.length).toBe(LENGTHS[p]);
        expect(digestMatches(initdataDigest(DOC, alg), expected)).toBe(true);
      });
    }
  }

  it('padding is zeros at the end, truncation keeps the start', () => {
    const d = Buffer.from('00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff', 'hex');
    const tdx = fitToField(d, 'tdx');
    expect(tdx.subarray(0, 32).equals(d)).toBe(true);
    expect(tdx.subarray(32).every((b) => b === 0)).toBe(true);
    const big = Buffer.alloc(64, 7);
    big[0] = 1;
    expect(fitToField(big, 'snp').equals(big.subarray(0, 32))).toBe(true);
  });
});

describe('digestMatches', () => {
  const d = initdataDigest(DOC, 'sha256');
  it('accepts the raw digest and every fitted field', () => {
    expect(digestMatches(d, d)).toBe(true);
    for (const p of ['tdx', 'cca', 'se'] as const) expect(digestMatches(d, fitByHand(d, LENGTHS[p]))).toBe(true);
  });
  it('compares the whole field: a change in the padding or any byte fails', () => {
    const se = fitByHand(d, 256);
    const tail = Buffer.from(se);
    tail[255] = 1;
    expect(digestMatches(d, tail)).toBe(false);
    const head = Buffer.from(d);
    head[0] ^= 1;
    expect(digestMatches(d, head)).toBe(false);
  });
  it('refuses lengths that are neither the digest nor a field', () => {
    expect(digestMatches(d, d.subarray(0, 31))).toBe(false);
    expect(digestMatches(d, Buffer.alloc(0))).toBe(false);
  });
  it('a sha512 digest truncated to 48 bytes matches as tdx, not any 48-byte prefix of another document', () => {
    const d512 = initdataDigest(DOC, 'sha512');
    expect(digestMatches(d512, d512.subarray(0, 48))).toBe(true);
    expect(digestMatches(d512, initdataDigest(Buffer.from('other'), 'sha384'))).toBe(false);
  });
});

describe('parseDigestValue', () => {
  const bytes = Buffer.from('00ff10ab'.repeat(8), 'hex');
  it.each([
    ['lower hex', bytes.toString('hex')],
    ['upper hex', bytes.toString('hex').toUpperCase()],
    ['0x hex', '0x' + bytes.toString('hex')],
    ['hex with surrounding whitespace', `  ${bytes.toString('hex')}\n`],
    ['std base64', bytes.toString('base64')],
    ['url-safe base64', bytes.toString('base64url')],
    ['base64 without padding', bytes.toString('base64').replace(/=+$/, '')],
  ])('accepts %s', (_n, v) => {
    expect(parseDigestValue(v).equals(bytes)).toBe(true);
  });
  it.each([
    ['empty', ''],
    ['odd hex with 0x', '0xabc'],
    ['garbage', 'not a digest!'],
    ['mixed base64 alphabets', 'ab+_cd=='],
    ['bad padding', 'abc=='],
    ['0x only', '0x'],
  ])('refuses %s with CONFIG', (_n, v) => {
    try {
      parseDigestValue(v);
      expect.unreachable('should throw');
    } catch (e) {
      expect(e).toBeInstanceOf(GuestpullError);
      expect((e as GuestpullError).code).toBe(ErrorCode.CONFIG);
    }
  });
});
