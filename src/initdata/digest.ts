/**
 * The init-data digest: the document's named hash over its raw bytes as delivered, and how it is
 * bound into each TEE's launch field (truncated or zero-padded at the end to the field length:
 * SNP HOST_DATA 32, TDX MRCONFIGID 48, Arm CCA personalization value 64, IBM SE 256 bytes).
 */
import { createHash, timingSafeEqual } from 'node:crypto';
import { ErrorCode, GuestpullError } from '../errors.js';
import type { InitdataAlgorithm } from './document.js';

export type TeePlatform = 'none' | 'snp' | 'tdx' | 'cca' | 'se';
export type FieldPlatform = Exclude<TeePlatform, 'none'>;

export const FIELD_LENGTH: Readonly<Record<FieldPlatform, number>> = Object.freeze({ snp: 32, tdx: 48, cca: 64, se: 256 });
export const FIELD_PLATFORMS: readonly FieldPlatform[] = ['snp', 'tdx', 'cca', 'se'];
export const DIGEST_LENGTH: Readonly<Record<InitdataAlgorithm, number>> = Object.freeze({ sha256: 32, sha384: 48, sha512: 64 });

export function initdataDigest(raw: Buffer, algorithm: InitdataAlgorithm): Buffer {
  return createHash(algorithm).update(raw).digest();
}

/** Truncate or zero-pad at the end to the platform's field length; 'none' returns a copy unchanged. */
export function fitToField(digest: Buffer, platform: TeePlatform): Buffer {
  if (platform === 'none') return Buffer.from(digest);
  const out = Buffer.alloc(FIELD_LENGTH[platform]);
  digest.copy(out, 0, 0, Math.min(out.length, digest.length));
  return out;
}

/** The TEE platform whose field has this length, if any. */
export function platformForFieldLength(length: number): FieldPlatform | undefined {
  return FIELD_PLATFORMS.find((p) => FIELD_LENGTH[p] === length);
}

/** hex (any case, optional 0x) or base64 (standard or url-safe, padding optional). */
export function parseDigestValue(value: string): Buffer {
  const v = value.trim();
  const hex = /^0[xX]/.test(v) ? v.slice(2) : v;
  if (hex.length > 0 && hex.length % 2 === 0 && /^[0-9a-fA-F]+$/.test(hex)) return Buffer.from(hex, 'hex');
  const b64 = /^[A-Za-z0-9+/]+={0,2}$/.test(v) || /^[A-Za-z0-9_-]+={0,2}$/.test(v);
  if (b64) {
    const body = v.replace(/=+$/, '');
    const padded = v.length !== body.length;
    if (body.length % 4 !== 1 && (!padded || v.length % 4 === 0)) {
      const buf = Buffer.from(body.replace(/-/g, '+').replace(/_/g, '/'), 'base64');
      // Reject non-canonical encodings (stray low bits in the last character).
      if (buf.toString('base64').replace(/=+$/, '') === body.replace(/-/g, '+').replace(/_/g, '/') && buf.length > 0) {
        return buf;
      }
    }
  }
  throw new GuestpullError(
    ErrorCode.CONFIG,
    `init-data digest value ${JSON.stringify(v.length > 80 ? v.slice(0, 80) + '…' : v)} is neither hex nor base64; ` +
      'pass the value printed by `guestpull initdata digest` (hex, optional 0x, or base64)',
  );
}

/**
 * True when `expected` equals the raw digest, or equals fitToField(digest, p) for the platform whose
 * field length is expected.length. Every candidate is compared in full, in constant time.
 */
export function digestMatches(digest: Buffer, expected: Buffer): boolean {
  let ok = 0;
  if (expected.length === digest.length) ok |= Number(timingSafeEqual(digest, expected));
  const p = platformForFieldLength(expected.length);
  if (p) ok |= Number(timingSafeEqual(fitToField(digest, p), expected));
  return ok === 1;
}
