/**
 * The daemon under test: `bin/guestpull serve`, the installed command (it gives node its flags),
 * on a free 127.0.0.1 port with its own work dir, ready once grpc health says SERVING (start-up is
 * not timed). Stopped with SIGTERM, then the whole process group with SIGKILL after a grace
 * period; the Scope kills it on Ctrl-C, and setpriv --pdeathsig TERM if this process dies
 * (setpriv execs the sh launcher, which execs node: the pid is the daemon's).
 */
import type { ChildProcess } from 'node:child_process';
import { setTimeout as sleep } from 'node:timers/promises';
import { connectClient, type PullClient } from '../../test/helpers/grpc-client.js';
import { freePort } from '../../test/helpers/ports.js';
import { dieWithParent, type Scope } from './scope.js';

export interface BenchDaemon {
  pid: number;
  client: PullClient;
  logs(): string;
  stop(): Promise<void>;
}

const READY_MS = 20_000;
const STOP_GRACE_MS = 15_000;
const LOG_LIMIT = 64 * 1024;

async function startOnce(scope: Scope, cli: string, config: string, workDir: string, port: number): Promise<BenchDaemon | { failed: string }> {
  const args = [cli, 'serve', '--listen', `127.0.0.1:${port}`, '--config', config, '--work-dir', workDir, '--log-level', 'warn'];
  const [setpriv, ...pdeathsig] = dieWithParent('SIGTERM');
  const child: ChildProcess = scope.spawn(setpriv!, [...pdeathsig, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  const keep = (b: Buffer): void => {
    out = (out + b.toString('utf8')).slice(-LOG_LIMIT);
  };
  child.stdout!.on('data', keep);
  child.stderr!.on('data', keep);
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  const client = connectClient(`127.0.0.1:${port}`);
  const deadline = Date.now() + READY_MS;
  for (;;) {
    if (child.exitCode !== null || child.signalCode !== null) {
      client.close();
      return { failed: `guestpull serve exited (${child.exitCode ?? child.signalCode}) before it was ready:\n${out}` };
    }
    if (Date.now() > deadline) {
      client.close();
      scope.killGroup(child);
      await exited;
      return { failed: `guestpull serve did not answer health SERVING within ${READY_MS / 1000} s:\n${out}` };
    }
    const status = await client.health().catch(() => 'UNREACHABLE');
    if (status === 'SERVING') break;
    await sleep(50);
  }
  let stopped: Promise<void> | undefined;
  const stop = (): Promise<void> => {
    stopped ??= (async () => {
      client.close();
      if (child.exitCode === null && child.signalCode === null) {
        child.kill('SIGTERM');
        const timer = setTimeout(() => scope.killGroup(child), STOP_GRACE_MS);
        await exited;
        clearTimeout(timer);
      }
    })();
    return stopped;
  };
  return { pid: child.pid!, client, logs: () => out, stop };
}

/** Starts the daemon; retries on another port when the chosen one was taken meanwhile. */
export async function startBenchDaemon(scope: Scope, cli: string, config: string, workDir: string): Promise<BenchDaemon> {
  let last = '';
  for (let attempt = 0; attempt < 3; attempt++) {
    const r = await startOnce(scope, cli, config, workDir, await freePort());
    if (!('failed' in r)) {
      return { ...r, stop: scope.defer(`stop daemon ${r.pid}`, r.stop) };
    }
    last = r.failed;
    if (!/EADDRINUSE|address already in use/i.test(last)) break;
  }
  throw new Error(last);
}
