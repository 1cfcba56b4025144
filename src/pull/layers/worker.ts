/**
 * A layer worker thread: runs `applyLayer` (inflate, hash, parse, write: everything but the
 * download) for one layer at a time, for layers unpacked while the daemon's own thread is busy
 * with another (./workers.ts), so concurrent pulls spread over the guest's cores.
 *
 * The compressed bytes arrive as transferred ArrayBuffers; every chunk handed to the pipeline is
 * credited back to the main thread, which keeps at most a small window in flight (backpressure
 * across the thread boundary). The main thread verifies the blob digest and reports a failed
 * download as an `error` message, which fails the source stream here exactly as it would
 * in-process.
 */
import { Readable } from 'node:stream';
import { parentPort } from 'node:worker_threads';
import { ErrorCode, GuestpullError } from '../../errors.js';
import { applyLayer, type LowerSwitch } from './index.js';
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

interface Current {
  id: number;
  source: PortSource;
  controller: AbortController;
  /** The answer to a `lower` request, while one is out. */
  lower?: { resolve: (sw: LowerSwitch) => void; reject: (e: unknown) => void };
}

let current: Current | undefined;

port.on('message', (m: ToWorker) => {
  if (m.t !== 'start' && m.id !== current?.id) return; // a task that has ended
  switch (m.t) {
    case 'start': {
      const { id } = m;
      const controller = new AbortController();
      const source = new PortSource((bytes) => post({ id, t: 'credit', bytes }));
      const task: Current = { id, source, controller };
      current = task;
      const { speculative, ...layer } = m.task;
      const lower = (rootEntry: boolean): Promise<LowerSwitch> =>
        new Promise<LowerSwitch>((resolve, reject) => {
          task.lower = { resolve, reject };
          post({ id, t: 'lower', rootEntry });
        });
      applyLayer({
        ...layer,
        ...(speculative ? { lower } : {}),
        source,
        signal: controller.signal,
        logger: { debug: (fields: Record<string, unknown>, msg: string) => post({ id, t: 'log', fields, msg }) },
      }).then(
        (result) => {
          if (current === task) current = undefined;
          post({ id, t: 'done', result });
        },
        (e: unknown) => {
          if (current === task) current = undefined;
          source.destroy();
          post({ id, t: 'fail', err: serializeError(e) });
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
    case 'abort': {
      const err = deserializeError(m.err);
      current?.controller.abort(err);
      current?.lower?.reject(err);
      break;
    }
    case 'lowerReady':
      current?.lower?.resolve(m.sw);
      if (current) current.lower = undefined;
      break;
    case 'lowerFailed':
      current?.lower?.reject(deserializeError(m.err));
      if (current) current.lower = undefined;
      break;
    default: {
      const never: never = m;
      post({ id: -1, t: 'fail', err: serializeError(new GuestpullError(ErrorCode.INTERNAL, `layer worker got an unknown message ${JSON.stringify(never)}`)) });
    }
  }
});
