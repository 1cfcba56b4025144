import { createHash } from 'node:crypto';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ErrorCode, GuestpullError } from '../../src/errors.js';
import { loadVerifiedInitdata, packInitdataImage, type VerifyInitdataOptions } from '../../src/initdata/index.js';
import { createLogger, silentLogger } from '../../src/log.js';

const GOOD = Buffer.from(`version = "0.1.0"
algorithm = "sha256"
[data]
"cdh.toml" = '''
[image.image_pull_proxy]
https_proxy = "http://127.0.0.1:5432"
'''
`);
const GOOD512 = Buffer.from(GOOD.toString().replace('sha256', 'sha512'));
// Header fine, body not TOML at all: any full parse of it fails with CONFIG.
const BAD_BODY = Buffer.from('version = "0.1.0"\nalgorithm = "sha384"\n[data]\n"cdh.toml" = \'\'\'unterminated\n= = =\n');

const sha = (alg: string, b: Buffer) => createHash(alg).update(b).digest();
const pad = (d: Buffer, n: number) => (d.length >= n ? d.subarray(0, n) : Buffer.concat([d, Buffer.alloc(n - d.length)]));

let tmp: string;
let none: string;
beforeAll(async () => {
  tmp = await mkdtemp(path.join(os.tmpdir(), 'guestpull-initdata-verify-'));
  none = path.join(tmp, 'no-tee');
  await mkdir(none);
});
afterAll(async () => {
  await rm(tmp, { recursive: true, force: true });
});

async function put(name: string, content: Buffer): Promise<string> {
  const p = path.join(tmp, name);
  await mkdir(path.dirname(p), { recursive: true });
  await writeFile(p, content);
  return p;
}

function opts(spec: string, extra: Partial<VerifyInitdataOptions> = {}): VerifyInitdataOptions {
  return { spec, allowUnmeasured: false, tee: { sysfsRoot: none, configfsRoot: none }, logger: silentLogger(), ...extra };
}

async function failure(p: Promise<unknown>): Promise<GuestpullError> {
  try {
    await p;
  } catch (e) {
    expect(e).toBeInstanceOf(GuestpullError);
    return e as GuestpullError;
  }
  throw new Error('expected a failure');
}

describe('loadVerifiedInitdata with --initdata-digest', () => {
  it('accepts the raw digest (hex) and returns the parsed document', async () => {
    const p = await put('good.toml', GOOD);
    const v = await loadVerifiedInitdata(opts(p, { expectedDigest: sha('sha256', GOOD).toString('hex') }));
    expect(v.measured).toBe(true);
    expect(v.expectedFrom).toBe('flag');
    expect(v.digestHex).toBe(sha('sha256', GOOD).toString('hex'));
    expect(v.doc.data['cdh.toml']).toContain('https_proxy');
    expect(v.doc.raw.equals(GOOD)).toBe(true);
  });

  it('accepts the TEE field value: sha256 zero-padded to TDX 48 (base64), sha512 truncated to SNP 32', async () => {
    const p = await put('good.toml', GOOD);
    const tdx = pad(sha('sha256', GOOD), 48);
    expect((await loadVerifiedInitdata(opts(p, { expectedDigest: tdx.toString('base64') }))).measured).toBe(true);
    const q = await put('good512.toml', GOOD512);
    const snp = pad(sha('sha512', GOOD512), 32);
    expect((await loadVerifiedInitdata(opts(q, { expectedDigest: '0x' + snp.toString('hex').toUpperCase() }))).measured).toBe(true);
  });

  it('works on a device image found by auto, digesting the decompressed document', async () => {
    await put('dev/vda', Buffer.alloc(1024));
    await put('dev/vdb', packInitdataImage(GOOD));
    const v = await loadVerifiedInitdata(opts('auto', { devRoot: path.join(tmp, 'dev'), expectedDigest: sha('sha256', GOOD).toString('hex') }));
    expect(v.source).toContain('vdb');
  });

  it('mismatch: INITDATA_MISMATCH with both hex values, and the full parser is never reached', async () => {
    const p = await put('bad-body.toml', BAD_BODY);
    const computed = sha('sha384', BAD_BODY);
    const expected = sha('sha384', GOOD);
    const e = await failure(loadVerifiedInitdata(opts(p, { expectedDigest: expected.toString('hex') })));
    expect(e.code).toBe(ErrorCode.INITDATA_MISMATCH); // not CONFIG: the broken body was never parsed
    expect(e.message).toContain(computed.toString('hex'));
    expect(e.message).toContain(expected.toString('hex'));
    expect(e.message).toContain('--initdata-digest');
    expect(e.message).toContain(p);
  });

  it('mismatch against a fitted field shows the fitted computed value', async () => {
    const p = await put('bad-body.toml', BAD_BODY);
    const expected = Buffer.alloc(32, 0x5a);
    const e = await failure(loadVerifiedInitdata(opts(p, { expectedDigest: expected.toString('hex') })));
    expect(e.code).toBe(ErrorCode.INITDATA_MISMATCH);
    expect(e.message).toContain(`snp field, 32 bytes: ${pad(sha('sha384', BAD_BODY), 32).toString('hex')}`);
    expect(e.message).toContain(expected.toString('hex'));
  });

  it('the same broken document with a matching digest then fails the full parse (CONFIG)', async () => {
    const p = await put('bad-body.toml', BAD_BODY);
    const e = await failure(loadVerifiedInitdata(opts(p, { expectedDigest: sha('sha384', BAD_BODY).toString('hex') })));
    expect(e.code).toBe(ErrorCode.CONFIG);
    expect(e.message).toMatch(/invalid TOML/);
  });

  it('refuses a digest value of a length no platform uses', async () => {
    const p = await put('good.toml', GOOD);
    const e = await failure(loadVerifiedInitdata(opts(p, { expectedDigest: 'ab'.repeat(20) })));
    expect(e.code).toBe(ErrorCode.CONFIG);
    expect(e.message).toMatch(/20 bytes/);
  });
});

describe('loadVerifiedInitdata against the TEE', () => {
  async function snpConfigfs(name: string, hostData: Buffer): Promise<string> {
    const root = path.join(tmp, name);
    const dir = path.join(root, 'tsm', 'report', 'r');
    await mkdir(dir, { recursive: true });
    const report = Buffer.alloc(0x4a0);
    report.writeUInt32LE(3, 0);
    hostData.copy(report, 0xc0);
    await writeFile(path.join(dir, 'provider'), 'sev_guest\n');
    await writeFile(path.join(dir, 'outblob'), report);
    return root;
  }

  it('matches SNP HOST_DATA read through configfs-tsm', async () => {
    const p = await put('good512.toml', GOOD512);
    const root = await snpConfigfs('cfg-ok', pad(sha('sha512', GOOD512), 32));
    const v = await loadVerifiedInitdata({ ...opts(p), tee: { sysfsRoot: none, configfsRoot: root, tsmReportName: 'r' } });
    expect(v.measured).toBe(true);
    expect(v.expectedFrom).toMatch(/configfs-tsm sev_guest HOST_DATA/);
  });

  it('the flag wins over the TEE', async () => {
    const p = await put('good.toml', GOOD);
    const root = await snpConfigfs('cfg-other', Buffer.alloc(32, 1));
    const v = await loadVerifiedInitdata({ ...opts(p, { expectedDigest: sha('sha256', GOOD).toString('hex') }), tee: { sysfsRoot: none, configfsRoot: root, tsmReportName: 'r' } });
    expect(v.expectedFrom).toBe('flag');
  });

  it('mismatch against TDX sysfs names the sysfs file and both values', async () => {
    const p = await put('bad-body.toml', BAD_BODY);
    const sys = path.join(tmp, 'sys');
    const f = path.join(sys, 'devices/virtual/misc/tdx_guest/measurements/mrconfigid');
    await mkdir(path.dirname(f), { recursive: true });
    const bound = sha('sha384', GOOD);
    await writeFile(f, bound);
    const e = await failure(loadVerifiedInitdata({ ...opts(p), tee: { sysfsRoot: sys, configfsRoot: none } }));
    expect(e.code).toBe(ErrorCode.INITDATA_MISMATCH);
    expect(e.message).toContain(sha('sha384', BAD_BODY).toString('hex'));
    expect(e.message).toContain(bound.toString('hex'));
    expect(e.message).toContain(f);
  });
});

describe('loadVerifiedInitdata without any expected value', () => {
  it('refuses, saying how to provide one or that --allow-unmeasured-initdata exists', async () => {
    const p = await put('good.toml', GOOD);
    const e = await failure(loadVerifiedInitdata(opts(p)));
    expect(e.code).toBe(ErrorCode.CONFIG);
    expect(e.message).toMatch(/--initdata-digest/);
    expect(e.message).toMatch(/--allow-unmeasured-initdata/);
  });

  it('with --allow-unmeasured-initdata: returns the document, unmeasured, with a warning', async () => {
    const p = await put('good.toml', GOOD);
    const lines: string[] = [];
    const logger = createLogger({ level: 'info', destination: { write: (s: string) => void lines.push(s) } });
    const v = await loadVerifiedInitdata(opts(p, { allowUnmeasured: true, logger }));
    expect(v.measured).toBe(false);
    expect(v.expectedFrom).toBeUndefined();
    expect(v.doc.data['cdh.toml']).toBeDefined();
    const warn = lines.map((l) => JSON.parse(l) as { level: string; msg: string }).find((l) => l.level === 'warn');
    expect(warn?.msg).toMatch(/UNMEASURED/);
  });

  it('still refuses a broken document when unmeasured', async () => {
    const p = await put('bad-body.toml', BAD_BODY);
    expect((await failure(loadVerifiedInitdata(opts(p, { allowUnmeasured: true })))).code).toBe(ErrorCode.CONFIG);
  });
});
