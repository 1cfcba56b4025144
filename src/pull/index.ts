/**
 * One pull from start to finish: reference → candidate locations → manifest (platform chosen) →
 * config → layers applied in order into a staging rootfs → config.json → published. Identical
 * concurrent requests share one pull; different images run side by side.
 */
import path from 'node:path';
import type { Config, RegistriesConf } from '../config/index.js';
import { ErrorCode, GuestpullError, asGuestpullError } from '../errors.js';
import type { Logger } from '../log.js';
import { ImageConfig, parseJson } from '../oci.js';
import { formatReference, manifestReference, parseReference, type ImageReference } from '../reference.js';
import { firstSuccessful } from './candidates.js';
import { CredentialStore, explainAuthFailure, loadCredentials } from './credentials/index.js';
import { checkBundleFree, validateBundlePath, writeFileAtomic } from './bundle/path.js';
import { buildRuntimeSpec } from './bundle/spec.js';
import { RegistryClient, currentPlatform, resolveImage, type Credentials, type ResolvedImage } from './distribution/index.js';
import { Transport } from './distribution/transport/index.js';
import { applyLayer } from './layers/index.js';
import { candidatesFor, type Candidate } from './registries/index.js';
import { loadRegistryConfiguration } from './registries/load.js';
import { createStaging } from './stage.js';
import { openWorkDir } from './store/index.js';

export interface PullOptions {
  signal?: AbortSignal;
}
export interface PullResult {
  manifestDigest: string;
}
export interface PullerOptions {
  config: Config;
  logger: Logger;
  version: string;
  /**
   * Warnings repeated at the start of every pull (e.g. that the configuration is unmeasured), so
   * they stand next to each pull in the log, not only at start-up.
   */
  pullWarnings?: string[];
}

/** Upper bound for an image config blob (image-spec configs are small; 4 MiB as for manifests). */
const MAX_CONFIG_BYTES = 4 * 1024 * 1024;

/**
 * Keys that would tighten what may be pulled must not be silently ignored: until guestpull acts on
 * them (image security policy, signatures), a configuration that sets them is refused.
 */
function refuseUnsupported(config: Config): void {
  const img = config.image;
  const unsupported: [string, unknown][] = [
    ['image_security_policy', img.imageSecurityPolicy],
    ['image_security_policy_uri', img.imageSecurityPolicyUri],
    ['sigstore_config', img.sigstoreConfig],
    ['sigstore_config_uri', img.sigstoreConfigUri],
  ];
  const set = unsupported.filter(([, v]) => v !== undefined && v !== '').map(([k]) => `[image] ${k}`);
  if (set.length > 0) {
    throw new GuestpullError(
      ErrorCode.CONFIG,
      `cdh.toml sets ${set.join(', ')}, which this version of guestpull does not enforce yet; ` +
        'refusing to run rather than ignore it (remove the key)',
    );
  }
}

export class Puller {
  private readonly config: Config;
  private readonly logger: Logger;
  private readonly transport: Transport;
  private readonly inflight = new Map<string, { image: string; promise: Promise<PullResult> }>();
  private workDir: Promise<string> | undefined;
  private readonly pullWarnings: string[];
  /** The registry configuration and credentials in force, loaded once here so bad ones fail at start. */
  private readonly registries: RegistriesConf;
  private readonly credentials: CredentialStore;

  constructor(opts: PullerOptions) {
    refuseUnsupported(opts.config);
    this.config = opts.config;
    this.logger = opts.logger;
    this.pullWarnings = opts.pullWarnings ?? [];
    this.registries = loadRegistryConfiguration(opts.config.image, opts.logger);
    this.credentials = loadCredentials(opts.config.image, opts.logger);
    this.transport = new Transport(
      {
        extraRootCertificates: opts.config.image.extraRootCertificates,
        userAgent: `guestpull/${opts.version}`,
        connectTimeoutMs: opts.config.image.network.connectTimeoutMs,
        headersTimeoutMs: opts.config.image.network.headersTimeoutMs,
        bodyTimeoutMs: opts.config.image.network.idleTimeoutMs,
        maxAttempts: opts.config.image.network.maxAttempts,
        ...(opts.config.image.imagePullProxy ? { proxy: opts.config.image.imagePullProxy } : {}),
      },
      opts.logger,
    );
  }

  async pull(imageUrl: string, bundlePath: string, opts: PullOptions = {}): Promise<PullResult> {
    const ref = parseReference(imageUrl);
    const image = formatReference(ref);
    const bundle = validateBundlePath(bundlePath);
    const running = this.inflight.get(bundle);
    if (running) {
      if (running.image === image) {
        this.logger.info({ image, bundle }, 'joining identical pull already in progress');
        return running.promise;
      }
      throw new GuestpullError(
        ErrorCode.ALREADY_EXISTS,
        `bundle ${bundle} is being filled by a pull of ${running.image}; use another bundle path for ${image}`,
        { image, bundle },
      );
    }
    const promise = this.pullInto(ref, image, bundle, opts.signal).finally(() => this.inflight.delete(bundle));
    this.inflight.set(bundle, { image, promise });
    return promise;
  }

  async close(): Promise<void> {
    await this.transport.close();
  }

  private async pullInto(ref: ImageReference, image: string, bundle: string, signal?: AbortSignal): Promise<PullResult> {
    const started = Date.now();
    const log = this.logger.child({ image, bundle });
    for (const w of this.pullWarnings) log.warn(w);
    this.workDir ??= openWorkDir(this.config.image.workDir);
    await this.workDir;
    await checkBundleFree(bundle);

    const candidates = candidatesFor(ref, this.registries);
    const platform = currentPlatform();
    const { candidate, value } = await firstSuccessful(candidates, (c) => c.description, image, async (c: Candidate) => {
      const match = this.credentials.lookup(c.registry, c.repository);
      if (match) log.info({ registry: c.registry, repository: c.repository, authKey: match.key }, 'using credentials from auth.json');
      const client = this.client(c, image, match?.credentials);
      try {
        const resolved: ResolvedImage = await resolveImage(client, c.reference, platform, signal);
        return { client, resolved };
      } catch (e) {
        throw explainAuthFailure(asGuestpullError(e), match, { registry: c.registry, repository: c.repository, origin: client.origin }, this.credentials);
      }
    });
    const { client, resolved } = value;
    const { manifest, manifestDigest } = resolved;
    log.info({ registry: candidate.registry, repository: candidate.repository, manifestDigest, layers: manifest.layers.length }, 'manifest resolved');

    const configBytes = await client.getBlobBytes(manifest.config, MAX_CONFIG_BYTES, signal);
    const imageConfig = parseJson(ImageConfig, configBytes, `image config ${manifest.config.digest} of ${image}`);
    const diffIds = imageConfig.rootfs.diff_ids;
    if (diffIds.length !== manifest.layers.length) {
      throw new GuestpullError(
        ErrorCode.BAD_IMAGE,
        `image ${image} is inconsistent: the manifest lists ${manifest.layers.length} layers but the config has ${diffIds.length} diff_ids`,
        { image },
      );
    }

    const staging = await createStaging(bundle);
    try {
      let bytes = 0;
      for (const [i, layer] of manifest.layers.entries()) {
        signal?.throwIfAborted();
        const t0 = Date.now();
        const source = await client.getBlob(layer, signal);
        const r = await applyLayer({
          source,
          mediaType: layer.mediaType,
          compressedSize: layer.size,
          diffId: diffIds[i]!,
          layerDigest: layer.digest,
          rootfs: staging.rootfs,
          image,
          logger: log,
          ...(signal ? { signal } : {}),
        });
        bytes += layer.size;
        log.info({ layer: layer.digest, index: i, bytes: layer.size, uncompressed: r.uncompressedBytes, entries: r.entries, ms: Date.now() - t0 }, 'layer applied');
      }
      const spec = await buildRuntimeSpec({
        imageConfig,
        rootfs: staging.rootfs,
        image,
        ...(manifest.annotations ? { manifestAnnotations: manifest.annotations } : {}),
      });
      signal?.throwIfAborted();
      await staging.publishRootfs();
      await writeFileAtomic(path.join(bundle, 'config.json'), JSON.stringify(spec, null, 2) + '\n', 0o644);
      log.info({ manifestDigest, bytes, ms: Date.now() - started, reference: manifestReference(ref) }, 'pull complete');
      return { manifestDigest };
    } catch (e) {
      await staging.discard();
      // An aborted pull fails for the reason it was aborted (cancel, deadline, shutdown).
      const reason: unknown = signal?.aborted ? signal.reason : undefined;
      if (reason instanceof GuestpullError) throw reason;
      if (signal?.aborted) {
        throw new GuestpullError(ErrorCode.CANCELLED, `pull of ${image} was cancelled`, { image }, { cause: e });
      }
      throw asGuestpullError(e);
    }
  }

  /** A client for one candidate location, with the credentials that belong to that location (if any). */
  private client(c: Candidate, image: string, credentials: Credentials | undefined): RegistryClient {
    return new RegistryClient({
      baseUrl: c.baseUrl,
      repository: c.repository,
      transport: this.transport,
      logger: this.logger,
      image,
      ...(credentials ? { credentials } : {}),
    });
  }
}
