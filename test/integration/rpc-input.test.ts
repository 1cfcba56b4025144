/**
 * Issue 8 §5: hostile PullImage input against the built daemon (started with --bundle-root), over
 * a real gRPC connection. Each request gets a precise status and message and writes nothing; the
 * same daemon then still pulls a real image from the real registry. Requests that a typed client
 * cannot express (bytes that are not UTF-8, bytes that are not protobuf) are sent raw through
 * grpc-js with an identity serializer.
 *
 * Invalid UTF-8: protobufjs would decode it with U+FFFD replacement characters; the daemon checks
 * the raw bytes first (src/service/request-bytes.ts) and names the field. A well-formed U+FFFD is
 * just a character, refused by the reference grammar.
 */
import * as grpc from '@grpc/grpc-js';
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, readdir, readFile, realpath, symlink, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SERVICE_NAMES, serviceDefinition } from '../../src/service/protos.js';
import { removeTree } from '../helpers/cleanup.js';
import { startDaemon, type RunningDaemon } from '../helpers/daemon.js';
import { connectClient, type PullClient } from '../helpers/grpc-client.js';
import { buildImage, type EntrySpec } from '../helpers/image-builder.js';
import { pushImage } from '../helpers/push.js';
import { hasRegistryBinary, startRegistry, type RunningRegistry } from '../helpers/registry.js';
import { diffTrees, expectedTreeFromLayers, snapshotTree } from '../helpers/tree.js';

const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const cli = path.join(repoRoot, 'dist', 'cli.js');

let tmp: string;
let root: string;
let registry: RunningRegistry;
let daemon: RunningDaemon;
let client: PullClient;
let raw: grpc.Client;
let cdhToml: string;
let image: string;

const LAYERS: EntrySpec[][] = [
  [
    { type: 'dir', path: 'etc' },
    { type: 'file', path: 'etc/hostname', content: 'rpc-input\n' },
    { type: 'symlink', path: 'etc/alias', target: 'hostname' },
  ],
  [{ type: 'file', path: 'app', content: 'second layer\n', mode: 0o755 }],
];

interface GrpcError {
  code: number;
  details: string;
}

async function pullError(imageUrl: string, bundle: string): Promise<GrpcError> {
  try {
    await client.pullImage(imageUrl, bundle);
  } catch (e) {
    return e as GrpcError;
  }
  throw new Error(`PullImage ${imageUrl} → ${bundle} unexpectedly succeeded`);
}

/** PullImage with the request bytes exactly as given. */
function rawPull(body: Buffer): Promise<GrpcError> {
  const def = serviceDefinition(SERVICE_NAMES.imagePull)['PullImage']!;
  return new Promise((resolve, reject) => {
    raw.makeUnaryRequest(
      def.path,
      (b: Buffer) => b,
      (b: Buffer) => b,
      body,
      new grpc.Metadata(),
      {},
      (err: grpc.ServiceError | null) => (err ? resolve({ code: err.code, details: err.details }) : reject(new Error('raw PullImage unexpectedly succeeded'))),
    );
  });
}

/** A length-delimited protobuf field (lengths < 2^14 here). */
function field(no: number, bytes: Buffer): Buffer {
  const len = bytes.length < 128 ? Buffer.from([bytes.length]) : Buffer.from([(bytes.length & 0x7f) | 0x80, bytes.length >> 7]);
  return Buffer.concat([Buffer.from([(no << 3) | 2]), len, bytes]);
}

async function entries(dir: string): Promise<string[]> {
  return existsSync(dir) ? (await readdir(dir)).sort() : [];
}

beforeAll(async () => {
  if (!hasRegistryBinary()) throw new Error('docker-registry is not installed: apt-get install docker-registry');
  tmp = await realpath(await mkdtemp(path.join(os.tmpdir(), 'guestpull-rpc-input-')));
  root = path.join(tmp, 'kata');
  await mkdir(root);
  registry = await startRegistry();
  await pushImage(registry.url, 'rpc/small', 'v1', await buildImage({ layers: LAYERS, config: { Cmd: ['/app'] } }));
  image = `${registry.host}/rpc/small:v1`;
  cdhToml = path.join(tmp, 'cdh.toml');
  await writeFile(
    cdhToml,
    ['[image]', `work_dir = "${path.join(tmp, 'work')}"`, '[[image.registry_config.registry]]', `location = "${registry.host}"`, 'insecure = true', ''].join('\n'),
  );
  // The root is given through a symlink: the daemon resolves it at start-up.
  await symlink(root, path.join(tmp, 'kata-alias'));
  daemon = await startDaemon({
    repoRoot,
    socket: path.join(tmp, 'cdh.sock'),
    config: cdhToml,
    extraArgs: ['--bundle-root', path.join(tmp, 'kata-alias')],
  });
  client = connectClient(daemon.address);
  raw = new grpc.Client(daemon.address, grpc.credentials.createInsecure());
}, 120_000);

afterAll(async () => {
  client?.close();
  raw?.close();
  await daemon?.stop();
  await registry?.stop();
  if (tmp) await removeTree(tmp);
});

describe('image_url', () => {
  it('empty', async () => {
    const e = await pullError('', path.join(root, 'c-empty'));
    expect(e.code).toBe(grpc.status.INVALID_ARGUMENT);
    expect(e.details).toMatch(/^PullImage: image_url is empty; send image_url and bundle_path as UTF-8 strings of 1 to 4096 bytes$/);
  });

  it('oversized: 5000 bytes, and 4200 bytes in 2100 characters (bytes are counted, not characters)', async () => {
    const e = await pullError(`${registry.host}/${'a'.repeat(5000)}`, path.join(root, 'c-big'));
    expect(e.code).toBe(grpc.status.INVALID_ARGUMENT);
    expect(e.details).toContain(`image_url is ${registry.host.length + 1 + 5000} bytes, longer than the 4096 allowed`);
    const wide = await pullError('é'.repeat(2100), path.join(root, 'c-wide'));
    expect(wide.code).toBe(grpc.status.INVALID_ARGUMENT);
    expect(wide.details).toContain('image_url is 4200 bytes, longer than the 4096 allowed');
  });

  it('a request beyond the 64 KiB message limit is refused by the transport', async () => {
    const e = await pullError('a'.repeat(70_000), path.join(root, 'c-huge'));
    expect(e.code).toBe(grpc.status.RESOURCE_EXHAUSTED);
    expect(e.details).toMatch(/larger than max/i);
  });

  it('not UTF-8 on the wire: named, not decoded into U+FFFD', async () => {
    const body = Buffer.concat([field(1, Buffer.from([0x72, 0x65, 0x67, 0xff, 0x2f, 0x61])), field(2, Buffer.from(path.join(root, 'c-utf8')))]);
    const e = await rawPull(body);
    expect(e.code).toBe(grpc.status.INVALID_ARGUMENT);
    expect(e.details).toMatch(/^PullImage: image_url is not valid UTF-8;/);
    const both = await rawPull(Buffer.concat([field(1, Buffer.from([0xc0, 0xaf])), field(2, Buffer.from([0x2f, 0xfe]))]));
    expect(both.details).toMatch(/^PullImage: image_url and bundle_path are not valid UTF-8;/);
  });

  it('a real U+FFFD character is refused by the reference grammar', async () => {
    const e = await pullError(`${registry.host}/rpc/sm\u{fffd}ll:v1`, path.join(root, 'c-fffd'));
    expect(e.code).toBe(grpc.status.INVALID_ARGUMENT);
    expect(e.details).toMatch(/^invalid image reference .*sm\u{fffd}ll/u);
  });

  it('bytes that are not a protobuf message', async () => {
    const e = await rawPull(Buffer.from([0x0a, 0x7f, 0x61]));
    expect(e.code).toBe(grpc.status.INVALID_ARGUMENT);
    expect(e.details).toMatch(/^PullImage: the request is not a well-formed protobuf message: field 1 claims 127 bytes/);
  });
});

describe('bundle_path', () => {
  it('empty and oversized', async () => {
    const e = await pullError(image, '');
    expect(e.code).toBe(grpc.status.INVALID_ARGUMENT);
    expect(e.details).toContain('bundle_path is empty');
    const big = await pullError(image, `${root}/${'b'.repeat(4100)}`);
    expect(big.code).toBe(grpc.status.INVALID_ARGUMENT);
    expect(big.details).toContain(`bundle_path is ${root.length + 1 + 4100} bytes, longer than the 4096 allowed`);
  });

  it('relative', async () => {
    const e = await pullError(image, 'kata/c1');
    expect(e.code).toBe(grpc.status.INVALID_ARGUMENT);
    expect(e.details).toBe('invalid bundle path "kata/c1": it is not absolute; pass an absolute directory path such as /run/kata-containers/<container-id>');
  });

  it('with a ".." component, even one that would land inside the root', async () => {
    const e = await pullError(image, `${root}/x/../c1`);
    expect(e.code).toBe(grpc.status.INVALID_ARGUMENT);
    expect(e.details).toContain('it contains a ".." component');
    expect(await entries(root)).toEqual([]);
  });

  it('with a NUL byte', async () => {
    const e = await pullError(image, `${root}/c\0x`);
    expect(e.code).toBe(grpc.status.INVALID_ARGUMENT);
    expect(e.details).toContain('it contains a NUL byte');
  });

  it('through a symlinked directory, or itself a symlink: refused, naming the link, nothing written', async () => {
    const real = path.join(root, 'real');
    await mkdir(real);
    await symlink(real, path.join(root, 'via'));
    const e = await pullError(image, path.join(root, 'via', 'c1'));
    expect(e.code).toBe(grpc.status.INVALID_ARGUMENT);
    expect(e.details).toContain(`its component ${path.join(root, 'via')} is a symbolic link`);
    await symlink(real, path.join(root, 'c-link'));
    const self = await pullError(image, path.join(root, 'c-link'));
    expect(self.code).toBe(grpc.status.INVALID_ARGUMENT);
    expect(self.details).toContain('it is a symbolic link');
    expect(await entries(real)).toEqual([]);
  });

  it('outside every --bundle-root: PERMISSION_DENIED naming path, root and flag; nothing created', async () => {
    const outside = path.join(tmp, 'elsewhere', 'c1');
    const e = await pullError(image, outside);
    expect(e.code).toBe(grpc.status.PERMISSION_DENIED);
    expect(e.details).toBe(
      `bundle path "${outside}" is outside the allowed bundle roots (${root}); pass a bundle path below one of them, or start guestpull with --bundle-root for its directory`,
    );
    expect(existsSync(path.join(tmp, 'elsewhere'))).toBe(false);
    // The root itself is not a bundle, and a sibling sharing its prefix is outside.
    expect((await pullError(image, root)).code).toBe(grpc.status.PERMISSION_DENIED);
    expect((await pullError(image, `${root}-evil/c1`)).code).toBe(grpc.status.PERMISSION_DENIED);
  });

  it('a bundle that already holds a rootfs (or config.json): ALREADY_EXISTS, left as it was', async () => {
    const taken = path.join(root, 'taken');
    await mkdir(path.join(taken, 'rootfs'), { recursive: true });
    await writeFile(path.join(taken, 'rootfs', 'mine'), 'keep');
    const e = await pullError(image, taken);
    expect(e.code).toBe(grpc.status.ALREADY_EXISTS);
    expect(e.details).toBe(`bundle ${taken} already holds rootfs; use a fresh bundle path or remove the old bundle`);
    expect(await entries(taken)).toEqual(['rootfs']);
    expect(await readFile(path.join(taken, 'rootfs', 'mine'), 'utf8')).toBe('keep');
    const cfg = path.join(root, 'taken-config');
    await mkdir(cfg);
    await writeFile(path.join(cfg, 'config.json'), '{}');
    const c = await pullError(image, cfg);
    expect(c.code).toBe(grpc.status.ALREADY_EXISTS);
    expect(c.details).toContain('already holds config.json');
  });
});

describe('after all of that', () => {
  it('the daemon still serves a normal pull, through the same connection, with the expected tree', async () => {
    expect(await client.health()).toBe('SERVING');
    const bundle = path.join(root, 'good');
    const res = await client.pullImage(image, bundle);
    expect(res.manifest_digest).toMatch(/^sha256:[0-9a-f]{64}$/);
    const diffs = diffTrees(expectedTreeFromLayers(LAYERS), await snapshotTree(path.join(bundle, 'rootfs')), { ignore: (p) => p === '.' });
    expect(diffs).toEqual([]);
    const spec = JSON.parse(await readFile(path.join(bundle, 'config.json'), 'utf8')) as { process: { args: string[] } };
    expect(spec.process.args).toEqual(['/app']);
    // Every refusal above was logged as such, and the daemon never crashed.
    expect(daemon.child.exitCode).toBeNull();
    expect(daemon.logs()).toMatch(/"status":"PERMISSION_DENIED"/);
  });
});

describe('--bundle-root at start-up and in `guestpull pull`', () => {
  it('a missing root stops serve before it listens, naming it (exit 3, CONFIG)', () => {
    const missing = path.join(tmp, 'no-such-root');
    const sock = path.join(tmp, 'never.sock');
    const r = spawnSync(process.execPath, [cli, 'serve', '--listen', `unix://${sock}`, '--config', cdhToml, '--bundle-root', missing], { encoding: 'utf8', timeout: 20_000 });
    expect(r.status).toBe(3);
    expect(r.stderr).toContain(`guestpull: CONFIG: bundle root ${missing} (--bundle-root) does not exist; create it before starting guestpull or fix the flag`);
    expect(existsSync(sock)).toBe(false);
    const empty = spawnSync(process.execPath, [cli, 'serve', '--listen', `unix://${sock}`, '--bundle-root='], { encoding: 'utf8', timeout: 20_000 });
    expect(empty.status).toBe(2);
    expect(empty.stderr).toContain('--bundle-root must not be empty');
  });

  it('pull refuses a bundle outside the root (exit 7) and pulls one inside', () => {
    const outside = path.join(tmp, 'cli-outside');
    const denied = spawnSync(process.execPath, [cli, 'pull', image, outside, '--config', cdhToml, '--work-dir', path.join(tmp, 'work-cli'), '--bundle-root', root], {
      encoding: 'utf8',
      timeout: 60_000,
    });
    expect(denied.status).toBe(7);
    expect(denied.stderr).toContain('PERMISSION_DENIED');
    expect(existsSync(outside)).toBe(false);
    const inside = path.join(root, 'cli-inside');
    const args = [cli, 'pull', image, inside, '--config', cdhToml, '--work-dir', path.join(tmp, 'work-cli'), '--bundle-root', root];
    const ok = spawnSync(process.execPath, args, { encoding: 'utf8', timeout: 60_000 });
    expect(ok.stderr).toBe('');
    expect(ok.status).toBe(0);
    expect(ok.stdout.trim()).toMatch(/^sha256:[0-9a-f]{64}$/);
  });
});
