/**
 * Speculative layer builds: a layer is unpacked into its own upper directory while its parents
 * are still being unpacked (every core busy on one image), as if nothing were below it; the
 * applier (src/pull/layers/apply.ts, ApplierOptions.lower) stops at the first entry that needs
 * the parents. What it wrote is then made what an ordinary build (through an overlay of the
 * parents) would have written, once the parents are complete:
 *
 * - a directory of the layer over a lower directory merges with it: in an ordinary build the
 *   kernel copies the lower one up first, so it keeps the lower extended attributes its own entry
 *   did not set (owner, mode and times are the entry's either way);
 * - a directory over a lower non-directory replaces it: the kernel would have made it opaque (its
 *   lookup stops at the non-directory anyway: the speculative test passes without the mark, so
 *   this only keeps the upper the same as the kernel's);
 * - below an opaque directory (the layer's own opaque marker) nothing lower shows, so nothing is
 *   merged; below a directory the parents do not have, nothing lower exists;
 * - the root takes the parents' owner and mode unless the layer has an entry for it.
 *
 * Files, symlinks and devices of the layer hide whatever is below them in both builds; whiteouts
 * and opaque markers the applier already wrote as overlayfs writes them, except that whiteouts
 * in a directory overlayfs does not merge (nothing lower, or opaque) are removed: the kernel never
 * makes those, and `ls` would list them.
 */
import fs from 'node:fs';
import { lgetxattr, lsetxattr, llistxattr } from '../../native/index.js';
import { lstatOrNull } from '../../fsutil.js';

const OPAQUE = 'trusted.overlay.opaque';

function notSupported(e: unknown): boolean {
  const code = (e as NodeJS.ErrnoException).code;
  return code === 'ENOTSUP' || code === 'EOPNOTSUPP';
}

/** overlayfs's own names: never copied (the lower view hides them anyway). */
function overlayPrivate(name: string): boolean {
  return name.startsWith('trusted.overlay.') || name.startsWith('user.overlay.');
}

/** Copy up the xattrs of lower directory `from` that `to` does not have (what a kernel copy-up keeps); how many. */
function copyUpXattrs(from: string, to: string): number {
  let names: string[];
  try {
    names = llistxattr(from);
  } catch (e) {
    if (notSupported(e)) return 0;
    throw e;
  }
  let copied = 0;
  for (const name of names) {
    if (overlayPrivate(name) || lgetxattr(to, name) !== undefined) continue;
    const value = lgetxattr(from, name);
    if (value === undefined) continue;
    try {
      lsetxattr(to, name, value);
      copied++;
    } catch (e) {
      if (!notSupported(e)) throw e;
    }
  }
  return copied;
}

/**
 * Remove the whiteouts (char 0:0; images cannot make those, the applier refuses them) below `dir`:
 * overlayfs hides whiteouts only in directories it merges, so in a directory with nothing lower,
 * or an opaque one, `ls` would show them.
 */
function dropWhiteouts(dir: string): number {
  let n = 0;
  for (const d of fs.readdirSync(dir, { withFileTypes: true })) {
    const p = `${dir}/${d.name}`;
    if (d.isDirectory()) n += dropWhiteouts(p);
    else if (d.isCharacterDevice() && fs.lstatSync(p).rdev === 0) {
      fs.unlinkSync(p);
      n++;
    }
  }
  return n;
}

function isOpaque(dir: string): boolean {
  return lgetxattr(dir, OPAQUE)?.toString('latin1') === 'y';
}

export interface MergeResult {
  /** Host paths of the upper directories that merge with a lower directory. */
  merged: string[];
  /** Whether the upper changed at all (a tree summary taken before is still right if not). */
  changed: boolean;
}

/**
 * Merge the speculatively written `upper` onto `lower` (the merged view of the complete parents:
 * the one parent's directory, or a read-only overlay of them). `rootEntry`: the layer set its
 * root's metadata itself.
 */
export function mergeOntoLower(upper: string, lower: string, rootEntry: boolean): MergeResult {
  const merged: string[] = [];
  let changes = 0;
  if (!rootEntry) {
    const st = fs.lstatSync(lower);
    const before = fs.lstatSync(upper);
    if (process.getuid?.() === 0 && (before.uid !== st.uid || before.gid !== st.gid)) {
      fs.chownSync(upper, st.uid, st.gid);
      changes++;
    }
    if ((before.mode & 0o7777) !== (st.mode & 0o7777) || changes > 0) {
      fs.chmodSync(upper, st.mode & 0o7777);
      changes++;
    }
  }
  const visit = (u: string, l: string): void => {
    for (const d of fs.readdirSync(u, { withFileTypes: true })) {
      if (!d.isDirectory()) continue;
      const uc = `${u}/${d.name}`;
      const lc = `${l}/${d.name}`;
      const st = lstatOrNull(lc);
      if (st === null) {
        changes += dropWhiteouts(uc);
        continue;
      }
      if (!st.isDirectory()) {
        if (!isOpaque(uc)) {
          lsetxattr(uc, OPAQUE, Buffer.from('y'));
          changes++;
        }
        changes += dropWhiteouts(uc);
        continue;
      }
      changes += copyUpXattrs(lc, uc);
      merged.push(uc);
      if (isOpaque(uc)) changes += dropWhiteouts(uc);
      else visit(uc, lc);
    }
  };
  if (!isOpaque(upper)) visit(upper, lower);
  return { merged, changed: changes > 0 };
}
