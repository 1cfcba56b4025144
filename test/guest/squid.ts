/**
 * Guest test: a squid forward proxy on 127.0.0.1 standing in for the guest's image pull proxy. The
 * guest reaches it only through a QEMU guestfwd rule. Its `hosts_file` maps the registry names the
 * guest uses (e.g. registry.guest.test) to 127.0.0.1, so a CONNECT from the guest lands on the
 * host's loopback registry while the TLS name the guest checks stays that name. Only the listed
 * names and ports are allowed; the access log is the evidence that pulls went through the proxy.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { chmodSync, existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { freePort } from '../helpers/ports.js';

const SQUID = '/usr/sbin/squid';
const READY_TIMEOUT_MS = 15_000;

export interface GuestProxyOptions {
  /** name → address, written to squid's hosts_file. */
  hosts: Record<string, string>;
  /** Destination ports squid may connect to (CONNECT or plain HTTP). */
  ports: number[];
}

export interface GuestProxy {
  port: number;
  /**
   * Lines of the access log (native squid format: time elapsed client code/status bytes method URL
   * …). squid logs a CONNECT tunnel when it closes: read it after stop() for the complete log.
   */
  accessLog(): string[];
  /** squid's own cache.log, for failure reports. */
  cacheLog(): string;
  /** Stops squid and removes its temp dir; the logs stay readable from memory. */
  stop(): Promise<void>;
}

function config(dir: string, port: number, opts: GuestProxyOptions): string {
  const names = Object.keys(opts.hosts);
  return [
    `http_port 127.0.0.1:${port}`,
    'visible_hostname guestpull-guest-test',
    `pid_filename ${dir}/squid.pid`,
    `access_log stdio:${dir}/access.log squid`,
    `cache_log ${dir}/cache.log`,
    'cache_store_log none',
    'cache deny all',
    'cache_mem 8 MB',
    `coredump_dir ${dir}`,
    `hosts_file ${dir}/hosts`,
    'pinger_enable off',
    'netdb_filename none',
    'shutdown_lifetime 0 seconds',
    'buffered_logs off',
    `acl guest_ports port ${opts.ports.join(' ')}`,
    `acl guest_registries dstdomain ${names.join(' ')}`,
    'acl CONNECT method CONNECT',
    'http_access deny !guest_ports',
    'http_access allow localhost guest_registries',
    'http_access deny all',
    '',
  ].join('\n');
}

async function accepts(port: number): Promise<boolean> {
  return await new Promise((resolve) => {
    const s = net.connect({ host: '127.0.0.1', port }, () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}

export async function startSquid(opts: GuestProxyOptions): Promise<GuestProxy> {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'guestpull-guest-squid-'));
  // squid started as root runs as the 'proxy' user: it must be able to write its logs here.
  chmodSync(dir, 0o777);
  writeFileSync(path.join(dir, 'hosts'), Object.entries(opts.hosts).map(([n, a]) => `${a} ${n}\n`).join(''));
  let lastError = '';
  for (let attempt = 0; attempt < 3; attempt++) {
    const port = await freePort();
    writeFileSync(path.join(dir, 'squid.conf'), config(dir, port, opts));
    const child: ChildProcess = spawn('setpriv', ['--pdeathsig', 'SIGKILL', '--', SQUID, '-N', '-f', path.join(dir, 'squid.conf')], {
      cwd: dir,
      env: { PATH: '/usr/sbin:/usr/bin:/sbin:/bin' },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let output = '';
    child.stdout?.on('data', (b: Buffer) => (output += b.toString()));
    child.stderr?.on('data', (b: Buffer) => (output += b.toString()));
    let exited = false;
    const exitedP = new Promise<void>((resolve) => child.once('exit', () => ((exited = true), resolve())));
    const deadline = Date.now() + READY_TIMEOUT_MS;
    while (!exited && Date.now() < deadline && !(await accepts(port))) await sleep(100);
    const saved = new Map<string, string>();
    const read = (f: string): string => saved.get(f) ?? (existsSync(path.join(dir, f)) ? readFileSync(path.join(dir, f), 'utf8') : '');
    if (!exited && (await accepts(port))) {
      let stopped: Promise<void> | undefined;
      return {
        port,
        accessLog: () => read('access.log').split('\n').filter((l) => l.trim() !== ''),
        cacheLog: () => read('cache.log'),
        stop: async () => {
          stopped ??= (async () => {
            if (!exited) {
              child.kill('SIGTERM');
              const timer = setTimeout(() => child.kill('SIGKILL'), 5_000);
              await exitedP;
              clearTimeout(timer);
            }
            for (const f of ['access.log', 'cache.log']) saved.set(f, read(f));
            rmSync(dir, { recursive: true, force: true });
          })();
          await stopped;
        },
      };
    }
    if (!exited) child.kill('SIGKILL');
    await exitedP;
    lastError = `${output}\n${read('cache.log')}`;
    if (!/in use|bind/i.test(lastError)) break;
  }
  rmSync(dir, { recursive: true, force: true });
  throw new Error(`squid did not start on 127.0.0.1:\n${lastError.slice(-3000)}`);
}
