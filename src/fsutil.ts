/**
 * Small filesystem primitives shared by every module that publishes files: one atomic write; and
 * an lstat that says "nothing there" as null.
 */
import { randomBytes } from 'node:crypto';
import { lstatSync, type Stats } from 'node:fs';
import { open, rename, unlink } from 'node:fs/promises';
import path from 'node:path';

/** Temp files of writeFileAtomic are named `<file>.tmp-<hex>`: cleanup code may match on it. */
export const ATOMIC_TEMP_MARK = '.tmp-';

/**
 * Write `data` to `file` atomically: a temp file `<file>.tmp-<random>` in the same directory is
 * created exclusively, chmod'ed to `mode` (not subject to umask), written, fsync'ed and renamed over
 * `file`; then the directory is fsync'ed (best effort). On failure the temp file is removed and the
 * original error is rethrown, so a reader sees the old file or the whole new one, never half.
 */
export async function writeFileAtomic(file: string, data: string | Buffer, mode = 0o644): Promise<void> {
  const tmp = `${file}${ATOMIC_TEMP_MARK}${randomBytes(6).toString('hex')}`;
  let created = false;
  try {
    const fh = await open(tmp, 'wx', mode);
    created = true;
    try {
      await fh.chmod(mode);
      await fh.writeFile(data);
      await fh.sync();
    } finally {
      await fh.close();
    }
    await rename(tmp, file);
    created = false;
  } finally {
    if (created) await unlink(tmp).catch(() => undefined);
  }
  await syncDir(path.dirname(file));
}

/** fsync a directory so a rename in it is durable; some filesystems refuse (EINVAL): best effort. */
export async function syncDir(dir: string): Promise<void> {
  try {
    const fh = await open(dir, 'r');
    try {
      await fh.sync();
    } finally {
      await fh.close();
    }
  } catch {
    // the rename itself has happened either way
  }
}

/** lstat(2) of `p`, or null when nothing is there (ENOENT, or a parent that is not a directory). */
export function lstatOrNull(p: string): Stats | null {
  try {
    return lstatSync(p, { throwIfNoEntry: false }) ?? null;
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOTDIR') return null;
    throw e;
  }
}
