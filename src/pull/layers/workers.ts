/**
 * The layer worker pool. One layer at a time is unpacked in the calling thread (the daemon's), as
 * if there were no pool; a layer unpacked while that one runs (another pull) goes whole to a
 * worker thread (./worker.ts runs `applyLayer`: inflate, hash, parse, write). So a lone pull costs
 * no second JavaScript heap and no copying between threads (measured: a worker for every layer
 * cost ~40 MiB of resident memory and ~15 % more CPU for one image), while concurrent pulls use
 * every core instead of queueing on one thread.
 *
 * - `acquire()` waits for a free slot before the caller opens the blob download, so a queued
 *   layer never holds an idle HTTP response open (the registry or proxy would time it out).
 * - A worker gets the compressed bytes, copied into transferable buffers, with a credit window of
 *   WINDOW bytes: memory in flight per layer is bounded, and a slow disk slows the download.
 * - Abort (deadline, cancel, shutdown) is sent to the worker, which stops its pipeline; the caller
 *   sees the errors it would see in-process. A worker that dies fails its task (INTERNAL) and is
 *   replaced by the next acquire.
 * - Idle workers are unref'd, so a one-shot `guestpull pull` exits when it is done; `close()`
 *   terminates them.
 * - Where no compiled worker script exists (the TypeScript sources run by the test runner), every
 *   slot is the calling thread's: same code, same results.
 */
import { existsSync } from 'node:fs';
import os from 'node:os';
import { fileURLToPath } from 'node:url';
import { Worker } from 'node:worker_threads';
import { ErrorCode, GuestpullError } from '../../errors.js';
import type { ApplyLayerOptions, ApplyLayerResult } from './index.js';
import { deserializeError, serializeError, type FromWorker, type ToWorker } from './messages.js';

/** Young generation of a worker's heap, MiB (see WORKER_LIMITS). */
const YOUNG_MB = 6;

/** Compressed bytes sent to a worker and not yet taken by its pipeline. */
const WINDOW = 2 * 1024 * 1024;

/** Default pool size beside the calling thread: one per other core, at least 1, at most 8. */
export function defaultWorkerCount(): number {
  return Math.max(1, Math.min(8, os.availableParallelism() - 1));
}

const WORKER_URL = new URL('./worker.js', import.meta.url);

/**
 * A worker's V8 heap. The young generation is what grows with the churn of stream chunks: V8's
 * default (16 MiB semi-spaces) costs tens of MiB of RSS per worker for no speed this work can
 * measure. The old generation holds the applier's path sets (a layer of a million entries needs a
 * few hundred MiB), so it is only a ceiling.
 */
const WORKER_LIMITS = { maxYoungGenerationSizeMb: YOUNG_MB, maxOldGenerationSizeMb: 1024 };

/** A slot held by one layer: `apply` it there (at most once; undefined: in the calling thread), then `release`. */
export interface LayerSlot {
  apply?: (opts: ApplyLayerOptions) => Promise<ApplyLayerResult>;
  release(): void;
}

/** What a waiting acquire is given: the calling thread's slot, or a worker (undefined: spawn one). */
type Granted = 'main' | PoolWorker | undefined;

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
  private readonly waiting: { resolve: (g: Granted) => void; reject: (e: unknown) => void }[] = [];
  private busy = 0;
  private mainBusy = false;
  private readonly mainFirst: boolean;
  private taskIds = 0;
  private closed = false;
  readonly inThread: boolean;

  /**
   * `size` workers; with `mainFirst`, one layer at a time is inflated in the calling thread and
   * only layers unpacked beside it go to workers (a lone pull then costs no second thread).
   */
  constructor(
    private readonly size: number = defaultWorkerCount(),
    opts: { mainFirst?: boolean } = {},
  ) {
    this.inThread = size < 1 || !existsSync(fileURLToPath(WORKER_URL));
    this.mainFirst = opts.mainFirst ?? false;
  }

  /**
   * Wait for a free slot (rejects with the signal's reason if it aborts first): with `mainFirst`,
   * the calling thread's own slot (no `apply`) when no other layer is using it, else a worker.
   */
  async acquire(signal?: AbortSignal): Promise<LayerSlot> {
    signal?.throwIfAborted();
    if (this.closed) throw new GuestpullError(ErrorCode.UNAVAILABLE, 'guestpull is shutting down: no layer is unpacked any more');
    if (this.inThread) return { release: () => undefined };
    let got: Granted;
    if (this.mainFirst && !this.mainBusy) {
      this.mainBusy = true;
      got = 'main';
    } else if (this.busy < this.size) {
      this.busy++;
      got = this.idle.pop();
    } else {
      got = await new Promise<Granted>((resolve, reject) => {
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
    let released = false;
    if (got === 'main') {
      return {
        release: () => {
          if (released) return;
          released = true;
          const next = this.waiting.shift();
          if (next) next.resolve('main');
          else this.mainBusy = false;
        },
      };
    }
    const worker = got && !got.dead ? got : this.spawn();
    return {
      apply: (opts) => this.run(worker, opts),
      release: () => {
        if (released) return;
        released = true;
        this.giveBack(worker);
      },
    };
  }

  /**
   * Start workers now (idle, unref'd) until `n` exist (at most the pool size), so that a layer
   * about to need one does not wait for a thread to boot (~100-250 ms) on its pull's critical path.
   */
  prewarm(n: number): void {
    if (this.inThread || this.closed) return;
    while (this.all.size < Math.min(n, this.size)) {
      const w = this.spawn();
      w.worker.unref();
      this.idle.push(w);
    }
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
    const worker = new Worker(WORKER_URL, { resourceLimits: WORKER_LIMITS });
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
    const id = ++this.taskIds;
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
      const onAbort = (): void => send({ id, t: 'abort', err: serializeError(signal?.reason) });
      w.onMessage = (m) => {
        if (m.id !== id) return;
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
          case 'lower': {
            const ask = opts.lower;
            if (ask === undefined) {
              send({ id, t: 'lowerFailed', err: serializeError(new GuestpullError(ErrorCode.INTERNAL, `the worker unpacking layer ${opts.layerDigest} asked for its parents, but it is not speculative`)) });
              break;
            }
            ask(m.rootEntry).then(
              (sw) => {
                if (!settled) send({ id, t: 'lowerReady', sw });
              },
              (e: unknown) => {
                if (!settled) send({ id, t: 'lowerFailed', err: serializeError(e) });
              },
            );
            break;
          }
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
        id,
        t: 'start',
        task: {
          mediaType: opts.mediaType,
          compressedSize: opts.compressedSize,
          diffId: opts.diffId,
          layerDigest: opts.layerDigest,
          rootfs: opts.rootfs,
          image: opts.image,
          ...(opts.limits ? { limits: opts.limits } : {}),
          ...(opts.lower ? { speculative: true } : {}),
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
            send({ id, t: 'data', buf }, [buf]);
            if (inFlight >= WINDOW) await new Promise<void>((r) => (wake = r));
          }
          if (!settled) send({ id, t: 'end' });
        } catch (e) {
          if (!settled) send({ id, t: 'error', err: serializeError(e) });
        }
      })();
    });
  }
}
