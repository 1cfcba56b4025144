/**
 * Test helper: a real CNCF distribution registry (Debian `docker-registry`, distribution 2.8) on
 * 127.0.0.1, configured from a YAML file written into a temp dir: plain or TLS, htpasswd (bcrypt
 * through `htpasswd -B` from apache2-utils) or token auth, or a pull-through cache of another
 * registry. The child is wrapped in `setpriv --pdeathsig SIGKILL` so it dies with its parent, and
 * is killed on process exit as well.
 */
import { spawn, execFileSync, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync, mkdirSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { Agent, request } from 'undici';
import { Binaries, hasBinary, requireBinary } from './binaries.js';
import { freePort } from './ports.js';

export interface RegistryOptions {
  /**
   * Run as a pull-through cache of this registry URL. distribution 2.8 sends proxyUsername /
   * proxyPassword only to upstreams that answer with a Bearer (token) challenge: against an
   * htpasswd (Basic) upstream it pulls anonymously and gets 401.
   */
  proxyRemoteUrl?: string;
  proxyUsername?: string;
  proxyPassword?: string;
  htpasswd?: { user: string; password: string };
  tls?: { certFile: string; keyFile: string };
  tokenAuth?: { realm: string; service: string; issuer: string; rootCertBundle: string };
  /** error | warn | info | debug (default warn). */
  logLevel?: string;
}

export interface RunningRegistry {
  /** '127.0.0.1:PORT' */
  host: string;
  /** 'http://127.0.0.1:PORT' or 'https://…' */
  url: string;
  /** The temp dir holding config, htpasswd and storage. */
  dir: string;
  /** The registry's process id (setpriv execs it, so this is the registry itself). */
  pid: number | undefined;
  /** Everything the registry printed so far (stdout and stderr interleaved, last 4 MiB). */
  logs(): string;
  stop(): Promise<void>;
}

const READY_TIMEOUT_MS = 10_000;
const STOP_GRACE_MS = 3_000;
const LOG_LIMIT = 4 * 1024 * 1024;
const BIND_ATTEMPTS = 5;

const live = new Map<ChildProcess, string>();
let exitHookInstalled = false;

function installExitHook(): void {
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  process.on('exit', () => {
    for (const [child, dir] of live) {
      child.kill('SIGKILL');
      rmSync(dir, { recursive: true, force: true });
    }
  });
}

export function hasRegistryBinary(): boolean {
  return hasBinary('registry');
}

function q(s: string): string {
  return JSON.stringify(s); // a JSON string is a valid YAML double-quoted scalar
}

function configYaml(dir: string, port: number, opts: RegistryOptions): string {
  const lines = [
    'version: 0.1',
    'log:',
    `  level: ${q(opts.logLevel ?? 'warn')}`,
    '  formatter: text',
    'storage:',
    '  filesystem:',
    `    rootdirectory: ${q(path.join(dir, 'data'))}`,
    '  delete:',
    '    enabled: true',
    '  maintenance:',
    '    uploadpurging:',
    '      enabled: false',
    'http:',
    `  addr: ${q(`127.0.0.1:${port}`)}`,
    `  secret: ${q('guestpull-test-registry-secret')}`,
  ];
  if (opts.tls) {
    lines.push('  tls:', `    certificate: ${q(opts.tls.certFile)}`, `    key: ${q(opts.tls.keyFile)}`);
  }
  lines.push('health:', '  storagedriver:', '    enabled: false');
  if (opts.htpasswd && opts.tokenAuth) throw new Error('startRegistry: choose htpasswd or tokenAuth, not both');
  if (opts.htpasswd) {
    lines.push('auth:', '  htpasswd:', `    realm: ${q('guestpull-test')}`, `    path: ${q(path.join(dir, 'htpasswd'))}`);
  }
  if (opts.tokenAuth) {
    const t = opts.tokenAuth;
    lines.push(
      'auth:',
      '  token:',
      `    realm: ${q(t.realm)}`,
      `    service: ${q(t.service)}`,
      `    issuer: ${q(t.issuer)}`,
      `    rootcertbundle: ${q(t.rootCertBundle)}`,
    );
  }
  if (opts.proxyRemoteUrl) {
    lines.push('proxy:', `  remoteurl: ${q(opts.proxyRemoteUrl)}`);
    if (opts.proxyUsername !== undefined) lines.push(`  username: ${q(opts.proxyUsername)}`);
    if (opts.proxyPassword !== undefined) lines.push(`  password: ${q(opts.proxyPassword)}`);
  }
  return lines.join('\n') + '\n';
}

function bcryptLine(user: string, password: string): string {
  const bin = requireBinary('htpasswd');
  // -B bcrypt (the only scheme distribution's htpasswd accepts), -b password on the command line, -n print
  return execFileSync(bin, ['-Bbn', user, password], { encoding: 'utf8' }).trim();
}

async function isReady(url: string, dispatcher: Agent): Promise<boolean> {
  try {
    const res = await request(`${url}/v2/`, { method: 'GET', dispatcher, headersTimeout: 1000, bodyTimeout: 1000 });
    await res.body.dump();
    return res.statusCode === 200 || res.statusCode === 401;
  } catch {
    return false;
  }
}

export async function startRegistry(opts: RegistryOptions = {}): Promise<RunningRegistry> {
  const bin = requireBinary('registry');
  installExitHook();
  const dir = mkdtempSync(path.join(os.tmpdir(), 'guestpull-registry-'));
  try {
    mkdirSync(path.join(dir, 'data'));
    if (opts.htpasswd) writeFileSync(path.join(dir, 'htpasswd'), bcryptLine(opts.htpasswd.user, opts.htpasswd.password) + '\n');
    let lastLogs = '';
    for (let attempt = 0; attempt < BIND_ATTEMPTS; attempt++) {
      const port = await freePort();
      const cfg = path.join(dir, 'config.yml');
      writeFileSync(cfg, configYaml(dir, port, opts));
      const started = await launch(bin, cfg, dir, port, opts);
      if (started.ok) return started.registry;
      lastLogs = started.logs;
      if (!/address already in use/i.test(started.logs)) break;
    }
    throw new Error(`docker-registry did not become ready on 127.0.0.1 within ${READY_TIMEOUT_MS} ms; its output:\n${lastLogs}`);
  } catch (err) {
    rmSync(dir, { recursive: true, force: true });
    throw err;
  }
}

type Launch = { ok: true; registry: RunningRegistry } | { ok: false; logs: string };

async function launch(bin: string, cfg: string, dir: string, port: number, opts: RegistryOptions): Promise<Launch> {
  const usePdeath = hasBinary('setpriv');
  const [cmd, args] = usePdeath
    ? [Binaries.setpriv.path, ['--pdeathsig', 'SIGKILL', '--', bin, 'serve', cfg]]
    : [bin, ['serve', cfg]];
  // A minimal environment: no REGISTRY_* overrides and no proxy variables leak in from the parent.
  const child = spawn(cmd, args, {
    cwd: dir,
    env: { PATH: '/usr/sbin:/usr/bin:/sbin:/bin', HOME: dir },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  live.set(child, dir);
  let out = '';
  const append = (b: Buffer): void => {
    out += b.toString('utf8');
    if (out.length > LOG_LIMIT) out = out.slice(out.length - LOG_LIMIT);
  };
  child.stdout?.on('data', append);
  child.stderr?.on('data', append);
  let exited = false;
  const exitedP = new Promise<void>((resolve) => {
    child.once('exit', () => {
      exited = true;
      live.delete(child);
      resolve();
    });
    child.once('error', (err) => {
      append(Buffer.from(`spawn error: ${err.message}\n`));
      exited = true;
      live.delete(child);
      resolve();
    });
  });

  const host = `127.0.0.1:${port}`;
  const url = `${opts.tls ? 'https' : 'http'}://${host}`;
  const probe = new Agent({ connect: { rejectUnauthorized: false } });
  const deadline = Date.now() + READY_TIMEOUT_MS;
  let ready = false;
  try {
    while (!exited && Date.now() < deadline) {
      if (await isReady(url, probe)) {
        ready = true;
        break;
      }
      await sleep(50);
    }
  } finally {
    await probe.close();
  }
  if (!ready) {
    if (!exited) child.kill('SIGKILL');
    await exitedP;
    return { ok: false, logs: out };
  }

  let stopped: Promise<void> | undefined;
  const stop = async (): Promise<void> => {
    stopped ??= (async () => {
      if (!exited) {
        child.kill('SIGTERM');
        const timer = setTimeout(() => child.kill('SIGKILL'), STOP_GRACE_MS);
        await exitedP;
        clearTimeout(timer);
      }
      rmSync(dir, { recursive: true, force: true });
    })();
    return stopped;
  };
  return { ok: true, registry: { host, url, dir, pid: child.pid, logs: () => out, stop } };
}
