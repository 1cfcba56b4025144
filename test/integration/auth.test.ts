/**
 * The distribution token flow against the real registry: docker-registry with `auth.token`
 * trusting the test token server. The daemon has no credentials, so it must follow the 401
 * challenge to the realm, get an anonymous pull token for the right scope, and reuse it.
 */
import { status as Status } from '@grpc/grpc-js';
import { mkdtemp, readdir, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startDaemon, type RunningDaemon } from '../helpers/daemon.js';
import { connectClient, type PullClient } from '../helpers/grpc-client.js';
import { buildImage, type BuiltImage } from '../helpers/image-builder.js';
import { pushImage } from '../helpers/push.js';
import { startRegistry, type RunningRegistry } from '../helpers/registry.js';
import { startTokenServer, type RunningTokenServer } from '../helpers/token-server.js';
import { removeTree } from '../helpers/cleanup.js';

const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const PUSHER = { username: 'pusher', password: 'pusher-secret' };

let tmp: string;
let tokens: RunningTokenServer;
let registry: RunningRegistry;
let daemon: RunningDaemon;
let client: PullClient;
let image: BuiltImage;
let digest: string;

beforeAll(async () => {
  tmp = await mkdtemp(path.join(os.tmpdir(), 'guestpull-auth-'));
  tokens = await startTokenServer({
    users: { [PUSHER.username]: PUSHER.password },
    // anonymous callers may pull public/* only
    grant: (user, scope) =>
      user ? ['pull', 'push'] : scope.name.startsWith('public/') ? scope.actions.filter((a) => a === 'pull') : [],
  });
  registry = await startRegistry({
    tokenAuth: { realm: tokens.realm, service: tokens.service, issuer: tokens.issuer, rootCertBundle: tokens.rootCertBundle },
  });
  image = await buildImage({
    layers: [[{ type: 'file', path: 'hello', content: 'behind token auth\n' }], [{ type: 'file', path: 'second', content: '2\n' }]],
    config: { Cmd: ['/hello'] },
  });
  digest = await pushImage(registry.url, 'public/app', 'v1', image, { auth: PUSHER });
  await pushImage(registry.url, 'private/app', 'v1', image, { auth: PUSHER });
  const cdh = path.join(tmp, 'cdh.toml');
  await writeFile(
    cdh,
    `[image]\nwork_dir = "${path.join(tmp, 'work')}"\n[[image.registry_config.registry]]\nlocation = "${registry.host}"\ninsecure = true\n`,
  );
  daemon = await startDaemon({ repoRoot, socket: path.join(tmp, 'cdh.sock'), config: cdh });
  client = connectClient(daemon.address);
}, 120_000);

afterAll(async () => {
  client?.close();
  await daemon?.stop();
  await registry?.stop();
  await tokens?.stop();
  if (tmp) await removeTree(tmp);
});

describe('anonymous bearer-token auth against the real registry', () => {
  it('follows the challenge, gets a pull token for the repository, and reuses it', async () => {
    const before = tokens.requests.length;
    const bundle = path.join(tmp, 'b1');
    const res = await client.pullImage(`${registry.host}/public/app:v1`, bundle);
    expect(res.manifest_digest).toBe(digest);
    expect((await readdir(path.join(bundle, 'rootfs'))).sort()).toEqual(['hello', 'second']);

    const mine = tokens.requests.slice(before);
    expect(mine.length).toBeGreaterThanOrEqual(1);
    for (const r of mine) {
      expect(r.user).toBeUndefined();
      expect(r.service).toBe(tokens.service);
      expect(r.scope).toContain('repository:public/app:pull');
      expect(r.status).toBe(200);
    }
    // manifest + config + 2 layers with one token: no token request per blob
    expect(mine.length).toBe(1);
  });

  it('a repository the anonymous token does not cover → UNAUTHENTICATED, nothing left behind', async () => {
    const bundle = path.join(tmp, 'b2');
    let err: { code: number; details: string } | undefined;
    try {
      await client.pullImage(`${registry.host}/private/app:v1`, bundle);
    } catch (e) {
      err = e as { code: number; details: string };
    }
    expect(err?.code).toBe(Status.UNAUTHENTICATED);
    expect(err?.details).toContain('private/app');
    expect(err?.details).toContain(registry.host);
    await expect(readdir(bundle)).rejects.toMatchObject({ code: 'ENOENT' });
  });
});
