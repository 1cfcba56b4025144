/**
 * First data point for the speed work: `guestpull pull` against `skopeo copy` + `umoci unpack` on
 * the same generated multi-layer image from a loopback registry, run alternately, each under
 * GNU time for wall time, CPU time and peak RSS. Prints a Markdown table and the ratios.
 *
 *   npx tsx bench/compare.ts [--mb 300] [--layers 4] [--files 6000] [--runs 3] [--snapshotter auto|overlay|copy]
 */
import { execFileSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { removeTree } from '../test/helpers/cleanup.js';
import { buildSyntheticImage } from '../test/helpers/image-builder.js';
import { pushImage } from '../test/helpers/push.js';
import { startRegistry } from '../test/helpers/registry.js';

const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');

interface Sample {
  wallS: number;
  cpuS: number;
  rssMiB: number;
}

/** Run a command under GNU time -v and read its figures. */
function timed(cmd: string[], env: NodeJS.ProcessEnv = process.env): Sample {
  const out = path.join(os.tmpdir(), `gp-time-${process.pid}.txt`);
  execFileSync('/usr/bin/time', ['-v', '-o', out, ...cmd], { stdio: ['ignore', 'ignore', 'inherit'], env });
  const text = readFileSync(out, 'utf8');
  rmSync(out, { force: true });
  const field = (re: RegExp): string => {
    const m = re.exec(text);
    if (!m) throw new Error(`GNU time output lacks ${re}:\n${text}`);
    return m[1]!;
  };
  const wall = field(/Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)/)
    .split(':')
    .reduce((acc, part) => acc * 60 + Number(part), 0);
  const cpu = Number(field(/User time \(seconds\): ([\d.]+)/)) + Number(field(/System time \(seconds\): ([\d.]+)/));
  return { wallS: wall, cpuS: cpu, rssMiB: Number(field(/Maximum resident set size \(kbytes\): (\d+)/)) / 1024 };
}

const median = (xs: number[]): number => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
};

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      mb: { type: 'string', default: '300' },
      layers: { type: 'string', default: '4' },
      files: { type: 'string', default: '6000' },
      runs: { type: 'string', default: '3' },
      snapshotter: { type: 'string', default: 'auto' },
    },
  });
  const runs = Number(values.runs);
  const tmp = mkdtempSync(path.join(os.tmpdir(), 'guestpull-bench-'));
  const registry = await startRegistry();
  try {
    const t0 = Date.now();
    const image = await buildSyntheticImage({
      seed: 42,
      layers: Number(values.layers),
      totalBytes: Number(values.mb) * 1024 * 1024,
      files: Number(values.files),
    });
    const compressed = image.layers.reduce((n, l) => n + l.size, 0);
    await pushImage(registry.url, 'bench/image', 'v1', image);
    console.log(
      `image: ${image.layers.length} gzip layers, ${(compressed / 1e6).toFixed(0)} MB compressed, ${values.mb} MiB uncompressed in ${values.files} files (built + pushed in ${((Date.now() - t0) / 1000).toFixed(1)} s)`,
    );

    const cdh = path.join(tmp, 'cdh.toml');
    writeFileSync(cdh, `[image]\nsnapshotter = "${values.snapshotter}"\n[[image.registry_config.registry]]\nlocation = "${registry.host}"\ninsecure = true\n`);
    const ref = `${registry.host}/bench/image:v1`;

    // The peer: skopeo as root writes a cache under /var/lib; give it a private /var/lib.
    const peerHome = path.join(tmp, 'peer-home');
    mkdirSync(path.join(peerHome, 'varlib'), { recursive: true });
    const peerEnv = { PATH: '/usr/sbin:/usr/bin:/sbin:/bin', HOME: peerHome, TMPDIR: tmp };

    const ours: Sample[] = [];
    const peer: Sample[] = [];
    for (let i = 0; i < runs; i++) {
      const b = path.join(tmp, `gp-${i}`);
      ours.push(timed([process.execPath, path.join(repoRoot, 'dist/cli.js'), 'pull', ref, b, '--config', cdh, '--work-dir', path.join(tmp, `gp-work-${i}`)]));
      // with snapshotter auto the rootfs is an overlay mount: unmount before removing
      await removeTree(b);
      await removeTree(path.join(tmp, `gp-work-${i}`));

      const layout = path.join(tmp, `oci-${i}`);
      const pb = path.join(tmp, `umoci-${i}`);
      const script = [
        `mount --bind ${peerHome}/varlib /var/lib`,
        `skopeo --insecure-policy copy -q --src-tls-verify=false docker://${ref} oci:${layout}:v1`,
        `umoci unpack --image ${layout}:v1 ${pb} >/dev/null`,
      ].join(' && ');
      peer.push(timed(['unshare', '-m', 'sh', '-c', script], peerEnv));
      rmSync(layout, { recursive: true, force: true });
      rmSync(pb, { recursive: true, force: true });
      console.log(`run ${i + 1}: guestpull ${ours[i]!.wallS.toFixed(2)} s, skopeo+umoci ${peer[i]!.wallS.toFixed(2)} s`);
    }

    const row = (name: string, s: Sample[]): string =>
      `| ${name} | ${median(s.map((x) => x.wallS)).toFixed(2)} | ${median(s.map((x) => x.cpuS)).toFixed(2)} | ${Math.max(...s.map((x) => x.rssMiB)).toFixed(0)} |`;
    console.log('\n| subject | median wall s | median CPU s | peak RSS MiB |\n|---|---|---|---|');
    console.log(row('guestpull pull', ours));
    console.log(row('skopeo copy + umoci unpack', peer));
    const ratio = median(ours.map((x) => x.wallS)) / median(peer.map((x) => x.wallS));
    console.log(`\nwall-time ratio guestpull / peer: ${ratio.toFixed(2)} (${runs} alternating runs, ${os.cpus().length} cores)`);
  } finally {
    await registry.stop();
    await removeTree(tmp);
  }
}

main().catch((e: unknown) => {
  console.error(e instanceof Error ? e.stack : e);
  process.exitCode = 1;
});
