/**
 * Registry authentication: answer a 401's WWW-Authenticate challenge. `Bearer` → fetch a token
 * from the realm (Docker token spec: GET with optional Basic credentials; OAuth2 POST
 * grant_type=refresh_token for identity tokens), cache it per realm+service+scope until shortly
 * before it expires; `Basic` → send the configured username/password. The token realm must be
 * https, except for a plain-http registry whose realm is on the same host. Tokens never go to logs.
 */
import { z } from 'zod';
import { ErrorCode, GuestpullError } from '../../errors.js';
import type { Logger } from '../../log.js';
import { challengesOf, type Challenge } from './challenge.js';
import { loggableUrl, type HttpResponse, type Transport } from './transport/index.js';
import { readBounded } from './verify.js';

export type Credentials = { username: string; password: string } | { identityToken: string };

export interface AuthenticatorOptions {
  transport: Transport;
  logger: Logger;
  /** The registry API base; its origin is where Authorization goes. */
  registry: URL;
  repository: string;
  image: string;
  credentials?: Credentials;
  tokenBodyBytes: number;
  /** Clock, for tests. */
  now?: () => number;
}

const TokenResponse = z.object({
  token: z.string().optional(),
  access_token: z.string().optional(),
  expires_in: z.number().optional(),
});

/** Default token lifetime when the server does not say (Docker token spec: 60 s). */
const DEFAULT_TTL_S = 60;
const MAX_MARGIN_MS = 10_000;
/** Upper bound on how long we keep any token, whatever the server says. */
const MAX_TTL_S = 3600;

interface CachedToken {
  token: string;
  expiresAt: number;
}

type Scheme = { kind: 'bearer'; realm: URL; service?: string; scope: string } | { kind: 'basic' };

export class Authenticator {
  private readonly cache = new Map<string, CachedToken>();
  private readonly pending = new Map<string, Promise<CachedToken>>();
  private scheme: Scheme | undefined;
  private readonly now: () => number;

  constructor(private readonly opts: AuthenticatorOptions) {
    this.now = opts.now ?? Date.now;
  }

  private get where(): string {
    return `${this.opts.repository} at ${this.opts.registry.origin} (image ${this.opts.image})`;
  }

  /** The Authorization header to send before any challenge, from what earlier challenges taught us. */
  async authorization(signal?: AbortSignal): Promise<string | undefined> {
    return this.scheme ? this.headerFor(this.scheme, false, signal) : undefined;
  }

  /**
   * A 401 arrived carrying `wwwAuthenticate`; `sent` is the Authorization we had sent with it.
   * Returns the Authorization to retry with, or throws UNAUTHENTICATED when there is no way to.
   */
  async answer(wwwAuthenticate: string | string[] | undefined, sent: string | undefined, signal?: AbortSignal): Promise<string> {
    const scheme = this.pick(challengesOf(wwwAuthenticate));
    this.scheme = scheme;
    return this.headerFor(scheme, sent !== undefined, signal);
  }

  /** Message tail for a 401 that persisted after we answered the challenge. */
  refusalHint(): string {
    const c = this.opts.credentials;
    if (!c) {
      return 'anonymous access was refused (or the repository does not exist); configure credentials for it in the auth.json named by [image] authenticated_registry_credentials_uri';
    }
    return 'the registry rejected the configured credentials; check them in the auth.json named by [image] authenticated_registry_credentials_uri';
  }

  private pick(challenges: Challenge[]): Scheme {
    const bearer = challenges.find((c) => c.scheme === 'bearer');
    if (bearer) {
      const realmText = bearer.params.realm;
      if (!realmText) {
        throw new GuestpullError(ErrorCode.UNAUTHENTICATED, `registry ${this.where} sent a Bearer challenge without a realm`, {
          image: this.opts.image,
          endpoint: this.opts.registry.origin,
        });
      }
      const realm = this.checkRealm(realmText);
      const scope = bearer.params.scope ?? `repository:${this.opts.repository}:pull`;
      return { kind: 'bearer', realm, scope, ...(bearer.params.service !== undefined ? { service: bearer.params.service } : {}) };
    }
    if (challenges.some((c) => c.scheme === 'basic')) {
      const c = this.opts.credentials;
      if (!c || !('username' in c)) {
        throw new GuestpullError(
          ErrorCode.UNAUTHENTICATED,
          `registry ${this.where} requires a username and password (Basic auth)${c ? '; an identity token cannot answer a Basic challenge' : ''}; configure them in the auth.json named by [image] authenticated_registry_credentials_uri`,
          { image: this.opts.image, endpoint: this.opts.registry.origin },
        );
      }
      return { kind: 'basic' };
    }
    const schemes = challenges.map((c) => c.scheme).join(', ') || 'none';
    throw new GuestpullError(
      ErrorCode.UNAUTHENTICATED,
      `registry ${this.where} answered 401 without a usable WWW-Authenticate challenge (schemes: ${schemes}); only Bearer and Basic are supported`,
      { image: this.opts.image, endpoint: this.opts.registry.origin },
    );
  }

  private checkRealm(text: string): URL {
    let realm: URL;
    try {
      realm = new URL(text);
    } catch {
      throw new GuestpullError(ErrorCode.UNAUTHENTICATED, `registry ${this.where} named an invalid token realm ${JSON.stringify(text.slice(0, 200))}`, {
        image: this.opts.image,
        endpoint: this.opts.registry.origin,
      });
    }
    const reg = this.opts.registry;
    const ok =
      realm.protocol === 'https:' || (realm.protocol === 'http:' && reg.protocol === 'http:' && realm.hostname === reg.hostname);
    if (!ok) {
      throw new GuestpullError(
        ErrorCode.PERMISSION_DENIED,
        `refused token realm ${loggableUrl(realm)} named by ${reg.origin}: a token realm must use https (plain http only on the same host as a plain-http registry)`,
        { image: this.opts.image, endpoint: reg.origin },
      );
    }
    return realm;
  }

  private async headerFor(scheme: Scheme, refresh: boolean, signal?: AbortSignal): Promise<string> {
    if (scheme.kind === 'basic') {
      const c = this.opts.credentials as { username: string; password: string };
      return `Basic ${Buffer.from(`${c.username}:${c.password}`, 'utf8').toString('base64')}`;
    }
    const key = `${scheme.realm.href} ${scheme.service ?? ''} ${scheme.scope}`;
    if (refresh) this.cache.delete(key);
    const cached = this.cache.get(key);
    if (cached && cached.expiresAt > this.now()) return `Bearer ${cached.token}`;
    let p = this.pending.get(key);
    if (!p) {
      p = this.fetchToken(scheme, signal).finally(() => this.pending.delete(key));
      this.pending.set(key, p);
    }
    const t = await p;
    this.cache.set(key, t);
    return `Bearer ${t.token}`;
  }

  private async fetchToken(s: Extract<Scheme, { kind: 'bearer' }>, signal?: AbortSignal): Promise<CachedToken> {
    const started = this.now();
    const url = new URL(s.realm);
    const scopes = s.scope.split(' ').filter((x) => x !== '');
    const c = this.opts.credentials;
    const headers: Record<string, string> = { accept: 'application/json' };
    let res: HttpResponse;
    if (c && 'identityToken' in c) {
      const form = new URLSearchParams({ grant_type: 'refresh_token', refresh_token: c.identityToken, client_id: 'guestpull' });
      if (s.service !== undefined) form.set('service', s.service);
      form.set('scope', scopes.join(' '));
      headers['content-type'] = 'application/x-www-form-urlencoded';
      res = await this.opts.transport.request({ url: url.href, method: 'POST', headers, body: form.toString(), ...(signal ? { signal } : {}) });
    } else {
      if (s.service !== undefined) url.searchParams.append('service', s.service);
      for (const sc of scopes) url.searchParams.append('scope', sc);
      if (c) headers.authorization = `Basic ${Buffer.from(`${c.username}:${c.password}`, 'utf8').toString('base64')}`;
      res = await this.opts.transport.request({ url: url.href, headers, ...(signal ? { signal } : {}) });
    }
    const { bytes, overflow } = await readBounded(res.body, this.opts.tokenBodyBytes);
    const realm = loggableUrl(s.realm);
    if (res.statusCode === 401 || res.statusCode === 403) {
      throw new GuestpullError(
        ErrorCode.UNAUTHENTICATED,
        `token server ${realm} refused ${c ? 'the configured credentials' : 'an anonymous token'} for ${this.where} (HTTP ${res.statusCode}); ${c ? 'check' : 'configure'} the credentials in the auth.json named by [image] authenticated_registry_credentials_uri`,
        { image: this.opts.image, endpoint: s.realm.origin },
      );
    }
    if (res.statusCode !== 200) {
      throw new GuestpullError(ErrorCode.UNAVAILABLE, `token server ${realm} answered HTTP ${res.statusCode} for ${this.where}`, {
        image: this.opts.image,
        endpoint: s.realm.origin,
      });
    }
    if (overflow) {
      throw new GuestpullError(ErrorCode.UNAVAILABLE, `token server ${realm} sent a response larger than ${this.opts.tokenBodyBytes} bytes`, {
        image: this.opts.image,
        endpoint: s.realm.origin,
      });
    }
    let parsed: z.infer<typeof TokenResponse> | undefined;
    try {
      const r = TokenResponse.safeParse(JSON.parse(bytes.toString('utf8')));
      parsed = r.success ? r.data : undefined;
    } catch {
      parsed = undefined;
    }
    const token = parsed?.token || parsed?.access_token;
    if (!parsed || !token) {
      throw new GuestpullError(ErrorCode.UNAVAILABLE, `token server ${realm} sent no usable token (want JSON with "token" or "access_token")`, {
        image: this.opts.image,
        endpoint: s.realm.origin,
      });
    }
    const ttlS = Math.min(parsed.expires_in !== undefined && parsed.expires_in > 0 ? parsed.expires_in : DEFAULT_TTL_S, MAX_TTL_S);
    const margin = Math.min(MAX_MARGIN_MS, ttlS * 500);
    this.opts.logger.debug({ image: this.opts.image, realm, scope: s.scope, ttlS, ms: this.now() - started }, 'registry token obtained');
    return { token, expiresAt: this.now() + ttlS * 1000 - margin };
  }
}
