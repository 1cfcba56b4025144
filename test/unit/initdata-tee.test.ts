import { mkdir, mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ErrorCode, GuestpullError } from '../../src/errors.js';
import { readTeeMeasurement, snpHostData, tdxMrConfigId } from '../../src/initdata/tee.js';

/** Bytes start, start+1, … (mod 256): a pattern that shows both the field's position and its bounds. */
function pattern(len: number, start: number): Buffer {
  return Buffer.from(Array.from({ length: len }, (_, i) => (start + i) & 0xff));
}

/** An SNP ATTESTATION_REPORT (AMD ABI 56860): 0x4A0 bytes, VERSION u32 @0, HOST_DATA 32 @0xC0. */
function snpReport(opts: { version?: number; size?: number; hostData?: Buffer } = {}): Buffer {
  const r = Buffer.alloc(opts.size ?? 0x4a0, 0xee);
  r.writeUInt32LE(opts.version ?? 2, 0);
  r.fill(0xaa, 0x90, 0xc0); // MEASUREMENT, just before
  (opts.hostData ?? pattern(32, 1)).copy(r, 0xc0);
  r.fill(0xbb, 0xe0, 0x110); // ID_KEY_DIGEST, just after
  return r;
}

/** A TDX DCAP quote: 48-byte header, then (v5: type u16 + size u32 +) the TD report body, then a signature. */
function tdxQuote(opts: { version?: number; teeType?: number; v5Type?: number; v5Size?: number; mrConfigId?: Buffer; cut?: number } = {}): Buffer {
  const version = opts.version ?? 4;
  const header = Buffer.alloc(48);
  header.writeUInt16LE(version, 0);
  header.writeUInt16LE(2, 2); // ECDSA-256-with-P-256
  header.writeUInt32LE(opts.teeType ?? 0x81, 4);
  const bodyType = opts.v5Type ?? 2;
  const body = Buffer.alloc(bodyType === 3 ? 648 : 584, 0x33);
  body.fill(0x11, 136, 184); // MRTD
  (opts.mrConfigId ?? pattern(48, 0x40)).copy(body, 184); // MRCONFIGID
  body.fill(0x22, 232, 280); // MROWNER
  const desc = Buffer.alloc(6);
  desc.writeUInt16LE(bodyType, 0);
  desc.writeUInt32LE(opts.v5Size ?? body.length, 2);
  const sig = Buffer.alloc(4 + 64);
  sig.writeUInt32LE(64, 0);
  const q = Buffer.concat(version === 5 ? [header, desc, body, sig] : [header, body, sig]);
  return opts.cut === undefined ? q : q.subarray(0, opts.cut);
}

function configMsg(f: () => unknown): string {
  try {
    f();
  } catch (e) {
    expect(e).toBeInstanceOf(GuestpullError);
    expect((e as GuestpullError).code).toBe(ErrorCode.CONFIG);
    return (e as GuestpullError).message;
  }
  throw new Error('expected a CONFIG error');
}

describe('snpHostData', () => {
  it.each([2, 3, 5])('returns HOST_DATA from a version %i report', (v) => {
    expect(snpHostData(snpReport({ version: v })).toString('hex')).toBe(pattern(32, 1).toString('hex'));
  });
  it('returns a copy', () => {
    const r = snpReport();
    const h = snpHostData(r);
    r.fill(0, 0xc0, 0xe0);
    expect(h.equals(pattern(32, 1))).toBe(true);
  });
  it.each([
    ['too short', { size: 0x49f }, /1183 bytes; expected 1184/],
    ['too long', { size: 4097 }, /4097 bytes/],
    ['version 1', { version: 1 }, /version 1 is not supported/],
    ['version 6', { version: 6 }, /version 6 is not supported/],
    ['version 0 (zeros)', { version: 0 }, /version 0/],
  ])('refuses %s', (_n, o, re) => {
    expect(configMsg(() => snpHostData(snpReport(o)))).toMatch(re);
  });
});

describe('tdxMrConfigId', () => {
  it('reads MRCONFIGID from a v4 quote (header 48 + body offset 184 = 232)', () => {
    const q = tdxQuote();
    expect(tdxMrConfigId(q).toString('hex')).toBe(pattern(48, 0x40).toString('hex'));
    expect(q.subarray(232, 280).equals(pattern(48, 0x40))).toBe(true);
  });
  it('reads MRCONFIGID from v5 quotes, TDX 1.0 and 1.5 bodies (offset 54 + 184 = 238)', () => {
    expect(tdxMrConfigId(tdxQuote({ version: 5, v5Type: 2 })).equals(pattern(48, 0x40))).toBe(true);
    const q15 = tdxQuote({ version: 5, v5Type: 3, mrConfigId: pattern(48, 0x90) });
    expect(tdxMrConfigId(q15).equals(pattern(48, 0x90))).toBe(true);
    expect(q15.subarray(238, 286).equals(pattern(48, 0x90))).toBe(true);
  });
  it.each([
    ['a version 3 (SGX) quote', { version: 3 }, /version 3 is not supported/],
    ['an SGX tee_type', { teeType: 0 }, /tee_type is 0x0, not 0x81 \(TDX\): this is an SGX quote/],
    ['a v5 SGX body', { version: 5, v5Type: 1 }, /body type 1 is not a TD report/],
    ['a v5 size that disagrees', { version: 5, v5Type: 2, v5Size: 648 }, /declares 648 bytes; expected 584/],
    ['a truncated v4 body', { cut: 48 + 300 }, /348 bytes; its TD report body needs 632/],
    ['a truncated v5 body', { version: 5, v5Type: 3, cut: 54 + 600 }, /needs 702/],
    ['a header only', { cut: 20 }, /shorter than its 48-byte header/],
  ])('refuses %s', (_n, o, re) => {
    expect(configMsg(() => tdxMrConfigId(tdxQuote(o)))).toMatch(re);
  });
});

describe('readTeeMeasurement', () => {
  let tmp: string;
  beforeAll(async () => {
    tmp = await mkdtemp(path.join(os.tmpdir(), 'guestpull-initdata-tee-'));
  });
  afterAll(async () => {
    await rm(tmp, { recursive: true, force: true });
  });

  async function fakeReport(root: string, name: string, provider: string, outblob: Buffer): Promise<string> {
    const dir = path.join(root, 'tsm', 'report', name);
    await mkdir(dir, { recursive: true });
    await writeFile(path.join(dir, 'provider'), `${provider}\n`);
    await writeFile(path.join(dir, 'generation'), '1\n');
    await writeFile(path.join(dir, 'outblob'), outblob);
    return dir;
  }

  it('returns undefined when the guest has no TEE interface', async () => {
    const empty = path.join(tmp, 'empty');
    await mkdir(empty, { recursive: true });
    expect(await readTeeMeasurement({ sysfsRoot: empty, configfsRoot: empty })).toBeUndefined();
  });

  it('reads the binary TDX mrconfigid from sysfs', async () => {
    const sys = path.join(tmp, 'sys-bin');
    const p = path.join(sys, 'devices/virtual/misc/tdx_guest/measurements/mrconfigid');
    await mkdir(path.dirname(p), { recursive: true });
    await writeFile(p, pattern(48, 7));
    const m = await readTeeMeasurement({ sysfsRoot: sys, configfsRoot: path.join(tmp, 'none') });
    expect(m).toEqual({ platform: 'tdx', field: pattern(48, 7), source: p });
  });

  it('accepts hex text from sysfs and prefers sysfs over configfs-tsm', async () => {
    const sys = path.join(tmp, 'sys-hex');
    const p = path.join(sys, 'devices/virtual/misc/tdx_guest/measurements/mrconfigid');
    await mkdir(path.dirname(p), { recursive: true });
    await writeFile(p, pattern(48, 9).toString('hex') + '\n');
    const cfg = path.join(tmp, 'cfg-ignored');
    await fakeReport(cfg, 'r', 'sev_guest', snpReport());
    const m = await readTeeMeasurement({ sysfsRoot: sys, configfsRoot: cfg, tsmReportName: 'r' });
    expect(m?.field.equals(pattern(48, 9))).toBe(true);
    expect(m?.platform).toBe('tdx');
  });

  it('refuses a sysfs value of the wrong size', async () => {
    const sys = path.join(tmp, 'sys-bad');
    const p = path.join(sys, 'devices/virtual/misc/tdx_guest/measurements/mrconfigid');
    await mkdir(path.dirname(p), { recursive: true });
    await writeFile(p, Buffer.alloc(32));
    await expect(readTeeMeasurement({ sysfsRoot: sys, configfsRoot: tmp })).rejects.toThrow(/expected 48 bytes \(MRCONFIGID\), got 32/);
  });

  it('configfs-tsm, sev_guest: writes a 64-byte inblob and returns HOST_DATA', async () => {
    const cfg = path.join(tmp, 'cfg-snp');
    const dir = await fakeReport(cfg, 'test', 'sev_guest', snpReport({ hostData: pattern(32, 0xc0) }));
    const m = await readTeeMeasurement({ sysfsRoot: path.join(tmp, 'none'), configfsRoot: cfg, tsmReportName: 'test' });
    expect(m?.platform).toBe('snp');
    expect(m?.field.toString('hex')).toBe(pattern(32, 0xc0).toString('hex'));
    expect(m?.source).toMatch(/configfs-tsm sev_guest HOST_DATA/);
    expect((await readFile(path.join(dir, 'inblob'))).length).toBe(64);
  });

  it('configfs-tsm, tdx_guest: returns MRCONFIGID from the quote', async () => {
    const cfg = path.join(tmp, 'cfg-tdx');
    await fakeReport(cfg, 'test', 'tdx_guest', tdxQuote({ version: 5, v5Type: 3, mrConfigId: pattern(48, 0x55) }));
    const m = await readTeeMeasurement({ sysfsRoot: path.join(tmp, 'none'), configfsRoot: cfg, tsmReportName: 'test' });
    expect(m?.platform).toBe('tdx');
    expect(m?.field.equals(pattern(48, 0x55))).toBe(true);
  });

  it('configfs-tsm: refuses an unsupported provider and a malformed outblob', async () => {
    const cfg = path.join(tmp, 'cfg-cca');
    await fakeReport(cfg, 'test', 'arm_cca_guest', Buffer.alloc(100));
    await expect(readTeeMeasurement({ sysfsRoot: tmp, configfsRoot: cfg, tsmReportName: 'test' })).rejects.toThrow(
      /provider "arm_cca_guest" is not supported.*--initdata-digest/,
    );
    const cfg2 = path.join(tmp, 'cfg-short');
    await fakeReport(cfg2, 'test', 'sev_guest', Buffer.alloc(100));
    await expect(readTeeMeasurement({ sysfsRoot: tmp, configfsRoot: cfg2, tsmReportName: 'test' })).rejects.toThrow(/100 bytes; expected 1184/);
  });

  it('configfs-tsm: by default creates a fresh report directory of its own', async () => {
    const cfg = path.join(tmp, 'cfg-fresh');
    await mkdir(path.join(cfg, 'tsm', 'report'), { recursive: true });
    // A plain directory cannot stand in for the kernel, so no provider appears: the read fails...
    await expect(readTeeMeasurement({ sysfsRoot: tmp, configfsRoot: cfg })).rejects.toThrow(/provider "\(none\)"/);
    // ...but it did mkdir a new guestpull-* directory and write a 64-byte inblob into it.
    const dirs = await readdir(path.join(cfg, 'tsm', 'report'));
    expect(dirs).toHaveLength(1);
    expect(dirs[0]).toMatch(/^guestpull-\d+-[0-9a-f]{12}$/);
    expect((await readFile(path.join(cfg, 'tsm', 'report', dirs[0]!, 'inblob'))).length).toBe(64);
  });
});
