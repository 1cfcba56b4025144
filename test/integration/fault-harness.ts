/**
 * Shared parts of the fault and deadline tests: a fixture image with one large incompressible
 * layer (so a fault can land mid-blob), the cdh.toml they run the daemon with, a timed PullImage
 * that can be cancelled, and the check that no staging directory survives a pull, in the bundle
 * root (`<bundle>/.guestpull-staging-*`, src/pull/stage.ts) or in the work dir (`staging/`,
 * src/pull/store/layout.ts).
 */
import * as grpc from '@grpc/grpc-js';
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { readdir } from 'node:fs/promises';
import path from 'node:path';
import { SERVICE_NAMES, serviceDefinition } from '../../src/service/protos.js';
import { buildImage, type BuiltImage, type EntrySpec } from '../helpers/image-builder.js';
import { expectedTreeFromLayers, type TreeEntry } from '../helpers/tree.js';

export interface FixtureImage {
  image: BuiltImage;
  layers: EntrySpec[][];
  expected: TreeEntry[];
  /** The digest of the large layer, where faults are injected. */
  bigDigest: string;
  bigSize: number;
}

/** Two layers: a few small files, then `bigBytes` of random data (gzip cannot shrink it). */
export async function faultImage(name: string, bigBytes = 1024 * 1024): Promise<FixtureImage> {
  const layers: EntrySpec[][] = [
    [
      { type: 'dir', path: 'etc', mode: 0o755 },
      { type: 'file', path: 'etc/hello', content: `hello from ${name}\n`, mode: 0o644 },
      { type: 'symlink', path: 'hello', target: 'etc/hello' },
    ],
    [
      { type: 'dir', path: 'data', mode: 0o755 },
      { type: 'file', path: 'data/big.bin', content: randomBytes(bigBytes), mode: 0o600, uid: 1000, gid: 1000 },
    ],
  ];
  const image = await buildImage({ layers, config: { Cmd: ['/hello'] } });
  const big = image.layers[1]!;
  if (big.size < bigBytes) throw new Error(`the big layer of ${name} compressed to ${big.size} bytes: not random enough`);
  return { image, layers, expected: expectedTreeFromLayers(layers), bigDigest: big.digest, bigSize: big.size };
}

/** A regex for GET paths of one blob of one repository. */
export function blobPath(repo: string, digest: string): RegExp {
  return new RegExp(`^/v2/${repo}/blobs/${digest}$`);
}

export interface TomlOptions {
  workDir: string;
  snapshotter: 'copy' | 'overlay';
  /** host:port entries served over plain HTTP. */
  insecure: string[];
  httpsProxy?: string;
  certs?: string[];
  idleTimeoutSecs: number;
  headersTimeoutSecs?: number;
  maxAttempts?: number;
}

export function faultToml(o: TomlOptions): string {
  const lines = [
    '[image]',
    `work_dir = ${JSON.stringify(o.workDir)}`,
    `snapshotter = "${o.snapshotter}"`,
    'connect_timeout_secs = 2',
    `headers_timeout_secs = ${o.headersTimeoutSecs ?? 1}`,
    `idle_timeout_secs = ${o.idleTimeoutSecs}`,
    `max_attempts = ${o.maxAttempts ?? 3}`,
  ];
  if (o.certs) lines.push(`extra_root_certificates = [${o.certs.map((c) => `'''\n${c}'''`).join(', ')}]`);
  if (o.httpsProxy) lines.push('[image.image_pull_proxy]', `https_proxy = ${JSON.stringify(o.httpsProxy)}`);
  for (const host of o.insecure) lines.push('[[image.registry_config.registry]]', `location = ${JSON.stringify(host)}`, 'insecure = true');
  return lines.join('\n') + '\n';
}

export type PullOutcome =
  | { ok: true; digest: string; ms: number; endedAt: number }
  | { ok: false; code: grpc.status; details: string; ms: number; endedAt: number };

export interface PullCall {
  outcome: Promise<PullOutcome>;
  cancel(): void;
}

/** PullImage on its own grpc client, timed with performance.now(); `cancel()` is grpc's call.cancel(). */
export function startPull(address: string, image: string, bundle: string, deadlineMs?: number): PullCall {
  const client = new grpc.Client(address, grpc.credentials.createInsecure());
  const def = serviceDefinition(SERVICE_NAMES.imagePull)['PullImage'];
  if (!def) throw new Error('ImagePullService has no PullImage');
  const t0 = performance.now();
  let call: grpc.ClientUnaryCall | undefined;
  const outcome = new Promise<PullOutcome>((resolve) => {
    call = client.makeUnaryRequest(
      def.path,
      def.requestSerialize,
      def.responseDeserialize,
      { image_url: image, bundle_path: bundle },
      new grpc.Metadata(),
      deadlineMs === undefined ? {} : { deadline: Date.now() + deadlineMs },
      (err: grpc.ServiceError | null, value?: unknown) => {
        const endedAt = performance.now();
        const ms = endedAt - t0;
        client.close();
        if (err) resolve({ ok: false, code: err.code, details: err.details, ms, endedAt });
        else resolve({ ok: true, digest: String((value as { manifest_digest?: unknown } | undefined)?.manifest_digest ?? ''), ms, endedAt });
      },
    );
  });
  return { outcome, cancel: () => call?.cancel() };
}

/** Names in the bundle root and the work dir that belong to unfinished pulls. */
export async function leftovers(bundleRoot: string, workDir: string): Promise<string[]> {
  const out: string[] = [];
  if (existsSync(bundleRoot)) {
    for (const b of await readdir(bundleRoot)) {
      const dir = path.join(bundleRoot, b);
      for (const n of await readdir(dir)) if (n.startsWith('.guestpull-staging-')) out.push(path.join(dir, n));
    }
  }
  const staging = path.join(workDir, 'staging');
  if (existsSync(staging)) for (const n of await readdir(staging)) out.push(path.join(staging, n));
  return out;
}

/** What a bundle directory holds: [] (or absent) after a failed pull, ['config.json', 'rootfs'] after a good one. */
export async function bundleContents(bundle: string): Promise<string[]> {
  return existsSync(bundle) ? (await readdir(bundle)).sort() : [];
}

/** Poll `check` until it returns true or `ms` pass; the time it took, or undefined on timeout. */
export async function within(ms: number, check: () => Promise<boolean> | boolean, stepMs = 20): Promise<number | undefined> {
  const t0 = performance.now();
  for (;;) {
    if (await check()) return performance.now() - t0;
    if (performance.now() - t0 > ms) return undefined;
    await new Promise((r) => setTimeout(r, stepMs));
  }
}
