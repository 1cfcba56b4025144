/**
 * `api.ImagePullService/PullImage`: one call → one `puller.pull()` with an AbortSignal that fires
 * when the client cancels, when the call's deadline passes, or when the server is shutting down.
 * Calls run concurrently (the puller coalesces identical ones). Every call is logged once.
 */
import type * as grpc from '@grpc/grpc-js';
import { z } from 'zod';
import { ErrorCode, GuestpullError, asGuestpullError } from '../errors.js';
import type { Logger } from '../log.js';
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

const MAX_FIELD = 4096;
const ImagePullRequest = z.object({
  image_url: z.string().min(1, 'image_url is empty').max(MAX_FIELD, `image_url is longer than ${MAX_FIELD} bytes`),
  bundle_path: z.string().min(1, 'bundle_path is empty').max(MAX_FIELD, `bundle_path is longer than ${MAX_FIELD} bytes`),
});

/** Milliseconds until a grpc-js deadline, or undefined for none. */
function msUntil(deadline: grpc.Deadline): number | undefined {
  const at = deadline instanceof Date ? deadline.getTime() : deadline;
  if (!Number.isFinite(at)) return undefined;
  return Math.max(0, at - Date.now());
}

export function pullImageHandler(deps: PullImageDeps): grpc.handleUnaryCall<unknown, { manifest_digest: string }> {
  return (call, callback) => {
    const started = Date.now();
    const parsed = ImagePullRequest.safeParse(call.request);
    if (!parsed.success) {
      const msg = `PullImage: ${parsed.error.issues.map((i) => i.message).join('; ')}`;
      deps.logger.warn({ event: 'pull_image', status: 'INVALID_ARGUMENT', ms: Date.now() - started }, msg);
      callback({ code: toGrpcStatus(ErrorCode.INVALID_ARGUMENT), details: msg });
      return;
    }
    const { image_url: image, bundle_path: bundle } = parsed.data;
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
