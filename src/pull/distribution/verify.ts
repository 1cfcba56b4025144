/**
 * Content checks on the way in: a Transform that hashes bytes as they pass and fails the stream
 * (DIGEST_MISMATCH) on one byte too many, or before 'end' when bytes are missing or the digest
 * differs; and a bounded reader for small bodies (manifests, tokens, error documents).
 */
import { createHash, type Hash } from 'node:crypto';
import { Transform, type Readable, type TransformCallback } from 'node:stream';
import { ErrorCode, GuestpullError } from '../../errors.js';
import { parseDigest } from '../../oci.js';

export interface VerifyTarget {
  digest: string;
  size: number;
  /** How to name the content in messages, e.g. "blob sha256:… of docker.io/library/busybox:latest from https://…". */
  what: string;
  /** Called once the content has passed both checks (for logging). */
  onVerified?: (bytes: number) => void;
}

export class VerifyingStream extends Transform {
  private readonly hash: Hash;
  private readonly hex: string;
  private readonly algorithm: string;
  private seen = 0;

  constructor(private readonly target: VerifyTarget) {
    super();
    const d = parseDigest(target.digest);
    this.algorithm = d.algorithm;
    this.hex = d.hex;
    this.hash = createHash(d.algorithm);
  }

  override _transform(chunk: Buffer, _enc: BufferEncoding, cb: TransformCallback): void {
    this.seen += chunk.length;
    if (this.seen > this.target.size) {
      cb(
        new GuestpullError(
          ErrorCode.DIGEST_MISMATCH,
          `${this.target.what}: received more than the ${this.target.size} bytes its descriptor promises`,
          { digest: this.target.digest },
        ),
      );
      return;
    }
    this.hash.update(chunk);
    cb(null, chunk);
  }

  override _flush(cb: TransformCallback): void {
    if (this.seen !== this.target.size) {
      cb(
        new GuestpullError(
          ErrorCode.DIGEST_MISMATCH,
          `${this.target.what}: received ${this.seen} bytes, its descriptor promises ${this.target.size}`,
          { digest: this.target.digest },
        ),
      );
      return;
    }
    const got = this.hash.digest('hex');
    if (got !== this.hex) {
      cb(
        new GuestpullError(
          ErrorCode.DIGEST_MISMATCH,
          `${this.target.what}: digest mismatch: the content's digest is ${this.algorithm}:${got}, expected ${this.target.digest}`,
          { digest: this.target.digest },
        ),
      );
      return;
    }
    this.target.onVerified?.(this.seen);
    cb();
  }
}

/** Digest of bytes in the given algorithm, as `algorithm:hex`. */
export function digestOf(bytes: Buffer, algorithm: 'sha256' | 'sha512' = 'sha256'): string {
  return `${algorithm}:${createHash(algorithm).update(bytes).digest('hex')}`;
}

/**
 * Read a whole body of at most `max` bytes. When it is longer, the stream is destroyed and the
 * result is `{ overflow: true }` with the first `max` bytes (enough to quote an error document).
 */
export async function readBounded(body: Readable, max: number): Promise<{ bytes: Buffer; overflow: boolean }> {
  const chunks: Buffer[] = [];
  let total = 0;
  for await (const chunk of body) {
    const b = chunk as Buffer;
    if (total + b.length > max) {
      chunks.push(b.subarray(0, max - total));
      body.destroy();
      return { bytes: Buffer.concat(chunks), overflow: true };
    }
    chunks.push(b);
    total += b.length;
  }
  return { bytes: Buffer.concat(chunks), overflow: false };
}

