/**
 * Mirrors, pull-through caches and remaps against real registries on loopback (issue 4, points 4
 * and 8), each asserting from the servers' own access logs where the traffic went:
 * - Talos: a distribution registry in proxy mode caching an "upstream" registry, configured as a
 *   [[registry.mirror]]; the second pull is served by the cache with the upstream stopped;
 * - a Harbor-style proxy project (`override-path = true`) through a path-rewriting reverse proxy;
 * - a prefix remapped to another location; pull-from-mirror = "digest-only"; skip-fallback;
 *   every candidate failing (each listed with its own error); a blocked prefix.
 * The Puller runs in-process with a Config parsed from cdh.toml text.
 */
import { existsSync } from 'node:fs';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { parseConfig } from '../../src/config/index.js';
import { ErrorCode, GuestpullError } from '../../src/errors.js';
import { silentLogger } from '../../src/log.js';
import { Puller } from '../../src/pull/index.js';
import { accessLog, requestsFor, settledLogs } from '../helpers/access-log.js';
import { buildImage, type BuiltImage } from '../helpers/image-builder.js';
import { startPathProxy } from '../helpers/path-proxy.js';
import { freePort } from '../helpers/ports.js';
import { pushImage } from '../helpers/push.js';
import { hasRegistryBinary, startRegistry, type RunningRegistry } from '../helpers/registry.js';
import { goarch } from './fixtures.js';
import { removeTree } from '../helpers/cleanup.js';

const UA = 'guestpull/mirrors-test';

let tmp: string;
let upstream: RunningRegistry;
let cache: RunningRegistry;
let img: BuiltImage;
let bundleNo = 0;
const pullers: Puller[] = [];

function newBundle(): string {
  return path.join(tmp, 'bundles', `b${++bundleNo}`);
}

function puller(registryToml: string): Puller {
  const toml = `[image]\nwork_dir = "${path.join(tmp, 'work')}"\n# registry-access tests: copy mode, so no layer cache hides per-blob traffic\nsnapshotter = "copy"\n${registryToml}`;
  const p = new Puller({ config: parseConfig(toml, 'mirrors test').config, logger: silentLogger(), version: UA.slice('guestpull/'.length) });
  pullers.push(p);
  return p;
}

async function pullError(p: Puller, image: string): Promise<GuestpullError> {
  const bundle = newBundle();
  try {
    await p.pull(image, bundle);
  } catch (e) {
    expect(e).toBeInstanceOf(GuestpullError);
    expect(existsSync(path.join(bundle, 'rootfs'))).toBe(false);
    return e as GuestpullError;
  }
  throw new Error(`pull of ${image} unexpectedly succeeded`);
}

async function expectPulled(bundle: string): Promise<void> {
  expect(await readFile(path.join(bundle, 'rootfs', 'hello'), 'utf8')).toBe('through a mirror\n');
  expect(await readFile(path.join(bundle, 'rootfs', 'etc', 'second'), 'utf8')).toBe('layer two\n');
}

/** Requests guestpull itself sent (not the cache on our behalf) for a repository. */
async function ours(r: RunningRegistry, repository: string) {
  return requestsFor(await settledLogs(r), repository).filter((e) => e.userAgent === UA);
}

async function deadHost(): Promise<string> {
  return `127.0.0.1:${await freePort()}`;
}

beforeAll(async () => {
  if (!hasRegistryBinary()) throw new Error('docker-registry is not installed: apt-get install docker-registry');
  tmp = await mkdtemp(path.join(os.tmpdir(), 'guestpull-mirrors-'));
  img = await buildImage({
    layers: [[{ type: 'file', path: 'hello', content: 'through a mirror\n' }], [{ type: 'dir', path: 'etc' }, { type: 'file', path: 'etc/second', content: 'layer two\n' }]],
    config: { Cmd: ['/hello'] },
    architecture: goarch(),
  });
  upstream = await startRegistry();
  for (const repo of ['dig/app', 'mirror/team/app', 'team/app', 'skip/app', 'forbidden/app', 'harbor/app']) {
    await pushImage(upstream.url, repo, 'v1', img);
  }
  cache = await startRegistry({ proxyRemoteUrl: upstream.url });
}, 120_000);

afterAll(async () => {
  for (const p of pullers) await p.close();
  await cache?.stop();
  await upstream?.stop();
  if (tmp) await removeTree(tmp);
});

describe('Talos pull-through cache: a proxy-mode registry as a mirror', () => {
  it('the first pull goes through the cache; with the upstream stopped, the next is served from the cache', async () => {
    const up = await startRegistry();
    const pt = await startRegistry({ proxyRemoteUrl: up.url });
    try {
      const digest = await pushImage(up.url, 'library/app', 'v1', img);
      const p = puller(`
[[image.registry_config.registry]]
prefix = "${up.host}"
location = "${up.host}"
insecure = true
[[image.registry_config.registry.mirror]]
location = "${pt.host}"
insecure = true
`);
      const b1 = newBundle();
      expect((await p.pull(`${up.host}/library/app:v1`, b1)).manifestDigest).toBe(digest);
      await expectPulled(b1);
      // guestpull asked the cache; the upstream saw only the cache, never guestpull
      expect((await ours(pt, 'library/app')).map((e) => `${e.method} ${e.path} ${e.status}`)).toContain('GET /v2/library/app/manifests/v1 200');
      expect(requestsFor(await settledLogs(up), 'library/app').filter((e) => e.method === 'GET').length).toBeGreaterThan(0);
      expect(await ours(up, 'library/app')).toEqual([]);

      // distribution stores proxied blobs in the background: wait until all are in the cache's storage
      const blobFile = (d: string) => path.join(pt.dir, 'data/docker/registry/v2/blobs/sha256', d.slice(7, 9), d.slice(7), 'data');
      const wanted = [img.config, ...img.layers].map((b) => blobFile(b.digest));
      for (let i = 0; i < 200 && !wanted.every((f) => existsSync(f)); i++) await sleep(50);
      expect(wanted.filter((f) => !existsSync(f))).toEqual([]);

      await up.stop();
      const before = (await ours(pt, 'library/app')).length;
      const b2 = newBundle();
      expect((await p.pull(`${up.host}/library/app:v1`, b2)).manifestDigest).toBe(digest);
      await expectPulled(b2);
      const second = (await ours(pt, 'library/app')).slice(before);
      expect(second.map((e) => `${e.method} ${e.path} ${e.status}`)).toContain('GET /v2/library/app/manifests/v1 200');
      expect(second.filter((e) => e.path.includes('/blobs/')).every((e) => e.status === 200)).toBe(true);
    } finally {
      await pt.stop();
      await up.stop();
    }
  });

  it('a Harbor proxy project: override-path = true uses the mirror URL as the API base (no /v2 added)', async () => {
    const harbor = await startPathProxy({ target: cache.url, project: 'proxy-project' });
    try {
      const p = puller(`
[[image.registry_config.registry]]
prefix = "registry.example.com"
skip-fallback = true
[[image.registry_config.registry.mirror]]
location = "${harbor.projectUrl}"
insecure = true
override-path = true
`);
      const b = newBundle();
      expect((await p.pull('registry.example.com/harbor/app:v1', b)).manifestDigest).toBe(img.manifest.digest);
      await expectPulled(b);
      const paths = harbor.requests.map((r) => r.path);
      expect(paths).toContain('/v2/proxy-project/harbor/app/manifests/v1');
      for (const blob of [img.config, ...img.layers]) expect(paths).toContain(`/v2/proxy-project/harbor/app/blobs/${blob.digest}`);
      expect(paths.every((x) => x.startsWith('/v2/proxy-project/harbor/app/'))).toBe(true);
      expect(paths.some((x) => x.includes('/v2/proxy-project/v2/') || x.startsWith('/v2/v2/'))).toBe(false);
      // the project path reached the cache rewritten to its own /v2/<repository>
      expect(requestsFor(await settledLogs(cache), 'harbor/app').map((e) => e.path)).toContain('/v2/harbor/app/manifests/v1');
    } finally {
      await harbor.stop();
    }
  });
});

describe('registry rules against the real registry', () => {
  it('a remap: the prefix is replaced by the location', async () => {
    const p = puller(`
[[image.registry_config.registry]]
prefix = "registry.example.com/team"
location = "${upstream.host}/mirror/team"
insecure = true
`);
    const b = newBundle();
    expect((await p.pull('registry.example.com/team/app:v1', b)).manifestDigest).toBe(img.manifest.digest);
    await expectPulled(b);
    expect((await ours(upstream, 'mirror/team/app')).map((e) => `${e.path} ${e.status}`)).toContain('/v2/mirror/team/app/manifests/v1 200');
    expect(await ours(upstream, 'team/app')).toEqual([]);
  });

  it('pull-from-mirror = "digest-only": a tag pull skips the mirror, a digest pull uses it', async () => {
    const p = puller(`
[[image.registry_config.registry]]
prefix = "${upstream.host}/dig"
insecure = true
[[image.registry_config.registry.mirror]]
location = "${cache.host}/dig"
insecure = true
pull-from-mirror = "digest-only"
`);
    await p.pull(`${upstream.host}/dig/app:v1`, newBundle());
    expect(requestsFor(await settledLogs(cache), 'dig/app')).toEqual([]);
    expect((await ours(upstream, 'dig/app')).map((e) => e.path)).toContain('/v2/dig/app/manifests/v1');

    const upBefore = (await ours(upstream, 'dig/app')).length;
    const b = newBundle();
    expect((await p.pull(`${upstream.host}/dig/app@${img.manifest.digest}`, b)).manifestDigest).toBe(img.manifest.digest);
    await expectPulled(b);
    expect((await ours(cache, 'dig/app')).map((e) => `${e.path} ${e.status}`)).toContain(`/v2/dig/app/manifests/${img.manifest.digest} 200`);
    expect((await ours(upstream, 'dig/app')).length).toBe(upBefore);
  });

  it('skip-fallback = true with the mirror down: fails naming the mirror, never asks the original', async () => {
    const dead = await deadHost();
    const p = puller(`
[[image.registry_config.registry]]
prefix = "${upstream.host}/skip"
insecure = true
skip-fallback = true
[[image.registry_config.registry.mirror]]
location = "${dead}"
insecure = true
`);
    const e = await pullError(p, `${upstream.host}/skip/app:v1`);
    expect(e.code).toBe(ErrorCode.UNAVAILABLE);
    expect(e.message).toContain(dead);
    expect(requestsFor(await settledLogs(upstream), 'skip/app').filter((x) => x.method === 'GET')).toEqual([]);
  });

  it('when every candidate fails, the error lists each one with its own error', async () => {
    const [dead1, dead2] = [await deadHost(), await deadHost()];
    const p = puller(`
[[image.registry_config.registry]]
prefix = "${upstream.host}/nothing"
insecure = true
[[image.registry_config.registry.mirror]]
location = "${dead1}"
insecure = true
[[image.registry_config.registry.mirror]]
location = "${dead2}/ns"
insecure = true
`);
    const e = await pullError(p, `${upstream.host}/nothing/here:v1`);
    expect(e.code).toBe(ErrorCode.UNAVAILABLE);
    const lines = e.message.split('\n');
    expect(lines[0]).toContain(`every location for ${upstream.host}/nothing/here:v1 failed`);
    expect(lines[1]).toMatch(new RegExp(`^  1\\. mirror http://${dead1} \\(rule ${upstream.host}/nothing\\): UNAVAILABLE: `));
    expect(lines[2]).toMatch(new RegExp(`^  2\\. mirror http://${dead2}/ns \\(rule ${upstream.host}/nothing\\): UNAVAILABLE: `));
    expect(lines[3]).toMatch(new RegExp(`^  3\\. ${upstream.host} \\(original location, rule ${upstream.host}/nothing\\): NOT_FOUND: `));
    expect(lines[3]).toContain('nothing/here');
    expect(e.context.attempts).toHaveLength(3);
    // the last candidate really was asked, by guestpull
    expect((await ours(upstream, 'nothing/here')).map((x) => `${x.path} ${x.status}`)).toContain('/v2/nothing/here/manifests/v1 404');
  });

  it('blocked = true → PERMISSION_DENIED naming the rule; no request is sent', async () => {
    const p = puller(`
[[image.registry_config.registry]]
prefix = "${upstream.host}/forbidden"
blocked = true
insecure = true
`);
    const before = accessLog(await settledLogs(upstream)).length;
    const e = await pullError(p, `${upstream.host}/forbidden/app:v1`);
    expect(e.code).toBe(ErrorCode.PERMISSION_DENIED);
    expect(e.message).toContain(`rule "${upstream.host}/forbidden" sets blocked = true`);
    expect(accessLog(await settledLogs(upstream)).slice(before).filter((x) => x.path.includes('forbidden'))).toEqual([]);
  });
});
