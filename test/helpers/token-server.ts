/**
 * A small Docker-registry token server for tests: it lets the real CNCF distribution registry run
 * with `auth.token` so the client's bearer flow meets a real challenge → token → retry cycle.
 *
 * Facts matched (distribution v2.8 `registry/auth/token/{token,accesscontroller}.go`, `docs/spec/auth`):
 * - JWT header `{typ:"JWT", alg, x5c:[base64 DER leaf]}` (or `kid` = libtrust key ID of a key whose
 *   certificate is in `rootcertbundle`); x5c wins over kid in the registry, so only one is sent.
 * - Claims `iss`, `sub`, `aud` (a single string = service), `exp`, `nbf`, `iat`, `jti`,
 *   `access: [{type, name, actions}]`; the registry allows 60 s clock leeway.
 * - GET `/token?service=…&scope=…&scope=…` (a scope parameter may also hold space-separated scopes),
 *   optional Basic credentials; answer `{token, access_token, expires_in, issued_at}`.
 * - OAuth2 POST `/token` (form): `grant_type=password` (username/password) and `refresh_token`;
 *   a refresh token is returned for `access_type=offline` (POST) or `offline_token=true` (GET).
 * Key + self-signed certificate are made at start with `openssl` in a temp dir (removed on stop).
 */
import { execFile } from 'node:child_process';
import { createPrivateKey, createHash, randomBytes, sign, X509Certificate, type KeyObject } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';

export interface TokenScope {
  type: string;
  name: string;
  actions: string[];
}

export interface TokenServerOptions {
  /** Audience the tokens are for; must equal the registry's `auth.token.service`. */
  service?: string;
  /** `iss` claim; must equal the registry's `auth.token.issuer`. */
  issuer?: string;
  /** username → password accepted via Basic auth (GET) or the OAuth2 password grant (POST). */
  users?: Record<string, string>;
  /** Default true: requests without credentials get a token (pull only by default). */
  anonymous?: boolean;
  /** Actions to grant; default: anonymous → pull only, users → pull,push (each ∩ requested). */
  grant?: (user: string | undefined, scope: TokenScope) => string[];
  /** Default 300. */
  tokenTtlSeconds?: number;
  /** Signature algorithm; default 'RS256'. */
  algorithm?: 'RS256' | 'ES256';
  /** How the registry finds the key: 'x5c' (certificate in the header, default) or 'kid'. */
  keyHeader?: 'x5c' | 'kid';
}

export interface TokenRequestRecord {
  user?: string;
  /** All requested scopes, space-joined; undefined when none. */
  scope?: string;
  service?: string;
  time: number;
  /** HTTP status the token server answered with. */
  status: number;
}

export interface RunningTokenServer {
  /** 'http://127.0.0.1:PORT/token' */
  realm: string;
  service: string;
  issuer: string;
  /** PEM certificate file the registry must trust (`auth.token.rootcertbundle`). */
  rootCertBundle: string;
  /** Every token request seen, in order. */
  requests: TokenRequestRecord[];
  stop(): Promise<void>;
}

const MAX_FORM_BYTES = 64 * 1024;
const execFileAsync = promisify(execFile);

/** libtrust key ID: base32(SHA-256(DER SPKI)[:30]) in 12 colon-separated groups of 4. */
export function libtrustKeyId(publicKeyDer: Buffer): string {
  const digest = createHash('sha256').update(publicKeyDer).digest().subarray(0, 30);
  const alphabet = 'ABCDEFGHIJKLMNOPQRSTUVWXYZ234567';
  let bits = 0;
  let value = 0;
  let out = '';
  for (const byte of digest) {
    value = (value << 8) | byte;
    bits += 8;
    while (bits >= 5) {
      out += alphabet[(value >>> (bits - 5)) & 31];
      bits -= 5;
    }
  }
  if (bits > 0) out += alphabet[(value << (5 - bits)) & 31];
  return out.match(/.{1,4}/g)!.join(':');
}

/** `type[(class)]:name:action[,action]` → scope; the name may itself hold ':' (host:port). */
export function parseScope(raw: string): TokenScope & { class?: string } {
  const first = raw.indexOf(':');
  const last = raw.lastIndexOf(':');
  if (first <= 0 || last === first) throw new Error(`malformed scope ${JSON.stringify(raw)}`);
  const typeField = raw.slice(0, first);
  const name = raw.slice(first + 1, last);
  const actions = raw.slice(last + 1).split(',').filter((a) => a !== '');
  const m = /^([a-z0-9]+)(?:\(([a-z0-9]+)\))?$/.exec(typeField);
  if (!m || name === '') throw new Error(`malformed scope ${JSON.stringify(raw)}`);
  return { type: m[1]!, ...(m[2] ? { class: m[2] } : {}), name, actions };
}

function defaultGrant(user: string | undefined, scope: TokenScope): string[] {
  const allowed = user === undefined ? ['pull'] : ['pull', 'push'];
  return scope.actions.filter((a) => allowed.includes(a));
}

class HttpError extends Error {
  constructor(
    readonly status: number,
    message: string,
    readonly headers: Record<string, string> = {},
  ) {
    super(message);
  }
}

async function readForm(req: http.IncomingMessage): Promise<URLSearchParams> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of req) {
    const buf = Buffer.isBuffer(chunk) ? chunk : Buffer.from(String(chunk));
    size += buf.length;
    if (size > MAX_FORM_BYTES) throw new HttpError(413, `form body over ${MAX_FORM_BYTES} bytes`);
    chunks.push(buf);
  }
  return new URLSearchParams(Buffer.concat(chunks).toString('utf8'));
}

function parseBasic(header: string | undefined): { user: string; password: string } | undefined {
  if (header === undefined) return undefined;
  const m = /^Basic\s+([A-Za-z0-9+/=]+)\s*$/i.exec(header);
  if (!m) throw new HttpError(401, 'Authorization header is not Basic credentials');
  const decoded = Buffer.from(m[1]!, 'base64').toString('utf8');
  const colon = decoded.indexOf(':');
  if (colon < 0) throw new HttpError(401, 'Basic credentials without ":"');
  return { user: decoded.slice(0, colon), password: decoded.slice(colon + 1) };
}

export async function startTokenServer(opts: TokenServerOptions = {}): Promise<RunningTokenServer> {
  const service = opts.service ?? 'guestpull-test-registry';
  const issuer = opts.issuer ?? 'guestpull-test-issuer';
  const users = opts.users ?? {};
  const anonymous = opts.anonymous ?? true;
  const grant = opts.grant ?? defaultGrant;
  const ttl = opts.tokenTtlSeconds ?? 300;
  const algorithm = opts.algorithm ?? 'RS256';
  const keyHeader = opts.keyHeader ?? 'x5c';

  const dir = mkdtempSync(path.join(os.tmpdir(), 'guestpull-token-'));
  let server: http.Server | undefined;
  const cleanupDir = (): void => rmSync(dir, { recursive: true, force: true });
  const onExit = (): void => {
    server?.close();
    cleanupDir();
  };
  process.once('exit', onExit);
  const keyFile = path.join(dir, 'key.pem');
  const certFile = path.join(dir, 'cert.pem');
  const newkey = algorithm === 'RS256' ? ['-newkey', 'rsa:2048'] : ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1'];
  try {
    await execFileAsync('openssl', ['req', '-x509', ...newkey, '-nodes', '-keyout', keyFile, '-out', certFile,
      '-subj', `/CN=${issuer} token signer`, '-days', '1']);
  } catch (err) {
    process.removeListener('exit', onExit);
    cleanupDir();
    throw new Error(`token server: openssl could not make a signing key/certificate: ${String(err)}`);
  }
  const privateKey: KeyObject = createPrivateKey(readFileSync(keyFile));
  const cert = new X509Certificate(readFileSync(certFile));
  const jwtHeader: Record<string, unknown> = { typ: 'JWT', alg: algorithm };
  if (keyHeader === 'x5c') jwtHeader.x5c = [cert.raw.toString('base64')];
  else jwtHeader.kid = libtrustKeyId(cert.publicKey.export({ type: 'spki', format: 'der' }));
  const encodedHeader = Buffer.from(JSON.stringify(jwtHeader)).toString('base64url');

  const refreshTokens = new Map<string, string>();
  const requests: TokenRequestRecord[] = [];

  const issue = (user: string | undefined, scopes: TokenScope[]): { token: string; granted: string[]; issuedAt: Date } => {
    const issuedAt = new Date();
    const now = Math.floor(issuedAt.getTime() / 1000);
    const access: { type: string; name: string; actions: string[] }[] = [];
    const granted: string[] = [];
    for (const s of scopes) {
      const actions = grant(user, s);
      if (actions.length === 0) continue;
      access.push({ type: s.type, name: s.name, actions });
      granted.push(`${s.type}:${s.name}:${actions.join(',')}`);
    }
    const claims = {
      iss: issuer, sub: user ?? '', aud: service, exp: now + ttl, nbf: now, iat: now,
      jti: randomBytes(16).toString('hex'), access,
    };
    const signingInput = `${encodedHeader}.${Buffer.from(JSON.stringify(claims)).toString('base64url')}`;
    const signature = algorithm === 'RS256'
      ? sign('sha256', Buffer.from(signingInput), privateKey)
      : sign('sha256', Buffer.from(signingInput), { key: privateKey, dsaEncoding: 'ieee-p1363' });
    return { token: `${signingInput}.${signature.toString('base64url')}`, granted, issuedAt };
  };

  const authenticate = (user: string, password: string): string => {
    const expected = users[user];
    if (expected === undefined || expected !== password) {
      throw new HttpError(401, `wrong username or password for ${JSON.stringify(user)}`, {
        'WWW-Authenticate': 'Basic realm="guestpull-test-token"',
      });
    }
    return user;
  };

  const handle = async (req: http.IncomingMessage, record: TokenRequestRecord): Promise<Record<string, unknown>> => {
    const url = new URL(req.url ?? '/', 'http://127.0.0.1');
    if (url.pathname !== '/token') throw new HttpError(404, `no such endpoint ${url.pathname}`);
    /** Records service and scopes before any check, so refused requests show them too. */
    const noteRequest = (p: URLSearchParams): string[] => {
      const scopes = p.getAll('scope').flatMap((v) => v.split(' ')).filter((v) => v !== '');
      record.service = p.get('service') ?? undefined;
      record.scope = scopes.length > 0 ? scopes.join(' ') : undefined;
      return scopes;
    };
    let params: URLSearchParams;
    let user: string | undefined;
    let offline: boolean;
    let scopes: string[];
    if (req.method === 'GET') {
      params = url.searchParams;
      scopes = noteRequest(params);
      const basic = parseBasic(req.headers.authorization);
      record.user = basic?.user;
      if (basic) user = authenticate(basic.user, basic.password);
      offline = params.get('offline_token') === 'true';
    } else if (req.method === 'POST') {
      params = await readForm(req);
      scopes = noteRequest(params);
      const grantType = params.get('grant_type');
      if (grantType === 'password') {
        record.user = params.get('username') ?? undefined;
        user = authenticate(params.get('username') ?? '', params.get('password') ?? '');
      } else if (grantType === 'refresh_token') {
        user = refreshTokens.get(params.get('refresh_token') ?? '');
        record.user = user;
        if (user === undefined) throw new HttpError(401, 'unknown refresh_token');
      } else {
        throw new HttpError(400, `unsupported grant_type ${JSON.stringify(grantType)}`);
      }
      offline = params.get('access_type') === 'offline' || grantType === 'refresh_token';
    } else {
      throw new HttpError(405, `method ${req.method ?? ''} not allowed`, { Allow: 'GET, POST' });
    }
    if (record.service !== service) {
      throw new HttpError(400, `unknown service ${JSON.stringify(record.service)} (this server issues for ${service})`);
    }
    let parsed: TokenScope[];
    try {
      parsed = scopes.map(parseScope);
    } catch (err) {
      throw new HttpError(400, (err as Error).message);
    }
    if (user === undefined && !anonymous) {
      throw new HttpError(401, 'anonymous tokens are disabled', { 'WWW-Authenticate': 'Basic realm="guestpull-test-token"' });
    }
    const { token, granted, issuedAt } = issue(user, parsed);
    const body: Record<string, unknown> = {
      token, access_token: token, expires_in: ttl, issued_at: issuedAt.toISOString(),
    };
    if (req.method === 'POST') body.scope = granted.join(' ');
    if (offline && user !== undefined) {
      const existing = req.method === 'POST' ? params.get('refresh_token') : null;
      const refresh = existing ?? randomBytes(24).toString('base64url');
      refreshTokens.set(refresh, user);
      body.refresh_token = refresh;
    }
    return body;
  };

  server = http.createServer((req, res) => {
    const record: TokenRequestRecord = { time: Date.now(), status: 0 };
    requests.push(record);
    const reply = (status: number, body: unknown, headers: Record<string, string> = {}): void => {
      record.status = status;
      res.writeHead(status, { 'Content-Type': 'application/json', ...headers });
      res.end(JSON.stringify(body));
    };
    handle(req, record).then(
      (body) => reply(200, body),
      (err: unknown) => {
        if (err instanceof HttpError) reply(err.status, { errors: [{ code: 'DENIED', message: err.message }] }, err.headers);
        else reply(500, { errors: [{ code: 'UNKNOWN', message: String(err) }] });
      },
    );
  });
  const listening = server;
  try {
    await new Promise<void>((resolve, reject) => {
      listening.once('error', reject);
      listening.listen(0, '127.0.0.1', () => resolve());
    });
  } catch (err) {
    process.removeListener('exit', onExit);
    cleanupDir();
    throw new Error(`token server: cannot listen on 127.0.0.1: ${String(err)}`);
  }
  const port = (listening.address() as AddressInfo).port;

  let stopped: Promise<void> | undefined;
  return {
    realm: `http://127.0.0.1:${port}/token`,
    service,
    issuer,
    rootCertBundle: certFile,
    requests,
    stop() {
      stopped ??= new Promise<void>((resolve) => {
        listening.close(() => resolve());
        listening.closeAllConnections();
      }).finally(() => {
        process.removeListener('exit', onExit);
        cleanupDir();
      });
      return stopped;
    },
  };
}
