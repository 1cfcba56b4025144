/**
 * The layer slots: MAIN_SLOTS layers at a time are unpacked in the calling thread (the daemon's),
 * whose own work is the tar apply: inflating and the diff_id hash run on libuv's pool; a layer
 * beyond those goes whole to a worker thread (./worker.ts runs `applyLayer`), if the pool has any
 * (`[image] unpack_threads`, default: one per core beyond MAIN_SLOTS). So one pull, even of an
 * image whose layers are unpacked side by side (speculative builds), costs no second JavaScript
 * heap and no copying between threads, while more cores still serve concurrent pulls.
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
 *   slot is the calling thread's (MAIN_SLOTS at a time): same code, same results.
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

/**
 * Layers the calling thread unpacks at once. Inflating and the diff_id hash run on the libuv pool
 * (./gunzip.ts), so one JavaScript thread keeps two cores busy with two layers: measured on 2 cores,
 * medium image, one pull: 2 here and no worker 3.0-3.2 s, 1.2 s less CPU and 141-149 MiB, against
 * 1 here and a worker 3.2-3.4 s and 186-195 MiB (a second V8 heap, every byte copied across).
 */
export const MAIN_SLOTS = 2;

/** Default pool size beside the calling thread's MAIN_SLOTS: one per core beyond two, at most 8. */
export function defaultWorkerCount(): number {
  return Math.max(0, Math.min(8, os.availableParallelism() - MAIN_SLOTS));
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
  /** Layers being unpacked in the calling thread now, and how many may be at once. */
  private mainInUse = 0;
  private readonly mainSlots: number;
  private readonly mainFirst: boolean;
  private taskIds = 0;
  private closed = false;
  readonly inThread: boolean;

  /**
   * `size` workers; with `mainFirst`, `mainSlots` layers at a time are unpacked in the calling
   * thread and only layers beyond those go to workers.
   */
  constructor(
    private readonly size: number = defaultWorkerCount(),
    opts: { mainFirst?: boolean; mainSlots?: number } = {},
  ) {
    this.inThread = size < 1 || !existsSync(fileURLToPath(WORKER_URL));
    this.mainFirst = opts.mainFirst ?? false;
    this.mainSlots = Math.max(1, opts.mainSlots ?? 1);
  }

  /**
   * Wait for a free slot (rejects with the signal's reason if it aborts first): with `mainFirst`,
   * the calling thread's own slot (no `apply`) when no other layer is using it, else a worker.
   */
  async acquire(signal?: AbortSignal): Promise<LayerSlot> {
    signal?.throwIfAborted();
    if (this.closed) throw new GuestpullError(ErrorCode.UNAVAILABLE, 'guestpull is shutting down: no layer is unpacked any more');
    let got: Granted;
    if ((this.mainFirst || this.inThread) && this.mainInUse < this.mainSlots) {
      this.mainInUse++;
      got = 'main';
    } else if (!this.inThread && this.busy < this.size) {
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
          else this.mainInUse--;
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
