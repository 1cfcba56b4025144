/**
 * Random but valid layer stacks for the overlay tests (overlay == copy, speculative == ordinary
 * builds): entries over a small name space so that they collide, each kept only if the layer.md
 * model (./tree.ts expectedTreeFromLayers) can still apply the stack.
 */
import type { EntrySpec } from './image-builder.js';
import { prng } from './synthetic-image.js';
import { expectedTreeFromLayers, type TreeEntry } from './tree.js';

/**
 * A random but valid stack: 2-5 layers of directories, files, symlinks, hard links (to this
 * layer's or lower files), whiteouts and opaque markers over a small name space so that they
 * collide. Each candidate entry is kept only if the layer.md model can still apply the stack.
 */
export function randomStack(seed: number): EntrySpec[][] {
  const rnd = prng(seed);
  const int = (k: number): number => Math.floor(rnd() * k);
  const pick = <T>(a: readonly T[]): T => a[int(a.length)]!;
  const names = ['a', 'b', 'c', 'd'];
  const randomPath = (): string => Array.from({ length: 1 + int(3) }, () => pick(names)).join('/');
  const owners = [0, 0, 1000, 70000];
  const layers: EntrySpec[][] = [];
  const valid = (stack: EntrySpec[][]): TreeEntry[] | undefined => {
    try {
      return expectedTreeFromLayers(stack);
    } catch {
      return undefined;
    }
  };
  for (let l = 0, count = 2 + int(4); l < count; l++) {
    const below = valid(layers) ?? [];
    const layer: EntrySpec[] = [];
    const used = new Set<string>();
    for (let k = 0, ops = 4 + int(12); k < ops; k++) {
      const now = valid([...layers, layer]) ?? [];
      const files = now.filter((e) => e.type === 'file').map((e) => e.path);
      const lowerPaths = below.filter((e) => e.path !== '.').map((e) => e.path);
      const lowerDirs = below.filter((e) => e.type === 'dir' && e.path !== '.').map((e) => e.path);
      const uid = pick(owners);
      let e: EntrySpec;
      switch (pick(['dir', 'file', 'file', 'symlink', 'hardlink', 'whiteout', 'whiteout', 'opaque'] as const)) {
        case 'dir':
          e = { type: 'dir', path: randomPath(), mode: pick([0o755, 0o700, 0o750, 0o1777]), uid, gid: uid };
          break;
        case 'file':
          e = { type: 'file', path: randomPath(), content: `seed ${seed} layer ${l} entry ${k}\n`.repeat(1 + int(3)), mode: pick([0o644, 0o600, 0o4755, 0o640]), uid, gid: uid };
          break;
        case 'symlink':
          e = { type: 'symlink', path: randomPath(), target: pick(['a', '../b', '/c/d', 'a/b/c']) };
          break;
        case 'hardlink': {
          if (files.length === 0) continue;
          const link = { type: 'hardlink' as const, path: randomPath(), target: pick(files) };
          if (link.target === link.path || link.target.startsWith(`${link.path}/`)) continue; // replaced before it is linked
          // Known limit (README): linking to a lower file that has other hard links there copies up
          // that one name only, so the other names stop sharing its inode (content stays equal).
          if (below.find((t) => t.path === link.target)?.linkGroup !== undefined) continue;
          e = link;
          break;
        }
        case 'whiteout':
          e = { type: 'whiteout', path: lowerPaths.length > 0 && rnd() < 0.8 ? pick(lowerPaths) : randomPath() };
          break;
        case 'opaque':
          if (lowerDirs.length === 0) continue;
          e = { type: 'opaque', path: pick(lowerDirs) };
          break;
      }
      // The model does not follow symlinks in parent paths (the fixed test above covers that).
      const symlinks = new Set([...now, ...below].filter((t) => t.type === 'symlink').map((t) => t.path));
      const parts = e.path.split('/');
      const dirs = e.type === 'opaque' ? parts : parts.slice(0, -1);
      if (dirs.some((_, i) => symlinks.has(parts.slice(0, i + 1).join('/')))) continue;
      const key = `${e.type === 'whiteout' ? 'wh:' : e.type === 'opaque' ? 'opq:' : ''}${e.path}`;
      if (used.has(key) || (e.type !== 'whiteout' && e.type !== 'opaque' && used.has(e.path))) continue;
      if (valid([...layers, [...layer, e]]) === undefined) continue;
      layer.push(e);
      used.add(key);
    }
    layers.push(layer);
  }
  return layers;
}
