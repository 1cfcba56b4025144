/**
 * The layer worker pool: `applyLayer` run in worker threads (./worker.ts), a few at a time.
 *
 * Unpacking is CPU work (inflate, two hash passes, tar parsing, thousands of file system calls);
 * in one thread, four images pulled at once would queue behind each other on the main thread
 * and leave the guest's other cores idle. With the pool, the main thread downloads and verifies
 * blob digests and serves RPCs; each layer is applied in a worker.
 *
 * - `acquire()` waits for a free worker before the caller opens the blob download, so a queued
 *   layer never holds an idle HTTP response open (the registry or proxy would time it out).
 * - The compressed bytes are copied into transferable buffers and sent with a credit window of
 *   WINDOW bytes: memory in flight per layer is bounded, and a slow disk slows the download.
 * - Abort (deadline, cancel, shutdown) is sent to the worker, which stops its pipeline; the caller
 *   sees the same errors it would in-process. A worker that dies fails its task (INTERNAL) and is
 *   replaced by the next acquire.
 * - Idle workers are unref'd, so a one-shot `guestpull pull` exits when it is done; `close()`
 *   terminates them.
 * - Where no compiled worker script exists (the TypeScript sources run by the test runner), the
 *   pool applies layers in the calling thread: same code, same results, no parallelism.
 */
import { existsSync } from 'node:fs';
import os from 'node:os';
import { fileURLToPath } from 'node:url';
import { Worker } from 'node:worker_threads';
import { ErrorCode, GuestpullError } from '../../errors.js';
import { applyLayer, type ApplyLayerOptions, type ApplyLayerResult } from './index.js';
import { deserializeError, serializeError, type FromWorker, type ToWorker } from './messages.js';

/** Compressed bytes sent to a worker and not yet taken by its pipeline. */
const WINDOW = 2 * 1024 * 1024;

/** Default pool size: the guest's cores, at least 2 (downloads and disk waits overlap), at most 8. */
export function defaultWorkerCount(): number {
  return Math.max(2, Math.min(8, os.availableParallelism()));
}

const WORKER_URL = new URL('./worker.js', import.meta.url);

/** A worker slot held by one layer; `apply` at most once, then `release`. */
export interface LayerSlot {
  apply(opts: ApplyLayerOptions): Promise<ApplyLayerResult>;
  release(): void;
}

interface PoolWorker {
  worker: Worker;
  dead: boolean;
  /** The running task's message handler. */
  onMessage?: (m: FromWorker) => void;
  onExit?: (why: string) => void;
}

export class LayerWorkers {
  private readonly idle: PoolWorker[] = [];
  private readonly all = new Set<PoolWorker>();
  private readonly waiting: { resolve: (w: PoolWorker | undefined) => void; reject: (e: unknown) => void }[] = [];
  private busy = 0;
  private closed = false;
  readonly inThread: boolean;

  constructor(private readonly size: number = defaultWorkerCount()) {
    this.inThread = size < 1 || !existsSync(fileURLToPath(WORKER_URL));
  }

  /** Wait for a free worker (rejects with the signal's reason if it aborts first). */
  async acquire(signal?: AbortSignal): Promise<LayerSlot> {
    signal?.throwIfAborted();
    if (this.closed) throw new GuestpullError(ErrorCode.UNAVAILABLE, 'guestpull is shutting down: no layer is unpacked any more');
    if (this.inThread) return { apply: (o) => applyLayer(o), release: () => undefined };
    let w: PoolWorker | undefined;
    if (this.busy < this.size) {
      this.busy++;
      w = this.idle.pop();
    } else {
      w = await new Promise<PoolWorker | undefined>((resolve, reject) => {
        const entry = { resolve, reject };
        this.waiting.push(entry);
        signal?.addEventListener(
          'abort',
          () => {
            const i = this.waiting.indexOf(entry);
            if (i >= 0) {
              this.waiting.splice(i, 1);
              reject(signal.reason);
            }
          },
          { once: true },
        );
      });
    }
    const worker = w && !w.dead ? w : this.spawn();
    let released = false;
    return {
      apply: (opts) => this.run(worker, opts),
      release: () => {
        if (released) return;
        released = true;
        this.giveBack(worker);
      },
    };
  }

  /** Terminate every worker; pending acquires fail. */
  async close(): Promise<void> {
    this.closed = true;
    for (const w of this.waiting.splice(0)) w.reject(new GuestpullError(ErrorCode.UNAVAILABLE, 'guestpull is shutting down'));
    await Promise.all([...this.all].map((w) => w.worker.terminate().catch(() => undefined)));
    this.all.clear();
    this.idle.length = 0;
  }

  private spawn(): PoolWorker {
    const worker = new Worker(WORKER_URL);
    const pw: PoolWorker = { worker, dead: false };
    worker.on('message', (m: FromWorker) => pw.onMessage?.(m));
    worker.on('error', (e) => {
      pw.dead = true;
      pw.onExit?.(`it failed: ${e.message}`);
    });
    worker.on('exit', (code) => {
      pw.dead = true;
      this.all.delete(pw);
      pw.onExit?.(`it exited with code ${code}`);
    });
    this.all.add(pw);
    return pw;
  }

  private giveBack(w: PoolWorker): void {
    w.onMessage = undefined;
    w.onExit = undefined;
    const next = this.waiting.shift();
    if (next) {
      next.resolve(w.dead ? undefined : w);
      return;
    }
    this.busy--;
    if (w.dead) return;
    w.worker.unref();
    this.idle.push(w);
  }

  /** One layer in worker `w`: pump the source in, wait for the outcome. */
  private run(w: PoolWorker, opts: ApplyLayerOptions): Promise<ApplyLayerResult> {
    const { source, signal, logger } = opts;
    const send = (m: ToWorker, transfer: ArrayBuffer[] = []): void => w.worker.postMessage(m, transfer);
    w.worker.ref();
    return new Promise<ApplyLayerResult>((resolve, reject) => {
      let inFlight = 0;
      let wake: (() => void) | undefined;
      let settled = false;
      const finish = (err: unknown, result?: ApplyLayerResult): void => {
        if (settled) return;
        settled = true;
        signal?.removeEventListener('abort', onAbort);
        wake?.();
        if (err !== undefined) {
          source.destroy();
          reject(err);
        } else resolve(result!);
      };
      const onAbort = (): void => send({ t: 'abort', err: serializeError(signal?.reason) });
      w.onMessage = (m) => {
        switch (m.t) {
          case 'credit':
            inFlight -= m.bytes;
            if (inFlight < WINDOW && wake) {
              const f = wake;
              wake = undefined;
              f();
            }
            break;
          case 'log':
            logger.debug(m.fields, m.msg);
            break;
          case 'done':
            finish(undefined, m.result);
            break;
          case 'fail':
            finish(deserializeError(m.err));
            break;
        }
      };
      w.onExit = (why) =>
        finish(new GuestpullError(ErrorCode.INTERNAL, `the worker unpacking layer ${opts.layerDigest} of ${opts.image} stopped: ${why}`, { image: opts.image, layer: opts.layerDigest }));
      if (w.dead) {
        w.onExit('it had already stopped');
        return;
      }
      signal?.addEventListener('abort', onAbort, { once: true });
      send({
        t: 'start',
        task: {
          mediaType: opts.mediaType,
          compressedSize: opts.compressedSize,
          diffId: opts.diffId,
          layerDigest: opts.layerDigest,
          rootfs: opts.rootfs,
          image: opts.image,
          ...(opts.limits ? { limits: opts.limits } : {}),
        },
      });
      if (signal?.aborted) onAbort();
      void (async () => {
        try {
          for await (const chunk of source) {
            if (settled) return;
            const b = chunk as Buffer;
            const buf = b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength) as ArrayBuffer;
            inFlight += b.byteLength;
            send({ t: 'data', buf }, [buf]);
            if (inFlight >= WINDOW) await new Promise<void>((r) => (wake = r));
          }
          if (!settled) send({ t: 'end' });
        } catch (e) {
          if (!settled) send({ t: 'error', err: serializeError(e) });
        }
      })();
    });
  }
}
