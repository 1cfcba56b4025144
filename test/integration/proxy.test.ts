/**
 * Registry access through real servers on loopback, asserted from the servers' own logs: Debian
 * squid as the forward proxy (plain, with Basic auth, and as an HTTPS proxy on its `https_port`
 * with its own private CA), the CNCF distribution registry over plain HTTP (`insecure = true`),
 * over HTTPS with a CA made by openssl at test time, and with a self-signed CA:TRUE certificate.
 * Pulls run through the Puller with a Config parsed from cdh.toml text, exactly as the daemon does.
 * A small TCP tap in front of one registry records the raw bytes that come out of the tunnel, to
 * show the registry never receives Proxy-Authorization.
 */
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { pipeline } from 'node:stream/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { parseConfig } from '../../src/config/index.js';
import { ErrorCode, GuestpullError } from '../../src/errors.js';
import { silentLogger } from '../../src/log.js';
import { Puller } from '../../src/pull/index.js';
import { buildImage, type BuiltImage } from '../helpers/image-builder.js';
import { freePort } from '../helpers/ports.js';
import { pushImage } from '../helpers/push.js';
import { hasRegistryBinary, startRegistry, type RunningRegistry } from '../helpers/registry.js';
import { hasSquid, startSquid, type RunningSquid, type SquidLogEntry } from '../helpers/squid.js';
import { createPki, issueServerCert, makeCa, type CertFiles, type Pki } from '../helpers/tls.js';
import { removeTree } from '../helpers/cleanup.js';

const PROXY_USER = { user: 'guest', password: 'pr0xy:p@ss' };
const REPO = 'proxied/app';

let tmp: string;
let pki: Pki;
let proxyCa: CertFiles;
let image: BuiltImage;
let plainReg: RunningRegistry;
let tlsReg: RunningRegistry;
let selfReg: RunningRegistry;
let squid: RunningSquid;
let authSquid: RunningSquid;
let bundleNo = 0;

interface Settings {
  httpsProxy?: string;
  httpProxy?: string;
  noProxy?: string;
  certs?: string[];
  insecure?: string[];
  maxAttempts?: number;
}

function cdhToml(s: Settings): string {
  const lines = ['[image]', `work_dir = ${JSON.stringify(path.join(tmp, 'work'))}`, `max_attempts = ${s.maxAttempts ?? 2}`, 'connect_timeout_secs = 5'];
  if (s.certs) lines.push(`extra_root_certificates = [${s.certs.map((c) => `'''\n${c}'''`).join(', ')}]`);
  if (s.httpsProxy !== undefined || s.httpProxy !== undefined || s.noProxy !== undefined) {
    lines.push('[image.image_pull_proxy]');
    if (s.httpsProxy !== undefined) lines.push(`https_proxy = ${JSON.stringify(s.httpsProxy)}`);
    if (s.httpProxy !== undefined) lines.push(`http_proxy = ${JSON.stringify(s.httpProxy)}`);
    if (s.noProxy !== undefined) lines.push(`no_proxy = ${JSON.stringify(s.noProxy)}`);
  }
  for (const host of s.insecure ?? []) lines.push('[[image.registry_config.registry]]', `location = ${JSON.stringify(host)}`, 'insecure = true');
  return lines.join('\n') + '\n';
}

/** Pull `ref` with a Puller configured from cdh.toml text; the Puller is closed (tunnels end) before returning. */
async function pull(ref: string, s: Settings): Promise<{ digest: string; bundle: string }> {
  const { config } = parseConfig(cdhToml(s), 'proxy.test cdh.toml');
  const puller = new Puller({ config, logger: silentLogger(), version: 'test' });
  const bundle = path.join(tmp, 'bundles', `b${++bundleNo}`);
  try {
    const { manifestDigest } = await puller.pull(ref, bundle);
    return { digest: manifestDigest, bundle };
  } finally {
    await puller.close();
  }
}

async function pullError(ref: string, s: Settings): Promise<GuestpullError> {
  try {
    await pull(ref, s);
  } catch (e) {
    expect(e).toBeInstanceOf(GuestpullError);
    return e as GuestpullError;
  }
  throw new Error(`pull of ${ref} unexpectedly succeeded`);
}

async function expectPulled(r: { digest: string; bundle: string }): Promise<void> {
  expect(r.digest).toBe(image.manifest.digest);
  expect(await readFile(path.join(r.bundle, 'rootfs', 'hello'), 'utf8')).toBe('through the proxy\n');
}

/** Log lines squid wrote while `fn` ran (the client is closed inside `fn`, so tunnels are logged). */
async function logged<T>(proxy: RunningSquid, fn: () => Promise<T>): Promise<{ value: T; lines: SquidLogEntry[] }> {
  await proxy.sync();
  const before = proxy.entries().length;
  const value = await fn();
  await proxy.sync();
  const lines = proxy.entries().slice(before).filter((e) => !e.url.includes('guestpull-sync-'));
  return { value, lines };
}

function portOf(url: string): string {
  return new URL(url).port;
}

beforeAll(async () => {
  if (!hasRegistryBinary()) throw new Error('docker-registry is not installed: apt-get install docker-registry');
  if (!hasSquid()) throw new Error('squid is not installed: apt-get install squid');
  tmp = await mkdtemp(path.join(os.tmpdir(), 'guestpull-proxy-it-'));
  pki = createPki('guestpull-proxy-it-pki-');
  proxyCa = makeCa(pki.dir, 'proxy-ca', 'guestpull test proxy CA');
  const squidCert = issueServerCert(proxyCa, pki.dir, 'squid');
  image = await buildImage({
    layers: [[{ type: 'file', path: 'hello', content: 'through the proxy\n' }], [{ type: 'file', path: 'second', content: 'x'.repeat(300_000) }]],
    config: { Cmd: ['/hello'] },
  });
  [plainReg, tlsReg, selfReg, squid, authSquid] = await Promise.all([
    startRegistry(),
    startRegistry({ tls: { certFile: pki.server.certFile, keyFile: pki.server.keyFile } }),
    startRegistry({ tls: { certFile: pki.selfSignedCaLeaf.certFile, keyFile: pki.selfSignedCaLeaf.keyFile } }),
    startSquid({ tls: { certFile: squidCert.certFile, keyFile: squidCert.keyFile } }),
    startSquid({ auth: PROXY_USER }),
  ]);
  await pushImage(plainReg.url, REPO, 'v1', image);
  await pushImage(tlsReg.url, REPO, 'v1', image, { ca: pki.ca.cert });
  await pushImage(selfReg.url, REPO, 'v1', image, { ca: pki.selfSignedCaLeaf.cert });
}, 120_000);

afterAll(async () => {
  await Promise.all([plainReg?.stop(), tlsReg?.stop(), selfReg?.stop(), squid?.stop(), authSquid?.stop()]);
  pki?.cleanup();
  if (tmp) await removeTree(tmp);
});

describe('squid as the forward proxy', () => {
  it('pulls from an HTTPS registry through squid with CONNECT', async () => {
    const { value, lines } = await logged(squid, () => pull(`${tlsReg.host}/${REPO}:v1`, { httpsProxy: squid.url, certs: [pki.ca.cert] }));
    await expectPulled(value);
    expect(lines.length).toBeGreaterThan(0);
    for (const l of lines) {
      expect(l.method).toBe('CONNECT');
      expect(l.url).toBe(tlsReg.host);
      expect(l.result).toBe('TCP_TUNNEL/200');
    }
  });

  it('bypasses squid for a registry matched by no_proxy (host:port entry)', async () => {
    const { value, lines } = await logged(squid, () =>
      pull(`${tlsReg.host}/${REPO}:v1`, { httpsProxy: squid.url, noProxy: `example.com, 127.0.0.1:${portOf(tlsReg.url)}`, certs: [pki.ca.cert] }),
    );
    await expectPulled(value);
    expect(lines).toEqual([]);
  });

  it('tunnels a plain-HTTP (insecure) registry through squid with CONNECT: no request crosses it in clear', async () => {
    const { value, lines } = await logged(squid, () => pull(`${plainReg.host}/${REPO}:v1`, { httpProxy: squid.url, insecure: [plainReg.host] }));
    await expectPulled(value);
    expect(lines.length).toBeGreaterThan(0);
    expect(lines.every((l) => l.method === 'CONNECT' && l.url === plainReg.host)).toBe(true);
    expect(lines.some((l) => l.url.startsWith('http://'))).toBe(false);
  });

  it('an unreachable proxy gives UNAVAILABLE naming the proxy', async () => {
    const port = await freePort();
    const err = await pullError(`${tlsReg.host}/${REPO}:v1`, { httpsProxy: `http://someone:secret@127.0.0.1:${port}`, certs: [pki.ca.cert], maxAttempts: 1 });
    expect(err.code).toBe(ErrorCode.UNAVAILABLE);
    expect(err.message).toContain(`cannot connect to proxy http://127.0.0.1:${port} (for ${tlsReg.url})`);
    expect(err.message).toContain('connection refused');
    expect(err.message).not.toContain('secret');
  });
});

/** A TCP relay in front of `target` that keeps every byte it forwards towards it. */
async function tap(target: RunningRegistry): Promise<{ host: string; bytes: () => string; close: () => Promise<void> }> {
  const seen: Buffer[] = [];
  const sockets = new Set<net.Socket>();
  const [host, port] = target.host.split(':');
  const server = net.createServer((client) => {
    const upstream = net.connect(Number(port), host);
    sockets.add(client).add(upstream);
    client.on('data', (b: Buffer) => seen.push(b));
    pipeline(client, upstream).catch(() => undefined);
    pipeline(upstream, client).catch(() => undefined);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const addr = server.address() as net.AddressInfo;
  return {
    host: `127.0.0.1:${addr.port}`,
    bytes: () => Buffer.concat(seen).toString('latin1'),
    close: async () => {
      for (const s of sockets) s.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}

describe('squid with Basic proxy authentication', () => {
  const withCreds = (): string => {
    const u = new URL(authSquid.url);
    u.username = encodeURIComponent(PROXY_USER.user);
    u.password = encodeURIComponent(PROXY_USER.password);
    return u.href;
  };

  it('works with the credentials in the proxy URL; the registry never sees Proxy-Authorization', async () => {
    const t = await tap(plainReg);
    try {
      const { value, lines } = await logged(authSquid, () => pull(`${t.host}/${REPO}:v1`, { httpProxy: withCreds(), insecure: [t.host] }));
      await expectPulled(value);
      expect(lines.length).toBeGreaterThan(0);
      for (const l of lines) expect([l.method, l.url, l.user, l.status]).toEqual(['CONNECT', t.host, PROXY_USER.user, 200]);
      const raw = t.bytes();
      expect(raw).toMatch(new RegExp(`^GET /v2/${REPO}/manifests/v1 HTTP/1.1\\r\\n`, 'm'));
      expect(raw.toLowerCase()).not.toContain('proxy-authorization');
      expect(raw).not.toContain(Buffer.from(`${PROXY_USER.user}:${PROXY_USER.password}`).toString('base64'));
    } finally {
      await t.close();
    }
  });

  it('HTTPS registry through the authenticating proxy', async () => {
    const { value, lines } = await logged(authSquid, () => pull(`${tlsReg.host}/${REPO}:v1`, { httpsProxy: withCreds(), certs: [pki.ca.cert] }));
    await expectPulled(value);
    expect(lines.every((l) => l.method === 'CONNECT' && l.url === tlsReg.host && l.user === PROXY_USER.user)).toBe(true);
  });

  it('without credentials: UNAUTHENTICATED naming the proxy, and squid logged the 407', async () => {
    const { value: err, lines } = await logged(authSquid, () => pullError(`${tlsReg.host}/${REPO}:v1`, { httpsProxy: authSquid.url, certs: [pki.ca.cert] }));
    expect(err.code).toBe(ErrorCode.UNAUTHENTICATED);
    expect(err.message).toContain(`proxy ${authSquid.url} requires authentication (HTTP 407 to CONNECT ${tlsReg.host}`);
    expect(lines.map((l) => [l.method, l.result])).toEqual([['CONNECT', 'TCP_DENIED/407']]);
  });

  it('with a wrong password: UNAUTHENTICATED saying the credentials were refused', async () => {
    const u = new URL(authSquid.url);
    u.username = PROXY_USER.user;
    u.password = 'wrong';
    const err = await pullError(`${tlsReg.host}/${REPO}:v1`, { httpsProxy: u.href, certs: [pki.ca.cert] });
    expect(err.code).toBe(ErrorCode.UNAUTHENTICATED);
    expect(err.message).toContain('the user:password in [image] image_pull_proxy.https_proxy was refused');
  });
});

describe('HTTPS registries with a private CA (openssl at test time)', () => {
  it('direct: fails without extra_root_certificates, naming the option; works with it', async () => {
    const err = await pullError(`${tlsReg.host}/${REPO}:v1`, { maxAttempts: 1 });
    expect(err.code).toBe(ErrorCode.UNAVAILABLE);
    expect(err.message).toMatch(new RegExp(`the certificate of ${tlsReg.host.replace(/\./g, '\\.')} is not trusted`));
    expect(err.message).toContain('[image] extra_root_certificates');
    await expectPulled(await pull(`${tlsReg.host}/${REPO}:v1`, { certs: [pki.ca.cert] }));
  });

  it('through squid: fails without the CA naming registry and proxy; works with it (see the CONNECT test above)', async () => {
    const { value: err, lines } = await logged(squid, () => pullError(`${tlsReg.host}/${REPO}:v1`, { httpsProxy: squid.url, maxAttempts: 1 }));
    expect(err.code).toBe(ErrorCode.UNAVAILABLE);
    expect(err.message).toContain(`cannot reach ${tlsReg.url} through proxy ${squid.url}: the certificate of ${tlsReg.host} is not trusted`);
    expect(err.message).toContain('[image] extra_root_certificates');
    expect(lines.map((l) => [l.method, l.url])).toEqual([['CONNECT', tlsReg.host]]);
  });

  it('a self-signed CA:TRUE leaf as the registry certificate works, directly and through squid', async () => {
    const certs = [pki.selfSignedCaLeaf.cert];
    const bad = await pullError(`${selfReg.host}/${REPO}:v1`, { maxAttempts: 1 });
    expect(bad.message).toContain('not trusted');
    await expectPulled(await pull(`${selfReg.host}/${REPO}:v1`, { certs }));
    const { value, lines } = await logged(squid, () => pull(`${selfReg.host}/${REPO}:v1`, { httpsProxy: squid.url, certs }));
    await expectPulled(value);
    expect(lines.length).toBeGreaterThan(0);
    expect(lines.every((l) => l.method === 'CONNECT' && l.url === selfReg.host)).toBe(true);
  });
});

describe('squid as an HTTPS proxy (https_port, its own private CA)', () => {
  it('works when the proxy CA is in extra_root_certificates, tunnelling TLS inside TLS', async () => {
    const httpsProxy = squid.httpsUrl!;
    const { value, lines } = await logged(squid, () => pull(`${tlsReg.host}/${REPO}:v1`, { httpsProxy, certs: [pki.ca.cert, proxyCa.cert] }));
    await expectPulled(value);
    expect(lines.length).toBeGreaterThan(0);
    expect(lines.every((l) => l.method === 'CONNECT' && l.url === tlsReg.host && l.result === 'TCP_TUNNEL/200')).toBe(true);
  });

  it("fails without the proxy's CA, naming the proxy and the option; nothing reaches squid's access log", async () => {
    const httpsProxy = squid.httpsUrl!;
    const { value: err, lines } = await logged(squid, () => pullError(`${tlsReg.host}/${REPO}:v1`, { httpsProxy, certs: [pki.ca.cert], maxAttempts: 1 }));
    expect(err.code).toBe(ErrorCode.UNAVAILABLE);
    expect(err.message).toContain(`cannot connect to proxy ${httpsProxy} (for ${tlsReg.url}): the certificate of proxy ${new URL(httpsProxy).host} is not trusted`);
    expect(err.message).toContain("add the proxy's CA (PEM) to [image] extra_root_certificates");
    expect(lines.filter((l) => l.method === 'CONNECT')).toEqual([]);
  });
});
