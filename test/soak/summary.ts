/**
 * Soak: the summary of a run: its JSON shape (zod, so the smoke test parses what it reads), the
 * verdict (what makes a run unclean) and the lines printed at the end.
 */
import { z } from 'zod';

/** Statuses a pull may end with under faults, deadlines, cancels and kills. */
export const EXPECTED_STATUSES = ['OK', 'UNAVAILABLE', 'DEADLINE_EXCEEDED', 'CANCELLED', 'DATA_LOSS'] as const;

const Count = z.number().int().min(0);
const Counts = z.record(z.string(), Count);

export const SoakSummarySchema = z.object({
  version: z.literal(1),
  seed: z.number(),
  settings: z.object({
    seconds: z.number(),
    concurrency: z.number(),
    killEverySecs: z.number(),
    gcEverySecs: z.number(),
    newImagesEverySecs: z.number(),
    cold: z.number(),
    without: z.array(z.string()),
    snapshotter: z.string(),
    verifyEvery: z.number(),
    scale: z.number(),
    deadlineSecs: z.number(),
    tamper: z.boolean(),
  }),
  /** The images of the last generation. */
  images: z.array(z.object({ name: z.string(), layers: Count, bytes: Count, unpackedBytes: Count })),
  /** Image generations pushed (the first included). */
  generations: Count,
  durationSecs: z.number(),
  /** Ended early by Ctrl-C (the terminal's signal reaches the registry too: what failed after it means little). */
  interrupted: z.boolean(),
  pulls: z.object({
    /** PullImage calls made (a duplicate pair is two). */
    started: Count,
    ok: Count,
    failed: Count,
    byStatus: Counts,
    /** Calls made as the second of an identical pair (coalescing). */
    duplicates: Count,
    /** The second of a pair that came after the first had finished: ALREADY_EXISTS, allowed. */
    duplicateLate: Count,
    shortDeadline: Count,
    clientCancels: Count,
    /** Rounds that pulled an image pushed for them alone (cold: every layer fetched). */
    coldRounds: Count,
    /** Calls in flight when the daemon was killed. */
    overlappedKill: Count,
    /** Calls still running when the run ended, cancelled by the soak. */
    cancelledAtEnd: Count,
  }),
  /** Statuses outside EXPECTED_STATUSES (late duplicates excepted). */
  unexpectedStatuses: Counts,
  unexpectedDetails: z.array(z.string()),
  bundles: z.object({
    verified: Count,
    /** OK bundles that were not the image: wrong digest, missing files, a tree that differs. */
    wrong: Count,
    wrongDetails: z.array(z.string()),
    /** Bundles a failed pull (no kill involved) left holding something after 2 s. */
    dirtyAfterFailure: Count,
    dirtyDetails: z.array(z.string()),
    /** Failed calls (no kill) whose pull completed anyway: checked in full like an OK one. */
    completeUnanswered: Count,
  }),
  daemon: z.object({
    starts: Count,
    /** Exits of the daemon that were not the soak's kills or stop (must be none). */
    crashes: z.array(z.string()),
    /** "PullImage done" / "PullImage failed" lines: the log counter's cross-check with the clients' counts. */
    pullsDone: Count,
    pullsFailed: Count,
    retries: Count,
    manifestRetries: Count,
    resumes: Count,
    joins: Count,
    abandoned: Count,
    logLines: Count,
    errorLines: Count,
    lastErrors: z.array(z.string()),
    retryReasons: Counts,
  }),
  faults: z.object({ mixes: Count, byMix: Counts, fired: Counts, requests: Count, rangeRequests: Count }),
  kills: Count,
  gc: z.object({ runs: Count, failures: z.array(z.string()) }),
  rss: z.object({
    samples: Count,
    /** Highest VmHWM of any daemon process of the run. */
    peakMiB: z.number(),
    /** VmRSS at the first sample, ~2 s in. */
    firstMiB: z.number(),
    /** VmRSS of the daemon at the end, idle, before it was stopped. */
    finalMiB: z.number(),
    /** [seconds into the run, VmRSS MiB], about every 10 s. */
    series: z.array(z.tuple([z.number(), z.number()])),
  }),
  fsck: z.object({
    exitCode: z.number().nullable(),
    /** No problem left but the records of overlay bundles the soak removed (the runtime's unmount), and a clean fsck after gc. */
    clean: z.boolean(),
    problems: z.array(z.object({ kind: z.string(), path: z.string(), detail: z.string() })),
    excused: Count,
    layers: Count,
    afterGc: z.object({ exitCode: z.number().nullable(), clean: z.boolean() }).nullable(),
  }),
  leftovers: z.object({ staging: z.array(z.string()), bundles: z.array(z.string()), mounts: z.array(z.string()) }),
  /** What went wrong in the soak itself: a client round that threw, a daemon that did not come back. */
  errors: z.array(z.string()),
  clean: z.boolean(),
  reasons: z.array(z.string()),
});
export type SoakSummary = z.infer<typeof SoakSummarySchema>;
export type SoakFacts = Omit<SoakSummary, 'clean' | 'reasons'>;

/** Why the run is not clean; empty when it is. */
export function verdict(s: SoakFacts): string[] {
  const out: string[] = [];
  if (s.interrupted) out.push('interrupted by Ctrl-C (which stops the registry too): not a complete run');
  if (s.pulls.started === 0) out.push('no pull was started');
  else if (s.pulls.ok === 0) out.push('no pull succeeded');
  if (s.bundles.wrong > 0) out.push(`${s.bundles.wrong} wrong bundles (must be 0): ${s.bundles.wrongDetails.slice(0, 3).join(' | ')}`);
  if (s.bundles.dirtyAfterFailure > 0) out.push(`${s.bundles.dirtyAfterFailure} bundles not clean after a failed pull (must be 0): ${s.bundles.dirtyDetails.slice(0, 3).join(' | ')}`);
  const unexpected = Object.entries(s.unexpectedStatuses).filter(([, n]) => n > 0);
  if (unexpected.length > 0) out.push(`statuses outside {${EXPECTED_STATUSES.join(', ')}}: ${unexpected.map(([k, n]) => `${k} ${n}`).join(', ')}: ${s.unexpectedDetails.slice(0, 3).join(' | ')}`);
  if (!s.fsck.clean) out.push(`fsck not clean (exit ${s.fsck.exitCode}): ${s.fsck.problems.slice(0, 3).map((p) => `${p.kind} ${p.path}: ${p.detail}`).join(' | ')}`);
  const left = [...s.leftovers.staging, ...s.leftovers.bundles, ...s.leftovers.mounts];
  if (left.length > 0) out.push(`${left.length} leftovers (must be 0): ${left.slice(0, 5).join(', ')}`);
  if (s.daemon.crashes.length > 0) out.push(`the daemon exited on its own ${s.daemon.crashes.length} times: ${s.daemon.crashes.slice(0, 2).join('\n')}`);
  if (s.errors.length > 0) out.push(`${s.errors.length} errors: ${s.errors.slice(0, 2).join(' | ')}`);
  if (s.gc.failures.length > 0) out.push(`guestpull gc failed ${s.gc.failures.length} times: ${s.gc.failures[0]}`);
  return out;
}

const mib = (n: number): string => n.toFixed(1);
const list = (c: Record<string, number>): string =>
  Object.entries(c)
    .filter(([, n]) => n > 0)
    .sort((a, b) => b[1] - a[1])
    .map(([k, n]) => `${k} ${n}`)
    .join(', ') || 'none';

/** The human summary, one line per topic. */
export function formatSummary(s: SoakSummary): string {
  const st = s.settings;
  const failed = Object.fromEntries(Object.entries(s.pulls.byStatus).filter(([k]) => k !== 'OK'));
  const f = s.fsck;
  const fsckText = !f.clean
    ? `NOT CLEAN (exit ${f.exitCode}${f.afterGc ? `, after gc ${f.afterGc.exitCode}` : ''}): ${f.problems.length} problems`
    : f.excused > 0
      ? `clean (exit ${f.afterGc?.exitCode} after gc; before it, exit ${f.exitCode} only for the ${f.excused} records of overlay bundles the soak removed), ${f.layers} layers`
      : `clean (exit ${f.exitCode}), ${f.layers} layers`;
  const lines = [
    `soak: ${s.durationSecs.toFixed(0)} s, concurrency ${st.concurrency}, kill every ${st.killEverySecs || '-'} s, gc every ${st.gcEverySecs || '-'} s, new images every ${st.newImagesEverySecs || "-"} s, cold ${st.cold}, snapshotter ${st.snapshotter}, scale ${st.scale}${st.without.length > 0 ? `, without ${st.without.join(',')}` : ''}, seed ${s.seed}${st.tamper ? ', TAMPER self-test' : ''}`,
    `pulls:     started ${s.pulls.started}, OK ${s.pulls.ok}, failed ${s.pulls.failed} (${list(failed)})`,
    `           duplicates ${s.pulls.duplicates} (late ${s.pulls.duplicateLate}), short deadlines ${s.pulls.shortDeadline}, client cancels ${s.pulls.clientCancels}, cold rounds ${s.pulls.coldRounds}, in flight at a kill ${s.pulls.overlappedKill}, cancelled at the end ${s.pulls.cancelledAtEnd}`,
    `bundles:   verified ${s.bundles.verified} (OK ${s.pulls.ok}, failed but complete ${s.bundles.completeUnanswered}), wrong ${s.bundles.wrong}, not clean after a failure ${s.bundles.dirtyAfterFailure}`,
    `statuses:  unexpected ${list(s.unexpectedStatuses)}`,
    `network:   retries ${s.daemon.retries} + manifest re-reads ${s.daemon.manifestRetries}, resumes ${s.daemon.resumes} (Range requests seen ${s.faults.rangeRequests}); coalesced joins ${s.daemon.joins}, abandoned ${s.daemon.abandoned}`,
    `faults:    ${s.faults.mixes} mixes, fired ${list(s.faults.fired)}; ${s.faults.requests} requests through the proxy`,
    `daemon:    kills ${s.kills}, starts ${s.daemon.starts}, crashes ${s.daemon.crashes.length}, gc runs ${s.gc.runs}, image generations ${s.generations}, error log lines ${s.daemon.errorLines}; logged PullImage done ${s.daemon.pullsDone} / failed ${s.daemon.pullsFailed}`,
    `rss:       peak ${mib(s.rss.peakMiB)} MiB (VmHWM), final ${mib(s.rss.finalMiB)} MiB (VmRSS; first sample ${mib(s.rss.firstMiB)}), ${s.rss.samples} samples`,
    `fsck:      ${fsckText}`,
    `leftovers: staging ${s.leftovers.staging.length}, bundles ${s.leftovers.bundles.length}, mounts ${s.leftovers.mounts.length}`,
    s.clean ? 'result:    CLEAN' : `result:    FAILED\n  - ${s.reasons.join('\n  - ')}`,
  ];
  return lines.join('\n') + '\n';
}
