/**
 * The Linux calls Node has no API for (mknod, xattrs, mount), from guestpull's own small N-API
 * addon (native/guestpull.c, built by `npm run build:native` into build/Release/). Used for
 * device nodes, FIFOs and xattrs in layers, and for overlay whiteouts (char 0:0,
 * `trusted.overlay.opaque=y`) and overlay mounts.
 *
 * The addon is loaded on first use. If it is missing, every function throws
 * GuestpullError(UNIMPLEMENTED) saying how to build it; `nativeAvailable()` tells beforehand.
 * Failed system calls throw an Error with `code` set to the errno name (EEXIST, EPERM, ...),
 * plus `errno`, `syscall` and `path`, like Node's own fs errors.
 */
import { createRequire } from 'node:module';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { ErrorCode, GuestpullError } from '../errors.js';

export type DeviceType = 'char' | 'block' | 'fifo';

interface Addon {
  mknod(path: string, type: DeviceType, mode: number, major: number, minor: number): void;
  lsetxattr(path: string, name: string, value: Buffer): void;
  lgetxattr(path: string, name: string): Buffer | undefined;
  llistxattr(path: string): string[];
  lremovexattr(path: string, name: string): void;
  mount(source: string, target: string, fstype: string, flags: number, data: string): void;
  umount(target: string, flags: number): void;
  MS_RDONLY: number;
  MNT_DETACH: number;
}

/** mount(2) flag: read-only. */
export const MS_RDONLY = 1;
/** umount2(2) flag: lazy unmount. */
export const MNT_DETACH = 2;

/** The same from src/native (vitest, tsx) and dist/native (the build): two levels below the package root. */
export const ADDON_PATH = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../build/Release/guestpull_native.node');

let addonPath = ADDON_PATH;
let addon: Addon | null = null;
let loadError: Error | null = null;

/** Tests only: load the addon from another path from now on (a missing one shows the fallback). */
export function setAddonPathForTests(p: string): void {
  addonPath = p;
  addon = null;
  loadError = null;
}

function isAddon(v: unknown): v is Addon {
  if (typeof v !== 'object' || v === null) return false;
  const o = v as Record<string, unknown>;
  return ['mknod', 'lsetxattr', 'lgetxattr', 'llistxattr', 'lremovexattr', 'mount', 'umount'].every((k) => typeof o[k] === 'function');
}

function load(): Addon | null {
  if (addon !== null || loadError !== null) return addon;
  try {
    const mod: unknown = createRequire(import.meta.url)(addonPath);
    if (!isAddon(mod)) throw new Error('it does not export the expected functions');
    if (mod.MS_RDONLY !== MS_RDONLY || mod.MNT_DETACH !== MNT_DETACH) throw new Error('its mount constants differ from Linux');
    addon = mod;
  } catch (e) {
    loadError = e instanceof Error ? e : new Error(String(e));
  }
  return addon;
}

function need(what: string): Addon {
  const a = load();
  if (a !== null) return a;
  throw new GuestpullError(
    ErrorCode.UNIMPLEMENTED,
    `${what} needs guestpull's native addon, which could not be loaded from ${addonPath} (${loadError?.message ?? 'unknown error'}); ` +
      'build it with `npm run build:native` in the guestpull package (needs python3, make and a C compiler)',
    { addon: addonPath },
  );
}

/** Whether the addon loads (without throwing). */
export function nativeAvailable(): boolean {
  return load() !== null;
}

const ERRNO_NAMES: ReadonlyMap<number, string> = new Map(
  Object.entries(os.constants.errno).map(([name, n]) => [n, name] as const),
);

/** Give a failed system call's Error the errno name as `code`, as Node's fs errors have. */
function call<T>(fn: () => T): T {
  try {
    return fn();
  } catch (e) {
    if (e instanceof Error) {
      const err = e as NodeJS.ErrnoException;
      if (typeof err.errno === 'number' && err.code === undefined) err.code = ERRNO_NAMES.get(err.errno) ?? `E${err.errno}`;
    }
    throw e;
  }
}

/** mknod(2): a character or block device (permission bits `mode`, device major:minor) or a FIFO. Never follows symlinks; EEXIST if `path` exists. */
export function mknod(path: string, type: DeviceType, mode: number, major: number, minor: number): void {
  const a = need('creating a device node or FIFO');
  call(() => a.mknod(path, type, mode, major, minor));
}

/** lsetxattr(2): set an extended attribute on `path` itself (a final symlink is not followed). */
export function lsetxattr(path: string, name: string, value: Buffer): void {
  const a = need('setting an extended attribute');
  call(() => a.lsetxattr(path, name, value));
}

/** lgetxattr(2): the attribute's value, or undefined when `path` does not have it (ENODATA). */
export function lgetxattr(path: string, name: string): Buffer | undefined {
  const a = need('reading an extended attribute');
  return call(() => a.lgetxattr(path, name));
}

/** llistxattr(2): the names of the attributes `path` has (that this process may see). */
export function llistxattr(path: string): string[] {
  const a = need('listing extended attributes');
  return call(() => a.llistxattr(path));
}

/** lremovexattr(2): remove an attribute from `path` itself (a final symlink is not followed); ENODATA when it has none of that name. */
export function lremovexattr(path: string, name: string): void {
  const a = need('removing an extended attribute');
  call(() => a.lremovexattr(path, name));
}

/** mount(2); `data` is the option string ("" for none), e.g. `lowerdir=...,upperdir=...,workdir=...` for overlay. */
export function mount(source: string, target: string, fstype: string, flags: number, data: string): void {
  const a = need('mounting a filesystem');
  call(() => a.mount(source, target, fstype, flags, data));
}

/** umount2(2); flags 0 or MNT_DETACH. */
export function umount(target: string, flags: number): void {
  const a = need('unmounting a filesystem');
  call(() => a.umount(target, flags));
}
