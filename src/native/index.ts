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
 *
 * Also streaming gunzip through Intel ISA-L (`openGunzip`), which the addon dlopens at first use:
 * `gunzipAvailable()` is false, with `gunzipUnavailableReason()`, when the addon or libisal.so.2
 * does not load; the layer code then falls back to Node's zlib (src/pull/layers/gunzip.ts).
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

/** The gunzip half of the addon (absent from an addon built before it existed). */
interface GunzipAddon {
  gunzipStatus(): string;
  gunzipOpen(digest?: 'sha256' | 'sha512'): object;
  gunzipRun(handle: object, input: Uint8Array, output: Uint8Array): Promise<unknown>;
  gunzipClose(handle: object): void;
  gunzipDigest(handle: object): Buffer;
  gunzipHash(handle: object, bytes: Uint8Array): Promise<number>;
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

function hasGunzip(a: Addon): a is Addon & GunzipAddon {
  const o = a as unknown as Record<string, unknown>;
  return ['gunzipStatus', 'gunzipOpen', 'gunzipRun', 'gunzipClose', 'gunzipDigest', 'gunzipHash'].every((k) => typeof o[k] === 'function');
}

/** The addon with ISA-L loaded, or why not. */
function gunzipAddon(): { addon: GunzipAddon; reason?: undefined } | { addon?: undefined; reason: string } {
  const a = load();
  if (a === null) return { reason: `guestpull's native addon could not be loaded from ${addonPath} (${loadError?.message ?? 'unknown error'})` };
  if (!hasGunzip(a)) return { reason: `the native addon at ${addonPath} was built without gunzip; rebuild it with \`npm run build:native\`` };
  const status = a.gunzipStatus();
  if (status !== '') return { reason: `ISA-L (libisal.so.2) could not be loaded: ${status}; install it (Debian: libisal2)` };
  return { addon: a };
}

/** Whether `openGunzip` works: the addon loads and so does ISA-L's libisal.so.2. */
export function gunzipAvailable(): boolean {
  return gunzipAddon().addon !== undefined;
}

/** Why `gunzipAvailable()` is false (undefined when it is true). */
export function gunzipUnavailableReason(): string | undefined {
  return gunzipAddon().reason;
}

/** What one `NativeGunzip.run` did. */
export interface GunzipStep {
  /** Input bytes read (the rest of the input is for the next call). */
  consumed: number;
  /** Output bytes written from the start of the output buffer. */
  produced: number;
  /** The data so far is whole members: header, deflate data, CRC-32 and ISIZE checked. */
  memberEnd: boolean;
  /** A zero byte followed a member: the gzip data is over, the rest of the input is not read (zlib's rule). */
  ended: boolean;
  /** 0, or an error (negative: ISA-L's ISAL_INVALID_BLOCK ... ISAL_INCORRECT_CHECKSUM, or the addon's header checks); the stream is dead after one. */
  code: number;
}

function parseStep(v: unknown): GunzipStep {
  if (typeof v === 'object' && v !== null) {
    const o = v as Record<string, unknown>;
    const { consumed, produced, memberEnd, ended, code } = o;
    if (typeof consumed === 'number' && typeof produced === 'number' && typeof memberEnd === 'boolean' && typeof ended === 'boolean' && typeof code === 'number') {
      return { consumed, produced, memberEnd, ended, code };
    }
  }
  throw new Error('the native gunzip returned an unexpected result');
}

const ISAL_ERRORS: ReadonlyMap<number, string> = new Map([
  [-1, 'invalid deflate block'],
  [-2, 'invalid deflate symbol'],
  [-3, 'invalid back-reference distance in the deflate data'],
  [-4, 'no gzip header (wrong magic bytes)'],
  [-5, 'the gzip header names a compression method other than deflate'],
  [-6, 'the CRC-32 or the length in the gzip trailer does not match the data'],
  [-101, 'the gzip header has reserved flag bits set'],
  [-102, 'the gzip header CRC does not match the header'],
  [-103, 'the digest of the inflated data could not be computed (OpenSSL)'],
]);

/** Words for an ISA-L error code, for messages. */
export function gunzipErrorText(code: number): string {
  return ISAL_ERRORS.get(code) ?? `ISA-L inflate error ${code}`;
}

let openHandles = 0;

/** Tests: gunzip handles opened and not yet closed in this thread. */
export function openGunzipCount(): number {
  return openHandles;
}

/**
 * One gzip stream being inflated by ISA-L on the libuv thread pool. `run` may not be called again
 * before its promise settles (the addon refuses with EBUSY); `close` frees the state at once, or
 * when a running call completes, and may be called any time (also twice).
 */
export class NativeGunzip {
  private closed = false;

  constructor(
    private readonly addon: GunzipAddon,
    private readonly handle: object,
  ) {
    openHandles++;
  }

  /** Inflate from `input` into `output`; both must stay untouched until the promise settles. */
  async run(input: Uint8Array, output: Uint8Array): Promise<GunzipStep> {
    return parseStep(await call(() => this.addon.gunzipRun(this.handle, input, output)));
  }

  /**
   * Add `bytes` to the digest (opened with one) on the pool thread; one call at a time, in order.
   * `bytes` must stay untouched until the promise settles.
   */
  async hash(bytes: Uint8Array): Promise<void> {
    const code = await call(() => this.addon.gunzipHash(this.handle, bytes));
    if (code !== 0) throw new GuestpullError(ErrorCode.INTERNAL, `hashing inflated data failed: ${gunzipErrorText(code)}`);
  }

  /** The digest of every byte given to `hash`; once, after the last hash settled. */
  digest(): Buffer {
    return call(() => this.addon.gunzipDigest(this.handle));
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    openHandles--;
    this.addon.gunzipClose(this.handle);
  }
}

/**
 * A new gunzip stream; GuestpullError(UNIMPLEMENTED) naming the reason when ISA-L is not available.
 * With `digest`, NativeGunzip.hash/digest hash bytes on the pool thread.
 */
export function openGunzip(digest?: 'sha256' | 'sha512'): NativeGunzip {
  const g = gunzipAddon();
  if (g.addon === undefined) {
    throw new GuestpullError(ErrorCode.UNIMPLEMENTED, `gunzip through ISA-L is not available: ${g.reason}`, { addon: addonPath });
  }
  const a = g.addon;
  return new NativeGunzip(a, call(() => (digest === undefined ? a.gunzipOpen() : a.gunzipOpen(digest))));
}
