/**
 * `api.ImagePullService/PullImage`: one call → one `puller.pull()` with an AbortSignal that fires
 * when the client cancels, when the call's deadline passes, or when the server is shutting down.
 * Calls run concurrently (the puller coalesces identical ones). Every call is logged once.
 *
 * The request is checked at this edge: both fields valid UTF-8 on the wire (./request-bytes.ts),
 * non-empty, at most 4096 bytes each (UTF-8, as received); the puller checks the rest (reference
 * grammar, bundle path rules).
 */
import type * as grpc from '@grpc/grpc-js';
import { z } from 'zod';
import { ErrorCode, GuestpullError, asGuestpullError } from '../errors.js';
import type { Logger } from '../log.js';
import { MalformedRequest, guardedDeserializer } from './request-bytes.js';
import { statusName, toGrpcStatus } from './status.js';

/** What the service needs from a puller; the real `Puller` (src/pull) satisfies it. */
export interface ImagePuller {
  pull(imageUrl: string, bundlePath: string, opts?: { signal?: AbortSignal }): Promise<{ manifestDigest: string }>;
}

/** Pulls in progress, so stop() can wait for them and then abort them. */
export interface InflightPull {
  controller: AbortController;
  done: Promise<void>;
}

export interface PullImageDeps {
  puller: ImagePuller;
  logger: Logger;
  inflight: Set<InflightPull>;
  isStopping(): boolean;
}

/** Bytes (UTF-8) per field: PATH_MAX for bundle_path; far beyond any real image reference. */
export const MAX_FIELD_BYTES = 4096;
const field = (name: string) =>
  z
    .string()
    .min(1, `${name} is empty`)
    .superRefine((s, ctx) => {
      const bytes = Buffer.byteLength(s, 'utf8');
      if (bytes > MAX_FIELD_BYTES) ctx.addIssue({ code: 'custom', message: `${name} is ${bytes} bytes, longer than the ${MAX_FIELD_BYTES} allowed` });
    });
const ImagePullRequest = z.object({ image_url: field('image_url'), bundle_path: field('bundle_path') });

/** The string fields of ImagePullRequest by field number (api.proto), for the raw UTF-8 check. */
const STRING_FIELDS: ReadonlyMap<number, string> = new Map([
  [1, 'image_url'],
  [2, 'bundle_path'],
]);

/** PullImage's request deserializer wrapped so bad UTF-8 or bad bytes reach the handler as a MalformedRequest. */
export function pullImageDeserializer(decode: (buf: Buffer) => unknown): (buf: Buffer) => unknown {
  return guardedDeserializer(decode, STRING_FIELDS);
}

/** The request, or the INVALID_ARGUMENT message for it. */
function parseRequest(request: unknown): { ok: true; image: string; bundle: string } | { ok: false; message: string } {
  if (request instanceof MalformedRequest) return { ok: false, message: `PullImage: ${request.problem}` };
  const parsed = ImagePullRequest.safeParse(request);
  if (!parsed.success) return { ok: false, message: `PullImage: ${parsed.error.issues.map((i) => i.message).join('; ')}` };
  return { ok: true, image: parsed.data.image_url, bundle: parsed.data.bundle_path };
}

/** Milliseconds until a grpc-js deadline, or undefined for none. */
function msUntil(deadline: grpc.Deadline): number | undefined {
  const at = deadline instanceof Date ? deadline.getTime() : deadline;
  if (!Number.isFinite(at)) return undefined;
  return Math.max(0, at - Date.now());
}

export function pullImageHandler(deps: PullImageDeps): grpc.handleUnaryCall<unknown, { manifest_digest: string }> {
  return (call, callback) => {
    const started = Date.now();
    const parsed = parseRequest(call.request);
    if (!parsed.ok) {
      const msg = `${parsed.message}; send image_url and bundle_path as UTF-8 strings of 1 to ${MAX_FIELD_BYTES} bytes`;
      deps.logger.warn({ event: 'pull_image', status: 'INVALID_ARGUMENT', ms: Date.now() - started }, msg);
      callback({ code: toGrpcStatus(ErrorCode.INVALID_ARGUMENT), details: msg });
      return;
    }
    const { image, bundle } = parsed;
    if (deps.isStopping()) {
      callback({ code: toGrpcStatus(ErrorCode.UNAVAILABLE), details: `guestpull is shutting down; retry the pull of ${image}` });
      return;
    }

    const controller = new AbortController();
    const deadlineMs = msUntil(call.getDeadline());
    const deadlineAbort = (): void =>
      controller.abort(
        new GuestpullError(ErrorCode.DEADLINE_EXCEEDED, `deadline of ${deadlineMs} ms passed while pulling ${image}`, { image }),
      );
    const timer = deadlineMs === undefined ? undefined : setTimeout(deadlineAbort, deadlineMs);
    const onCancelled = (): void => {
      // grpc-js also ends a call whose deadline passed; report that as a deadline, not a cancel.
      if (deadlineMs !== undefined && Date.now() - started >= deadlineMs) deadlineAbort();
      else controller.abort(new GuestpullError(ErrorCode.CANCELLED, `the client cancelled the pull of ${image}`, { image }));
    };
    call.on('cancelled', onCancelled);

    const entry: InflightPull = { controller, done: Promise.resolve() };
    entry.done = run().finally(() => {
      clearTimeout(timer);
      call.removeListener('cancelled', onCancelled);
      deps.inflight.delete(entry);
    });
    deps.inflight.add(entry);

    async function run(): Promise<void> {
      try {
        const { manifestDigest } = await deps.puller.pull(image, bundle, { signal: controller.signal });
        deps.logger.info({ event: 'pull_image', image, bundle, status: 'OK', manifestDigest, ms: Date.now() - started }, 'PullImage done');
        callback(null, { manifest_digest: manifestDigest });
      } catch (e) {
        // When we aborted the pull, the abort reason says why (cancel, deadline, shutdown).
        const reason: unknown = controller.signal.aborted ? controller.signal.reason : undefined;
        const err = reason instanceof GuestpullError ? reason : asGuestpullError(e);
        const code = toGrpcStatus(err.code);
        deps.logger.warn(
          { event: 'pull_image', image, bundle, status: statusName(code), code: err.code, err: err.message, ms: Date.now() - started },
          'PullImage failed',
        );
        callback({ code, details: err.message });
      }
    }
  };
}
