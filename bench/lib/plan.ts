/**
 * Plans a benchmark image's layers from its parameters: a shared directory tree of plausible
 * depth, files with a seeded size mix (sizes only: content is produced later, one file at a
 * time), symlinks and hard links beside some files, and in upper layers overwrites and whiteouts
 * of lower files. A plan is a list of entries per layer in tar order (a directory before its
 * contents); it holds no file content, so planning 50k files costs a few MB.
 */
import { prng, seedOf, type ContentKind } from './content.js';
import type { ImageParams, SizeClass } from './images.js';

export type PlannedEntry =
  | { type: 'dir'; path: string; mode: number; uid: number; gid: number }
  | { type: 'file'; path: string; mode: number; uid: number; gid: number; size: number; kind: ContentKind; seed: number }
  | { type: 'symlink'; path: string; target: string; uid: number; gid: number }
  | { type: 'hardlink'; path: string; target: string }
  /** `<dir>/.wh.<name>` deleting `path` from the layers below */
  | { type: 'whiteout'; path: string };

export interface LayerPlan {
  entries: PlannedEntry[];
  fileBytes: number;
}

const ROOTS = [
  'etc', 'etc/ssl/certs', 'usr/bin', 'usr/sbin', 'usr/lib', 'usr/lib/x86_64-linux-gnu', 'usr/share', 'usr/share/doc',
  'usr/share/locale', 'usr/include', 'usr/local/lib/python3.11/site-packages', 'opt/app', 'opt/app/node_modules', 'var/lib',
];
const NAMES = [
  'core', 'util', 'net', 'http', 'json', 'xml', 'crypto', 'ssl', 'locale', 'data', 'config', 'plugins', 'modules', 'vendor',
  'include', 'src', 'lib', 'dist', 'build', 'tests', 'docs', 'examples', 'tools', 'share', 'static', 'assets', 'templates',
  'i18n', 'en', 'de', 'fr', 'ja', 'zh', 'python', 'perl', 'ruby', 'node', 'java', 'go', 'rust', 'gcc', 'llvm', 'x11', 'gtk',
  'systemd', 'dbus', 'udev', 'pam', 'security', 'cron', 'apt', 'dpkg', 'man1', 'man3', 'man5', 'man8', 'icons', 'fonts',
];
const TEXT_EXT = ['py', 'js', 'json', 'txt', 'conf', 'h', 'md', 'yaml', 'sh', 'html', 'css', 'xml'];
const BIN_EXT = ['so', 'bin', 'pyc', 'a', 'o', 'png', 'jar', 'wasm', 'node', 'mo'];
const MAX_DEPTH = 9;
const MIN_FILE_BYTES = 0;

function ancestors(p: string): string[] {
  const parts = p.split('/');
  const out: string[] = [];
  for (let i = 1; i <= parts.length; i++) out.push(parts.slice(0, i).join('/'));
  return out;
}

/** Component-wise order: a directory comes before everything inside it. */
export function tarOrder(a: string, b: string): number {
  const pa = a.split('/');
  const pb = b.split('/');
  for (let i = 0; i < Math.min(pa.length, pb.length); i++) {
    if (pa[i] !== pb[i]) return pa[i]! < pb[i]! ? -1 : 1;
  }
  return pa.length - pb.length;
}

const owned = (p: string): number => (p === 'opt/app' || p.startsWith('opt/app/') ? 1000 : 0);

/** The shared directory tree: fixed roots, then random children of existing directories. */
function planTree(params: ImageParams, rnd: () => number): string[] {
  const dirs = [...ROOTS];
  const seen = new Set(dirs);
  for (let i = 0; dirs.length < ROOTS.length + params.dirs; i++) {
    const parent = dirs[Math.floor(rnd() * dirs.length)]!;
    if (parent.split('/').length >= MAX_DEPTH) continue;
    let name = NAMES[Math.floor(rnd() * NAMES.length)]!;
    if (seen.has(`${parent}/${name}`)) name += `-${i.toString(36)}`;
    const p = `${parent}/${name}`;
    seen.add(p);
    dirs.push(p);
  }
  return dirs;
}

function drawSize(classes: SizeClass[], rnd: () => number): { size: number; kind: ContentKind } {
  let r = rnd();
  let c = classes[classes.length - 1]!;
  for (const k of classes) {
    if (r < k.share) {
      c = k;
      break;
    }
    r -= k.share;
  }
  const size = Math.exp(Math.log(c.minBytes) + rnd() * (Math.log(c.maxBytes) - Math.log(c.minBytes)));
  return { size, kind: rnd() < c.text ? 'text' : 'binary' };
}

/** Scales drawn sizes to integers summing exactly to `total`. */
function scaleSizes(raw: number[], total: number): number[] {
  const sum = raw.reduce((a, b) => a + b, 0);
  if (raw.length === 0) return [];
  const sizes = raw.map((s) => Math.max(MIN_FILE_BYTES, Math.floor((s * total) / sum)));
  let largest = 0;
  sizes.forEach((s, i) => {
    if (s > sizes[largest]!) largest = i;
  });
  sizes[largest]! += total - sizes.reduce((a, b) => a + b, 0);
  return sizes;
}

interface LiveFile { path: string; size: number; kind: ContentKind; mode: number; uid: number; linked: boolean }

export function planImage(params: ImageParams): LayerPlan[] {
  const rnd = prng(seedOf('plan', params.seed));
  const tree = planTree(params, rnd);
  const live = new Map<string, LiveFile>();
  let nextId = 0;
  return params.layers.map((lp, k) => {
    const dirsUsed = new Set<string>(k === 0 ? ROOTS : []);
    const entries: PlannedEntry[] = [];
    const lower = [...live.values()].filter((f) => !f.linked);
    // upper layers: overwrite and delete some lower files (package upgrades and removals)
    const nOver = Math.round(lower.length * lp.overwrite);
    const nWhite = Math.round(lower.length * lp.whiteout);
    for (let i = 0; i < nOver + nWhite && lower.length > 0; i++) {
      const f = lower.splice(Math.floor(rnd() * lower.length), 1)[0]!;
      dirsUsed.add(f.path.slice(0, f.path.lastIndexOf('/')));
      if (i < nOver) {
        entries.push({ type: 'file', path: f.path, mode: f.mode, uid: f.uid, gid: f.uid, size: f.size, kind: f.kind, seed: seedOf('file', params.seed, k, f.path) });
      } else {
        entries.push({ type: 'whiteout', path: f.path });
        live.delete(f.path);
      }
    }
    // new files; earlier (shallower) directories get more of them; each layer favours its own area
    const drawn = Array.from({ length: lp.files }, () => drawSize(params.classes, rnd));
    const sizes = scaleSizes(drawn.map((d) => d.size), lp.bytes);
    const offset = Math.floor(rnd() * tree.length);
    for (let i = 0; i < lp.files; i++) {
      const dir = tree[(Math.floor(Math.pow(rnd(), 1.6) * tree.length) + offset) % tree.length]!;
      dirsUsed.add(dir);
      const { kind } = drawn[i]!;
      const exts = kind === 'text' ? TEXT_EXT : BIN_EXT;
      const id = nextId++;
      const name = `${NAMES[Math.floor(rnd() * NAMES.length)]!}-${id.toString(36)}.${exts[Math.floor(rnd() * exts.length)]!}`;
      const path = `${dir}/${name}`;
      const exec = dir.endsWith('bin') || (kind === 'binary' && rnd() < 0.1);
      const uid = owned(dir);
      const file: LiveFile = { path, size: sizes[i]!, kind, mode: exec ? 0o755 : 0o644, uid, linked: false };
      entries.push({ type: 'file', path, mode: file.mode, uid, gid: uid, size: file.size, kind, seed: seedOf('file', params.seed, k, path) });
      const r = rnd();
      if (r < params.symlinks) {
        const target = rnd() < 0.5 ? name : `/${path}`;
        entries.push({ type: 'symlink', path: `${path}.lnk`, target, uid, gid: uid });
        live.set(`${path}.lnk`, { ...file, path: `${path}.lnk`, linked: true });
      } else if (r < params.symlinks + params.hardlinks) {
        entries.push({ type: 'hardlink', path: `${path}.hl`, target: path });
        file.linked = true;
        live.set(`${path}.hl`, { ...file, path: `${path}.hl` });
      }
      live.set(path, file);
    }
    const dirs = new Set<string>();
    for (const d of dirsUsed) for (const a of ancestors(d)) dirs.add(a);
    for (const d of dirs) {
      const uid = owned(d);
      entries.push({ type: 'dir', path: d, mode: 0o755, uid, gid: uid });
    }
    entries.sort((a, b) => tarOrder(a.path, b.path) || (a.type === 'whiteout' ? -1 : b.type === 'whiteout' ? 1 : 0));
    const fileBytes = entries.reduce((n, e) => n + (e.type === 'file' ? e.size : 0), 0);
    return { entries, fileBytes };
  });
}
