/**
 * Soak: the built daemon (`node dist/cli.js serve`) as a child that can be SIGKILLed and started
 * again on the same socket, config and work dir. Its output goes to one log file across restarts
 * and through a line counter (./logs.ts), never into memory; `rss()` reads VmRSS and VmHWM of the
 * current process from /proc. Workers wait on `ready()` so no call is made while it is down.
 * The child runs in its own process group under `setpriv --pdeathsig SIGKILL`.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { createWriteStream, existsSync, type WriteStream } from 'node:fs';
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { Binaries, hasBinary } from '../helpers/binaries.js';
import { connectClient } from '../helpers/grpc-client.js';
import { LogCounter } from './logs.js';

export interface Rss {
  rssKiB: number;
  hwmKiB: number;
}

export interface SoakDaemonOptions {
  repoRoot: string;
  socket: string;
  config: string;
  logFile: string;
  /** Called when the daemon died on its own and could not be started again. */
  onDead?: () => void;
}

const READY_MS = 20_000;
const STOP_GRACE_MS = 15_000;

export class SoakDaemon {
  readonly address: string;
  readonly counter = new LogCounter();
  private child: ChildProcess | undefined;
  private exited: Promise<void> = Promise.resolve();
  private readonly log: WriteStream;
  private gate: Promise<void> = Promise.resolve();
  private openGate: () => void = () => undefined;
  /** Incremented by every kill and crash: a call that saw it change overlapped one. */
  epoch = 0;
  starts = 0;
  /** Exits nobody asked for (each one restarted). */
  readonly crashes: string[] = [];
  private expectExit = false;
  private restarting: Promise<void> | undefined;
  private readonly killOnExit = (): void => void this.child?.kill('SIGKILL');

  constructor(private readonly opts: SoakDaemonOptions) {
    this.address = `unix://${opts.socket}`;
    this.log = createWriteStream(opts.logFile, { flags: 'a' });
    process.on('exit', this.killOnExit);
  }

  get pid(): number | undefined {
    return this.child?.pid;
  }

  /** Resolves while the daemon is up (at once), or once it is up again. */
  ready(): Promise<void> {
    return this.gate;
  }

  async start(): Promise<void> {
    const cli = path.join(this.opts.repoRoot, 'dist', 'cli.js');
    if (!existsSync(cli)) throw new Error(`${cli} is missing: run npm run build first`);
    const args = [cli, 'serve', '--listen', this.address, '--config', this.opts.config, '--log-level', 'info'];
    // Its own process group (a Ctrl-C of the soak is the soak's to handle), and dead with the soak
    // however the soak ends (setpriv execs node: the pid is the daemon's).
    const [cmd, argv] = hasBinary('setpriv') ? [Binaries.setpriv.path, ['--pdeathsig', 'SIGKILL', '--', process.execPath, ...args]] : [process.execPath, args];
    const child = spawn(cmd, argv, { stdio: ['ignore', 'pipe', 'pipe'], detached: true });
    this.child = child;
    this.starts++;
    this.log.write(`\n# soak: daemon start ${this.starts}, pid ${child.pid}\n`);
    const feed = (b: Buffer): void => {
      this.log.write(b);
      this.counter.feed(b);
    };
    child.stdout!.on('data', feed);
    child.stderr!.on('data', feed);
    this.expectExit = false;
    let up = false;
    this.exited = new Promise((resolve) =>
      child.once('exit', (code, signal) => {
        resolve();
        // One that never came up is start()'s to report.
        if (up && !this.expectExit) {
          this.counter.flush();
          this.crashed(`pid ${child.pid} exited on its own (${code ?? signal}); its last lines:\n${this.counter.tail(15).join('\n')}`);
        }
      }),
    );
    const deadline = Date.now() + READY_MS;
    for (;;) {
      if (child.exitCode !== null || child.signalCode !== null) throw new Error(`guestpull serve exited before it was ready (${child.exitCode ?? child.signalCode}); see ${this.opts.logFile}`);
      if (Date.now() > deadline) {
        child.kill('SIGKILL');
        throw new Error(`guestpull serve was not healthy within ${READY_MS} ms; see ${this.opts.logFile}`);
      }
      if (existsSync(this.opts.socket) && (await this.healthy())) break;
      await sleep(50);
    }
    up = true;
    this.openGate();
  }

  private async healthy(): Promise<boolean> {
    const client = connectClient(this.address);
    try {
      return (await client.health()) === 'SERVING';
    } catch {
      return false;
    } finally {
      client.close();
    }
  }

  /** Close the gate, SIGKILL, wait for the exit, start again, open the gate. */
  async killAndRestart(): Promise<void> {
    this.closeGate();
    this.expectExit = true;
    this.child?.kill('SIGKILL');
    await this.exited;
    this.counter.flush();
    await this.start();
  }

  private closeGate(): void {
    this.gate = new Promise((resolve) => (this.openGate = resolve));
    this.epoch++;
  }

  /** The daemon died without being asked to: note it and start it again. */
  private crashed(what: string): void {
    this.crashes.push(what);
    this.closeGate();
    this.restarting = this.start().catch((e: unknown) => {
      this.crashes.push(`restart after that failed: ${e instanceof Error ? e.message : String(e)}`);
      this.openGate();
      this.opts.onDead?.();
    });
  }

  /** SIGTERM (the daemon's graceful stop), SIGKILL after a grace period; resolves once it is gone. */
  async stop(): Promise<void> {
    await this.restarting;
    this.expectExit = true;
    const child = this.child;
    if (child && child.exitCode === null && child.signalCode === null) {
      child.kill('SIGTERM');
      const timer = setTimeout(() => child.kill('SIGKILL'), STOP_GRACE_MS);
      await this.exited;
      clearTimeout(timer);
    }
    this.counter.flush();
    process.off('exit', this.killOnExit);
    await new Promise<void>((resolve) => this.log.end(() => resolve()));
  }

  /** SIGKILL at once, nothing awaited (a hard exit of the soak). */
  killNow(): void {
    this.expectExit = true;
    this.child?.kill('SIGKILL');
  }

  /** VmRSS and VmHWM of the running daemon, or undefined when it is not running. */
  async rss(): Promise<Rss | undefined> {
    const child = this.child;
    if (child?.pid === undefined || child.exitCode !== null || child.signalCode !== null) return undefined;
    try {
      return parseStatus(await readFile(`/proc/${child.pid}/status`, 'utf8'));
    } catch {
      return undefined;
    }
  }
}

/** VmRSS and VmHWM (kB) of a /proc/<pid>/status text; undefined when either is missing. */
export function parseStatus(text: string): Rss | undefined {
  const rss = /^VmRSS:\s+(\d+) kB$/m.exec(text);
  const hwm = /^VmHWM:\s+(\d+) kB$/m.exec(text);
  if (!rss || !hwm) return undefined;
  return { rssKiB: Number(rss[1]), hwmKiB: Number(hwm[1]) };
}
