/**
 * The benchmark's results: the JSON document (its zod schema, so the smoke test reads it through
 * the same contract), medians and ratios computed from the samples, and the Markdown tables.
 */
import { z } from 'zod';
import { median, type Sample } from './measure.js';

export const SUBJECTS = ['pull-cli', 'daemon-cold', 'daemon-cached', 'peer'] as const;
export type SubjectId = (typeof SUBJECTS)[number];
export const SUBJECT_LABELS: Record<SubjectId, string> = {
  'pull-cli': 'guestpull pull (one-shot CLI, cold)',
  'daemon-cold': 'PullImage on the daemon (cold)',
  'daemon-cached': 'PullImage, 2nd bundle (layers cached)',
  peer: 'peer: skopeo copy + umoci unpack',
};

const SampleSchema = z.object({ wallS: z.number(), cpuS: z.number(), rssMiB: z.number() });
const ResultSchema = z.object({
  image: z.string(),
  subject: z.enum(SUBJECTS),
  n: z.number().int(),
  wallS: z.number().nullable(),
  cpuS: z.number().nullable(),
  rssMiB: z.number().nullable(),
  samples: z.array(SampleSchema.extend({ rootfs: z.string().optional() })),
  /** every measured bundle's rootfs matched the peer's umoci rootfs; null: not checked */
  verified: z.boolean().nullable(),
  /** entries in the last compared rootfs (null: not compared) */
  rootfsEntries: z.number().int().nullable(),
  mismatches: z.array(z.string()),
  errors: z.array(z.string()),
});
const RatioSchema = z.object({
  image: z.string(),
  subject: z.enum(SUBJECTS),
  over: z.enum(SUBJECTS),
  /** median wall of `subject` ÷ median wall of `over`, same image */
  wallRatio: z.number().nullable(),
});
const ConcurrentSchema = z.object({
  images: z.array(z.string()),
  n: z.number().int(),
  wallS: z.number().nullable(),
  cpuS: z.number().nullable(),
  rssMiB: z.number().nullable(),
  samples: z.array(SampleSchema),
  /** Σ over the images of the daemon-cold median CPU seconds */
  singleCpuSumS: z.number().nullable(),
  cores: z.number().int(),
  /** wallS ÷ (singleCpuSumS ÷ cores); the target is ≤ 1.3 */
  check: z.number().nullable(),
  target: z.number(),
  verified: z.boolean().nullable(),
  mismatches: z.array(z.string()),
  errors: z.array(z.string()),
});
export const MachineSchema = z.object({
  cores: z.number().int(),
  cpuModel: z.string(),
  memTotalMiB: z.number(),
  kernel: z.string(),
  node: z.string(),
  skopeo: z.string(),
  umoci: z.string(),
  registry: z.string(),
  workFs: z.string(),
});
export const ImageInfoSchema = z.object({
  name: z.string(),
  reference: z.string(),
  compression: z.string(),
  /** the peer's steps for this image */
  peer: z.string(),
  layers: z.array(z.object({ mediaType: z.string(), digest: z.string(), size: z.number(), diffId: z.string(), uncompressedSize: z.number(), entries: z.number() })),
  entries: z.number().int(),
  files: z.number().int(),
  compressedBytes: z.number(),
  uncompressedBytes: z.number(),
  manifestDigest: z.string(),
});
export const BenchReportSchema = z.object({
  schema: z.literal('guestpull-bench/1'),
  mode: z.enum(['full', 'smoke']),
  started: z.string(),
  finished: z.string(),
  command: z.string(),
  machine: MachineSchema,
  settings: z.object({ runs: z.number().int(), warmup: z.number().int(), snapshotter: z.string(), verify: z.boolean(), peakRssReset: z.string(), pageCache: z.string() }),
  images: z.array(ImageInfoSchema),
  results: z.array(ResultSchema),
  ratios: z.array(RatioSchema),
  concurrent: z.union([ConcurrentSchema, z.object({ skipped: z.string() })]),
});
export type BenchReport = z.infer<typeof BenchReportSchema>;
export type Result = z.infer<typeof ResultSchema>;
export type Ratio = z.infer<typeof RatioSchema>;
export type Concurrent = z.infer<typeof ConcurrentSchema>;
export type Machine = z.infer<typeof MachineSchema>;
export type ImageInfo = z.infer<typeof ImageInfoSchema>;

/** Collected samples of one image × subject during the rounds. */
export interface Collected {
  samples: (Sample & { rootfs?: string })[];
  errors: string[];
  mismatches: string[];
  /** rounds whose bundle was compared with the peer's, and how many matched */
  checked: number;
  matched: number;
  rootfsEntries: number | null;
}

export function emptyCollected(): Collected {
  return { samples: [], errors: [], mismatches: [], checked: 0, matched: 0, rootfsEntries: null };
}

const med = (xs: number[]): number | null => (xs.length ? median(xs) : null);

export function summarise(image: string, subject: SubjectId, c: Collected): Result {
  return {
    image,
    subject,
    n: c.samples.length,
    wallS: med(c.samples.map((s) => s.wallS)),
    cpuS: med(c.samples.map((s) => s.cpuS)),
    rssMiB: med(c.samples.map((s) => s.rssMiB)),
    samples: c.samples,
    verified: c.checked === 0 ? null : c.matched === c.checked && c.errors.length === 0,
    rootfsEntries: c.rootfsEntries,
    mismatches: c.mismatches.slice(0, 20),
    errors: c.errors,
  };
}

/** subject ÷ peer for the CLI and the cold daemon pull, cached ÷ cold for the cached pull. */
export function ratiosFor(image: string, results: Result[]): Ratio[] {
  const wall = (s: SubjectId): number | null => results.find((r) => r.image === image && r.subject === s)?.wallS ?? null;
  const ratio = (a: SubjectId, b: SubjectId): Ratio => {
    const x = wall(a);
    const y = wall(b);
    return { image, subject: a, over: b, wallRatio: x !== null && y !== null && y > 0 ? x / y : null };
  };
  return [ratio('pull-cli', 'peer'), ratio('daemon-cold', 'peer'), ratio('daemon-cached', 'daemon-cold')];
}

const f = (x: number | null, digits: number): string => (x === null ? '—' : x.toFixed(digits));
const ok = (v: boolean | null): string => (v === null ? '' : v ? ' ✓' : ' ✗');

export function markdown(report: BenchReport): string {
  const lines: string[] = [];
  const m = report.machine;
  lines.push(`Machine: ${m.cores} cores, ${m.cpuModel}, ${Math.round(m.memTotalMiB)} MiB RAM, Linux ${m.kernel}, Node ${m.node}, ${m.skopeo}, ${m.umoci}, ${m.registry}; work dirs on ${m.workFs}.`);
  lines.push(`Mode ${report.mode}: ${report.settings.runs} measured run(s) per subject after ${report.settings.warmup} warm-up round(s), subjects alternating (order rotated per round), snapshotter ${report.settings.snapshotter}, warm page cache.`);
  lines.push('');
  lines.push('| image | subject | n | median wall s | median CPU s | median peak RSS MiB | wall ratio |');
  lines.push('|---|---|---:|---:|---:|---:|---:|');
  for (const img of report.images) {
    for (const subject of SUBJECTS) {
      const r = report.results.find((x) => x.image === img.name && x.subject === subject);
      if (!r) continue;
      const ratio = report.ratios.find((x) => x.image === img.name && x.subject === subject);
      const ratioText = ratio ? `${f(ratio.wallRatio, 3)} × ${ratio.over === 'peer' ? 'peer' : 'cold'}` : '1 (peer)';
      const failed = r.errors.length ? ` (${r.errors.length} failed)` : '';
      lines.push(`| ${img.name} | ${SUBJECT_LABELS[subject]}${ok(r.verified)}${failed} | ${r.n} | ${f(r.wallS, 2)} | ${f(r.cpuS, 2)} | ${f(r.rssMiB, 0)} | ${ratioText} |`);
    }
  }
  lines.push('');
  for (const i of report.images.filter((x) => x.compression === 'zstd')) lines.push(`Peer for ${i.name}: ${i.peer}.`);
  lines.push('Images: ' + report.images.map((i) => `${i.name} (${i.layers.length} ${i.compression} layer(s), ${(i.uncompressedBytes / 1e6).toFixed(1)} MB tar → ${(i.compressedBytes / 1e6).toFixed(1)} MB, ${i.entries} entries)`).join('; ') + '.');
  const c = report.concurrent;
  lines.push('');
  if ('skipped' in c) {
    lines.push(`Concurrent pulls: skipped (${c.skipped}).`);
  } else {
    lines.push(`Concurrent pulls on one cold daemon: ${c.images.join(', ')} at once.`);
    lines.push('');
    lines.push('| n | median wall s | median daemon CPU s | median peak RSS MiB | Σ single-pull CPU s ÷ cores | check (target ≤ 1.3) |');
    lines.push('|---:|---:|---:|---:|---:|---:|');
    const denom = c.singleCpuSumS === null ? null : c.singleCpuSumS / c.cores;
    lines.push(`| ${c.n} | ${f(c.wallS, 2)} | ${f(c.cpuS, 2)} | ${f(c.rssMiB, 0)} | ${f(denom, 2)} | ${f(c.check, 3)}${ok(c.verified)} |`);
    if (c.errors.length) lines.push('', `Concurrent errors: ${c.errors.join(' | ')}`);
  }
  const failures = report.results.filter((r) => r.errors.length || r.mismatches.length);
  if (failures.length) {
    lines.push('', 'Problems:');
    for (const r of failures) {
      for (const e of r.errors) lines.push(`- ${r.image} / ${r.subject}: ${e.split('\n').slice(0, 6).join(' ⏎ ')}`);
      if (r.mismatches.length) lines.push(`- ${r.image} / ${r.subject}: rootfs differs from the peer's: ${r.mismatches.slice(0, 5).join('; ')}`);
    }
  }
  lines.push('', '✓ / ✗: the bundle rootfs matched / did not match the peer\'s umoci rootfs (paths, types, modes, owners, sizes, content, link targets).');
  return lines.join('\n');
}
