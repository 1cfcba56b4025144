/**
 * Guest test: one QEMU boot (TCG only: nested KVM hangs on these machines) of the Debian kernel
 * with the test initramfs and the init-data disk, user networking restricted to the given guestfwd
 * rules, the serial console on stdout.
 *
 * guestfwd: a `tcp:HOST:PORT` target is a chardev that QEMU (7.2) connects once, at start-up, and
 * every guest connection to the forwarded address is written into that one stream: concurrent
 * connections (parallel layer downloads, a second CONNECT) corrupt each other. The `cmd:` target
 * runs its command once per guest connection with the connection on stdin/stdout, so each rule runs
 * busybox's nc to one fixed loopback port: still exactly one host service per rule. Lines are timestamped as they arrive; a watchdog kills QEMU
 * when the boot takes too long. Marker lines `GUESTPULL-<NAME> {json}` are parsed afterwards.
 */
import { spawn } from 'node:child_process';

export interface GuestFwd {
  /** guest side, e.g. '10.0.2.100:5000' */
  guest: string;
  /** host loopback port */
  hostPort: number;
}

export interface BootOptions {
  kernel: string;
  initrd: string;
  /** Raw disk image attached read-only as the first virtio-blk device (/dev/vda). */
  disk: string;
  /** Kernel command line words added after the console settings. */
  append: string[];
  guestfwd: GuestFwd[];
  memMiB: number;
  cpus: number;
  timeoutMs: number;
  /** Called for every console line (for live progress output). */
  onLine?: (text: string, ms: number) => void;
}

export interface ConsoleLine {
  /** ms since QEMU was started */
  ms: number;
  text: string;
}

export interface BootResult {
  lines: ConsoleLine[];
  exitCode: number | null;
  timedOut: boolean;
  ms: number;
  /** QEMU's own stderr (not the guest's). */
  stderr: string;
}

export interface Marker {
  name: string;
  ms: number;
  data: Record<string, unknown>;
}

/** The per-connection relay (busybox-static is installed for the guest anyway). */
const RELAY = '/bin/busybox nc';

export function qemuArgs(o: BootOptions): string[] {
  const fwd = o.guestfwd.map((f) => `,guestfwd=tcp:${f.guest}-cmd:${RELAY} 127.0.0.1 ${f.hostPort}`).join('');
  return [
    '-accel', 'tcg,thread=multi', '-cpu', 'max', '-m', String(o.memMiB), '-smp', String(o.cpus),
    '-nodefaults', '-no-user-config', '-display', 'none', '-no-reboot', '-serial', 'stdio',
    '-kernel', o.kernel, '-initrd', o.initrd,
    '-append', ['console=ttyS0', 'panic=-1', 'loglevel=4', ...o.append].join(' '),
    '-netdev', `user,id=n0,restrict=on${fwd}`, '-device', 'virtio-net-pci,netdev=n0',
    '-drive', `file=${o.disk},if=virtio,format=raw,readonly=on`,
  ];
}

export async function boot(o: BootOptions): Promise<BootResult> {
  const t0 = Date.now();
  const child = spawn('qemu-system-x86_64', qemuArgs(o), { stdio: ['ignore', 'pipe', 'pipe'] });
  const lines: ConsoleLine[] = [];
  let partial = '';
  let stderr = '';
  const push = (text: string): void => {
    const line = { ms: Date.now() - t0, text: text.replace(/\r/g, '') };
    lines.push(line);
    o.onLine?.(line.text, line.ms);
  };
  child.stdout.on('data', (b: Buffer) => {
    const parts = (partial + b.toString('utf8')).split('\n');
    partial = parts.pop() ?? '';
    for (const p of parts) push(p);
  });
  child.stderr.on('data', (b: Buffer) => {
    stderr = (stderr + b.toString('utf8')).slice(-20_000);
  });
  let timedOut = false;
  const watchdog = setTimeout(() => {
    timedOut = true;
    child.kill('SIGKILL');
  }, o.timeoutMs);
  const killOnExit = (): void => void child.kill('SIGKILL');
  process.once('exit', killOnExit);
  const exitCode = await new Promise<number | null>((resolve) => {
    child.once('error', (e) => {
      stderr += `\nspawn error: ${e.message}`;
      resolve(null);
    });
    child.once('close', (code) => resolve(code));
  });
  clearTimeout(watchdog);
  process.off('exit', killOnExit);
  if (partial !== '') push(partial);
  return { lines, exitCode, timedOut, ms: Date.now() - t0, stderr };
}

const MARKER = /(GUESTPULL-[A-Z-]+) (\{.*\})\s*$/;

/** Every marker line, parsed; a marker whose JSON does not parse (a garbled console line) is reported as such. */
export function markers(result: BootResult): Marker[] {
  const out: Marker[] = [];
  for (const l of result.lines) {
    const m = MARKER.exec(l.text);
    if (!m) continue;
    try {
      const data: unknown = JSON.parse(m[2]!);
      if (typeof data === 'object' && data !== null && !Array.isArray(data)) out.push({ name: m[1]!, ms: l.ms, data: data as Record<string, unknown> });
    } catch {
      out.push({ name: 'GUESTPULL-GARBLED', ms: l.ms, data: { line: l.text } });
    }
  }
  return out;
}

export function consoleTail(result: BootResult, n = 80): string {
  return result.lines.slice(-n).map((l) => `  ${(l.ms / 1000).toFixed(1).padStart(6)}s | ${l.text}`).join('\n');
}
