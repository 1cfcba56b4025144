/**
 * Image config blobs cached by digest (`configs/<algo>/<hex>`), so that pulling an image whose
 * layers are all in the store costs one manifest request. A cached file is checked against its
 * digest every time it is read (a config is a few KiB); one that does not match is removed.
 */
import { createHash } from 'node:crypto';
import { mkdir, open, unlink } from 'node:fs/promises';
import path from 'node:path';
import { parseDigest } from '../../oci.js';
import type { Layout } from './layout.js';
import { writeBytesAtomic } from './records.js';

export class ConfigCache {
  constructor(private readonly layout: Layout) {}

  /** The verified bytes of `digest`, or undefined when not cached (or not larger than `maxBytes`). */
  async get(digest: string, maxBytes: number): Promise<Buffer | undefined> {
    const { algorithm, hex } = parseDigest(digest);
    const file = this.layout.configFile(digest);
    let bytes: Buffer;
    try {
      const fh = await open(file, 'r');
      try {
        const st = await fh.stat();
        if (!st.isFile() || st.size > maxBytes) return undefined;
        bytes = Buffer.alloc(st.size);
        const { bytesRead } = await fh.read(bytes, 0, st.size, 0);
        if (bytesRead !== st.size) return undefined;
      } finally {
        await fh.close();
      }
    } catch {
      return undefined;
    }
    if (createHash(algorithm).update(bytes).digest('hex') !== hex) {
      await unlink(file).catch(() => undefined);
      return undefined;
    }
    return bytes;
  }

  /** Cache `bytes`, which the caller has verified to have digest `digest`. */
  async put(digest: string, bytes: Buffer): Promise<void> {
    const file = this.layout.configFile(digest);
    await mkdir(path.dirname(file), { recursive: true, mode: 0o700 });
    await writeBytesAtomic(file, bytes);
  }
}
