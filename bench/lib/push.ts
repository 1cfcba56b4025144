/**
 * Pushes a cached benchmark image to a plain-HTTP loopback registry, streaming each blob from its
 * file (a 300 MB layer is never held in memory): POST an upload, PUT the file monolithically with
 * `digest=` to the returned Location, then PUT the manifest to the tag.
 */
import { createReadStream } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { Agent, request } from 'undici';
import { blobPath, type BlobRefT, type CachedImage } from './build.js';

async function expect(res: Awaited<ReturnType<typeof request>>, status: number, what: string): Promise<void> {
  if (res.statusCode === status) {
    await res.body.dump();
    return;
  }
  const text = await res.body.text().catch(() => '');
  throw new Error(`${what}: HTTP ${res.statusCode} (expected ${status}): ${text.slice(0, 1000)}`);
}

async function putBlob(base: string, repo: string, image: CachedImage, blob: BlobRefT, dispatcher: Agent): Promise<void> {
  const head = await request(`${base}/v2/${repo}/blobs/${blob.digest}`, { method: 'HEAD', dispatcher });
  await head.body.dump();
  if (head.statusCode === 200) return;
  const post = await request(`${base}/v2/${repo}/blobs/uploads/`, { method: 'POST', dispatcher });
  const location = post.headers['location'];
  await expect(post, 202, `start upload of ${blob.digest} to ${repo}`);
  if (typeof location !== 'string') throw new Error(`start upload of ${blob.digest} to ${repo}: 202 without one Location header`);
  const target = new URL(location, base + '/');
  target.searchParams.set('digest', blob.digest);
  const put = await request(target, {
    method: 'PUT',
    headers: { 'content-type': 'application/octet-stream', 'content-length': String(blob.size) },
    body: createReadStream(blobPath(image, blob.digest)),
    dispatcher,
  });
  await expect(put, 201, `upload of ${blob.digest} (${blob.size} bytes) to ${repo}`);
}

/** Pushes `image` as `<repo>:<tag>` to the registry at `baseUrl` (http://127.0.0.1:PORT). */
export async function pushCachedImage(baseUrl: string, repo: string, tag: string, image: CachedImage): Promise<void> {
  const dispatcher = new Agent({ bodyTimeout: 600_000, headersTimeout: 600_000 });
  try {
    for (const blob of [...image.layers, image.config]) await putBlob(baseUrl, repo, image, blob, dispatcher);
    const manifest = await readFile(blobPath(image, image.manifest.digest));
    const res = await request(`${baseUrl}/v2/${repo}/manifests/${tag}`, {
      method: 'PUT',
      headers: { 'content-type': image.manifest.mediaType },
      body: manifest,
      dispatcher,
    });
    const echoed = res.headers['docker-content-digest'];
    await expect(res, 201, `PUT manifest ${repo}:${tag}`);
    if (typeof echoed === 'string' && echoed !== image.manifest.digest) throw new Error(`registry stored ${repo}:${tag} as ${echoed}, expected ${image.manifest.digest}`);
  } finally {
    await dispatcher.close();
  }
}
