/**
 * The concurrent section: medium, large, medium-zstd and many-files (those of them that were
 * benchmarked) pulled at once on one cold daemon, `runs` times. Its check value is the median wall
 * time ÷ (Σ of the images' single-pull daemon CPU medians ÷ cores): 1.0 means the four pulls kept
 * every core busy; the issue's target is ≤ 1.3.
 */
import { diffTrees, type TreeEntry } from '../../test/helpers/tree.js';
import { CONCURRENT_IMAGES } from './images.js';
import { median } from './measure.js';
import type { BenchReport, Concurrent, ImageInfo, Result } from './report.js';
import { runConcurrent, type BenchEnv } from './subjects.js';

export const CONCURRENT_TARGET = 1.3;

export async function concurrentSection(
  env: BenchEnv,
  images: ImageInfo[],
  results: Result[],
  peerTrees: Map<string, TreeEntry[]>,
  cores: number,
  runs: number,
  progress: (line: string) => void,
): Promise<{ section: BenchReport['concurrent']; peakResetFailed: boolean }> {
  const chosen = images.filter((i) => (CONCURRENT_IMAGES as readonly string[]).includes(i.name));
  if (chosen.length < 2) return { section: { skipped: `needs at least two of ${CONCURRENT_IMAGES.join(', ')} in --images` }, peakResetFailed: false };
  const c: Concurrent = {
    images: chosen.map((i) => i.name), n: 0, wallS: null, cpuS: null, rssMiB: null, samples: [], singleCpuSumS: null,
    cores, check: null, target: CONCURRENT_TARGET, verified: null, mismatches: [], errors: [],
  };
  let peakResetFailed = false;
  let checked = 0;
  let matched = 0;
  for (let run = 0; run < runs; run++) {
    env.scope.check();
    progress(`concurrent: run ${run + 1}/${runs} (${c.images.join(', ')} at once)`);
    try {
      const r = await runConcurrent(env, chosen.map((i) => ({ image: i.name, ref: i.reference })), `conc-${run}`);
      if (!r.peakReset) peakResetFailed = true;
      c.samples.push(r.sample);
      progress(`  ${r.sample.wallS.toFixed(2)} s wall, ${r.sample.cpuS.toFixed(2)} s daemon CPU, ${r.sample.rssMiB.toFixed(0)} MiB`);
      for (const [image, tree] of r.trees) {
        const peer = peerTrees.get(image);
        if (!peer) continue;
        checked++;
        const diffs = diffTrees(peer, tree);
        if (diffs.length === 0) matched++;
        else c.mismatches.push(...diffs.slice(0, 10).map((d) => `${image}: ${d}`));
      }
    } catch (e) {
      const message = e instanceof Error ? e.message : String(e);
      progress(`  FAILED: ${message.split('\n')[0]}`);
      c.errors.push(message);
    }
  }
  c.n = c.samples.length;
  if (c.n > 0) {
    c.wallS = median(c.samples.map((s) => s.wallS));
    c.cpuS = median(c.samples.map((s) => s.cpuS));
    c.rssMiB = median(c.samples.map((s) => s.rssMiB));
  }
  const singles = c.images.map((name) => results.find((r) => r.image === name && r.subject === 'daemon-cold')?.cpuS ?? null);
  c.singleCpuSumS = singles.every((x) => x !== null) ? singles.reduce((a: number, b) => a + (b ?? 0), 0) : null;
  c.check = c.wallS !== null && c.singleCpuSumS !== null && c.singleCpuSumS > 0 ? c.wallS / (c.singleCpuSumS / c.cores) : null;
  c.verified = checked === 0 ? null : matched === checked && c.errors.length === 0;
  return { section: c, peakResetFailed };
}
