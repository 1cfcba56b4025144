/**
 * Proves the test helpers against real components: the distribution registry (plain and
 * htpasswd), the image builder + pusher (OCI and Docker, image and index), and the skopeo + umoci
 * reference unpack compared with snapshotTree against the tree the layer specs must give.
 */
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { chmodSync, chownSync, existsSync, linkSync, mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { fetch } from 'undici';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Binaries, requireBinary, type BinaryName } from '../helpers/binaries.js';
import { buildImage, buildIndex, buildSyntheticImage, sampleImage, type BuiltImage, type EntrySpec, type ImageFormat } from '../helpers/image-builder.js';
import { pushImage, pushIndex } from '../helpers/push.js';
import { startRegistry, type RunningRegistry } from '../helpers/registry.js';
import { diffTrees, expectedTreeFromLayers, snapshotTree, type TreeEntry } from '../helpers/tree.js';
import { referenceUnpack } from '../helpers/umoci.js';
import { MANIFEST_ACCEPT } from '../../src/oci.js';

const LONG = `deep/${'d'.repeat(60)}/${'n'.repeat(80)}.txt`; // > 100 chars: PAX or ustar prefix

const LAYERS: EntrySpec[][] = [
  [
    { type: 'dir', path: 'etc' },
    { type: 'file', path: 'etc/passwd', content: 'root:x:0:0::/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n' },
    { type: 'file', path: 'etc/group', content: 'root:x:0:\napp:x:1000:\n' },
    { type: 'file', path: 'etc/motd', content: 'replaced by a symlink later\n' },
    { type: 'dir', path: 'bin' },
    { type: 'file', path: 'bin/tool', content: Buffer.from([0x7f, 0x45, 0x4c, 0x46, 1, 2, 3]), mode: 0o755 },
    { type: 'hardlink', path: 'bin/tool-link', target: 'bin/tool' },
    { type: 'file', path: 'bin/suid', content: 'setuid\n', mode: 0o4755 },
    { type: 'symlink', path: 'bin/abs-link', target: '/etc/passwd' },
    { type: 'symlink', path: 'bin/rel-link', target: '../etc/passwd' },
    { type: 'dir', path: 'home' },
    { type: 'dir', path: 'home/app', mode: 0o700, uid: 1000, gid: 1000 },
    { type: 'file', path: 'home/app/secret', content: 'only app\n', mode: 0o640, uid: 1000, gid: 1000 },
    { type: 'dir', path: 'data' },
    { type: 'file', path: 'data/keep', content: 'kept\n' },
    { type: 'file', path: 'data/gone', content: 'whited out\n' },
    { type: 'dir', path: 'data/gonedir' },
    { type: 'file', path: 'data/gonedir/inner', content: 'whited out with its dir\n' },
    { type: 'dir', path: 'opq' },
    { type: 'file', path: 'opq/lower', content: 'hidden by the opaque marker\n' },
    { type: 'dir', path: 'opq/sub' },
    { type: 'file', path: 'opq/sub/lower2', content: 'hidden too\n' },
    { type: 'file', path: LONG, content: 'long name\n' },
  ],
  [
    { type: 'whiteout', path: 'data/gone' },
    { type: 'whiteout', path: 'data/gonedir' },
    { type: 'opaque', path: 'opq' },
    { type: 'file', path: 'opq/upper', content: 'from the upper layer\n', mode: 0o600 },
    { type: 'symlink', path: 'etc/motd', target: 'passwd' },
    { type: 'hardlink', path: 'data/tool-again', target: 'bin/tool' },
    { type: 'dir', path: 'home/app', mode: 0o750, uid: 1000, gid: 1000 },
  ],
];

const CONFIG = { Entrypoint: ['/bin/tool'], Cmd: ['--flag'], Env: ['A=1'], WorkingDir: '/home/app', User: 'app' };

const tmpDirs: string[] = [];
function tmp(prefix: string): string {
  const d = mkdtempSync(path.join(os.tmpdir(), `guestpull-helpers-${prefix}-`));
  tmpDirs.push(d);
  return d;
}

const sha256 = (b: Buffer): string => 'sha256:' + createHash('sha256').update(b).digest('hex');

async function getManifest(reg: RunningRegistry, repo: string, ref: string, auth?: string): Promise<{ bytes: Buffer; type: string | null; digest: string | null }> {
  const res = await fetch(`${reg.url}/v2/${repo}/manifests/${ref}`, { headers: { accept: MANIFEST_ACCEPT, ...(auth ? { authorization: auth } : {}) } });
  const bytes = Buffer.from(await res.arrayBuffer());
  expect(res.status, bytes.toString()).toBe(200);
  return { bytes, type: res.headers.get('content-type'), digest: res.headers.get('docker-content-digest') };
}

async function getBlob(reg: RunningRegistry, repo: string, digest: string): Promise<Buffer> {
  const res = await fetch(`${reg.url}/v2/${repo}/blobs/${digest}`);
  const bytes = Buffer.from(await res.arrayBuffer());
  expect(res.status).toBe(200);
  return bytes;
}

function byPath(tree: TreeEntry[], p: string): TreeEntry | undefined {
  return tree.find((e) => e.path === p);
}

afterAll(() => {
  for (const d of tmpDirs) rmSync(d, { recursive: true, force: true });
});

describe('tree snapshot and diff', () => {
  it('reports mode, owner, content, type, link and presence differences', async () => {
    const root = tmp('tree');
    mkdirSync(path.join(root, 'd'));
    writeFileSync(path.join(root, 'd/a'), 'one');
    linkSync(path.join(root, 'd/a'), path.join(root, 'd/b'));
    writeFileSync(path.join(root, 'c'), 'two');
    symlinkSync('d/a', path.join(root, 'l'));
    const before = await snapshotTree(root);
    expect(before.map((e) => e.path)).toEqual(['.', 'c', 'd', 'd/a', 'd/b', 'l']);
    expect(before.find((e) => e.path === 'd/a')?.linkGroup).toBe(1);
    expect(before.find((e) => e.path === 'd/b')?.linkGroup).toBe(1);
    expect(diffTrees(before, await snapshotTree(root))).toEqual([]);
    chmodSync(path.join(root, 'c'), 0o600);
    chownSync(path.join(root, 'd'), 1000, 1000);
    rmSync(path.join(root, 'd/b'));
    writeFileSync(path.join(root, 'd/b'), 'one');
    rmSync(path.join(root, 'l'));
    writeFileSync(path.join(root, 'l'), 'x');
    writeFileSync(path.join(root, 'new'), '');
    writeFileSync(path.join(root, 'd/a'), 'uno');
    const diffs = diffTrees(before, await snapshotTree(root));
    expect(diffs).toEqual([
      'c: mode 0644 != 0600',
      'd: owner 0:0 != 1000:1000',
      'd/a: content differs; hardlinked with [d/b] != []',
      'd/b: hardlinked with [d/a] != []',
      'l: type symlink != file',
      'new: unexpected file',
    ]);
    expect(diffTrees(before, await snapshotTree(root), { ignore: (p) => p !== 'c' })).toEqual(['c: mode 0644 != 0600']);
  });

  it('expectedTreeFromLayers applies whiteouts to lower layers only', () => {
    const tree = expectedTreeFromLayers([
      [{ type: 'file', path: 'a/x', content: '1' }, { type: 'file', path: 'a/y', content: '2' }],
      [{ type: 'file', path: 'a/new', content: '3' }, { type: 'opaque', path: 'a' }, { type: 'file', path: 'b', content: '4' }, { type: 'whiteout', path: 'b' }],
    ]);
    expect(tree.map((e) => `${e.path}:${e.type}`)).toEqual(['.:dir', 'a:dir', 'a/new:file', 'b:file']);
    expect(() => expectedTreeFromLayers([[{ type: 'hardlink', path: 'h', target: 'missing' }]])).toThrow(/hardlink/);
  });
});

describe('external programs', () => {
  it.each(['registry', 'htpasswd', 'setpriv', 'unshare', 'mount', 'skopeo', 'umoci'] as BinaryName[])('%s is installed', (name) => {
    expect(() => requireBinary(name), `install the Debian package ${Binaries[name].pkg}`).not.toThrow();
  });
});

describe('registry + builder + pusher + reference unpack', () => {
  let reg: RunningRegistry;
  beforeAll(async () => {
    reg = await startRegistry();
  }, 30_000);
  afterAll(async () => {
    await reg?.stop();
  });

  describe.each(['oci', 'docker'] as ImageFormat[])('%s format', (format) => {
    let image: BuiltImage;
    const repo = `helpers/${format}-layers`;

    it('builds deterministically', async () => {
      image = await buildImage({ layers: LAYERS, config: CONFIG, format });
      const again = await buildImage({ layers: LAYERS, config: CONFIG, format });
      expect(again.manifest.digest).toBe(image.manifest.digest);
      expect(again.layers.map((l) => l.digest)).toEqual(image.layers.map((l) => l.digest));
      const other = await buildImage({ layers: LAYERS, config: { ...CONFIG, Env: ['A=2'] }, format });
      expect(other.manifest.digest).not.toBe(image.manifest.digest);
      const manifest = JSON.parse(image.manifest.bytes.toString()) as { mediaType: string; layers: { mediaType: string }[] };
      expect(manifest.mediaType).toBe(format === 'oci' ? 'application/vnd.oci.image.manifest.v1+json' : 'application/vnd.docker.distribution.manifest.v2+json');
      expect(manifest.layers[0]!.mediaType).toBe(format === 'oci' ? 'application/vnd.oci.image.layer.v1.tar+gzip' : 'application/vnd.docker.image.rootfs.diff.tar.gzip');
    });

    it('pushes and reads back the same manifest, config and layers', async () => {
      const digest = await pushImage(reg.url, repo, 'v1', image);
      expect(digest).toBe(image.manifest.digest);
      const got = await getManifest(reg, repo, 'v1');
      expect(sha256(got.bytes)).toBe(image.manifest.digest);
      expect(got.digest).toBe(image.manifest.digest);
      expect(got.type).toBe(image.manifest.mediaType);
      for (const blob of [image.config, ...image.layers]) expect(sha256(await getBlob(reg, repo, blob.digest))).toBe(blob.digest);
      // a second push finds every blob present and changes nothing
      expect(await pushImage(reg.url, repo, 'v1', image)).toBe(digest);
    });

    it('skopeo + umoci unpack it to exactly the expected tree', async () => {
      const { rootfs, configJson } = await referenceUnpack(reg.host, repo, 'v1', tmp(`umoci-${format}`));
      const actual = await snapshotTree(rootfs);
      const expected = expectedTreeFromLayers(LAYERS);
      expect(diffTrees(expected, actual)).toEqual([]);
      // the facts behind that comparison, spelled out
      expect(byPath(actual, 'data/gone')).toBeUndefined();
      expect(byPath(actual, 'data/gonedir')).toBeUndefined();
      expect(byPath(actual, 'data/keep')?.type).toBe('file');
      expect(byPath(actual, 'opq/lower')).toBeUndefined();
      expect(byPath(actual, 'opq/sub')).toBeUndefined();
      expect(byPath(actual, 'opq/upper')?.mode).toBe(0o600);
      expect(byPath(actual, 'bin/suid')?.mode).toBe(0o4755);
      expect(byPath(actual, 'home/app/secret')).toMatchObject({ uid: 1000, gid: 1000, mode: 0o640 });
      expect(byPath(actual, 'home/app')).toMatchObject({ uid: 1000, mode: 0o750 });
      expect(byPath(actual, 'bin/abs-link')?.target).toBe('/etc/passwd');
      expect(byPath(actual, 'bin/rel-link')?.target).toBe('../etc/passwd');
      expect(byPath(actual, 'etc/motd')).toMatchObject({ type: 'symlink', target: 'passwd' });
      expect(byPath(actual, LONG)?.type).toBe('file');
      const group = byPath(actual, 'bin/tool')?.linkGroup;
      expect(group).toBeDefined();
      expect(byPath(actual, 'bin/tool-link')?.linkGroup).toBe(group);
      expect(byPath(actual, 'data/tool-again')?.linkGroup).toBe(group);
      expect(JSON.stringify(configJson)).toContain('/bin/tool');
    }, 60_000);
  });

  it('pushes a two-platform index and the reference picks each platform', async () => {
    for (const format of ['oci', 'docker'] as ImageFormat[]) {
      const repo = `helpers/${format}-index`;
      const amd = await buildImage({ layers: [[{ type: 'file', path: 'platform', content: 'amd64\n' }]], format });
      const arm = await buildImage({ layers: [[{ type: 'file', path: 'platform', content: 'arm64\n' }]], format, architecture: 'arm64', variant: 'v8' });
      const index = buildIndex([amd, arm]);
      expect(index.index.mediaType).toBe(format === 'oci' ? 'application/vnd.oci.image.index.v1+json' : 'application/vnd.docker.distribution.manifest.list.v2+json');
      const digest = await pushIndex(reg.url, repo, 'multi', index);
      expect(digest).toBe(index.index.digest);
      const got = await getManifest(reg, repo, 'multi');
      expect(sha256(got.bytes)).toBe(index.index.digest);
      expect(got.type).toBe(index.index.mediaType);
      const children = (JSON.parse(got.bytes.toString()) as { manifests: { digest: string; platform: { architecture: string } }[] }).manifests;
      expect(children.map((c) => [c.digest, c.platform.architecture])).toEqual([[amd.manifest.digest, 'amd64'], [arm.manifest.digest, 'arm64']]);
      for (const child of [amd, arm]) expect(sha256((await getManifest(reg, repo, child.manifest.digest)).bytes)).toBe(child.manifest.digest);
      for (const [arch, variant] of [['amd64', undefined], ['arm64', 'v8']] as const) {
        const { rootfs } = await referenceUnpack(reg.host, repo, 'multi', tmp(`idx-${format}-${arch}`), { os: 'linux', architecture: arch, ...(variant ? { variant } : {}) });
        expect(readFileSync(path.join(rootfs, 'platform'), 'utf8')).toBe(`${arch}\n`);
      }
    }
  }, 90_000);

  it('the sample image resolves User app through its /etc/passwd', async () => {
    const img = await sampleImage();
    expect((await sampleImage()).manifest.digest).toBe(img.manifest.digest);
    await pushImage(reg.url, 'helpers/sample', 'latest', img);
    const { rootfs, configJson } = await referenceUnpack(reg.host, 'helpers/sample', 'latest', tmp('sample'));
    const cfg = configJson as { process: { user: { uid: number; gid: number }; args: string[]; cwd: string } };
    expect(cfg.process.user).toMatchObject({ uid: 1000, gid: 1000 });
    expect(cfg.process.args).toEqual(['/bin/sh', '/usr/bin/hello']);
    expect(cfg.process.cwd).toBe('/home/app');
    const tree = await snapshotTree(rootfs);
    expect(byPath(tree, 'bin/sh')).toMatchObject({ type: 'symlink', target: 'busybox' });
    expect(byPath(tree, 'tmp')?.mode).toBe(0o1777);
  }, 60_000);

  it('the synthetic image has the requested file count and byte total, deterministically', async () => {
    const opts = { seed: 7, layers: 3, totalBytes: 3_000_000, files: 60 };
    const img = await buildSyntheticImage(opts);
    expect((await buildSyntheticImage(opts)).manifest.digest).toBe(img.manifest.digest);
    expect((await buildSyntheticImage({ ...opts, seed: 8 })).manifest.digest).not.toBe(img.manifest.digest);
    expect(img.layers).toHaveLength(3);
    const compressed = img.layers.reduce((a, l) => a + l.size, 0);
    expect(compressed).toBeGreaterThan(opts.totalBytes * 0.2); // neither trivially compressible ...
    expect(compressed).toBeLessThan(opts.totalBytes * 0.8); // ... nor incompressible
    await pushImage(reg.url, 'helpers/synthetic', 'v1', img);
    const { rootfs } = await referenceUnpack(reg.host, 'helpers/synthetic', 'v1', tmp('synthetic'));
    const files = (await snapshotTree(rootfs)).filter((e) => e.type === 'file');
    expect(files).toHaveLength(opts.files);
    expect(files.reduce((a, e) => a + e.size, 0)).toBe(opts.totalBytes);
  }, 60_000);

  it('a proxy-mode registry serves an upstream image as a pull-through cache', async () => {
    const img = await buildImage({ layers: [[{ type: 'file', path: 'cached', content: 'through the cache\n' }]] });
    await pushImage(reg.url, 'helpers/upstream', 'v1', img);
    const cache = await startRegistry({ proxyRemoteUrl: reg.url, logLevel: 'info' });
    try {
      expect(sha256((await getManifest(cache, 'helpers/upstream', 'v1')).bytes)).toBe(img.manifest.digest);
      const { rootfs } = await referenceUnpack(cache.host, 'helpers/upstream', 'v1', tmp('cache'));
      expect(readFileSync(path.join(rootfs, 'cached'), 'utf8')).toBe('through the cache\n');
      expect(cache.logs()).toContain('proxy cache');
      await expect(pushImage(cache.url, 'helpers/other', 'v1', img)).rejects.toThrow(/HTTP/); // read-only
    } finally {
      await cache.stop();
    }
  }, 60_000);

  it('logs requests and stops cleanly', async () => {
    const r = await startRegistry();
    const res = await fetch(`${r.url}/v2/`);
    expect(res.status).toBe(200);
    await res.arrayBuffer();
    expect(r.logs()).toContain('GET /v2/');
    await r.stop();
    expect(existsSync(r.dir)).toBe(false);
    await expect(fetch(`${r.url}/v2/`)).rejects.toThrow();
  }, 30_000);
});

describe('htpasswd registry', () => {
  let reg: RunningRegistry;
  const creds = { username: 'alice', password: 's3cret-pw' };
  beforeAll(async () => {
    reg = await startRegistry({ htpasswd: { user: creds.username, password: creds.password } });
  }, 30_000);
  afterAll(async () => {
    await reg?.stop();
  });

  it('refuses anonymous and wrong credentials, accepts the right ones', async () => {
    const anon = await fetch(`${reg.url}/v2/`);
    await anon.arrayBuffer();
    expect(anon.status).toBe(401);
    expect(anon.headers.get('www-authenticate')).toMatch(/^Basic realm="guestpull-test"/);
    const basic = (u: string, p: string): string => 'Basic ' + Buffer.from(`${u}:${p}`).toString('base64');
    const wrong = await fetch(`${reg.url}/v2/`, { headers: { authorization: basic(creds.username, 'nope') } });
    await wrong.arrayBuffer();
    expect(wrong.status).toBe(401);
    const right = await fetch(`${reg.url}/v2/`, { headers: { authorization: basic(creds.username, creds.password) } });
    await right.arrayBuffer();
    expect(right.status).toBe(200);

    const img = await buildImage({ layers: [[{ type: 'file', path: 'hello', content: 'auth\n' }]] });
    await expect(pushImage(reg.url, 'private/img', 'v1', img)).rejects.toThrow(/HTTP 401/);
    expect(await pushImage(reg.url, 'private/img', 'v1', img, { auth: creds })).toBe(img.manifest.digest);
    const got = await getManifest(reg, 'private/img', 'v1', basic(creds.username, creds.password));
    expect(sha256(got.bytes)).toBe(img.manifest.digest);
    await expect(referenceUnpack(reg.host, 'private/img', 'v1', tmp('anon'))).rejects.toThrow(/skopeo/);
    const { rootfs } = await referenceUnpack(reg.host, 'private/img', 'v1', tmp('auth'), { auth: creds });
    expect(readFileSync(path.join(rootfs, 'hello'), 'utf8')).toBe('auth\n');
  }, 60_000);
});

describe('registry lifetime', () => {
  it('dies with its parent process (setpriv --pdeathsig)', async () => {
    const child = spawn(process.execPath, ['--import', 'tsx', path.join(import.meta.dirname, '../helpers/registry-child.ts')], {
      cwd: path.join(import.meta.dirname, '../..'),
      env: { PATH: '/usr/local/bin:/usr/bin:/bin', TSX_DISABLE_CACHE: '1' },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let out = '';
    child.stdout.on('data', (b: Buffer) => (out += b.toString()));
    child.stderr.on('data', (b: Buffer) => (out += b.toString()));
    const deadline = Date.now() + 20_000;
    while (!/READY (\d+) (\S+)\n/.test(out) && Date.now() < deadline && child.exitCode === null) await sleep(50);
    const m = /READY (\d+) (\S+)\n/.exec(out);
    if (m) tmpDirs.push(m[2]!); // its exit hook cannot run after SIGKILL
    const pid = Number(m?.[1]);
    expect(pid, out).toBeGreaterThan(0);
    expect(alive(pid)).toBe(true);
    child.kill('SIGKILL');
    const until = Date.now() + 5_000;
    while (alive(pid) && Date.now() < until) await sleep(50);
    expect(alive(pid)).toBe(false);
  }, 30_000);
});

/** True while the process exists and is not a zombie. */
function alive(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) !== 'Z';
  } catch {
    return false;
  }
}
