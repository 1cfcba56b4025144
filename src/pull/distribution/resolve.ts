/**
 * Reference → one platform image manifest: fetch what the reference names; when it is an index,
 * choose the entry for the wanted platform and fetch that child by digest (one level only).
 * The result carries the platform manifest's digest, which is what PullImage reports.
 */
import { ErrorCode, GuestpullError } from '../../errors.js';
import { ImageIndex, ImageManifest, MediaType, parseJson, type Platform } from '../../oci.js';
import type { RegistryClient } from './client.js';
import { manifestKind } from './manifest.js';
import { choosePlatform, formatPlatform, platformEntries } from './platform.js';

export interface ResolvedImage {
  manifestDigest: string;
  manifest: ImageManifest;
  manifestMediaType: string;
  indexDigest?: string;
}

const CONFIG_TYPES: ReadonlySet<string> = new Set([MediaType.OCI_CONFIG, MediaType.DOCKER_CONFIG]);

export async function resolveImage(client: RegistryClient, reference: string, want: Platform, signal?: AbortSignal): Promise<ResolvedImage> {
  const top = await client.getManifest(reference, signal);
  let fetched = top;
  let indexDigest: string | undefined;
  if (manifestKind(top.mediaType) === 'index') {
    const index = parseJson(ImageIndex, top.bytes, `index ${top.digest} of ${client.image}`);
    const chosen = choosePlatform(index.manifests, want);
    if (!chosen) {
      const available = [...new Set(platformEntries(index.manifests).map((d) => formatPlatform(d.platform)))];
      throw new GuestpullError(
        ErrorCode.NOT_FOUND,
        `image ${client.image} has no manifest for platform ${formatPlatform(want)}; available: ${available.length ? available.join(', ') : 'none'}`,
        { image: client.image },
      );
    }
    indexDigest = top.digest;
    fetched = await client.getManifest(chosen.digest, signal);
    if (manifestKind(fetched.mediaType) !== 'manifest') {
      throw new GuestpullError(
        ErrorCode.BAD_IMAGE,
        `index ${top.digest} of ${client.image} points for ${formatPlatform(want)} to another index (${fetched.digest}); only one level of index is supported`,
        { image: client.image },
      );
    }
  }
  const manifest = parseJson(ImageManifest, fetched.bytes, `manifest ${fetched.digest} of ${client.image}`);
  if (!CONFIG_TYPES.has(manifest.config.mediaType)) {
    throw new GuestpullError(
      ErrorCode.BAD_IMAGE,
      `manifest ${fetched.digest} of ${client.image} has config media type ${JSON.stringify(manifest.config.mediaType.slice(0, 200))}: not a container image (an artifact such as a signature, SBOM or Helm chart?)`,
      { image: client.image },
    );
  }
  return {
    manifestDigest: fetched.digest,
    manifest,
    manifestMediaType: fetched.mediaType,
    ...(indexDigest !== undefined ? { indexDigest } : {}),
  };
}
