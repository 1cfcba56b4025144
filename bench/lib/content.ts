/**
 * Benchmark file content: seeded and deterministic, produced chunk by chunk so a 64 MiB file
 * never has to exist in memory at once. Two kinds, tuned for gzip -6 on realistic data:
 * `text` (source, configs, docs: words from a Zipf-weighted vocabulary, ~3:1) and `binary`
 * (libraries, bytecode, assets: incompressible runs, padding and repeats, ~2:1).
 */
import { createCipheriv, createHash } from 'node:crypto';

export type ContentKind = 'text' | 'binary';

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

/** A 32-bit seed derived from any labels (stable across runs and platforms). */
export function seedOf(...parts: (string | number)[]): number {
  return createHash('sha256').update(parts.join('\0')).digest().readUInt32LE(0);
}

/** Deterministic incompressible bytes: an AES-128-CTR keystream keyed by the seed. */
export function keystream(seed: number): (n: number) => Buffer {
  const key = createHash('sha256').update(`guestpull-bench-keystream:${seed}`).digest().subarray(0, 16);
  const cipher = createCipheriv('aes-128-ctr', key, Buffer.alloc(16));
  return (n) => cipher.update(Buffer.alloc(n));
}

const CORPUS_BYTES = 1024 * 1024;

/** Text the `text` kind samples from: indented lines of Zipf-weighted words, numbers, punctuation. */
export function textCorpus(seed: number): Buffer {
  const rnd = prng(seed ^ 0x7e47c0de);
  const letters = 'etaoinshrdlcumwfgypbvkjxqz';
  const vocab: string[] = [];
  for (let i = 0; i < 700; i++) {
    let w = '';
    const n = 2 + Math.floor(rnd() * 7);
    for (let j = 0; j < n; j++) w += letters[Math.floor(Math.pow(rnd(), 1.5) * letters.length)];
    vocab.push(rnd() < 0.15 ? w[0]!.toUpperCase() + w.slice(1) : w);
  }
  const seps = [' ', ' ', ' ', ' ', '_', '.', ', ', '(', ') ', ' = ', ': ', '/'];
  const parts: string[] = [];
  let len = 0;
  while (len < CORPUS_BYTES) {
    const indent = '  '.repeat(Math.floor(rnd() * 6));
    let line = indent;
    const n = 2 + Math.floor(rnd() * 12);
    for (let j = 0; j < n; j++) {
      line += vocab[Math.floor(Math.pow(rnd(), 3.5) * vocab.length)]!;
      if (rnd() < 0.05) line += String(Math.floor(rnd() * 1_000_000));
      line += seps[Math.floor(rnd() * seps.length)]!;
    }
    line += '\n';
    parts.push(line);
    len += line.length;
  }
  return Buffer.from(parts.join(''), 'utf8').subarray(0, CORPUS_BYTES);
}

const BACKREF_WINDOW = 32 * 1024;
/** Share of text pieces that repeat earlier text of the same file. */
const TEXT_REPEAT = 0.3;

/** Fills `out` with text: slices of the corpus at random offsets, some repeated. */
function fillText(out: Buffer, rnd: () => number, corpus: Buffer): void {
  let pos = 0;
  while (pos < out.length) {
    const len = Math.min(out.length - pos, 64 + Math.floor(rnd() * 1500));
    if (pos >= 256 && rnd() < TEXT_REPEAT) {
      // repeated structure (boilerplate, similar lines) within gzip's window
      const back = 64 + Math.floor(rnd() * (Math.min(pos, BACKREF_WINDOW) - 64));
      const copied = Math.min(len, back);
      out.copy(out, pos, pos - back, pos - back + copied);
      pos += copied;
      continue;
    }
    const from = Math.floor(rnd() * (corpus.length - len));
    corpus.copy(out, pos, from, from + len);
    pos += len;
  }
}

/** Fills `out` like a compiled artifact: random runs, zero/byte padding, repeats within 32 KiB. */
function fillBinary(out: Buffer, rnd: () => number, random: (n: number) => Buffer): void {
  let pos = 0;
  while (pos < out.length) {
    const len = Math.min(out.length - pos, 16 + Math.floor(rnd() * 1024));
    const r = rnd();
    if (r < 0.42 || pos < 64) {
      random(len).copy(out, pos);
    } else if (r < 0.62) {
      out.fill(rnd() < 0.85 ? 0 : Math.floor(rnd() * 256), pos, pos + len);
    } else {
      const back = 1 + Math.floor(rnd() * Math.min(pos, BACKREF_WINDOW));
      const copied = Math.min(len, back);
      out.copy(out, pos, pos - back, pos - back + copied);
      if (copied < len) random(len - copied).copy(out, pos + copied);
    }
    pos += len;
  }
}

/**
 * A file's content as a chunk source: call it with the size of the next chunk until the file is
 * complete. The same (kind, seed, corpus) and chunk sizes always give the same bytes.
 */
export function contentSource(kind: ContentKind, seed: number, corpus: Buffer): (n: number) => Buffer {
  const rnd = prng(seed);
  if (kind === 'text') {
    return (n) => {
      const out = Buffer.allocUnsafe(n);
      fillText(out, rnd, corpus);
      return out;
    };
  }
  const random = keystream(seed);
  return (n) => {
    const out = Buffer.allocUnsafe(n);
    fillBinary(out, rnd, random);
    return out;
  };
}
