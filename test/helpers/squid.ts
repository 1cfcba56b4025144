/**
 * Test helper: Debian's squid as a forward proxy on 127.0.0.1, configured from a squid.conf
 * written into a temp dir (no disk cache, pid file and logs in the dir, CONNECT allowed to any port
 * from 127.0.0.1). Optional Basic auth through `/usr/lib/squid/basic_ncsa_auth` with an htpasswd
 * file (`htpasswd -m`, apache2-utils), and an optional TLS listener (`https_port`, which Debian's
 * GnuTLS build supports) so squid is also an HTTPS proxy with its own certificate.
 *
 * squid runs in the foreground (`squid -N`) under `setpriv --pdeathsig SIGKILL`, so it dies with
 * the test process; as root it runs as the `proxy` user (squid refuses to keep root) and the temp
 * dir is handed to that user. The access log (squid's native format) tells where traffic went;
 * CONNECT lines are written when a tunnel closes, so close the client first, then call `sync()`.
 */
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { accessSync, chownSync, constants, copyFileSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { Binaries, hasBinary, requireBinary } from './binaries.js';
import { freePort } from './ports.js';

const SQUID = '/usr/sbin/squid';
const NCSA_AUTH = '/usr/lib/squid/basic_ncsa_auth';
const READY_TIMEOUT_MS = 15_000;
const STOP_GRACE_MS = 3_000;
const BIND_ATTEMPTS = 5;

export interface SquidOptions {
  /** Require Basic proxy authentication with this user. */
  auth?: { user: string; password: string };
  /** Also accept TLS connections (`https_port`) with this certificate and key. */
  tls?: { certFile: string; keyFile: string };
}

/** One access.log line (squid's native format). */
export interface SquidLogEntry {
  /** e.g. TCP_TUNNEL/200, TCP_DENIED/407, TCP_MISS/200 */
  result: string;
  status: number;
  method: string;
  /** host:port for CONNECT, the absolute URL otherwise */
  url: string;
  /** the authenticated user, or '-' */
  user: string;
  line: string;
}

export interface RunningSquid {
  /** http://127.0.0.1:PORT */
  url: string;
  /** https://127.0.0.1:PORT when started with `tls` */
  httpsUrl: string | undefined;
  dir: string;
  /** Parsed access.log lines so far. */
  entries(): SquidLogEntry[];
  /** Wait until everything squid finished before this call is in access.log. */
  sync(): Promise<void>;
  /** squid's cache.log, for failure messages. */
  cacheLog(): string;
  stop(): Promise<void>;
}

export function hasSquid(): boolean {
  try {
    accessSync(SQUID, constants.X_OK);
    accessSync(NCSA_AUTH, constants.X_OK);
    return true;
  } catch {
    return false;
  }
}

const live = new Map<ChildProcess, string>();
let exitHook = false;
function installExitHook(): void {
  if (exitHook) return;
  exitHook = true;
  process.on('exit', () => {
    for (const [child, dir] of live) {
      child.kill('SIGKILL');
      rmSync(dir, { recursive: true, force: true });
    }
  });
}

/** uid/gid squid should run as: the `proxy` user when we are root, else ourselves. */
function runAs(): { uid: number; gid: number } | undefined {
  if (process.getuid?.() !== 0) return undefined;
  const line = readFileSync('/etc/passwd', 'utf8')
    .split('\n')
    .find((l) => l.startsWith('proxy:'));
  const f = line?.split(':');
  if (!f || f.length < 4) throw new Error('squid helper: no "proxy" user in /etc/passwd (the squid package creates it)');
  return { uid: Number(f[2]), gid: Number(f[3]) };
}

function conf(dir: string, port: number, httpsPort: number | undefined, opts: SquidOptions): string {
  const lines = [
    `http_port 127.0.0.1:${port}`,
    ...(httpsPort !== undefined ? [`https_port 127.0.0.1:${httpsPort} tls-cert=${path.join(dir, 'tls.pem')} tls-key=${path.join(dir, 'tls.key')}`] : []),
    `pid_filename ${path.join(dir, 'squid.pid')}`,
    `access_log stdio:${path.join(dir, 'access.log')}`,
    `cache_log ${path.join(dir, 'cache.log')}`,
    'cache_store_log none',
    'logfile_rotate 0',
    'cache deny all',
    'cache_mem 8 MB',
    `coredump_dir ${dir}`,
    'visible_hostname guestpull-test-squid',
    'pinger_enable off',
    'netdb_filename none',
    'shutdown_lifetime 0 seconds',
    'forward_max_tries 1',
    'acl from_loopback src 127.0.0.1/32',
  ];
  if (opts.auth) {
    lines.push(
      `auth_param basic program ${NCSA_AUTH} ${path.join(dir, 'passwd')}`,
      'auth_param basic children 2',
      'auth_param basic realm guestpull-test',
      'acl authenticated proxy_auth REQUIRED',
      'http_access deny !authenticated',
    );
  }
  // CONNECT to any port: the registries here listen on random high ports.
  lines.push('http_access allow from_loopback', 'http_access deny all');
  return lines.join('\n') + '\n';
}

function parseLine(line: string): SquidLogEntry | undefined {
  const f = line.trim().split(/\s+/);
  if (f.length < 8) return undefined;
  const result = f[3]!;
  return { result, status: Number(result.split('/')[1] ?? 0), method: f[5]!, url: f[6]!, user: f[7]!, line };
}

let syncCounter = 0;

export async function startSquid(opts: SquidOptions = {}): Promise<RunningSquid> {
  if (!hasSquid()) throw new Error(`${SQUID} or ${NCSA_AUTH} is missing: install the Debian package 'squid' (apt-get install -y squid)`);
  installExitHook();
  const dir = mkdtempSync(path.join(os.tmpdir(), 'guestpull-squid-'));
  try {
    if (opts.auth) {
      const line = execFileSync(requireBinary('htpasswd'), ['-bnm', opts.auth.user, opts.auth.password], { encoding: 'utf8' }).trim();
      writeFileSync(path.join(dir, 'passwd'), `${line}\n`);
    }
    if (opts.tls) {
      copyFileSync(opts.tls.certFile, path.join(dir, 'tls.pem'));
      copyFileSync(opts.tls.keyFile, path.join(dir, 'tls.key'));
    }
    let last = '';
    for (let attempt = 0; attempt < BIND_ATTEMPTS; attempt++) {
      const port = await freePort();
      const httpsPort = opts.tls ? await freePort() : undefined;
      const cfg = path.join(dir, 'squid.conf');
      writeFileSync(cfg, conf(dir, port, httpsPort, opts));
      writeFileSync(path.join(dir, 'access.log'), '');
      writeFileSync(path.join(dir, 'cache.log'), '');
      const user = runAs();
      if (user) for (const f of ['', ...readdirSync(dir)]) chownSync(path.join(dir, f), user.uid, user.gid);
      const started = await launch(dir, cfg, port, httpsPort, user);
      if (started.ok) return started.squid;
      last = started.logs;
      if (!/Address already in use|Cannot open .*Port/i.test(started.logs)) break;
    }
    throw new Error(`squid did not start on 127.0.0.1 within ${READY_TIMEOUT_MS} ms; its output:\n${last}`);
  } catch (e) {
    rmSync(dir, { recursive: true, force: true });
    throw e;
  }
}

async function portOpen(port: number): Promise<boolean> {
  return await new Promise<boolean>((resolve) => {
    const s = net.connect(port, '127.0.0.1');
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}

type Launch = { ok: true; squid: RunningSquid } | { ok: false; logs: string };

async function launch(dir: string, cfg: string, port: number, httpsPort: number | undefined, user: { uid: number; gid: number } | undefined): Promise<Launch> {
  const squidArgs = ['-N', '-f', cfg];
  const priv = user ? [`--reuid=${user.uid}`, `--regid=${user.gid}`, '--clear-groups'] : [];
  const [cmd, args] = hasBinary('setpriv')
    ? [Binaries.setpriv.path, ['--pdeathsig', 'SIGKILL', ...priv, '--', SQUID, ...squidArgs]]
    : [SQUID, squidArgs];
  // No proxy variables (or anything else) leak into squid from the test's environment.
  const child = spawn(cmd, args, { cwd: dir, env: { PATH: '/usr/sbin:/usr/bin:/sbin:/bin', HOME: dir }, stdio: ['ignore', 'pipe', 'pipe'] });
  live.set(child, dir);
  let out = '';
  child.stdout?.on('data', (b: Buffer) => (out += b.toString()));
  child.stderr?.on('data', (b: Buffer) => (out += b.toString()));
  let exited = false;
  const exitedP = new Promise<void>((resolve) => {
    const done = (): void => {
      exited = true;
      live.delete(child);
      resolve();
    };
    child.once('exit', done);
    child.once('error', (e) => {
      out += `spawn error: ${e.message}\n`;
      done();
    });
  });
  const cacheLog = (): string => {
    try {
      return readFileSync(path.join(dir, 'cache.log'), 'utf8');
    } catch {
      return '';
    }
  };
  const deadline = Date.now() + READY_TIMEOUT_MS;
  let ready = false;
  while (!exited && Date.now() < deadline) {
    if ((await portOpen(port)) && (httpsPort === undefined || (await portOpen(httpsPort)))) {
      ready = true;
      break;
    }
    await sleep(50);
  }
  if (!ready) {
    if (!exited) child.kill('SIGKILL');
    await exitedP;
    return { ok: false, logs: `${out}\n${cacheLog()}` };
  }

  const accessLog = path.join(dir, 'access.log');
  const entries = (): SquidLogEntry[] =>
    readFileSync(accessLog, 'utf8')
      .split('\n')
      .map(parseLine)
      .filter((e): e is SquidLogEntry => e !== undefined);

  const sync = async (): Promise<void> => {
    // A request squid answers at once (nothing listens on port 9 of 127.0.0.1) and logs; lines are
    // written in completion order, so once it shows up, everything finished before it has too.
    const mark = `guestpull-sync-${process.pid}-${++syncCounter}`;
    await new Promise<void>((resolve) => {
      const s = net.connect(port, '127.0.0.1', () => {
        s.end(`GET http://127.0.0.1:9/${mark} HTTP/1.1\r\nHost: 127.0.0.1:9\r\nConnection: close\r\n\r\n`);
      });
      s.on('data', () => undefined);
      s.once('close', () => resolve());
      s.once('error', () => resolve());
    });
    const until = Date.now() + 10_000;
    while (Date.now() < until) {
      if (entries().some((e) => e.url.includes(mark))) return;
      await sleep(25);
    }
    throw new Error(`squid never logged ${mark}; cache.log:\n${cacheLog()}`);
  };

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

  return {
    ok: true,
    squid: {
      url: `http://127.0.0.1:${port}`,
      httpsUrl: httpsPort !== undefined ? `https://127.0.0.1:${httpsPort}` : undefined,
      dir,
      entries,
      sync,
      cacheLog,
      stop,
    },
  };
}
