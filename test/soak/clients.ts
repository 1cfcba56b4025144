/**
 * Soak: one client loop. Each round: wait until the daemon is up, pick an image (mostly of the
 * newest generation, ./images.ts; sometimes one pushed for this round alone) and a fresh bundle, and make one PullImage call, or an identical pair into the same bundle (coalescing;
 * sometimes the first of the pair with a short deadline), or a call with a short deadline, or one
 * cancelled after a moment. Then: an OK bundle must be the image (digest, config.json args, and
 * on every Nth the whole tree against the expected one); a bundle whose pulls all failed, with no
 * kill involved, must be empty or gone within 2 s, or hold exactly config.json + rootfs (the pull
 * finished as the deadline or cancel came) and then be the image; a bundle a kill interrupted
 * after its config.json was written must be the image too. Finally the bundle is unmounted and removed,
 * as the runtime does.
 */
import { status as Status } from '@grpc/grpc-js';
import { existsSync } from 'node:fs';
import { appendFile, readdir, readFile } from 'node:fs/promises';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { z } from 'zod';
import { startPull, type PullCall, type PullOutcome } from '../integration/fault-harness.js';
import { removeTree } from '../helpers/cleanup.js';
import { diffTrees, snapshotTree, type TreeEntry } from '../helpers/tree.js';
import type { SoakDaemon } from './daemon.js';
import type { SoakImage, SoakImages } from './images.js';
import { EXPECTED_STATUSES } from './summary.js';

export interface ClientStats {
  started: number;
  ok: number;
  failed: number;
  byStatus: Record<string, number>;
  duplicates: number;
  duplicateLate: number;
  shortDeadline: number;
  clientCancels: number;
  coldRounds: number;
  overlappedKill: number;
  cancelledAtEnd: number;
  unexpected: Record<string, number>;
  unexpectedDetails: string[];
  /** OK bundles seen (every `verifyEvery`th gets the full tree check). */
  okBundles: number;
  verified: number;
  wrong: number;
  wrongDetails: string[];
  dirty: number;
  dirtyDetails: string[];
  /** Failed calls (no kill) whose pull finished anyway: the bundle is complete and must be the image. */
  completeUnanswered: number;
  errors: string[];
}

export function newClientStats(): ClientStats {
  return {
    started: 0, ok: 0, failed: 0, byStatus: {}, duplicates: 0, duplicateLate: 0, shortDeadline: 0, clientCancels: 0, coldRounds: 0,
    overlappedKill: 0, cancelledAtEnd: 0, unexpected: {}, unexpectedDetails: [], okBundles: 0, verified: 0, wrong: 0,
    wrongDetails: [], dirty: 0, dirtyDetails: [], completeUnanswered: 0, errors: [],
  };
}

/** A call in flight; the soak cancels what is left when the run ends. */
export interface ActiveCall {
  call: PullCall;
  endCancelled: boolean;
}

export interface ClientContext {
  daemon: SoakDaemon;
  /** host:port the daemon pulls through (the fault proxy). */
  registryHost: string;
  images: SoakImages;
  bundleRoot: string;
  deadlineMs: number;
  verifyEvery: number;
  /** Share of rounds that pull an image pushed for them alone. */
  cold: number;
  tamper: boolean;
  stats: ClientStats;
  active: Set<ActiveCall>;
  stopping(): boolean;
}

const DETAILS = 10;
const CLEAN_WITHIN_MS = 2000;
const Spec = z.object({ process: z.object({ args: z.array(z.string()) }) });

const int = (rnd: () => number, lo: number, hi: number): number => lo + Math.floor(rnd() * (hi - lo + 1));
const note = (list: string[], s: string): void => void (list.length < DETAILS && list.push(s.slice(0, 1500)));

type Kind = 'normal' | 'short' | 'cancel' | 'dup';

/** Runs rounds until `stopping()`. */
export async function clientLoop(id: number, rnd: () => number, ctx: ClientContext): Promise<void> {
  let round = 0;
  for (;;) {
    await ctx.daemon.ready();
    if (ctx.stopping()) return;
    const cold = rnd() < ctx.cold;
    let img: SoakImage;
    try {
      img = cold ? await ctx.images.fresh(rnd) : ctx.images.pick(rnd);
    } catch (e) {
      note(ctx.stats.errors, `client ${id}: pushing an image of its own failed: ${e instanceof Error ? e.message : String(e)}`);
      await sleep(200);
      continue;
    }
    if (cold) ctx.stats.coldRounds++;
    const bundle = path.join(ctx.bundleRoot, `c${id}-${++round}`);
    try {
      await oneRound(rnd, ctx, img, bundle);
    } catch (e) {
      note(ctx.stats.errors, `client ${id}, ${bundle}: ${e instanceof Error ? (e.stack ?? e.message) : String(e)}`);
      await sleep(200);
    }
  }
}

async function oneRound(rnd: () => number, ctx: ClientContext, img: SoakImage, bundle: string): Promise<void> {
  const { stats, daemon } = ctx;
  const ref = `${ctx.registryHost}/${img.path}`;
  const x = rnd();
  const plan: { kind: Kind; deadlineMs: number; cancelAfterMs?: number }[] = [];
  if (x < 0.12) {
    plan.push({ kind: rnd() < 0.3 ? 'short' : 'normal', deadlineMs: ctx.deadlineMs }, { kind: 'dup', deadlineMs: ctx.deadlineMs });
    if (plan[0]!.kind === 'short') plan[0]!.deadlineMs = int(rnd, 100, 2500);
  } else if (x < 0.22) plan.push({ kind: 'short', deadlineMs: int(rnd, 100, 2500) });
  else if (x < 0.27) plan.push({ kind: 'cancel', deadlineMs: ctx.deadlineMs, cancelAfterMs: int(rnd, 20, 2000) });
  else plan.push({ kind: 'normal', deadlineMs: ctx.deadlineMs });

  // Pushing an image of its own took a moment: the daemon may be restarting by now.
  await daemon.ready();
  const epoch = daemon.epoch;
  const calls = plan.map((p) => {
    const active: ActiveCall = { call: startPull(daemon.address, ref, bundle, p.deadlineMs), endCancelled: false };
    ctx.active.add(active);
    stats.started++;
    if (p.kind === 'dup') stats.duplicates++;
    if (p.kind === 'short') stats.shortDeadline++;
    let timer: NodeJS.Timeout | undefined;
    if (p.cancelAfterMs !== undefined) {
      stats.clientCancels++;
      timer = setTimeout(() => active.call.cancel(), p.cancelAfterMs);
    }
    return active.call.outcome.then((o) => {
      clearTimeout(timer);
      ctx.active.delete(active);
      return { o, endCancelled: active.endCancelled, kind: p.kind };
    });
  });
  const results = await Promise.all(calls);
  const overlapped = daemon.epoch !== epoch;
  if (overlapped) stats.overlappedKill += results.length;

  for (const r of results) {
    const name = statusName(r.o);
    stats.byStatus[name] = (stats.byStatus[name] ?? 0) + 1;
    if (r.o.ok) stats.ok++;
    else stats.failed++;
    if (r.endCancelled) stats.cancelledAtEnd++;
    if (r.o.ok && r.o.digest !== img.digest) {
      stats.wrong++;
      note(stats.wrongDetails, `${ref} → ${bundle}: answered digest ${r.o.digest}, the image is ${img.digest}`);
    }
    const late = r.kind === 'dup' && !r.o.ok && r.o.code === Status.ALREADY_EXISTS && results[0]!.o.ok;
    if (late) stats.duplicateLate++;
    else if (!(EXPECTED_STATUSES as readonly string[]).includes(name)) {
      stats.unexpected[name] = (stats.unexpected[name] ?? 0) + 1;
      note(stats.unexpectedDetails, `${name} ${ref} → ${bundle} (${r.kind}): ${r.o.ok ? '' : r.o.details}`);
    }
  }

  try {
    // After a kill, let the restarted daemon open its store (and clean up) before the bundle goes.
    if (overlapped) await daemon.ready();
    if (results.some((r) => r.o.ok)) {
      await checkBundle(ctx, img, bundle, ref);
    } else if (overlapped) {
      // Killed between config.json and the answer: complete, so it must be the image.
      if (existsSync(path.join(bundle, 'config.json'))) await checkBundle(ctx, img, bundle, ref, true);
    } else if (!results.some((r) => r.endCancelled)) {
      // Nothing of the pull, or (its deadline or cancel came as it finished) the complete image.
      const left = await untilClean(bundle);
      if (left.length === 2 && left.includes('config.json') && left.includes('rootfs')) {
        stats.completeUnanswered++;
        await checkBundle(ctx, img, bundle, ref, true);
      } else if (left.length > 0) {
        stats.dirty++;
        note(stats.dirtyDetails, `${bundle} (${ref}, ${results.map((r) => statusName(r.o)).join('/')}) still holds ${left.join(', ')} after ${CLEAN_WITHIN_MS} ms`);
      }
    }
  } finally {
    await removeTree(bundle);
  }
}

function statusName(o: PullOutcome): string {
  return o.ok ? 'OK' : (Status[o.code] ?? `code ${o.code}`);
}

/** What the bundle still holds, polled until it is empty or gone or the time is up. */
async function untilClean(bundle: string): Promise<string[]> {
  const t0 = performance.now();
  for (;;) {
    const left = existsSync(bundle) ? await readdir(bundle).catch(() => []) : [];
    if (left.length === 0 || performance.now() - t0 > CLEAN_WITHIN_MS) return left;
    await sleep(50);
  }
}

/** The bundle is the image: config.json args always; the whole tree on every Nth (or `full`). */
async function checkBundle(ctx: ClientContext, img: SoakImage, bundle: string, ref: string, full = false): Promise<void> {
  const { stats } = ctx;
  const wrong = (why: string): void => {
    stats.wrong++;
    note(stats.wrongDetails, `${ref} → ${bundle}: ${why}`);
  };
  stats.okBundles++;
  let spec: z.infer<typeof Spec>;
  try {
    spec = Spec.parse(JSON.parse(await readFile(path.join(bundle, 'config.json'), 'utf8')));
  } catch (e) {
    return wrong(`config.json: ${e instanceof Error ? e.message.slice(0, 300) : String(e)}`);
  }
  if (JSON.stringify(spec.process.args) !== JSON.stringify(img.args)) return wrong(`config.json process.args ${JSON.stringify(spec.process.args)}, expected ${JSON.stringify(img.args)}`);
  if (!full && (stats.okBundles - 1) % ctx.verifyEvery !== 0) return;
  const rootfs = path.join(bundle, 'rootfs');
  if (ctx.tamper) {
    const victim = img.expected.find((e) => e.type === 'file' && e.size > 0);
    if (victim) await appendFile(path.join(rootfs, victim.path), 'tampered by the soak self-test');
  }
  stats.verified++;
  let actual: TreeEntry[];
  try {
    actual = await snapshotTree(rootfs);
  } catch (e) {
    return wrong(`rootfs unreadable: ${e instanceof Error ? e.message.slice(0, 300) : String(e)}`);
  }
  const diffs = diffTrees(img.expected, actual);
  if (diffs.length > 0) wrong(`rootfs differs from the image in ${diffs.length} entries: ${diffs.slice(0, 5).join('; ')}`);
}
