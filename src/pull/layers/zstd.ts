/**
 * Streaming zstd decompression for `tar+zstd` layers, through zstd-napi's binding to the reference
 * C library (Node 20's zlib has no zstd). A pipeline stage (an async generator): every output chunk
 * is yielded and waits for the next stage, so a bomb inflates only as far as the downstream bound
 * (HashCounter: max_layer_bytes, max_layer_ratio) lets it; zstd-napi's own DecompressStream would
 * push a whole input chunk's output at once (gigabytes for a few KiB of RLE blocks).
 *
 * Concatenated frames (multi-frame, as pigz-style parallel writers produce) and skippable frames
 * are read in sequence. The window is limited to 2^27 bytes (128 MiB, zstd's own default), so a
 * frame cannot make us allocate more; such frames, corrupt data, a truncated last frame or an empty
 * blob are BAD_IMAGE.
 */
import binding from 'zstd-napi/binding.js';
import { ErrorCode, GuestpullError } from '../../errors.js';
import type { LayerContext } from './entry.js';

/** log2 of the largest window a frame may ask for. */
export const ZSTD_WINDOW_LOG_MAX = 27;
/** Output chunk size: fewer native calls and stage hops than zstd's 128 KiB recommendation. */
const OUT_CHUNK = 256 * 1024;

function notZstd(ctx: LayerContext, what: string, cause?: unknown): GuestpullError {
  return new GuestpullError(
    ErrorCode.BAD_IMAGE,
    `layer ${ctx.layer} of ${ctx.image} is not valid zstd: ${what}; the blob is corrupt or its media type is wrong`,
    { image: ctx.image, layer: ctx.layer },
    cause === undefined ? undefined : { cause },
  );
}

/** A pipeline stage: compressed chunks in, decompressed chunks out. */
export function zstdDecompress(ctx: LayerContext): (source: AsyncIterable<Buffer>) => AsyncGenerator<Buffer> {
  return async function* decompress(source: AsyncIterable<Buffer>): AsyncGenerator<Buffer> {
    const dctx = new binding.DCtx();
    dctx.setParameter(binding.DParameter.windowLogMax, ZSTD_WINDOW_LOG_MAX);
    let inFrame = false;
    let input = 0;
    // One output buffer, written again once the consumer asks for more (./inflate.ts).
    const dst = Buffer.allocUnsafeSlow(OUT_CHUNK);
    for await (const chunk of source) {
      input += chunk.length;
      let src: Buffer = chunk;
      for (;;) {
        let ret: number;
        let produced: number;
        let consumed: number;
        try {
          [ret, produced, consumed] = dctx.decompressStream(dst, src);
        } catch (e) {
          throw notZstd(ctx, e instanceof Error ? e.message : String(e), e);
        }
        src = src.subarray(consumed);
        inFrame = ret !== 0;
        if (produced > 0) yield dst.subarray(0, produced);
        if (src.length === 0 && (produced < dst.length || ret === 0)) break;
        if (produced === 0 && consumed === 0) throw notZstd(ctx, 'the decoder made no progress');
      }
    }
    if (input === 0) throw notZstd(ctx, 'the blob is empty');
    if (inFrame) throw notZstd(ctx, 'the data ends in the middle of a frame (truncated)');
  };
}
