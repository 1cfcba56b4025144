/**
 * The one mapping from GuestpullError codes to gRPC status codes (DESIGN.md: "service/ maps codes
 * to gRPC status once"). The kata agent only logs the status, but callers and tests key on it.
 *
 *   INVALID_REFERENCE, INVALID_ARGUMENT -> INVALID_ARGUMENT    bad image_url or bundle_path
 *   ALREADY_EXISTS                      -> ALREADY_EXISTS      bundle already filled / being filled
 *   NOT_FOUND                           -> NOT_FOUND           unknown repository, tag, digest, platform
 *   UNAVAILABLE                         -> UNAVAILABLE         registry/proxy unreachable: retryable
 *   DIGEST_MISMATCH                     -> DATA_LOSS           bytes differ from what was promised
 *   BAD_IMAGE                           -> DATA_LOSS           hostile or malformed image content: the
 *                                                              data received cannot be used, retrying the
 *                                                              same source will not help
 *   UNAUTHENTICATED                     -> UNAUTHENTICATED     missing or rejected registry credentials
 *   PERMISSION_DENIED                   -> PERMISSION_DENIED   blocked by registry config or policy
 *   CONFIG                              -> FAILED_PRECONDITION the daemon's cdh.toml must change first
 *   RESOURCE_EXHAUSTED                  -> RESOURCE_EXHAUSTED  out of space / memory bound
 *   DEADLINE_EXCEEDED                   -> DEADLINE_EXCEEDED
 *   CANCELLED                           -> CANCELLED
 *   UNIMPLEMENTED                       -> UNIMPLEMENTED
 *   INITDATA_MISMATCH                   -> FAILED_PRECONDITION (start-up only; never reaches a call)
 *   INTERNAL                            -> INTERNAL            a bug or unexpected local failure
 */
import { status } from '@grpc/grpc-js';
import type { ErrorCode } from '../errors.js';

const TABLE: Readonly<Record<ErrorCode, status>> = {
  INVALID_REFERENCE: status.INVALID_ARGUMENT,
  INVALID_ARGUMENT: status.INVALID_ARGUMENT,
  ALREADY_EXISTS: status.ALREADY_EXISTS,
  NOT_FOUND: status.NOT_FOUND,
  UNAVAILABLE: status.UNAVAILABLE,
  DIGEST_MISMATCH: status.DATA_LOSS,
  BAD_IMAGE: status.DATA_LOSS,
  UNAUTHENTICATED: status.UNAUTHENTICATED,
  PERMISSION_DENIED: status.PERMISSION_DENIED,
  CONFIG: status.FAILED_PRECONDITION,
  RESOURCE_EXHAUSTED: status.RESOURCE_EXHAUSTED,
  DEADLINE_EXCEEDED: status.DEADLINE_EXCEEDED,
  CANCELLED: status.CANCELLED,
  UNIMPLEMENTED: status.UNIMPLEMENTED,
  INITDATA_MISMATCH: status.FAILED_PRECONDITION,
  INTERNAL: status.INTERNAL,
};

export function toGrpcStatus(code: ErrorCode): status {
  return TABLE[code] ?? status.INTERNAL;
}

/** `DATA_LOSS` for status.DATA_LOSS; for log lines. */
export function statusName(code: status): string {
  return status[code] ?? `STATUS_${code}`;
}
