/**
 * A layer worker thread: inflates one layer at a time and hashes it (./inflate.ts: gunzip or zstd,
 * the diff_id digest, the size and ratio bounds), and sends the tar stream back to the thread that
 * applies it.
 *
 * Why the split is here: Node's gunzip runs on the thread pool but needs its JavaScript thread for
 * every output chunk. In one thread with the tar applier (thousands of synchronous file system
 * calls) inflation waits whenever the applier is busy, and the two never use two cores. Here the
 * JavaScript thread does little but hash and hand chunks on, so inflation never waits for it.
 *
 * Both directions are credit-windowed: compressed input is credited back as the pipeline takes it,
 * and output stops when WINDOW bytes are unacknowledged by the main thread.
 */
import { Readable, Writable } from 'node:stream';
import { parentPort } from 'node:worker_threads';
import { ErrorCode, GuestpullError } from '../../errors.js';
import { inflateInto } from './inflate.js';
import { deserializeError, serializeError, type FromWorker, type ToWorker } from './messages.js';

/** Tar bytes sent to the main thread and not yet taken by its applier. */
const WINDOW = 4 * 1024 * 1024;
/** Decompressed bytes gunzip may hold ahead of the sink. */
const READ_AHEAD = 1024 * 1024;

/** The compressed input of one task, fed by `data` messages. */
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

/** The tar stream out: every chunk copied into its own buffer and transferred. */
class PortSink extends Writable {
  private unacked = 0;
  private blocked: (() => void) | undefined;
  constructor(private readonly send: (buf: ArrayBuffer) => void) {
    super({ highWaterMark: 0 });
  }
  override _write(chunk: Buffer, _enc: BufferEncoding, cb: (e?: Error | null) => void): void {
    const ab = new ArrayBuffer(chunk.byteLength);
    new Uint8Array(ab).set(chunk);
    this.unacked += ab.byteLength;
    this.send(ab);
    if (this.unacked < WINDOW) cb();
    else this.blocked = () => cb();
  }
  credit(bytes: number): void {
    this.unacked -= bytes;
    if (this.blocked && this.unacked < WINDOW) {
      const f = this.blocked;
      this.blocked = undefined;
      f();
    }
  }
}

const port = parentPort;
if (!port) throw new Error('src/pull/layers/worker.ts runs only as a worker thread');
const post = (m: FromWorker, transfer: ArrayBuffer[] = []): void => port.postMessage(m, transfer);

let current: { id: number; source: PortSource; sink: PortSink; controller: AbortController } | undefined;

port.on('message', (m: ToWorker) => {
  if (m.t !== 'start' && m.id !== current?.id) return; // a task that has ended
  switch (m.t) {
    case 'start': {
      const { id } = m;
      const controller = new AbortController();
      const source = new PortSource((bytes) => post({ id, t: 'credit', bytes }));
      const sink = new PortSink((buf) => post({ id, t: 'data', buf }, [buf]));
      const task = { id, source, sink, controller };
      current = task;
      inflateInto(source, sink, m.task, READ_AHEAD, controller.signal).then(
        (result) => {
          if (current === task) current = undefined;
          post({ id, t: 'done', result });
        },
        (e: unknown) => {
          if (current === task) current = undefined;
          source.destroy();
          const reason: unknown = controller.signal.aborted ? controller.signal.reason : e;
          post({ id, t: 'fail', err: serializeError(reason) });
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
    case 'credit':
      current?.sink.credit(m.bytes);
      break;
    case 'error':
      current?.source.destroy(deserializeError(m.err));
      break;
    case 'abort':
      current?.controller.abort(deserializeError(m.err));
      break;
    default: {
      const never: never = m;
      post({ id: -1, t: 'fail', err: serializeError(new GuestpullError(ErrorCode.INTERNAL, `layer worker got an unknown message ${JSON.stringify(never)}`)) });
    }
  }
});
