/**
 * registries.conf rules → the ordered list of locations to try for one image (pure functions).
 *
 * Unqualified names (`busybox`, `ns/app`) expand to one reference per unqualified-search registry
 * (docker.io when there are none). Each qualified reference picks the [[registry]] rule with the
 * longest matching prefix; a blocked rule refuses; otherwise its mirrors come first (those whose
 * pull-from-mirror admits this kind of reference), then the rule's location with the prefix
 * replaced, unless skip-fallback. No rule: the original location over HTTPS.
 */
import { ErrorCode, GuestpullError } from '../../errors.js';
import {
  DOCKER_HUB,
  DOCKER_HUB_API_HOST,
  formatReference,
  manifestReference,
  parseRemoteName,
  parseRemotePath,
  withRegistry,
  type ImageReference,
} from '../../reference.js';
import {
  formatLocationSpec,
  isWildcardPrefix,
  parseLocationSpec,
  type LocationSpec,
  type MirrorRule,
  type RegistriesConf,
  type RegistryRule,
} from '../../config/registries.js';

export interface Candidate {
  /** API base ending in `/`: the client appends `<repository>/manifests/<ref>` or `<repository>/blobs/<digest>`. */
  baseUrl: string;
  /** `host[:port]` of the endpoint (normalised; `docker.io` for Docker Hub), for messages and credentials. */
  registry: string;
  /** Repository on that endpoint after prefix rewriting. */
  repository: string;
  /** Tag or digest to request. */
  reference: string;
  mirror: boolean;
  /** Human text for errors, e.g. `mirror http://127.0.0.1:5001 (rule docker.io)`. */
  description: string;
}

/**
 * Length of the part of formatReference(ref) that `prefix` matches, or -1. A match ends
 * at the end or at `/`, `:` or `@`, and always covers the whole registry host[:port]: prefix
 * `example.com/foo` matches `example.com/foo:1` and `example.com/foo/bar` but not
 * `example.com/foobar`; prefix `example.com` does not match `example.com:5000/app` (a port names
 * another registry; upstream matches it by accident and says not to rely on it).
 * `*.example.com` matches any subdomain host (not the apex, not with a port).
 */
export function prefixMatch(ref: ImageReference, prefix: string): number {
  // Prefixes are stored with a lowercase domain; domains compare case-insensitively.
  const registry = ref.registry.toLowerCase();
  if (isWildcardPrefix(prefix)) {
    const suffix = prefix.slice(1);
    return registry.length > suffix.length && registry.endsWith(suffix) ? registry.length : -1;
  }
  const full = registry + formatReference(ref).slice(registry.length);
  if (prefix.length < registry.length || !full.startsWith(prefix)) return -1;
  if (full.length === prefix.length) return prefix.length;
  return '/:@'.includes(full[prefix.length]!) ? prefix.length : -1;
}

/** The rule for a reference: longest prefix; on equal length an exact prefix beats a wildcard, then the first. */
export function findRule(ref: ImageReference, rules: readonly RegistryRule[]): { rule: RegistryRule; matched: number } | undefined {
  let best: { rule: RegistryRule; matched: number } | undefined;
  for (const rule of rules) {
    const matched = prefixMatch(ref, rule.prefix);
    if (matched < 0) continue;
    if (
      best === undefined ||
      rule.prefix.length > best.rule.prefix.length ||
      (rule.prefix.length === best.rule.prefix.length && isWildcardPrefix(best.rule.prefix) && !isWildcardPrefix(rule.prefix))
    ) {
      best = { rule, matched };
    }
  }
  return best;
}

function apiHost(registry: string): string {
  return registry === DOCKER_HUB ? DOCKER_HUB_API_HOST : registry;
}

function original(ref: ImageReference, insecure: boolean, description: string): Candidate {
  return {
    baseUrl: `${insecure ? 'http' : 'https'}://${apiHost(ref.registry.toLowerCase())}/v2/`,
    registry: ref.registry,
    repository: ref.repository,
    reference: manifestReference(ref),
    mirror: false,
    description,
  };
}

function ruleError(image: string, rule: RegistryRule, what: string, e: unknown): GuestpullError {
  const why = e instanceof Error ? e.message : String(e);
  return new GuestpullError(
    ErrorCode.CONFIG,
    `registry_config rule ${JSON.stringify(rule.prefix)}: ${what} cannot serve ${image}: ${why}; fix the rule's location or prefix`,
    { image },
    { cause: e },
  );
}

/**
 * The endpoint that `spec` (a rule's location or a mirror) gives for the part of the reference
 * after the matched prefix (`rest`, e.g. `/library/busybox:1.36`, `:1.36`, `@sha256:…`).
 */
function endpoint(ref: ImageReference, spec: LocationSpec, insecure: boolean, overridePath: boolean, rest: string) {
  // A prefix that names a tag or digest can leave none in the rewritten text: keep the image's.
  const fallback = manifestReference(ref);
  const scheme = spec.scheme ?? (insecure ? 'http' : 'https');
  const host = apiHost(spec.registry);
  if (overridePath) {
    // The URL is the repositories' base: <url>/<repository>/manifests/<ref>, no /v2 added.
    let base = spec.path;
    let remainder: string;
    if (rest.startsWith('/')) {
      remainder = rest.slice(1);
    } else {
      // The prefix matched the whole repository: the URL's last segment is the repository.
      const cut = base.lastIndexOf('/');
      remainder = base.slice(cut + 1) + rest;
      base = cut < 0 ? '' : base.slice(0, cut);
    }
    const target = parseRemotePath(remainder, `${spec.host}/${spec.path}${rest}`);
    return {
      baseUrl: `${scheme}://${host}/${base === '' ? '' : `${base}/`}`,
      registry: spec.registry,
      repository: target.path,
      reference: target.digest ?? target.tag ?? fallback,
      shown: formatLocationSpec(spec),
    };
  }
  const remainder = `${spec.path}${spec.suffix}${rest}`.replace(/^\//, '');
  const target = parseRemoteName(spec.registry, remainder);
  const explicit = parseRemotePath(remainder, `${spec.registry}/${remainder}`);
  return {
    baseUrl: `${scheme}://${host}/v2/`,
    registry: target.registry,
    repository: target.repository,
    reference: explicit.digest ?? explicit.tag ?? fallback,
    shown: spec.scheme ? formatLocationSpec(spec) : `${scheme}://${formatLocationSpec(spec)}`,
  };
}

function admits(m: MirrorRule, byDigest: boolean): boolean {
  return m.pullFromMirror === 'all' || (m.pullFromMirror === 'digest-only') === byDigest;
}

/** Candidates for a reference that names its registry. */
function qualified(ref: ImageReference, conf: RegistriesConf, note: string): Candidate[] {
  const image = formatReference(ref);
  const found = findRule(ref, conf.registries);
  if (!found) return [original(ref, false, `${ref.registry} (original location${note})`)];
  const { rule, matched } = found;
  if (rule.blocked) {
    throw new GuestpullError(
      ErrorCode.PERMISSION_DENIED,
      `image ${image} is blocked by registry_config: rule ${JSON.stringify(rule.prefix)} sets blocked = true; use an image from another registry or change the rule`,
      { image, rule: rule.prefix },
    );
  }
  const rest = image.slice(matched);
  const byDigest = ref.digest !== undefined;
  const out: Candidate[] = [];
  for (const m of rule.mirrors) {
    if (!admits(m, byDigest)) continue;
    try {
      const spec = parseLocationSpec(m.location, { allowUrl: true, overridePath: m.overridePath });
      const { shown, ...ep } = endpoint(ref, spec, m.insecure, m.overridePath, rest);
      out.push({ ...ep, mirror: true, description: `mirror ${shown} (rule ${rule.prefix}${note})` });
    } catch (e) {
      throw ruleError(image, rule, `mirror ${JSON.stringify(m.location)}`, e);
    }
  }
  if (!rule.skipFallback) {
    if (rule.location === '') {
      out.push(original(ref, rule.insecure, `${ref.registry} (original location, rule ${rule.prefix}${note})`));
    } else {
      try {
        const spec = parseLocationSpec(rule.location, { allowUrl: true });
        const { shown, ...ep } = endpoint(ref, spec, rule.insecure, false, rest);
        const same = ep.registry === ref.registry.toLowerCase() && ep.repository === ref.repository;
        const description = same
          ? `${ref.registry} (original location, rule ${rule.prefix}${note})`
          : `${shown} (location remapped by rule ${rule.prefix}${note})`;
        out.push({ ...ep, mirror: false, description });
      } catch (e) {
        throw ruleError(image, rule, `location ${JSON.stringify(rule.location)}`, e);
      }
    }
  }
  if (out.length === 0) {
    const kind = byDigest ? 'by-digest' : 'by-tag';
    throw new GuestpullError(
      ErrorCode.CONFIG,
      `no location to pull ${image} from: registry_config rule ${JSON.stringify(rule.prefix)} sets skip-fallback = true and none of its ${rule.mirrors.length} mirror(s) serves ${kind} references (pull-from-mirror); ` +
        `pull ${byDigest ? 'by tag' : 'by digest'}, add a mirror with pull-from-mirror = "all", or drop skip-fallback`,
      { image, rule: rule.prefix },
    );
  }
  return out;
}

/** The reference an unqualified name stands for on one search registry. */
function onSearchRegistry(ref: ImageReference, registry: string): ImageReference {
  let repo = ref.repository;
  // The `library/` namespace is Docker Hub's: `busybox` is `example.com/busybox` elsewhere.
  if (registry !== DOCKER_HUB && /^library\/[^/]+$/.test(repo)) repo = repo.slice('library/'.length);
  return withRegistry(ref, registry, repo);
}

/** Every location to try for `ref`, in order. Throws PERMISSION_DENIED when blocked, CONFIG when nothing is left. */
export function candidatesFor(ref: ImageReference, conf: RegistriesConf): Candidate[] {
  const search = !ref.domainGiven && conf.unqualifiedSearchRegistries.length > 0;
  const registries = search ? conf.unqualifiedSearchRegistries : [undefined];
  const out: Candidate[] = [];
  const errors: GuestpullError[] = [];
  for (const registry of registries) {
    try {
      const r = registry === undefined ? ref : onSearchRegistry(ref, registry);
      out.push(...qualified(r, conf, search ? ', unqualified-search' : ''));
    } catch (e) {
      if (!(e instanceof GuestpullError) || registries.length === 1) throw e;
      errors.push(e);
    }
  }
  if (out.length === 0) {
    const denied = errors.find((e) => e.code === ErrorCode.PERMISSION_DENIED);
    const first = denied ?? errors[0]!;
    throw new GuestpullError(
      first.code,
      `no unqualified-search registry can serve ${formatReference(ref)}: ${errors.map((e) => e.message).join(' | ')}`,
      { image: formatReference(ref) },
    );
  }
  const seen = new Set<string>();
  return out.filter((c) => {
    const key = `${c.baseUrl}\n${c.repository}\n${c.reference}`;
    if (seen.has(key)) return false;
    seen.add(key);
    return true;
  });
}
