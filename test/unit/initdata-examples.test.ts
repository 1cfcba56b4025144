/**
 * Every document in initdata-examples/ is valid init-data (header and whole document), its digest
 * for each algorithm equals `openssl dgst` of the file, and its cdh.toml loads with the real
 * configuration parser without a single warning. The README explains each one.
 */
import { execFileSync } from 'node:child_process';
import { readFile, readdir } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { parseConfig } from '../../src/config/index.js';
import { initdataDigest, parseInitdataDocument, parseInitdataHeader, type InitdataAlgorithm } from '../../src/initdata/index.js';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const dir = path.join(root, 'initdata-examples');

const EXPECTED = [
  'image-pull-proxy.toml',
  'local-http-registry.toml',
  'local-https-registry.toml',
  'proxy-service-credentials.toml',
  'pull-through-cache.toml',
];

function opensslDigest(file: string, algorithm: InitdataAlgorithm): string {
  const out = execFileSync('openssl', ['dgst', `-${algorithm}`, '-r', file], { encoding: 'utf8' });
  const hex = out.split(/\s/)[0]!;
  expect(hex).toMatch(/^[0-9a-f]+$/);
  return hex;
}

async function load(name: string) {
  const file = path.join(dir, name);
  const raw = await readFile(file);
  const doc = parseInitdataDocument(raw, file);
  const cdh = doc.data['cdh.toml'];
  if (cdh === undefined) throw new Error(`${name} has no cdh.toml`);
  return { file, raw, doc, loaded: parseConfig(cdh, `${name} cdh.toml`) };
}

describe('initdata-examples/', () => {
  it('holds exactly the documented examples', async () => {
    expect((await readdir(dir)).sort()).toEqual(EXPECTED);
    const readme = await readFile(path.join(root, 'README.md'), 'utf8');
    for (const name of EXPECTED) expect(readme, name).toContain(`\`${name}\``);
  });

  describe.each(EXPECTED)('%s', (name) => {
    it('parses as init-data: header and document, with cdh.toml', async () => {
      const { raw, file, doc } = await load(name);
      const header = parseInitdataHeader(raw, file);
      expect(header.version).toBe('0.1.0');
      expect(doc.algorithm).toBe(header.algorithm);
      expect(doc.raw.equals(raw)).toBe(true);
      expect(Object.keys(doc.data)).toContain('cdh.toml');
      expect(Object.keys(doc.data)).toContain('aa.toml');
      for (const v of Object.values(doc.data)) expect(typeof v).toBe('string');
    });

    it('digests equal openssl dgst of the file, for all three algorithms', async () => {
      const { raw, file, doc } = await load(name);
      for (const alg of ['sha256', 'sha384', 'sha512'] as const) {
        expect(initdataDigest(raw, alg).toString('hex'), alg).toBe(opensslDigest(file, alg));
      }
      expect(initdataDigest(raw, doc.algorithm).length).toBe({ sha256: 32, sha384: 48, sha512: 64 }[doc.algorithm]);
    });

    it('its cdh.toml loads with no warnings', async () => {
      const { loaded } = await load(name);
      expect(loaded.warnings).toEqual([]);
      expect(loaded.hasImageSection).toBe(true);
    });
  });

  it('each example configures what it is named after', async () => {
    const proxy = (await load('image-pull-proxy.toml')).loaded.config.image;
    expect(proxy.imagePullProxy).toEqual({ httpsProxy: 'http://127.0.0.1:5432', httpProxy: 'http://127.0.0.1:5432', noProxy: '192.168.0.1,localhost' });

    const https = (await load('local-https-registry.toml')).loaded.config.image;
    expect(https.extraRootCertificates).toHaveLength(1);
    const pem = https.extraRootCertificates[0]!;
    const text = execFileSync('openssl', ['x509', '-noout', '-subject', '-ext', 'basicConstraints'], { input: pem, encoding: 'utf8' });
    expect(text).toMatch(/throwaway CA/);
    expect(text).toMatch(/CA:TRUE/);

    const http = (await load('local-http-registry.toml')).loaded.config.image.registryConfig;
    expect(http?.registries).toEqual([expect.objectContaining({ location: '192.168.122.1:5000', insecure: true, mirrors: [] })]);

    const cache = (await load('pull-through-cache.toml')).loaded.config.image.registryConfig;
    const byPrefix = new Map(cache?.registries.map((r) => [r.prefix, r]));
    expect([...byPrefix.keys()].sort()).toEqual(['docker.io', 'gcr.io', 'ghcr.io', 'registry.k8s.io']);
    for (const r of byPrefix.values()) {
      expect(r.location).toBe(r.prefix);
      expect(r.mirrors[0]).toMatchObject({ insecure: true, overridePath: false });
      expect(r.mirrors[0]!.location).toMatch(/^10\.5\.0\.1:500\d$/);
    }
    expect(byPrefix.get('docker.io')?.mirrors[1]).toMatchObject({ location: 'http://harbor.local/v2/proxy-docker.io', overridePath: true });

    const svc = (await load('proxy-service-credentials.toml')).loaded.config.image;
    expect(svc.registryConfig?.registries).toEqual([
      expect.objectContaining({ prefix: 'quay.io/my-org', location: 'proxy.replicated.com/proxy/my-app/quay.io/my-org' }),
    ]);
    const auths = (JSON.parse(svc.authenticatedRegistryCredentials ?? '{}') as { auths: Record<string, { auth: string }> }).auths;
    const entry = auths['proxy.replicated.com'];
    expect(entry).toBeDefined();
    expect(Buffer.from(entry!.auth, 'base64').toString()).toMatch(/^[^:]+:.+$/);
  });
});
