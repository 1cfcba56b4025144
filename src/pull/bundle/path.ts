/**
 * The bundle directory the caller names (`bundle_path` of PullImage): validation of the path
 * itself, the "is it free" check before we write into it, and atomic file writes into it.
 *
 * The path comes from the kata agent (`/run/kata-containers/<container-id>`), i.e. from outside
 * this module's trust: it must be absolute, lexically clean of `..`, and must not be a symlink.
 */
import { lstat } from 'node:fs/promises';
import path from 'node:path';
import { writeFileAtomic as atomicWrite } from '../../fsutil.js';
import { ErrorCode, GuestpullError, asGuestpullError } from '../../errors.js';

/** Linux PATH_MAX. */
export const MAX_BUNDLE_PATH = 4096;

function invalid(bundlePath: string, why: string): GuestpullError {
  const shown = JSON.stringify(bundlePath.length > 200 ? `${bundlePath.slice(0, 200)}…` : bundlePath);
  return new GuestpullError(
    ErrorCode.INVALID_ARGUMENT,
    `invalid bundle path ${shown}: ${why}; pass an absolute directory path such as /run/kata-containers/<container-id>`,
  );
}

/**
 * Check a caller-supplied bundle path and return it normalised (duplicate and trailing slashes and
 * `.` components removed). Refuses: empty, NUL bytes, longer than 4096, not absolute, any `..`
 * component, and `/` itself (the bundle would be the guest's root directory).
 */
export function validateBundlePath(bundlePath: string): string {
  if (typeof bundlePath !== 'string' || bundlePath === '') throw invalid('', 'it is empty');
  if (bundlePath.length > MAX_BUNDLE_PATH) throw invalid(bundlePath, `it is longer than ${MAX_BUNDLE_PATH} characters`);
  if (bundlePath.includes('\0')) throw invalid(bundlePath.replaceAll('\0', '\\0'), 'it contains a NUL byte');
  if (!bundlePath.startsWith('/')) throw invalid(bundlePath, 'it is not absolute');
  if (bundlePath.split('/').includes('..')) throw invalid(bundlePath, 'it contains a ".." component');
  const norm = path.posix.normalize(bundlePath);
  const clean = norm.length > 1 && norm.endsWith('/') ? norm.slice(0, -1) : norm;
  if (clean === '/') throw invalid(bundlePath, 'it names the root directory');
  return clean;
}

async function lstatOrUndefined(p: string): Promise<Awaited<ReturnType<typeof lstat>> | undefined> {
  try {
    return await lstat(p);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw e;
  }
}

/**
 * Make sure we may create `<bundle>/config.json` and `<bundle>/rootfs`: fine when the bundle does
 * not exist yet or exists as a real directory without them. A symlink or non-directory at the
 * bundle path is INVALID_ARGUMENT; an existing config.json or rootfs (of any type, dangling
 * symlinks included) is ALREADY_EXISTS.
 */
export async function checkBundleFree(bundlePath: string): Promise<void> {
  try {
    const st = await lstatOrUndefined(bundlePath);
    if (st === undefined) return;
    if (st.isSymbolicLink()) throw invalid(bundlePath, 'it is a symbolic link');
    if (!st.isDirectory()) throw invalid(bundlePath, 'it exists and is not a directory');
    const taken: string[] = [];
    for (const name of ['config.json', 'rootfs']) {
      if ((await lstatOrUndefined(path.join(bundlePath, name))) !== undefined) taken.push(name);
    }
    if (taken.length > 0) {
      throw new GuestpullError(
        ErrorCode.ALREADY_EXISTS,
        `bundle ${bundlePath} already holds ${taken.join(' and ')}; use a fresh bundle path or remove the old bundle`,
        { bundle: bundlePath },
      );
    }
  } catch (e) {
    if (e instanceof GuestpullError) throw e;
    if ((e as NodeJS.ErrnoException).code === 'ENOTDIR') throw invalid(bundlePath, 'a parent component is not a directory');
    const g = asGuestpullError(e);
    throw new GuestpullError(g.code, `cannot inspect bundle ${bundlePath}: ${g.message}`, { bundle: bundlePath }, { cause: e });
  }
}

/**
 * Write `data` to `file` atomically (see src/fsutil.ts), with the error naming the file.
 */
export async function writeFileAtomic(file: string, data: string | Buffer, mode = 0o644): Promise<void> {
  try {
    await atomicWrite(file, data, mode);
  } catch (e) {
    const g = asGuestpullError(e);
    throw new GuestpullError(g.code, `cannot write ${file}: ${g.message}`, { file }, { cause: e });
  }
}
