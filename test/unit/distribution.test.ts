/**
 * Distribution client: WWW-Authenticate parsing, bearer and Basic flows, token cache, realm
 * policy, registry error mapping, manifest bounds and classification, by-digest verification,
 * verified blob streams, platform choice and index resolution. The registries are tiny node:http
 * servers on 127.0.0.1 written here; the real docker-registry is exercised by integration tests.
 */
import { createHash } from 'node:crypto';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { Writable } from 'node:stream';
import { pino } from 'pino';
import { afterEach, describe, expect, it } from 'vitest';
import { ErrorCode, GuestpullError } from '../../src/errors.js';
import { silentLogger, type Logger } from '../../src/log.js';
import { MediaType, type Descriptor } from '../../src/oci.js';
import { Authenticator } from '../../src/pull/distribution/auth.js';
import {
  choosePlatform,
  currentPlatform,
  parseChallenges,
  RegistryClient,
  resolveImage,
  type Credentials,
} from '../../src/pull/distribution/index.js';
import { Transport } from '../../src/pull/distribution/transport/index.js';

// ---------- helpers: servers, clients, content ----------

type Handler = (req: http.IncomingMessage, res: http.ServerResponse, body: string) => void;
interface TestServer {
  url: string;
  hits: string[];
}

const cleanups: Array<() => Promise<void>> = [];
afterEach(async () => {
  while (cleanups.length) await cleanups.pop()!();
});

async function serve(handler: Handler): Promise<TestServer> {
  const hits: string[] = [];
  const server = http.createServer((req, res) => {
    let body = '';
    req.on('data', (c: Buffer) => (body += c.toString('utf8')));
    req.on('end', () => {
      hits.push(`${req.method} ${req.url}`);
      handler(req, res, body);
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  cleanups.push(async () => {
    server.closeAllConnections();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  });
  return { url: `http://127.0.0.1:${(server.address() as AddressInfo).port}`, hits };
}

function sendJson(res: http.ServerResponse, status: number, value: unknown, headers: http.OutgoingHttpHeaders = {}): void {
  const bytes = Buffer.from(JSON.stringify(value));
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': bytes.length, ...headers }).end(bytes);
}

function sha256(b: Buffer | string): string {
  return `sha256:${createHash('sha256').update(b).digest('hex')}`;
}

interface Content {
  bytes: Buffer;
  desc: Descriptor;
}
function content(mediaType: string, data: Buffer | string, extra: Partial<Descriptor> = {}): Content {
  const bytes = Buffer.isBuffer(data) ? data : Buffer.from(data);
  return { bytes, desc: { mediaType, digest: sha256(bytes), size: bytes.length, ...extra } };
}

function imageManifest(opts: { mediaType?: string | null; configType?: string } = {}): Content {
  const config = content(opts.configType ?? MediaType.OCI_CONFIG, '{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}');
  const layer = content(MediaType.OCI_LAYER_GZIP, 'layer-bytes');
  const doc: Record<string, unknown> = { schemaVersion: 2, config: config.desc, layers: [layer.desc] };
  if (opts.mediaType !== null) doc.mediaType = opts.mediaType ?? MediaType.OCI_MANIFEST;
  return content((doc.mediaType as string | undefined) ?? MediaType.OCI_MANIFEST, JSON.stringify(doc));
}

function index(entries: Descriptor[]): Content {
  return content(MediaType.OCI_INDEX, JSON.stringify({ schemaVersion: 2, mediaType: MediaType.OCI_INDEX, manifests: entries }));
}

function withPlatform(c: Content, platform: Descriptor['platform'], annotations?: Record<string, string>): Descriptor {
  return { ...c.desc, platform, ...(annotations ? { annotations } : {}) };
}

/** A registry that serves the given manifests (by tag or digest) and blobs (by digest). */
function registryHandler(manifests: Record<string, Content>, blobs: Content[] = [], repo = 'lib/app'): Handler {
  return (req, res) => {
    const m = new RegExp(`^/v2/${repo}/(manifests|blobs)/(.+)$`).exec(req.url ?? '');
    if (m?.[1] === 'manifests') {
      const c = manifests[m[2]!] ?? Object.values(manifests).find((x) => x.desc.digest === m[2]);
      if (c) {
        res.writeHead(200, { 'content-type': c.desc.mediaType, 'content-length': c.bytes.length }).end(c.bytes);
        return;
      }
      return sendJson(res, 404, { errors: [{ code: 'MANIFEST_UNKNOWN', message: 'manifest unknown', detail: { Tag: m[2] } }] });
    }
    if (m?.[1] === 'blobs') {
      const b = blobs.find((x) => x.desc.digest === m[2]);
      if (b) {
        res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': b.bytes.length }).end(b.bytes);
        return;
      }
      return sendJson(res, 404, { errors: [{ code: 'BLOB_UNKNOWN', message: 'blob unknown to registry' }] });
    }
    sendJson(res, 404, { errors: [{ code: 'NAME_UNKNOWN', message: 'repository name not known to registry' }] });
  };
}

function makeClient(
  base: string,
  opts: { repository?: string; credentials?: Credentials; logger?: Logger; manifestBytes?: number; baseUrl?: string; maxAttempts?: number } = {},
): RegistryClient {
  const logger = opts.logger ?? silentLogger();
  const transport = new Transport(opts.maxAttempts !== undefined ? { maxAttempts: opts.maxAttempts } : {}, logger);
  cleanups.push(() => transport.close());
  return new RegistryClient({
    baseUrl: opts.baseUrl ?? `${base}/v2/`,
    repository: opts.repository ?? 'lib/app',
    transport,
    logger,
    image: `127.0.0.1/${opts.repository ?? 'lib/app'}:latest`,
    ...(opts.credentials ? { credentials: opts.credentials } : {}),
    ...(opts.manifestBytes ? { limits: { manifestBytes: opts.manifestBytes } } : {}),
  });
}

async function rejection(p: Promise<unknown>): Promise<GuestpullError> {
  try {
    await p;
  } catch (e) {
    expect(e).toBeInstanceOf(GuestpullError);
    return e as GuestpullError;
  }
  throw new Error('expected a rejection');
}

async function collect(s: NodeJS.ReadableStream): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const c of s) chunks.push(c as Buffer);
  return Buffer.concat(chunks);
}

function captureLogger(): { logger: Logger; text: () => string } {
  const lines: string[] = [];
  const sink = new Writable({
    write(chunk: Buffer, _e, cb) {
      lines.push(chunk.toString('utf8'));
      cb();
    },
  });
  return { logger: pino({ level: 'debug' }, sink), text: () => lines.join('') };
}

// ---------- WWW-Authenticate ----------

describe('parseChallenges', () => {
  it('parses a Docker bearer challenge', () => {
    expect(parseChallenges('Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull"')).toEqual([
      {
        scheme: 'bearer',
        params: { realm: 'https://auth.docker.io/token', service: 'registry.docker.io', scope: 'repository:library/busybox:pull' },
      },
    ]);
  });

  it('handles escapes, commas inside quotes, bare tokens, case and whitespace', () => {
    expect(parseChallenges('BASIC  Realm = "a \\"quoted\\", realm" , charset=UTF-8')).toEqual([
      { scheme: 'basic', params: { realm: 'a "quoted", realm', charset: 'UTF-8' } },
    ]);
  });

  it('splits several challenges on one line, with token68 and param-less schemes', () => {
    expect(parseChallenges('Newauth realm="apps", type=1, title="Login to \\"apps\\"", Basic realm="simple", Negotiate abc+/=, Foo')).toEqual([
      { scheme: 'newauth', params: { realm: 'apps', type: '1', title: 'Login to "apps"' } },
      { scheme: 'basic', params: { realm: 'simple' } },
      { scheme: 'negotiate', params: {}, token68: 'abc+/=' },
      { scheme: 'foo', params: {} },
    ]);
  });

  it('keeps the first of a repeated parameter and stops at garbage', () => {
    expect(parseChallenges('Bearer realm="a", realm="b"')).toEqual([{ scheme: 'bearer', params: { realm: 'a' } }]);
    expect(parseChallenges('Bearer realm="unterminated')).toEqual([{ scheme: 'bearer', params: {} }]);
    expect(parseChallenges('')).toEqual([]);
    const proto = parseChallenges('Bearer __proto__="x", realm="r"');
    expect(proto[0]!.params.realm).toBe('r');
    expect(Object.getPrototypeOf(proto[0]!.params)).toBe(Object.prototype);
  });
});

// ---------- auth flows ----------

describe('bearer auth', () => {
  function bearerRegistry(opts: { scope?: boolean; expiresIn?: number; realmHost?: string } = {}) {
    const tokenRequests: Array<{ url: URL; auth: string | undefined; method: string; body: string }> = [];
    const authsSeen: Array<string | undefined> = [];
    const m = imageManifest();
    const blob = content(MediaType.OCI_LAYER_GZIP, 'blob-content');
    const inner = registryHandler({ latest: m }, [blob]);
    let base = '';
    const ready = serve((req, res, body) => {
      if (req.url!.startsWith('/token')) {
        tokenRequests.push({ url: new URL(req.url!, base), auth: req.headers.authorization, method: req.method!, body });
        return sendJson(res, 200, { token: `tok-${tokenRequests.length}`, ...(opts.expiresIn ? { expires_in: opts.expiresIn } : {}) });
      }
      authsSeen.push(req.headers.authorization);
      if (!req.headers.authorization?.startsWith('Bearer tok-')) {
        const realm = `http://${opts.realmHost ?? '127.0.0.1'}:${new URL(base).port}/token`;
        const scope = opts.scope === false ? '' : ',scope="repository:lib/app:pull"';
        return sendJson(res, 401, { errors: [{ code: 'UNAUTHORIZED', message: 'authentication required' }] }, {
          'www-authenticate': `Bearer realm="${realm}",service="test-registry"${scope}`,
        });
      }
      inner(req, res, body);
    }).then((s) => {
      base = s.url;
      return s;
    });
    return { ready, tokenRequests, authsSeen, manifest: m, blob };
  }

  it('answers the challenge, retries with the token, and reuses it from the cache', async () => {
    const reg = bearerRegistry();
    const srv = await reg.ready;
    const cap = captureLogger();
    const client = makeClient(srv.url, { logger: cap.logger });
    const a = await client.getManifest('latest');
    expect(a.digest).toBe(reg.manifest.desc.digest);
    expect(a.mediaType).toBe(MediaType.OCI_MANIFEST);
    await client.getManifest('latest');
    const blob = await collect(await client.getBlob(reg.blob.desc));
    expect(blob.toString()).toBe('blob-content');
    expect(reg.tokenRequests).toHaveLength(1);
    const t = reg.tokenRequests[0]!;
    expect(t.method).toBe('GET');
    expect(t.url.searchParams.get('service')).toBe('test-registry');
    expect(t.url.searchParams.getAll('scope')).toEqual(['repository:lib/app:pull']);
    expect(t.auth).toBeUndefined();
    expect(reg.authsSeen).toEqual([undefined, 'Bearer tok-1', 'Bearer tok-1', 'Bearer tok-1']);
    expect(cap.text()).toContain('manifest fetched');
    expect(cap.text()).toContain('blob fetched');
    expect(cap.text()).not.toContain('tok-1');
  });

  it('uses our own scope when the challenge has none, and Basic credentials on the token request', async () => {
    const reg = bearerRegistry({ scope: false });
    const srv = await reg.ready;
    const client = makeClient(srv.url, { credentials: { username: 'alice', password: 's3cret' } });
    await client.getManifest('latest');
    expect(reg.tokenRequests[0]!.url.searchParams.getAll('scope')).toEqual(['repository:lib/app:pull']);
    expect(reg.tokenRequests[0]!.auth).toBe(`Basic ${Buffer.from('alice:s3cret').toString('base64')}`);
  });

  it('exchanges an identity token with an OAuth2 refresh_token POST', async () => {
    const reg = bearerRegistry();
    const srv = await reg.ready;
    const client = makeClient(srv.url, { credentials: { identityToken: 'refresh-me' } });
    await client.getManifest('latest');
    const t = reg.tokenRequests[0]!;
    expect(t.method).toBe('POST');
    const form = new URLSearchParams(t.body);
    expect(form.get('grant_type')).toBe('refresh_token');
    expect(form.get('refresh_token')).toBe('refresh-me');
    expect(form.get('service')).toBe('test-registry');
    expect(form.get('scope')).toBe('repository:lib/app:pull');
  });

  it('refuses a plain-http token realm on another host', async () => {
    const reg = bearerRegistry({ realmHost: 'localhost' });
    const srv = await reg.ready;
    const err = await rejection(makeClient(srv.url).getManifest('latest'));
    expect(err.code).toBe(ErrorCode.PERMISSION_DENIED);
    expect(err.message).toContain('http://localhost:');
    expect(reg.tokenRequests).toHaveLength(0);
  });

  it('refuses an http realm for an https registry, accepts https', async () => {
    const transport = new Transport({}, silentLogger());
    cleanups.push(() => transport.close());
    const auth = new Authenticator({
      transport,
      logger: silentLogger(),
      registry: new URL('https://registry.example/v2/'),
      repository: 'lib/app',
      image: 'registry.example/lib/app',
      tokenBodyBytes: 1024,
    });
    const err = await rejection(auth.answer('Bearer realm="http://registry.example/token"', undefined));
    expect(err.code).toBe(ErrorCode.PERMISSION_DENIED);
  });

  it('caches tokens until expires_in minus a margin', async () => {
    const tokens: string[] = [];
    const srv = await serve((req, res) => {
      tokens.push(req.url!);
      sendJson(res, 200, { access_token: `t${tokens.length}`, expires_in: 100 });
    });
    const transport = new Transport({}, silentLogger());
    cleanups.push(() => transport.close());
    let now = 1_000_000;
    const auth = new Authenticator({
      transport,
      logger: silentLogger(),
      registry: new URL(`${srv.url}/v2/`),
      repository: 'lib/app',
      image: 'x',
      tokenBodyBytes: 1024,
      now: () => now,
    });
    expect(await auth.answer(`Bearer realm="${srv.url}/token"`, undefined)).toBe('Bearer t1');
    now += 85_000;
    expect(await auth.authorization()).toBe('Bearer t1');
    now += 10_000; // 95 s: inside the 10 s margin
    expect(await auth.authorization()).toBe('Bearer t2');
    // A 401 despite a token we sent forces a fresh one.
    expect(await auth.answer(`Bearer realm="${srv.url}/token"`, 'Bearer t2')).toBe('Bearer t3');
    expect(tokens).toHaveLength(3);
  });

  it('gives UNAUTHENTICATED when the retried request is refused again', async () => {
    const srv = await serve((req, res) => {
      if (req.url!.startsWith('/token')) return sendJson(res, 200, { token: 'weak' });
      sendJson(res, 401, { errors: [{ code: 'UNAUTHORIZED', message: 'insufficient scope' }] }, {
        'www-authenticate': `Bearer realm="http://127.0.0.1:${req.socket.localPort}/token",service="s"`,
      });
    });
    const err = await rejection(makeClient(srv.url).getManifest('latest'));
    expect(err.code).toBe(ErrorCode.UNAUTHENTICATED);
    expect(err.message).toContain('insufficient scope');
    expect(err.message).toContain('authenticated_registry_credentials_uri');
    expect(srv.hits.filter((h) => h.includes('/manifests/'))).toHaveLength(2);
  });
});

describe('basic auth', () => {
  function basicRegistry() {
    const m = imageManifest();
    const inner = registryHandler({ latest: m });
    const seen: Array<string | undefined> = [];
    const ready = serve((req, res, body) => {
      seen.push(req.headers.authorization);
      if (req.headers.authorization !== `Basic ${Buffer.from('bob:pw').toString('base64')}`) {
        res.writeHead(401, { 'www-authenticate': 'Basic realm="Registry Realm"' }).end();
        return;
      }
      inner(req, res, body);
    });
    return { ready, seen, m };
  }

  it('answers a Basic challenge with the username and password', async () => {
    const reg = basicRegistry();
    const srv = await reg.ready;
    const client = makeClient(srv.url, { credentials: { username: 'bob', password: 'pw' } });
    expect((await client.getManifest('latest')).digest).toBe(reg.m.desc.digest);
    await client.getManifest('latest');
    expect(reg.seen).toEqual([undefined, `Basic ${Buffer.from('bob:pw').toString('base64')}`, `Basic ${Buffer.from('bob:pw').toString('base64')}`]);
  });

  it('says credentials are needed when there are none', async () => {
    const reg = basicRegistry();
    const srv = await reg.ready;
    const err = await rejection(makeClient(srv.url).getManifest('latest'));
    expect(err.code).toBe(ErrorCode.UNAUTHENTICATED);
    expect(err.message).toMatch(/requires a username and password/);
  });
});

describe('blob redirects', () => {
  it('follows a blob redirect to storage without sending the registry token there', async () => {
    const blob = content(MediaType.OCI_LAYER_GZIP, 'stored-elsewhere');
    let storageAuth: string | undefined = 'unset';
    const storage = await serve((req, res) => {
      storageAuth = req.headers.authorization;
      res.end(blob.bytes);
    });
    const srv = await serve((req, res) => {
      if (req.headers.authorization !== 'Basic ' + Buffer.from('u:p').toString('base64')) {
        res.writeHead(401, { 'www-authenticate': 'Basic realm="r"' }).end();
        return;
      }
      res.writeHead(307, { location: `${storage.url}/data?sig=abc` }).end();
    });
    const out = await collect(await makeClient(srv.url, { credentials: { username: 'u', password: 'p' } }).getBlob(blob.desc));
    expect(out.equals(blob.bytes)).toBe(true);
    expect(storageAuth).toBeUndefined();
  });
});

// ---------- error mapping ----------

describe('registry errors', () => {
  it('maps 404 with MANIFEST_UNKNOWN to NOT_FOUND, quoting the registry', async () => {
    const srv = await serve(registryHandler({}));
    const err = await rejection(makeClient(srv.url).getManifest('v1.2'));
    expect(err.code).toBe(ErrorCode.NOT_FOUND);
    expect(err.message).toContain(`manifest v1.2 not found in lib/app at ${srv.url}`);
    expect(err.message).toContain('manifest unknown');
  });

  it('maps a blob 404 to NOT_FOUND', async () => {
    const srv = await serve(registryHandler({}));
    const err = await rejection(makeClient(srv.url).getBlob(content('x', 'nope').desc));
    expect(err.code).toBe(ErrorCode.NOT_FOUND);
    expect(err.message).toContain('blob sha256:');
  });

  it('maps 500 and 429 to UNAVAILABLE, 403 DENIED to PERMISSION_DENIED', async () => {
    const srv = await serve((req, res) => {
      if (req.url!.includes('five')) res.writeHead(500).end('internal oops');
      else if (req.url!.includes('many')) sendJson(res, 429, { errors: [{ code: 'TOOMANYREQUESTS', message: 'slow down' }] });
      else sendJson(res, 403, { errors: [{ code: 'DENIED', message: 'requested access to the resource is denied' }] });
    });
    // One attempt: the mapping is under test here, not the retry backoff (see transport.test.ts).
    const client = makeClient(srv.url, { maxAttempts: 1 });
    const e500 = await rejection(client.getManifest('five'));
    expect(e500.code).toBe(ErrorCode.UNAVAILABLE);
    expect(e500.message).toContain('HTTP 500');
    const e429 = await rejection(client.getManifest('many'));
    expect(e429.code).toBe(ErrorCode.UNAVAILABLE);
    expect(e429.message).toContain('slow down');
    const e403 = await rejection(client.getManifest('nope'));
    expect(e403.code).toBe(ErrorCode.PERMISSION_DENIED);
    expect(e403.message).toContain('requested access to the resource is denied');
  });

  it('maps a refused port to UNAVAILABLE naming the origin', async () => {
    const srv = await serve(() => undefined);
    const port = new URL(srv.url).port;
    await cleanups.pop()!(); // stop it: the port is now closed
    const err = await rejection(makeClient(srv.url, { maxAttempts: 1 }).getManifest('latest'));
    expect(err.code).toBe(ErrorCode.UNAVAILABLE);
    expect(err.message).toContain(`127.0.0.1:${port}`);
    expect(err.message).toContain('connection refused');
  });

  it('refuses malformed tags, digests and repositories before any request', async () => {
    const srv = await serve(registryHandler({}));
    const client = makeClient(srv.url);
    expect((await rejection(client.getManifest('../../etc'))).code).toBe(ErrorCode.INVALID_REFERENCE);
    expect((await rejection(client.getManifest('sha256:abc'))).code).toBe(ErrorCode.INVALID_REFERENCE);
    expect(() => makeClient(srv.url, { repository: 'Lib/../x' })).toThrow(GuestpullError);
    expect(srv.hits).toHaveLength(0);
  });
});

// ---------- manifests ----------

describe('manifests', () => {
  it('refuses a manifest larger than the bound, announced or not', async () => {
    const big = Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: MediaType.OCI_MANIFEST, pad: 'x'.repeat(5000) }));
    const srv = await serve((req, res) => {
      if (req.url!.endsWith('/announced')) res.writeHead(200, { 'content-length': big.length }).end(big);
      else {
        res.writeHead(200, { 'content-type': MediaType.OCI_MANIFEST }); // chunked: no length given
        res.write(big.subarray(0, 3000));
        res.end(big.subarray(3000));
      }
    });
    const client = makeClient(srv.url, { manifestBytes: 4096 });
    for (const tag of ['announced', 'chunked']) {
      const err = await rejection(client.getManifest(tag));
      expect(err.code).toBe(ErrorCode.BAD_IMAGE);
      expect(err.message).toContain('4096 bytes');
    }
  });

  it('verifies a by-digest manifest and names both digests on mismatch', async () => {
    const good = imageManifest();
    const evil = imageManifest({ mediaType: MediaType.DOCKER_MANIFEST });
    const srv = await serve((_req, res) => res.writeHead(200, { 'content-type': MediaType.OCI_MANIFEST }).end(evil.bytes));
    const err = await rejection(makeClient(srv.url).getManifest(good.desc.digest));
    expect(err.code).toBe(ErrorCode.DIGEST_MISMATCH);
    expect(err.message).toContain(good.desc.digest);
    expect(err.message).toContain(evil.desc.digest);
    const ok = await makeClient(srv.url).getManifest(evil.desc.digest);
    expect(ok.digest).toBe(evil.desc.digest);
  });

  it('refuses Docker schema1, by media type or by schemaVersion', async () => {
    const signed = Buffer.from(JSON.stringify({ schemaVersion: 1, name: 'lib/app', tag: 'latest', fsLayers: [], signatures: [] }));
    const srv = await serve((req, res) => {
      const ct = req.url!.endsWith('typed') ? MediaType.DOCKER_MANIFEST_V1_SIGNED : 'application/json';
      res.writeHead(200, { 'content-type': ct }).end(req.url!.endsWith('typed') ? '{"name":"x"}' : signed);
    });
    for (const tag of ['typed', 'versioned']) {
      const err = await rejection(makeClient(srv.url).getManifest(tag));
      expect(err.code).toBe(ErrorCode.BAD_IMAGE);
      expect(err.message).toContain('Docker schema1 manifests are obsolete; re-push the image with a current client');
    }
  });

  it('classifies by mediaType field, else Content-Type, else shape', async () => {
    const noField = imageManifest({ mediaType: null });
    const srv = await serve((req, res) => {
      const ct = req.url!.endsWith('docker') ? `${MediaType.DOCKER_MANIFEST}; charset=utf-8` : 'text/plain';
      res.writeHead(200, { 'content-type': ct }).end(noField.bytes);
    });
    const client = makeClient(srv.url);
    expect((await client.getManifest('docker')).mediaType).toBe(MediaType.DOCKER_MANIFEST);
    expect((await client.getManifest('plain')).mediaType).toBe(MediaType.OCI_MANIFEST);
  });

  it('works under a Harbor-style override path base', async () => {
    const m = imageManifest();
    const srv = await serve((req, res) => {
      if (req.url === '/v2/proxy-docker.io/library/busybox/manifests/latest') res.writeHead(200, { 'content-type': MediaType.OCI_MANIFEST }).end(m.bytes);
      else res.writeHead(404).end();
    });
    const client = makeClient(srv.url, { baseUrl: `${srv.url}/v2/proxy-docker.io/`, repository: 'library/busybox' });
    expect((await client.getManifest('latest')).digest).toBe(m.desc.digest);
  });
});

// ---------- blobs ----------

describe('blobs', () => {
  const good = content(MediaType.OCI_LAYER_GZIP, 'exactly these bytes');

  function blobServer(body: (res: http.ServerResponse) => void): Promise<TestServer> {
    return serve((_req, res) => body(res));
  }

  it('streams a verified blob', async () => {
    const srv = await blobServer((res) => res.end(good.bytes));
    expect((await collect(await makeClient(srv.url).getBlob(good.desc))).equals(good.bytes)).toBe(true);
  });

  it('fails on wrong bytes of the right size', async () => {
    const srv = await blobServer((res) => res.end(Buffer.from('EXACTLY these bytes')));
    const err = await rejection(collect(await makeClient(srv.url).getBlob(good.desc)));
    expect(err.code).toBe(ErrorCode.DIGEST_MISMATCH);
    expect(err.message).toContain(good.desc.digest);
  });

  it('fails on a short body', async () => {
    const srv = await blobServer((res) => {
      res.writeHead(200); // chunked, so only our size check can notice
      res.end(good.bytes.subarray(0, 5));
    });
    const err = await rejection(collect(await makeClient(srv.url).getBlob(good.desc)));
    expect(err.code).toBe(ErrorCode.DIGEST_MISMATCH);
    expect(err.message).toContain(`received 5 bytes, its descriptor promises ${good.desc.size}`);
  });

  it('fails on a body that is too long, before it ends', async () => {
    const srv = await blobServer((res) => {
      res.writeHead(200);
      res.write(good.bytes);
      res.write('one more'); // the end never comes: the verifier must fail on the extra bytes alone
    });
    const err = await rejection(collect(await makeClient(srv.url).getBlob(good.desc)));
    expect(err.code).toBe(ErrorCode.DIGEST_MISMATCH);
    expect(err.message).toContain('more than');
  });

  it('fails early when Content-Length disagrees with the descriptor', async () => {
    const srv = await blobServer((res) => res.writeHead(200, { 'content-length': good.bytes.length + 1 }).end(Buffer.concat([good.bytes, Buffer.from('!')])));
    const err = await rejection(makeClient(srv.url).getBlob(good.desc));
    expect(err.code).toBe(ErrorCode.DIGEST_MISMATCH);
  });

  it('getBlobBytes refuses oversize descriptors without fetching and returns verified bytes', async () => {
    const srv = await blobServer((res) => res.end(good.bytes));
    const client = makeClient(srv.url);
    const err = await rejection(client.getBlobBytes(good.desc, good.desc.size - 1));
    expect(err.code).toBe(ErrorCode.BAD_IMAGE);
    expect(srv.hits).toHaveLength(0);
    expect((await client.getBlobBytes(good.desc, 1024)).equals(good.bytes)).toBe(true);
  });
});

// ---------- platforms and index resolution ----------

describe('platform choice', () => {
  const m = (n: string): Content => content(MediaType.OCI_MANIFEST, n);
  const amd64 = withPlatform(m('amd64'), { os: 'linux', architecture: 'amd64' });
  const arm64v8 = withPlatform(m('arm64v8'), { os: 'linux', architecture: 'arm64', variant: 'v8' });
  const arm64 = withPlatform(m('arm64'), { os: 'linux', architecture: 'arm64' });
  const armv7 = withPlatform(m('armv7'), { os: 'linux', architecture: 'arm', variant: 'v7' });
  const armv6 = withPlatform(m('armv6'), { os: 'linux', architecture: 'arm', variant: 'v6' });
  const attest = withPlatform(m('att'), { os: 'unknown', architecture: 'unknown' }, {
    'vnd.docker.reference.type': 'attestation-manifest',
    'vnd.docker.reference.digest': amd64.digest,
  });
  const noPlatform = m('none').desc;
  const windows = withPlatform(m('win'), { os: 'windows', architecture: 'amd64' });

  it('matches os and architecture', () => {
    expect(choosePlatform([attest, noPlatform, windows, arm64, amd64], { os: 'linux', architecture: 'amd64' })).toBe(amd64);
    expect(choosePlatform([windows], { os: 'linux', architecture: 'amd64' })).toBeUndefined();
  });

  it('treats arm64 v8 and no variant as equal, preferring the exact one', () => {
    expect(choosePlatform([arm64, arm64v8], { os: 'linux', architecture: 'arm64', variant: 'v8' })).toBe(arm64v8);
    expect(choosePlatform([arm64v8, arm64], { os: 'linux', architecture: 'arm64' })).toBe(arm64);
    expect(choosePlatform([arm64], { os: 'linux', architecture: 'arm64', variant: 'v8' })).toBe(arm64);
    expect(choosePlatform([arm64v8], { os: 'linux', architecture: 'arm64' })).toBe(arm64v8);
  });

  it('requires the arm variant', () => {
    expect(choosePlatform([armv6, armv7], { os: 'linux', architecture: 'arm', variant: 'v7' })).toBe(armv7);
    expect(choosePlatform([armv6], { os: 'linux', architecture: 'arm', variant: 'v7' })).toBeUndefined();
  });

  it('never chooses an attestation', () => {
    const unannotated = withPlatform(m('u'), { os: 'unknown', architecture: 'unknown' });
    expect(choosePlatform([attest, unannotated], { os: 'unknown', architecture: 'unknown' })).toBeUndefined();
  });

  it('knows the platform it runs on', () => {
    const p = currentPlatform();
    expect(p.os).toBe('linux');
    const expected: Record<string, string> = { x64: 'amd64', arm64: 'arm64', arm: 'arm', ppc64: 'ppc64le', s390x: 's390x' };
    expect(p.architecture).toBe(expected[process.arch] ?? process.arch);
    if (process.arch === 'arm64') expect(p.variant).toBe('v8');
  });
});

describe('resolveImage', () => {
  const amd = imageManifest();
  const arm = imageManifest({ mediaType: MediaType.DOCKER_MANIFEST });
  const att = content(MediaType.OCI_MANIFEST, JSON.stringify({ schemaVersion: 2, mediaType: MediaType.OCI_MANIFEST, config: amd.desc, layers: [] }));
  const idx = index([
    withPlatform(att, { os: 'unknown', architecture: 'unknown' }, { 'vnd.docker.reference.type': 'attestation-manifest' }),
    withPlatform(arm, { os: 'linux', architecture: 'arm64', variant: 'v8' }),
    withPlatform(amd, { os: 'linux', architecture: 'amd64' }),
  ]);

  it('chooses the platform child and reports its digest and the index digest', async () => {
    const srv = await serve(registryHandler({ latest: idx, amd, arm, att }));
    const r = await resolveImage(makeClient(srv.url), 'latest', { os: 'linux', architecture: 'amd64' });
    expect(r.manifestDigest).toBe(amd.desc.digest);
    expect(r.indexDigest).toBe(idx.desc.digest);
    expect(r.manifestMediaType).toBe(MediaType.OCI_MANIFEST);
    expect(r.manifest.layers).toHaveLength(1);
    const r2 = await resolveImage(makeClient(srv.url), 'latest', { os: 'linux', architecture: 'arm64', variant: 'v8' });
    expect(r2.manifestDigest).toBe(arm.desc.digest);
    expect(r2.manifestMediaType).toBe(MediaType.DOCKER_MANIFEST);
  });

  it('resolves a plain manifest without an index', async () => {
    const srv = await serve(registryHandler({ latest: amd }));
    const r = await resolveImage(makeClient(srv.url), 'latest', { os: 'linux', architecture: 'riscv64' });
    expect(r.manifestDigest).toBe(amd.desc.digest);
    expect(r.indexDigest).toBeUndefined();
  });

  it('says which platform was wanted and which are available', async () => {
    const srv = await serve(registryHandler({ latest: idx }));
    const err = await rejection(resolveImage(makeClient(srv.url), 'latest', { os: 'linux', architecture: 's390x' }));
    expect(err.code).toBe(ErrorCode.NOT_FOUND);
    expect(err.message).toContain('linux/s390x');
    expect(err.message).toContain('available: linux/arm64/v8, linux/amd64');
    expect(err.message).not.toContain('unknown');
  });

  it('refuses an index nested in an index', async () => {
    const inner = index([withPlatform(amd, { os: 'linux', architecture: 'amd64' })]);
    const outer = index([withPlatform(inner, { os: 'linux', architecture: 'amd64' })]);
    const srv = await serve(registryHandler({ latest: outer, inner, amd }));
    const err = await rejection(resolveImage(makeClient(srv.url), 'latest', { os: 'linux', architecture: 'amd64' }));
    expect(err.code).toBe(ErrorCode.BAD_IMAGE);
    expect(err.message).toContain('one level');
  });

  it('refuses a child whose bytes do not match the index digest', async () => {
    const srv = await serve((req, res) => {
      if (req.url!.endsWith('/latest')) res.writeHead(200, { 'content-type': MediaType.OCI_INDEX }).end(idx.bytes);
      else res.writeHead(200, { 'content-type': MediaType.OCI_MANIFEST }).end(arm.bytes);
    });
    const err = await rejection(resolveImage(makeClient(srv.url), 'latest', { os: 'linux', architecture: 'amd64' }));
    expect(err.code).toBe(ErrorCode.DIGEST_MISMATCH);
  });

  it('refuses a manifest whose config is not an image config', async () => {
    const artifact = imageManifest({ configType: 'application/vnd.cncf.helm.config.v1+json' });
    const srv = await serve(registryHandler({ latest: artifact }));
    const err = await rejection(resolveImage(makeClient(srv.url), 'latest', { os: 'linux', architecture: 'amd64' }));
    expect(err.code).toBe(ErrorCode.BAD_IMAGE);
    expect(err.message).toContain('application/vnd.cncf.helm.config.v1+json');
  });
});
