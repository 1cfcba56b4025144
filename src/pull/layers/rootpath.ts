/**
 * Resolve image paths inside a rootfs as if the rootfs were `/`.
 *
 * Symlinks met in intermediate components are followed, but their targets are interpreted inside
 * the root (an absolute target restarts at the root; `..` never climbs above it). The final
 * component is not followed unless asked. guestpull is the only writer of the trees it resolves in
 * (staging directories it created), so a userspace walk with lstat/readlink is sound here; there is
 * no concurrent attacker able to swap components between the check and the use.
 */
import { lstat, readlink } from 'node:fs/promises';
import path from 'node:path';
import { ErrorCode, GuestpullError } from '../../errors.js';

/** Linux's own limit on symlinks followed during one path walk. */
export const MAX_SYMLINK_FOLLOWS = 40;

export interface ResolveOptions {
  /** Follow a symlink in the last component too (for reads such as /etc/passwd). */
  followFinal?: boolean;
}

/** Split an image path into its non-empty components, dropping `.`. */
export function splitImagePath(p: string): string[] {
  return p.split('/').filter((c) => c !== '' && c !== '.');
}

/**
 * Clean an archive entry name lexically: leading `/` and `./` removed, `..` clamped at the root.
 * Returns the components. This is what the entry *names*; resolveInRoot decides where it lands.
 */
export function cleanEntryPath(name: string): string[] {
  const out: string[] = [];
  for (const c of splitImagePath(name)) {
    if (c === '..') out.pop();
    else out.push(c);
  }
  return out;
}

/**
 * The host path for image path `p` inside `root`. Never returns a path outside `root`.
 * Components that do not exist are appended lexically (they cannot be links).
 */
export async function resolveInRoot(root: string, p: string | string[], opts: ResolveOptions = {}): Promise<string> {
  const rest = typeof p === 'string' ? splitImagePath(p) : p.filter((c) => c !== '' && c !== '.');
  const done: string[] = [];
  let follows = 0;
  let missing = false;
  // `rest` is consumed from the front; symlink targets are pushed back onto it.
  const queue = rest.slice().reverse();
  while (queue.length > 0) {
    const comp = queue.pop()!;
    if (comp === '..') {
      done.pop();
      // Stepping back out of a missing part may land on existing components again: check
      // every later component anew (else `l -> missing/../evil` would skip evil's symlink).
      missing = false;
      continue;
    }
    const isFinal = queue.length === 0;
    if (missing || (isFinal && !opts.followFinal)) {
      done.push(comp);
      continue;
    }
    const host = path.join(root, ...done, comp);
    let st;
    try {
      st = await lstat(host);
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (code === 'ENOENT' || code === 'ENOTDIR') {
        missing = true;
        done.push(comp);
        continue;
      }
      throw e;
    }
    if (!st.isSymbolicLink()) {
      done.push(comp);
      continue;
    }
    if (++follows > MAX_SYMLINK_FOLLOWS) {
      throw new GuestpullError(
        ErrorCode.BAD_IMAGE,
        `too many levels of symbolic links resolving ${JSON.stringify('/' + rest.join('/'))} inside the image`,
      );
    }
    const target = await readlink(host);
    if (target.startsWith('/')) done.length = 0;
    const parts = splitImagePath(target);
    for (let i = parts.length - 1; i >= 0; i--) queue.push(parts[i]!);
  }
  return done.length === 0 ? root : path.join(root, ...done);
}
