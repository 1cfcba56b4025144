/**
 * Overlay mounts through guestpull's native addon: the option string (paths escaped, within the
 * one page mount(2) takes), mount and unmount, and the test mount that decides whether this kernel
 * can do what the store needs (`snapshotter = auto`).
 *
 * Two kinds of mounts:
 * - build mounts: a layer is applied, with the ordinary copy-mode applier, into an overlay of its
 *   parents whose upper directory becomes the store layer. The kernel writes whiteouts (char 0:0)
 *   and opaque directories (`trusted.overlay.opaque=y`), copies up parents and hard link targets,
 *   and refuses device 0:0 and raw `trusted.overlay.*` xattrs from the image. `redirect_dir=off`,
 *   `metacopy=off` and `index=off` keep every upper self-contained: no redirects, no data-less
 *   metacopy files, no index.
 * - bundle mounts: `<bundle>/rootfs`, the store layers read-only below a per-bundle upper.
 */
import { lstatSync, mkdirSync, rmSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { ErrorCode, GuestpullError } from '../../errors.js';
import { lgetxattr, MNT_DETACH, mount, MS_RDONLY, nativeAvailable, umount } from '../../native/index.js';

/** mount(2) copies one page of options; 4 KiB pages are the smallest Linux has. */
export const MAX_MOUNT_DATA = 4095;
export const BUILD_OPTIONS: readonly string[] = ['redirect_dir=off', 'index=off', 'metacopy=off'];
export const BUNDLE_OPTIONS: readonly string[] = ['index=off'];
/**
 * For build mounts only: no sync of the upper file system when the mount goes away (on a disk,
 * unmount would otherwise wait for every layer byte to reach it). Durability is not what makes a
 * layer trusted: its record and the rename into layers/ are, and a build mount is used once.
 */
export const VOLATILE = 'volatile';

export interface OverlaySpec {
  /** Lower directories, topmost first. */
  lowers: readonly string[];
  upper: string;
  work: string;
  /** Extra options (e.g. BUILD_OPTIONS). */
  options: readonly string[];
}

/** Escape `\`, `,` and `:` in a path for overlay's option parser. */
export function escapeOverlayPath(p: string): string {
  return p.replace(/[\\,:]/g, (c) => `\\${c}`);
}

/** The option string, with lower directories absolute or relative to `cwd`. */
export function overlayData(spec: OverlaySpec, cwd?: string): string {
  const lower = spec.lowers.map((l) => escapeOverlayPath(cwd === undefined ? l : path.relative(cwd, l))).join(':');
  return [`lowerdir=${lower}`, `upperdir=${escapeOverlayPath(spec.upper)}`, `workdir=${escapeOverlayPath(spec.work)}`, ...spec.options].join(',');
}

/**
 * How to pass `spec` to mount(2): absolute paths when they fit in a page, else lower directories
 * relative to `relativeTo` (mount runs with that as the working directory); undefined when even
 * that does not fit.
 */
export function planMount(spec: OverlaySpec, relativeTo: string): { data: string; cwd?: string } | undefined {
  const abs = overlayData(spec);
  if (Buffer.byteLength(abs) <= MAX_MOUNT_DATA) return { data: abs };
  const rel = overlayData(spec, relativeTo);
  if (Buffer.byteLength(rel) <= MAX_MOUNT_DATA) return { data: rel, cwd: relativeTo };
  return undefined;
}

function tooManyLayers(n: number): GuestpullError {
  return new GuestpullError(
    ErrorCode.UNIMPLEMENTED,
    `an overlay of ${n} layers does not fit in one mount(2) option page; set [image] snapshotter = "copy" (or "auto") for images this deep`,
    { layers: n },
  );
}

/** Mount an overlay at `target`. */
export function mountOverlay(spec: OverlaySpec, target: string, relativeTo: string): void {
  const plan = planMount(spec, relativeTo);
  if (plan === undefined) throw tooManyLayers(spec.lowers.length);
  if (plan.cwd === undefined) {
    mount('overlay', target, 'overlay', 0, plan.data);
    return;
  }
  // mount(2) resolves relative lower paths against the working directory. Synchronous from here
  // to the chdir back, so no other JavaScript runs meanwhile; guestpull's own I/O uses absolute paths.
  const prev = process.cwd();
  process.chdir(plan.cwd);
  try {
    mount('overlay', target, 'overlay', 0, plan.data);
  } finally {
    process.chdir(prev);
  }
}

/**
 * Mount a read-only overlay of `lowers` (topmost first, at least two) at `target`: the merged view
 * of complete store layers, whiteouts and opaque directories applied (speculative builds).
 */
export function mountLowerView(lowers: readonly string[], target: string, relativeTo: string): void {
  const data = (cwd?: string): string => `lowerdir=${lowers.map((l) => escapeOverlayPath(cwd === undefined ? l : path.relative(cwd, l))).join(':')}`;
  if (Buffer.byteLength(data()) <= MAX_MOUNT_DATA) {
    mount('overlay', target, 'overlay', MS_RDONLY, data());
    return;
  }
  if (Buffer.byteLength(data(relativeTo)) > MAX_MOUNT_DATA) throw tooManyLayers(lowers.length);
  const prev = process.cwd();
  process.chdir(relativeTo);
  try {
    mount('overlay', target, 'overlay', MS_RDONLY, data(relativeTo));
  } finally {
    process.chdir(prev);
  }
}

/**
 * Unmount `target`: a plain unmount, lazily (MNT_DETACH) if it is busy. Not mounted (EINVAL) or
 * gone (ENOENT) count as done.
 */
export function unmountQuietly(target: string): void {
  try {
    umount(target, 0);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'EINVAL' || code === 'ENOENT') return;
    if (code !== 'EBUSY') throw e;
    umount(target, MNT_DETACH);
  }
}

export type ProbeResult = { ok: true; buildOptions: readonly string[]; bundleOptions: readonly string[] } | { ok: false; reason: string };

/**
 * Can this kernel give us overlay bundles? Mounts an overlay in `dir` (created and removed here)
 * and checks what the store relies on: a lower file shows through, deleting it leaves a char 0:0
 * whiteout in the upper, and a directory deleted and made again is marked opaque.
 */
export function probeOverlay(dir: string): ProbeResult {
  if (!nativeAvailable()) return { ok: false, reason: "guestpull's native addon (mount, xattrs) is not available" };
  const p = (n: string): string => path.join(dir, n);
  const reset = (): void => {
    unmountQuietly(p('merged'));
    rmSync(dir, { recursive: true, force: true });
    for (const d of ['lower/d', 'upper', 'work', 'merged']) mkdirSync(p(d), { recursive: true, mode: 0o700 });
    writeFileSync(p('lower/f'), 'probe\n');
    writeFileSync(p('lower/d/x'), 'probe\n');
  };
  const spec = (options: readonly string[]): OverlaySpec => ({ lowers: [p('lower')], upper: p('upper'), work: p('work'), options });
  try {
    // Kernels before 5.10 lack `volatile`, before 4.19 the other options (and with them the
    // features those turn off): take the first set this kernel mounts.
    const choices: readonly (readonly string[])[] = [[...BUILD_OPTIONS, VOLATILE], BUILD_OPTIONS, []];
    let options: readonly string[] = [];
    for (const [i, choice] of choices.entries()) {
      options = choice;
      reset();
      try {
        mountOverlay(spec(options), p('merged'), dir);
        break;
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== 'EINVAL' || i === choices.length - 1) throw e;
      }
    }
    try {
      if (!lstatSync(p('merged/f')).isFile()) return { ok: false, reason: 'a lower file does not show through the overlay' };
      rmSync(p('merged/f'));
      rmSync(p('merged/d'), { recursive: true });
      mkdirSync(p('merged/d'));
    } finally {
      unmountQuietly(p('merged'));
    }
    const wh = lstatSync(p('upper/f'));
    if (!wh.isCharacterDevice() || wh.rdev !== 0) return { ok: false, reason: 'the overlay does not record deletions as char 0:0 whiteouts' };
    if (lgetxattr(p('upper/d'), 'trusted.overlay.opaque')?.toString('latin1') !== 'y') {
      return { ok: false, reason: 'the overlay does not mark a re-created directory opaque (trusted.overlay.opaque)' };
    }
    return { ok: true, buildOptions: options, bundleOptions: options.length > 0 ? BUNDLE_OPTIONS : [] };
  } catch (e) {
    const err = e as NodeJS.ErrnoException;
    return { ok: false, reason: `test mount of overlay in ${dir} failed: ${err.code ?? ''} ${err.message}`.trim() };
  } finally {
    try {
      unmountQuietly(p('merged'));
      rmSync(dir, { recursive: true, force: true });
    } catch {
      // start-up cleanup removes it next time
    }
  }
}
