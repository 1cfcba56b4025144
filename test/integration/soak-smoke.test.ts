/**
 * Issue 8 §6: a short run of the soak (test/soak/soak.ts, what scripts/soak.sh runs after a
 * build) is part of the test suite, so it cannot rot. Two runs as child processes, side by side:
 *   - ~20 s, 3 clients, one SIGKILL + restart, small images, every OK bundle verified: it must
 *     exit 0 and its summary JSON must show pulls, OKs, no wrong bundle, a clean fsck, no leftover,
 *     no status outside the expected set, the log counter agreeing with the clients;
 *   - a few seconds with --tamper (one file of each bundle changed before it is verified): it
 *     must exit 1 reporting wrong bundles, which shows the soak can fail.
 * The seed is random and printed; GUESTPULL_SOAK_SEED fixes it.
 */
import { spawn } from 'node:child_process';
import { randomInt } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { hasRegistryBinary } from '../helpers/registry.js';
import { EXPECTED_STATUSES, SoakSummarySchema, type SoakSummary } from '../soak/summary.js';

const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const SEED = Number(process.env['GUESTPULL_SOAK_SEED'] ?? randomInt(1, 2 ** 31));
const RUN_TIMEOUT_MS = 100_000;
const isRoot = process.getuid?.() === 0;

interface Run {
  code: number | string | null;
  stdout: string;
  stderr: string;
  /** The daemon's log. */
  log: string;
  summary?: SoakSummary;
}

async function soak(dir: string, name: string, args: string[]): Promise<Run> {
  const json = path.join(dir, `${name}.json`);
  const all = ['tsx', 'test/soak/soak.ts', ...args, '--seed', String(SEED), '--json', json, '--log', path.join(dir, `${name}.log`)];
  const child = spawn('npx', all, { cwd: repoRoot, stdio: ['ignore', 'pipe', 'pipe'], detached: true });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (b: Buffer) => (stdout += b.toString('utf8')));
  child.stderr.on('data', (b: Buffer) => (stderr += b.toString('utf8')));
  const timer = setTimeout(() => {
    if (child.pid !== undefined) process.kill(-child.pid, 'SIGKILL');
  }, RUN_TIMEOUT_MS - 10_000);
  const code = await new Promise<number | string | null>((resolve) => child.once('close', (c, signal) => resolve(c ?? signal)));
  clearTimeout(timer);
  const run: Run = { code, stdout, stderr, log: await readFile(path.join(dir, `${name}.log`), 'utf8').catch(() => '') };
  if (existsSync(json)) run.summary = SoakSummarySchema.parse(JSON.parse(await readFile(json, 'utf8')));
  return run;
}

const explain = (r: Run): string =>
  `seed ${SEED}, exit ${r.code}\nstdout:\n${r.stdout}\nstderr:\n${r.stderr.slice(-4000)}\ndaemon log (tail):\n${r.log.slice(-8000)}`;

describe.skipIf(!isRoot)('scripts/soak.sh (test/soak/soak.ts), short runs', () => {
  let tmp = '';
  let clean: Run;
  let tampered: Run;

  beforeAll(async () => {
    if (!hasRegistryBinary()) throw new Error('docker-registry is not installed: apt-get install docker-registry');
    if (!existsSync(path.join(repoRoot, 'dist/cli.js'))) throw new Error('dist/cli.js is missing: run npm run build first');
    tmp = await mkdtemp(path.join(os.tmpdir(), 'guestpull-soak-smoke-'));
    [clean, tampered] = await Promise.all([
      // Every fault kind, truncated close-delimited bodies included: those used to trip undici 7's
      // `assert(!this.paused)` (nodejs/undici#5360) and end the process; the transport now refuses
      // such bodies unread (and retries), so a crash here fails the run.
      soak(tmp, 'clean', [
        '--seconds', '20', '--concurrency', '3', '--kill-every', '11', '--scale', '0.15', '--verify-every', '1',
        '--gc-every', '6', '--new-images-every', '5',
      ]),
      soak(tmp, 'tamper', ['--seconds', '3', '--concurrency', '1', '--scale', '0.05', '--verify-every', '1', '--gc-every', '0', '--cold', '0', '--tamper']),
    ]);
  }, RUN_TIMEOUT_MS);

  afterAll(async () => {
    if (tmp) await rm(tmp, { recursive: true, force: true });
  });

  it('a 20 s run with one kill is clean: exit 0, pulls and OKs, no wrong bundle, fsck clean, nothing left', () => {
    const s = clean.summary;
    expect(s, explain(clean)).toBeDefined();
    if (!s) return;
    expect({ code: clean.code, reasons: s.reasons, crashes: s.daemon.crashes }, explain(clean)).toEqual({ code: 0, reasons: [], crashes: [] });
    expect(s.clean).toBe(true);
    expect(s.seed).toBe(SEED);
    expect(s.pulls.started).toBeGreaterThan(0);
    expect(s.pulls.ok).toBeGreaterThan(0);
    expect(s.pulls.ok + s.pulls.failed).toBe(s.pulls.started);
    expect(Object.values(s.pulls.byStatus).reduce((a, b) => a + b, 0)).toBe(s.pulls.started);
    expect(s.bundles.wrong).toBe(0);
    expect(s.bundles.dirtyAfterFailure).toBe(0);
    // --verify-every 1: every OK bundle (a coalesced pair shares one) had its whole tree checked.
    expect(s.bundles.verified).toBeGreaterThanOrEqual(s.pulls.ok - s.pulls.duplicates);
    expect(s.fsck.clean).toBe(true);
    expect(s.leftovers).toEqual({ staging: [], bundles: [], mounts: [] });
    expect(s.unexpectedStatuses).toEqual({});
    for (const status of Object.keys(s.pulls.byStatus)) expect([...EXPECTED_STATUSES, 'ALREADY_EXISTS']).toContain(status);
    expect(s.errors).toEqual([]);
    // One kill in 20 s, the daemon started again after it.
    expect(s.kills).toBe(1);
    expect(s.daemon.starts).toBe(2);
    // The log counter reads the daemon's lines: every OK answer was logged first.
    expect(s.daemon.pullsDone).toBeGreaterThanOrEqual(s.pulls.ok);
    expect(s.daemon.logLines).toBeGreaterThan(s.pulls.ok);
    // The proxy's faults acted and the daemon survived them.
    expect(Object.values(s.faults.fired).reduce((a, b) => a + b, 0)).toBeGreaterThan(0);
    expect(s.rss.samples).toBeGreaterThan(0);
    expect(s.rss.peakMiB).toBeGreaterThan(10);
    expect(s.rss.finalMiB).toBeGreaterThan(10);
    expect(s.rss.finalMiB).toBeLessThanOrEqual(s.rss.peakMiB);
    expect(clean.stdout).toMatch(/^result: +CLEAN$/m);
    console.log(`soak smoke (seed ${SEED}):\n${clean.stdout}`);
  });

  it('a run that corrupts bundles before verifying them fails: exit 1, wrong bundles reported', () => {
    const s = tampered.summary;
    expect(s, explain(tampered)).toBeDefined();
    if (!s) return;
    expect(tampered.code, explain(tampered)).toBe(1);
    expect(s.clean).toBe(false);
    expect(s.settings.tamper).toBe(true);
    expect(s.pulls.ok).toBeGreaterThan(0);
    expect(s.bundles.wrong).toBeGreaterThan(0);
    expect(s.bundles.wrongDetails[0]).toMatch(/rootfs differs from the image in \d+ entries: .*content differs/);
    expect(s.reasons.some((r) => /wrong bundles \(must be 0\)/.test(r))).toBe(true);
    expect(tampered.stdout).toMatch(/^result: +FAILED$/m);
  });
});
