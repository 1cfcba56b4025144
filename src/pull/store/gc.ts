/**
 * `guestpull gc` for a work dir another process may be using: take the work dir mutex, collect
 * garbage (./cleanup.ts), release. A work dir that does not exist has nothing to collect. For its
 * own process only (the mutex is not re-entrant); a process with the store open uses
 * Store.collectGarbage.
 */
import { realpath, stat } from 'node:fs/promises';
import { ErrorCode, GuestpullError } from '../../errors.js';
import type { Logger } from '../../log.js';
import { collectGarbage, type GcReport } from './cleanup.js';
import { Layout } from './layout.js';
import { acquireLock } from './lock.js';

export interface GcWorkDirOptions {
  workDir: string;
  dropUnused: boolean;
  logger: Logger;
  /** How long to wait for the mutex (default 60 s). */
  lockWaitMs?: number;
}

/** The report, or undefined when `workDir` does not exist. */
export async function gcWorkDir(opts: GcWorkDirOptions): Promise<GcReport | undefined> {
  let root: string;
  try {
    if (!(await stat(opts.workDir)).isDirectory()) {
      throw new GuestpullError(ErrorCode.CONFIG, `work_dir ${opts.workDir} is not a directory`, { workDir: opts.workDir });
    }
    root = await realpath(opts.workDir);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw e;
  }
  const layout = new Layout(root);
  const lock = await acquireLock(layout.lockFile, root, opts.lockWaitMs ?? 60_000);
  try {
    return await collectGarbage(layout, { dropUnused: opts.dropUnused, logger: opts.logger });
  } finally {
    await lock.release();
  }
}
