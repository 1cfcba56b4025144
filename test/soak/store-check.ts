/**
 * Soak: the end-of-run checks of the work dir and the bundle root, and the `guestpull gc` runs
 * beside the daemon. Leftovers are looked for first (staging directories in bundles and in
 * work_dir/staging, bundle directories, mounts under the run directory), then
 * `guestpull fsck --json`. The soak removes every bundle as the runtime does (unmount, rm), which
 * leaves the records of overlay bundles pulled since the daemon last opened its store: fsck calls
 * them `bundle-unmounted`. Those, and only for bundles the soak removed, are excused; then
 * `guestpull gc` collects them and a second fsck must be clean.
 */
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { readdir, readFile } from 'node:fs/promises';
import path from 'node:path';
import { z } from 'zod';
import { mountsUnder, readMounts } from '../../src/pull/store/mountinfo.js';
import { leftovers } from '../integration/fault-harness.js';
import type { SoakSummary } from './summary.js';

export interface CliResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

const OUTPUT_LIMIT = 32 * 1024 * 1024;

/** `node dist/cli.js ARGS…`, its exit code and output (each capped). */
export function runCli(repoRoot: string, args: string[], timeoutMs = 120_000): Promise<CliResult> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [path.join(repoRoot, 'dist', 'cli.js'), ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (b: Buffer) => void (stdout.length < OUTPUT_LIMIT && (stdout += b.toString('utf8'))));
    child.stderr.on('data', (b: Buffer) => void (stderr.length < OUTPUT_LIMIT && (stderr += b.toString('utf8'))));
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.once('error', (e) => {
      clearTimeout(timer);
      resolve({ code: null, stdout, stderr: `${stderr}${e.message}` });
    });
    child.once('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
  });
}

export async function findLeftovers(runDir: string, bundleRoot: string, workDir: string): Promise<SoakSummary['leftovers']> {
  const staging = await leftovers(bundleRoot, workDir);
  const bundles = existsSync(bundleRoot) ? (await readdir(bundleRoot)).map((b) => path.join(bundleRoot, b)) : [];
  const mounts = mountsUnder(readMounts(), runDir).map((m) => m.mountPoint);
  return { staging, bundles, mounts };
}

const FsckJson = z.object({
  clean: z.boolean(),
  counts: z.object({ layers: z.number() }),
  problems: z.array(z.object({ kind: z.string(), path: z.string(), detail: z.string() })),
});
const RecordBundle = z.object({ bundle: z.string() });

async function fsck(repoRoot: string, workDir: string): Promise<{ code: number | null; report?: z.infer<typeof FsckJson>; error?: string }> {
  const r = await runCli(repoRoot, ['fsck', '--work-dir', workDir, '--json']);
  try {
    return { code: r.code, report: FsckJson.parse(JSON.parse(r.stdout)) };
  } catch (e) {
    return { code: r.code, error: `fsck printed no report (${e instanceof Error ? e.message.slice(0, 200) : String(e)}): ${r.stderr.slice(-1000)}` };
  }
}

/** Whether a `bundle-unmounted` record names a bundle under `bundleRoot` that no longer exists. */
async function removedBySoak(recordFile: string, bundleRoot: string): Promise<boolean> {
  try {
    const rec = RecordBundle.parse(JSON.parse(await readFile(recordFile, 'utf8')));
    return rec.bundle.startsWith(bundleRoot + path.sep) && !existsSync(rec.bundle);
  } catch {
    return false;
  }
}

export async function checkStore(repoRoot: string, workDir: string, bundleRoot: string): Promise<SoakSummary['fsck']> {
  const first = await fsck(repoRoot, workDir);
  if (!first.report) return { exitCode: first.code, clean: false, problems: [{ kind: 'no-report', path: workDir, detail: first.error ?? '' }], excused: 0, layers: 0, afterGc: null };
  const problems: SoakSummary['fsck']['problems'] = [];
  let excused = 0;
  for (const p of first.report.problems) {
    if (p.kind === 'bundle-unmounted' && (await removedBySoak(p.path, bundleRoot))) excused++;
    else problems.push({ kind: p.kind, path: p.path, detail: p.detail });
  }
  const base = { exitCode: first.code, problems, excused, layers: first.report.counts.layers };
  if (problems.length > 0) return { ...base, clean: false, afterGc: null };
  if (excused === 0) return { ...base, clean: first.code === 0 && first.report.clean, afterGc: null };
  const gc = await runCli(repoRoot, ['gc', '--work-dir', workDir]);
  const second = await fsck(repoRoot, workDir);
  const afterClean = gc.code === 0 && second.code === 0 && second.report?.clean === true;
  if (!afterClean) {
    for (const p of second.report?.problems ?? []) problems.push({ kind: `after gc: ${p.kind}`, path: p.path, detail: p.detail });
    if (gc.code !== 0) problems.push({ kind: 'gc-failed', path: workDir, detail: gc.stderr.slice(-1000) });
  }
  return { ...base, clean: afterClean, afterGc: { exitCode: second.code, clean: second.report?.clean ?? false } };
}

/** `guestpull gc --drop-unused` beside the running daemon; undefined when it exited 0, else why not. */
export async function dropUnused(repoRoot: string, workDir: string): Promise<string | undefined> {
  const r = await runCli(repoRoot, ['gc', '--work-dir', workDir, '--drop-unused']);
  return r.code === 0 ? undefined : `exit ${r.code}: ${(r.stderr || r.stdout).slice(-1000)}`;
}
