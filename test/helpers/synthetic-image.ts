/**
 * Test helper: fixed images for the demo and for performance tests. `buildSyntheticImage` makes a
 * seeded, deterministic image whose files have a heavy-tailed size mix and content that compresses
 * like real binaries (random runs, zero padding, back-references) and text (words from a small
 * vocabulary). File content is generated one file at a time and streamed through tar + gzip; the
 * compressed layers are held in memory (BuiltLayer.bytes), the uncompressed data never is.
 * Imported through image-builder.ts (which re-exports it): no top-level use of its bindings here.
 */
import { createCipheriv, createHash } from 'node:crypto';
import {
  assembleImage, buildImage, DEFAULT_MTIME, packLayer,
  type BuiltImage, type BuiltLayer, type LayerCompression, type TarEntry,
} from './image-builder.js';

/** mulberry32: a small seeded PRNG, uniform in [0, 1). */
export function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Deterministic incompressible bytes: AES-128-CTR keystream keyed by (seed, stream id). */
function keystream(seed: number, id: number): (n: number) => Buffer {
  const key = createHash('sha256').update(`guestpull-synthetic:${seed}:${id}`).digest().subarray(0, 16);
  const cipher = createCipheriv('aes-128-ctr', key, Buffer.alloc(16));
  return (n) => cipher.update(Buffer.alloc(n));
}

const WINDOW = 32 * 1024;

function binaryContent(size: number, rnd: () => number, random: (n: number) => Buffer): Buffer {
  const out = Buffer.alloc(size);
  let pos = 0;
  while (pos < size) {
    const len = Math.min(size - pos, 16 + Math.floor(rnd() * 2048));
    const r = rnd();
    if (r < 0.45 || pos < 64) {
      random(len).copy(out, pos);
    } else if (r < 0.7) {
      out.fill(rnd() < 0.8 ? 0 : Math.floor(rnd() * 256), pos, pos + len); // padding / tables
    } else {
      const back = 1 + Math.floor(rnd() * Math.min(pos, WINDOW)); // 1..min(pos, 32 KiB)
      const copied = Math.min(len, back);
      out.copy(out, pos, pos - back, pos - back + copied); // a repeated sequence
      if (copied < len) random(len - copied).copy(out, pos + copied);
    }
    pos += len;
  }
  return out;
}

function textCorpus(seed: number): Buffer {
  const rnd = prng(seed ^ 0x5eed7e47);
  const letters = 'etaoinshrdlucmfwypvbgkjqxz_';
  const vocab: string[] = [];
  for (let i = 0; i < 600; i++) {
    let w = '';
    const n = 2 + Math.floor(rnd() * 9);
    for (let j = 0; j < n; j++) w += letters[Math.floor(Math.pow(rnd(), 1.7) * letters.length)];
    vocab.push(w);
  }
  const parts: string[] = [];
  let len = 0;
  while (len < 256 * 1024) {
    const indent = '    '.repeat(Math.floor(rnd() * 4));
    const words: string[] = [];
    const n = 3 + Math.floor(rnd() * 10);
    for (let j = 0; j < n; j++) words.push(vocab[Math.floor(Math.pow(rnd(), 2) * vocab.length)]!);
    const line = `${indent}${words.join(rnd() < 0.3 ? '_' : ' ')}${rnd() < 0.2 ? ` = ${Math.floor(rnd() * 100000)}` : ''}\n`;
    parts.push(line);
    len += line.length;
  }
  return Buffer.from(parts.join(''), 'utf8');
}

function textContent(size: number, rnd: () => number, corpus: Buffer): Buffer {
  const out = Buffer.alloc(size);
  let pos = 0;
  while (pos < size) {
    const len = Math.min(size - pos, 200 + Math.floor(rnd() * 4000));
    const from = Math.floor(rnd() * (corpus.length - len));
    corpus.copy(out, pos, from, from + len);
    pos += len;
  }
  return out;
}

/** Heavy-tailed sizes (log-uniform over ~6 decades) scaled to sum exactly to totalBytes. */
function fileSizes(n: number, totalBytes: number, rnd: () => number): number[] {
  const w = Array.from({ length: n }, () => Math.exp(rnd() * Math.log(1e6)));
  const sum = w.reduce((a, b) => a + b, 0);
  const sizes = w.map((x) => Math.floor((x / sum) * totalBytes));
  const rest = totalBytes - sizes.reduce((a, b) => a + b, 0);
  if (n > 0) sizes[n - 1] = sizes[n - 1]! + rest;
  return sizes;
}

const TEXT_EXT = ['txt', 'py', 'conf', 'json', 'sh'];
const BIN_EXT = ['so', 'bin', 'a', 'pyc'];
const FILES_PER_DIR = 25;
const ROOT = 'usr/lib/synthetic';

export async function buildSyntheticImage(opts: { seed: number; layers: number; totalBytes: number; files: number; compression?: LayerCompression }): Promise<BuiltImage> {
  const { seed, files, totalBytes } = opts;
  const nLayers = Math.max(1, opts.layers);
  const rnd = prng(seed);
  const sizes = fileSizes(files, totalBytes, rnd);
  const kinds = sizes.map(() => (rnd() < 0.55 ? 'bin' : 'text'));
  const corpus = textCorpus(seed);
  // Split the files into layers of about equal byte counts, keeping their order.
  const bounds: number[] = [];
  let acc = 0;
  for (let i = 0, k = 1; i < files; i++) {
    acc += sizes[i]!;
    while (k < nLayers && acc >= (k * totalBytes) / nLayers) {
      bounds.push(i + 1);
      k++;
    }
  }
  while (bounds.length < nLayers - 1) bounds.push(files);
  bounds.push(files);

  const mtime = DEFAULT_MTIME;
  const dirEntry = (name: string): TarEntry => ({ header: { name: name + '/', type: 'directory', mode: 0o755, uid: 0, gid: 0, mtime, uname: '', gname: '' } });
  const layers: BuiltLayer[] = [];
  let start = 0;
  for (let k = 0; k < nLayers; k++) {
    const end = bounds[k]!;
    const first = start;
    async function* entries(): AsyncGenerator<TarEntry> {
      if (k === 0) for (const d of ['usr', 'usr/lib', ROOT]) yield dirEntry(d);
      for (let i = first; i < end; i++) {
        const dir = `${ROOT}/d${Math.floor(i / FILES_PER_DIR)}`;
        if (i === first || i % FILES_PER_DIR === 0) yield dirEntry(dir);
        const frnd = prng((seed * 1_000_003 + i) >>> 0);
        const exts = kinds[i] === 'bin' ? BIN_EXT : TEXT_EXT;
        const name = `f${i}.${exts[i % exts.length]}`;
        const content = kinds[i] === 'bin' ? binaryContent(sizes[i]!, frnd, keystream(seed, i)) : textContent(sizes[i]!, frnd, corpus);
        const mode = kinds[i] === 'bin' && i % 3 === 0 ? 0o755 : 0o644;
        yield { header: { name: `${dir}/${name}`, type: 'file', mode, uid: 0, gid: 0, mtime, uname: '', gname: '' }, content };
        if (i % 40 === 39) yield { header: { name: `${dir}/${name}.link`, type: 'symlink', linkname: name, mode: 0o777, uid: 0, gid: 0, mtime, uname: '', gname: '' } };
      }
    }
    layers.push(await packLayer(entries(), { compression: opts.compression ?? 'gzip', format: 'oci' }));
    start = end;
  }
  return assembleImage(layers, {
    config: { Cmd: ['/bin/sh'], Env: ['PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'] },
    annotations: { 'org.example.synthetic': `seed=${seed},layers=${nLayers},bytes=${totalBytes},files=${files}` },
  });
}

const PASSWD = 'root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n';
const GROUP = 'root:x:0:\napp:x:1000:\nnogroup:x:65534:\n';
const HELLO = '#!/bin/sh\necho "hello from the guestpull sample image (user $(id -u))"\n';

/** A small fixed busybox-like image: /bin with applet symlinks, /etc/passwd with 'app' (1000), a hello script. */
export async function sampleImage(): Promise<BuiltImage> {
  const busybox = Buffer.from('\x7fELF-not-really: guestpull sample stand-in for busybox\n', 'latin1');
  return await buildImage({
    layers: [
      [
        { type: 'dir', path: 'bin' },
        { type: 'file', path: 'bin/busybox', content: busybox, mode: 0o755 },
        { type: 'symlink', path: 'bin/sh', target: 'busybox' },
        { type: 'symlink', path: 'bin/ls', target: '/bin/busybox' },
        { type: 'hardlink', path: 'bin/cat', target: 'bin/busybox' },
        { type: 'dir', path: 'etc' },
        { type: 'file', path: 'etc/passwd', content: PASSWD },
        { type: 'file', path: 'etc/group', content: GROUP },
        { type: 'dir', path: 'home' },
        { type: 'dir', path: 'home/app', mode: 0o750, uid: 1000, gid: 1000 },
        { type: 'dir', path: 'tmp', mode: 0o1777 },
        { type: 'dir', path: 'usr' },
        { type: 'dir', path: 'usr/bin' },
        { type: 'symlink', path: 'usr/bin/env', target: '../../bin/busybox' },
      ],
      [
        { type: 'file', path: 'usr/bin/hello', content: HELLO, mode: 0o755 },
        { type: 'file', path: 'home/app/greeting', content: 'hi app\n', mode: 0o640, uid: 1000, gid: 1000 },
        { type: 'file', path: 'etc/motd', content: 'guestpull sample\n' },
      ],
    ],
    config: {
      Entrypoint: ['/bin/sh', '/usr/bin/hello'],
      Env: ['PATH=/usr/sbin:/usr/bin:/sbin:/bin', 'GREETING=hello'],
      WorkingDir: '/home/app',
      User: 'app',
      Labels: { 'org.opencontainers.image.title': 'guestpull-sample' },
      StopSignal: 'SIGTERM',
    },
  });
}
