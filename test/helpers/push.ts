/**
 * Test helper: pushes built images to a registry over the distribution API. Blobs: HEAD (skip
 * when present), POST an upload, PUT the bytes monolithically to the returned Location (relative
 * or absolute) with `digest=`. Manifests: PUT with their media type as Content-Type, to the tag
 * or (index children) to the digest. Answers a Basic or Bearer challenge when credentials are given.
 */
import { Agent, fetch, type Response } from 'undici';
import type { BuiltBlob, BuiltImage, BuiltIndex } from './image-builder.js';

export interface PushOptions {
  auth?: { username: string; password: string };
  /** Extra CA (PEM) to trust for an https registry. */
  ca?: string | Buffer;
}

interface Session {
  base: string;
  repository: string;
  opts: PushOptions;
  authorization?: string;
  dispatcher?: Agent;
}

function session(registryUrl: string, repository: string, opts: PushOptions = {}): Session {
  const s: Session = { base: registryUrl.replace(/\/+$/, ''), repository, opts };
  if (opts.ca !== undefined) s.dispatcher = new Agent({ connect: { ca: opts.ca } });
  return s;
}

function parseChallenge(header: string): { scheme: string; params: Record<string, string> } {
  const m = /^\s*(\w+)\s*(.*)$/s.exec(header);
  const params: Record<string, string> = {};
  if (!m) return { scheme: '', params };
  for (const p of m[2]!.matchAll(/(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))/g)) params[p[1]!.toLowerCase()] = p[2] ?? p[3] ?? '';
  return { scheme: m[1]!.toLowerCase(), params };
}

async function answerChallenge(s: Session, res: Response): Promise<boolean> {
  const auth = s.opts.auth;
  const header = res.headers.get('www-authenticate');
  if (!auth || !header) return false;
  const basic = 'Basic ' + Buffer.from(`${auth.username}:${auth.password}`).toString('base64');
  const { scheme, params } = parseChallenge(header);
  if (scheme === 'basic') {
    s.authorization = basic;
    return true;
  }
  if (scheme !== 'bearer' || !params['realm']) return false;
  const url = new URL(params['realm']);
  if (params['service']) url.searchParams.set('service', params['service']);
  url.searchParams.set('scope', `repository:${s.repository}:pull,push`);
  const tr = await fetch(url, { headers: { authorization: basic }, ...(s.dispatcher ? { dispatcher: s.dispatcher } : {}) });
  const body = await tr.text();
  if (tr.status !== 200) throw new Error(`token request to ${url.origin}${url.pathname} failed: HTTP ${tr.status}: ${body.slice(0, 500)}`);
  const parsed: unknown = JSON.parse(body);
  const token = typeof parsed === 'object' && parsed !== null ? ((parsed as Record<string, unknown>)['token'] ?? (parsed as Record<string, unknown>)['access_token']) : undefined;
  if (typeof token !== 'string') throw new Error(`token response from ${url.origin} has no token`);
  s.authorization = `Bearer ${token}`;
  return true;
}

/** One request, retried once after answering a 401 challenge. */
async function call(s: Session, method: string, url: string, headers: Record<string, string> = {}, body?: Buffer): Promise<Response> {
  for (let attempt = 0; ; attempt++) {
    const res = await fetch(url, {
      method,
      headers: { ...headers, ...(s.authorization ? { authorization: s.authorization } : {}) },
      ...(body !== undefined ? { body } : {}),
      redirect: 'manual',
      ...(s.dispatcher ? { dispatcher: s.dispatcher } : {}),
    });
    if (res.status === 401 && attempt === 0 && (await answerChallenge(s, res))) {
      await res.body?.cancel();
      continue;
    }
    return res;
  }
}

async function expectStatus(res: Response, ok: number[], what: string): Promise<void> {
  if (ok.includes(res.status)) return;
  const text = await res.text().catch(() => '');
  throw new Error(`${what}: HTTP ${res.status}: ${text.slice(0, 2000)}`);
}

async function putBlob(s: Session, blob: BuiltBlob): Promise<void> {
  const name = s.repository;
  const head = await call(s, 'HEAD', `${s.base}/v2/${name}/blobs/${blob.digest}`);
  await head.body?.cancel();
  if (head.status === 200) return;
  const post = await call(s, 'POST', `${s.base}/v2/${name}/blobs/uploads/`);
  await expectStatus(post, [202], `start upload of ${blob.digest} to ${name}`);
  await post.body?.cancel();
  const location = post.headers.get('location');
  if (!location) throw new Error(`start upload of ${blob.digest} to ${name}: 202 without Location`);
  const target = new URL(location, s.base + '/');
  target.searchParams.set('digest', blob.digest);
  const put = await call(s, 'PUT', target.toString(), { 'content-type': 'application/octet-stream' }, blob.bytes);
  await expectStatus(put, [201], `upload of ${blob.digest} (${blob.size} bytes) to ${name}`);
  await put.body?.cancel();
}

async function putManifest(s: Session, ref: string, manifest: BuiltBlob): Promise<string> {
  const res = await call(s, 'PUT', `${s.base}/v2/${s.repository}/manifests/${ref}`, { 'content-type': manifest.mediaType }, manifest.bytes);
  await expectStatus(res, [201], `PUT manifest ${s.repository}:${ref} (${manifest.mediaType})`);
  await res.body?.cancel();
  const echoed = res.headers.get('docker-content-digest');
  if (echoed && echoed !== manifest.digest) throw new Error(`registry stored ${s.repository}:${ref} as ${echoed}, expected ${manifest.digest}`);
  return manifest.digest;
}

async function closeSession(s: Session): Promise<void> {
  await s.dispatcher?.close();
}

async function pushImageIn(s: Session, tag: string | undefined, image: BuiltImage): Promise<string> {
  for (const layer of image.layers) await putBlob(s, layer);
  await putBlob(s, image.config);
  return await putManifest(s, tag ?? image.manifest.digest, image.manifest);
}

export async function pushBlob(registryUrl: string, repository: string, blob: BuiltBlob, opts: PushOptions = {}): Promise<void> {
  const s = session(registryUrl, repository, opts);
  try {
    await putBlob(s, blob);
  } finally {
    await closeSession(s);
  }
}

/** Pushes layers, config and manifest; with no tag the manifest is put by digest. Returns the manifest digest. */
export async function pushImage(registryUrl: string, repository: string, tag: string | undefined, image: BuiltImage, opts: PushOptions = {}): Promise<string> {
  const s = session(registryUrl, repository, opts);
  try {
    return await pushImageIn(s, tag, image);
  } finally {
    await closeSession(s);
  }
}

/** Pushes every child image by digest, then the index to the tag. Returns the index digest. */
export async function pushIndex(registryUrl: string, repository: string, tag: string, index: BuiltIndex, opts: PushOptions = {}): Promise<string> {
  const s = session(registryUrl, repository, opts);
  try {
    for (const image of index.images) await pushImageIn(s, undefined, image);
    return await putManifest(s, tag, index.index);
  } finally {
    await closeSession(s);
  }
}
