/**
 * The measured subjects, each from a cold start and cleaned up afterwards (bundles may be overlay
 * mounts: removeTree unmounts them first):
 * - `guestpull pull` as a one-shot process under GNU time, fresh work dir and bundle;
 * - PullImage on a daemon started beforehand with a fresh work dir (cold), then PullImage of the
 *   same image into a second bundle on that daemon (cached), each measured through /proc;
 * - the peer: `skopeo copy docker://… oci:…` then `umoci unpack`, each under GNU time, summed
 *   (wall and CPU) with the larger peak RSS; for zstd layers, which umoci 0.4.7 cannot read,
 *   skopeo first copies to a `dir:` with --dest-decompress, then from there to the OCI layout.
 * With `verify`, each bundle's rootfs is snapshotted (test/helpers/tree.ts) before removal.
 */
import { existsSync, mkdirSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { readMounts } from '../../src/pull/store/mountinfo.js';
import { removeTree } from '../../test/helpers/cleanup.js';
import { snapshotTree, type TreeEntry } from '../../test/helpers/tree.js';
import { startBenchDaemon, type BenchDaemon } from './daemon.js';
import { cpuSeconds, peakRssMiB, readProcCpu, resetPeakRss, runTimed, type Sample } from './measure.js';
import type { Scope } from './scope.js';

export interface BenchEnv {
  scope: Scope;
  /** bin/guestpull */
  cli: string;
  /** cdh.toml allowing the loopback registry over plain HTTP */
  cdhToml: string;
  /** where this run's bundles and work dirs go (removed after each subject) */
  tmp: string;
  verify: boolean;
}

export interface Outcome {
  sample: Sample & { rootfs?: string };
  tree?: TreeEntry[];
  /** false when VmHWM could not be reset before the pull */
  peakReset?: boolean;
}

const PULL_DEADLINE_MS = 30 * 60_000;

/** 'overlay' when <bundle>/rootfs is a mount point (its fstype), else 'dir'. */
function rootfsKind(bundle: string): string {
  const rootfs = path.join(bundle, 'rootfs');
  const m = readMounts().filter((x) => x.mountPoint === rootfs).pop();
  return m ? m.fstype : 'dir';
}

async function inspectBundle(env: BenchEnv, bundle: string, what: string): Promise<{ rootfs: string; tree?: TreeEntry[] }> {
  if (!existsSync(path.join(bundle, 'config.json'))) throw new Error(`${what}: ${bundle}/config.json is missing after a successful pull`);
  if (!existsSync(path.join(bundle, 'rootfs'))) throw new Error(`${what}: ${bundle}/rootfs is missing after a successful pull`);
  const rootfs = rootfsKind(bundle);
  return env.verify ? { rootfs, tree: await snapshotTree(path.join(bundle, 'rootfs')) } : { rootfs };
}

/** Subject 1: the one-shot CLI. */
export async function runCli(env: BenchEnv, ref: string, label: string): Promise<Outcome> {
  const bundle = path.join(env.tmp, `${label}-cli-bundle`);
  const work = path.join(env.tmp, `${label}-cli-work`);
  try {
    const run = await runTimed(env.scope, [env.cli, 'pull', ref, bundle, '--config', env.cdhToml, '--work-dir', work, '--log-level', 'warn'], {
      timeFile: path.join(env.tmp, `${label}-cli.time`),
    });
    const seen = await inspectBundle(env, bundle, `guestpull pull ${ref}`);
    return { sample: { ...run.sample, rootfs: seen.rootfs }, ...(seen.tree ? { tree: seen.tree } : {}) };
  } finally {
    await removeTree(bundle);
    await removeTree(work);
  }
}

function grpcMessage(e: unknown): string {
  if (e instanceof Error) {
    const x = e as Error & { code?: unknown; details?: unknown };
    return typeof x.details === 'string' ? `gRPC status ${String(x.code)}: ${x.details}` : e.message;
  }
  return String(e);
}

/** One PullImage, timed: wall by the clock, CPU and peak RSS of the daemon through /proc. */
async function timedPull(d: BenchDaemon, ref: string, bundle: string): Promise<Outcome> {
  const peakReset = resetPeakRss(d.pid);
  const before = readProcCpu(d.pid);
  const t0 = performance.now();
  try {
    await d.client.pullImage(ref, bundle, { deadlineMs: PULL_DEADLINE_MS });
  } catch (e) {
    throw new Error(`PullImage ${ref} → ${bundle} failed: ${grpcMessage(e)}\ndaemon log (tail):\n${d.logs().slice(-3000)}`);
  }
  const wallS = (performance.now() - t0) / 1000;
  const after = readProcCpu(d.pid);
  return { sample: { wallS, cpuS: cpuSeconds(before, after), rssMiB: peakRssMiB(d.pid) }, peakReset };
}

/** Subjects 2 and 3: cold PullImage on a fresh daemon, then the cached pull into a second bundle. */
export async function runDaemonPair(env: BenchEnv, ref: string, label: string): Promise<{ cold: Outcome | Error; cached: Outcome | Error }> {
  const work = path.join(env.tmp, `${label}-daemon-work`);
  const b1 = path.join(env.tmp, `${label}-daemon-bundle-1`);
  const b2 = path.join(env.tmp, `${label}-daemon-bundle-2`);
  let daemon: BenchDaemon | undefined;
  try {
    daemon = await startBenchDaemon(env.scope, env.cli, env.cdhToml, work);
    let cold: Outcome;
    try {
      cold = await timedPull(daemon, ref, b1);
      const seen = await inspectBundle(env, b1, `PullImage ${ref} (cold)`);
      cold.sample.rootfs = seen.rootfs;
      if (seen.tree) cold.tree = seen.tree;
    } catch (e) {
      const err = e instanceof Error ? e : new Error(String(e));
      return { cold: err, cached: new Error(`not run: the cold pull failed`) };
    }
    try {
      const cached = await timedPull(daemon, ref, b2);
      const seen = await inspectBundle(env, b2, `PullImage ${ref} (cached)`);
      cached.sample.rootfs = seen.rootfs;
      if (seen.tree) cached.tree = seen.tree;
      return { cold, cached };
    } catch (e) {
      return { cold, cached: e instanceof Error ? e : new Error(String(e)) };
    }
  } catch (e) {
    const err = e instanceof Error ? e : new Error(String(e));
    return { cold: err, cached: err };
  } finally {
    await daemon?.stop();
    await removeTree(b1);
    await removeTree(b2);
    await removeTree(work);
  }
}

/** Subject 4, the peer: skopeo copy to an OCI layout, then umoci unpack, in a scrubbed environment. */
export async function runPeer(env: BenchEnv, registryHost: string, repo: string, tag: string, compression: string, label: string): Promise<Outcome> {
  const dir = path.join(env.tmp, `${label}-peer`);
  const sub = (name: string): string => {
    const p = path.join(dir, name);
    mkdirSync(p, { recursive: true });
    return p;
  };
  try {
    const conf = path.join(sub('etc'), 'registries.conf');
    writeFileSync(conf, '# guestpull bench: no mirrors, no search registries\n');
    const penv: NodeJS.ProcessEnv = {
      PATH: '/usr/sbin:/usr/bin:/sbin:/bin', HOME: sub('home'), XDG_RUNTIME_DIR: sub('run'), XDG_CONFIG_HOME: sub('config'),
      XDG_CACHE_HOME: sub('cache'), XDG_DATA_HOME: sub('data'), TMPDIR: sub('tmp'), CONTAINERS_REGISTRIES_CONF: conf, REGISTRIES_CONFIG_PATH: conf,
    };
    const layout = path.join(dir, 'layout');
    const bundle = path.join(dir, 'bundle');
    // as root skopeo keeps a blob-info cache under /var/lib/containers whatever the environment
    // says: give it a private, empty /var/lib (mount namespace); the wrapper is not measured
    const prefix = ['unshare', '--mount', '--propagation', 'private', '--', '/bin/sh', '-c', 'mount --bind "$1" /var/lib && shift && exec "$@"', 'sh', sub('varlib')];
    const skopeo = ['skopeo', '--insecure-policy', '--registries.d', sub('registries.d'), '--tmpdir', penv['TMPDIR']!, 'copy', '--quiet'];
    const source = `docker://${registryHost}/${repo}:${tag}`;
    const steps: { cmd: string[]; prefix?: string[] }[] = compression === 'zstd'
      ? [
          // umoci 0.4.7 refuses tar+zstd layers: skopeo decompresses them into a dir: copy, then
          // copies that into an OCI layout keeping the plain tars (no recompression)
          { cmd: [...skopeo, '--src-tls-verify=false', '--src-no-creds', '--dest-decompress', source, `dir:${path.join(dir, 'plain')}`], prefix },
          { cmd: [...skopeo, '--dest-oci-accept-uncompressed-layers', `dir:${path.join(dir, 'plain')}`, `oci:${layout}:${tag}`], prefix },
        ]
      : [{ cmd: [...skopeo, '--src-tls-verify=false', '--src-no-creds', source, `oci:${layout}:${tag}`], prefix }];
    const rootless = process.getuid?.() === 0 ? [] : ['--rootless'];
    steps.push({ cmd: ['umoci', 'unpack', ...rootless, '--image', `${layout}:${tag}`, bundle] });
    const sample: Sample = { wallS: 0, cpuS: 0, rssMiB: 0 };
    for (const [i, step] of steps.entries()) {
      const r = await runTimed(env.scope, step.cmd, { ...(step.prefix ? { prefix: step.prefix } : {}), env: penv, cwd: dir, timeFile: path.join(dir, `step-${i}.time`) });
      sample.wallS += r.sample.wallS;
      sample.cpuS += r.sample.cpuS;
      sample.rssMiB = Math.max(sample.rssMiB, r.sample.rssMiB);
    }
    const seen = await inspectBundle(env, bundle, `skopeo + umoci ${repo}:${tag}`);
    return { sample: { ...sample, rootfs: seen.rootfs }, ...(seen.tree ? { tree: seen.tree } : {}) };
  } finally {
    await removeTree(dir);
  }
}

/** The concurrent section: several cold PullImage calls at once on one fresh daemon. */
export async function runConcurrent(env: BenchEnv, refs: { image: string; ref: string }[], label: string): Promise<{ sample: Sample; trees: Map<string, TreeEntry[]>; peakReset: boolean }> {
  const work = path.join(env.tmp, `${label}-conc-work`);
  const bundles = refs.map((r) => path.join(env.tmp, `${label}-conc-${r.image}`));
  let daemon: BenchDaemon | undefined;
  try {
    daemon = await startBenchDaemon(env.scope, env.cli, env.cdhToml, work);
    const d = daemon;
    const peakReset = resetPeakRss(d.pid);
    const before = readProcCpu(d.pid);
    const t0 = performance.now();
    const settled = await Promise.allSettled(refs.map((r, i) => d.client.pullImage(r.ref, bundles[i]!, { deadlineMs: PULL_DEADLINE_MS })));
    const wallS = (performance.now() - t0) / 1000;
    const after = readProcCpu(d.pid);
    const failed = settled.map((s, i) => (s.status === 'rejected' ? `${refs[i]!.ref}: ${grpcMessage(s.reason)}` : '')).filter(Boolean);
    if (failed.length) throw new Error(`concurrent PullImage failed: ${failed.join(' | ')}\ndaemon log (tail):\n${d.logs().slice(-3000)}`);
    const trees = new Map<string, TreeEntry[]>();
    for (const [i, r] of refs.entries()) {
      const seen = await inspectBundle(env, bundles[i]!, `concurrent PullImage ${r.ref}`);
      if (seen.tree) trees.set(r.image, seen.tree);
    }
    return { sample: { wallS, cpuS: cpuSeconds(before, after), rssMiB: peakRssMiB(d.pid) }, trees, peakReset };
  } finally {
    await daemon?.stop();
    for (const b of bundles) await removeTree(b);
    await removeTree(work);
  }
}
