/**
 * /proc/self/mountinfo, parsed (proc(5)): which mounts exist in our mount namespace, so that the
 * store can tell a live overlay bundle from one the runtime has unmounted, and find build mounts a
 * killed process left behind. Paths in the file escape space, tab, newline and backslash as
 * `\ooo` octal; overlay's super options escape the same way (and `,` `=`).
 */
import { readFileSync } from 'node:fs';

export interface MountEntry {
  id: number;
  parent: number;
  /** The mount point, unescaped. */
  mountPoint: string;
  fstype: string;
  source: string;
  /** Per-superblock options, unescaped values (e.g. upperdir for overlay). */
  superOptions: Map<string, string>;
}

/** `\040` → ' ' etc.; anything else is kept as it is. */
export function unescapeOctal(s: string): string {
  return s.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));
}

/** Split super options at commas that are not escaped with a backslash. */
function splitOptions(s: string): Map<string, string> {
  const out = new Map<string, string>();
  let cur = '';
  const flush = (): void => {
    if (cur === '') return;
    const eq = cur.indexOf('=');
    if (eq < 0) out.set(unescapeOctal(cur), '');
    else out.set(unescapeOctal(cur.slice(0, eq)), unescapeOctal(cur.slice(eq + 1)));
    cur = '';
  };
  for (let i = 0; i < s.length; i++) {
    const c = s[i]!;
    if (c === '\\' && i + 1 < s.length && s[i + 1] === ',') {
      cur += ',';
      i++;
    } else if (c === ',') {
      flush();
    } else {
      cur += c;
    }
  }
  flush();
  return out;
}

/** Parse mountinfo text; malformed lines are skipped. */
export function parseMountinfo(text: string): MountEntry[] {
  const out: MountEntry[] = [];
  for (const line of text.split('\n')) {
    if (line === '') continue;
    const f = line.split(' ');
    const sep = f.indexOf('-', 6);
    if (f.length < 10 || sep < 0 || sep + 3 >= f.length) continue;
    const id = Number(f[0]);
    const parent = Number(f[1]);
    if (!Number.isInteger(id) || !Number.isInteger(parent)) continue;
    out.push({
      id,
      parent,
      mountPoint: unescapeOctal(f[4]!),
      fstype: f[sep + 1]!,
      source: unescapeOctal(f[sep + 2]!),
      superOptions: splitOptions(f.slice(sep + 3).join(' ')),
    });
  }
  return out;
}

/** The mounts of this process's mount namespace (empty when /proc is not there). */
export function readMounts(file = '/proc/self/mountinfo'): MountEntry[] {
  try {
    return parseMountinfo(readFileSync(file, 'utf8'));
  } catch {
    return [];
  }
}

/** Mounts whose mount point is `dir` or lies below it, deepest first (the order to unmount them in). */
export function mountsUnder(mounts: readonly MountEntry[], dir: string): MountEntry[] {
  const prefix = dir.endsWith('/') ? dir : `${dir}/`;
  return mounts
    .filter((m) => m.mountPoint === dir || m.mountPoint.startsWith(prefix))
    .sort((a, b) => b.mountPoint.length - a.mountPoint.length);
}

/** Whether an overlay with this upper directory is mounted at `mountPoint`. */
export function isOverlayMounted(mounts: readonly MountEntry[], mountPoint: string, upperdir: string): boolean {
  return mounts.some((m) => m.fstype === 'overlay' && m.mountPoint === mountPoint && m.superOptions.get('upperdir') === upperdir);
}

/** Whether any overlay mount uses `upperdir` (wherever it is mounted). */
export function isUpperInUse(mounts: readonly MountEntry[], upperdir: string): boolean {
  return mounts.some((m) => m.fstype === 'overlay' && m.superOptions.get('upperdir') === upperdir);
}
