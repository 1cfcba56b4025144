/**
 * PullImage end to end against the real CNCF distribution registry: the daemon runs as a child
 * process, a real gRPC client calls it over a unix socket, and the bundle is compared with the
 * expected tree and with `skopeo copy` + `umoci unpack` of the same image.
 */
import { status as Status } from '@grpc/grpc-js';
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { lstat, mkdir, mkdtemp, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startDaemon, type RunningDaemon } from '../helpers/daemon.js';
import { connectClient, type PullClient } from '../helpers/grpc-client.js';
import { buildImage, buildSyntheticImage, type BuiltImage, type BuiltIndex } from '../helpers/image-builder.js';
import { freePort } from '../helpers/ports.js';
import { pushImage, pushIndex } from '../helpers/push.js';
import { hasRegistryBinary, startRegistry, type RunningRegistry } from '../helpers/registry.js';
import { diffTrees, snapshotTree, type TreeEntry } from '../helpers/tree.js';
import { hasSkopeoUmoci, referenceUnpack } from '../helpers/umoci.js';
import { goarch, richConfig, richImage, richLayers, twoPlatformIndex } from './fixtures.js';
import { removeTree } from '../helpers/cleanup.js';

const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');

let tmp: string;
let registry: RunningRegistry;
let daemon: RunningDaemon;
let client: PullClient;
let cdhToml: string;
let deadHost: string;
let rich: BuiltImage;
let richDigest: string;
let richDocker: BuiltImage;
let richDockerDigest: string;
let multi: BuiltIndex;
let bigA: BuiltImage;
let bigB: BuiltImage;
let bundleNo = 0;

function newBundle(): string {
  return path.join(tmp, 'bundles', `c${++bundleNo}`);
}

interface GrpcError {
  code: number;
  details: string;
}

async function pullError(image: string, bundle: string): Promise<GrpcError> {
  try {
    await client.pullImage(image, bundle);
  } catch (e) {
    return e as GrpcError;
  }
  throw new Error(`PullImage ${image} → ${bundle} unexpectedly succeeded`);
}

function entry(tree: TreeEntry[], p: string): TreeEntry {
  const e = tree.find((t) => t.path === p);
  if (!e) throw new Error(`${p} missing from the rootfs; have: ${tree.map((t) => t.path).join(' ')}`);
  return e;
}

/** Nothing of a failed pull may remain in the bundle: no rootfs, no config.json, no staging dir. */
async function expectBundleClean(bundle: string): Promise<void> {
  if (!existsSync(bundle)) return;
  expect(await readdir(bundle)).toEqual([]);
}

beforeAll(async () => {
  if (!hasRegistryBinary()) throw new Error('docker-registry is not installed: apt-get install docker-registry (scripts/install-deps.sh does this)');
  tmp = await mkdtemp(path.join(os.tmpdir(), 'guestpull-it-'));
  registry = await startRegistry();
  rich = await richImage('oci');
  richDigest = await pushImage(registry.url, 'fixtures/rich', 'v1', rich);
  richDocker = await richImage('docker');
  richDockerDigest = await pushImage(registry.url, 'fixtures/rich-docker', 'v1', richDocker);
  const plain = await buildImage({ layers: richLayers, config: richConfig, compression: 'none' });
  expect(plain.layers.map((l) => l.mediaType)).toEqual(richLayers.map(() => 'application/vnd.oci.image.layer.v1.tar'));
  await pushImage(registry.url, 'fixtures/rich-plain', 'v1', plain);
  multi = await twoPlatformIndex('oci');
  await pushIndex(registry.url, 'fixtures/multi', 'v1', multi);
  bigA = await buildSyntheticImage({ seed: 1, layers: 2, totalBytes: 24 << 20, files: 300 });
  bigB = await buildSyntheticImage({ seed: 2, layers: 2, totalBytes: 24 << 20, files: 300 });
  await pushImage(registry.url, 'fixtures/big-a', 'v1', bigA);
  await pushImage(registry.url, 'fixtures/big-b', 'v1', bigB);

  deadHost = `127.0.0.1:${await freePort()}`;
  cdhToml = path.join(tmp, 'cdh.toml');
  await writeFile(
    cdhToml,
    [
      '[kbc]',
      'name = "cc_kbc"',
      'url = "http://1.2.3.4:8080"',
      '[image]',
      `work_dir = "${path.join(tmp, 'work')}"`,
      '[[image.registry_config.registry]]',
      `location = "${registry.host}"`,
      'insecure = true',
      '[[image.registry_config.registry]]',
      `location = "${deadHost}"`,
      'insecure = true',
      '',
    ].join('\n'),
  );
  daemon = await startDaemon({ repoRoot, socket: path.join(tmp, 'run', 'cdh.sock'), config: cdhToml });
  client = connectClient(daemon.address);
}, 180_000);

afterAll(async () => {
  client?.close();
  await daemon?.stop();
  await registry?.stop();
  if (tmp) await removeTree(tmp);
});

describe('PullImage from a real registry', () => {
  it('unpacks every layer feature into <bundle>/rootfs and returns the manifest digest', async () => {
    const bundle = newBundle();
    const res = await client.pullImage(`${registry.host}/fixtures/rich:v1`, bundle);
    expect(res.manifest_digest).toBe(richDigest);
    expect(res.manifest_digest).toBe(rich.manifest.digest);

    const rootfs = path.join(bundle, 'rootfs');
    const tree = await snapshotTree(rootfs);
    const paths = tree.map((t) => t.path);
    // whiteouts: a file and a directory of layer 1 deleted by layer 2
    expect(paths).not.toContain('gone.txt');
    expect(paths.filter((p) => p === 'old' || p.startsWith('old/'))).toEqual([]);
    // opaque directory: the lower contents are hidden, the layer's own file stays
    expect(paths.filter((p) => p.startsWith('opq/'))).toEqual(['opq/upper']);
    // no whiteout markers leak into the rootfs
    expect(paths.filter((p) => path.basename(p).startsWith('.wh.'))).toEqual([]);
    // owners and modes
    expect(entry(tree, 'data/secret')).toMatchObject({ type: 'file', mode: 0o640, uid: 1000, gid: 1000 });
    expect(entry(tree, 'bin/suid')).toMatchObject({ type: 'file', mode: 0o4755, uid: 0, gid: 0 });
    expect(entry(tree, 'home/app')).toMatchObject({ type: 'dir', mode: 0o750, uid: 1000, gid: 1000 });
    expect(entry(tree, 'tmp')).toMatchObject({ type: 'dir', mode: 0o1777 });
    // links stored verbatim
    expect(entry(tree, 'bin/abs')).toMatchObject({ type: 'symlink', target: '/bin/tool' });
    expect(entry(tree, 'rel')).toMatchObject({ type: 'symlink', target: 'bin/tool' });
    expect(entry(tree, 'etc/alt')).toMatchObject({ type: 'symlink', target: '../bin/tool' });
    // hardlink identity: same layer and across layers
    const tool = await stat(path.join(rootfs, 'bin/tool'));
    expect((await lstat(path.join(rootfs, 'bin/tool-hard'))).ino).toBe(tool.ino);
    const secret = await stat(path.join(rootfs, 'data/secret'));
    expect((await lstat(path.join(rootfs, 'data/secret-link'))).ino).toBe(secret.ino);
    // content, and a file replaced by a directory
    expect(await readFile(path.join(rootfs, 'etc/motd'), 'utf8')).toBe('hello from layer 3\n');
    expect(entry(tree, 'flip')).toMatchObject({ type: 'dir', mode: 0o700 });
    expect(await readFile(path.join(rootfs, 'flip/inside'), 'utf8')).toBe('inside\n');
    // nothing but rootfs and config.json in the bundle
    expect((await readdir(bundle)).sort()).toEqual(['config.json', 'rootfs']);
  });

  it('writes an OCI runtime config.json converted from the image config', async () => {
    const bundle = newBundle();
    await client.pullImage(`${registry.host}/fixtures/rich:v1`, bundle);
    const spec = JSON.parse(await readFile(path.join(bundle, 'config.json'), 'utf8'));
    expect(spec.ociVersion).toMatch(/^1\./);
    expect(spec.root).toEqual({ path: 'rootfs', readonly: false });
    expect(spec.process.args).toEqual(['/bin/tool', '--flag']);
    expect(spec.process.env).toEqual(expect.arrayContaining(['PATH=/usr/bin:/bin', 'FOO=bar']));
    expect(spec.process.cwd).toBe('/data');
    // User "app" resolved through the rootfs's own /etc/passwd and /etc/group
    expect(spec.process.user.uid).toBe(1000);
    expect(spec.process.user.gid).toBe(1000);
    expect(spec.process.user.additionalGids).toEqual([2000]);
    expect(spec.annotations['org.example.team']).toBe('guestpull');
    expect(spec.annotations['org.opencontainers.image.author']).toBe('label-wins');
    expect(spec.annotations['org.opencontainers.image.architecture']).toBe(goarch());
    expect(spec.annotations['org.opencontainers.image.os']).toBe('linux');
    expect(spec.annotations['org.opencontainers.image.stopSignal']).toBe('SIGTERM');
  });

  it('pulls a Docker schema2 image, and by digest', async () => {
    const b1 = newBundle();
    const r1 = await client.pullImage(`${registry.host}/fixtures/rich-docker:v1`, b1);
    expect(r1.manifest_digest).toBe(richDockerDigest);
    const b2 = newBundle();
    const r2 = await client.pullImage(`${registry.host}/fixtures/rich@${richDigest}`, b2);
    expect(r2.manifest_digest).toBe(richDigest);
    expect(diffTrees(await snapshotTree(path.join(b1, 'rootfs')), await snapshotTree(path.join(b2, 'rootfs')))).toEqual([]);
  });

  it('chooses the running platform from an index and returns the child manifest digest', async () => {
    const bundle = newBundle();
    const res = await client.pullImage(`${registry.host}/fixtures/multi:v1`, bundle);
    const mine = multi.images.find((i) => i.platform.architecture === goarch())!;
    expect(res.manifest_digest).toBe(mine.manifest.digest);
    expect(res.manifest_digest).not.toBe(multi.index.digest);
    expect(await readFile(path.join(bundle, 'rootfs/platform'), 'utf8')).toBe(`${goarch()}\n`);
  });

  it('gives the same tree as skopeo copy + umoci unpack, for OCI gzip, Docker gzip and OCI plain-tar images', async () => {
    if (!hasSkopeoUmoci()) throw new Error('skopeo and umoci are required: apt-get install skopeo umoci');
    for (const repo of ['fixtures/rich', 'fixtures/rich-docker', 'fixtures/rich-plain']) {
      const bundle = newBundle();
      await client.pullImage(`${registry.host}/${repo}:v1`, bundle);
      const refDir = await mkdtemp(path.join(tmp, 'umoci-'));
      const ref = await referenceUnpack(registry.host, repo, 'v1', refDir);
      const ours = await snapshotTree(path.join(bundle, 'rootfs'));
      const theirs = await snapshotTree(ref.rootfs);
      expect(diffTrees(ours, theirs), `${repo}: guestpull vs umoci`).toEqual([]);
      expect(ours.length).toBeGreaterThan(20);
    }
  });
});

describe('concurrency', () => {
  it('runs pulls of different images at the same time', async () => {
    const [a, b] = [newBundle(), newBundle()];
    const [ra, rb] = await Promise.all([
      client.pullImage(`${registry.host}/fixtures/big-a:v1`, a),
      client.pullImage(`${registry.host}/fixtures/big-b:v1`, b),
    ]);
    expect(ra.manifest_digest).toBe(bigA.manifest.digest);
    expect(rb.manifest_digest).toBe(bigB.manifest.digest);
    // From the daemon's own log: both pulls had resolved their manifest before either finished.
    const events = daemon
      .logs()
      .split('\n')
      .filter((l) => l.startsWith('{'))
      .map((l) => JSON.parse(l) as { msg: string; image?: string; bundle?: string })
      .filter((e) => e.bundle === a || e.bundle === b);
    const firstComplete = events.findIndex((e) => e.msg === 'pull complete');
    const resolved = events.slice(0, firstComplete).filter((e) => e.msg === 'manifest resolved');
    expect(new Set(resolved.map((e) => e.bundle))).toEqual(new Set([a, b]));
  });

  it('two identical calls share one pull and leave one correct bundle', async () => {
    const bundle = newBundle();
    const image = `${registry.host}/fixtures/big-a:v1`;
    const [r1, r2] = await Promise.all([client.pullImage(image, bundle), client.pullImage(image, bundle)]);
    expect(r1.manifest_digest).toBe(bigA.manifest.digest);
    expect(r2.manifest_digest).toBe(bigA.manifest.digest);
    expect((await readdir(bundle)).sort()).toEqual(['config.json', 'rootfs']);
    const again = newBundle();
    await client.pullImage(image, again);
    expect(diffTrees(await snapshotTree(path.join(bundle, 'rootfs')), await snapshotTree(path.join(again, 'rootfs')))).toEqual([]);
  });
});

describe('errors name the image and endpoint, and leave nothing behind', () => {
  it('malformed reference → INVALID_ARGUMENT', async () => {
    const e = await pullError('Not A Valid//Ref', newBundle());
    expect(e.code).toBe(Status.INVALID_ARGUMENT);
    expect(e.details).toContain('Not A Valid//Ref');
  });

  it('unknown repository and unknown tag → NOT_FOUND', async () => {
    const b1 = newBundle();
    const e1 = await pullError(`${registry.host}/fixtures/nope:v1`, b1);
    expect(e1.code).toBe(Status.NOT_FOUND);
    expect(e1.details).toContain('fixtures/nope');
    expect(e1.details).toContain(registry.host);
    await expectBundleClean(b1);
    const e2 = await pullError(`${registry.host}/fixtures/rich:no-such-tag`, newBundle());
    expect(e2.code).toBe(Status.NOT_FOUND);
    expect(e2.details).toContain('no-such-tag');
  });

  it('registry unreachable → UNAVAILABLE naming the endpoint', async () => {
    const e = await pullError(`${deadHost}/app:v1`, newBundle());
    expect(e.code).toBe(Status.UNAVAILABLE);
    expect(e.details).toContain(deadHost);
  });

  it('a plain-HTTP registry not listed as insecure is not used over HTTP', async () => {
    const other = await startRegistry();
    try {
      await pushImage(other.url, 'fixtures/rich', 'v1', rich);
      const bundle = newBundle();
      const e = await pullError(`${other.host}/fixtures/rich:v1`, bundle);
      expect(e.code).toBe(Status.UNAVAILABLE);
      expect(e.details).toContain(`https://${other.host}`);
      expect(e.details).toContain('did not answer with TLS');
      expect(e.details).toContain('insecure = true');
      await expectBundleClean(bundle);
      // the registry saw no HTTP request for the image
      expect(other.logs()).not.toContain('GET /v2/fixtures/rich/manifests');
    } finally {
      await other.stop();
    }
  });

  it('a layer whose bytes differ from its digest → DATA_LOSS and no partial bundle', async () => {
    const img = await buildImage({
      layers: [
        [{ type: 'file', path: 'first', content: 'fine\n' }],
        [{ type: 'file', path: 'second', content: 'x'.repeat(100_000) }],
      ],
      config: { Cmd: ['/first'] },
    });
    await pushImage(registry.url, 'fixtures/corrupt', 'v1', img);
    // Corrupt the second layer in the registry's own storage, keeping its size.
    const hex = img.layers[1]!.digest.slice('sha256:'.length);
    const data = path.join(registry.dir, 'data/docker/registry/v2/blobs/sha256', hex.slice(0, 2), hex, 'data');
    const bytes = await readFile(data);
    bytes[bytes.length >> 1] ^= 0xff;
    await writeFile(data, bytes);

    const bundle = newBundle();
    await mkdir(bundle, { recursive: true });
    const e = await pullError(`${registry.host}/fixtures/corrupt:v1`, bundle);
    expect(e.code).toBe(Status.DATA_LOSS);
    expect(e.details).toContain(img.layers[1]!.digest);
    await expectBundleClean(bundle);
  });

  it('bad bundle paths → INVALID_ARGUMENT; an occupied bundle → ALREADY_EXISTS', async () => {
    const image = `${registry.host}/fixtures/rich:v1`;
    expect((await pullError(image, 'relative/bundle')).code).toBe(Status.INVALID_ARGUMENT);
    expect((await pullError(image, `${tmp}/bundles/../escape`)).code).toBe(Status.INVALID_ARGUMENT);
    const occupied = newBundle();
    await mkdir(occupied, { recursive: true });
    await writeFile(path.join(occupied, 'config.json'), '{"mine":true}');
    const e = await pullError(image, occupied);
    expect(e.code).toBe(Status.ALREADY_EXISTS);
    expect(e.details).toContain('config.json');
    expect(await readFile(path.join(occupied, 'config.json'), 'utf8')).toBe('{"mine":true}');
    expect(await readdir(occupied)).toEqual(['config.json']);
  });
});

describe('guestpull pull (one-shot CLI, same code path)', () => {
  const cli = (...args: string[]) =>
    spawnSync(process.execPath, [path.join(repoRoot, 'dist/cli.js'), ...args], { encoding: 'utf8', timeout: 60_000 });

  it('prints the manifest digest and exits 0', () => {
    const bundle = newBundle();
    const r = cli('pull', `${registry.host}/fixtures/rich:v1`, bundle, '--config', cdhToml, '--work-dir', path.join(tmp, 'work-cli'));
    expect(r.stderr).toBe('');
    expect(r.status).toBe(0);
    expect(r.stdout.trim()).toBe(richDigest);
    expect(existsSync(path.join(bundle, 'rootfs/bin/tool'))).toBe(true);
    expect(existsSync(path.join(bundle, 'config.json'))).toBe(true);
  });

  it('fails with one clear line on stderr and a non-zero exit', () => {
    const r = cli('pull', `${registry.host}/fixtures/nope:v1`, newBundle(), '--config', cdhToml);
    expect(r.status).not.toBe(0);
    expect(r.stdout).toBe('');
    const lines = r.stderr.trim().split('\n');
    expect(lines).toHaveLength(1);
    expect(lines[0]).toMatch(/^guestpull: NOT_FOUND: .*fixtures\/nope/);
  });
});
