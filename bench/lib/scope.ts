/**
 * Everything a benchmark run starts, so that it is stopped on success, on failure and on Ctrl-C:
 * cleanup callbacks run last-in first-out, once; child processes are spawned in their own process
 * group and the whole group is killed (a timed command is `/usr/bin/time` + its child, or
 * `unshare` + `sh` + `time` + the tool). Callers also wrap commands in `setpriv --pdeathsig`
 * (PDEATHSIG) so that they die with this process even when it is SIGKILLed.
 */
import { spawn, type ChildProcess, type SpawnOptions } from 'node:child_process';

export class Scope {
  private readonly cleanups: { what: string; fn: () => Promise<void> | void }[] = [];
  private readonly children = new Set<ChildProcess>();
  private closing: Promise<void> | undefined;
  private readonly abort = new AbortController();
  /** Aborted by interrupt(): long loops (image generation) stop at their next step. */
  readonly signal = this.abort.signal;

  /** Registers a cleanup; returns a function that runs it now (and only once) instead. */
  defer(what: string, fn: () => Promise<void> | void): () => Promise<void> {
    const entry = { what, fn };
    this.cleanups.push(entry);
    return async () => {
      const i = this.cleanups.indexOf(entry);
      if (i < 0) return;
      this.cleanups.splice(i, 1);
      await fn();
    };
  }

  /** Spawns `cmd` in a new process group that close() kills if it is still running. */
  spawn(cmd: string, args: string[], opts: SpawnOptions): ChildProcess {
    this.check();
    const child = spawn(cmd, args, { ...opts, detached: true });
    this.children.add(child);
    child.once('exit', () => this.children.delete(child));
    child.once('error', () => this.children.delete(child));
    return child;
  }

  /** SIGKILLs the process group of `child` (no-op when it has exited). */
  killGroup(child: ChildProcess, signal: NodeJS.Signals = 'SIGKILL'): void {
    if (child.pid === undefined || child.exitCode !== null || child.signalCode !== null) return;
    try {
      process.kill(-child.pid, signal);
    } catch {
      // the group is gone already
    }
  }

  /** Throws once the run is being stopped, so the benchmark unwinds instead of starting more. */
  check(): void {
    if (this.signal.aborted || this.closing) throw new Error('interrupted: the run is being stopped');
  }

  /** Stops starting anything and kills every running child group; cleanups wait for close(). */
  interrupt(): void {
    this.abort.abort();
    for (const c of [...this.children]) this.killGroup(c);
  }

  close(): Promise<void> {
    this.closing ??= (async () => {
      for (const c of [...this.children]) this.killGroup(c);
      while (this.cleanups.length > 0) {
        const { what, fn } = this.cleanups.pop()!;
        try {
          await fn();
        } catch (e) {
          process.stderr.write(`bench: cleanup '${what}' failed: ${e instanceof Error ? e.message : String(e)}\n`);
        }
      }
    })();
    return this.closing;
  }
}

/** `setpriv --pdeathsig SIG`: the next program gets SIG when its parent dies (kept across exec). */
export function dieWithParent(signal: 'SIGKILL' | 'SIGTERM' = 'SIGKILL'): string[] {
  return ['/usr/bin/setpriv', '--pdeathsig', signal.slice(3)];
}
