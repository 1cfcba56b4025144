/**
 * What kind of manifest a registry sent: decided by the JSON `mediaType` field, else by the
 * Content-Type header, else by shape (`manifests` → index, `layers` → image manifest). Docker
 * schema1 is refused here, as is anything that is neither an index nor an image manifest.
 */
import { z } from 'zod';
import { ErrorCode, GuestpullError } from '../../errors.js';
import { MediaType, parseJson } from '../../oci.js';

export type ManifestKind = 'index' | 'manifest';

const KIND: Record<string, ManifestKind> = {
  [MediaType.OCI_INDEX]: 'index',
  [MediaType.DOCKER_MANIFEST_LIST]: 'index',
  [MediaType.OCI_MANIFEST]: 'manifest',
  [MediaType.DOCKER_MANIFEST]: 'manifest',
};

const SCHEMA1: ReadonlySet<string> = new Set([MediaType.DOCKER_MANIFEST_V1, MediaType.DOCKER_MANIFEST_V1_SIGNED]);

/** Just enough of any manifest to classify it; the real schemas (oci.ts) parse it afterwards. */
const Shape = z.looseObject({
  schemaVersion: z.number().optional(),
  mediaType: z.string().optional(),
  manifests: z.array(z.unknown()).optional(),
  layers: z.array(z.unknown()).optional(),
});

export function manifestKind(mediaType: string): ManifestKind | undefined {
  return Object.hasOwn(KIND, mediaType) ? KIND[mediaType] : undefined;
}

/** The media type part of a Content-Type header (parameters dropped, lower-cased). */
export function contentTypeOf(header: string | string[] | undefined): string | undefined {
  const v = Array.isArray(header) ? header[0] : header;
  const t = v?.split(';')[0]?.trim().toLowerCase();
  return t ? t : undefined;
}

/** Classify manifest bytes; `what` names the manifest in messages. */
export function classifyManifest(bytes: Buffer, contentType: string | undefined, what: string): { mediaType: string; kind: ManifestKind } {
  const m = parseJson(Shape, bytes, what);
  const isSchema1 =
    m.schemaVersion === 1 || (m.mediaType !== undefined && SCHEMA1.has(m.mediaType)) || (m.mediaType === undefined && contentType !== undefined && SCHEMA1.has(contentType));
  if (isSchema1) {
    throw new GuestpullError(ErrorCode.BAD_IMAGE, `${what} is a Docker schema1 manifest; Docker schema1 manifests are obsolete; re-push the image with a current client`);
  }
  let mediaType = m.mediaType;
  if (mediaType === undefined && contentType !== undefined && manifestKind(contentType)) mediaType = contentType;
  if (mediaType === undefined) {
    if (m.manifests !== undefined && m.layers === undefined) mediaType = MediaType.OCI_INDEX;
    else if (m.layers !== undefined && m.manifests === undefined) mediaType = MediaType.OCI_MANIFEST;
    else {
      throw new GuestpullError(ErrorCode.BAD_IMAGE, `${what} has no mediaType and is neither an index (manifests) nor an image manifest (layers)`);
    }
  }
  const kind = manifestKind(mediaType);
  if (!kind) {
    throw new GuestpullError(
      ErrorCode.BAD_IMAGE,
      `${what} has media type ${JSON.stringify(mediaType.slice(0, 200))}, which is not a container image (want an OCI or Docker v2 manifest or index)`,
    );
  }
  return { mediaType, kind };
}
