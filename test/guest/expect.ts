/**
 * Guest test: what a bundle must contain, computed on the host from the layer blobs the test built
 * (read back with tar-stream and gunzip, applied by the test helpers' own model of the layer rules in
 * test/helpers/tree.ts), never from guestpull's code. The result goes into the guest plan as a list
 * of entries the agent stand-in compares with the unpacked rootfs.
 */
import zlib from 'node:zlib';
import tar from 'tar-stream';
import type { BuiltImage, EntrySpec } from '../helpers/image-builder.js';
import { expectedTreeFromLayers } from '../helpers/tree.js';

export interface PlanEntry {
  path: string;
  type: 'file' | 'dir' | 'symlink' | 'other';
  mode: number;
  uid: number;
  gid: number;
  size: number;
  sha256?: string;
  target?: string;
  /** The first path (in path order) of the hard-link group this entry belongs to. */
  linkTo?: string;
}

/** A layer blob's tar entries as raw EntrySpecs, content included (the blobs are our own fixtures: held in memory). */
async function layerEntries(bytes: Buffer, mediaType: string): Promise<EntrySpec[]> {
  let tarBytes: Buffer;
  if (/gzip/.test(mediaType)) tarBytes = zlib.gunzipSync(bytes);
  else if (/tar$/.test(mediaType)) tarBytes = bytes;
  else throw new Error(`expect: layer media type ${mediaType} is not handled by the guest test`);
  const entries: EntrySpec[] = [];
  const extract = tar.extract();
  extract.end(tarBytes);
  for await (const entry of extract) {
    const chunks: Buffer[] = [];
    for await (const c of entry) chunks.push(c as Buffer);
    entries.push({ type: 'raw', header: { ...entry.header }, content: Buffer.concat(chunks) });
  }
  return entries;
}

/**
 * The expected rootfs of `image`. `hashEvery`: 1 hashes every file, N every N-th file (in path
 * order) plus the largest, to bound the time the guest spends hashing a big image under TCG.
 */
export async function expectedRootfs(image: BuiltImage, hashEvery = 1): Promise<PlanEntry[]> {
  const layers: EntrySpec[][] = [];
  for (const l of image.layers) layers.push(await layerEntries(l.bytes, l.mediaType));
  const tree = expectedTreeFromLayers(layers);
  const firstOfGroup = new Map<number, string>();
  const largest = tree.filter((e) => e.type === 'file').sort((a, b) => b.size - a.size)[0]?.path;
  let fileIndex = 0;
  return tree.map((e): PlanEntry => {
    const out: PlanEntry = { path: e.path, type: e.type, mode: e.mode, uid: e.uid, gid: e.gid, size: e.size };
    if (e.type === 'file') {
      if (e.sha256 !== undefined && (fileIndex % hashEvery === 0 || e.path === largest)) out.sha256 = e.sha256;
      fileIndex++;
    }
    if (e.target !== undefined) out.target = e.target;
    if (e.linkGroup !== undefined) {
      const first = firstOfGroup.get(e.linkGroup);
      if (first === undefined) firstOfGroup.set(e.linkGroup, e.path);
      else out.linkTo = first;
    }
    return out;
  });
}
