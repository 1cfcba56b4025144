/**
 * Reading the init-data value bound into the TEE at launch, from inside the guest, with plain file I/O:
 *
 * 1. TDX, kernels ≥ 6.16: `<sysfs>/devices/virtual/misc/tdx_guest/measurements/mrconfigid`. The kernel's
 *    tsm-mr library exposes each measurement register as a *binary* sysfs attribute of the register's
 *    size (Documentation/ABI/testing/sysfs-devices-virtual-misc-tdx_guest: "MRCONFIGID - 48-byte
 *    immutable storage"; drivers/virt/coco/tsm-mr.c `tm_digest_read` memcpy()s the raw value). We take
 *    48 raw bytes, and also accept 96 hex digits in case a kernel or shim prints text.
 * 2. configfs-tsm (Documentation/ABI/testing/configfs-tsm): mkdir `<configfs>/tsm/report/<name>`, write a
 *    64-byte `inblob`, read `provider` and `outblob`, rmdir. `provider` names the format of outblob:
 *    `sev_guest` → the SNP ATTESTATION_REPORT (sev-guest.c `sev_report_new` copies the firmware's report,
 *    `hdr.report_size` bytes); `tdx_guest` → a TDX DCAP quote. `generation` is read before and after
 *    outblob to detect another writer racing us on the same directory.
 */
import { randomBytes } from 'node:crypto';
import { mkdir, open, rmdir, stat, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { ErrorCode, GuestpullError } from '../errors.js';
import { silentLogger, type Logger } from '../log.js';
import { FIELD_LENGTH, type FieldPlatform } from './digest.js';

export interface TeeMeasurement {
  platform: FieldPlatform;
  field: Buffer;
  source: string;
}

export interface ReadTeeOptions {
  sysfsRoot?: string;
  configfsRoot?: string;
  logger?: Logger;
  /**
   * Name of the configfs-tsm report directory. Default: a fresh random name, created and removed by
   * us. When given and the directory already exists, it is used as it is and left in place (this is
   * how tests stand in for the kernel).
   */
  tsmReportName?: string;
}

export const TDX_MRCONFIGID_SYSFS = 'devices/virtual/misc/tdx_guest/measurements/mrconfigid';
/** include/linux/tsm.h: TSM_OUTBLOB_MAX (SZ_32K). */
const TSM_OUTBLOB_MAX = 32 * 1024;

function configError(message: string, context: Record<string, unknown> = {}, cause?: unknown): GuestpullError {
  return new GuestpullError(ErrorCode.CONFIG, message, context, cause === undefined ? undefined : { cause });
}

function isMissing(e: unknown): boolean {
  const code = (e as NodeJS.ErrnoException).code;
  return code === 'ENOENT' || code === 'ENOTDIR';
}

/** Read a whole small file, refusing more than `max` bytes. */
async function readBounded(p: string, max: number): Promise<Buffer> {
  const fh = await open(p, 'r');
  try {
    const buf = Buffer.alloc(max + 1);
    let got = 0;
    while (got < buf.length) {
      const { bytesRead } = await fh.read(buf, got, buf.length - got, null);
      if (bytesRead === 0) break;
      got += bytesRead;
    }
    if (got > max) throw configError(`${p}: more than ${max} bytes; not what the kernel produces`);
    return buf.subarray(0, got);
  } finally {
    await fh.close();
  }
}

// ---- SNP -------------------------------------------------------------------------------------------

/** AMD SEV-SNP Firmware ABI spec (pub. 56860), ATTESTATION_REPORT: 0x4A0 bytes; HOST_DATA at 0xC0..0xE0
 *  (after VERSION 0x00, GUEST_SVN, POLICY, FAMILY_ID, IMAGE_ID, VMPL, SIGNATURE_ALGO, CURRENT_TCB,
 *  PLATFORM_INFO, flags, REPORT_DATA 0x50, MEASUREMENT 0x90). Same layout in the kernel's
 *  include/uapi/linux/sev-guest.h users and every SNP tool. Versions 2 (ABI 1.51), 3 (1.55, adds CPUID
 *  fields in reserved space) and 5 (1.58) keep HOST_DATA in place. */
export const SNP_REPORT_SIZE = 0x4a0;
const SNP_HOST_DATA_OFFSET = 0xc0;
const SNP_MIN_VERSION = 2;
const SNP_MAX_VERSION = 5;

export function snpHostData(report: Buffer): Buffer {
  if (report.length < SNP_REPORT_SIZE || report.length > 4096) {
    throw configError(`SNP attestation report is ${report.length} bytes; expected ${SNP_REPORT_SIZE} (0x4A0)`);
  }
  const version = report.readUInt32LE(0);
  if (version < SNP_MIN_VERSION || version > SNP_MAX_VERSION) {
    throw configError(`SNP attestation report version ${version} is not supported (${SNP_MIN_VERSION}..${SNP_MAX_VERSION})`);
  }
  return Buffer.from(report.subarray(SNP_HOST_DATA_OFFSET, SNP_HOST_DATA_OFFSET + FIELD_LENGTH.snp));
}

// ---- TDX -------------------------------------------------------------------------------------------

/** Intel TDX DCAP Quoting Library API, appendix "TD Quote" (sgx_quote_4.h / sgx_quote_5.h in
 *  SGXDataCenterAttestationPrimitives; mirrored by trustee deps/verifier/src/tdx/quote.rs):
 *  header 48 bytes = version u16 @0 (4 | 5), att_key_type u16 @2, tee_type u32 @4 (0x81 = TDX),
 *  reserved 4, qe_vendor_id 16, user_data 20.
 *  v4: TD report body at 48. v5: body type u16 @48 (2 = TDX 1.0, 584 bytes; 3 = TDX 1.5, 648 bytes),
 *  body size u32 @50, body at 54.
 *  TD report body: TEE_TCB_SVN 16 @0, MRSEAM 48 @16, MRSIGNERSEAM 48 @64, SEAMATTRIBUTES 8 @112,
 *  TDATTRIBUTES 8 @120, XFAM 8 @128, MRTD 48 @136, MRCONFIGID 48 @184, MROWNER 48 @232, … REPORTDATA @520. */
const TDX_HEADER_SIZE = 48;
const TDX_TEE_TYPE = 0x81;
const TDX_BODY_SIZE: Readonly<Record<number, number>> = { 2: 584, 3: 648 };
const TDX_MRCONFIGID_OFFSET = 184;

export function tdxMrConfigId(quote: Buffer): Buffer {
  if (quote.length < TDX_HEADER_SIZE) throw configError(`TDX quote is ${quote.length} bytes; shorter than its 48-byte header`);
  const version = quote.readUInt16LE(0);
  const teeType = quote.readUInt32LE(4);
  if (teeType !== TDX_TEE_TYPE) {
    throw configError(`quote tee_type is 0x${teeType.toString(16)}, not 0x81 (TDX)${teeType === 0 ? ': this is an SGX quote' : ''}`);
  }
  let bodyOffset: number;
  let bodySize: number;
  if (version === 4) {
    bodyOffset = TDX_HEADER_SIZE;
    bodySize = TDX_BODY_SIZE[2]!;
  } else if (version === 5) {
    if (quote.length < TDX_HEADER_SIZE + 6) throw configError(`TDX quote v5 is ${quote.length} bytes; too short for its body descriptor`);
    const type = quote.readUInt16LE(TDX_HEADER_SIZE);
    const size = quote.readUInt32LE(TDX_HEADER_SIZE + 2);
    const expected = TDX_BODY_SIZE[type];
    if (expected === undefined) throw configError(`TDX quote v5 body type ${type} is not a TD report (2 = TDX 1.0, 3 = TDX 1.5)`);
    if (size !== expected) throw configError(`TDX quote v5 body type ${type} declares ${size} bytes; expected ${expected}`);
    bodyOffset = TDX_HEADER_SIZE + 6;
    bodySize = expected;
  } else {
    throw configError(`TDX quote version ${version} is not supported (4 or 5)`);
  }
  if (quote.length < bodyOffset + bodySize) {
    throw configError(`TDX quote v${version} is ${quote.length} bytes; its TD report body needs ${bodyOffset + bodySize}`);
  }
  const at = bodyOffset + TDX_MRCONFIGID_OFFSET;
  return Buffer.from(quote.subarray(at, at + FIELD_LENGTH.tdx));
}

async function readTdxSysfs(sysfsRoot: string, logger: Logger): Promise<TeeMeasurement | undefined> {
  const p = path.join(sysfsRoot, TDX_MRCONFIGID_SYSFS);
  let content: Buffer;
  try {
    content = await readBounded(p, 256);
  } catch (e) {
    if (isMissing(e)) {
      logger.debug({ path: p }, 'no TDX mrconfigid in sysfs');
      return undefined;
    }
    throw e instanceof GuestpullError ? e : configError(`cannot read ${p}: ${(e as Error).message}`, { path: p }, e);
  }
  if (content.length === FIELD_LENGTH.tdx) return { platform: 'tdx', field: content, source: p };
  const text = content.toString('latin1').trim();
  if (/^(0x)?[0-9a-fA-F]{96}$/.test(text)) return { platform: 'tdx', field: Buffer.from(text.replace(/^0x/, ''), 'hex'), source: p };
  throw configError(`${p}: expected 48 bytes (MRCONFIGID), got ${content.length}`, { path: p });
}

// ---- configfs-tsm ----------------------------------------------------------------------------------

const PROVIDERS: Readonly<Record<string, { platform: FieldPlatform; extract: (blob: Buffer) => Buffer; field: string }>> = {
  sev_guest: { platform: 'snp', extract: snpHostData, field: 'HOST_DATA' },
  tdx_guest: { platform: 'tdx', extract: tdxMrConfigId, field: 'MRCONFIGID' },
};

async function readOptionalText(p: string): Promise<string | undefined> {
  try {
    return (await readBounded(p, 64)).toString('utf8').trim();
  } catch (e) {
    if (isMissing(e)) return undefined;
    throw e;
  }
}

async function readConfigfsTsm(configfsRoot: string, opts: ReadTeeOptions, logger: Logger): Promise<TeeMeasurement | undefined> {
  const reportRoot = path.join(configfsRoot, 'tsm', 'report');
  try {
    if (!(await stat(reportRoot)).isDirectory()) return undefined;
  } catch (e) {
    if (isMissing(e)) {
      logger.debug({ path: reportRoot }, 'no configfs-tsm report interface');
      return undefined;
    }
    throw configError(`cannot stat ${reportRoot}: ${(e as Error).message}`, { path: reportRoot }, e);
  }
  const name = opts.tsmReportName ?? `guestpull-${process.pid}-${randomBytes(6).toString('hex')}`;
  const dir = path.join(reportRoot, name);
  let created = true;
  try {
    await mkdir(dir);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'EEXIST' && opts.tsmReportName !== undefined) created = false;
    else throw configError(`configfs-tsm: cannot create ${dir}: ${(e as Error).message}`, { path: dir }, e);
  }
  try {
    await writeFile(path.join(dir, 'inblob'), randomBytes(64));
    const provider = await readOptionalText(path.join(dir, 'provider'));
    const known = provider === undefined ? undefined : PROVIDERS[provider.replace(/-/g, '_')];
    if (!known) {
      throw configError(
        `configfs-tsm provider ${JSON.stringify(provider ?? '(none)')} is not supported (sev_guest, tdx_guest); ` +
          'pass --initdata-digest with the value bound at launch instead',
        { path: dir, provider },
      );
    }
    // Reading outblob is what makes the kernel ask the firmware (or quoting service) for the report.
    const before = await readOptionalText(path.join(dir, 'generation'));
    const outblob = await readBounded(path.join(dir, 'outblob'), TSM_OUTBLOB_MAX);
    const after = await readOptionalText(path.join(dir, 'generation'));
    if (before !== after) {
      throw configError(`configfs-tsm: ${dir} changed while being read (generation ${before} → ${after}); another process wrote to it; retry`);
    }
    const field = known.extract(outblob);
    logger.debug({ provider, field: known.field }, 'read init-data field from configfs-tsm');
    return { platform: known.platform, field, source: `configfs-tsm ${provider} ${known.field} (${reportRoot})` };
  } catch (e) {
    if (e instanceof GuestpullError) throw e;
    throw configError(`configfs-tsm: reading ${dir} failed: ${(e as Error).message}`, { path: dir }, e);
  } finally {
    if (created) {
      await rmdir(dir).catch((e: unknown) => logger.warn({ path: dir, err: (e as Error).message }, 'configfs-tsm: cannot remove report dir'));
    }
  }
}

/** TDX sysfs first, then configfs-tsm; undefined when the guest has neither interface. */
export async function readTeeMeasurement(opts: ReadTeeOptions = {}): Promise<TeeMeasurement | undefined> {
  const logger = opts.logger ?? silentLogger();
  const tdx = await readTdxSysfs(opts.sysfsRoot ?? '/sys', logger);
  if (tdx) return tdx;
  return readConfigfsTsm(opts.configfsRoot ?? '/sys/kernel/config', opts, logger);
}
