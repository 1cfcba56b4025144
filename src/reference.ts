/**
 * Image reference parsing and normalisation, following the distribution/reference grammar
 * (`reference/regexp.go`, `normalize.go`): `[domain/]path[:tag][@digest]`, Docker Hub names
 * normalised to `docker.io/library/<name>`. Pure functions; every failure is an
 * INVALID_REFERENCE GuestpullError naming the input and what is wrong with it.
 */
import { ErrorCode, GuestpullError } from './errors.js';
import { isValidDigest } from './oci.js';

export interface ImageReference {
  /** `docker.io` for Docker Hub, else `host[:port]` as given. */
  registry: string;
  /** Repository path on that registry, e.g. `library/busybox`, `ns/app`. */
  repository: string;
  /** `latest` when neither tag nor digest was given. */
  tag?: string;
  /** `sha256:<64 hex>` or `sha512:<128 hex>`. */
  digest?: string;
  /** False when the input named no registry (`busybox`, `ns/app`): unqualified-search applies. */
  domainGiven: boolean;
}

export const DOCKER_HUB = 'docker.io';
/** The host that actually serves Docker Hub's registry API. */
export const DOCKER_HUB_API_HOST = 'registry-1.docker.io';
const DOCKER_HUB_ALIASES: ReadonlySet<string> = new Set([DOCKER_HUB, 'index.docker.io', DOCKER_HUB_API_HOST]);
const OFFICIAL_PREFIX = 'library/';
const DEFAULT_TAG = 'latest';
export const MAX_INPUT_BYTES = 4096;
export const MAX_NAME_LENGTH = 255;

const PATH_COMPONENT = /^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$/;
const DOMAIN_COMPONENT = '(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])';
const DOMAIN = new RegExp(`^(?:${DOMAIN_COMPONENT}(?:\\.${DOMAIN_COMPONENT})*|\\[[a-fA-F0-9:]+\\])(?::([0-9]+))?$`);
const TAG = /^\w[\w.-]{0,127}$/;
const DIGEST_SHAPE = /^[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}$/;
const IDENTIFIER = /^[a-f0-9]{64}$/;

function fail(input: string, what: string): never {
  const shown = input.length > 200 ? `${input.slice(0, 200)}…` : input;
  throw new GuestpullError(
    ErrorCode.INVALID_REFERENCE,
    `invalid image reference ${JSON.stringify(shown)}: ${what}; expected [registry/]repository[:tag][@digest], e.g. docker.io/library/busybox:1.36`,
    { image: shown },
  );
}

/** True when `s` is a valid `host[:port]` (DNS name, IPv4, or bracketed IPv6; port 1–65535). */
export function isValidDomain(s: string): boolean {
  const m = DOMAIN.exec(s);
  if (!m) return false;
  if (m[1] !== undefined) {
    const port = Number(m[1]);
    if (!(port >= 1 && port <= 65535) || m[1].length > 5) return false;
  }
  return true;
}

/** True when `path` is a valid repository path: lowercase components joined by `/`. */
export function isValidRepositoryPath(path: string): boolean {
  return path.length > 0 && path.split('/').every((c) => PATH_COMPONENT.test(c));
}

/**
 * Map Docker Hub's aliases (`index.docker.io`, `registry-1.docker.io`, any case) to `docker.io`.
 * Other domains keep their case: `LOCALDOMAIN/app` is a domain only because of its capitals, so
 * lowercasing it would make the canonical text parse as a Docker Hub name. Compare domains
 * case-insensitively instead.
 */
export function normalizeRegistry(domain: string): string {
  return DOCKER_HUB_ALIASES.has(domain.toLowerCase()) ? DOCKER_HUB : domain;
}

/** Docker Hub keeps official images under `library/`: a single-component name gets that prefix. */
function hubPath(registry: string, path: string): string {
  return registry === DOCKER_HUB && !path.includes('/') ? OFFICIAL_PREFIX + path : path;
}

/** Does the first path component name a registry (distribution's splitDockerDomain rule)? */
function looksLikeDomain(first: string): boolean {
  return first === 'localhost' || /[.:]/.test(first) || first.toLowerCase() !== first;
}

/** True when `tag` is a valid tag: `[\w][\w.-]{0,127}`. */
export function isValidTag(tag: string): boolean {
  return TAG.test(tag);
}

export interface RemotePath {
  path: string;
  tag?: string;
  digest?: string;
}

/**
 * Split and validate `path[:tag][@digest]` (the part after the registry). The path is returned
 * as written: no Docker Hub `library/` rule, no default tag. `input` names the whole reference in
 * errors.
 */
export function parseRemotePath(remainder: string, input: string = remainder): RemotePath {
  let rest = remainder;
  const out: RemotePath = { path: '' };
  const at = rest.indexOf('@');
  if (at >= 0) {
    const digest = rest.slice(at + 1);
    rest = rest.slice(0, at);
    if (!DIGEST_SHAPE.test(digest)) fail(input, `digest ${JSON.stringify(digest)} is malformed`);
    if (!isValidDigest(digest)) {
      fail(input, `digest ${JSON.stringify(digest)} is not supported (want sha256:<64 lowercase hex> or sha512:<128 lowercase hex>)`);
    }
    out.digest = digest;
  }
  const colon = rest.lastIndexOf(':');
  if (colon > rest.lastIndexOf('/')) {
    const tag = rest.slice(colon + 1);
    rest = rest.slice(0, colon);
    if (!TAG.test(tag)) fail(input, `tag ${JSON.stringify(tag)} is invalid (1-128 of [A-Za-z0-9_.-], not starting with . or -)`);
    out.tag = tag;
  }
  if (rest === '') fail(input, 'the repository name is empty');
  if (rest.toLowerCase() !== rest && isValidRepositoryPath(rest.toLowerCase())) {
    fail(input, `repository ${JSON.stringify(rest)} must be lowercase`);
  }
  const bad = rest.split('/').find((c) => !PATH_COMPONENT.test(c));
  if (bad !== undefined) {
    fail(
      input,
      bad === ''
        ? 'the repository has an empty path component'
        : `repository path component ${JSON.stringify(bad)} is invalid (lowercase letters and digits, separated by ., _, __ or -)`,
    );
  }
  out.path = rest;
  return out;
}

/**
 * Parse `path[:tag][@digest]` on a registry already known (no domain detection), applying the
 * Docker Hub `library/` rule and the default tag. Used where registries.conf rewrites a reference
 * onto another host.
 */
export function parseRemoteName(registry: string, remainder: string, input = `${registry}/${remainder}`): ImageReference {
  if (!isValidDomain(registry)) fail(input, `registry ${JSON.stringify(registry)} is not a valid host[:port]`);
  const reg = normalizeRegistry(registry);
  const { path, tag, digest } = parseRemotePath(remainder, input);
  const repository = hubPath(reg, path);
  const name = `${reg}/${repository}`;
  if (name.length > MAX_NAME_LENGTH) fail(input, `the name is ${name.length} characters long, more than ${MAX_NAME_LENGTH}`);
  const ref: ImageReference = { registry: reg, repository, domainGiven: true };
  if (tag !== undefined) ref.tag = tag;
  if (digest !== undefined) ref.digest = digest;
  if (tag === undefined && digest === undefined) ref.tag = DEFAULT_TAG;
  return ref;
}

/** Parse an image reference as a user or the kata agent wrote it. */
export function parseReference(input: string): ImageReference {
  if (typeof input !== 'string' || input === '') fail(String(input), 'it is empty');
  if (Buffer.byteLength(input, 'utf8') > MAX_INPUT_BYTES) fail(input, `it is longer than ${MAX_INPUT_BYTES} bytes`);
  // eslint-disable-next-line no-control-regex
  if (/[\s\u0000-\u001f\u007f]/.test(input)) fail(input, 'it contains whitespace or control characters');
  if (/[^\x21-\x7e]/.test(input)) fail(input, 'it contains non-ASCII characters');
  if (IDENTIFIER.test(input)) fail(input, 'a bare 64-hex identifier is not a repository name (use name@sha256:<hex>)');
  if (/^[a-z][a-z0-9+.-]*:\/\//i.test(input)) fail(input, 'a URL is not an image reference (drop the scheme)');

  const slash = input.indexOf('/');
  if (slash >= 0) {
    const first = input.slice(0, slash);
    if (looksLikeDomain(first)) {
      if (!isValidDomain(first)) fail(input, `registry ${JSON.stringify(first)} is not a valid host[:port]`);
      return parseRemoteName(first, input.slice(slash + 1), input);
    }
  }
  return { ...parseRemoteName(DOCKER_HUB, input, input), domainGiven: false };
}

/** Canonical text: `registry/repository[:tag][@digest]`. */
export function formatReference(ref: ImageReference): string {
  let s = `${ref.registry}/${ref.repository}`;
  if (ref.tag !== undefined) s += `:${ref.tag}`;
  if (ref.digest !== undefined) s += `@${ref.digest}`;
  return s;
}

/** The `<reference>` of `/v2/<name>/manifests/<reference>`: the digest when present, else the tag. */
export function manifestReference(ref: ImageReference): string {
  return ref.digest ?? ref.tag ?? DEFAULT_TAG;
}

/**
 * The same tag/digest on another registry and repository (validated; the registry normalised,
 * a single-component Docker Hub repository given its `library/` prefix).
 */
export function withRegistry(ref: ImageReference, registry: string, repository: string): ImageReference {
  const input = `${registry}/${repository}`;
  if (!isValidDomain(registry)) fail(input, `registry ${JSON.stringify(registry)} is not a valid host[:port]`);
  if (!isValidRepositoryPath(repository)) fail(input, `repository ${JSON.stringify(repository)} is invalid`);
  const reg = normalizeRegistry(registry);
  const repo = hubPath(reg, repository);
  if (reg.length + 1 + repo.length > MAX_NAME_LENGTH) fail(input, `the name exceeds ${MAX_NAME_LENGTH} characters`);
  const out: ImageReference = { registry: reg, repository: repo, domainGiven: true };
  if (ref.tag !== undefined) out.tag = ref.tag;
  if (ref.digest !== undefined) out.digest = ref.digest;
  if (out.tag === undefined && out.digest === undefined) out.tag = DEFAULT_TAG;
  return out;
}
