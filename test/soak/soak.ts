/**
 * Soak (issue 8 §6), run by scripts/soak.sh: mixed faults and load against the built daemon for a
 * set time, then a summary. A loopback distribution registry holds the images of ./images.ts; the
 * fault proxy (test/helpers/fault-proxy.ts) in front of it changes its faults every few seconds
 * (./faults.ts, seeded); the daemon pulls through it with tight timeouts; C clients loop
 * (./clients.ts); optionally the daemon is SIGKILLed and restarted every S seconds. So that layers
 * keep being fetched and unpacked, a new generation of every image is pushed every few seconds,
 * a share of rounds pulls an image pushed for it alone, and `guestpull gc --drop-unused` runs
 * beside the daemon. The daemon's RSS is sampled every 2 s. At the end: faults off, running calls given a grace period then cancelled,
 * the daemon stopped, leftovers looked for, fsck (./store-check.ts), summary printed (and written
 * as JSON with --json). Exit 0 on a clean run, 1 otherwise with the reasons, 2 on bad arguments.
 * Ctrl-C ends the run early with its summary (not clean: the registry gets the signal too); a
 * second one exits at once.
 */
import { randomInt } from 'node:crypto';
import { rmSync } from 'node:fs';
import { copyFile, mkdir, mkdtemp, realpath, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { MNT_DETACH, umount } from '../../src/native/index.js';
import { mountsUnder, readMounts } from '../../src/pull/store/mountinfo.js';
import { removeTree } from '../helpers/cleanup.js';
import { startFaultProxy, type FaultProxy } from '../helpers/fault-proxy.js';
import { startRegistry, type RunningRegistry } from '../helpers/registry.js';
import { prng } from '../helpers/synthetic-image.js';
import { clientLoop, newClientStats, type ActiveCall } from './clients.js';
import { SoakDaemon } from './daemon.js';
import { blobsRegex, FaultRotation } from './faults.js';
import { SoakImages } from './images.js';
import { MSG } from './logs.js';
import { parseSoakArgs, USAGE, type SoakOptions } from './options.js';
import { checkStore, dropUnused, findLeftovers } from './store-check.js';
import { formatSummary, verdict, type SoakFacts, type SoakSummary } from './summary.js';

const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const TIMEOUTS = { connectSecs: 2, headersSecs: 2, idleSecs: 2, maxAttempts: 4 };
const RSS_EVERY_MS = 2000;
const SERIES_EVERY = 5;
const KiB_PER_MiB = 1024;
/** Layers at least this large get the faults that act mid-body. */
const BIG_BLOB_BYTES = 64 * 1024;

const say = (s: string): void => void process.stderr.write(`soak: ${s}\n`);

function cdhToml(workDir: string, snapshotter: string, registryHost: string): string {
  return [
    '[image]',
    `work_dir = ${JSON.stringify(workDir)}`,
    `snapshotter = "${snapshotter}"`,
    `connect_timeout_secs = ${TIMEOUTS.connectSecs}`,
    `headers_timeout_secs = ${TIMEOUTS.headersSecs}`,
    `idle_timeout_secs = ${TIMEOUTS.idleSecs}`,
    `max_attempts = ${TIMEOUTS.maxAttempts}`,
    '[[image.registry_config.registry]]',
    `location = ${JSON.stringify(registryHost)}`,
    'insecure = true',
    '',
  ].join('\n');
}

/** A second Ctrl-C: kill the daemon, detach what is mounted in the run directory, remove it, exit 130. */
function hardExit(runDir: string, keep: boolean, killDaemon: () => void): never {
  say('interrupted again: exiting now');
  killDaemon();
  if (!keep) {
    try {
      for (const m of mountsUnder(readMounts(), runDir)) umount(m.mountPoint, MNT_DETACH);
      rmSync(runDir, { recursive: true, force: true });
    } catch (e) {
      say(`could not remove ${runDir}: ${e instanceof Error ? e.message : String(e)}`);
    }
  }
  process.exit(130);
}

async function run(opts: SoakOptions): Promise<SoakSummary> {
  const t0 = performance.now();
  const runDir = await realpath(await mkdtemp(path.join(os.tmpdir(), 'guestpull-soak-')));
  const workDir = path.join(runDir, 'work');
  const bundleRoot = path.join(runDir, 'bundles');
  await mkdir(bundleRoot);
  const logFile = opts.log ?? path.join(runDir, 'daemon.log');
  let registry: RunningRegistry | undefined;
  let proxy: FaultProxy | undefined;
  let daemon: SoakDaemon | undefined;
  let summary: SoakSummary | undefined;
  const errors: string[] = [];
  let endEarly: () => void = () => undefined;
  const ended = new Promise<void>((resolve) => (endEarly = resolve));
  // A terminal's Ctrl-C reaches this process twice (from the tty and relayed by tsx): repeats
  // within a second are the same one.
  let interruptedAt: number | undefined;
  const onSigint = (): void => {
    const now = performance.now();
    if (interruptedAt !== undefined) {
      if (now - interruptedAt > 1000) hardExit(runDir, opts.keep, () => daemon?.killNow());
      return;
    }
    interruptedAt = now;
    say('interrupted: ending the run (Ctrl-C again to exit at once)');
    endEarly();
  };
  process.on('SIGINT', onSigint);
  try {
    say(`seed ${opts.seed}; run directory ${runDir}`);
    registry = await startRegistry();
    say(`registry ${registry.host}: building and pushing images (scale ${opts.scale})…`);
    const images = await SoakImages.create(registry.url, opts.scale);
    proxy = await startFaultProxy({ target: registry.host });
    const config = path.join(runDir, 'cdh.toml');
    await writeFile(config, cdhToml(workDir, opts.snapshotter, proxy.host));
    daemon = new SoakDaemon({ repoRoot, socket: path.join(runDir, 'cdh.sock'), config, logFile, onDead: () => endEarly() });
    await daemon.start();
    const d = daemon;
    say(`daemon pid ${d.pid} pulling through fault proxy ${proxy.host}; ${opts.concurrency} clients for ${opts.seconds} s`);

    // RSS: VmHWM is per process, so the peak is the highest of any daemon of the run.
    const rss = { samples: 0, peakKiB: 0, firstKiB: 0, finalKiB: 0, series: [] as [number, number][] };
    const sample = async (): Promise<void> => {
      const r = await d.rss();
      if (!r) return;
      rss.samples++;
      if (rss.samples === 1) rss.firstKiB = r.rssKiB;
      rss.peakKiB = Math.max(rss.peakKiB, r.hwmKiB);
      rss.finalKiB = r.rssKiB;
      if (rss.samples % SERIES_EVERY === 1) rss.series.push([Math.round((performance.now() - t0) / 1000), Math.round((r.rssKiB / KiB_PER_MiB) * 10) / 10]);
    };
    const rssTimer = setInterval(() => void sample(), RSS_EVERY_MS);

    const faults = new FaultRotation(proxy, prng(opts.seed), {
      idleTimeoutMs: TIMEOUTS.idleSecs * 1000,
      headersTimeoutMs: TIMEOUTS.headersSecs * 1000,
      bigBlobs: blobsRegex(images.layerDigests(BIG_BLOB_BYTES)),
      without: new Set(opts.without),
    });
    faults.start();

    let stopping = false;

    let kills = 0;
    let killing: Promise<void> | undefined;
    const killTimer =
      opts.killEverySecs > 0
        ? setInterval(() => {
            if (stopping || killing) return;
            killing = (async () => {
              await sample();
              await d.killAndRestart();
              kills++;
            })()
              .catch((e: unknown) => {
                errors.push(`daemon restart after a kill failed: ${e instanceof Error ? e.message : String(e)}`);
                endEarly();
              })
              .finally(() => (killing = undefined));
          }, opts.killEverySecs * 1000)
        : undefined;

    const gc = { runs: 0, failures: [] as string[] };
    let collecting = false;
    const gcTimer =
      opts.gcEverySecs > 0
        ? setInterval(() => {
            if (stopping || collecting) return;
            collecting = true;
            void dropUnused(repoRoot, workDir)
              .then((failure) => {
                gc.runs++;
                if (failure !== undefined && gc.failures.length < 5) gc.failures.push(failure);
              })
              .finally(() => (collecting = false));
          }, opts.gcEverySecs * 1000)
        : undefined;

    let pushing: Promise<void> | undefined;
    const imagesTimer =
      opts.newImagesEverySecs > 0
        ? setInterval(() => {
            if (stopping || pushing) return;
            pushing = images
              .pushGeneration()
              .catch((e: unknown) => void errors.push(`pushing image generation ${images.generation + 1} failed: ${e instanceof Error ? e.message : String(e)}`))
              .finally(() => (pushing = undefined));
          }, opts.newImagesEverySecs * 1000)
        : undefined;

    const stats = newClientStats();
    const active = new Set<ActiveCall>();
    const ctx = {
      daemon: d, registryHost: proxy.host, images, bundleRoot, deadlineMs: opts.deadlineSecs * 1000,
      verifyEvery: opts.verifyEvery, cold: opts.cold, tamper: opts.tamper, stats, active, stopping: () => stopping,
    };
    const clients = Array.from({ length: opts.concurrency }, (_, i) => clientLoop(i + 1, prng((opts.seed + 0x9e3779b9 * (i + 1)) >>> 0), ctx));

    let timer: NodeJS.Timeout | undefined;
    await Promise.race([ended, new Promise<void>((resolve) => (timer = setTimeout(resolve, opts.seconds * 1000)))]);
    clearTimeout(timer);
    const durationSecs = (performance.now() - t0) / 1000;

    // The end: no new calls, no faults, no kills; running calls get a grace period, then are cancelled.
    stopping = true;
    clearInterval(killTimer);
    clearInterval(gcTimer);
    clearInterval(imagesTimer);
    await Promise.all([killing, pushing]);
    faults.stop();
    const graceMs = Math.min(20_000, Math.max(5000, opts.seconds * 100));
    say(`time is up: ${active.size} calls still running, waiting up to ${graceMs / 1000} s for them`);
    const allDone = Promise.all(clients);
    await Promise.race([allDone, sleep(graceMs)]);
    for (const a of active) {
      a.endCancelled = true;
      a.call.cancel();
    }
    await allDone;
    while (collecting) await sleep(50);
    // The idle daemon's RSS, then its graceful stop.
    await sleep(1000);
    await sample();
    clearInterval(rssTimer);
    await d.stop();

    const left = await findLeftovers(runDir, bundleRoot, workDir);
    say('fsck…');
    const fsck = await checkStore(repoRoot, workDir, bundleRoot);
    const c = d.counter;
    const facts: SoakFacts = {
      version: 1,
      seed: opts.seed,
      settings: {
        seconds: opts.seconds, concurrency: opts.concurrency, killEverySecs: opts.killEverySecs, gcEverySecs: opts.gcEverySecs,
        newImagesEverySecs: opts.newImagesEverySecs, cold: opts.cold, without: opts.without,
        snapshotter: opts.snapshotter, verifyEvery: opts.verifyEvery, scale: opts.scale, deadlineSecs: opts.deadlineSecs, tamper: opts.tamper,
      },
      images: images.latest.map((i) => ({ name: i.name, layers: i.layers, bytes: i.bytes, unpackedBytes: i.unpackedBytes })),
      generations: images.generation + 1,
      durationSecs,
      interrupted: interruptedAt !== undefined,
      pulls: {
        started: stats.started, ok: stats.ok, failed: stats.failed, byStatus: stats.byStatus, duplicates: stats.duplicates,
        duplicateLate: stats.duplicateLate, shortDeadline: stats.shortDeadline, clientCancels: stats.clientCancels, coldRounds: stats.coldRounds,
        overlappedKill: stats.overlappedKill, cancelledAtEnd: stats.cancelledAtEnd,
      },
      unexpectedStatuses: stats.unexpected,
      unexpectedDetails: stats.unexpectedDetails,
      bundles: { verified: stats.verified, wrong: stats.wrong, wrongDetails: stats.wrongDetails, dirtyAfterFailure: stats.dirty, dirtyDetails: stats.dirtyDetails, completeUnanswered: stats.completeUnanswered },
      daemon: {
        starts: d.starts, crashes: d.crashes, pullsDone: c.count(MSG.pullDone), pullsFailed: c.count(MSG.pullFailed),
        retries: c.count(MSG.retry), manifestRetries: c.count(MSG.manifestRetry), resumes: c.count(MSG.resume), joins: c.count(MSG.join), abandoned: c.count(MSG.abandon), logLines: c.lines, errorLines: c.errors, lastErrors: c.lastErrors,
        retryReasons: Object.fromEntries(c.reasons),
      },
      faults: { mixes: faults.mixes, byMix: faults.byMix, fired: faults.fired, requests: faults.requests, rangeRequests: faults.rangeRequests },
      kills,
      gc,
      rss: { samples: rss.samples, peakMiB: rss.peakKiB / KiB_PER_MiB, firstMiB: rss.firstKiB / KiB_PER_MiB, finalMiB: rss.finalKiB / KiB_PER_MiB, series: rss.series },
      fsck,
      leftovers: left,
      errors: [...errors, ...stats.errors],
    };
    const reasons = verdict(facts);
    summary = { ...facts, clean: reasons.length === 0, reasons };
    return summary;
  } finally {
    await daemon?.stop().catch(() => undefined);
    process.off('SIGINT', onSigint);
    await proxy?.close().catch(() => undefined);
    await registry?.stop().catch(() => undefined);
    if (opts.log === undefined && summary?.clean !== true) {
      const kept = path.join(os.tmpdir(), `guestpull-soak-${opts.seed}-daemon.log`);
      await copyFile(logFile, kept).then(
        () => say(`daemon log kept: ${kept}`),
        () => undefined,
      );
    }
    if (opts.keep) say(`run directory kept: ${runDir}`);
    else await removeTree(runDir);
  }
}

async function main(): Promise<number> {
  let opts: SoakOptions | 'help';
  try {
    opts = parseSoakArgs(process.argv.slice(2), () => randomInt(1, 2 ** 31));
  } catch (e) {
    process.stderr.write(`soak: ${e instanceof Error ? e.message : String(e)}\n${USAGE}`);
    return 2;
  }
  if (opts === 'help') {
    process.stdout.write(USAGE);
    return 0;
  }
  const summary = await run(opts);
  process.stdout.write(formatSummary(summary));
  if (opts.json) await writeFile(opts.json, `${JSON.stringify(summary, null, 2)}\n`);
  return summary.clean ? 0 : 1;
}

main().then(
  (code) => process.exit(code),
  (e: unknown) => {
    process.stderr.write(`soak: ${e instanceof Error ? (e.stack ?? e.message) : String(e)}\n`);
    process.exit(1);
  },
);
