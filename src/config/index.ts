/**
 * The one typed Config everything else reads, loaded from a cdh.toml (the confidential data hub's
 * configuration, delivered through init-data). A real cdh.toml must load: keys that mean nothing
 * to an image puller are accepted (reported in `ignored`), undeclared keys become `warnings`, and
 * a wrong type or value fails with the key path and what was expected.
 */
import { readFile } from 'node:fs/promises';
import { parse as parseToml, TomlError } from 'smol-toml';
import type { z } from 'zod';
import { ErrorCode, GuestpullError } from '../errors.js';
import { formatKeyPath, unknownKeys } from './keys.js';
import { RegistriesConfSchema, type RegistriesConf } from './registries.js';
import { CdhToml, IGNORED_KEYS, LogLevel } from './schema.js';

export type { RegistriesConf };
export { LOG_LEVELS } from './schema.js';

export const DEFAULT_WORK_DIR = '/run/kata-containers/image/';
export const DEFAULT_MAX_CONCURRENT_LAYER_DOWNLOADS = 3;
/** How bundles get their rootfs: `[image] snapshotter` (guestpull extension). */
export type Snapshotter = 'overlay' | 'copy' | 'auto';
export const DEFAULT_SNAPSHOTTER: Snapshotter = 'auto';
/** Where the kata agent expects the data hub (the reference daemon's ttrpc address). */
export const DEFAULT_SOCKET = 'unix:///run/confidential-containers/cdh.sock';
/** A cdh.toml is a few KiB; refuse anything absurd before parsing it. */
const MAX_CONFIG_BYTES = 1024 * 1024;

export interface ImagePullProxy {
  httpsProxy?: string;
  httpProxy?: string;
  noProxy?: string;
}

/** Network behaviour for registry and proxy traffic (guestpull extensions under [image]). */
export interface NetworkConfig {
  connectTimeoutMs: number;
  headersTimeoutMs: number;
  idleTimeoutMs: number;
  /** Attempts per request, the first included, for connection errors, 5xx and 429. */
  maxAttempts: number;
}

export const DEFAULT_NETWORK: NetworkConfig = {
  connectTimeoutMs: 30_000,
  headersTimeoutMs: 60_000,
  idleTimeoutMs: 60_000,
  maxAttempts: 5,
};

/**
 * Bounds on image content ([image] max_* keys in cdh.toml, guestpull extensions). The layer fields
 * have the names of the layer pipeline's LayerLimits, so `limits` can be handed to applyLayer as is.
 */
export interface ImageLimits {
  /** max_manifest_bytes: a manifest or index document. */
  maxManifestBytes: number;
  /** max_config_bytes: the image config blob. */
  maxConfigBytes: number;
  /** max_layer_bytes: uncompressed bytes of one layer. */
  maxUncompressedBytes: number;
  /** max_layer_ratio: uncompressed / compressed bytes of one layer (checked past the first MiB). */
  maxRatio: number;
  /** max_layer_entries: tar entries in one layer. */
  maxEntries: number;
  /** max_path_length: bytes in an entry name or link target. */
  maxPathLength: number;
  /** max_path_depth: components in an entry name. */
  maxPathDepth: number;
  /** max_pax_header_bytes: one PAX or GNU long name/link header (Go's archive/tar stops at 1 MiB too). */
  maxPaxHeaderBytes: number;
}

export const DEFAULT_IMAGE_LIMITS: Readonly<ImageLimits> = Object.freeze({
  maxManifestBytes: 4 * 1024 * 1024,
  maxConfigBytes: 4 * 1024 * 1024,
  maxUncompressedBytes: 64 * 1024 ** 3,
  maxRatio: 1000,
  maxEntries: 1_000_000,
  maxPathLength: 4096,
  maxPathDepth: 256,
  maxPaxHeaderBytes: 1024 * 1024,
});

export interface Config {
  socket?: string;
  log: { level?: string };
  image: {
    workDir: string;
    maxConcurrentLayerDownloadsPerImage: number;
    /** overlay mount of the layer store, flattened copy, or auto (overlay when the kernel allows). */
    snapshotter: Snapshotter;
    /** Layer worker threads beyond the daemon thread's two layers at once; undefined: cores - 2 (0 to 8). 0: none. */
    unpackThreads?: number;
    imagePullProxy?: ImagePullProxy;
    extraRootCertificates: string[];
    registryConfig?: RegistriesConf;
    registryConfigurationUri?: string;
    authenticatedRegistryCredentialsUri?: string;
    /** An auth.json document given inline (JSON text). */
    authenticatedRegistryCredentials?: string;
    network: NetworkConfig;
    limits: ImageLimits;
    imageSecurityPolicy?: string;
    imageSecurityPolicyUri?: string;
    sigstoreConfig?: string;
    sigstoreConfigUri?: string;
  };
}

export interface LoadedConfig {
  config: Config;
  /** Undeclared keys, as dotted paths, each with the file it came from. */
  warnings: string[];
  /** Keys present in the file that are valid cdh.toml but not acted on (dotted paths). */
  ignored: string[];
  /**
   * Whether the document had an `[image]` table. The kernel command line fallbacks
   * (./cmdline.ts) apply only when it had none (no document at all counts as none).
   */
  hasImageSection: boolean;
}

export function defaultConfig(): Config {
  return {
    log: {},
    image: {
      workDir: DEFAULT_WORK_DIR,
      maxConcurrentLayerDownloadsPerImage: DEFAULT_MAX_CONCURRENT_LAYER_DOWNLOADS,
      snapshotter: DEFAULT_SNAPSHOTTER,
      extraRootCertificates: [],
      network: { ...DEFAULT_NETWORK },
      limits: { ...DEFAULT_IMAGE_LIMITS },
    },
  };
}

/** The defaults as a LoadedConfig: what applies when there is no cdh.toml at all (no `[image]` either). */
export function defaultLoadedConfig(): LoadedConfig {
  return { config: defaultConfig(), warnings: [], ignored: [], hasImageSection: false };
}

/** TOML words for zod's type names. */
const TOML_TYPES: Readonly<Record<string, string>> = {
  object: 'a table',
  record: 'a table',
  array: 'an array',
  string: 'a string',
  number: 'a number',
  int: 'an integer',
  boolean: 'a boolean (true or false)',
};

function tomlTypeOf(v: unknown): string {
  if (Array.isArray(v)) return 'an array';
  if (v instanceof Date) return 'a date';
  if (typeof v === 'object' && v !== null) return 'a table';
  const kind = typeof v === 'number' ? (Number.isInteger(v) ? 'an integer' : 'a float') : `a ${typeof v}`;
  const text = JSON.stringify(v);
  return `${kind} (${text.length > 40 ? `${text.slice(0, 40)}…` : text})`;
}

function issueMessage(i: z.core.$ZodIssue): string {
  if (i.code === 'invalid_type') {
    const want = TOML_TYPES[i.expected] ?? i.expected;
    return i.input === undefined ? `missing; expected ${want}` : `expected ${want}, got ${tomlTypeOf(i.input)}`;
  }
  return i.message;
}

function configError(source: string, issues: readonly z.core.$ZodIssue[], prefix: PropertyKey[] = []): GuestpullError {
  const lines = issues.slice(0, 5).map((i) => {
    const key = formatKeyPath([...prefix, ...i.path]) || '(document)';
    return `${key}: ${issueMessage(i)}`;
  });
  const more = issues.length > 5 ? ` (and ${issues.length - 5} more)` : '';
  return new GuestpullError(
    ErrorCode.CONFIG,
    `invalid configuration in ${source}: ${lines.join('; ')}${more}; fix these keys in cdh.toml`,
    { source },
  );
}

function syntaxError(source: string, e: TomlError): GuestpullError {
  const first = e.message.split('\n')[0] ?? e.message;
  const lineText = e.codeblock
    .split('\n')
    .find((l) => l.startsWith(`${e.line}:`))
    ?.slice(String(e.line).length + 1)
    .trim();
  return new GuestpullError(
    ErrorCode.CONFIG,
    `invalid TOML in ${source} at line ${e.line}, column ${e.column}: ${first.replace(/^Invalid TOML document: /, '')}` +
      (lineText ? ` (line: ${JSON.stringify(lineText.slice(0, 120))})` : ''),
    { source, line: e.line, column: e.column },
    { cause: e },
  );
}

function nonEmpty<T extends object>(o: T): T | undefined {
  return Object.keys(o).length > 0 ? o : undefined;
}

/** A log level as cdh.toml or a --log-level flag spells it (`INFO`, `off`), as a pino level; undefined if invalid. */
export function normaliseLogLevel(level: string): string | undefined {
  const r = LogLevel.safeParse(level);
  return r.success ? r.data : undefined;
}

/** Parse a cdh.toml text; `source` names it in messages (a path, or "init-data cdh.toml"). */
export function parseConfig(tomlText: string, source: string): LoadedConfig {
  let raw: unknown;
  try {
    raw = parseToml(tomlText);
  } catch (e) {
    if (e instanceof TomlError) throw syntaxError(source, e);
    throw new GuestpullError(ErrorCode.CONFIG, `cannot parse ${source} as TOML: ${String(e)}`, { source });
  }
  const parsed = CdhToml.safeParse(raw, { reportInput: true });
  if (!parsed.success) throw configError(source, parsed.error.issues);
  const doc = parsed.data;

  let registryConfig: RegistriesConf | undefined;
  if (doc.image?.registry_config !== undefined) {
    const r = RegistriesConfSchema.safeParse(doc.image.registry_config, { reportInput: true });
    if (!r.success) throw configError(source, r.error.issues, ['image', 'registry_config']);
    registryConfig = r.data;
  }

  const img = doc.image ?? {};
  const proxy = img.image_pull_proxy;
  const config: Config = {
    ...(doc.socket !== undefined ? { socket: doc.socket } : {}),
    log: doc.log?.level !== undefined ? { level: doc.log.level } : {},
    image: compact({
      workDir: img.work_dir ?? DEFAULT_WORK_DIR,
      maxConcurrentLayerDownloadsPerImage:
        img.max_concurrent_layer_downloads_per_image ?? DEFAULT_MAX_CONCURRENT_LAYER_DOWNLOADS,
      snapshotter: img.snapshotter ?? DEFAULT_SNAPSHOTTER,
      unpackThreads: img.unpack_threads,
      imagePullProxy: proxy
        ? nonEmpty(compact({ httpsProxy: proxy.https_proxy, httpProxy: proxy.http_proxy, noProxy: proxy.no_proxy }))
        : undefined,
      extraRootCertificates: img.extra_root_certificates ?? [],
      registryConfig,
      registryConfigurationUri: img.registry_configuration_uri,
      authenticatedRegistryCredentialsUri: img.authenticated_registry_credentials_uri,
      authenticatedRegistryCredentials: img.authenticated_registry_credentials,
      network: {
        connectTimeoutMs: secs(img.connect_timeout_secs) ?? DEFAULT_NETWORK.connectTimeoutMs,
        headersTimeoutMs: secs(img.headers_timeout_secs) ?? DEFAULT_NETWORK.headersTimeoutMs,
        idleTimeoutMs: secs(img.idle_timeout_secs) ?? DEFAULT_NETWORK.idleTimeoutMs,
        maxAttempts: img.max_attempts ?? DEFAULT_NETWORK.maxAttempts,
      },
      limits: {
        maxManifestBytes: img.max_manifest_bytes ?? DEFAULT_IMAGE_LIMITS.maxManifestBytes,
        maxConfigBytes: img.max_config_bytes ?? DEFAULT_IMAGE_LIMITS.maxConfigBytes,
        maxUncompressedBytes: img.max_layer_bytes ?? DEFAULT_IMAGE_LIMITS.maxUncompressedBytes,
        maxRatio: img.max_layer_ratio ?? DEFAULT_IMAGE_LIMITS.maxRatio,
        maxEntries: img.max_layer_entries ?? DEFAULT_IMAGE_LIMITS.maxEntries,
        maxPathLength: img.max_path_length ?? DEFAULT_IMAGE_LIMITS.maxPathLength,
        maxPathDepth: img.max_path_depth ?? DEFAULT_IMAGE_LIMITS.maxPathDepth,
        maxPaxHeaderBytes: img.max_pax_header_bytes ?? DEFAULT_IMAGE_LIMITS.maxPaxHeaderBytes,
      },
      imageSecurityPolicy: img.image_security_policy,
      imageSecurityPolicyUri: img.image_security_policy_uri,
      sigstoreConfig: img.sigstore_config,
      sigstoreConfigUri: img.sigstore_config_uri,
    }),
  };

  const warnings = unknownKeys(CdhToml, raw).map((k) => `unknown key ${k} in ${source} (ignored)`);
  const ignored = IGNORED_KEYS.filter((k) => hasPath(raw, k.split('.')));
  return { config, warnings, ignored, hasImageSection: doc.image !== undefined };
}

/** Read and parse a cdh.toml file. Missing or unreadable files are CONFIG errors. */
export async function loadConfigFile(file: string): Promise<LoadedConfig> {
  let buf: Buffer;
  try {
    buf = await readFile(file);
  } catch (e) {
    const errno = (e as NodeJS.ErrnoException).code ?? String(e);
    throw new GuestpullError(ErrorCode.CONFIG, `cannot read configuration file ${file} (${errno}); check the --config path`, {
      source: file,
    });
  }
  if (buf.length > MAX_CONFIG_BYTES) {
    throw new GuestpullError(
      ErrorCode.CONFIG,
      `configuration file ${file} is ${buf.length} bytes; a cdh.toml is expected to be under ${MAX_CONFIG_BYTES} bytes`,
      { source: file },
    );
  }
  let text: string;
  try {
    text = new TextDecoder('utf-8', { fatal: true }).decode(buf);
  } catch {
    throw new GuestpullError(ErrorCode.CONFIG, `configuration file ${file} is not valid UTF-8 (TOML must be UTF-8)`, {
      source: file,
    });
  }
  return parseConfig(text, file);
}

function hasPath(v: unknown, keys: readonly string[]): boolean {
  let cur: unknown = v;
  for (const k of keys) {
    if (typeof cur !== 'object' || cur === null || !Object.hasOwn(cur, k)) return false;
    cur = (cur as Record<string, unknown>)[k];
  }
  return true;
}

function secs(s: number | undefined): number | undefined {
  return s === undefined ? undefined : Math.round(s * 1000);
}

/** Drop keys whose value is undefined, so optional fields are absent rather than `undefined`. */
function compact<T extends object>(o: T): T {
  return Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined)) as T;
}
