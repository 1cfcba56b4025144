/**
 * Processes sharing a work dir (the daemon, a one-shot `guestpull pull`, `guestpull gc`):
 *
 * - Every process has an owner tag, `<pid>-<start time>` (field 22 of /proc/<pid>/stat), on what
 *   it leaves in progress (staging directories, pending bundle records). Cleanup removes those only
 *   once their process is gone; the start time tells a reused pid from the original process.
 * - `work_dir/lock` is a short-lived mutex, held while cleanup or garbage collection decides what
 *   to remove and while a pull records which layers it is about to use. It holds the owner tag; a
 *   lock whose process is gone is stale and taken over.
 */
import { readFileSync } from 'node:fs';
import { open, readFile, unlink } from 'node:fs/promises';
import { setTimeout as sleep } from 'node:timers/promises';
import { ErrorCode, GuestpullError } from '../../errors.js';

/** Field 22 (starttime) of /proc/<pid>/stat, or undefined when the process does not exist. */
export function processStart(pid: number): string | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'latin1');
    // The command name (field 2) is in parentheses and may itself contain spaces and parentheses.
    const rest = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return rest[19] ?? '';
  } catch {
    return undefined;
  }
}

let ownTag: string | undefined;

/** This process's owner tag, `<pid>-<start time>`. */
export function ownerTag(): string {
  ownTag ??= `${process.pid}-${processStart(process.pid) ?? '0'}`;
  return ownTag;
}

const TAG = /^(\d{1,10})-(\d{1,20})$/;

/** Whether the process an owner tag names still runs (false for anything that is not a tag). */
export function ownerAlive(tag: string): boolean {
  const m = TAG.exec(tag);
  if (!m) return false;
  if (tag === ownerTag()) return true;
  const start = processStart(Number(m[1]));
  if (start !== undefined) return start === m[2];
  // No /proc: fall back to whether the pid exists at all.
  try {
    process.kill(Number(m[1]), 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

export interface Mutex {
  release(): Promise<void>;
}

/**
 * Take the mutex at `file`: wait (polling) while a live process holds it, up to `waitMs`, then
 * fail with UNAVAILABLE naming the holder. Not re-entrant: callers in one process serialise.
 */
export async function acquireLock(file: string, workDir: string, waitMs: number): Promise<Mutex> {
  const me = ownerTag();
  const deadline = Date.now() + waitMs;
  for (;;) {
    try {
      const fh = await open(file, 'wx', 0o600);
      try {
        await fh.writeFile(`${me}\n`);
      } finally {
        await fh.close();
      }
      let released = false;
      return {
        async release() {
          if (released) return;
          released = true;
          if ((await readFile(file, 'latin1').catch(() => '')).trim() === me) await unlink(file).catch(() => undefined);
        },
      };
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
    }
    const text = await readFile(file, 'latin1').catch(() => undefined);
    if (text === undefined) continue; // released meanwhile
    const holder = text.trim();
    if (holder !== me && ownerAlive(holder)) {
      if (Date.now() >= deadline) {
        throw new GuestpullError(
          ErrorCode.UNAVAILABLE,
          `the layer store in ${workDir} is locked by guestpull process ${holder.split('-')[0] ?? holder} (${file}) for more than ${Math.round(waitMs / 1000)} s; try again later`,
          { workDir, holder },
        );
      }
      await sleep(25);
      continue;
    }
    // Stale (its process is gone), garbage, or ours from before: take it over, unless it changed meanwhile.
    if ((await readFile(file, 'latin1').catch(() => undefined)) === text) await unlink(file).catch(() => undefined);
  }
}

/** Serialises one process's users of a mutex (the file lock is not re-entrant). */
export class LocalQueue {
  private tail: Promise<unknown> = Promise.resolve();

  run<T>(fn: () => Promise<T>): Promise<T> {
    const next = this.tail.then(fn, fn);
    this.tail = next.catch(() => undefined);
    return next;
  }
}
