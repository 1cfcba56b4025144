/**
 * One pull from start to finish: reference → candidate locations → manifest (platform chosen) →
 * config (cached in the store by digest, in overlay mode) → rootfs → config.json. Identical
 * concurrent requests share one pull; different images run side by side.
 *
 * The rootfs, by `[image] snapshotter`:
 * - overlay: every layer missing from the store is unpacked into it on top of its parents (a layer
 *   two pulls need is unpacked once), then `<bundle>/rootfs` is an overlay mount of the store's
 *   layers; an image whose layers are all in the store costs one manifest request;
 * - copy: the layers applied in order into a staging rootfs inside the bundle, published by rename;
 *   the store is not used, not even for configs (in a guest its copy of every layer would cost RAM
 *   twice), so every copy pull downloads the whole image;
 * - auto: overlay when a test mount works, else copy.
 */
import path from 'node:path';
import type { Config, RegistriesConf } from '../config/index.js';
import { ErrorCode, GuestpullError, asGuestpullError } from '../errors.js';
import type { Logger } from '../log.js';
import { ImageConfig, parseJson } from '../oci.js';
import { formatReference, manifestReference, parseReference, type ImageReference } from '../reference.js';
import { firstSuccessful } from './candidates.js';
import { CredentialStore, explainAuthFailure, loadCredentials } from './credentials/index.js';
import { checkBundleFree, checkBundleRoots, checkNoSymlinks, resolveBundleRoots, validateBundlePath, writeFileAtomic } from './bundle/path.js';
import { Coalescer } from './coalesce.js';
import { mountOverlayBundle } from './bundle/overlay.js';
import { buildRuntimeSpec } from './bundle/spec.js';
import { RegistryClient, currentPlatform, resolveImage, type Credentials, type ResolvedImage } from './distribution/index.js';
import type { Descriptor } from '../oci.js';
import { Transport } from './distribution/transport/index.js';
import { applyLayer, type ApplyLayerOptions, type ApplyLayerResult } from './layers/index.js';
import { defaultWorkerCount, MAIN_SLOTS, LayerWorkers } from './layers/workers.js';
import { candidatesFor, type Candidate } from './registries/index.js';
import { loadRegistryConfiguration } from './registries/load.js';
import { createStaging, removeStaleStaging } from './stage.js';
import { chainIds, Store, type BundleMode, type LayerSpec, type UnpackHooks, type UnpackResult } from './store/index.js';

export interface PullOptions {
  signal?: AbortSignal;
}
export interface PullResult {
  manifestDigest: string;
  /** How the rootfs was made. */
  snapshotter: BundleMode;
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
  /**
   * `--bundle-root`: bundle paths must lie below one of these directories (each must exist; it is
   * resolved through symlinks here). Unset or empty: any absolute bundle path is allowed.
   */
  bundleRoots?: string[];
}

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
  /** Pulls in progress by bundle: identical requests share one, each caller cancels only itself. */
  private readonly inflight: Coalescer<PullResult>;
  private readonly bundleRoots: string[];
  private store: Promise<Store> | undefined;
  /** Where layers are unpacked: here, and in worker threads while this thread is busy (./layers/workers.ts). */
  private readonly workers: LayerWorkers;
  private readonly pullWarnings: string[];
  /** The registry configuration and credentials in force, loaded once here so bad ones fail at start. */
  private readonly registries: RegistriesConf;
  private readonly credentials: CredentialStore;

  constructor(opts: PullerOptions) {
    refuseUnsupported(opts.config);
    this.config = opts.config;
    this.logger = opts.logger;
    this.pullWarnings = opts.pullWarnings ?? [];
    this.bundleRoots = resolveBundleRoots(opts.bundleRoots ?? []);
    this.workers = new LayerWorkers(opts.config.image.unpackThreads ?? defaultWorkerCount(), { mainFirst: true, mainSlots: MAIN_SLOTS });
    this.inflight = new Coalescer<PullResult>({
      onJoin: (bundle, image, callers) => this.logger.info({ image, bundle, callers }, 'joining identical pull already in progress'),
      onAbandon: (bundle, image) => this.logger.info({ image, bundle }, 'every caller of this pull has gone: stopping it'),
    });
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
    checkBundleRoots(bundle, this.bundleRoots);
    // Before anything is written: the path must not route through a symlink.
    await checkNoSymlinks(bundle);
    try {
      return await this.inflight.run(bundle, image, opts.signal, (signal) => this.pullInto(ref, image, bundle, signal));
    } catch (e) {
      if (!(e instanceof GuestpullError) || e.code !== ErrorCode.RESOURCE_EXHAUSTED) throw e;
      // Out of space: say which filesystem filled up (copy bundles are unpacked into the bundle,
      // overlay layers into the work dir) and what to do.
      const workDir = this.config.image.workDir;
      const configured = this.config.image.snapshotter;
      const store = configured === 'copy' ? undefined : await this.store?.catch(() => undefined);
      const mode = configured === 'copy' ? 'copy' : await store?.mode(configured).catch(() => undefined);
      const advice =
        mode === 'copy'
          ? `copy bundles are unpacked into the bundle: free space on the filesystem of ${bundle} or give it a larger one`
          : `layers are unpacked into the work dir ${workDir}${mode === undefined ? ' (copy bundles: into the bundle)' : ''}: ` +
            "free space there, give it a larger filesystem ([image] work_dir or --work-dir), or drop layers no bundle uses with 'guestpull gc --drop-unused'";
      throw new GuestpullError(
        ErrorCode.RESOURCE_EXHAUSTED,
        `pull of ${image} into ${bundle} ran out of space: ${e.message}. ${advice[0]!.toUpperCase()}${advice.slice(1)}`,
        { ...e.context, image, bundle, workDir },
        { cause: e },
      );
    }
  }

  async close(): Promise<void> {
    // Cancelled callers are answered at once; give their pulls a moment to remove their staging.
    await this.inflight.drain(2_000);
    const store = this.store;
    this.store = undefined;
    await this.transport.close();
    await this.workers.close();
    if (store) await store.then((s) => s.release(), () => undefined);
  }

  /**
   * Garbage collection without dropping layers (what killed processes left, records of bundles
   * that are no longer mounted), if the store is open; logged, never thrown.
   */
  async sweep(): Promise<void> {
    const store = this.store;
    if (!store) return;
    try {
      const r = await (await store).collectGarbage(false);
      const removed = r.staging + r.incompleteLayers + r.deadBundles + r.strays;
      if (removed > 0) this.logger.info({ event: 'sweep', deadBundles: r.deadBundles, staging: r.staging, incompleteLayers: r.incompleteLayers, strays: r.strays }, 'work dir swept');
    } catch (e) {
      this.logger.warn({ event: 'sweep', err: (e as Error).message }, 'sweeping the work dir failed');
    }
  }

  /** The layer store of work_dir, opened (locked, cleaned) at the first pull. */
  private openStore(): Promise<Store> {
    if (!this.store) {
      const p = Store.open({ workDir: this.config.image.workDir, logger: this.logger });
      // A failed open is retried by the next pull.
      p.catch(() => {
        if (this.store === p) this.store = undefined;
      });
      this.store = p;
    }
    return this.store;
  }

  private async pullInto(ref: ImageReference, image: string, bundle: string, signal?: AbortSignal): Promise<PullResult> {
    const started = Date.now();
    const log = this.logger.child({ image, bundle });
    for (const w of this.pullWarnings) log.warn(w);
    const store = await this.openStore();
    // What a killed pull left in this bundle goes first (a half-published copy rootfs included).
    await removeStaleStaging(bundle, { logger: log });
    await checkBundleFree(bundle);
    const limits = this.config.image.limits;

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

    const snapshotter = await this.bundleMode(store, manifest.layers.length, image, log);
    const configBytes =
      snapshotter === 'overlay'
        ? await this.imageConfigBytes(store, client, manifest.config, limits.maxConfigBytes, log, signal)
        : await client.getBlobBytes(manifest.config, limits.maxConfigBytes, signal);
    const imageConfig = parseJson(ImageConfig, configBytes, `image config ${manifest.config.digest} of ${image}`);
    const diffIds = imageConfig.rootfs.diff_ids;
    if (diffIds.length !== manifest.layers.length) {
      throw new GuestpullError(
        ErrorCode.BAD_IMAGE,
        `image ${image} is inconsistent: the manifest lists ${manifest.layers.length} layers but the config has ${diffIds.length} diff_ids`,
        { image },
      );
    }

    const apply = (layer: Descriptor, i: number, root: string, sig?: AbortSignal, hooks?: UnpackHooks): Promise<UnpackResult> =>
      this.applyOne(client, layer, i, diffIds[i]!, root, image, log, sig, hooks);
    const common = { bundle, image, imageConfig, log, ...(manifest.annotations ? { manifestAnnotations: manifest.annotations } : {}), ...(signal ? { signal } : {}) };
    try {
      if (snapshotter === 'overlay') {
        const chain = chainIds(diffIds);
        const specs: LayerSpec[] = manifest.layers.map((layer, i) => ({
          chainId: chain[i]!,
          diffId: diffIds[i]!,
          layerDigest: layer.digest,
          mediaType: layer.mediaType,
          compressedBytes: layer.size,
          unpack: (root, sig, hooks) => apply(layer, i, root, sig, hooks),
        }));
        await this.overlayBundle(store, specs, manifestDigest, manifest.config.digest, common);
      } else {
        await this.copyBundle(manifest.layers, apply, common);
      }
    } catch (e) {
      // An aborted pull fails for the reason it was aborted (cancel, deadline, shutdown).
      const reason: unknown = signal?.aborted ? signal.reason : undefined;
      if (reason instanceof GuestpullError) throw reason;
      if (signal?.aborted) {
        throw new GuestpullError(ErrorCode.CANCELLED, `pull of ${image} was cancelled`, { image }, { cause: e });
      }
      throw asGuestpullError(e);
    }
    const bytes = manifest.layers.reduce((n, l) => n + l.size, 0);
    log.info({ manifestDigest, bytes, snapshotter, ms: Date.now() - started, reference: manifestReference(ref) }, 'pull complete');
    return { manifestDigest, snapshotter };
  }

  /** overlay or copy for this image; an image too deep for one overlay mount falls back to copy under `auto`. */
  private async bundleMode(store: Store, layers: number, image: string, log: Logger): Promise<BundleMode> {
    const configured = this.config.image.snapshotter;
    const mode = await store.mode(configured, log);
    if (mode === 'copy' || layers === 0) return 'copy';
    if (store.overlayFits(layers)) return 'overlay';
    if (configured === 'overlay') {
      throw new GuestpullError(
        ErrorCode.UNIMPLEMENTED,
        `image ${image} has ${layers} layers, more than one overlay mount can stack here; set [image] snapshotter = "auto" or "copy"`,
        { image },
      );
    }
    log.warn({ layers }, 'too many layers for one overlay mount: this image is unpacked as a copy');
    return 'copy';
  }

  /** The image config: from the store's cache when it has it, else fetched (verified) and cached. */
  private async imageConfigBytes(store: Store, client: RegistryClient, desc: Descriptor, maxBytes: number, log: Logger, signal?: AbortSignal): Promise<Buffer> {
    const cached = await store.configs.get(desc.digest, maxBytes);
    if (cached) {
      log.debug({ config: desc.digest }, 'image config from the store');
      return cached;
    }
    const bytes = await client.getBlobBytes(desc, maxBytes, signal);
    await store.configs.put(desc.digest, bytes).catch((e: unknown) => log.warn({ config: desc.digest, err: (e as Error).message }, 'could not cache the image config'));
    return bytes;
  }

  /** Download one layer and apply it (verified) onto `root`. */
  private async applyOne(
    client: RegistryClient,
    layer: Descriptor,
    index: number,
    diffId: string,
    root: string,
    image: string,
    log: Logger,
    signal?: AbortSignal,
    hooks?: UnpackHooks,
  ): Promise<UnpackResult> {
    // A slot first, then the download: a queued layer must not hold an idle response open.
    const slot = await this.workers.acquire(signal);
    hooks?.started?.();
    const t0 = Date.now();
    let r: ApplyLayerResult;
    try {
      const source = await client.getBlob(layer, signal);
      const opts: ApplyLayerOptions = {
        source,
        mediaType: layer.mediaType,
        compressedSize: layer.size,
        diffId,
        layerDigest: layer.digest,
        rootfs: root,
        image,
        logger: log,
        limits: this.config.image.limits,
        ...(signal ? { signal } : {}),
        ...(hooks?.lower ? { lower: hooks.lower } : {}),
      };
      // In this thread, or (while another layer is unpacked here) in a worker.
      r = await (slot.apply ? slot.apply(opts) : applyLayer(opts));
    } finally {
      slot.release();
    }
    log.info({ layer: layer.digest, index, bytes: layer.size, uncompressed: r.uncompressedBytes, entries: r.entries, ms: Date.now() - t0 }, 'layer applied');
    return { entries: r.entries, uncompressedBytes: r.uncompressedBytes, rootEntry: r.rootEntry, switched: r.switched };
  }

  /** Copy mode: every layer applied in order into a staging rootfs in the bundle, then published. */
  private async copyBundle(
    layers: readonly Descriptor[],
    apply: (layer: Descriptor, i: number, root: string, sig?: AbortSignal) => Promise<UnpackResult>,
    c: BundleCommon,
  ): Promise<void> {
    const staging = await createStaging(c.bundle, { logger: c.log });
    try {
      for (const [i, layer] of layers.entries()) {
        c.signal?.throwIfAborted();
        await apply(layer, i, staging.rootfs, c.signal);
      }
      const spec = await buildRuntimeSpec(specOptions(c, staging.rootfs));
      c.signal?.throwIfAborted();
      await staging.publishRootfs();
      await writeFileAtomic(path.join(c.bundle, 'config.json'), JSON.stringify(spec, null, 2) + '\n', 0o644);
    } catch (e) {
      await staging.discard();
      throw e;
    }
    try {
      await staging.complete();
    } catch (e) {
      // The bundle is complete; only our staging directory is left (the next pull here removes it).
      c.log.warn({ bundle: c.bundle, err: (e as Error).message }, 'could not remove the staging directory of a finished pull');
    }
  }

  /**
   * Overlay mode: lease the bundle (its layers are kept from garbage collection from now on), make
   * sure every layer is in the store, mount `<bundle>/rootfs` over them, then config.json.
   */
  private async overlayBundle(store: Store, specs: LayerSpec[], manifestDigest: string, configDigest: string, c: BundleCommon): Promise<void> {
    const lease = await store.leaseBundle({ bundle: c.bundle, chainIds: specs.map((s) => s.chainId), image: c.image, manifestDigest, configDigest });
    let undo: (() => Promise<void>) | undefined;
    try {
      // Layers of one image are unpacked side by side (speculative builds): have the threads ready.
      let missing = 0;
      for (const s of specs) if (!(await store.layer(s.chainId))) missing++;
      if (missing > 1) this.workers.prewarm(missing - 1);
      await store.ensureLayers(specs, c.log, c.signal);
      c.signal?.throwIfAborted();
      const ob = await mountOverlayBundle({ store, lease, bundle: c.bundle, image: c.image, logger: c.log });
      undo = ob.undo;
      const spec = await buildRuntimeSpec(specOptions(c, ob.rootfs));
      c.signal?.throwIfAborted();
      await writeFileAtomic(path.join(c.bundle, 'config.json'), JSON.stringify(spec, null, 2) + '\n', 0o644);
    } catch (e) {
      try {
        await undo?.();
        await store.dropBundle(lease.id);
      } catch (u) {
        c.log.error({ bundle: c.bundle, err: (u as Error).message }, 'could not take down the overlay rootfs of a failed pull');
      }
      throw e;
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
      limits: { manifestBytes: this.config.image.limits.maxManifestBytes },
      ...(credentials ? { credentials } : {}),
    });
  }
}

/** What both bundle modes need to know. */
interface BundleCommon {
  bundle: string;
  image: string;
  imageConfig: ImageConfig;
  manifestAnnotations?: Record<string, string>;
  log: Logger;
  signal?: AbortSignal;
}

function specOptions(c: BundleCommon, rootfs: string): Parameters<typeof buildRuntimeSpec>[0] {
  return { imageConfig: c.imageConfig, rootfs, image: c.image, ...(c.manifestAnnotations ? { manifestAnnotations: c.manifestAnnotations } : {}) };
}
