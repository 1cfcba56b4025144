/**
 * Registry credentials end to end against real servers on loopback (issue 4, points 5 and 8):
 * - Replicated: a registry requiring basic auth (htpasswd) reached through a remap of the vendor's
 *   name, with the customer's credentials from auth.json (file:// and inline); a wrong password
 *   and missing credentials fail UNAUTHENTICATED naming the auth.json key (or its absence);
 * - credentials stay with their origin: a mirror never gets the original registry's credentials,
 *   a redirect to blob storage on another origin carries no Authorization, a token realm on
 *   another host over plain http is refused before any credential is sent;
 * - token auth: the test token server + the registry's `auth.token`: the user and scope the token
 *   server saw, one token for manifest, config and layers, and the identitytoken (refresh) form.
 * Assertions come from the servers' own logs and records; secrets never appear in guestpull's log.
 */
import { existsSync } from 'node:fs';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { parseConfig } from '../../src/config/index.js';
import { ErrorCode, GuestpullError } from '../../src/errors.js';
import { createLogger } from '../../src/log.js';
import { Puller } from '../../src/pull/index.js';
import { accessLog, requestsFor, settledLogs } from '../helpers/access-log.js';
import { buildImage, type BuiltImage } from '../helpers/image-builder.js';
import { startPathProxy } from '../helpers/path-proxy.js';
import { pushImage } from '../helpers/push.js';
import { hasRegistryBinary, startRegistry, type RunningRegistry } from '../helpers/registry.js';
import { startTokenServer, type RunningTokenServer } from '../helpers/token-server.js';
import { goarch } from './fixtures.js';
import { removeTree } from '../helpers/cleanup.js';

const CUSTOMER = { username: 'customer', password: 'license-id-3f9a' };
const PULLER = { username: 'puller', password: 'puller-secret-77' };
const VENDOR_REPO = 'proxy/myapp/registry.example.com/app/api';
const b64 = (s: string): string => Buffer.from(s, 'utf8').toString('base64');

let tmp: string;
let basic: RunningRegistry;
let tokens: RunningTokenServer;
let tokreg: RunningRegistry;
let img: BuiltImage;
let bundleNo = 0;
const pullers: Puller[] = [];

interface Harness {
  puller: Puller;
  logs: () => string;
}

function newBundle(): string {
  return path.join(tmp, 'bundles', `b${++bundleNo}`);
}

function harness(tomlTail: string): Harness {
  let out = '';
  const destination = new Writable({
    write(chunk: Buffer, _enc, cb) {
      out += chunk.toString('utf8');
      cb();
    },
  });
  const toml = `[image]\nwork_dir = "${path.join(tmp, 'work')}"\n# registry-access tests: copy mode, so no layer cache hides per-blob traffic\nsnapshotter = "copy"\n${tomlTail}`;
  const puller = new Puller({ config: parseConfig(toml, 'credentials test').config, logger: createLogger({ level: 'debug', destination }), version: 'cred-test' });
  pullers.push(puller);
  return { puller, logs: () => out };
}

function authJson(auths: Record<string, Record<string, string>>): string {
  return JSON.stringify({ auths });
}

async function writeAuthFile(name: string, content: string): Promise<string> {
  const file = path.join(tmp, name);
  await writeFile(file, content, { mode: 0o600 });
  return file;
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
  expect(await readFile(path.join(bundle, 'rootfs', 'hello'), 'utf8')).toBe('private bits\n');
  expect(await readFile(path.join(bundle, 'rootfs', 'two'), 'utf8')).toBe('2\n');
}

/** No secret of ours in guestpull's own log. */
function expectNoSecrets(logs: string, ...secrets: string[]): void {
  for (const s of secrets) {
    expect(logs).not.toContain(s);
  }
}

/** The Replicated remap: the vendor's name → the proxy registry's per-app path. */
function replicatedRemap(): string {
  return `
[[image.registry_config.registry]]
prefix = "registry.example.com/app"
location = "${basic.host}/proxy/myapp/registry.example.com/app"
insecure = true
`;
}

async function listen(server: http.Server): Promise<number> {
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve());
  });
  return (server.address() as AddressInfo).port;
}

async function close(server: http.Server): Promise<void> {
  await new Promise<void>((resolve) => {
    server.close(() => resolve());
    server.closeAllConnections();
  });
}

beforeAll(async () => {
  if (!hasRegistryBinary()) throw new Error('docker-registry is not installed: apt-get install docker-registry');
  tmp = await mkdtemp(path.join(os.tmpdir(), 'guestpull-creds-'));
  img = await buildImage({
    layers: [[{ type: 'file', path: 'hello', content: 'private bits\n' }], [{ type: 'file', path: 'two', content: '2\n' }]],
    config: { Cmd: ['/hello'] },
    architecture: goarch(),
  });
  basic = await startRegistry({ htpasswd: { user: CUSTOMER.username, password: CUSTOMER.password }, logLevel: 'info' });
  await pushImage(basic.url, VENDOR_REPO, 'v1', img, { auth: CUSTOMER });

  tokens = await startTokenServer({
    users: { [PULLER.username]: PULLER.password },
    // anonymous callers get nothing under private/
    grant: (user, scope) => (user ? scope.actions.filter((a) => a === 'pull' || a === 'push') : scope.name.startsWith('private/') ? [] : ['pull']),
  });
  tokreg = await startRegistry({
    tokenAuth: { realm: tokens.realm, service: tokens.service, issuer: tokens.issuer, rootCertBundle: tokens.rootCertBundle },
    logLevel: 'info',
  });
  await pushImage(tokreg.url, 'private/app', 'v1', img, { auth: PULLER });
}, 120_000);

afterAll(async () => {
  for (const p of pullers) await p.close();
  await basic?.stop();
  await tokreg?.stop();
  await tokens?.stop();
  if (tmp) await removeTree(tmp);
});

describe('Replicated: a basic-auth proxy registry behind a remap, the customer credentials from auth.json', () => {
  const KEY = () => `${basic.host}/proxy/myapp`;

  it('file:// auth.json: the remapped location gets the key for ITS registry/path, not the vendor name', async () => {
    const file = await writeAuthFile(
      'replicated-auth.json',
      authJson({
        [KEY()]: { auth: b64(`${CUSTOMER.username}:${CUSTOMER.password}`) },
        // the vendor's upstream credentials: must not be used for the proxy registry
        'registry.example.com': { username: 'vendor', password: 'vendor-upstream-secret' },
      }),
    );
    const h = harness(`authenticated_registry_credentials_uri = "file://${file}"\n${replicatedRemap()}`);
    const before = (await settledLogs(basic)).length;
    const bundle = newBundle();
    expect((await h.puller.pull('registry.example.com/app/api:v1', bundle)).manifestDigest).toBe(img.manifest.digest);
    await expectPulled(bundle);
    const served = (await settledLogs(basic)).slice(before);
    expect(requestsFor(served, VENDOR_REPO).map((e) => `${e.path} ${e.status}`)).toContain(`/v2/${VENDOR_REPO}/manifests/v1 200`);
    // htpasswd accepted guestpull's credentials for the manifest and every blob
    const authorized = served.split('\n').filter((l) => l.includes('msg="authorized request"') && l.includes('useragent=guestpull/cred-test'));
    expect(authorized.length).toBe(1 + 1 + img.layers.length);
    expect(served).not.toContain('vendor');
    expect(h.logs()).toContain(`"authKey":"${KEY()}"`);
    expectNoSecrets(h.logs(), CUSTOMER.password, b64(`${CUSTOMER.username}:${CUSTOMER.password}`), 'vendor-upstream-secret');
  });

  it('the inline auth.json form works the same', async () => {
    const inline = authJson({ [KEY()]: { username: CUSTOMER.username, password: CUSTOMER.password } });
    const h = harness(`authenticated_registry_credentials = '''${inline}'''\n${replicatedRemap()}`);
    const bundle = newBundle();
    expect((await h.puller.pull('registry.example.com/app/api:v1', bundle)).manifestDigest).toBe(img.manifest.digest);
    await expectPulled(bundle);
    expectNoSecrets(h.logs(), CUSTOMER.password);
  });

  it('a wrong password → UNAUTHENTICATED naming the auth.json key that was used', async () => {
    const file = await writeAuthFile('wrong-auth.json', authJson({ [KEY()]: { auth: b64(`${CUSTOMER.username}:wrong-password-9`) } }));
    const h = harness(`authenticated_registry_credentials_uri = "file://${file}"\n${replicatedRemap()}`);
    const before = (await settledLogs(basic)).length;
    const e = await pullError(h.puller, 'registry.example.com/app/api:v1');
    expect(e.code).toBe(ErrorCode.UNAUTHENTICATED);
    expect(e.message).toContain(`credentials from auth.json key "${KEY()}"`);
    expect(e.message).toContain(`auth.json file ${file}`);
    expect(e.message).toContain(`were rejected by ${basic.url}`);
    expect(e.message).not.toContain('wrong-password-9');
    expect((await settledLogs(basic)).slice(before)).toContain('msg="error authenticating user \\"customer\\": authentication failure"');
    expectNoSecrets(h.logs(), 'wrong-password-9', b64(`${CUSTOMER.username}:wrong-password-9`));
  });

  it('no credentials for the location → UNAUTHENTICATED (an auth.json for the vendor name does not count)', async () => {
    const none = harness(replicatedRemap());
    const e1 = await pullError(none.puller, 'registry.example.com/app/api:v1');
    expect(e1.code).toBe(ErrorCode.UNAUTHENTICATED);
    expect(e1.message).toContain('requires a username and password');

    const file = await writeAuthFile('vendor-only.json', authJson({ 'registry.example.com/app': { username: 'vendor', password: 'vendor-upstream-secret' } }));
    const other = harness(`authenticated_registry_credentials_uri = "file://${file}"\n${replicatedRemap()}`);
    const e2 = await pullError(other.puller, 'registry.example.com/app/api:v1');
    expect(e2.code).toBe(ErrorCode.UNAUTHENTICATED);
    expect(e2.message).toContain(`no key of the auth.json file ${file} matches ${basic.host}/${VENDOR_REPO}`);
  });
});

describe('credentials stay with the origin they belong to', () => {
  it('a mirror never gets the original registry credentials; with its own key it gets its own', async () => {
    const harbor = await startPathProxy({ target: basic.url, project: 'proj' });
    try {
      const rules = `
[[image.registry_config.registry]]
prefix = "${basic.host}"
insecure = true
[[image.registry_config.registry.mirror]]
location = "${harbor.projectUrl}"
insecure = true
override-path = true
`;
      const creds = { auth: b64(`${CUSTOMER.username}:${CUSTOMER.password}`) };
      const onlyOriginal = await writeAuthFile('origin-only.json', authJson({ [basic.host]: creds }));
      const h1 = harness(`authenticated_registry_credentials_uri = "file://${onlyOriginal}"\n${rules}`);
      const b1 = newBundle();
      expect((await h1.puller.pull(`${basic.host}/${VENDOR_REPO}:v1`, b1)).manifestDigest).toBe(img.manifest.digest);
      // the mirror was asked (401, without credentials), then the original location served the pull
      expect(harbor.requests.length).toBeGreaterThan(0);
      expect(harbor.requests.every((r) => !r.authorization && r.status === 401)).toBe(true);
      expect(h1.logs()).toContain(`"authKey":"${basic.host}"`);

      harbor.requests.length = 0;
      const both = await writeAuthFile('both.json', authJson({ [basic.host]: { auth: b64('nobody:not-for-the-mirror') }, [harbor.host]: creds }));
      const h2 = harness(`authenticated_registry_credentials_uri = "file://${both}"\n${rules}`);
      const b2 = newBundle();
      expect((await h2.puller.pull(`${basic.host}/${VENDOR_REPO}:v1`, b2)).manifestDigest).toBe(img.manifest.digest);
      await expectPulled(b2);
      expect(harbor.requests.some((r) => r.authorization && r.status === 200 && r.path === `/v2/proj/${VENDOR_REPO}/manifests/v1`)).toBe(true);
      expect(h2.logs()).toContain(`"authKey":"${harbor.host}"`);
    } finally {
      await harbor.stop();
    }
  });

  it('a blob redirect to another origin carries no Authorization', async () => {
    const blobs = new Map([img.config, ...img.layers].map((b) => [b.digest, b.bytes]));
    const storageSeen: { path: string; authorization: boolean }[] = [];
    const storage = http.createServer((req, res) => {
      storageSeen.push({ path: req.url ?? '', authorization: req.headers.authorization !== undefined });
      const bytes = blobs.get((req.url ?? '').slice(1));
      res.writeHead(bytes ? 200 : 404, { 'content-type': 'application/octet-stream', 'content-length': String(bytes?.length ?? 0) });
      res.end(bytes ?? Buffer.alloc(0));
    });
    const storagePort = await listen(storage);
    // the registry front: blobs redirect to the storage origin (once authenticated), the rest goes to the htpasswd registry
    const target = new URL(basic.url);
    const front = http.createServer((req, res) => {
      const m = /\/blobs\/(sha256:[a-f0-9]{64})$/.exec(req.url ?? '');
      if (m && req.headers.authorization !== undefined) {
        res.writeHead(307, { location: `http://127.0.0.1:${storagePort}/${m[1]}` });
        res.end();
        return;
      }
      const up = http.request({ host: target.hostname, port: target.port, method: req.method, path: req.url, headers: { ...req.headers, host: target.host } }, (r) => {
        res.writeHead(r.statusCode ?? 502, r.headers);
        pipeline(r, res).catch(() => res.destroy());
      });
      up.on('error', () => res.destroy());
      pipeline(req, up).catch(() => up.destroy());
    });
    const frontPort = await listen(front);
    try {
      const frontHost = `127.0.0.1:${frontPort}`;
      const file = await writeAuthFile('front.json', authJson({ [frontHost]: { auth: b64(`${CUSTOMER.username}:${CUSTOMER.password}`) } }));
      const h = harness(`authenticated_registry_credentials_uri = "file://${file}"\n[[image.registry_config.registry]]\nlocation = "${frontHost}"\ninsecure = true\n`);
      const bundle = newBundle();
      expect((await h.puller.pull(`${frontHost}/${VENDOR_REPO}:v1`, bundle)).manifestDigest).toBe(img.manifest.digest);
      await expectPulled(bundle);
      expect(storageSeen.map((s) => s.path).sort()).toEqual([...blobs.keys()].map((d) => `/${d}`).sort());
      expect(storageSeen.every((s) => !s.authorization)).toBe(true);
    } finally {
      await close(front);
      await close(storage);
    }
  });

  it('a plain-http token realm on another host is refused before any credential is sent', async () => {
    const realmHits: string[] = [];
    const realm = http.createServer((req, res) => {
      realmHits.push(req.url ?? '');
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end('{"token":"should-never-be-asked-for"}');
    });
    const realmPort = await listen(realm);
    const registryHits: { path: string; authorization: boolean }[] = [];
    const fake = http.createServer((req, res) => {
      registryHits.push({ path: req.url ?? '', authorization: req.headers.authorization !== undefined });
      // "localhost" is another host than the registry's 127.0.0.1, and the realm is plain http
      res.writeHead(401, { 'www-authenticate': `Bearer realm="http://localhost:${realmPort}/token",service="fake"`, 'content-type': 'application/json' });
      res.end('{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}');
    });
    const fakePort = await listen(fake);
    try {
      const fakeHost = `127.0.0.1:${fakePort}`;
      const h = harness(`authenticated_registry_credentials = '''${authJson({ [fakeHost]: { username: 'u', password: 'realm-secret-1' } })}'''\n[[image.registry_config.registry]]\nlocation = "${fakeHost}"\ninsecure = true\n`);
      const e = await pullError(h.puller, `${fakeHost}/some/app:v1`);
      expect(e.code).toBe(ErrorCode.PERMISSION_DENIED);
      expect(e.message).toContain('refused token realm');
      expect(e.message).toContain(`auth.json key "${fakeHost}"`);
      expect(realmHits).toEqual([]);
      expect(registryHits.length).toBe(1);
      expect(registryHits[0]!.authorization).toBe(false);
    } finally {
      await close(fake);
      await close(realm);
    }
  });
});

describe('token auth with credentials (token server + registry auth.token)', () => {
  it('pulls a private repository with auth.json credentials: the right user and scope, one token for everything', async () => {
    const file = await writeAuthFile('token-auth.json', authJson({ [tokreg.host]: { username: PULLER.username, password: PULLER.password } }));
    const h = harness(`authenticated_registry_credentials_uri = "file://${file}"\n[[image.registry_config.registry]]\nlocation = "${tokreg.host}"\ninsecure = true\n`);
    const before = tokens.requests.length;
    const regBefore = (await settledLogs(tokreg)).length;
    const bundle = newBundle();
    expect((await h.puller.pull(`${tokreg.host}/private/app:v1`, bundle)).manifestDigest).toBe(img.manifest.digest);
    await expectPulled(bundle);
    const mine = tokens.requests.slice(before);
    expect(mine.map((r) => ({ user: r.user, service: r.service, scope: r.scope, status: r.status }))).toEqual([
      { user: PULLER.username, service: tokens.service, scope: 'repository:private/app:pull', status: 200 },
    ]);
    // manifest + config + 2 layers, all served with that one token
    const served = requestsFor((await settledLogs(tokreg)).slice(regBefore), 'private/app').filter((e) => e.status === 200);
    expect(served.map((e) => e.path).sort()).toEqual(
      [`/v2/private/app/manifests/v1`, ...[img.config, ...img.layers].map((b) => `/v2/private/app/blobs/${b.digest}`)].sort(),
    );
    expectNoSecrets(h.logs(), PULLER.password, b64(`${PULLER.username}:${PULLER.password}`));
  });

  it('a wrong password → UNAUTHENTICATED naming the key; the token server saw the user and refused it', async () => {
    const key = `http://${tokreg.host}/v2/`; // a legacy spelling of the registry key
    const file = await writeAuthFile('token-wrong.json', authJson({ [key]: { auth: b64(`${PULLER.username}:not-it-4`) } }));
    const h = harness(`authenticated_registry_credentials_uri = "file://${file}"\n[[image.registry_config.registry]]\nlocation = "${tokreg.host}"\ninsecure = true\n`);
    const before = tokens.requests.length;
    const e = await pullError(h.puller, `${tokreg.host}/private/app:v1`);
    expect(e.code).toBe(ErrorCode.UNAUTHENTICATED);
    expect(e.message).toContain(`credentials from auth.json key "${key}"`);
    expect(e.message).toContain(`token server ${tokens.realm}`);
    expect(tokens.requests.slice(before).map((r) => `${r.user} ${r.status}`)).toEqual([`${PULLER.username} 401`]);
    expectNoSecrets(h.logs(), 'not-it-4');
  });

  it('without credentials the anonymous token does not cover the private repository → UNAUTHENTICATED', async () => {
    const h = harness(`[[image.registry_config.registry]]\nlocation = "${tokreg.host}"\ninsecure = true\n`);
    const before = tokens.requests.length;
    const e = await pullError(h.puller, `${tokreg.host}/private/app:v1`);
    expect(e.code).toBe(ErrorCode.UNAUTHENTICATED);
    expect(e.message).toContain('anonymous access was refused');
    expect(tokens.requests.slice(before).every((r) => r.user === undefined)).toBe(true);
  });

  it('the identitytoken form: an OAuth2 refresh token exchanged at the realm', async () => {
    // get a refresh token the way `docker login` does with an identity-token-capable server
    const form = new URLSearchParams({
      grant_type: 'password', username: PULLER.username, password: PULLER.password,
      access_type: 'offline', service: tokens.service, scope: 'repository:private/app:pull', client_id: 'test',
    });
    const res = await fetch(tokens.realm, { method: 'POST', body: form, headers: { 'content-type': 'application/x-www-form-urlencoded' } });
    const refresh = ((await res.json()) as { refresh_token?: string }).refresh_token;
    expect(typeof refresh).toBe('string');

    const file = await writeAuthFile('identity.json', authJson({ [`${tokreg.host}/private`]: { identitytoken: refresh! } }));
    const h = harness(`authenticated_registry_credentials_uri = "file://${file}"\n[[image.registry_config.registry]]\nlocation = "${tokreg.host}"\ninsecure = true\n`);
    const before = tokens.requests.length;
    const bundle = newBundle();
    expect((await h.puller.pull(`${tokreg.host}/private/app:v1`, bundle)).manifestDigest).toBe(img.manifest.digest);
    await expectPulled(bundle);
    // the user is known only through the refresh token (no Basic credentials were sent)
    expect(tokens.requests.slice(before).map((r) => `${r.user} ${r.scope} ${r.status}`)).toEqual([`${PULLER.username} repository:private/app:pull 200`]);
    expect(h.logs()).toContain(`"authKey":"${tokreg.host}/private"`);
    expectNoSecrets(h.logs(), refresh!);
    expect(accessLog(await settledLogs(tokreg)).filter((e) => e.userAgent === 'guestpull/cred-test' && e.status === 200).length).toBeGreaterThan(0);
  });
});
