/**
 * The OCI distribution client for one repository at one API base: manifests (bounded, digest
 * computed and, for by-digest pulls, verified) and blobs (streams verified as they pass, resumed
 * with `Range` when the connection breaks mid-body), with 401 challenges answered once per request
 * and registry errors mapped to GuestpullError codes.
 */
import type { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { z } from 'zod';
import { ErrorCode, GuestpullError } from '../../errors.js';
import type { Logger } from '../../log.js';
import { isValidDigest, MANIFEST_ACCEPT, parseDigest, type Descriptor } from '../../oci.js';
import { Authenticator, type Credentials } from './auth.js';
import { classifyManifest, contentTypeOf } from './manifest.js';
import { retryReason, sleep, type HttpResponse, type Transport } from './transport/index.js';
import { digestOf, readBounded, VerifyingStream } from './verify.js';

export type { Credentials } from './auth.js';

export interface RegistryClientOptions {
  /** API base ending in '/', e.g. 'http://127.0.0.1:5000/v2/' or 'https://harbor/v2/proxy-docker.io/'. */
  baseUrl: string;
  repository: string;
  transport: Transport;
  logger: Logger;
  /** The user's image string, for messages. */
  image: string;
  credentials?: Credentials;
  limits?: { manifestBytes?: number; errorBodyBytes?: number; tokenBodyBytes?: number };
}

export interface FetchedManifest {
  digest: string;
  mediaType: string;
  bytes: Buffer;
}

const MiB = 1024 * 1024;
/** distribution's repository name grammar (path components of lowercase alphanumerics and separators). */
const REPOSITORY = /^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:\/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$/;
const TAG = /^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$/;

const ErrorDocument = z.object({
  errors: z.array(z.looseObject({ code: z.string().optional(), message: z.string().optional() })),
});

interface Target {
  kind: 'manifest' | 'blob';
  ref: string;
}

export class RegistryClient {
  readonly image: string;
  readonly repository: string;
  /** scheme://host:port of the API base, for messages. */
  readonly origin: string;
  private readonly base: URL;
  private readonly transport: Transport;
  private readonly logger: Logger;
  private readonly auth: Authenticator;
  private readonly manifestBytes: number;
  private readonly errorBodyBytes: number;

  constructor(opts: RegistryClientOptions) {
    try {
      this.base = new URL(opts.baseUrl.endsWith('/') ? opts.baseUrl : `${opts.baseUrl}/`);
    } catch {
      throw new GuestpullError(ErrorCode.CONFIG, `invalid registry API base URL ${JSON.stringify(opts.baseUrl)}`, { image: opts.image });
    }
    if (!REPOSITORY.test(opts.repository) || opts.repository.length > 255) {
      throw new GuestpullError(ErrorCode.INVALID_REFERENCE, `invalid repository name ${JSON.stringify(opts.repository.slice(0, 300))} in image ${opts.image}`, {
        image: opts.image,
      });
    }
    this.image = opts.image;
    this.repository = opts.repository;
    this.origin = this.base.origin;
    this.transport = opts.transport;
    this.logger = opts.logger;
    this.manifestBytes = opts.limits?.manifestBytes ?? 4 * MiB;
    this.errorBodyBytes = opts.limits?.errorBodyBytes ?? MiB;
    this.auth = new Authenticator({
      transport: opts.transport,
      logger: opts.logger,
      registry: this.base,
      repository: opts.repository,
      image: opts.image,
      tokenBodyBytes: opts.limits?.tokenBodyBytes ?? MiB,
      ...(opts.credentials ? { credentials: opts.credentials } : {}),
    });
  }

  async getManifest(reference: string, signal?: AbortSignal): Promise<FetchedManifest> {
    const started = performance.now();
    const byDigest = reference.includes(':');
    if (byDigest ? !isValidDigest(reference) : !TAG.test(reference)) {
      throw new GuestpullError(ErrorCode.INVALID_REFERENCE, `invalid ${byDigest ? 'digest' : 'tag'} ${JSON.stringify(reference.slice(0, 200))} in image ${this.image}`, {
        image: this.image,
      });
    }
    const what = `manifest ${reference} of ${this.image} from ${this.origin}`;
    const url = this.url('manifests', reference);
    const { res, bytes, overflow } = await this.readManifest(url, reference, what, signal);
    if (overflow) throw this.tooLarge(what, 'is larger');
    const digest = digestOf(bytes, byDigest ? parseDigest(reference).algorithm : 'sha256');
    if (byDigest && digest !== reference) {
      throw new GuestpullError(ErrorCode.DIGEST_MISMATCH, `${what}: digest mismatch: the content's digest is ${digest}, expected ${reference}`, {
        image: this.image,
        endpoint: this.origin,
      });
    }
    const { mediaType } = classifyManifest(bytes, contentTypeOf(res.headers['content-type']), what);
    this.logger.debug({ image: this.image, reference, digest, mediaType, bytes: bytes.length, ms: Math.round(performance.now() - started) }, 'manifest fetched');
    return { digest, mediaType, bytes };
  }

  /**
   * GET a manifest and read its body (bounded). A body that breaks off (reset, cut, idle timeout)
   * is fetched again from the start, up to `transport.maxAttempts` reads in all; the transport has
   * already retried failures before the response head.
   */
  private async readManifest(
    url: string,
    reference: string,
    what: string,
    signal?: AbortSignal,
  ): Promise<{ res: HttpResponse; bytes: Buffer; overflow: boolean }> {
    for (let attempt = 1; ; attempt++) {
      const res = await this.send(url, { accept: MANIFEST_ACCEPT }, { kind: 'manifest', ref: reference }, signal);
      const announced = contentLength(res);
      if (announced !== undefined && announced > this.manifestBytes) {
        res.body.destroy();
        throw this.tooLarge(what, `announces ${announced} bytes`);
      }
      try {
        const { bytes, overflow } = await readBounded(res.body, this.manifestBytes);
        return { res, bytes, overflow };
      } catch (e) {
        res.body.destroy();
        const reason = retryReason(e);
        if (signal?.aborted || reason === undefined) throw e;
        if (attempt >= this.transport.maxAttempts) throw this.gaveUp(what, `reading it failed ${attempt} times`, e);
        const delayMs = this.transport.backoff(attempt);
        this.logger.info({ image: this.image, reference, attempt: attempt + 1, reason, delayMs }, 'manifest download interrupted; fetching it again');
        await sleep(delayMs, signal, url);
      }
    }
  }

  /** The last error of a download that was given up, with what was being fetched and how often it broke. */
  private gaveUp(what: string, how: string, e: unknown): GuestpullError {
    const g = e instanceof GuestpullError ? e : undefined;
    const last = e instanceof Error ? e.message : String(e);
    return new GuestpullError(g?.code ?? ErrorCode.UNAVAILABLE, `${what}: ${how}, giving up; the last time: ${last}`, { image: this.image, endpoint: this.origin, ...(g?.context ?? {}) }, { cause: e });
  }

  /**
   * A stream of exactly `desc.size` bytes whose digest is `desc.digest`; it errors (DIGEST_MISMATCH)
   * otherwise. When the body breaks off (reset, idle timeout), the download goes on where it
   * stopped: `Range: bytes=<received>-` (unless the server said `Accept-Ranges: none`); a 206 is
   * appended, a 200 (Range ignored) is read from the start and its first <received> bytes are
   * dropped. A close-delimited body (neither Content-Length nor chunked) that ends before
   * `desc.size` counts as broken off too: nothing else tells a truncating middlebox from the end.
   * The consumer sees one seamless stream and the digest covers exactly the bytes it received,
   * each once. Interruptions in a row without progress count against `transport.maxAttempts`.
   */
  async getBlob(desc: Descriptor, signal?: AbortSignal): Promise<Readable> {
    const started = performance.now();
    parseDigest(desc.digest);
    const what = `blob ${desc.digest} of ${this.image} from ${this.origin}`;
    const url = this.url('blobs', desc.digest);
    const res = await this.send(url, {}, { kind: 'blob', ref: desc.digest }, signal);
    this.checkBlobLength(res, desc, what);
    const verifier = new VerifyingStream({
      digest: desc.digest,
      size: desc.size,
      what,
      onVerified: (bytes) =>
        this.logger.debug({ image: this.image, digest: desc.digest, bytes, ms: Math.round(performance.now() - started) }, 'blob fetched'),
    });
    // When the consumer goes away, stop at once: whichever body is being read, a backoff sleep, a resume request.
    const stop = new AbortController();
    const current = { body: res.body };
    verifier.once('close', () => {
      stop.abort();
      current.body.destroy();
    });
    const sig = signal ? AbortSignal.any([signal, stop.signal]) : stop.signal;
    // Errors reach the consumer through `verifier`; the promise itself has nobody to tell.
    pipeline(this.blobChunks(res, current, desc, url, what, sig), verifier).catch(() => undefined);
    return verifier;
  }

  private checkBlobLength(res: HttpResponse, desc: Descriptor, what: string): void {
    const announced = contentLength(res);
    if (announced !== undefined && announced !== desc.size) {
      res.body.destroy();
      throw new GuestpullError(
        ErrorCode.DIGEST_MISMATCH,
        `${what}: Content-Length mismatch: the response announces ${announced} bytes, the descriptor promises ${desc.size}`,
        { image: this.image, endpoint: this.origin, layer: desc.digest },
      );
    }
  }

  /** The blob's bytes in order, each once, across as many responses as interruptions need. */
  private async *blobChunks(
    first: HttpResponse,
    current: { body: Readable },
    desc: Descriptor,
    url: string,
    what: string,
    signal: AbortSignal,
  ): AsyncGenerator<Buffer> {
    let res = first;
    const ranges = !/\bnone\b/i.test(headerText(first.headers['accept-ranges']));
    let received = 0;
    /** Bytes at the start of the current body that the consumer already has. */
    let skip = 0;
    /** Interruptions in a row without a byte of progress. */
    let streak = 0;
    let attempt = 1;
    try {
      for (;;) {
        const before = received;
        let reason: string;
        let failure: unknown;
        try {
          for await (const c of res.body) {
            let chunk = c as Buffer;
            if (skip > 0) {
              const n = Math.min(skip, chunk.length);
              skip -= n;
              chunk = chunk.subarray(n);
              if (chunk.length === 0) continue;
            }
            received += chunk.length;
            yield chunk;
          }
          // A clean end: complete, or a framed body the registry says is all there is (the verifier judges).
          if (received >= desc.size || !closeDelimited(res)) return;
          reason = 'body ended early (connection closed)';
        } catch (e) {
          res.body.destroy();
          // Everything is here: let the verifier judge it.
          if (received >= desc.size) return;
          const why = retryReason(e);
          if (signal.aborted || why === undefined) throw e;
          reason = why;
          failure = e;
        }
        streak = received > before ? 1 : streak + 1;
        if (streak >= this.transport.maxAttempts) {
          // A truncated close-delimited body: the verifier reports the missing bytes.
          if (failure === undefined) return;
          throw this.gaveUp(what, `download broke off ${attempt} times, the last ${streak} without progress (at byte ${received} of ${desc.size})`, failure);
        }
        attempt++;
        const delayMs = this.transport.backoff(streak);
        this.logger.info(
          { image: this.image, layer: desc.digest, attempt, received, bytes: desc.size, reason, delayMs, range: ranges },
          'blob download interrupted; resuming',
        );
        await sleep(delayMs, signal, url);
        res = await this.resumeBlob(url, desc, received, ranges, what, signal);
        current.body = res.body;
        skip = res.statusCode === 206 ? 0 : received;
      }
    } finally {
      res.body.destroy();
    }
  }

  /** Ask for the rest of a blob from byte `from`: a 206 starting exactly there, or a whole 200. */
  private async resumeBlob(url: string, desc: Descriptor, from: number, ranges: boolean, what: string, signal?: AbortSignal): Promise<HttpResponse> {
    const headers: Record<string, string> = ranges ? { range: `bytes=${from}-` } : {};
    const res = await this.send(url, headers, { kind: 'blob', ref: desc.digest }, signal, ranges ? [200, 206] : [200]);
    if (res.statusCode === 200) {
      this.checkBlobLength(res, desc, what);
      return res;
    }
    const cr = parseContentRange(headerText(res.headers['content-range']));
    if (!cr || cr.start !== from || cr.end !== desc.size - 1 || (cr.total !== undefined && cr.total !== desc.size)) {
      res.body.destroy();
      throw new GuestpullError(
        ErrorCode.UNAVAILABLE,
        `${what}: asked for bytes ${from}-${desc.size - 1} to resume an interrupted download, the registry sent Content-Range ` +
          `${JSON.stringify(headerText(res.headers['content-range']).slice(0, 100))}; try again`,
        { image: this.image, endpoint: this.origin, layer: desc.digest },
      );
    }
    return res;
  }

  /** A whole small blob (e.g. an image config), refused before fetching when larger than `maxBytes`. */
  async getBlobBytes(desc: Descriptor, maxBytes: number, signal?: AbortSignal): Promise<Buffer> {
    if (desc.size > maxBytes) {
      throw new GuestpullError(
        ErrorCode.BAD_IMAGE,
        `blob ${desc.digest} (${desc.mediaType}) of ${this.image} is ${desc.size} bytes, more than the ${maxBytes} allowed for it`,
        { image: this.image },
      );
    }
    const stream = await this.getBlob(desc, signal);
    const { bytes } = await readBounded(stream, maxBytes);
    return bytes;
  }

  private url(kind: 'manifests' | 'blobs', ref: string): string {
    return new URL(`${this.repository}/${kind}/${ref}`, this.base).href;
  }

  private tooLarge(what: string, how: string): GuestpullError {
    return new GuestpullError(ErrorCode.BAD_IMAGE, `${what} ${how} than the ${this.manifestBytes} bytes allowed for a manifest; refusing it`, {
      image: this.image,
      endpoint: this.origin,
    });
  }

  /** GET with auth: one retry after answering a 401 challenge; a status not in `ok` becomes an error. */
  private async send(url: string, headers: Record<string, string>, target: Target, signal?: AbortSignal, ok: readonly number[] = [200]): Promise<HttpResponse> {
    const sig = signal ? { signal } : {};
    const first = await this.auth.authorization(signal);
    let res = await this.request(url, withAuth(headers, first), target, sig);
    if (res.statusCode === 401) {
      await readBounded(res.body, this.errorBodyBytes).catch(() => undefined);
      const retry = await this.auth.answer(res.headers['www-authenticate'], first, signal);
      res = await this.request(url, withAuth(headers, retry), target, sig);
    }
    if (!ok.includes(res.statusCode)) throw await this.statusError(res, target);
    return res;
  }

  /** One transport request; a network failure (after the transport's retries) says what was being fetched. */
  private async request(url: string, headers: Record<string, string>, target: Target, sig: { signal?: AbortSignal }): Promise<HttpResponse> {
    try {
      return await this.transport.request({ url, headers, ...sig });
    } catch (e) {
      if (!(e instanceof GuestpullError) || e.code !== ErrorCode.UNAVAILABLE || sig.signal?.aborted) throw e;
      throw new GuestpullError(e.code, `${target.kind} ${target.ref} of ${this.image}: ${e.message}`, { image: this.image, ...e.context }, { cause: e });
    }
  }

  private async statusError(res: HttpResponse, target: Target): Promise<GuestpullError> {
    let quoted = '';
    let codes: string[] = [];
    try {
      const { bytes } = await readBounded(res.body, this.errorBodyBytes);
      const doc = ErrorDocument.safeParse(JSON.parse(bytes.toString('utf8')));
      if (doc.success) {
        codes = doc.data.errors.map((e) => e.code ?? '').filter((c) => c !== '');
        const msgs = doc.data.errors
          .slice(0, 3)
          .map((e) => [e.code, e.message].filter((x) => x !== undefined && x !== '').join(': ').slice(0, 300))
          .filter((m) => m !== '');
        if (msgs.length) quoted = `; the registry said: ${msgs.map((m) => JSON.stringify(m)).join(', ')}`;
      }
    } catch {
      // Not JSON, or the body failed: the status code alone has to do.
    }
    const status = res.statusCode;
    const has = (...c: string[]): boolean => codes.some((x) => c.includes(x));
    const subject = `${target.kind} ${target.ref}`;
    const where = `${this.repository} at ${this.origin}`;
    const ctx = { image: this.image, endpoint: this.origin };
    if (status === 404 || has('MANIFEST_UNKNOWN', 'NAME_UNKNOWN', 'BLOB_UNKNOWN')) {
      return new GuestpullError(ErrorCode.NOT_FOUND, `${subject} not found in ${where} (image ${this.image})${quoted}`, ctx);
    }
    if (status === 401 || has('UNAUTHORIZED')) {
      return new GuestpullError(ErrorCode.UNAUTHENTICATED, `${subject} of ${where}: HTTP ${status} after authenticating; ${this.auth.refusalHint()}${quoted}`, ctx);
    }
    if (status === 403 || has('DENIED')) {
      return new GuestpullError(ErrorCode.PERMISSION_DENIED, `${subject} of ${where}: access denied (HTTP ${status}) for image ${this.image}${quoted}`, ctx);
    }
    if (status === 429 || status >= 500 || has('TOOMANYREQUESTS', 'UNAVAILABLE')) {
      return new GuestpullError(ErrorCode.UNAVAILABLE, `${subject} of ${where}: the registry answered HTTP ${status}; try again later${quoted}`, ctx);
    }
    if (has('NAME_INVALID', 'TAG_INVALID')) {
      return new GuestpullError(ErrorCode.INVALID_REFERENCE, `${subject} of ${where}: the registry refused the name (HTTP ${status}) of image ${this.image}${quoted}`, ctx);
    }
    return new GuestpullError(ErrorCode.UNAVAILABLE, `${subject} of ${where}: unexpected HTTP ${status} from the registry${quoted}`, ctx);
  }
}

function withAuth(headers: Record<string, string>, authorization: string | undefined): Record<string, string> {
  return authorization === undefined ? headers : { ...headers, authorization };
}

function headerText(v: string | string[] | undefined): string {
  return Array.isArray(v) ? v.join(', ') : (v ?? '');
}

/** `bytes <start>-<end>/<total or *>`, or undefined. */
function parseContentRange(v: string): { start: number; end: number; total?: number } | undefined {
  const m = /^\s*bytes\s+(\d{1,15})-(\d{1,15})\/(\d{1,15}|\*)\s*$/i.exec(v);
  if (!m) return undefined;
  const start = Number(m[1]);
  const end = Number(m[2]);
  if (end < start) return undefined;
  return m[3] === '*' ? { start, end } : { start, end, total: Number(m[3]) };
}

/** Neither Content-Length nor chunked: the body ends when the connection does. */
function closeDelimited(res: HttpResponse): boolean {
  return contentLength(res) === undefined && !/\bchunked\b/i.test(headerText(res.headers['transfer-encoding']));
}

function contentLength(res: HttpResponse): number | undefined {
  const v = res.headers['content-length'];
  if (typeof v !== 'string' || !/^\d+$/.test(v)) return undefined;
  return Number(v);
}
