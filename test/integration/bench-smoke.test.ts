/**
 * Issue 7 §4: a small run of the benchmark is part of the test suite, so it cannot rot. Runs
 * `npx tsx bench/run.ts --smoke` (tiny versions of every image, one run, no warm-up) as a child
 * process and checks its JSON: every image × subject measured, numbers finite and positive,
 * medians and ratios consistent with the samples they come from, every guestpull bundle's rootfs
 * identical to the peer's umoci rootfs, the generated images what they claim to be, and nothing
 * left behind. Timings themselves are never asserted.
 */
import { spawn } from 'node:child_process';
import { existsSync, readdirSync } from 'node:fs';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BenchReportSchema, SUBJECTS, type BenchReport, type Result } from '../../bench/lib/report.js';
import { CONCURRENT_IMAGES, IMAGE_NAMES } from '../../bench/lib/images.js';
import { mountsUnder, readMounts } from '../../src/pull/store/mountinfo.js';
import { Binaries, hasBinary, type BinaryName } from '../helpers/binaries.js';

const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const RUN_TIMEOUT_MS = 300_000;

const needed: BinaryName[] = ['registry', 'skopeo', 'umoci', 'unshare', 'mount', 'setpriv'];
const missing = needed.filter((b) => !hasBinary(b)).map((b) => `${Binaries[b].path} (Debian package ${Binaries[b].pkg})`);
if (!existsSync('/usr/bin/time')) missing.push('/usr/bin/time (Debian package time)');
const notRoot = process.getuid?.() !== 0;
const skipReason = missing.length
  ? `skipped: ${missing.join(', ')} missing`
  : notRoot
    ? 'skipped: needs root (the peer runs skopeo in a private mount namespace, guestpull mounts overlays)'
    : '';
if (skipReason) console.warn(`bench-smoke: ${skipReason}`);

const median = (xs: number[]): number => {
  const s = [...xs].sort((a, b) => a - b);
  const m = Math.floor(s.length / 2);
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
};

describe.skipIf(skipReason !== '')(`bench/run.ts --smoke${skipReason ? ` (${skipReason})` : ''}`, () => {
  let tmp = '';
  let report: BenchReport;
  let stdout = '';
  let stderr = '';
  let exitCode: number | string | null = null;

  beforeAll(async () => {
    tmp = await mkdtemp(path.join(os.tmpdir(), 'guestpull-bench-smoke-'));
    const args = ['tsx', 'bench/run.ts', '--smoke', '--json', path.join(tmp, 'out.json'), '--cache-dir', path.join(tmp, 'cache'), '--tmp', path.join(tmp, 'work')];
    const child = spawn('npx', args, { cwd: repoRoot, stdio: ['ignore', 'pipe', 'pipe'], detached: true });
    child.stdout.on('data', (b: Buffer) => (stdout += b.toString('utf8')));
    child.stderr.on('data', (b: Buffer) => (stderr += b.toString('utf8')));
    const timer = setTimeout(() => {
      if (child.pid !== undefined) process.kill(-child.pid, 'SIGINT');
    }, RUN_TIMEOUT_MS - 20_000);
    exitCode = await new Promise((resolve) => child.once('close', (code, signal) => resolve(code ?? signal)));
    clearTimeout(timer);
    if (existsSync(path.join(tmp, 'out.json'))) {
      report = BenchReportSchema.parse(JSON.parse(await readFile(path.join(tmp, 'out.json'), 'utf8')));
    }
  }, RUN_TIMEOUT_MS);

  afterAll(async () => {
    if (tmp) await rm(tmp, { recursive: true, force: true });
  });

  const result = (image: string, subject: string): Result => {
    const r = report.results.find((x) => x.image === image && x.subject === subject);
    if (!r) throw new Error(`no result for ${image} / ${subject}`);
    return r;
  };

  it('exits 0 and writes a smoke report with the machine described', () => {
    expect(exitCode, `bench exited with ${exitCode}\nstderr:\n${stderr.slice(-6000)}\nstdout:\n${stdout.slice(-4000)}`).toBe(0);
    expect(report.mode).toBe('smoke');
    expect(report.settings.runs).toBe(1);
    expect(report.settings.warmup).toBe(0);
    expect(report.machine.cores).toBeGreaterThan(0);
    for (const field of [report.machine.cpuModel, report.machine.kernel, report.machine.node, report.machine.skopeo, report.machine.umoci]) {
      expect(field.length).toBeGreaterThan(0);
    }
    expect(report.machine.skopeo).toMatch(/skopeo version \d/);
    expect(report.machine.umoci).toMatch(/umoci version \d/);
  });

  it('measured every image × subject, with finite positive medians of its samples', () => {
    expect(report.images.map((i) => i.name)).toEqual([...IMAGE_NAMES]);
    for (const image of IMAGE_NAMES) {
      for (const subject of SUBJECTS) {
        const r = result(image, subject);
        expect(r.errors, `${image} / ${subject}`).toEqual([]);
        expect(r.n).toBe(1);
        expect(r.samples).toHaveLength(r.n);
        for (const key of ['wallS', 'cpuS', 'rssMiB'] as const) {
          const v = r[key];
          expect(v, `${image} / ${subject} ${key}`).not.toBeNull();
          expect(Number.isFinite(v)).toBe(true);
          expect(v!).toBeGreaterThan(0);
          expect(v).toBeCloseTo(median(r.samples.map((s) => s[key])), 9);
        }
      }
    }
  });

  it('computes each ratio from the medians it names', () => {
    for (const image of IMAGE_NAMES) {
      const pairs = [['pull-cli', 'peer'], ['daemon-cold', 'peer'], ['daemon-cached', 'daemon-cold']] as const;
      for (const [subject, over] of pairs) {
        const ratio = report.ratios.find((x) => x.image === image && x.subject === subject && x.over === over);
        expect(ratio, `${image}: ${subject} ÷ ${over}`).toBeDefined();
        const expected = result(image, subject).wallS! / result(image, over).wallS!;
        expect(Number.isFinite(expected)).toBe(true);
        expect(ratio!.wallRatio).toBeCloseTo(expected, 9);
      }
    }
    expect(report.ratios).toHaveLength(IMAGE_NAMES.length * 3);
  });

  it('every guestpull bundle (CLI, daemon cold, daemon cached) has the same rootfs as umoci unpacked', () => {
    for (const img of report.images) {
      for (const subject of ['pull-cli', 'daemon-cold', 'daemon-cached'] as const) {
        const r = result(img.name, subject);
        expect(r.mismatches, `${img.name} / ${subject}`).toEqual([]);
        expect(r.verified, `${img.name} / ${subject}`).toBe(true);
        // a rootfs with every regular file of the image in it, not an empty tree that matches an empty tree
        expect(r.rootfsEntries!).toBeGreaterThan(img.files * 0.9);
      }
      expect(result(img.name, 'peer').verified).toBeNull();
    }
  });

  it('generated the images it describes: layer counts, media types, medium-zstd = medium tars in zstd', () => {
    const byName = new Map(report.images.map((i) => [i.name, i]));
    const layerCounts: Record<string, number> = { small: 1, medium: 4, large: 1, 'medium-zstd': 4, 'many-files': 2 };
    for (const [name, n] of Object.entries(layerCounts)) expect(byName.get(name)!.layers, name).toHaveLength(n);
    for (const img of report.images) {
      const type = img.name === 'medium-zstd' ? 'application/vnd.oci.image.layer.v1.tar+zstd' : 'application/vnd.oci.image.layer.v1.tar+gzip';
      for (const l of img.layers) {
        expect(l.mediaType).toBe(type);
        expect(l.size).toBeGreaterThan(0);
        expect(l.uncompressedSize).toBeGreaterThan(l.size);
      }
      // smoke images are tiny: a few hundred KB and at most a few hundred files
      expect(img.uncompressedBytes).toBeLessThan(2e6);
      expect(img.files).toBeLessThan(1000);
    }
    const medium = byName.get('medium')!;
    const zstd = byName.get('medium-zstd')!;
    expect(zstd.layers.map((l) => l.diffId)).toEqual(medium.layers.map((l) => l.diffId));
    expect(zstd.layers.map((l) => l.digest)).not.toEqual(medium.layers.map((l) => l.digest));
  });

  it('ran the concurrent section on the four images and computed its check from the single-pull CPU medians', () => {
    const c = report.concurrent;
    if ('skipped' in c) throw new Error(`concurrent section skipped: ${c.skipped}`);
    expect(c.images).toEqual([...CONCURRENT_IMAGES]);
    expect(c.errors).toEqual([]);
    expect(c.n).toBe(1);
    expect(c.wallS!).toBeGreaterThan(0);
    expect(c.cpuS!).toBeGreaterThan(0);
    expect(c.rssMiB!).toBeGreaterThan(0);
    const sum = c.images.reduce((acc, name) => acc + result(name, 'daemon-cold').cpuS!, 0);
    expect(c.singleCpuSumS).toBeCloseTo(sum, 9);
    expect(c.cores).toBe(report.machine.cores);
    expect(c.check).toBeCloseTo(c.wallS! / (sum / c.cores), 9);
    expect(c.verified).toBe(true);
  });

  it('prints the machine and one Markdown row per image × subject', () => {
    expect(stdout).toContain(`Machine: ${report.machine.cores} cores`);
    expect(stdout).toContain('| image | subject | n | median wall s |');
    for (const image of IMAGE_NAMES) {
      const rows = stdout.split('\n').filter((l) => l.startsWith(`| ${image} | `));
      expect(rows, image).toHaveLength(SUBJECTS.length);
    }
  });

  it('leaves no work dirs, bundles or mounts behind', () => {
    const work = path.join(tmp, 'work');
    expect(existsSync(work) ? readdirSync(work) : []).toEqual([]);
    expect(mountsUnder(readMounts(), tmp)).toEqual([]);
    // the cache holds exactly one finished entry per image
    const cached = readdirSync(path.join(tmp, 'cache'));
    expect(cached).toHaveLength(IMAGE_NAMES.length);
    for (const name of IMAGE_NAMES) expect(cached.filter((c) => new RegExp(`^${name}-[0-9a-f]{16}$`).test(c)), name).toHaveLength(1);
  });
});
