/**
 * The registry configuration: the subset of containers-registries.conf(5) that CoCo's image-rs
 * reads (`unqualified-search-registries`, `[[registry]]` prefix/location/insecure/blocked,
 * `[[registry.mirror]]` location/insecure/pull-from-mirror), plus upstream's
 * `mirror-by-digest-only` and two keys of ours for pull-through caches: `override-path` on a
 * mirror (Harbor-style `http://harbor/v2/proxy-docker.io`, the client adds no `/v2`) and
 * `skip-fallback` on a registry (never contact the original location). Parsed from the raw
 * TOML object into the typed, defaulted RegistriesConf; unknown keys inside a registry or
 * mirror table are errors (a misspelt `blocked` must not silently allow a pull).
 */
import { z } from 'zod';
import { ErrorCode, GuestpullError } from '../errors.js';
import { isValidDigest } from '../oci.js';
import { isValidDomain, isValidRepositoryPath, isValidTag, normalizeRegistry } from '../reference.js';

/**
 * Only `insecure = true` means plain HTTP (issue 4: nothing else downgrades). An `http://` URL is
 * accepted as a location only together with it, so the intent is stated twice and never implied.
 */
const PLAIN_HTTP_NEEDS_INSECURE = 'an http:// location is plain HTTP: set insecure = true on this entry to allow it (or use https://)';

export type PullFromMirror = 'all' | 'digest-only' | 'tag-only';

export interface MirrorRule {
  /** `host[:port][/namespace…]`, or an `http(s)://` URL (whose scheme is then used as is). */
  location: string;
  insecure: boolean;
  /** The location is the full API base of the repositories (no `/v2` added). Needs a URL with a path. */
  overridePath: boolean;
  pullFromMirror: PullFromMirror;
}

export interface RegistryRule {
  /** `host[:port][/namespace…][:tag|@digest]`, or `*.example.com` (subdomains only). */
  prefix: string;
  /** Where the prefix-rooted namespace really lives; `''` only for a wildcard prefix without one (no rewrite). */
  location: string;
  insecure: boolean;
  blocked: boolean;
  mirrors: MirrorRule[];
  /** Do not fall back to `location` when every mirror failed. */
  skipFallback: boolean;
}

export interface RegistriesConf {
  unqualifiedSearchRegistries: string[];
  registries: RegistryRule[];
}

/** A location or prefix split into its parts. `scheme` is set only when it was written as a URL. */
export interface LocationSpec {
  scheme?: 'http' | 'https';
  /** `host[:port]` in lowercase, Docker Hub aliases mapped to `docker.io`. */
  registry: string;
  /** The host as written (lowercase), for URLs and messages. */
  host: string;
  /** Path without leading or trailing `/`; `''` when none. */
  path: string;
  /** `''`, `:tag`, `@digest` or `:tag@digest` (never in URL form). */
  suffix: string;
}

const WILDCARD = /^\*\.([^*]+)$/;
const URL_SCHEME = /^(https?):\/\//i;
const OVERRIDE_SEGMENT = /^[A-Za-z0-9._~-]+$/;

/** True when `s` is a wildcard prefix (`*.example.com`). */
export function isWildcardPrefix(s: string): boolean {
  return s.startsWith('*.');
}

/**
 * Parse a prefix or location. Throws an Error whose message says what is wrong (the schema turns
 * it into an issue at the key's path). `allowUrl` admits `http(s)://host[:port][/path]`;
 * `overridePath` additionally admits any safe path segments (Harbor project paths) in a URL.
 */
export function parseLocationSpec(input: string, opts: { allowUrl: boolean; overridePath?: boolean }): LocationSpec {
  if (/[\s\u0000-\u001f\u007f]/.test(input)) throw new Error('contains whitespace or control characters');
  const scheme = URL_SCHEME.exec(input);
  if (scheme) {
    if (!opts.allowUrl) throw new Error('must not be a URL (write host[:port][/namespace])');
    let url: URL;
    try {
      url = new URL(input);
    } catch {
      throw new Error('is not a valid URL');
    }
    if (url.username !== '' || url.password !== '') throw new Error('must not carry credentials (use the auth file)');
    if (url.search !== '' || url.hash !== '') throw new Error('must not have a query or fragment');
    if (!isValidDomain(url.host)) throw new Error(`host ${JSON.stringify(url.host)} is not a valid host[:port]`);
    const path = url.pathname.replace(/^\/+|\/+$/g, '');
    if (path !== '') {
      const ok = opts.overridePath
        ? path.split('/').every((s) => OVERRIDE_SEGMENT.test(s) && s !== '.' && s !== '..')
        : isValidRepositoryPath(path);
      if (!ok) throw new Error(`path ${JSON.stringify(path)} is not a valid repository namespace`);
    }
    return { scheme: scheme[1]!.toLowerCase() as 'http' | 'https', registry: normalizeRegistry(url.host), host: url.host, path, suffix: '' };
  }
  const slash = input.indexOf('/');
  const domain = slash < 0 ? input : input.slice(0, slash);
  if (!isValidDomain(domain)) throw new Error(`${JSON.stringify(domain)} is not a valid host[:port]`);
  let rest = slash < 0 ? '' : input.slice(slash + 1);
  let suffix = '';
  const at = rest.indexOf('@');
  if (at >= 0) {
    const digest = rest.slice(at + 1);
    if (!isValidDigest(digest)) throw new Error(`digest ${JSON.stringify(digest)} is invalid`);
    suffix = `@${digest}`;
    rest = rest.slice(0, at);
  }
  const colon = rest.lastIndexOf(':');
  if (colon > rest.lastIndexOf('/')) {
    const tag = rest.slice(colon + 1);
    if (!isValidTag(tag)) throw new Error(`tag ${JSON.stringify(tag)} is invalid`);
    suffix = `:${tag}${suffix}`;
    rest = rest.slice(0, colon);
  }
  if (rest === '' && suffix !== '') throw new Error('a tag or digest needs a repository before it');
  if (rest !== '' && !isValidRepositoryPath(rest)) {
    throw new Error(`repository path ${JSON.stringify(rest)} is invalid (lowercase components separated by /)`);
  }
  const host = domain.toLowerCase();
  return { registry: normalizeRegistry(host), host, path: rest, suffix };
}

/** The canonical text of a parsed location. */
export function formatLocationSpec(spec: LocationSpec): string {
  const path = spec.path === '' ? '' : `/${spec.path}`;
  return spec.scheme ? `${spec.scheme}://${spec.host}${path}` : `${spec.registry}${path}${spec.suffix}`;
}

function typeName(v: unknown): string {
  if (v === undefined) return 'nothing';
  if (v === null) return 'null';
  if (Array.isArray(v)) return 'an array';
  if (typeof v === 'object') return 'a table';
  return typeof v;
}

const expected = (what: string) => (iss: { input?: unknown }) =>
  iss.input === undefined ? `required (${what})` : `expected ${what}, got ${typeName(iss.input)}`;

const Str = z.string({ error: expected('string') });
const Bool = z.boolean({ error: expected('boolean (true or false)') });
const PullFromMirrorValue = z.enum(['all', 'digest-only', 'tag-only'], {
  error: (iss) => `expected one of "all", "digest-only", "tag-only", got ${JSON.stringify(iss.input)}`,
});

function table<T extends z.core.$ZodLooseShape>(shape: T, where: string) {
  const known = Object.keys(shape).join(', ');
  return z.strictObject(shape, {
    error: (iss) =>
      iss.code === 'unrecognized_keys'
        ? `unknown key${iss.keys.length > 1 ? 's' : ''} ${iss.keys.map((k) => JSON.stringify(k)).join(', ')} in ${where} (known: ${known})`
        : `expected a table (${where}), got ${typeName(iss.input)}`,
  });
}

const RawMirror = table(
  {
    location: Str,
    insecure: Bool.optional(),
    'pull-from-mirror': PullFromMirrorValue.optional(),
    'override-path': Bool.optional(),
  },
  '[[registry.mirror]]',
);

const RawRegistry = table(
  {
    prefix: Str.optional(),
    location: Str.optional(),
    insecure: Bool.optional(),
    blocked: Bool.optional(),
    'mirror-by-digest-only': Bool.optional(),
    'skip-fallback': Bool.optional(),
    mirror: z.array(RawMirror, { error: expected('an array of [[registry.mirror]] tables') }).optional(),
    /** Accepted only to say where it belongs. */
    'pull-from-mirror': z.unknown().optional(),
  },
  '[[registry]]',
);

const RawConf = table(
  {
    'unqualified-search-registries': z.array(Str, { error: expected('an array of host[:port] strings') }).optional(),
    registry: z.array(RawRegistry, { error: expected('an array of [[registry]] tables') }).optional(),
    /** Upstream keys that do not change what is pulled from where here: accepted and ignored. */
    'short-name-mode': z.enum(['enforcing', 'permissive', 'disabled'], { error: expected('"enforcing", "permissive" or "disabled"') }).optional(),
    'credential-helpers': z.array(Str, { error: expected('an array of strings') }).optional(),
    'additional-layer-store-auth-helper': Str.optional(),
    /** Upstream keys we do not implement: refused when they would change resolution. */
    aliases: z.record(z.string(), Str, { error: expected('a table of strings') }).optional(),
    registries: z.unknown().optional(),
  },
  'registry configuration',
);

type RawConf = z.output<typeof RawConf>;
type RawRegistry = z.output<typeof RawRegistry>;
type Ctx = z.core.$RefinementCtx<RawConf>;

function trimSlashes(s: string | undefined): string {
  return (s ?? '').replace(/\/+$/, '');
}

function issue(ctx: Ctx, path: (string | number)[], message: string): void {
  ctx.addIssue({ code: 'custom', path, message });
}

/** Run a parser, turning its Error into an issue at `path`; undefined when it failed. */
function tryParse<T>(ctx: Ctx, path: (string | number)[], what: string, f: () => T): T | undefined {
  try {
    return f();
  } catch (e) {
    issue(ctx, path, `${what} ${e instanceof Error ? e.message : String(e)}`);
    return undefined;
  }
}

function parsePrefix(ctx: Ctx, path: (string | number)[], prefix: string): string | undefined {
  if (isWildcardPrefix(prefix)) {
    const host = WILDCARD.exec(prefix)?.[1];
    if (host === undefined || /[/:@]/.test(host) || !isValidDomain(host)) {
      issue(ctx, path, `wildcard prefix ${JSON.stringify(prefix)} must be *.<domain> with no port, path, tag or digest`);
      return undefined;
    }
    return `*.${host.toLowerCase()}`;
  }
  const spec = tryParse(ctx, path, `prefix ${JSON.stringify(prefix)}`, () => parseLocationSpec(prefix, { allowUrl: false }));
  return spec && formatLocationSpec(spec);
}

function buildRegistry(ctx: Ctx, r: RawRegistry, i: number): RegistryRule | undefined {
  const at = (...p: (string | number)[]) => ['registry', i, ...p];
  let failed = false;
  const bad = (p: (string | number)[], m: string) => {
    issue(ctx, p, m);
    failed = true;
  };

  if (r['pull-from-mirror'] !== undefined) bad(at('pull-from-mirror'), 'pull-from-mirror is only valid inside a [[registry.mirror]] table');
  const rawPrefix = trimSlashes(r.prefix);
  const rawLocation = trimSlashes(r.location);
  if (rawPrefix === '' && rawLocation === '') {
    bad(at(), 'a [[registry]] needs a prefix or a location');
    return undefined;
  }

  let location = '';
  if (rawLocation !== '') {
    const spec = tryParse(ctx, at('location'), `location ${JSON.stringify(rawLocation)}`, () =>
      parseLocationSpec(rawLocation, { allowUrl: true }),
    );
    if (!spec) failed = true;
    else {
      location = formatLocationSpec(spec);
      if (spec.scheme === 'http' && r.insecure !== true) bad(at('location'), PLAIN_HTTP_NEEDS_INSECURE);
    }
  }

  let prefix: string | undefined;
  if (rawPrefix !== '') {
    prefix = parsePrefix(ctx, at('prefix'), rawPrefix);
    if (prefix === undefined) failed = true;
  } else if (URL_SCHEME.test(rawLocation)) {
    bad(at('prefix'), `a prefix is required when the location is a URL (${JSON.stringify(rawLocation)})`);
  } else {
    prefix = location; // upstream: prefix defaults to location
  }
  // A non-wildcard prefix without a location keeps images where they are (CoCo's image-rs accepts this).
  if (location === '' && prefix !== undefined && !isWildcardPrefix(prefix)) location = prefix;

  const byDigestOnly = r['mirror-by-digest-only'] ?? false;
  const mirrors: MirrorRule[] = [];
  for (const [j, m] of (r.mirror ?? []).entries()) {
    const mp = (...p: (string | number)[]) => at('mirror', j, ...p);
    const overridePath = m['override-path'] ?? false;
    const raw = trimSlashes(m.location);
    if (raw === '') {
      bad(mp('location'), 'a mirror location must not be empty');
      continue;
    }
    const spec = tryParse(ctx, mp('location'), `mirror location ${JSON.stringify(raw)}`, () =>
      parseLocationSpec(raw, { allowUrl: true, overridePath }),
    );
    if (!spec) {
      failed = true;
      continue;
    }
    if (spec.scheme === 'http' && m.insecure !== true) bad(mp('location'), PLAIN_HTTP_NEEDS_INSECURE);
    if (spec.suffix !== '') bad(mp('location'), `mirror location ${JSON.stringify(raw)} must not carry a tag or digest`);
    if (overridePath && (spec.scheme === undefined || spec.path === '')) {
      bad(mp('override-path'), `override-path needs the mirror location to be a URL with a path, e.g. "http://harbor/v2/proxy-docker.io" (got ${JSON.stringify(raw)})`);
    }
    if (byDigestOnly && m['pull-from-mirror'] !== undefined) {
      bad(mp('pull-from-mirror'), 'cannot be set when the registry sets mirror-by-digest-only');
    }
    mirrors.push({
      location: formatLocationSpec(spec),
      insecure: m.insecure ?? false,
      overridePath,
      pullFromMirror: byDigestOnly ? 'digest-only' : (m['pull-from-mirror'] ?? 'all'),
    });
  }

  const skipFallback = r['skip-fallback'] ?? false;
  if (skipFallback && (r.mirror ?? []).length === 0) {
    bad(at('skip-fallback'), 'skip-fallback = true needs at least one [[registry.mirror]]');
  }
  if (failed || prefix === undefined) return undefined;
  return { prefix, location, insecure: r.insecure ?? false, blocked: r.blocked ?? false, mirrors, skipFallback };
}

function build(raw: RawConf, ctx: Ctx): RegistriesConf {
  if (raw.registries !== undefined) {
    issue(ctx, ['registries'], 'the version 1 format ([registries.search], [registries.insecure], [registries.block]) is not supported; use unqualified-search-registries and [[registry]] tables');
  }
  if (raw.aliases !== undefined && Object.keys(raw.aliases).length > 0) {
    issue(ctx, ['aliases'], 'short-name aliases are not supported; write fully qualified image names or use unqualified-search-registries');
  }
  const search: string[] = [];
  for (const [i, s] of (raw['unqualified-search-registries'] ?? []).entries()) {
    const v = trimSlashes(s);
    if (!isValidDomain(v)) issue(ctx, ['unqualified-search-registries', i], `${JSON.stringify(s)} is not a host[:port]`);
    else search.push(normalizeRegistry(v.toLowerCase()));
  }
  const registries: RegistryRule[] = [];
  const seen = new Map<string, number>();
  for (const [i, r] of (raw.registry ?? []).entries()) {
    const rule = buildRegistry(ctx, r, i);
    if (!rule) continue;
    const first = seen.get(rule.prefix);
    if (first !== undefined) {
      issue(ctx, ['registry', i, 'prefix'], `prefix ${JSON.stringify(rule.prefix)} is already used by registry[${first}]; merge the two tables`);
      continue;
    }
    seen.set(rule.prefix, i);
    registries.push(rule);
  }
  return { unqualifiedSearchRegistries: search, registries };
}

/** Raw TOML-parsed object (the `registry_config` table or a registries.conf file) → RegistriesConf. */
export const RegistriesConfSchema: z.ZodType<RegistriesConf, unknown> = RawConf.transform((raw, ctx) => {
  const out = build(raw, ctx);
  return ctx.issues.length > 0 ? z.NEVER : out;
});

function formatPath(path: readonly PropertyKey[]): string {
  let s = '';
  for (const p of path) s += typeof p === 'number' ? `[${p}]` : `.${String(p)}`;
  return s;
}

/** Parse and validate; throws GuestpullError(CONFIG) naming each bad key, e.g. `registry_config.registry[1].mirror[0].location: expected string, got number`. */
export function parseRegistriesConf(raw: unknown, source: string): RegistriesConf {
  const r = RegistriesConfSchema.safeParse(raw);
  if (r.success) return r.data;
  const lines = r.error.issues.slice(0, 8).map((i) => `${source}${formatPath(i.path)}: ${i.message}`);
  const more = r.error.issues.length > 8 ? ` (and ${r.error.issues.length - 8} more)` : '';
  throw new GuestpullError(ErrorCode.CONFIG, `invalid registry configuration: ${lines.join('; ')}${more}`, { source });
}
