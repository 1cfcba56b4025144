/**
 * The test token server against the REAL distribution registry (Debian docker-registry 2.8) running
 * with `auth.token`: challenges, anonymous pull, authenticated push, scope limits, key trust
 * (x5c RS256, x5c ES256, libtrust kid), forged/foreign tokens, and the token endpoint's own errors.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { createHash, randomBytes, X509Certificate } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startTokenServer, libtrustKeyId, type RunningTokenServer } from '../helpers/token-server.js';

const REGISTRY_BIN = '/usr/bin/docker-registry';

async function freePort(): Promise<number> {
  const srv = net.createServer();
  await new Promise<void>((resolve, reject) => {
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => resolve());
  });
  const { port } = srv.address() as net.AddressInfo;
  await new Promise<void>((resolve) => srv.close(() => resolve()));
  return port;
}

const sha256 = (b: Buffer): string => `sha256:${createHash('sha256').update(b).digest('hex')}`;
const basic = (user: string, password: string): string => `Basic ${Buffer.from(`${user}:${password}`).toString('base64')}`;

function decodeJwt(token: string): { header: Record<string, unknown>; claims: Record<string, unknown> } {
  const [h, c] = token.split('.');
  return {
    header: JSON.parse(Buffer.from(h!, 'base64url').toString('utf8')) as Record<string, unknown>,
    claims: JSON.parse(Buffer.from(c!, 'base64url').toString('utf8')) as Record<string, unknown>,
  };
}

interface TokenAnswer { token: string; access_token: string; expires_in: number; issued_at: string; refresh_token?: string; scope?: string }

async function getToken(ts: RunningTokenServer, scopes: string[], auth?: string): Promise<TokenAnswer> {
  const url = new URL(ts.realm);
  url.searchParams.set('service', ts.service);
  for (const s of scopes) url.searchParams.append('scope', s);
  const res = await fetch(url, { headers: auth ? { authorization: auth } : {} });
  expect(res.status, await res.clone().text()).toBe(200);
  return (await res.json()) as TokenAnswer;
}

describe('token server + real docker-registry (auth.token)', () => {
  let main: RunningTokenServer;
  let es: RunningTokenServer;
  let kid: RunningTokenServer;
  let rogue: RunningTokenServer;
  let dir: string;
  let registry: ChildProcess;
  let registryLog = '';
  let base: string;

  const reg = (p: string, init: RequestInit = {}, token?: string): Promise<Response> =>
    fetch(new URL(p, base), {
      ...init,
      headers: { ...(init.headers as Record<string, string> | undefined), ...(token ? { authorization: `Bearer ${token}` } : {}) },
    });

  beforeAll(async () => {
    [main, es, kid, rogue] = await Promise.all([
      startTokenServer({ users: { alice: 'secret' } }),
      startTokenServer({ algorithm: 'ES256' }),
      startTokenServer({ keyHeader: 'kid' }),
      startTokenServer({ users: { alice: 'secret' } }), // same issuer/service, but its cert is not trusted
    ]);
    dir = mkdtempSync(path.join(os.tmpdir(), 'guestpull-tokreg-'));
    const bundle = path.join(dir, 'bundle.pem');
    writeFileSync(bundle, [main, es, kid].map((t) => readFileSync(t.rootCertBundle, 'utf8')).join('\n'));
    const port = await freePort();
    base = `http://127.0.0.1:${port}`;
    const config = path.join(dir, 'config.yml');
    writeFileSync(config, [
      'version: 0.1',
      'log: {level: info, accesslog: {disabled: true}}',
      `storage: {filesystem: {rootdirectory: ${JSON.stringify(path.join(dir, 'data'))}}, delete: {enabled: true}}`,
      `http: {addr: "127.0.0.1:${port}", secret: ${JSON.stringify(randomBytes(16).toString('hex'))}}`,
      'auth:',
      '  token:',
      `    realm: ${JSON.stringify(main.realm)}`,
      `    service: ${JSON.stringify(main.service)}`,
      `    issuer: ${JSON.stringify(main.issuer)}`,
      `    rootcertbundle: ${JSON.stringify(bundle)}`,
      '',
    ].join('\n'));
    registry = spawn(REGISTRY_BIN, ['serve', config], { stdio: ['ignore', 'pipe', 'pipe'] });
    registry.stdout!.on('data', (d: Buffer) => (registryLog += d.toString()));
    registry.stderr!.on('data', (d: Buffer) => (registryLog += d.toString()));
    const deadline = Date.now() + 15_000;
    for (;;) {
      if (registry.exitCode !== null) throw new Error(`docker-registry exited early:\n${registryLog}`);
      if (Date.now() > deadline) throw new Error(`docker-registry not ready in 15 s:\n${registryLog}`);
      const ok = await fetch(`${base}/v2/`).then((r) => r.status === 401, () => false);
      if (ok) break;
      await new Promise((r) => setTimeout(r, 50));
    }
  });

  afterAll(async () => {
    if (registry && registry.exitCode === null && registry.signalCode === null) {
      const exited = new Promise((r) => registry.once('exit', r));
      registry.kill('SIGTERM');
      await exited;
    }
    await Promise.all([main, es, kid, rogue].filter(Boolean).map((t) => t.stop()));
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  it('challenges GET /v2/ with the configured realm and service; any valid token opens it', async () => {
    const res = await reg('/v2/');
    expect(res.status).toBe(401);
    expect(res.headers.get('www-authenticate')).toBe(`Bearer realm="${main.realm}",service="${main.service}"`);
    const { token, access_token, expires_in, issued_at } = await getToken(main, []);
    expect(access_token).toBe(token);
    expect(expires_in).toBe(300);
    expect(Math.abs(Date.parse(issued_at) - Date.now())).toBeLessThan(10_000);
    expect((await reg('/v2/', {}, token)).status).toBe(200);
  });

  it('a user token with push uploads blobs + manifest; an anonymous pull token reads them back', async () => {
    const name = 'foo/bar';
    const challenge = await reg(`/v2/${name}/blobs/uploads/`, { method: 'POST' });
    expect(challenge.status).toBe(401);
    // the registry lists the actions in Go map order: pull,push or push,pull
    expect(challenge.headers.get('www-authenticate')).toMatch(/scope="repository:foo\/bar:(pull,push|push,pull)"/);

    const { token } = await getToken(main, [`repository:${name}:pull,push`], basic('alice', 'secret'));
    const { header, claims } = decodeJwt(token);
    expect(header.alg).toBe('RS256');
    expect(Array.isArray(header.x5c) && header.x5c.length === 1).toBe(true);
    expect(claims).toMatchObject({ iss: main.issuer, aud: main.service, sub: 'alice', access: [{ type: 'repository', name, actions: ['pull', 'push'] }] });

    const config = Buffer.from(JSON.stringify({ architecture: 'amd64', os: 'linux', rootfs: { type: 'layers', diff_ids: [] } }));
    const layer = randomBytes(512);
    for (const blob of [config, layer]) {
      const start = await reg(`/v2/${name}/blobs/uploads/`, { method: 'POST' }, token);
      expect(start.status, await start.clone().text()).toBe(202);
      const loc = new URL(start.headers.get('location')!, base);
      loc.searchParams.set('digest', sha256(blob));
      const put = await fetch(loc, { method: 'PUT', body: blob, headers: { authorization: `Bearer ${token}`, 'content-type': 'application/octet-stream' } });
      expect(put.status, await put.clone().text()).toBe(201);
    }
    const manifest = Buffer.from(JSON.stringify({
      schemaVersion: 2,
      mediaType: 'application/vnd.oci.image.manifest.v1+json',
      config: { mediaType: 'application/vnd.oci.image.config.v1+json', digest: sha256(config), size: config.length },
      layers: [{ mediaType: 'application/vnd.oci.image.layer.v1.tar', digest: sha256(layer), size: layer.length }],
    }));
    const putManifest = await reg(`/v2/${name}/manifests/v1`, {
      method: 'PUT', body: manifest, headers: { 'content-type': 'application/vnd.oci.image.manifest.v1+json' },
    }, token);
    expect(putManifest.status, await putManifest.clone().text()).toBe(201);

    const anon = await getToken(main, [`repository:${name}:pull`]);
    expect(decodeJwt(anon.token).claims.sub).toBe('');
    const got = await reg(`/v2/${name}/manifests/v1`, { headers: { accept: 'application/vnd.oci.image.manifest.v1+json' } }, anon.token);
    expect(got.status).toBe(200);
    expect(got.headers.get('docker-content-digest')).toBe(sha256(manifest));
    expect(Buffer.from(await got.arrayBuffer()).equals(manifest)).toBe(true);
    const blob = await reg(`/v2/${name}/blobs/${sha256(layer)}`, {}, anon.token);
    expect(blob.status).toBe(200);
    expect(Buffer.from(await blob.arrayBuffer()).equals(layer)).toBe(true);
  });

  it('an anonymous token asking for push gets pull only, and the registry refuses the push', async () => {
    const { token } = await getToken(main, ['repository:foo/bar:pull,push']);
    expect(decodeJwt(token).claims.access).toEqual([{ type: 'repository', name: 'foo/bar', actions: ['pull'] }]);
    const res = await reg('/v2/foo/bar/blobs/uploads/', { method: 'POST' }, token);
    expect(res.status).toBe(401);
    expect(res.headers.get('www-authenticate')).toContain('error="insufficient_scope"');
  });

  it('a token for another repository does not open this one', async () => {
    const { token } = await getToken(main, ['repository:foo/other:pull']);
    const res = await reg('/v2/foo/bar/manifests/v1', {}, token);
    expect(res.status).toBe(401);
    expect(res.headers.get('www-authenticate')).toContain('error="insufficient_scope"');
  });

  it('refuses a token from an untrusted key and a token whose claims were altered', async () => {
    const foreign = await getToken(rogue, ['repository:foo/bar:pull']);
    const refused = await reg('/v2/foo/bar/manifests/unknown', {}, foreign.token);
    expect(refused.status).toBe(401);
    expect(refused.headers.get('www-authenticate')).toContain('error="invalid_token"');

    const { token } = await getToken(main, ['repository:foo/bar:pull']);
    const [h, c, s] = token.split('.') as [string, string, string];
    const claims = JSON.parse(Buffer.from(c, 'base64url').toString('utf8')) as Record<string, unknown>;
    claims.access = [{ type: 'repository', name: 'foo/bar', actions: ['pull', 'push'] }];
    const forged = `${h}.${Buffer.from(JSON.stringify(claims)).toString('base64url')}.${s}`;
    const res = await reg('/v2/foo/bar/blobs/uploads/', { method: 'POST' }, forged);
    expect(res.status).toBe(401);
    expect(res.headers.get('www-authenticate')).toContain('error="invalid_token"');
  });

  it('accepts ES256 (x5c) and RS256 kid-only tokens from keys in the bundle', async () => {
    const esTok = await getToken(es, ['repository:foo/bar:pull']);
    expect(decodeJwt(esTok.token).header.alg).toBe('ES256');
    const kidTok = await getToken(kid, ['repository:foo/bar:pull']);
    const kidHeader = decodeJwt(kidTok.token).header;
    expect(kidHeader.x5c).toBeUndefined();
    const certDer = new X509Certificate(readFileSync(kid.rootCertBundle)).publicKey.export({ type: 'spki', format: 'der' });
    expect(kidHeader.kid).toBe(libtrustKeyId(certDer));
    expect(kidHeader.kid).toMatch(/^([A-Z2-7]{4}:){11}[A-Z2-7]{4}$/);
    for (const t of [esTok.token, kidTok.token]) {
      // 404 MANIFEST_UNKNOWN: authorisation passed, the tag simply does not exist.
      const res = await reg('/v2/foo/bar/manifests/nope', {}, t);
      expect(res.status).toBe(404);
      expect(await res.text()).toContain('MANIFEST_UNKNOWN');
    }
  });

  it('OAuth2 POST: password grant with a refresh token, then refresh_token grant pushes', async () => {
    const form = (fields: Record<string, string>): RequestInit => ({
      method: 'POST', body: new URLSearchParams(fields).toString(), headers: { 'content-type': 'application/x-www-form-urlencoded' },
    });
    const bad = await fetch(main.realm, form({ grant_type: 'password', username: 'alice', password: 'nope', service: main.service, client_id: 't' }));
    expect(bad.status).toBe(401);
    const first = await fetch(main.realm, form({ grant_type: 'password', username: 'alice', password: 'secret', service: main.service, client_id: 't', access_type: 'offline' }));
    expect(first.status).toBe(200);
    const { refresh_token } = (await first.json()) as TokenAnswer;
    expect(refresh_token).toBeTruthy();
    const second = await fetch(main.realm, form({ grant_type: 'refresh_token', refresh_token: refresh_token!, service: main.service, client_id: 't', scope: 'repository:foo/oauth:pull,push' }));
    expect(second.status).toBe(200);
    const answer = (await second.json()) as TokenAnswer;
    expect(answer.scope).toBe('repository:foo/oauth:pull,push');
    expect(answer.refresh_token).toBe(refresh_token);
    expect(decodeJwt(answer.access_token).claims.sub).toBe('alice');
    const res = await reg('/v2/foo/oauth/blobs/uploads/', { method: 'POST' }, answer.access_token);
    expect(res.status).toBe(202);
    const unknown = await fetch(main.realm, form({ grant_type: 'refresh_token', refresh_token: 'made-up', service: main.service }));
    expect(unknown.status).toBe(401);
    expect((await fetch(main.realm, form({ grant_type: 'client_credentials', service: main.service }))).status).toBe(400);
  });

  it('token endpoint errors: wrong password, unknown user, unknown/missing service, bad scope; requests are recorded', async () => {
    const before = main.requests.length;
    const url = (q: string): string => `${main.realm}?${q}`;
    const scope = 'scope=repository:foo/bar:pull';
    expect((await fetch(url(`service=${main.service}&${scope}`), { headers: { authorization: basic('alice', 'wrong') } })).status).toBe(401);
    expect((await fetch(url(`service=${main.service}&${scope}`), { headers: { authorization: basic('mallory', 'secret') } })).status).toBe(401);
    expect((await fetch(url(`service=elsewhere&${scope}`))).status).toBe(400);
    expect((await fetch(url(scope))).status).toBe(400);
    expect((await fetch(url(`service=${main.service}&scope=nonsense`))).status).toBe(400);
    expect((await fetch(`${main.realm.replace('/token', '/other')}?service=${main.service}`)).status).toBe(404);
    const ok = await fetch(url(`service=${main.service}&scope=repository:a/b:pull&scope=${encodeURIComponent('repository:c/d:pull repository:e/f:push')}`));
    expect(ok.status).toBe(200);
    const seen = main.requests.slice(before);
    expect(seen.map((r) => r.status)).toEqual([401, 401, 400, 400, 400, 404, 200]);
    expect(seen[0]).toMatchObject({ user: 'alice', service: main.service, scope: 'repository:foo/bar:pull' });
    expect(seen[6]!.scope).toBe('repository:a/b:pull repository:c/d:pull repository:e/f:push');
    const access = decodeJwt(((await ok.json()) as TokenAnswer).token).claims.access;
    // anonymous: push-only scope e/f is dropped entirely
    expect(access).toEqual([
      { type: 'repository', name: 'a/b', actions: ['pull'] },
      { type: 'repository', name: 'c/d', actions: ['pull'] },
    ]);
  });

  it('anonymous: false and a custom grant callback', async () => {
    const ts = await startTokenServer({
      anonymous: false, users: { bob: 'pw' }, tokenTtlSeconds: 90,
      grant: (user, s) => (s.name.startsWith('secret/') ? [] : s.actions.filter((a) => a === 'pull' && user === 'bob')),
    });
    try {
      const anon = await fetch(`${ts.realm}?service=${ts.service}&scope=repository:x/y:pull`);
      expect(anon.status).toBe(401);
      expect(anon.headers.get('www-authenticate')).toMatch(/^Basic /);
      const ans = await getToken(ts, ['repository:x/y:pull,push', 'repository:secret/z:pull'], basic('bob', 'pw'));
      expect(ans.expires_in).toBe(90);
      const { claims } = decodeJwt(ans.token);
      expect(claims.access).toEqual([{ type: 'repository', name: 'x/y', actions: ['pull'] }]);
      expect((claims.exp as number) - (claims.iat as number)).toBe(90);
      expect(ts.requests.map((r) => r.user)).toEqual([undefined, 'bob']);
    } finally {
      await ts.stop();
    }
    await expect(fetch(ts.realm)).rejects.toThrow();
  });
});
