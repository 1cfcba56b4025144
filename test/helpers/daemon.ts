/**
 * Runs the built daemon (`node dist/cli.js serve …`) as a real child process, waits until its
 * health service answers SERVING, and stops it with SIGTERM (SIGKILL after a grace period).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import path from 'node:path';
import { connectClient } from './grpc-client.js';

export interface DaemonOptions {
  repoRoot: string;
  socket: string;
  config?: string;
  workDir?: string;
  extraArgs?: string[];
  env?: NodeJS.ProcessEnv;
  logLevel?: string;
}

export interface RunningDaemon {
  address: string;
  pid: number;
  child: ChildProcess;
  logs(): string;
  /** SIGTERM, wait up to `graceMs`, then SIGKILL; resolves with the exit code (or signal name). */
  stop(graceMs?: number): Promise<number | string | null>;
}

export async function startDaemon(opts: DaemonOptions): Promise<RunningDaemon> {
  const cli = path.join(opts.repoRoot, 'dist', 'cli.js');
  if (!existsSync(cli)) throw new Error(`${cli} is missing: run npm run build first`);
  const address = `unix://${opts.socket}`;
  const args = [cli, 'serve', '--listen', address, '--log-level', opts.logLevel ?? 'debug'];
  if (opts.config) args.push('--config', opts.config);
  if (opts.workDir) args.push('--work-dir', opts.workDir);
  args.push(...(opts.extraArgs ?? []));
  const child = spawn(process.execPath, args, { stdio: ['ignore', 'pipe', 'pipe'], env: opts.env ?? process.env });
  let output = '';
  child.stdout!.on('data', (d: Buffer) => (output += d.toString()));
  child.stderr!.on('data', (d: Buffer) => (output += d.toString()));
  const exited = new Promise<number | string | null>((resolve) =>
    child.on('exit', (code, signal) => resolve(code ?? signal)),
  );
  const killOnExit = (): void => void child.kill('SIGKILL');
  process.once('exit', killOnExit);

  const deadline = Date.now() + 15_000;
  let ready = false;
  while (!ready) {
    if (child.exitCode !== null || child.signalCode !== null) {
      throw new Error(`guestpull serve exited before it was ready (${child.exitCode ?? child.signalCode}):\n${output}`);
    }
    if (Date.now() > deadline) {
      child.kill('SIGKILL');
      throw new Error(`guestpull serve did not become healthy within 15 s:\n${output}`);
    }
    if (existsSync(opts.socket)) {
      const client = connectClient(address);
      try {
        ready = (await client.health()) === 'SERVING';
      } catch {
        ready = false;
      } finally {
        client.close();
      }
    }
    if (!ready) await new Promise((r) => setTimeout(r, 50));
  }

  return {
    address,
    pid: child.pid!,
    child,
    logs: () => output,
    async stop(graceMs = 12_000) {
      if (child.exitCode === null && child.signalCode === null) {
        child.kill('SIGTERM');
        const timer = setTimeout(() => child.kill('SIGKILL'), graceMs);
        const r = await exited;
        clearTimeout(timer);
        process.removeListener('exit', killOnExit);
        return r;
      }
      process.removeListener('exit', killOnExit);
      return exited;
    },
  };
}
