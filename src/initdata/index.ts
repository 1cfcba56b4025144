/**
 * The one entry point serve/pull use: read → header → digest → compare (--initdata-digest first,
 * else the TEE) → only then the full parse. A document whose digest does not match is never parsed
 * beyond its header; nothing of it is returned.
 */
import { ErrorCode, GuestpullError } from '../errors.js';
import type { Logger } from '../log.js';
import { parseInitdataDocument, parseInitdataHeader, type InitdataDocument } from './document.js';
import { digestMatches, fitToField, FIELD_LENGTH, FIELD_PLATFORMS, initdataDigest, parseDigestValue, platformForFieldLength } from './digest.js';
import { readInitdata, type InitdataLimits } from './source.js';
import { readTeeMeasurement } from './tee.js';

export * from './document.js';
export * from './digest.js';
export * from './source.js';
export * from './tee.js';
export * from './install.js';

export interface VerifyInitdataOptions {
  /** --initdata value: a path or 'auto'. */
  spec: string;
  /** --initdata-digest value (raw digest or TEE field, hex | base64). */
  expectedDigest?: string;
  /** --allow-unmeasured-initdata */
  allowUnmeasured: boolean;
  limits?: Partial<InitdataLimits>;
  /** TEE interface roots; `tsmReportName` only for tests standing in for the kernel (see ReadTeeOptions). */
  tee?: { sysfsRoot?: string; configfsRoot?: string; tsmReportName?: string };
  devRoot?: string;
  logger: Logger;
}

export interface VerifiedInitdata {
  doc: InitdataDocument;
  source: string;
  measured: boolean;
  digestHex: string;
  /** 'flag' or the TEE source the expected value was read from; absent when unmeasured. */
  expectedFrom?: string;
}

function mismatch(source: string, algorithm: string, digest: Buffer, compared: Buffer, label: string, expected: Buffer, from: string): GuestpullError {
  return new GuestpullError(
    ErrorCode.INITDATA_MISMATCH,
    `init-data ${source} does not match the value bound at launch: computed ${algorithm} ${digest.toString('hex')}` +
      ` (compared as ${label}: ${compared.toString('hex')}), expected ${expected.toString('hex')} (from ${from}). ` +
      'The document was not used; the host may have tampered with it, or the wrong document or digest was supplied',
    { source, computed: compared.toString('hex'), expected: expected.toString('hex'), expectedFrom: from },
  );
}

export async function loadVerifiedInitdata(opts: VerifyInitdataOptions): Promise<VerifiedInitdata> {
  const { logger } = opts;
  const { raw, source } = await readInitdata(opts.spec, { limits: opts.limits, devRoot: opts.devRoot, logger });
  const header = parseInitdataHeader(raw, source);
  const digest = initdataDigest(raw, header.algorithm);
  const digestHex = digest.toString('hex');

  let expectedFrom: string | undefined;
  if (opts.expectedDigest !== undefined) {
    const expected = parseDigestValue(opts.expectedDigest);
    const platform = platformForFieldLength(expected.length);
    if (expected.length !== digest.length && !platform) {
      const lengths = FIELD_PLATFORMS.map((p) => `${p} ${FIELD_LENGTH[p]}`).join(', ');
      throw new GuestpullError(
        ErrorCode.CONFIG,
        `--initdata-digest is ${expected.length} bytes: expected the raw ${header.algorithm} digest (${digest.length} bytes) or a TEE field (${lengths} bytes)`,
        { source },
      );
    }
    if (!digestMatches(digest, expected)) {
      const label = expected.length === digest.length ? `the raw ${header.algorithm} digest` : `the ${platform} field, ${expected.length} bytes`;
      const compared = expected.length === digest.length ? digest : fitToField(digest, platform ?? 'none');
      throw mismatch(source, header.algorithm, digest, compared, label, expected, '--initdata-digest');
    }
    expectedFrom = 'flag';
  } else {
    const tee = await readTeeMeasurement({ ...opts.tee, logger });
    if (tee) {
      const compared = fitToField(digest, tee.platform);
      // Same platform, same length: digestMatches compares the fitted field in constant time.
      if (compared.length !== tee.field.length || !digestMatches(digest, tee.field)) {
        throw mismatch(source, header.algorithm, digest, compared, `the ${tee.platform} field, ${compared.length} bytes`, tee.field, tee.source);
      }
      expectedFrom = tee.source;
    } else if (!opts.allowUnmeasured) {
      throw new GuestpullError(
        ErrorCode.CONFIG,
        `init-data ${source}: no expected digest to check it against: this guest exposes no TEE value (TDX sysfs mrconfigid, configfs-tsm) ` +
          'and --initdata-digest was not given. Pass --initdata-digest with the value bound at launch (see `guestpull initdata digest`), ' +
          'or --allow-unmeasured-initdata to run with an unmeasured configuration',
        { source },
      );
    }
  }

  const doc = parseInitdataDocument(raw, source);
  const measured = expectedFrom !== undefined;
  if (measured) {
    logger.info({ source, algorithm: doc.algorithm, digest: digestHex, expectedFrom }, 'init-data digest verified');
  } else {
    logger.warn({ source, algorithm: doc.algorithm, digest: digestHex }, 'init-data is UNMEASURED: its digest was not checked against any TEE value (--allow-unmeasured-initdata)');
  }
  return { doc, source, measured, digestHex, ...(expectedFrom !== undefined ? { expectedFrom } : {}) };
}
