/** The machine a benchmark ran on, for the report header and the JSON. */
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { readMounts } from '../../src/pull/store/mountinfo.js';
import type { Machine } from './report.js';

function firstLine(cmd: string, args: string[]): string {
  try {
    return execFileSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], timeout: 10_000 }).trim().split('\n')[0] ?? '';
  } catch {
    return `${path.basename(cmd)}: not available`;
  }
}

/** The filesystem type (and source) holding `dir`: the longest mount point that contains it. */
export function filesystemOf(dir: string): string {
  const abs = path.resolve(dir);
  let best: { mountPoint: string; fstype: string; source: string } | undefined;
  for (const m of readMounts()) {
    const inside = m.mountPoint === '/' || abs === m.mountPoint || abs.startsWith(m.mountPoint + '/');
    if (inside && (!best || m.mountPoint.length >= best.mountPoint.length)) best = m;
  }
  return best ? `${best.fstype} (${best.source} on ${best.mountPoint})` : 'unknown';
}

export function describeMachine(workBase: string): Machine {
  const cpuinfo = readFileSync('/proc/cpuinfo', 'utf8');
  const meminfo = readFileSync('/proc/meminfo', 'utf8');
  return {
    cores: os.availableParallelism(),
    cpuModel: /^model name\s*:\s*(.+)$/m.exec(cpuinfo)?.[1]?.trim() ?? 'unknown',
    memTotalMiB: Number(/^MemTotal:\s+(\d+) kB/m.exec(meminfo)?.[1] ?? 0) / 1024,
    kernel: os.release(),
    node: process.version,
    skopeo: firstLine('skopeo', ['--version']),
    umoci: firstLine('umoci', ['--version']),
    registry: firstLine('/usr/bin/docker-registry', ['--version']),
    workFs: filesystemOf(workBase),
  };
}
