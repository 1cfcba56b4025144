/**
 * How the benchmark measures: a command under GNU time -v (wall, user+sys CPU and peak RSS of the
 * process tree it waits for), and a long-running process through /proc (CPU time of all its
 * threads and waited-for children; peak RSS as VmHWM after resetting it through clear_refs).
 */
import { execFileSync } from 'node:child_process';
import { readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { dieWithParent, type Scope } from './scope.js';

export interface Sample {
  wallS: number;
  cpuS: number;
  rssMiB: number;
}

export function median(xs: readonly number[]): number {
  if (xs.length === 0) return Number.NaN;
  const s = [...xs].sort((a, b) => a - b);
  const m = Math.floor(s.length / 2);
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

/** Wall, CPU and peak RSS from GNU time -v's report. */
export function parseGnuTime(text: string): Sample {
  const field = (re: RegExp): string => {
    const m = re.exec(text);
    if (!m) throw new Error(`GNU time output lacks ${re.source}:\n${text.slice(0, 2000)}`);
    return m[1]!;
  };
  const wallS = field(/Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)/)
    .split(':')
    .reduce((acc, part) => acc * 60 + Number(part), 0);
  const cpuS = Number(field(/User time \(seconds\): ([\d.]+)/)) + Number(field(/System time \(seconds\): ([\d.]+)/));
  return { wallS, cpuS, rssMiB: Number(field(/Maximum resident set size \(kbytes\): (\d+)/)) / 1024 };
}

export interface TimedRun {
  sample: Sample;
  stdout: string;
  stderr: string;
}

const OUTPUT_LIMIT = 256 * 1024;

/**
 * Runs `[...prefix, /usr/bin/time -v -o FILE, ...cmd]` (each part under setpriv --pdeathsig) and returns GNU time's figures for `cmd`
 * (the prefix, e.g. `unshare … sh -c 'mount …; exec "$@"'`, is not measured). Rejects, with the
 * command's stderr, when it fails.
 */
export async function runTimed(scope: Scope, cmd: string[], opts: { prefix?: string[]; env?: NodeJS.ProcessEnv; cwd?: string; timeFile: string; timeoutMs?: number }): Promise<TimedRun> {
  // PDEATHSIG on the outer program and on the measured one (time forks it: not inherited)
  const argv = [...dieWithParent(), ...(opts.prefix ?? []), '/usr/bin/time', '-v', '-o', opts.timeFile, ...dieWithParent(), ...cmd];
  const child = scope.spawn(argv[0]!, argv.slice(1), { stdio: ['ignore', 'pipe', 'pipe'], env: opts.env ?? process.env, ...(opts.cwd ? { cwd: opts.cwd } : {}) });
  let stdout = '';
  let stderr = '';
  const keep = (s: string, b: Buffer): string => (s + b.toString('utf8')).slice(-OUTPUT_LIMIT);
  child.stdout!.on('data', (b: Buffer) => (stdout = keep(stdout, b)));
  child.stderr!.on('data', (b: Buffer) => (stderr = keep(stderr, b)));
  const timer = setTimeout(() => scope.killGroup(child), opts.timeoutMs ?? 1_800_000);
  const status = await new Promise<number | string>((resolve, reject) => {
    child.once('error', reject);
    child.once('close', (code, signal) => resolve(code ?? signal ?? 'unknown'));
  }).finally(() => clearTimeout(timer));
  let report = '';
  try {
    report = readFileSync(opts.timeFile, 'utf8');
  } catch {
    // time did not get to write it
  }
  rmSync(opts.timeFile, { force: true });
  if (status !== 0) {
    throw new Error(`${cmd.map((a) => path.basename(a)).slice(0, 3).join(' ')} … exited with ${status}:\n${stderr.trim().slice(-4000) || stdout.trim().slice(-2000)}`);
  }
  return { sample: parseGnuTime(report), stdout, stderr };
}

let clkTck: number | undefined;
function ticksPerSecond(): number {
  if (clkTck === undefined) {
    try {
      clkTck = Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim()) || 100;
    } catch {
      clkTck = 100;
    }
  }
  return clkTck;
}

export interface ProcCpu {
  /** utime + stime of the process (all threads, including ones that exited), in ticks */
  ticks: number;
  /** cutime + cstime: waited-for children, in ticks */
  childTicks: number;
  /** Σ of /proc/PID/task/*\/schedstat on-CPU ns over the live threads */
  schedNs: number;
}

export function readProcCpu(pid: number): ProcCpu {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  // fields after "(comm)": state is field 3, utime 14, stime 15, cutime 16, cstime 17
  const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  const n = (field: number): number => Number(f[field - 3]);
  let schedNs = 0;
  for (const tid of readdirSync(`/proc/${pid}/task`)) {
    try {
      schedNs += Number(readFileSync(`/proc/${pid}/task/${tid}/schedstat`, 'utf8').split(' ')[0]);
    } catch {
      // the thread exited meanwhile: its time is in `ticks`
    }
  }
  return { ticks: n(14) + n(15), childTicks: n(16) + n(17), schedNs };
}

/**
 * CPU seconds between two readings: the nanosecond schedstat sum (plus children), unless the
 * tick counters saw more (a thread that exited took its schedstat with it).
 */
export function cpuSeconds(before: ProcCpu, after: ProcCpu): number {
  const hz = ticksPerSecond();
  const children = (after.childTicks - before.childTicks) / hz;
  const precise = (after.schedNs - before.schedNs) / 1e9 + children;
  const coarse = (after.ticks - before.ticks) / hz + children;
  return Math.max(precise, coarse);
}

function statusKiB(pid: number, key: 'VmHWM' | 'VmRSS'): number {
  const m = new RegExp(`^${key}:\\s+(\\d+) kB`, 'm').exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  if (!m) throw new Error(`/proc/${pid}/status has no ${key}`);
  return Number(m[1]);
}

/** Resets the process's peak RSS (VmHWM) to its current RSS; false when the kernel refuses. */
export function resetPeakRss(pid: number): boolean {
  try {
    writeFileSync(`/proc/${pid}/clear_refs`, '5');
  } catch {
    return false;
  }
  // VmRSS may grow between the two reads: allow a little
  return statusKiB(pid, 'VmHWM') <= statusKiB(pid, 'VmRSS') + 4096;
}

export function peakRssMiB(pid: number): number {
  return statusKiB(pid, 'VmHWM') / 1024;
}
