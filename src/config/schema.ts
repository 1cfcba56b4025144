/**
 * The cdh.toml document as written (snake_case keys), as zod schemas. Every key the reference
 * confidential data hub accepts is declared here so a real file parses; keys this project does not
 * act on are listed in IGNORED_KEYS. `image.registry_config` is only type-checked as "a table" here:
 * its contents are validated by ./registries.js.
 */
import path from 'node:path';
import { z } from 'zod';

export const LOG_LEVELS = ['trace', 'debug', 'info', 'warn', 'error', 'fatal', 'silent'] as const;

/** Reference log levels are case-insensitive (`INFO`); `off` is the tracing spelling of silent. */
export const LogLevel = z
  .string()
  .transform((s) => {
    const l = s.trim().toLowerCase();
    return l === 'off' ? 'silent' : l === 'warning' ? 'warn' : l;
  })
  .pipe(z.enum(LOG_LEVELS, { error: `expected one of ${LOG_LEVELS.join(', ')} (or off)` }));

const AbsolutePath = z
  .string()
  .refine((p) => path.isAbsolute(p), { error: 'expected an absolute path' })
  .refine((p) => !p.includes('\0'), { error: 'path must not contain NUL' });

const ProxyUrl = z.string().refine(
  (s) => {
    try {
      const u = new URL(s);
      return (u.protocol === 'http:' || u.protocol === 'https:') && u.hostname !== '';
    } catch {
      return false;
    }
  },
  { error: 'expected an http:// or https:// proxy URL such as "http://10.0.0.1:3128"' },
);

const PemCertificate = z
  .string()
  .refine((s) => s.includes('-----BEGIN CERTIFICATE-----'), {
    error: 'expected a PEM certificate ("-----BEGIN CERTIFICATE-----" ...)',
  });

const Table = z.record(z.string(), z.unknown());
const MiB = 1024 * 1024;

export const ImageSection = z.object({
  work_dir: AbsolutePath.optional(),
  max_concurrent_layer_downloads_per_image: z.number().int().min(1).max(64).optional(),
  /**
   * guestpull extension: how a bundle's rootfs is made. `overlay`: an overlay mount of the layer
   * store; `copy`: the layers flattened into a plain directory; `auto` (default): overlay when a
   * test mount works on this kernel, else copy.
   */
  snapshotter: z.enum(['overlay', 'copy', 'auto'], { error: 'expected "overlay", "copy" or "auto"' }).optional(),
  /**
   * guestpull extension: worker threads that unpack layers beyond the two the daemon's own thread
   * unpacks at once (0: all in the daemon's thread). Default: cores - 2, 0 to 8.
   */
  unpack_threads: z.number().int().min(0).max(64).optional(),
  image_pull_proxy: z
    .object({
      https_proxy: ProxyUrl.optional(),
      http_proxy: ProxyUrl.optional(),
      no_proxy: z.string().optional(),
    })
    .optional(),
  extra_root_certificates: z.array(PemCertificate).optional(),
  /** Validated in detail by RegistriesConfSchema (./registries.js). */
  registry_config: Table.optional(),
  registry_configuration_uri: z.string().optional(),
  authenticated_registry_credentials_uri: z.string().optional(),
  /** guestpull extension: the auth.json document inline (a JSON string), instead of a URI. */
  authenticated_registry_credentials: z.string().optional(),
  /** guestpull extensions: network timeouts (seconds) and attempts per request. */
  connect_timeout_secs: z.number().positive().max(3600).optional(),
  headers_timeout_secs: z.number().positive().max(3600).optional(),
  idle_timeout_secs: z.number().positive().max(3600).optional(),
  max_attempts: z.number().int().min(1).max(20).optional(),
  /**
   * guestpull extensions: bounds on what an image may make us read or write (defaults in
   * ./index.ts DEFAULT_IMAGE_LIMITS). Manifest and index documents, the image config, and per
   * layer: uncompressed bytes, uncompressed/compressed ratio, tar entries, path length and depth,
   * and the size of one PAX or GNU long-name header.
   */
  max_manifest_bytes: z.number().int().min(1024).max(256 * MiB).optional(),
  max_config_bytes: z.number().int().min(1024).max(256 * MiB).optional(),
  max_layer_bytes: z.number().int().min(MiB).max(Number.MAX_SAFE_INTEGER).optional(),
  max_layer_ratio: z.number().min(2).max(1e9).optional(),
  max_layer_entries: z.number().int().min(1).max(1e9).optional(),
  max_path_length: z.number().int().min(255).max(65536).optional(),
  max_path_depth: z.number().int().min(16).max(65536).optional(),
  max_pax_header_bytes: z.number().int().min(4096).max(256 * MiB).optional(),
  image_security_policy: z.string().optional(),
  image_security_policy_uri: z.string().optional(),
  sigstore_config: z.string().optional(),
  sigstore_config_uri: z.string().optional(),
  // Accepted for compatibility, not acted on (see IGNORED_KEYS).
  anonymous_fallback_on_unauthorized: z.boolean().optional(),
  kbc: z.string().optional(),
  kbs_uri: z.string().optional(),
});

export const CdhToml = z.object({
  socket: z.string().min(1).optional(),
  services_dir: z.string().optional(),
  skip_sealed_secret_verification: z.boolean().optional(),
  aa: z.object({ aa_socket: z.string().optional() }).optional(),
  kbc: z
    .object({ name: z.string().optional(), url: z.string().optional(), kbs_cert: z.string().optional() })
    .optional(),
  credentials: z.array(z.object({ resource_uri: z.string(), path: z.string() })).optional(),
  log: z.object({ level: LogLevel.optional() }).optional(),
  image: ImageSection.optional(),
});
export type CdhToml = z.infer<typeof CdhToml>;

/**
 * Keys that are valid in cdh.toml but mean nothing to an image puller (attestation, KBS, sealed
 * secrets, per-service sockets). They are accepted and reported once at debug level.
 */
export const IGNORED_KEYS: readonly string[] = [
  'services_dir',
  'skip_sealed_secret_verification',
  'aa',
  'kbc',
  'credentials',
  'image.anonymous_fallback_on_unauthorized',
  'image.kbc',
  'image.kbs_uri',
];
