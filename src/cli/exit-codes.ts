/**
 * Exit codes of the guestpull CLI: a small, stable table keyed by error code, and the one-line
 * failure format `guestpull: <CODE>: <message>` on stderr.
 *
 *   0  success
 *   1  other failure (INTERNAL, UNIMPLEMENTED, CANCELLED, RESOURCE_EXHAUSTED)
 *   2  usage or bad argument (INVALID_ARGUMENT, INVALID_REFERENCE, ALREADY_EXISTS)
 *   3  configuration (CONFIG)
 *   4  not found (NOT_FOUND)
 *   5  network or timeout (UNAVAILABLE, DEADLINE_EXCEEDED)
 *   6  image data (DIGEST_MISMATCH, BAD_IMAGE)
 *   7  permission or authentication (PERMISSION_DENIED, UNAUTHENTICATED)
 *   8  init-data digest does not match the TEE (INITDATA_MISMATCH): refused to run
 */
import { ErrorCode, GuestpullError } from '../errors.js';

export const EXIT_OK = 0;

const TABLE: Readonly<Record<ErrorCode, number>> = {
  INTERNAL: 1,
  UNIMPLEMENTED: 1,
  CANCELLED: 1,
  RESOURCE_EXHAUSTED: 1,
  INVALID_ARGUMENT: 2,
  INVALID_REFERENCE: 2,
  ALREADY_EXISTS: 2,
  CONFIG: 3,
  NOT_FOUND: 4,
  UNAVAILABLE: 5,
  DEADLINE_EXCEEDED: 5,
  DIGEST_MISMATCH: 6,
  BAD_IMAGE: 6,
  PERMISSION_DENIED: 7,
  UNAUTHENTICATED: 7,
  INITDATA_MISMATCH: 8,
};

export function exitCodeFor(code: ErrorCode): number {
  return TABLE[code] ?? 1;
}

/** The help text's description of the table (kept next to the table so they cannot drift). */
export const EXIT_CODES_HELP = `Exit codes:
  0  success
  1  other failure
  2  usage or bad argument (bad image reference, bundle path, bundle already filled)
  3  configuration (cdh.toml unreadable or invalid, listen address unusable)
  4  not found (repository, tag, digest or platform)
  5  network or timeout (registry or proxy unreachable)
  6  image data (digest mismatch, malformed or hostile image content)
  7  permission or authentication (blocked by configuration, credentials missing or refused)
  8  init-data refused: its digest does not match the value bound into the TEE`;

/** A usage error: exit 2, message points at --help. */
export function usageError(message: string, command?: string): GuestpullError {
  const help = command ? `guestpull ${command} --help` : 'guestpull --help';
  return new GuestpullError(ErrorCode.INVALID_ARGUMENT, `${message} (see ${help})`);
}

/** Write the one failure line to stderr and return the exit code. */
export function reportFailure(err: GuestpullError, stderr: NodeJS.WritableStream = process.stderr): number {
  const oneLine = err.message.replace(/\s*\n\s*/g, ' ');
  stderr.write(`guestpull: ${err.code}: ${oneLine}\n`);
  return exitCodeFor(err.code);
}
