/**
 * Housekeeping around a benchmark run: what runs killed before their cleanup left behind, and
 * pointing the registry helper's storage (it uses os.tmpdir()) into this run's own tmp dir.
 */
import { readdirSync } from 'node:fs';
import path from 'node:path';
import { removeTree } from '../../test/helpers/cleanup.js';

export function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/**
 * Removes what earlier runs left when they were killed before their cleanup (e.g. SIGKILL: tsx
 * kills its child when a relayed Ctrl-C is not acknowledged within 30 ms): their tmp dirs
 * `guestpull-bench-<pid>-*` whose process is gone, unmounting bundles first.
 */
export async function removeAbandonedRuns(tmpBase: string, log: (line: string) => void): Promise<void> {
  for (const name of readdirSync(tmpBase)) {
    const m = /^guestpull-bench-(\d+)-/.exec(name);
    if (m && Number(m[1]) !== process.pid && !alive(Number(m[1]))) {
      log(`bench: removing ${path.join(tmpBase, name)}, left by an earlier run that was killed`);
      await removeTree(path.join(tmpBase, name));
    }
  }
}

/** Runs `fn` with TMPDIR (hence os.tmpdir()) set to `dir`. */
export async function withTmpdir<T>(dir: string, fn: () => Promise<T>): Promise<T> {
  const saved = process.env['TMPDIR'];
  process.env['TMPDIR'] = dir;
  try {
    return await fn();
  } finally {
    if (saved === undefined) delete process.env['TMPDIR'];
    else process.env['TMPDIR'] = saved;
  }
}
