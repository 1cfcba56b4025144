/**
 * Coalescing of identical concurrent pulls, with refcounted cancellation. Pulls are keyed by
 * bundle: the first caller for a bundle starts the work under an AbortController of its own;
 * callers asking for the same image in the same bundle join it. Each caller's own signal rejects
 * only that caller, at once, with its own abort reason; the work is aborted only when the last
 * caller has gone. Another image for a busy bundle is ALREADY_EXISTS.
 *
 * A bundle stays busy until its work has settled, cleanup included: a new caller for the same
 * image while abandoned work is still unwinding waits for it and then starts afresh.
 */
import { ErrorCode, GuestpullError } from '../errors.js';

interface Entry<T> {
  key: string;
  image: string;
  controller: AbortController;
  work: Promise<T>;
  /** Settles (never rejects) once the work has settled and the entry has left the map. */
  done: Promise<void>;
  callers: number;
  settled: boolean;
}

export interface CoalescerHooks {
  /** A caller joined work already running for `key`. */
  onJoin?(key: string, image: string, callers: number): void;
  /** The last caller left: the work for `key` is being aborted. */
  onAbandon?(key: string, image: string): void;
}

function noop(): void {}

/** `start()`, with a synchronous throw turned into a rejection. */
function begin<T>(start: (signal: AbortSignal) => Promise<T>, signal: AbortSignal): Promise<T> {
  try {
    return start(signal);
  } catch (e) {
    return Promise.reject(e);
  }
}

export class Coalescer<T> {
  private readonly running = new Map<string, Entry<T>>();

  constructor(private readonly hooks: CoalescerHooks = {}) {}

  /** Keys with work in progress (abandoned work still unwinding included). */
  get size(): number {
    return this.running.size;
  }

  /** Callers currently waiting on the work for `key` (0 when none or abandoned). */
  callers(key: string): number {
    return this.running.get(key)?.callers ?? 0;
  }

  /**
   * The result of `start` for (key, image), shared with identical concurrent callers. Rejects with
   * `callerSignal.reason` as soon as that signal aborts, with ALREADY_EXISTS when `key` is busy
   * with another image, else as the work does.
   */
  async run(key: string, image: string, callerSignal: AbortSignal | undefined, start: (signal: AbortSignal) => Promise<T>): Promise<T> {
    for (;;) {
      callerSignal?.throwIfAborted();
      const entry = this.running.get(key);
      if (entry === undefined) return this.attach(this.launch(key, image, start), callerSignal);
      if (entry.image !== image) {
        throw new GuestpullError(
          ErrorCode.ALREADY_EXISTS,
          entry.callers > 0
            ? `bundle ${key} is being filled by a pull of ${entry.image}; use another bundle path for ${image}`
            : `bundle ${key} is being cleaned up after a cancelled pull of ${entry.image}; retry, or use another bundle path for ${image}`,
          { image, bundle: key },
        );
      }
      if (entry.callers > 0) {
        this.hooks.onJoin?.(key, image, entry.callers + 1);
        return this.attach(entry, callerSignal);
      }
      // Same image, but that work was abandoned and is unwinding: wait for it, then start anew.
      await waitOrAbort(entry.done, callerSignal);
    }
  }

  /** Resolves once no work is running (or after `timeoutMs`); for a graceful close. */
  async drain(timeoutMs: number): Promise<boolean> {
    const all = Promise.all([...this.running.values()].map((e) => e.done)).then(() => true);
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<boolean>((resolve) => (timer = setTimeout(() => resolve(false), timeoutMs)));
    try {
      return await Promise.race([all, timeout]);
    } finally {
      clearTimeout(timer);
    }
  }

  private launch(key: string, image: string, start: (signal: AbortSignal) => Promise<T>): Entry<T> {
    const controller = new AbortController();
    const work = begin(start, controller.signal);
    const entry: Entry<T> = { key, image, controller, work, done: Promise.resolve(), callers: 0, settled: false };
    entry.done = work.then(noop, noop).then(() => {
      entry.settled = true;
      if (this.running.get(key) === entry) this.running.delete(key);
    });
    this.running.set(key, entry);
    return entry;
  }

  private attach(entry: Entry<T>, callerSignal: AbortSignal | undefined): Promise<T> {
    entry.callers++;
    return new Promise<T>((resolve, reject) => {
      let left = false;
      const leave = (): void => {
        if (left) return;
        left = true;
        callerSignal?.removeEventListener('abort', onAbort);
        entry.callers--;
        if (entry.callers === 0 && !entry.settled && !entry.controller.signal.aborted) {
          this.hooks.onAbandon?.(entry.key, entry.image);
          entry.controller.abort(
            new GuestpullError(ErrorCode.CANCELLED, `pull of ${entry.image} into ${entry.key} stopped: all callers cancelled`, {
              image: entry.image,
              bundle: entry.key,
            }),
          );
        }
      };
      const onAbort = (): void => {
        leave();
        reject(callerSignal?.reason);
      };
      callerSignal?.addEventListener('abort', onAbort, { once: true });
      entry.work.then(
        (v) => {
          entry.settled = true;
          leave();
          resolve(v);
        },
        (e: unknown) => {
          entry.settled = true;
          leave();
          reject(e);
        },
      );
    });
  }
}

/** Wait for `p` (which never rejects) unless `signal` aborts first: then reject with its reason. */
function waitOrAbort(p: Promise<void>, signal: AbortSignal | undefined): Promise<void> {
  if (!signal) return p;
  return new Promise<void>((resolve, reject) => {
    const onAbort = (): void => reject(signal.reason);
    signal.addEventListener('abort', onAbort, { once: true });
    p.then(() => {
      signal.removeEventListener('abort', onAbort);
      resolve();
    }, noop);
  });
}
