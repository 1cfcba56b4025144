/**
 * Soak: the images the clients pull. Six images from eight generated layers: a small one with
 * links, four that stack on one shared base layer (one with whiteouts and an opaque directory over
 * the base, two sharing a second layer too), and a big two-layer one (~46 MB at scale 1). File
 * contents are deterministic (AES-CTR keystream per file) and half incompressible, so gzip leaves
 * most of the bytes on the wire. After pushing, only what verification needs is kept: each image's
 * manifest digest, command and expected tree (test/helpers/tree.ts). New generations of every
 * image (a fresh bottom layer) keep the layer store from answering everything from its cache.
 */
import { createCipheriv, createHash } from 'node:crypto';
import { assembleImage, buildLayer, type BuiltLayer, type EntrySpec } from '../helpers/image-builder.js';
import { pushBlob, pushImage } from '../helpers/push.js';
import { expectedTreeFromLayers, type TreeEntry } from '../helpers/tree.js';

export interface SoakImage {
  name: string;
  /** `<repo>:<tag>` without a host: the clients prefix the fault proxy's host:port. */
  path: string;
  digest: string;
  /** process.args the bundle's config.json must carry. */
  args: string[];
  expected: TreeEntry[];
  layers: number;
  /** Sum of the compressed layer sizes. */
  bytes: number;
  /** Sum of the file sizes. */
  unpackedBytes: number;
}

const MB = 1024 * 1024;

/** `size` deterministic bytes: 64 KiB blocks alternating keystream and a repeated short pattern. */
export function fileContent(tag: string, size: number): Buffer {
  const key = createHash('sha256').update(`guestpull-soak:${tag}`).digest();
  const cipher = createCipheriv('aes-128-ctr', key.subarray(0, 16), key.subarray(16, 32));
  const out = Buffer.alloc(size);
  const block = 64 * 1024;
  for (let pos = 0, i = 0; pos < size; pos += block, i++) {
    const n = Math.min(block, size - pos);
    if (i % 2 === 0) cipher.update(Buffer.alloc(n)).copy(out, pos);
    else out.fill(`${tag}:${i} `, pos, pos + n);
  }
  return out;
}

/** `count` files under `dir` sharing `bytes` (log-spread sizes, at least 1 byte each). */
function files(dir: string, count: number, bytes: number, tag: string): EntrySpec[] {
  const out: EntrySpec[] = [{ type: 'dir', path: dir }];
  const weights = Array.from({ length: count }, (_, i) => 2 ** ((i * 7) % 11));
  const sum = weights.reduce((a, b) => a + b, 0);
  for (let i = 0; i < count; i++) {
    const size = Math.max(1, Math.floor((bytes * weights[i]!) / sum));
    out.push({ type: 'file', path: `${dir}/f${i}`, content: fileContent(`${tag}/${i}`, size), mode: i % 4 === 0 ? 0o755 : 0o644 });
  }
  return out;
}

function layerSpecs(scale: number): Record<string, EntrySpec[]> {
  const mb = (n: number): number => Math.max(4096, Math.round(n * MB * scale));
  return {
    tiny: [
      { type: 'dir', path: 'bin' },
      { type: 'file', path: 'bin/tool', content: fileContent('tiny/tool', mb(1.2)), mode: 0o755 },
      { type: 'symlink', path: 'bin/sh', target: 'tool' },
      { type: 'hardlink', path: 'bin/tool-link', target: 'bin/tool' },
      { type: 'dir', path: 'etc' },
      { type: 'file', path: 'etc/passwd', content: 'root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n' },
      { type: 'dir', path: 'home/app', mode: 0o750, uid: 1000, gid: 1000 },
      { type: 'file', path: 'home/app/note', content: 'soak\n', mode: 0o600, uid: 1000, gid: 1000 },
      ...files('usr/share/tiny', 6, mb(0.3), 'tiny'),
    ],
    base: [
      { type: 'dir', path: 'etc' },
      { type: 'file', path: 'etc/os-release', content: 'ID=soak\n' },
      { type: 'file', path: 'etc/removed-by-b', content: 'gone in app-b\n' },
      { type: 'dir', path: 'var/cache', mode: 0o700 },
      { type: 'file', path: 'var/cache/old', content: 'hidden by the opaque marker of app-b\n' },
      { type: 'dir', path: 'usr/lib' },
      ...files('usr/lib/base', 24, mb(14), 'base'),
      { type: 'symlink', path: 'usr/lib/current', target: 'base' },
      { type: 'hardlink', path: 'usr/lib/base-first', target: 'usr/lib/base/f0' },
    ],
    a: [...files('opt/a', 10, mb(4), 'a'), { type: 'hardlink', path: 'opt/a/lower-link', target: 'usr/lib/base/f1' }],
    b: [
      { type: 'whiteout', path: 'etc/removed-by-b' },
      { type: 'opaque', path: 'var/cache' },
      { type: 'file', path: 'var/cache/new', content: 'after the opaque marker\n' },
      { type: 'whiteout', path: 'usr/lib/base/f2' },
      ...files('opt/b', 12, mb(6), 'b'),
    ],
    mid: files('usr/share/mid', 16, mb(10), 'mid'),
    c: [...files('opt/c', 4, mb(2), 'c'), { type: 'file', path: 'etc/os-release', content: 'ID=soak-c\n', mode: 0o600 }],
    big1: files('data/one', 20, mb(22), 'big1'),
    big2: files('data/two', 20, mb(24), 'big2'),
  };
}

const IMAGES: Record<string, string[]> = {
  tiny: ['tiny'],
  'app-a': ['base', 'a'],
  'app-b': ['base', 'b'],
  'app-c': ['base', 'mid', 'c'],
  'app-d': ['base', 'mid'],
  big: ['big1', 'big2'],
};

/** The file the generation layer adds at the bottom of every image. */
const GENERATION_FILE = 'soak-generation';
/** Generations the clients still pick from (the newest most of the time). */
const KEEP_GENERATIONS = 4;
const NEWEST_SHARE = 0.8;

interface Template {
  name: string;
  /** Layer metadata only: the bytes are in the registry, pushImage skips blobs it already has. */
  layers: BuiltLayer[];
  args: string[];
  expected: TreeEntry[];
  unpackedBytes: number;
}

/** A one-file layer that makes every chain ID above it new, and the tree entry it adds. */
async function bottomLayer(content: string): Promise<{ layer: BuiltLayer; entry: TreeEntry; bytes: number }> {
  const spec: EntrySpec[] = [{ type: 'file', path: GENERATION_FILE, content }];
  const entry = expectedTreeFromLayers([spec]).find((e) => e.path === GENERATION_FILE)!;
  return { layer: await buildLayer(spec), entry, bytes: Buffer.byteLength(content) };
}

/**
 * The images of every generation. Generation N puts one tiny layer of its own (`soak-generation`)
 * at the bottom of every image, so each generation changes every chain ID: its first pulls fetch
 * and unpack every layer again (the store is keyed by chain ID), its later ones are cached.
 * `fresh` pushes one image on a bottom layer of its own, for a pull that is cold whatever the cache.
 */
export class SoakImages {
  private readonly generations: SoakImage[][] = [];
  private next = 0;
  private freshCount = 0;

  private constructor(
    private readonly registryUrl: string,
    private readonly templates: Template[],
  ) {}

  /** Builds the layers, pushes generation 0 of every image to `soak/<name>:g0`. */
  static async create(registryUrl: string, scale: number): Promise<SoakImages> {
    const specs = layerSpecs(scale);
    const built = new Map<string, BuiltLayer>();
    for (const [name, spec] of Object.entries(specs)) built.set(name, await buildLayer(spec));
    const templates: Template[] = [];
    for (const [name, layerNames] of Object.entries(IMAGES)) {
      const layers = layerNames.map((l) => built.get(l)!);
      // Into each repository that uses them (a registry links blobs per repository).
      for (const l of layers) await pushBlob(registryUrl, `soak/${name}`, l);
      const layerSpecsOf = layerNames.map((l) => specs[l]!);
      templates.push({
        name,
        layers: layers.map((l) => ({ ...l, bytes: Buffer.alloc(0) })),
        args: [`/soak/${name}`],
        expected: expectedTreeFromLayers(layerSpecsOf),
        unpackedBytes: layerSpecsOf.flat().reduce((n, e) => n + (e.type === 'file' && e.content !== undefined ? Buffer.byteLength(e.content) : 0), 0),
      });
    }
    const set = new SoakImages(registryUrl, templates);
    await set.pushGeneration();
    return set;
  }

  get generation(): number {
    return this.next - 1;
  }

  /** Digests of the generated layers of at least `minBytes` (every generation and fresh image shares them). */
  layerDigests(minBytes: number): string[] {
    const all = this.templates.flatMap((t) => t.layers).filter((l) => l.size >= minBytes);
    return [...new Set(all.map((l) => l.digest))];
  }

  /** The images of the newest generation. */
  get latest(): SoakImage[] {
    return this.generations[this.generations.length - 1]!;
  }

  /** Pushes the next generation of every image (`soak/<name>:g<N>`). */
  async pushGeneration(): Promise<void> {
    const g = this.next++;
    const bottom = await bottomLayer(`generation ${g}\n`);
    const images: SoakImage[] = [];
    for (const t of this.templates) images.push(await this.push(t, `g${g}`, bottom));
    this.generations.push(images);
    if (this.generations.length > KEEP_GENERATIONS) this.generations.shift();
  }

  /** One image on a bottom layer of its own (`soak/<name>:f<N>`): a pull of it shares no layer with anything before. */
  async fresh(rnd: () => number): Promise<SoakImage> {
    const n = this.freshCount++;
    const t = this.templates[Math.floor(rnd() * this.templates.length)]!;
    return await this.push(t, `f${n}`, await bottomLayer(`fresh ${n}\n`));
  }

  private async push(t: Template, tag: string, bottom: { layer: BuiltLayer; entry: TreeEntry; bytes: number }): Promise<SoakImage> {
    const layers = [bottom.layer, ...t.layers];
    const image = assembleImage(layers, { config: { Cmd: t.args, Env: ['PATH=/usr/bin:/bin'] } });
    const digest = await pushImage(this.registryUrl, `soak/${t.name}`, tag, image);
    return {
      name: t.name,
      path: `soak/${t.name}:${tag}`,
      digest,
      args: t.args,
      expected: [...t.expected, bottom.entry],
      layers: layers.length,
      bytes: layers.reduce((n, l) => n + l.size, 0),
      unpackedBytes: t.unpackedBytes + bottom.bytes,
    };
  }

  /** An image of the newest generation most of the time, else of one of the few before it. */
  pick(rnd: () => number): SoakImage {
    const older = this.generations.length - 1;
    const gen = older > 0 && rnd() >= NEWEST_SHARE ? this.generations[Math.floor(rnd() * older)]! : this.latest;
    return gen[Math.floor(rnd() * gen.length)]!;
  }
}
