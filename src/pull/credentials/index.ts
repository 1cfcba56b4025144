/**
 * Registry credentials for a pull: loaded once from the auth.json that cdh.toml gives (inline
 * `authenticated_registry_credentials` wins over `authenticated_registry_credentials_uri`), then
 * looked up per candidate location. A mirror or remapped location gets the credentials of ITS
 * registry and repository, never those of the image's original registry. Lookup: the longest key
 * `registry/path` whose path is the repository or one of its leading components, then the
 * registry-wide key. The key that matched travels with the credentials so messages can name it;
 * the secrets never reach a message or a log line. For an override-path mirror (Harbor project
 * URL) the lookup uses the mirror's host and the repository below the project path.
 */
import type { Config } from '../../config/index.js';
import { ErrorCode, GuestpullError } from '../../errors.js';
import type { Logger } from '../../log.js';
import { normalizeRegistry } from '../../reference.js';
import type { Credentials } from '../distribution/index.js';
import { MAX_AUTH_FILE_BYTES, parseAuthFile, type AuthEntry } from './authfile.js';
import { readResource } from './resource.js';

export { normaliseAuthKey, parseAuthFile, MAX_AUTH_FILE_BYTES, type AuthEntry, type AuthFile } from './authfile.js';
export { readResource, resourcePath, type Resource, type ResourceRequest } from './resource.js';

export interface CredentialMatch {
  /** The auth.json key as written, e.g. `127.0.0.1:5000/private`. */
  key: string;
  credentials: Credentials;
}

const URI_KEY = '[image] authenticated_registry_credentials_uri';
const INLINE_KEY = '[image] authenticated_registry_credentials';

export class CredentialStore {
  constructor(
    private readonly entries: readonly AuthEntry[],
    /** Where the entries came from, for messages (`auth.json file /etc/auth.json`). */
    readonly source: string,
  ) {}

  static empty(): CredentialStore {
    return new CredentialStore([], 'no auth.json configured');
  }

  get size(): number {
    return this.entries.length;
  }

  /** The keys, as written (not secret). */
  keys(): string[] {
    return this.entries.map((e) => e.key);
  }

  /** Credentials for `repository` on `registry` (`host[:port]`, any case, Docker Hub aliases allowed). */
  lookup(registry: string, repository: string): CredentialMatch | undefined {
    const reg = normalizeRegistry(registry.toLowerCase());
    let best: AuthEntry | undefined;
    for (const e of this.entries) {
      if (e.registry !== reg) continue;
      if (e.path !== '' && repository !== e.path && !repository.startsWith(`${e.path}/`)) continue;
      // Longer path wins; on a tie (legacy and canonical spellings of one key) the canonical one, then the first.
      if (best === undefined || e.path.length > best.path.length || (e.path.length === best.path.length && e.canonical && !best.canonical)) {
        best = e;
      }
    }
    return best && { key: best.key, credentials: best.credentials };
  }
}

/** Load the auth.json cdh.toml names (inline text or URI); an empty store when it names none. */
export function loadCredentials(image: Config['image'], logger: Logger): CredentialStore {
  const inline = image.authenticatedRegistryCredentials;
  const uri = image.authenticatedRegistryCredentialsUri;
  let source: string;
  let text: string;
  if (inline !== undefined && inline.trim() !== '') {
    if (uri !== undefined && uri !== '') {
      logger.info({ uri }, `${URI_KEY} is ignored: the inline ${INLINE_KEY} takes precedence`);
    }
    source = `inline ${INLINE_KEY}`;
    text = inline;
  } else if (uri !== undefined && uri !== '') {
    const r = readResource({
      uri,
      key: URI_KEY,
      maxBytes: MAX_AUTH_FILE_BYTES,
      kbsAdvice: `put the auth.json inline in ${INLINE_KEY}, or use a file:///path URI`,
    });
    source = `auth.json file ${r.file}`;
    text = r.text;
  } else {
    return CredentialStore.empty();
  }
  const parsed = parseAuthFile(text, source);
  for (const n of parsed.notes) logger.warn(n);
  const store = new CredentialStore(parsed.entries, source);
  logger.info({ source, keys: store.keys() }, 'registry credentials loaded');
  return store;
}

/**
 * The error to report when a location refused us. With credentials, the message names the
 * auth.json key that was used, so an operator knows which entry to fix; without, it says that no
 * key matched this location (when an auth.json is configured at all).
 */
export function explainAuthFailure(
  e: GuestpullError,
  match: CredentialMatch | undefined,
  where: { registry: string; repository: string; origin: string },
  store: CredentialStore,
): GuestpullError {
  if (e.code !== ErrorCode.UNAUTHENTICATED && e.code !== ErrorCode.PERMISSION_DENIED) return e;
  let message: string;
  if (match) {
    const key = `auth.json key ${JSON.stringify(match.key)} (${store.source})`;
    message =
      e.code === ErrorCode.UNAUTHENTICATED
        ? `credentials from ${key} were rejected by ${where.origin} for ${where.repository}: ${e.message}`
        : `access to ${where.repository} at ${where.origin} with credentials from ${key} was denied: ${e.message}`;
  } else if (store.size > 0) {
    message = `${e.message} (no key of the ${store.source} matches ${where.registry}/${where.repository})`;
  } else {
    return e;
  }
  return new GuestpullError(e.code, message, { ...e.context, ...(match ? { authKey: match.key } : {}) }, { cause: e });
}
