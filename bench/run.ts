/**
 * guestpull's benchmark (issue 7): guestpull against the peer that does the same job on Linux
 * today, `skopeo copy` + `umoci unpack`, on deterministic images the project generates, served by
 * a loopback registry started for the run.
 *
 *   npm run bench -- [--images small,medium,large,medium-zstd,many-files] [--runs 3] [--smoke]
 *                    [--json bench/results/latest.json] [--no-concurrent] [--verify]
 *                    [--snapshotter auto|overlay|copy] [--cache-dir DIR] [--tmp DIR] [--tmpfs SIZE|0]
 *
 * Per image, one warm-up round (not counted) then `--runs` rounds; in each round the subjects run
 * one after the other, in an order rotated every round: the one-shot CLI (cold), the daemon
 * (a cold PullImage, then the same image into a second bundle: layers cached) and the peer. Cold
 * means a fresh, empty work dir and bundle; the page cache is NOT dropped (warm-cache runs: the
 * registry's blobs are read from memory, which is also what a guest pulling over a fast network
 * sees). Daemon start-up is not timed; its CPU is read from /proc/PID (all threads, and waited-for
 * children) and its peak RSS is VmHWM after resetting it through /proc/PID/clear_refs. The CLI and
 * the peer run under GNU time -v. `--concurrent` (on unless --no-concurrent): medium, large,
 * medium-zstd and many-files pulled at once on one cold daemon, compared with the sum of their
 * single-pull CPU medians over the cores.
 *
 * Everything a run writes (registry storage, work dirs, bundles, the peer's OCI layout) lives on a
 * tmpfs mounted for the run (`--tmpfs SIZE`, default 12g; `--tmpfs 0` for the file system of
 * `--tmp`): in a guest it is RAM too, and no disk writeback from one run slows the next. guestpull
 * runs as the installed command does (bin/guestpull, which gives node its flags).
 *
 * Images are generated once into a cache keyed by generator version and parameters
 * ($XDG_CACHE_HOME/guestpull-bench, else /var/tmp/guestpull-bench) and pushed to a fresh registry
 * each run. `--smoke` runs tiny versions of every image once, with no warm-up, verifying every
 * bundle against the peer's (test/integration/bench-smoke.test.ts runs it).
 * Prints the machine and a Markdown table on stdout (progress on stderr), and writes JSON.
 * Needs `npm run build` first (npm run bench does it) and root (mounts, umoci as root).
 */
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { requireBinary } from '../test/helpers/binaries.js';
import { removeTree } from '../test/helpers/cleanup.js';
import { startRegistry } from '../test/helpers/registry.js';
import { diffTrees, type TreeEntry } from '../test/helpers/tree.js';
import { ensureImage, type CachedImage } from './lib/build.js';
import { concurrentSection } from './lib/concurrent.js';
import { removeAbandonedRuns, withTmpdir } from './lib/housekeeping.js';
import { IMAGE_NAMES, imageParams, isImageName, type BenchImageName } from './lib/images.js';
import { describeMachine } from './lib/machine.js';
import { pushCachedImage } from './lib/push.js';
import {
  emptyCollected, markdown, ratiosFor, summarise, SUBJECTS,
  type BenchReport, type Collected, type ImageInfo, type SubjectId,
} from './lib/report.js';
import { Scope } from './lib/scope.js';
import { runCli, runDaemonPair, runPeer, type BenchEnv, type Outcome } from './lib/subjects.js';

const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const TAG = 'v1';

interface Options {
  images: BenchImageName[];
  runs: number;
  warmup: number;
  smoke: boolean;
  json: string;
  concurrent: boolean;
  verify: boolean;
  snapshotter: string;
  cacheDir: string;
  tmpBase: string;
  /** Size of the tmpfs mounted on the run's tmp dir (undefined: none). */
  tmpfs: string | undefined;
}

function usage(msg: string): never {
  process.stderr.write(`bench: ${msg}\n(usage: see the header of bench/run.ts)\n`);
  process.exit(2);
}

function parseOptions(): Options {
  const { values } = parseArgs({
    options: {
      images: { type: 'string' },
      runs: { type: 'string' },
      smoke: { type: 'boolean', default: false },
      json: { type: 'string' },
      'no-concurrent': { type: 'boolean', default: false },
      verify: { type: 'boolean', default: false },
      snapshotter: { type: 'string', default: 'auto' },
      'cache-dir': { type: 'string' },
      tmp: { type: 'string' },
      tmpfs: { type: 'string', default: '12g' },
    },
    strict: true,
  });
  const images = (values.images ?? IMAGE_NAMES.join(',')).split(',').map((s) => s.trim()).filter(Boolean);
  for (const i of images) if (!isImageName(i)) usage(`unknown image '${i}' (known: ${IMAGE_NAMES.join(', ')})`);
  const smoke = values.smoke;
  const runs = Number(values.runs ?? (smoke ? 1 : 3));
  if (!Number.isInteger(runs) || runs < 1) usage(`--runs must be a positive integer, not '${values.runs}'`);
  if (!['auto', 'overlay', 'copy'].includes(values.snapshotter)) usage(`--snapshotter must be auto, overlay or copy`);
  const xdg = process.env['XDG_CACHE_HOME'];
  return {
    images: IMAGE_NAMES.filter((n) => images.includes(n)),
    runs,
    warmup: smoke ? 0 : 1,
    smoke,
    json: path.resolve(values.json ?? path.join(repoRoot, 'bench', 'results', 'latest.json')),
    concurrent: !values['no-concurrent'],
    verify: smoke || values.verify,
    snapshotter: values.snapshotter,
    cacheDir: path.resolve(values['cache-dir'] ?? (xdg ? path.join(xdg, 'guestpull-bench') : '/var/tmp/guestpull-bench')),
    tmpBase: path.resolve(values.tmp ?? os.tmpdir()),
    tmpfs: values.tmpfs === '0' ? undefined : values.tmpfs,
  };
}

const progress = (line: string): void => void process.stderr.write(line + '\n');

function imageInfo(image: CachedImage, reference: string, compression: string): ImageInfo {
  return {
    name: image.name,
    reference,
    compression,
    peer: compression === 'zstd'
      ? 'skopeo copy --dest-decompress docker:// → dir:, skopeo copy --dest-oci-accept-uncompressed-layers dir: → oci:, umoci unpack (umoci 0.4.7 cannot read tar+zstd layers)'
      : 'skopeo copy docker:// → oci:, umoci unpack',
    layers: image.layers,
    entries: image.stats.entries,
    files: image.stats.files,
    compressedBytes: image.layers.reduce((n, l) => n + l.size, 0),
    uncompressedBytes: image.layers.reduce((n, l) => n + l.uncompressedSize, 0),
    manifestDigest: image.manifest.digest,
  };
}

/** Compares a subject's rootfs snapshot with the peer's and records the outcome. */
function check(c: Collected, round: number, peer: TreeEntry[] | undefined, tree: TreeEntry[] | undefined): void {
  if (!peer || !tree) return;
  c.checked++;
  c.rootfsEntries = tree.length;
  const diffs = diffTrees(peer, tree);
  if (diffs.length === 0) c.matched++;
  else c.mismatches.push(...diffs.slice(0, 10).map((d) => `round ${round}: ${d}`));
}

async function main(scope: Scope, opts: Options): Promise<number> {
  const cli = path.join(repoRoot, 'bin', 'guestpull');
  if (!existsSync(path.join(repoRoot, 'dist', 'cli.js'))) throw new Error(`dist/cli.js is missing: run 'npm run build' first (npm run bench does)`);
  for (const b of ['registry', 'skopeo', 'umoci', 'unshare', 'mount', 'setpriv'] as const) requireBinary(b);
  if (!existsSync('/usr/bin/time')) throw new Error('/usr/bin/time is missing: install the Debian package time');

  const started = new Date().toISOString();
  mkdirSync(opts.tmpBase, { recursive: true });
  await removeAbandonedRuns(opts.tmpBase, progress);
  const tmp = mkdtempSync(path.join(opts.tmpBase, `guestpull-bench-${process.pid}-`));
  scope.defer(`remove ${tmp}`, () => removeTree(tmp));
  if (opts.tmpfs !== undefined) {
    // Work dirs, bundles and the peer's OCI layout in RAM, as in a guest: no disk writeback from
    // one run slowing the next.
    execFileSync('mount', ['-t', 'tmpfs', '-o', `size=${opts.tmpfs},mode=0700`, 'guestpull-bench', tmp]);
    scope.defer(`unmount ${tmp}`, () => void execFileSync('umount', ['-R', tmp]));
  }
  const machine = describeMachine(tmp);
  progress(`bench: ${machine.cores} cores, ${machine.cpuModel}, Linux ${machine.kernel}, Node ${machine.node}, ${machine.skopeo}, ${machine.umoci}`);

  // the registry helper keeps its storage under os.tmpdir(): put it inside this run's tmp dir,
  // so that a run killed before its cleanup leaves nothing that the next run does not remove
  const registry = await withTmpdir(tmp, () => startRegistry());
  scope.defer('stop registry', () => registry.stop());
  const images: ImageInfo[] = [];
  for (const name of opts.images) {
    scope.check();
    const params = imageParams(name, opts.smoke);
    const t0 = performance.now();
    const image = await ensureImage(params, opts.cacheDir, progress, scope.signal);
    const repo = `bench/${name}`;
    await pushCachedImage(registry.url, repo, TAG, image);
    images.push(imageInfo(image, `${registry.host}/${repo}:${TAG}`, params.compression));
    progress(`image ${name}: ${image.stats.entries} entries, ${image.layers.length} ${params.compression} layer(s), ready and pushed in ${((performance.now() - t0) / 1000).toFixed(1)} s (cache ${image.dir})`);
  }

  const cdhToml = path.join(tmp, 'cdh.toml');
  writeFileSync(cdhToml, [
    '[image]',
    `snapshotter = "${opts.snapshotter}"`,
    '[[image.registry_config.registry]]',
    `location = "${registry.host}"`,
    'insecure = true',
    '',
  ].join('\n'));
  const env: BenchEnv = { scope, cli, cdhToml, tmp, verify: opts.verify };

  const collected = new Map<string, Collected>();
  const slot = (image: string, subject: SubjectId): Collected => {
    const key = `${image}/${subject}`;
    if (!collected.has(key)) collected.set(key, emptyCollected());
    return collected.get(key)!;
  };
  let peakResetFailed = false;
  const lastPeerTree = new Map<string, TreeEntry[]>();
  const record = (image: string, subject: SubjectId, counted: boolean, r: Outcome | Error): Outcome | undefined => {
    if (r instanceof Error) {
      progress(`  ${subject}: FAILED: ${r.message.split('\n')[0]}`);
      slot(image, subject).errors.push(r.message);
      return undefined;
    }
    if (r.peakReset === false) peakResetFailed = true;
    progress(`  ${subject}: ${r.sample.wallS.toFixed(2)} s wall, ${r.sample.cpuS.toFixed(2)} s CPU, ${r.sample.rssMiB.toFixed(0)} MiB${r.sample.rootfs ? `, rootfs ${r.sample.rootfs}` : ''}${counted ? '' : ' (warm-up)'}`);
    if (counted) slot(image, subject).samples.push(r.sample);
    return r;
  };
  const attempt = async (fn: () => Promise<Outcome>): Promise<Outcome | Error> => {
    try {
      return await fn();
    } catch (e) {
      return e instanceof Error ? e : new Error(String(e));
    }
  };

  const units = ['cli', 'daemon', 'peer'] as const;
  for (const img of images) {
    const ref = img.reference;
    for (let round = 0; round < opts.warmup + opts.runs; round++) {
      scope.check();
      const counted = round >= opts.warmup;
      const order = units.map((_, i) => units[(i + round) % units.length]!);
      progress(`${img.name}: ${counted ? `run ${round - opts.warmup + 1}/${opts.runs}` : 'warm-up'} (${order.join(', ')})`);
      const trees: Partial<Record<SubjectId, TreeEntry[]>> = {};
      const label = `${img.name}-r${round}`;
      for (const unit of order) {
        scope.check();
        if (unit === 'cli') {
          trees['pull-cli'] = record(img.name, 'pull-cli', counted, await attempt(() => runCli(env, ref, label)))?.tree;
        } else if (unit === 'daemon') {
          const pair = await runDaemonPair(env, ref, label);
          trees['daemon-cold'] = record(img.name, 'daemon-cold', counted, pair.cold)?.tree;
          trees['daemon-cached'] = record(img.name, 'daemon-cached', counted, pair.cached)?.tree;
        } else {
          trees.peer = record(img.name, 'peer', counted, await attempt(() => runPeer(env, registry.host, `bench/${img.name}`, TAG, img.compression, label)))?.tree;
        }
      }
      if (counted && opts.verify) {
        for (const s of ['pull-cli', 'daemon-cold', 'daemon-cached'] as const) check(slot(img.name, s), round, trees.peer, trees[s]);
      }
      if (trees.peer) lastPeerTree.set(img.name, trees.peer);
    }
  }

  scope.check();
  const results = images.flatMap((img) => SUBJECTS.map((s) => summarise(img.name, s, slot(img.name, s))));
  const ratios = images.flatMap((img) => ratiosFor(img.name, results));

  const conc = opts.concurrent
    ? await concurrentSection(env, images, results, lastPeerTree, machine.cores, opts.runs, progress)
    : { section: { skipped: '--no-concurrent' }, peakResetFailed: false };
  if (conc.peakResetFailed) peakResetFailed = true;
  const concurrent = conc.section;

  scope.check();
  const report: BenchReport = {
    schema: 'guestpull-bench/1',
    mode: opts.smoke ? 'smoke' : 'full',
    started,
    finished: new Date().toISOString(),
    command: ['tsx', 'bench/run.ts', ...process.argv.slice(2)].join(' '),
    machine,
    settings: {
      runs: opts.runs,
      warmup: opts.warmup,
      snapshotter: opts.snapshotter,
      verify: opts.verify,
      peakRssReset: peakResetFailed
        ? 'clear_refs refused: a cached pull\'s peak RSS includes the cold pull before it on the same daemon'
        : 'VmHWM reset through /proc/PID/clear_refs before every daemon pull',
      pageCache: 'warm: nothing is dropped between runs',
    },
    images,
    results,
    ratios,
    concurrent,
  };
  mkdirSync(path.dirname(opts.json), { recursive: true });
  writeFileSync(opts.json, JSON.stringify(report, null, 2) + '\n');
  process.stdout.write(markdown(report) + '\n');
  progress(`bench: JSON written to ${opts.json}`);
  const problems = results.some((r) => r.errors.length > 0 || r.verified === false) || ('errors' in concurrent && (concurrent.errors.length > 0 || concurrent.verified === false));
  return problems ? 1 : 0;
}

const opts = parseOptions();
const scope = new Scope();
let interrupted = false;
for (const sig of ['SIGINT', 'SIGTERM'] as const) {
  process.on(sig, () => {
    if (interrupted) return;
    interrupted = true;
    progress(`bench: ${sig}: stopping everything this run started`);
    // Under tsx, a Ctrl-C reaches tsx too, which relays it and SIGKILLs this process unless it
    // acknowledges within 30 ms: keep the event loop free for that first. Then kill the running
    // children and let main() unwind through its finally; if it hangs, clean up anyway.
    setTimeout(() => {
      scope.interrupt();
      setTimeout(() => void scope.close().finally(() => process.exit(sig === 'SIGINT' ? 130 : 143)), 20_000).unref();
    }, 300);
  });
}
let code = 1;
try {
  code = await main(scope, opts);
} catch (e) {
  if (!interrupted) progress(`bench: ${e instanceof Error ? (e.stack ?? e.message) : String(e)}`);
} finally {
  await scope.close();
}
process.exitCode = interrupted ? 130 : code;
