/**
 * Test helper: deterministic OCI / Docker schema2 images built from a declarative spec.
 * Layers are tar-stream tars (spec order kept, mtime 2024-01-01 unless given, empty uname/gname,
 * PAX for long names), gzip level 6 or uncompressed; the same spec always gives the same digests.
 * Everything is held in memory: these are fixtures, not production code.
 */
import { createHash } from 'node:crypto';
import { Transform, Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import zlib from 'node:zlib';
import tar from 'tar-stream';
import { MediaType } from '../../src/oci.js';

export type EntrySpec =
  | { type: 'file'; path: string; content?: string | Buffer; mode?: number; uid?: number; gid?: number; mtime?: Date }
  | { type: 'dir'; path: string; mode?: number; uid?: number; gid?: number; mtime?: Date }
  | { type: 'symlink'; path: string; target: string; uid?: number; gid?: number }
  | { type: 'hardlink'; path: string; target: string }
  /** writes `<dir>/.wh.<name>` as an empty file */
  | { type: 'whiteout'; path: string }
  /** writes `<path>/.wh..wh..opq` */
  | { type: 'opaque'; path: string }
  /** passed to tar-stream as is (mtime defaults to 2024-01-01), for hostile tests */
  | { type: 'raw'; header: RawHeader; content?: Buffer };

/** tar-stream 3's own header argument type (it ships `Header`; `Headers` was @types/tar-stream's). */
export type RawHeader = Partial<tar.Header> & { name: string };

export interface BuiltBlob { digest: string; size: number; mediaType: string; bytes: Buffer }
export interface BuiltLayer extends BuiltBlob { diffId: string }
export type ImageFormat = 'oci' | 'docker';
export type LayerCompression = 'gzip' | 'none';

export interface ImageSpec {
  layers: (EntrySpec[] | BuiltLayer)[];
  config?: {
    Entrypoint?: string[]; Cmd?: string[]; Env?: string[]; WorkingDir?: string; User?: string;
    Labels?: Record<string, string>; Volumes?: Record<string, object>; ExposedPorts?: Record<string, object>; StopSignal?: string;
  };
  architecture?: string;
  os?: string;
  variant?: string;
  format?: ImageFormat;
  compression?: LayerCompression;
  /** OCI manifest annotations (ignored for Docker manifests, which have none). */
  annotations?: Record<string, string>;
  created?: string;
}
export interface BuiltImage { manifest: BuiltBlob; config: BuiltBlob; layers: BuiltLayer[]; platform: { os: string; architecture: string; variant?: string } }
export interface BuiltIndex { index: BuiltBlob; images: BuiltImage[] }

export const DEFAULT_MTIME = new Date('2024-01-01T00:00:00Z');
export const DEFAULT_CREATED = '2024-01-01T00:00:00Z';
export const GZIP_LEVEL = 6;

const S_IFREG = 0o100000;
const S_IFDIR = 0o040000;
const S_IFLNK = 0o120000;

export function sha256(b: Buffer | string): string {
  return 'sha256:' + createHash('sha256').update(b).digest('hex');
}

export function blobOf(bytes: Buffer, mediaType: string): BuiltBlob {
  return { digest: sha256(bytes), size: bytes.length, mediaType, bytes };
}

function jsonBlob(value: unknown, mediaType: string): BuiltBlob {
  return blobOf(Buffer.from(JSON.stringify(value), 'utf8'), mediaType);
}

/** 'a/b' for '/a/b', './a/b', 'a/b/'; '.' for the root. */
function tarPath(p: string): string {
  const parts = p.split('/').filter((s) => s !== '' && s !== '.');
  return parts.length === 0 ? '.' : parts.join('/');
}

function splitLast(p: string): [string, string] {
  const clean = tarPath(p);
  const i = clean.lastIndexOf('/');
  return i < 0 ? ['', clean] : [clean.slice(0, i + 1), clean.slice(i + 1)];
}

/**
 * tar-stream replaces a zero mode with 0644/0755, so the file-type bits go along with the
 * permission bits: the header carries `mode & 07777` and mode 0 survives.
 */
function headerMode(perm: number, typeBits: number): number {
  return (perm & 0o7777) | typeBits;
}

export interface TarEntry { header: RawHeader; content?: Buffer }

/** ustar holds ids up to 0o777777; larger ones go into PAX `uid` / `gid` records. */
function withBigIds(entry: TarEntry): TarEntry {
  const { uid = 0, gid = 0 } = entry.header;
  if (uid <= 0o777777 && gid <= 0o777777) return entry;
  return { ...entry, header: { ...entry.header, pax: { uid: String(uid), gid: String(gid) } } };
}

export function toTarEntry(e: EntrySpec): TarEntry {
  return e.type === 'raw' ? { header: { mtime: DEFAULT_MTIME, ...e.header }, ...(e.content ? { content: e.content } : {}) } : withBigIds(specEntry(e));
}

function specEntry(e: Exclude<EntrySpec, { type: 'raw' }>): TarEntry {
  const base = { uname: '', gname: '' };
  switch (e.type) {
    case 'file':
      return {
        header: { ...base, name: tarPath(e.path), type: 'file', mode: headerMode(e.mode ?? 0o644, S_IFREG), uid: e.uid ?? 0, gid: e.gid ?? 0, mtime: e.mtime ?? DEFAULT_MTIME },
        content: typeof e.content === 'string' ? Buffer.from(e.content, 'utf8') : (e.content ?? Buffer.alloc(0)),
      };
    case 'dir': {
      const p = tarPath(e.path);
      return { header: { ...base, name: p === '.' ? './' : p + '/', type: 'directory', mode: headerMode(e.mode ?? 0o755, S_IFDIR), uid: e.uid ?? 0, gid: e.gid ?? 0, mtime: e.mtime ?? DEFAULT_MTIME } };
    }
    case 'symlink':
      return { header: { ...base, name: tarPath(e.path), type: 'symlink', linkname: e.target, mode: headerMode(0o777, S_IFLNK), uid: e.uid ?? 0, gid: e.gid ?? 0, mtime: DEFAULT_MTIME } };
    case 'hardlink':
      return { header: { ...base, name: tarPath(e.path), type: 'link', linkname: tarPath(e.target), mode: headerMode(0o644, S_IFREG), uid: 0, gid: 0, mtime: DEFAULT_MTIME } };
    case 'whiteout': {
      const [dir, name] = splitLast(e.path);
      return { header: { ...base, name: `${dir}.wh.${name}`, type: 'file', mode: headerMode(0o644, S_IFREG), uid: 0, gid: 0, mtime: DEFAULT_MTIME }, content: Buffer.alloc(0) };
    }
    case 'opaque': {
      const p = tarPath(e.path);
      return { header: { ...base, name: `${p === '.' ? '' : p + '/'}.wh..wh..opq`, type: 'file', mode: headerMode(0o644, S_IFREG), uid: 0, gid: 0, mtime: DEFAULT_MTIME }, content: Buffer.alloc(0) };
    }
  }
}

function layerMediaType(compression: LayerCompression, format: ImageFormat): string {
  if (format === 'docker') return compression === 'gzip' ? MediaType.DOCKER_LAYER_GZIP : 'application/vnd.docker.image.rootfs.diff.tar';
  return compression === 'gzip' ? MediaType.OCI_LAYER_GZIP : MediaType.OCI_LAYER;
}

/** Adds one entry and resolves once tar-stream has taken all of it (backpressure). */
async function addEntry(pack: tar.Pack, entry: TarEntry): Promise<void> {
  await new Promise<void>((resolve, reject) => {
    const isFile = entry.header.type === undefined || entry.header.type === null || entry.header.type === 'file' || entry.header.type === 'contiguous-file';
    const body = entry.content ?? (isFile ? Buffer.alloc(0) : undefined);
    const cb = (err?: Error | null): void => (err ? reject(err) : resolve());
    if (body !== undefined) pack.entry({ ...entry.header }, body, cb);
    else pack.entry({ ...entry.header }, cb).end(undefined);
  });
}

/** Packs entries (possibly produced lazily) into a layer blob; only the compressed result is held. */
export async function packLayer(
  entries: Iterable<TarEntry> | AsyncIterable<TarEntry>,
  opts: { compression?: LayerCompression; format?: ImageFormat } = {},
): Promise<BuiltLayer> {
  const compression = opts.compression ?? 'gzip';
  const pack = tar.pack();
  const diff = createHash('sha256');
  const chunks: Buffer[] = [];
  const tap = new Transform({
    transform(chunk: Buffer, _enc, cb) {
      diff.update(chunk);
      cb(null, chunk);
    },
  });
  const sink = new Writable({
    write(chunk: Buffer, _enc, cb) {
      chunks.push(chunk);
      cb();
    },
  });
  // a tar-stream Pack is a streamx Readable: pipeline takes it as an async iterable source
  const source: AsyncIterable<unknown> = pack;
  const done = compression === 'gzip'
    ? pipeline(source, tap, zlib.createGzip({ level: GZIP_LEVEL, chunkSize: 256 * 1024 }), sink)
    : pipeline(source, tap, sink);
  try {
    for await (const e of entries) await addEntry(pack, e);
    pack.finalize();
  } catch (err) {
    pack.destroy(err instanceof Error ? err : new Error(String(err)));
    await done.catch(() => undefined);
    throw err;
  }
  await done;
  const bytes = Buffer.concat(chunks);
  return { ...blobOf(bytes, layerMediaType(compression, opts.format ?? 'oci')), diffId: 'sha256:' + diff.digest('hex') };
}

export async function buildLayer(entries: EntrySpec[], opts: { compression?: LayerCompression; format?: ImageFormat } = {}): Promise<BuiltLayer> {
  return await packLayer(entries.map(toTarEntry), opts);
}

/** Config + manifest around already built layers. */
export function assembleImage(layers: BuiltLayer[], spec: Omit<ImageSpec, 'layers'>): BuiltImage {
  const format = spec.format ?? 'oci';
  const created = spec.created ?? DEFAULT_CREATED;
  const platform = { os: spec.os ?? 'linux', architecture: spec.architecture ?? 'amd64', ...(spec.variant ? { variant: spec.variant } : {}) };
  const config = jsonBlob(
    {
      created,
      architecture: platform.architecture,
      os: platform.os,
      ...(platform.variant ? { variant: platform.variant } : {}),
      config: spec.config ?? {},
      rootfs: { type: 'layers', diff_ids: layers.map((l) => l.diffId) },
      history: layers.map((_, i) => ({ created, created_by: `guestpull test helper: layer ${i}` })),
    },
    format === 'docker' ? MediaType.DOCKER_CONFIG : MediaType.OCI_CONFIG,
  );
  const desc = (b: BuiltBlob): { mediaType: string; digest: string; size: number } => ({ mediaType: b.mediaType, digest: b.digest, size: b.size });
  const manifestType = format === 'docker' ? MediaType.DOCKER_MANIFEST : MediaType.OCI_MANIFEST;
  const manifest = jsonBlob(
    {
      schemaVersion: 2,
      mediaType: manifestType,
      config: desc(config),
      layers: layers.map(desc),
      ...(format === 'oci' && spec.annotations ? { annotations: spec.annotations } : {}),
    },
    manifestType,
  );
  return { manifest, config, layers, platform };
}

export async function buildImage(spec: ImageSpec): Promise<BuiltImage> {
  const layers: BuiltLayer[] = [];
  for (const l of spec.layers) {
    layers.push(Array.isArray(l) ? await buildLayer(l, { compression: spec.compression ?? 'gzip', format: spec.format ?? 'oci' }) : l);
  }
  return assembleImage(layers, spec);
}

/** An OCI index or Docker manifest list; the format defaults to Docker only when every image is Docker. */
export function buildIndex(images: BuiltImage[], opts: { format?: ImageFormat } = {}): BuiltIndex {
  const allDocker = images.length > 0 && images.every((i) => i.manifest.mediaType === MediaType.DOCKER_MANIFEST);
  const format = opts.format ?? (allDocker ? 'docker' : 'oci');
  const mediaType = format === 'docker' ? MediaType.DOCKER_MANIFEST_LIST : MediaType.OCI_INDEX;
  const index = jsonBlob(
    {
      schemaVersion: 2,
      mediaType,
      manifests: images.map((i) => ({ mediaType: i.manifest.mediaType, digest: i.manifest.digest, size: i.manifest.size, platform: i.platform })),
    },
    mediaType,
  );
  return { index, images };
}

export { buildSyntheticImage, sampleImage } from './synthetic-image.js';
