/**
 * Issue 4 §9: every init-data example in `initdata-examples/` that names a proxy, CA, mirror or
 * credential, run with the SAME settings against real servers on 127.0.0.1. Each example is loaded
 * with the real init-data and cdh.toml parsers; only its addresses are rewritten (an exact-string
 * map per example, checked by test/helpers/initdata-example.ts to change nothing else), and
 * images are pulled with the real Puller. Where the traffic went is read from the servers' own
 * logs: squid's access.log, the registries' access logs, the Harbor-like path proxy's records.
 *
 * What the examples cannot do as written on loopback, and what the tests add instead (nothing
 * else is added or changed):
 * - image-pull-proxy.toml is for public registries, whose certificates chain to the system roots.
 *   A loopback HTTPS registry has a private CA, so its CA is appended to extra_root_certificates.
 *   Its http_proxy applies only to registries marked insecure, and the example marks none: the
 *   http_proxy test appends one insecure rule for the plain test registry. Its no_proxy entry
 *   192.168.0.1 cannot be served on loopback: the route chosen for it is checked instead.
 * - proxy-service-credentials.toml remaps to an https location with a public certificate: the test
 *   registry's CA is appended to extra_root_certificates; the placeholder licence ID is replaced
 *   by the test registry's (as written it is refused, which is tested too).
 * - pull-through-cache.toml keeps docker.io, registry.k8s.io, gcr.io and ghcr.io as the upstream
 *   names: each cache is a real proxy-mode distribution registry of ONE local upstream standing
 *   in for all four. The original locations (the internet) come last and are never reached by a
 *   passing test.
 * - local-http-registry.toml and local-https-registry.toml run as written, addresses aside.
 * Every example leaves work_dir at the guest default; the tests put it in a temp dir.
 */
import { existsSync } from 'node:fs';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { Writable } from 'node:stream';
import { setTimeout as sleep } from 'node:timers/promises';
import { Agent, request } from 'undici';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Config } from '../../src/config/index.js';
import { ErrorCode, GuestpullError } from '../../src/errors.js';
import { createLogger, silentLogger } from '../../src/log.js';
import { Puller } from '../../src/pull/index.js';
import { Transport } from '../../src/pull/distribution/transport/index.js';
import { accessLog, requestsFor, settledLogs, type AccessLogEntry } from '../helpers/access-log.js';
import { buildImage, type BuiltImage } from '../helpers/image-builder.js';
import { loadExample, pemBlock, rewriteExample, withWorkDir, type LoadedExample, type Rewrite } from '../helpers/initdata-example.js';
import { startPathProxy, type RunningPathProxy } from '../helpers/path-proxy.js';
import { pushImage } from '../helpers/push.js';
import { hasRegistryBinary, startRegistry, type RunningRegistry } from '../helpers/registry.js';
import { hasSquid, startSquid, type RunningSquid, type SquidLogEntry } from '../helpers/squid.js';
import { createPki, type Pki } from '../helpers/tls.js';
import { goarch } from './fixtures.js';
import { removeTree } from '../helpers/cleanup.js';

const VERSION = 'examples-test';
const UA = `guestpull/${VERSION}`;
const b64 = (s: string): string => Buffer.from(s, 'utf8').toString('base64');

let tmp: string;
let pki: Pki;
let img: BuiltImage;
let bundleNo = 0;

function newBundle(): string {
  return path.join(tmp, 'bundles', `b${++bundleNo}`);
}

interface Run {
  puller: Puller;
  logs: () => string;
}

/** A Puller on `config` (work_dir moved to the temp dir), logging at debug into a string. */
function pullerFor(config: Config): Run {
  let out = '';
  const destination = new Writable({
    write(chunk: Buffer, _enc, cb) {
      out += chunk.toString('utf8');
      cb();
    },
  });
  const puller = new Puller({ config: withWorkDir(config, path.join(tmp, 'work')), logger: createLogger({ level: 'debug', destination }), version: VERSION });
  return { puller, logs: () => out };
}

/** Pull `image` with `config`; the Puller is closed (tunnels end, squid logs them) before returning. */
async function pull(config: Config, image: string): Promise<{ digest: string; bundle: string; logs: string }> {
  const run = pullerFor(config);
  const bundle = newBundle();
  try {
    const { manifestDigest } = await run.puller.pull(image, bundle);
    return { digest: manifestDigest, bundle, logs: run.logs() };
  } finally {
    await run.puller.close();
  }
}

async function pullError(config: Config, image: string): Promise<{ error: GuestpullError; logs: string }> {
  const run = pullerFor(config);
  const bundle = newBundle();
  try {
    await run.puller.pull(image, bundle);
  } catch (e) {
    expect(e).toBeInstanceOf(GuestpullError);
    expect(existsSync(path.join(bundle, 'rootfs'))).toBe(false);
    return { error: e as GuestpullError, logs: run.logs() };
  } finally {
    await run.puller.close();
  }
  throw new Error(`pull of ${image} unexpectedly succeeded`);
}

async function expectPulled(r: { digest: string; bundle: string }): Promise<void> {
  expect(r.digest).toBe(img.manifest.digest);
  expect(await readFile(path.join(r.bundle, 'rootfs', 'hello'), 'utf8')).toBe('from an init-data example\n');
  expect(await readFile(path.join(r.bundle, 'rootfs', 'etc', 'two'), 'utf8')).toBe('layer two\n');
}

/** The manifest and every blob of `img`, as guestpull asked for them from `repository`. */
function expectServedWhole(entries: AccessLogEntry[], repository: string, reference: string): void {
  const ok = entries.filter((e) => e.userAgent === UA && e.method === 'GET' && e.status === 200).map((e) => e.path);
  expect(ok).toContain(`/v2/${repository}/manifests/${reference}`);
  for (const b of [img.config, ...img.layers]) expect(ok).toContain(`/v2/${repository}/blobs/${b.digest}`);
}

/**
 * A registry's logs once every request answered so far is in them (settledLogs, for an HTTPS
 * registry too): a marker request is sent, trusting `ca`, and the logs are read once it shows up.
 */
async function settled(r: RunningRegistry, ca?: string): Promise<string> {
  if (ca === undefined) return settledLogs(r);
  const marker = `/v2/log-marker-${Date.now().toString(36)}${Math.random().toString(36).slice(2)}/tags/list`;
  const agent = new Agent({ connect: { ca } });
  try {
    const res = await request(`${r.url}${marker}`, { dispatcher: agent });
    await res.body.dump();
  } finally {
    await agent.close();
  }
  for (let i = 0; i < 250 && !r.logs().includes(`"GET ${marker} HTTP/`); i++) await sleep(20);
  expect(r.logs()).toContain(`"GET ${marker} HTTP/`);
  return r.logs();
}

/** Squid log lines written while `fn` ran (the Puller is closed inside `fn`, so its tunnels are logged). */
async function squidLines<T>(squid: RunningSquid, fn: () => Promise<T>): Promise<{ value: T; lines: SquidLogEntry[] }> {
  await squid.sync();
  const before = squid.entries().length;
  const value = await fn();
  await squid.sync();
  return { value, lines: squid.entries().slice(before).filter((e) => !e.url.includes('guestpull-sync-')) };
}

function withExtraCa(config: Config, pem: string): Config {
  return { ...config, image: { ...config.image, extraRootCertificates: [...config.image.extraRootCertificates, pem] } };
}

beforeAll(async () => {
  if (!hasRegistryBinary()) throw new Error('docker-registry is not installed: apt-get install docker-registry');
  if (!hasSquid()) throw new Error('squid is not installed: apt-get install squid');
  tmp = await mkdtemp(path.join(os.tmpdir(), 'guestpull-examples-'));
  pki = createPki('guestpull-examples-pki-');
  img = await buildImage({
    layers: [[{ type: 'file', path: 'hello', content: 'from an init-data example\n' }], [{ type: 'dir', path: 'etc' }, { type: 'file', path: 'etc/two', content: 'layer two\n' }]],
    config: { Cmd: ['/hello'] },
    architecture: goarch(),
  });
}, 60_000);

afterAll(async () => {
  pki?.cleanup();
  if (tmp) await removeTree(tmp);
});

describe('image-pull-proxy.toml: squid at the example proxy address', () => {
  let ex: LoadedExample;
  let squid: RunningSquid;
  let tlsReg: RunningRegistry;
  let plainReg: RunningRegistry;
  let config: Config;
  const REPO = 'examples/proxied';

  beforeAll(async () => {
    ex = await loadExample('image-pull-proxy.toml');
    [squid, tlsReg, plainReg] = await Promise.all([
      startSquid(),
      startRegistry({ tls: { certFile: pki.server.certFile, keyFile: pki.server.keyFile }, logLevel: 'info' }),
      startRegistry({ logLevel: 'info' }),
    ]);
    await pushImage(tlsReg.url, REPO, 'v1', img, { ca: pki.ca.cert });
    await pushImage(plainReg.url, REPO, 'v1', img);
    // The same proxy for https and http, as in the example.
    const rewrites: Rewrite[] = [{ from: 'http://127.0.0.1:5432', to: squid.url, what: 'the proxy URL (https_proxy and http_proxy)' }];
    // Addition: the loopback registry's private CA (the example's registries have public certificates).
    config = withExtraCa(rewriteExample(ex, rewrites).config, pki.ca.cert);
  }, 120_000);

  afterAll(async () => {
    await Promise.all([squid?.stop(), tlsReg?.stop(), plainReg?.stop()]);
  });

  it('the example sets what this test relies on', () => {
    expect(ex.loaded.config.image.imagePullProxy).toEqual({ httpsProxy: 'http://127.0.0.1:5432', httpProxy: 'http://127.0.0.1:5432', noProxy: '192.168.0.1,localhost' });
    expect(config.image.imagePullProxy).toEqual({ httpsProxy: squid.url, httpProxy: squid.url, noProxy: '192.168.0.1,localhost' });
  });

  it('https_proxy: an HTTPS registry is reached through squid with CONNECT tunnels only', async () => {
    const before = accessLog(await settled(tlsReg, pki.ca.cert)).length;
    const { value, lines } = await squidLines(squid, () => pull(config, `${tlsReg.host}/${REPO}:v1`));
    await expectPulled(value);
    expect(lines.length).toBeGreaterThan(0);
    for (const l of lines) expect([l.method, l.url, l.result]).toEqual(['CONNECT', tlsReg.host, 'TCP_TUNNEL/200']);
    // the registry served guestpull (inside the tunnel: squid saw no request line)
    expectServedWhole(accessLog(await settled(tlsReg, pki.ca.cert)).slice(before), REPO, 'v1');
    expect(value.logs).toContain(`via proxy ${squid.url}`);
  });

  it('no_proxy "localhost": the same registry named localhost:PORT is reached directly; squid sees nothing', async () => {
    const port = new URL(tlsReg.url).port;
    const before = accessLog(await settled(tlsReg, pki.ca.cert)).length;
    const { value, lines } = await squidLines(squid, () => pull(config, `localhost:${port}/${REPO}:v1`));
    await expectPulled(value);
    expect(lines).toEqual([]);
    expectServedWhole(accessLog(await settled(tlsReg, pki.ca.cert)).slice(before), REPO, 'v1');
    expect(value.logs).toContain('route to registry: direct');
  });

  it('no_proxy "192.168.0.1" (not reachable on loopback): the example settings route it directly, other hosts via the proxy', async () => {
    const t = new Transport({ ...(config.image.imagePullProxy ? { proxy: config.image.imagePullProxy } : {}) }, silentLogger());
    try {
      expect(t.routeFor(new URL('https://192.168.0.1/v2/'))).toEqual({ kind: 'direct' });
      expect(t.routeFor(new URL('http://192.168.0.1:5000/v2/'))).toEqual({ kind: 'direct' });
      expect(t.routeFor(new URL('https://LOCALHOST:443/v2/'))).toEqual({ kind: 'direct' });
      const via = t.routeFor(new URL('https://192.168.0.2/v2/'));
      expect(via.kind === 'proxy' ? via.proxy.href : via.kind).toBe(`${squid.url}/`);
    } finally {
      await t.close();
    }
  });

  it('http_proxy: a plain-HTTP registry (insecure rule added by the test) is tunnelled through squid too', async () => {
    // Addition: the example's http_proxy applies only to registries marked insecure; mark the test's.
    const reg = config.image.registryConfig ?? { unqualifiedSearchRegistries: [], registries: [] };
    const withInsecure: Config = {
      ...config,
      image: {
        ...config.image,
        registryConfig: { ...reg, registries: [...reg.registries, { prefix: plainReg.host, location: plainReg.host, insecure: true, blocked: false, mirrors: [], skipFallback: false }] },
      },
    };
    const before = accessLog(await settledLogs(plainReg)).length;
    const { value, lines } = await squidLines(squid, () => pull(withInsecure, `${plainReg.host}/${REPO}:v1`));
    await expectPulled(value);
    expect(lines.length).toBeGreaterThan(0);
    for (const l of lines) expect([l.method, l.url, l.result]).toEqual(['CONNECT', plainReg.host, 'TCP_TUNNEL/200']);
    expectServedWhole(accessLog(await settledLogs(plainReg)).slice(before), REPO, 'v1');
  });
});

describe('local-https-registry.toml: an HTTPS registry with a private CA', () => {
  let ex: LoadedExample;
  let tlsReg: RunningRegistry;
  const REPO = 'examples/https-app';

  beforeAll(async () => {
    ex = await loadExample('local-https-registry.toml');
    tlsReg = await startRegistry({ tls: { certFile: pki.server.certFile, keyFile: pki.server.keyFile }, logLevel: 'info' });
    await pushImage(tlsReg.url, REPO, 'v1', img, { ca: pki.ca.cert });
  }, 60_000);

  afterAll(async () => {
    await tlsReg?.stop();
  });

  it("as written (the example's throwaway CA): refused as untrusted, naming extra_root_certificates; nothing served", async () => {
    expect(ex.loaded.config.image.extraRootCertificates).toHaveLength(1);
    const before = accessLog(await settled(tlsReg, pki.ca.cert)).length;
    const { error } = await pullError(ex.loaded.config, `${tlsReg.host}/${REPO}:v1`);
    expect(error.code).toBe(ErrorCode.UNAVAILABLE);
    expect(error.message).toContain(`the certificate of ${tlsReg.host} is not trusted`);
    expect(error.message).toContain('[image] extra_root_certificates');
    expect(accessLog(await settled(tlsReg, pki.ca.cert)).slice(before).filter((e) => e.userAgent === UA)).toEqual([]);
  });

  it('with its CA replaced by the test CA: the pull works, served by that registry', async () => {
    const original = pemBlock(ex.loaded.config.image.extraRootCertificates[0]!);
    const { config } = rewriteExample(ex, [{ from: original, to: pemBlock(pki.ca.cert), what: 'the CA certificate' }]);
    expect(config.image.extraRootCertificates).toEqual([`${pemBlock(pki.ca.cert)}\n`]);
    const before = accessLog(await settled(tlsReg, pki.ca.cert)).length;
    const r = await pull(config, `${tlsReg.host}/${REPO}:v1`);
    await expectPulled(r);
    expectServedWhole(accessLog(await settled(tlsReg, pki.ca.cert)).slice(before), REPO, 'v1');
    expect(r.logs).toContain('route to registry: direct');
  });
});

describe('local-http-registry.toml: plain HTTP only for the location marked insecure', () => {
  let ex: LoadedExample;
  let httpReg: RunningRegistry;
  let unlisted: RunningRegistry;
  let config: Config;
  const REPO = 'examples/http-app';

  beforeAll(async () => {
    ex = await loadExample('local-http-registry.toml');
    [httpReg, unlisted] = await Promise.all([startRegistry({ logLevel: 'info' }), startRegistry({ logLevel: 'info' })]);
    await pushImage(httpReg.url, REPO, 'v1', img);
    await pushImage(unlisted.url, REPO, 'v1', img);
    config = rewriteExample(ex, [{ from: '192.168.122.1:5000', to: httpReg.host, what: 'the registry location' }]).config;
  }, 60_000);

  afterAll(async () => {
    await Promise.all([httpReg?.stop(), unlisted?.stop()]);
  });

  it('the rule is the example one, at the test registry address', () => {
    expect(config.image.registryConfig?.registries).toEqual([
      { prefix: httpReg.host, location: httpReg.host, insecure: true, blocked: false, mirrors: [], skipFallback: false },
    ]);
  });

  it('pulls by digest (as the example advises) and by tag over plain HTTP', async () => {
    const before = accessLog(await settledLogs(httpReg)).length;
    await expectPulled(await pull(config, `${httpReg.host}/${REPO}@${img.manifest.digest}`));
    expectServedWhole(accessLog(await settledLogs(httpReg)).slice(before), REPO, img.manifest.digest);
    const mid = accessLog(await settledLogs(httpReg)).length;
    await expectPulled(await pull(config, `${httpReg.host}/${REPO}:v1`));
    expectServedWhole(accessLog(await settledLogs(httpReg)).slice(mid), REPO, 'v1');
  });

  it('a plain-HTTP registry NOT listed is tried over HTTPS only and fails: no silent fallback to HTTP', async () => {
    const before = accessLog(await settledLogs(unlisted)).length;
    const { error } = await pullError(config, `${unlisted.host}/${REPO}:v1`);
    expect(error.code).toBe(ErrorCode.UNAVAILABLE);
    expect(error.message).toContain(`https://${unlisted.host}`);
    expect(error.message).not.toContain(`http://${unlisted.host}`);
    // the registry never saw a request line from guestpull (only a TLS handshake it could not read)
    expect(accessLog(await settledLogs(unlisted)).slice(before).filter((e) => e.userAgent === UA)).toEqual([]);
  });
});

describe('pull-through-cache.toml: proxy-mode registries as mirrors, and a Harbor proxy project', () => {
  let ex: LoadedExample;
  let upstream: RunningRegistry;
  let harborBackend: RunningRegistry;
  let harbor: RunningPathProxy;
  let caches: Record<'hub' | 'k8s' | 'gcr' | 'ghcr', RunningRegistry>;
  let config: Config;

  /** guestpull's own requests (not a cache's on its behalf) for `repository`. */
  async function ours(r: RunningRegistry, repository: string): Promise<AccessLogEntry[]> {
    return requestsFor(await settledLogs(r), repository).filter((e) => e.userAgent === UA);
  }

  beforeAll(async () => {
    ex = await loadExample('pull-through-cache.toml');
    [upstream, harborBackend] = await Promise.all([startRegistry({ logLevel: 'info' }), startRegistry({ logLevel: 'info' })]);
    // one local upstream stands in for Docker Hub, registry.k8s.io, gcr.io and ghcr.io
    for (const [repo, tag] of [['library/app', 'v1'], ['pause', '3.9'], ['distroless/static', 'nonroot'], ['org/tool', 'v1']] as const) {
      await pushImage(upstream.url, repo, tag, img);
    }
    // only the Harbor project has this one: the docker.io cache cannot serve it
    await pushImage(harborBackend.url, 'library/harbor-only', 'v1', img);
    const [hub, k8s, gcr, ghcr] = await Promise.all([0, 1, 2, 3].map(() => startRegistry({ proxyRemoteUrl: upstream.url, logLevel: 'info' })));
    caches = { hub: hub!, k8s: k8s!, gcr: gcr!, ghcr: ghcr! };
    harbor = await startPathProxy({ target: harborBackend.url, project: 'proxy-docker.io' });
    config = rewriteExample(ex, [
      { from: '10.5.0.1:5000', to: caches.hub.host, what: 'the docker.io cache' },
      { from: '10.5.0.1:5001', to: caches.k8s.host, what: 'the registry.k8s.io cache' },
      { from: '10.5.0.1:5003', to: caches.gcr.host, what: 'the gcr.io cache' },
      { from: '10.5.0.1:5004', to: caches.ghcr.host, what: 'the ghcr.io cache' },
      { from: 'harbor.local', to: harbor.host, what: 'the Harbor host' },
    ]).config;
  }, 120_000);

  afterAll(async () => {
    await harbor?.stop();
    await Promise.all([...Object.values(caches ?? {}).map((c) => c.stop()), upstream?.stop(), harborBackend?.stop()]);
  });

  it('the rules are the example ones, at the test addresses', () => {
    const rules = config.image.registryConfig?.registries ?? [];
    expect(rules.map((r) => [r.prefix, r.location, r.skipFallback])).toEqual([
      ['docker.io', 'docker.io', false],
      ['registry.k8s.io', 'registry.k8s.io', false],
      ['gcr.io', 'gcr.io', false],
      ['ghcr.io', 'ghcr.io', false],
    ]);
    expect(rules[0]!.mirrors).toEqual([
      { location: caches.hub.host, insecure: true, overridePath: false, pullFromMirror: 'all' },
      { location: `http://${harbor.host}/v2/proxy-docker.io`, insecure: true, overridePath: true, pullFromMirror: 'all' },
    ]);
  });

  it('docker.io (a short name): served by the first mirror, the docker.io cache, which fetched from the upstream', async () => {
    const r = await pull(config, 'app:v1');
    await expectPulled(r);
    expectServedWhole(await ours(caches.hub, 'library/app'), 'library/app', 'v1');
    // the upstream was asked by the cache, never by guestpull; the Harbor project was not needed
    expect(requestsFor(await settledLogs(upstream), 'library/app').filter((e) => e.method === 'GET').length).toBeGreaterThan(0);
    expect(await ours(upstream, 'library/app')).toEqual([]);
    expect(harbor.requests).toEqual([]);
  });

  it.each([
    ['registry.k8s.io/pause:3.9', 'k8s', 'pause', '3.9'],
    ['gcr.io/distroless/static:nonroot', 'gcr', 'distroless/static', 'nonroot'],
    ['ghcr.io/org/tool:v1', 'ghcr', 'org/tool', 'v1'],
  ] as const)('%s: served by its own cache only', async (image, which, repo, tag) => {
    await expectPulled(await pull(config, image));
    expectServedWhole(await ours(caches[which], repo), repo, tag);
    for (const [name, other] of Object.entries(caches)) if (name !== which) expect(await ours(other, repo), name).toEqual([]);
    expect(await ours(upstream, repo)).toEqual([]);
  });

  it('override-path: an image the docker.io cache lacks comes from the Harbor project URL, no /v2 added', async () => {
    const r = await pull(config, 'docker.io/library/harbor-only:v1');
    await expectPulled(r);
    // mirror 1 was asked first and had nothing
    expect((await ours(caches.hub, 'library/harbor-only')).map((e) => `${e.path} ${e.status}`)).toContain('/v2/library/harbor-only/manifests/v1 404');
    const paths = harbor.requests.map((q) => q.path);
    expect(paths).toContain('/v2/proxy-docker.io/library/harbor-only/manifests/v1');
    for (const b of [img.config, ...img.layers]) expect(paths).toContain(`/v2/proxy-docker.io/library/harbor-only/blobs/${b.digest}`);
    expect(paths.every((p) => p.startsWith('/v2/proxy-docker.io/library/harbor-only/'))).toBe(true);
    expect(harbor.requests.filter((q) => q.path.endsWith('/manifests/v1')).map((q) => q.status)).toEqual([200]);
  });

  it('with the upstream stopped, the docker.io cache still serves what it cached', async () => {
    // distribution stores proxied blobs in the background: wait until all are in the cache's storage
    const blobFile = (d: string): string => path.join(caches.hub.dir, 'data/docker/registry/v2/blobs/sha256', d.slice(7, 9), d.slice(7), 'data');
    const wanted = [img.manifest, img.config, ...img.layers].map((b) => blobFile(b.digest));
    for (let i = 0; i < 200 && !wanted.every((f) => existsSync(f)); i++) await sleep(50);
    expect(wanted.filter((f) => !existsSync(f))).toEqual([]);
    await upstream.stop();
    const before = (await ours(caches.hub, 'library/app')).length;
    await expectPulled(await pull(config, 'docker.io/library/app:v1'));
    expectServedWhole((await ours(caches.hub, 'library/app')).slice(before), 'library/app', 'v1');
  });
});

describe('proxy-service-credentials.toml: an htpasswd registry behind the remap, with the example credential layout', () => {
  let ex: LoadedExample;
  let proxySvc: RunningRegistry;
  // The proxy service takes the customer's licence ID as user and password (the example's layout).
  const LICENSE = `lic-${Math.random().toString(36).slice(2, 12)}`;
  const REPO = 'proxy/my-app/quay.io/my-org/api';
  const PLACEHOLDER = 'TElDRU5TRV9JRDpMSUNFTlNFX0lE';

  beforeAll(async () => {
    ex = await loadExample('proxy-service-credentials.toml');
    proxySvc = await startRegistry({ htpasswd: { user: LICENSE, password: LICENSE }, tls: { certFile: pki.server.certFile, keyFile: pki.server.keyFile }, logLevel: 'info' });
    await pushImage(proxySvc.url, REPO, '1.2', img, { auth: { username: LICENSE, password: LICENSE }, ca: pki.ca.cert });
  }, 60_000);

  afterAll(async () => {
    await proxySvc?.stop();
  });

  function configWith(secret: string): Config {
    const rewrites: Rewrite[] = [{ from: 'proxy.replicated.com', to: proxySvc.host, what: 'the proxy service host (auth.json key and remap location)' }];
    if (secret !== PLACEHOLDER) rewrites.push({ from: PLACEHOLDER, to: secret, what: 'the licence ID' });
    // Addition: the test registry's private CA (the location is https, as in the example).
    return withExtraCa(rewriteExample(ex, rewrites).config, pki.ca.cert);
  }

  it('the example keeps the layout this test relies on', () => {
    const auths = (JSON.parse(ex.loaded.config.image.authenticatedRegistryCredentials ?? '{}') as { auths: Record<string, { auth: string }> }).auths;
    expect(Object.keys(auths)).toEqual(['proxy.replicated.com']);
    expect(Buffer.from(auths['proxy.replicated.com']!.auth, 'base64').toString('utf8')).toBe('LICENSE_ID:LICENSE_ID');
    expect(ex.loaded.config.image.registryConfig?.registries).toEqual([
      { prefix: 'quay.io/my-org', location: 'proxy.replicated.com/proxy/my-app/quay.io/my-org', insecure: false, blocked: false, mirrors: [], skipFallback: false },
    ]);
  });

  it('quay.io/my-org/api:1.2 is pulled from the proxy service with the customer credentials', async () => {
    const before = (await settled(proxySvc, pki.ca.cert)).length;
    const r = await pull(configWith(b64(`${LICENSE}:${LICENSE}`)), 'quay.io/my-org/api:1.2');
    await expectPulled(r);
    const served = (await settled(proxySvc, pki.ca.cert)).slice(before);
    expectServedWhole(accessLog(served), REPO, '1.2');
    // htpasswd (one user: the licence ID) accepted guestpull's credentials for the manifest and every blob
    const authorized = served.split('\n').filter((l) => l.includes('msg="authorized request"') && l.includes(`http.request.useragent=${UA}`));
    expect(authorized.length).toBe(2 + img.layers.length);
    expect(r.logs).toContain(`"authKey":"${proxySvc.host}"`);
    expect(r.logs).not.toContain(b64(`${LICENSE}:${LICENSE}`));
    expect(r.logs).not.toContain(`${LICENSE}:${LICENSE}`);
  });

  it('as written (the LICENSE_ID placeholder): UNAUTHENTICATED naming the auth.json key; the registry refused it', async () => {
    const before = (await settled(proxySvc, pki.ca.cert)).length;
    const { error, logs } = await pullError(configWith(PLACEHOLDER), 'quay.io/my-org/api:1.2');
    expect(error.code).toBe(ErrorCode.UNAUTHENTICATED);
    expect(error.message).toContain(`credentials from auth.json key "${proxySvc.host}"`);
    expect(error.message).toContain(`were rejected by ${proxySvc.url}`);
    expect(error.message).not.toContain(PLACEHOLDER);
    expect((await settled(proxySvc, pki.ca.cert)).slice(before)).toContain('msg="error authenticating user \\"LICENSE_ID\\": authentication failure"');
    expect(logs).not.toContain(PLACEHOLDER);
  });
});
