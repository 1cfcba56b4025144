/**
 * Resources that cdh.toml names by URI (the confidential data hub's resource URIs): the auth.json
 * of `authenticated_registry_credentials_uri` and the registries.conf of
 * `registry_configuration_uri`. `file:///abs/path` is read from the guest's filesystem, whole and
 * bounded; `kbs:///…` (key broker) is not supported yet and says so; anything else is a
 * configuration error. Read synchronously: this runs once, when the Puller is created.
 */
import { closeSync, fstatSync, openSync, readSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { ErrorCode, GuestpullError } from '../../errors.js';

export interface ResourceRequest {
  /** The URI as written in cdh.toml (or on the kernel command line). */
  uri: string;
  /** The cdh.toml key that named it, e.g. `[image] registry_configuration_uri`. */
  key: string;
  /** Upper bound on the resource's size. */
  maxBytes: number;
  /** What to do instead of a kbs:// URI (sentence tail). */
  kbsAdvice: string;
}

export interface Resource {
  /** The file the text came from. */
  file: string;
  text: string;
}

function shown(uri: string): string {
  return JSON.stringify(uri.length > 200 ? `${uri.slice(0, 200)}…` : uri);
}

/** The local path a `file://` URI names; CONFIG when the URI is anything else. */
export function resourcePath(req: Pick<ResourceRequest, 'uri' | 'key' | 'kbsAdvice'>): string {
  const { uri, key } = req;
  const scheme = /^([A-Za-z][A-Za-z0-9+.-]*):/.exec(uri)?.[1]?.toLowerCase();
  if (scheme === 'kbs') {
    throw new GuestpullError(
      ErrorCode.CONFIG,
      `${key} = ${shown(uri)}: key-broker (kbs://) resources are not supported yet; ${req.kbsAdvice}`,
      { source: key },
    );
  }
  if (scheme !== 'file') {
    throw new GuestpullError(
      ErrorCode.CONFIG,
      `${key} = ${shown(uri)} is not a supported URI: use file:///absolute/path (kbs:// is not supported yet)`,
      { source: key },
    );
  }
  let file: string;
  try {
    if (!/^file:\/\//i.test(uri)) throw new Error('not file://');
    const url = new URL(uri);
    if (url.search !== '' || url.hash !== '') throw new Error('query or fragment');
    file = fileURLToPath(url);
  } catch {
    throw new GuestpullError(
      ErrorCode.CONFIG,
      `${key} = ${shown(uri)} is not a valid file URI: write file:///absolute/path (three slashes, no host, no query)`,
      { source: key },
    );
  }
  if (!path.isAbsolute(file)) {
    throw new GuestpullError(ErrorCode.CONFIG, `${key} = ${shown(uri)} must name an absolute path`, { source: key });
  }
  return file;
}

/** Read the resource a URI names: the whole file, at most `maxBytes`, as UTF-8 text. */
export function readResource(req: ResourceRequest): Resource {
  const file = resourcePath(req);
  const fail = (why: string): GuestpullError =>
    new GuestpullError(ErrorCode.CONFIG, `${req.key}: cannot use ${file}: ${why}`, { source: req.key });
  let fd: number;
  try {
    fd = openSync(file, 'r');
  } catch (e) {
    throw fail(`${(e as NodeJS.ErrnoException).code ?? String(e)}; check that the file exists and is readable`);
  }
  try {
    const st = fstatSync(fd);
    if (!st.isFile()) throw fail('it is not a regular file');
    if (st.size > req.maxBytes) throw fail(`it is ${st.size} bytes, more than the ${req.maxBytes} allowed`);
    // Read one byte more than allowed, so a file that grows while we read is still caught.
    const buf = Buffer.alloc(req.maxBytes + 1);
    let n = 0;
    for (;;) {
      const got = readSync(fd, buf, n, buf.length - n, null);
      if (got === 0) break;
      n += got;
      if (n > req.maxBytes) throw fail(`it is more than the ${req.maxBytes} bytes allowed`);
    }
    try {
      return { file, text: new TextDecoder('utf-8', { fatal: true }).decode(buf.subarray(0, n)) };
    } catch {
      throw fail('it is not valid UTF-8');
    }
  } catch (e) {
    if (e instanceof GuestpullError) throw e;
    throw fail((e as NodeJS.ErrnoException).code ?? String(e));
  } finally {
    closeSync(fd);
  }
}
