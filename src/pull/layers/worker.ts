/**
 * A layer worker thread: runs `applyLayer` (decompress, hash, parse, write: everything but the
 * download) for one layer at a time, so that the CPU work of several layers and images spreads
 * over the guest's cores while the main thread only serves RPCs and downloads.
 *
 * The compressed bytes arrive as transferred ArrayBuffers; every chunk handed to the pipeline is
 * credited back to the main thread, which keeps at most a small window in flight (backpressure
 * across the thread boundary). The main thread verifies the blob digest and reports a failure as
 * an `error` message, which fails the source stream here exactly as a failed download does
 * in-process.
 */
import { Readable } from 'node:stream';
import { parentPort } from 'node:worker_threads';
import { ErrorCode, GuestpullError } from '../../errors.js';
import { applyLayer } from './index.js';
import { deserializeError, serializeError, type FromWorker, type ToWorker } from './messages.js';

/** The source stream of one task, fed by `data` messages. */
class PortSource extends Readable {
  private owed = 0;
  constructor(private readonly credit: (bytes: number) => void) {
    super({ highWaterMark: 1024 * 1024 });
  }
  override _read(): void {
    if (this.owed > 0) {
      this.credit(this.owed);
      this.owed = 0;
    }
  }
  feed(buf: Buffer): void {
    if (this.push(buf)) this.credit(buf.length);
    else this.owed += buf.length;
  }
}

const port = parentPort;
if (!port) throw new Error('src/pull/layers/worker.ts runs only as a worker thread');
const post = (m: FromWorker): void => port.postMessage(m);

let current: { source: PortSource; controller: AbortController } | undefined;

port.on('message', (m: ToWorker) => {
  switch (m.t) {
    case 'start': {
      const controller = new AbortController();
      const source = new PortSource((bytes) => post({ t: 'credit', bytes }));
      current = { source, controller };
      const { task } = m;
      applyLayer({
        ...task,
        source,
        signal: controller.signal,
        logger: { debug: (fields: Record<string, unknown>, msg: string) => post({ t: 'log', fields, msg }) },
      }).then(
        (result) => {
          current = undefined;
          post({ t: 'done', result });
        },
        (e: unknown) => {
          current = undefined;
          source.destroy();
          post({ t: 'fail', err: serializeError(e) });
        },
      );
      break;
    }
    case 'data':
      current?.source.feed(Buffer.from(m.buf));
      break;
    case 'end':
      current?.source.push(null);
      break;
    case 'error':
      current?.source.destroy(deserializeError(m.err));
      break;
    case 'abort':
      current?.controller.abort(deserializeError(m.err));
      break;
    default: {
      const never: never = m;
      post({ t: 'fail', err: serializeError(new GuestpullError(ErrorCode.INTERNAL, `layer worker got an unknown message ${JSON.stringify(never)}`)) });
    }
  }
});
