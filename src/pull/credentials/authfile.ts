/**
 * auth.json (containers-auth.json(5), Docker's config.json `auths`): parsed with zod at the edge
 * into typed entries, one per key, each with its key normalised to `registry[/repository-path]`.
 *
 * `{"auths": {"<registry>[/<repo>]": {"auth": base64("user:pass") | "username"+"password" |
 * "identitytoken"}}}`. An `identitytoken` wins (OAuth2 refresh token), then `auth`, then
 * `username`/`password`. Keys may be written in Docker's legacy forms (`https://index.docker.io/v1/`):
 * an `http(s)://` scheme and a trailing `/v1` or `/v2` are dropped, and Docker Hub's aliases
 * (`index.docker.io`, `registry-1.docker.io`) become `docker.io`. Messages name keys, never values.
 */
import { z } from 'zod';
import { ErrorCode, GuestpullError } from '../../errors.js';
import { isValidDomain, isValidRepositoryPath, normalizeRegistry } from '../../reference.js';
import type { Credentials } from '../distribution/index.js';

/** An auth.json is a few KiB; refuse anything absurd before parsing it. */
export const MAX_AUTH_FILE_BYTES = 1024 * 1024;

export interface AuthEntry {
  /** The key exactly as written in the file (not secret: used in messages and logs). */
  key: string;
  /** Normalised `host[:port]`, lowercase, `docker.io` for Docker Hub. */
  registry: string;
  /** Repository path prefix; `''` for a registry-wide entry. */
  path: string;
  credentials: Credentials;
  /** True when the key was written in its normalised form (it beats a legacy spelling of the same key). */
  canonical: boolean;
}

export interface AuthFile {
  entries: AuthEntry[];
  /** Things worth a warning: keys without any credential, credential helpers that are not run. */
  notes: string[];
}

const Entry = z.looseObject({
  auth: z.string().optional(),
  username: z.string().optional(),
  password: z.string().optional(),
  identitytoken: z.string().optional(),
});

const Document = z.looseObject({
  auths: z.record(z.string(), Entry).optional(),
  credHelpers: z.record(z.string(), z.unknown()).optional(),
  credsStore: z.unknown().optional(),
});

const BASE64 = /^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=|[A-Za-z0-9+/]{2,3})?$/;

function keyText(key: string): string {
  return JSON.stringify(key.length > 200 ? `${key.slice(0, 200)}…` : key);
}

/**
 * `registry[/path]` for an auth.json key; throws an Error saying what is wrong. A scheme
 * (`https://`) and a trailing `/v1` or `/v2` (Docker's legacy index keys) are dropped.
 */
export function normaliseAuthKey(key: string): { registry: string; path: string } {
  if (/[\s\u0000-\u001f\u007f]/.test(key)) throw new Error('contains whitespace or control characters');
  let rest = key;
  const scheme = /^https?:\/\//i.exec(rest);
  if (scheme) rest = rest.slice(scheme[0].length);
  // Docker's legacy keys end in /v1/ (the index) or /v2/; with a scheme the slash may be missing.
  rest = rest.replace(scheme ? /\/v[12]\/*$/ : /\/v[12]\/+$/, '').replace(/\/+$/, '');
  const slash = rest.indexOf('/');
  const host = slash < 0 ? rest : rest.slice(0, slash);
  const path = slash < 0 ? '' : rest.slice(slash + 1);
  if (!isValidDomain(host)) throw new Error(`${JSON.stringify(host)} is not a registry host[:port]`);
  if (path !== '' && !isValidRepositoryPath(path)) {
    throw new Error(`repository path ${JSON.stringify(path)} is invalid (lowercase components separated by /)`);
  }
  return { registry: normalizeRegistry(host.toLowerCase()), path };
}

function decodeAuth(auth: string): { username: string; password: string } {
  const compact = auth.trim();
  if (!BASE64.test(compact)) throw new Error('"auth" is not base64');
  let text: string;
  try {
    text = new TextDecoder('utf-8', { fatal: true }).decode(Buffer.from(compact, 'base64'));
  } catch {
    throw new Error('"auth" does not decode to UTF-8 text');
  }
  const colon = text.indexOf(':');
  if (colon <= 0) throw new Error('"auth" must be base64 of "username:password"');
  return { username: text.slice(0, colon), password: text.slice(colon + 1) };
}

/** The credentials of one entry, or undefined when it carries none (Docker writes `{}` with a credsStore). */
function credentialsOf(e: z.output<typeof Entry>): Credentials | undefined {
  if (e.identitytoken !== undefined && e.identitytoken !== '') return { identityToken: e.identitytoken };
  if (e.auth !== undefined && e.auth !== '') return decodeAuth(e.auth);
  if (e.username !== undefined && e.username !== '') {
    if (e.username.includes(':')) throw new Error('"username" must not contain ":"');
    if (e.password === undefined) throw new Error('"username" without "password"');
    return { username: e.username, password: e.password };
  }
  if (e.password !== undefined && e.password !== '') throw new Error('"password" without "username"');
  return undefined;
}

function bad(source: string, why: string): GuestpullError {
  return new GuestpullError(ErrorCode.CONFIG, `invalid auth.json in ${source}: ${why}`, { source });
}

/** Parse an auth.json text; `source` names it in messages. Throws CONFIG naming the bad key. */
export function parseAuthFile(text: string, source: string): AuthFile {
  if (Buffer.byteLength(text, 'utf8') > MAX_AUTH_FILE_BYTES) {
    throw bad(source, `it is larger than ${MAX_AUTH_FILE_BYTES} bytes`);
  }
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (e) {
    // V8's message may quote the text around the error, which may be a secret: keep the position only.
    const at = /position (\d+)/.exec(e instanceof Error ? e.message : '')?.[1];
    throw bad(source, `it is not valid JSON${at !== undefined ? ` (error at character ${at})` : ''}`);
  }
  const doc = Document.safeParse(raw);
  if (!doc.success) {
    const lines = doc.error.issues.slice(0, 5).map((i) => {
      const where = i.path.map((p) => (typeof p === 'number' ? `[${p}]` : `[${JSON.stringify(String(p))}]`)).join('');
      return `${where || '(document)'}: ${i.message}`;
    });
    throw bad(source, `${lines.join('; ')}; expected {"auths": {"<registry>[/<repository>]": {"auth": "<base64 of user:password>"}}}`);
  }
  const notes: string[] = [];
  if (doc.data.credsStore !== undefined || doc.data.credHelpers !== undefined) {
    notes.push(`${source} names credential helpers (credsStore / credHelpers); guestpull does not run them and uses only the "auths" entries`);
  }
  const entries: AuthEntry[] = [];
  for (const [key, value] of Object.entries(doc.data.auths ?? {})) {
    let norm: { registry: string; path: string };
    let credentials: Credentials | undefined;
    try {
      norm = normaliseAuthKey(key);
      credentials = credentialsOf(value);
    } catch (e) {
      throw bad(source, `key ${keyText(key)}: ${e instanceof Error ? e.message : String(e)}`);
    }
    if (credentials === undefined) {
      notes.push(`auth.json key ${keyText(key)} in ${source} has no "auth", "username"/"password" or "identitytoken"; ignored`);
      continue;
    }
    const written = norm.path === '' ? norm.registry : `${norm.registry}/${norm.path}`;
    entries.push({ key, ...norm, credentials, canonical: key === written });
  }
  return { entries, notes };
}
