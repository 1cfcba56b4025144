/**
 * OCI image-spec and Docker schema2 shapes, parsed with zod at the edge. Everything here is
 * untrusted input from a registry until it has passed these schemas.
 */
import { z } from 'zod';
import { ErrorCode, GuestpullError } from './errors.js';

export const MediaType = {
  OCI_INDEX: 'application/vnd.oci.image.index.v1+json',
  OCI_MANIFEST: 'application/vnd.oci.image.manifest.v1+json',
  OCI_CONFIG: 'application/vnd.oci.image.config.v1+json',
  OCI_LAYER: 'application/vnd.oci.image.layer.v1.tar',
  OCI_LAYER_GZIP: 'application/vnd.oci.image.layer.v1.tar+gzip',
  OCI_LAYER_ZSTD: 'application/vnd.oci.image.layer.v1.tar+zstd',
  OCI_LAYER_ND: 'application/vnd.oci.image.layer.nondistributable.v1.tar',
  OCI_LAYER_ND_GZIP: 'application/vnd.oci.image.layer.nondistributable.v1.tar+gzip',
  OCI_LAYER_ND_ZSTD: 'application/vnd.oci.image.layer.nondistributable.v1.tar+zstd',
  DOCKER_MANIFEST_LIST: 'application/vnd.docker.distribution.manifest.list.v2+json',
  DOCKER_MANIFEST: 'application/vnd.docker.distribution.manifest.v2+json',
  DOCKER_MANIFEST_V1: 'application/vnd.docker.distribution.manifest.v1+json',
  DOCKER_MANIFEST_V1_SIGNED: 'application/vnd.docker.distribution.manifest.v1+prettyjws',
  DOCKER_CONFIG: 'application/vnd.docker.container.image.v1+json',
  DOCKER_LAYER_GZIP: 'application/vnd.docker.image.rootfs.diff.tar.gzip',
  DOCKER_LAYER_FOREIGN_GZIP: 'application/vnd.docker.image.rootfs.foreign.diff.tar.gzip',
} as const;

/** The Accept header for manifest requests: every manifest kind we can use, preferred first. */
export const MANIFEST_ACCEPT = [
  MediaType.OCI_INDEX,
  MediaType.OCI_MANIFEST,
  MediaType.DOCKER_MANIFEST_LIST,
  MediaType.DOCKER_MANIFEST,
].join(', ');

export type Compression = 'gzip' | 'zstd' | 'none';

/** The compression of a layer media type, or undefined when it is not a layer type we know. */
export function layerCompression(mediaType: string): Compression | undefined {
  switch (mediaType) {
    case MediaType.OCI_LAYER:
    case MediaType.OCI_LAYER_ND:
      return 'none';
    case MediaType.OCI_LAYER_GZIP:
    case MediaType.OCI_LAYER_ND_GZIP:
    case MediaType.DOCKER_LAYER_GZIP:
    case MediaType.DOCKER_LAYER_FOREIGN_GZIP:
      return 'gzip';
    case MediaType.OCI_LAYER_ZSTD:
    case MediaType.OCI_LAYER_ND_ZSTD:
      return 'zstd';
    default:
      return undefined;
  }
}

const DIGEST_HEX_LENGTH: Record<string, number> = { sha256: 64, sha512: 128 };

/** A digest string `algorithm:hex`, checked for a known algorithm, lowercase hex and exact length. */
export function isValidDigest(d: string): boolean {
  const m = /^([a-z0-9]+):([0-9a-f]+)$/.exec(d);
  if (!m) return false;
  const len = DIGEST_HEX_LENGTH[m[1]!];
  return len !== undefined && m[2]!.length === len;
}

export function parseDigest(d: string): { algorithm: 'sha256' | 'sha512'; hex: string } {
  if (!isValidDigest(d)) {
    throw new GuestpullError(ErrorCode.BAD_IMAGE, `invalid digest ${JSON.stringify(d.slice(0, 200))}: expected sha256:<64 hex> or sha512:<128 hex>`);
  }
  const [algorithm, hex] = d.split(':') as ['sha256' | 'sha512', string];
  return { algorithm, hex };
}

export const Digest = z.string().refine(isValidDigest, { message: 'invalid digest (want sha256:<64 lowercase hex> or sha512:<128>)' });

export const Platform = z.object({
  architecture: z.string(),
  os: z.string(),
  'os.version': z.string().optional(),
  'os.features': z.array(z.string()).optional(),
  variant: z.string().optional(),
  features: z.array(z.string()).optional(),
});
export type Platform = z.infer<typeof Platform>;

export const Descriptor = z.object({
  mediaType: z.string(),
  digest: Digest,
  size: z.number().int().nonnegative().max(Number.MAX_SAFE_INTEGER),
  urls: z.array(z.string()).optional(),
  annotations: z.record(z.string(), z.string()).optional(),
  platform: Platform.optional(),
  artifactType: z.string().optional(),
});
export type Descriptor = z.infer<typeof Descriptor>;

export const ImageManifest = z.object({
  schemaVersion: z.literal(2),
  mediaType: z.string().optional(),
  config: Descriptor,
  layers: z.array(Descriptor),
  annotations: z.record(z.string(), z.string()).optional(),
});
export type ImageManifest = z.infer<typeof ImageManifest>;

export const ImageIndex = z.object({
  schemaVersion: z.literal(2),
  mediaType: z.string().optional(),
  manifests: z.array(Descriptor),
  annotations: z.record(z.string(), z.string()).optional(),
});
export type ImageIndex = z.infer<typeof ImageIndex>;

const StringMap = z.record(z.string(), z.string());
const EmptyObjectMap = z.record(z.string(), z.unknown());

/** image-spec config.md; Docker's container config is a superset with the same field names. */
export const ImageConfig = z.object({
  created: z.string().optional(),
  author: z.string().optional(),
  architecture: z.string(),
  os: z.string(),
  'os.version': z.string().optional(),
  'os.features': z.array(z.string()).optional(),
  variant: z.string().optional(),
  config: z
    .object({
      User: z.string().optional(),
      ExposedPorts: EmptyObjectMap.nullish(),
      Env: z.array(z.string()).nullish(),
      Entrypoint: z.array(z.string()).nullish(),
      Cmd: z.array(z.string()).nullish(),
      Volumes: EmptyObjectMap.nullish(),
      WorkingDir: z.string().optional(),
      Labels: StringMap.nullish(),
      StopSignal: z.string().optional(),
      ArgsEscaped: z.boolean().optional(),
    })
    .passthrough()
    .nullish(),
  rootfs: z.object({
    type: z.literal('layers'),
    diff_ids: z.array(Digest),
  }),
  history: z.array(z.unknown()).optional(),
}).passthrough();
export type ImageConfig = z.infer<typeof ImageConfig>;

/** Parse JSON bytes with a schema; failures become BAD_IMAGE naming `what`. */
export function parseJson<T>(schema: z.ZodType<T>, bytes: Buffer | string, what: string): T {
  let raw: unknown;
  try {
    raw = JSON.parse(typeof bytes === 'string' ? bytes : bytes.toString('utf8'));
  } catch (e) {
    throw new GuestpullError(ErrorCode.BAD_IMAGE, `${what} is not valid JSON: ${(e as Error).message}`);
  }
  const r = schema.safeParse(raw);
  if (!r.success) {
    const issue = r.error.issues[0];
    const where = issue?.path.length ? issue.path.join('.') : '(root)';
    throw new GuestpullError(ErrorCode.BAD_IMAGE, `${what} is malformed at ${where}: ${issue?.message ?? 'invalid'}`);
  }
  return r.data;
}
