/**
 * The bundle directory the caller names (`bundle_path` of PullImage): validation of the path
 * itself, the "is it free" check before we write into it, and atomic file writes into it.
 *
 * The path comes from the kata agent (`/run/kata-containers/<container-id>`), i.e. from outside
 * this module's trust: it must be absolute, lexically clean of `..`, below one of the allowed
 * bundle roots (`--bundle-root`, when given), and neither it nor any existing ancestor may be a
 * symlink, so the lexical path is the real one and the root check means what it says.
 */
import { realpathSync, statSync } from 'node:fs';
import { lstat, realpath } from 'node:fs/promises';
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

/** The flag that sets the bundle roots, for messages. */
export const BUNDLE_ROOT_FLAG = '--bundle-root';

/**
 * The allowed bundle roots as given (`--bundle-root`, repeatable), made absolute, normalised and
 * resolved through symlinks once at start-up, duplicates dropped. A root that is missing or not a
 * directory is a CONFIG error naming it.
 */
export function resolveBundleRoots(roots: readonly string[]): string[] {
  const out: string[] = [];
  for (const given of roots) {
    if (given === '' || given.includes('\0') || !path.isAbsolute(given)) {
      throw new GuestpullError(ErrorCode.CONFIG, `bundle root ${JSON.stringify(given)} (${BUNDLE_ROOT_FLAG}) must be an absolute directory path`, { bundleRoot: given });
    }
    let real: string;
    try {
      real = realpathSync(given);
      if (!statSync(real).isDirectory()) throw Object.assign(new Error('not a directory'), { code: 'ENOTDIR' });
    } catch (e) {
      const why = (e as NodeJS.ErrnoException).code === 'ENOENT' ? 'does not exist' : (e as Error).message;
      throw new GuestpullError(
        ErrorCode.CONFIG,
        `bundle root ${given} (${BUNDLE_ROOT_FLAG}) ${why}; create it before starting guestpull or fix the flag`,
        { bundleRoot: given },
        { cause: e },
      );
    }
    if (!out.includes(real)) out.push(real);
  }
  return out;
}

/** Whether `bundle` (validated, normalised) lies strictly below `root` (normalised). */
function isBelow(bundle: string, root: string): boolean {
  return root === '/' ? bundle !== '/' : bundle.startsWith(root + '/');
}

/**
 * Refuse a bundle path outside every allowed root (PERMISSION_DENIED naming the path, the roots and
 * the flag). No roots (the flag not given): any path is allowed. The check is lexical: together
 * with checkNoSymlinks (no symlink on the path) and roots resolved at start-up, it is also real.
 */
export function checkBundleRoots(bundle: string, roots: readonly string[] | undefined): void {
  if (roots === undefined || roots.length === 0) return;
  if (roots.some((r) => isBelow(bundle, r))) return;
  throw new GuestpullError(
    ErrorCode.PERMISSION_DENIED,
    `bundle path ${JSON.stringify(bundle.length > 200 ? `${bundle.slice(0, 200)}…` : bundle)} is outside the allowed bundle roots ` +
      `(${roots.join(', ')}); pass a bundle path below one of them, or start guestpull with ${BUNDLE_ROOT_FLAG} for its directory`,
    { bundle, bundleRoots: [...roots] },
  );
}

/**
 * Refuse a bundle path that goes through a symlink: the bundle itself and every ancestor that
 * exists must be what its lexical path says (INVALID_ARGUMENT naming the first symlinked
 * component). Components are looked at top down with lstat until the first missing one; then the
 * realpath of that longest existing prefix must equal it.
 *
 * Not re-checked right before publishing: the publish steps (rename of the staging rootfs to
 * `<bundle>/rootfs`, the atomic config.json, the overlay mount after a non-recursive mkdir of
 * `rootfs`) never follow a symlink in their final component: rename(2) onto a symlink replaces
 * the link, and mkdir fails on one. A symlink swapped in for the bundle directory itself between
 * this check and publication would be followed, but an lstat just before publishing would narrow
 * that window, not close it (Node has no renameat/openat to work relative to a held directory),
 * and whoever can rename entries in the bundle's parent (root-owned /run/kata-containers) is root
 * in the guest already. What this check stops is a request naming a path that routes through a
 * symlink, which is what a caller controls.
 */
export async function checkNoSymlinks(bundle: string): Promise<void> {
  const parts = bundle.split('/').filter((c) => c !== '');
  let prefix = '';
  for (const part of parts) {
    const next = `${prefix}/${part}`;
    let st: Awaited<ReturnType<typeof lstat>>;
    try {
      st = await lstat(next);
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (code === 'ENOENT') break;
      if (code === 'ENOTDIR') throw invalid(bundle, `${prefix} is not a directory`);
      const g = asGuestpullError(e);
      throw new GuestpullError(g.code, `cannot inspect bundle path ${bundle} at ${next}: ${g.message}`, { bundle }, { cause: e });
    }
    if (st.isSymbolicLink()) {
      throw invalid(bundle, next === bundle ? 'it is a symbolic link' : `its component ${next} is a symbolic link`);
    }
    prefix = next;
  }
  if (prefix === '') return;
  const real = await realpath(prefix).catch(() => prefix);
  if (real !== prefix) throw invalid(bundle, `${prefix} resolves to ${real}`);
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
