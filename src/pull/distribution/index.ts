/**
 * OCI distribution client: auth challenges and tokens, manifests, platform choice, verified blobs.
 * The HTTP layer lives in ./transport/.
 */
export { RegistryClient, type RegistryClientOptions, type FetchedManifest, type Credentials } from './client.js';
export { resolveImage, type ResolvedImage } from './resolve.js';
export { currentPlatform, choosePlatform, normalizePlatform, formatPlatform } from './platform.js';
export { parseChallenges, challengesOf, type Challenge } from './challenge.js';
export { classifyManifest, manifestKind, type ManifestKind } from './manifest.js';
export { VerifyingStream, readBounded, digestOf } from './verify.js';
