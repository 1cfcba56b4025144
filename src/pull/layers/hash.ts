/**
 * The digest-and-bound stage between decompression and the tar parser: hashes every uncompressed
 * byte (for the diff_id check; unless the decompressor hashes them itself: ./gunzip.ts), counts
 * them, and stops a layer that inflates past its bounds (absolute size, and the
 * uncompressed/compressed ratio once more than 1 MiB has flowed).
 */
import { createHash, type Hash } from 'node:crypto';
import { ErrorCode, GuestpullError } from '../../errors.js';
import { limitHint, type LayerContext, type LayerLimits } from './entry.js';

/** The ratio bound only applies once this many bytes have been inflated. */
export const RATIO_GRACE_BYTES = 1024 * 1024;

/** Use `stage()` as a pipeline stage (an async generator: it passes each chunk on untouched and unbuffered). */
export class HashCounter {
  bytes = 0;
  private readonly hash: Hash | null;

  constructor(
    algorithm: 'sha256' | 'sha512',
    private readonly compressedSize: number,
    private readonly limits: Pick<LayerLimits, 'maxUncompressedBytes' | 'maxRatio'>,
    private readonly ctx: LayerContext,
    /** false for uncompressed layers: the ratio means nothing there */
    private readonly checkRatio: boolean,
    /** false: count and bound only, the stage before hashes (digestHex() then throws) */
    hash = true,
  ) {
    this.hash = hash ? createHash(algorithm) : null;
  }

  stage(): (source: AsyncIterable<Buffer>) => AsyncGenerator<Buffer> {
    const self = this;
    return async function* count(source: AsyncIterable<Buffer>): AsyncGenerator<Buffer> {
      for await (const chunk of source) {
        self.take(chunk);
        yield chunk;
      }
    };
  }

  private take(chunk: Buffer): void {
    this.bytes += chunk.length;
    if (this.bytes > this.limits.maxUncompressedBytes) {
      throw new GuestpullError(
        ErrorCode.BAD_IMAGE,
        `layer ${this.ctx.layer} of ${this.ctx.image} inflates to more than ${this.limits.maxUncompressedBytes} bytes ${limitHint('maxUncompressedBytes')}; refusing it`,
        { image: this.ctx.image, layer: this.ctx.layer },
      );
    }
    if (this.checkRatio && this.bytes > RATIO_GRACE_BYTES && this.bytes / Math.max(1, this.compressedSize) > this.limits.maxRatio) {
      throw new GuestpullError(
        ErrorCode.BAD_IMAGE,
        `layer ${this.ctx.layer} of ${this.ctx.image} inflates more than ${this.limits.maxRatio} times its compressed size of ${this.compressedSize} bytes: a decompression bomb or a wrong descriptor size ${limitHint('maxRatio')}`,
        { image: this.ctx.image, layer: this.ctx.layer },
      );
    }
    this.hash?.update(chunk);
  }

  /** The hex digest; call once, after the stream has finished. */
  digestHex(): string {
    if (this.hash === null) throw new GuestpullError(ErrorCode.INTERNAL, `layer ${this.ctx.layer}: this counter was made not to hash`);
    return this.hash.digest('hex');
  }
}
