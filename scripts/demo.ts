/**
 * The demo behind ./scripts/demo.sh: everything on loopback and in a temporary directory, stopped
 * at the end. Shows what a kata agent sees: the manifest digest and a ready bundle.
 */
import { mkdtemp, readFile, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { readMounts } from '../src/pull/store/mountinfo.js';
import { removeTree } from '../test/helpers/cleanup.js';
import { connectClient } from '../test/helpers/grpc-client.js';
import { sampleImage } from '../test/helpers/image-builder.js';
import { pushImage } from '../test/helpers/push.js';
import { startRegistry } from '../test/helpers/registry.js';
import { snapshotTree } from '../test/helpers/tree.js';
import { startDaemon } from '../test/helpers/daemon.js';

const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');

async function main(): Promise<void> {
  const tmp = await mkdtemp(path.join(os.tmpdir(), 'guestpull-demo-'));
  const registry = await startRegistry();
  let daemon: Awaited<ReturnType<typeof startDaemon>> | undefined;
  try {
    const image = await sampleImage();
    const digest = await pushImage(registry.url, 'demo/hello', '1.0', image);
    console.log(`registry   ${registry.url} (docker-registry, loopback) holds demo/hello:1.0 = ${digest}`);

    const cdhToml = path.join(tmp, 'cdh.toml');
    await writeFile(
      cdhToml,
      [
        '# The demo registry is plain HTTP on loopback: allowed only because it is listed here.',
        '[image]',
        `work_dir = "${path.join(tmp, 'work')}"`,
        '[[image.registry_config.registry]]',
        `location = "${registry.host}"`,
        'insecure = true',
        '',
      ].join('\n'),
    );
    daemon = await startDaemon({ repoRoot, config: cdhToml, socket: path.join(tmp, 'cdh.sock') });
    console.log(`daemon     ${daemon.address} (guestpull serve, pid ${daemon.pid})`);

    const client = connectClient(daemon.address);
    const bundle = path.join(tmp, 'bundles', 'demo-container');
    const t0 = Date.now();
    const res = await client.pullImage(`${registry.host}/demo/hello:1.0`, bundle);
    client.close();
    console.log(`PullImage  image_url=${registry.host}/demo/hello:1.0 bundle_path=${bundle}`);
    console.log(`           manifest_digest=${res.manifest_digest} (${Date.now() - t0} ms)`);

    const tree = await snapshotTree(path.join(bundle, 'rootfs'));
    const mount = readMounts().find((m) => m.mountPoint === path.join(bundle, 'rootfs'));
    const kind = mount ? `${mount.fstype} mount of the layer store` : 'a plain directory';
    console.log(`\nbundle     ${bundle}/rootfs: ${kind}, ${tree.length} entries`);
    for (const e of tree) {
      if (e.path === '.') continue;
      const mode = e.mode.toString(8).padStart(4, '0');
      const extra = e.type === 'symlink' ? ` -> ${e.target}` : e.type === 'file' ? ` (${e.size} bytes)` : '/';
      console.log(`  ${mode} ${String(e.uid).padStart(5)}:${String(e.gid).padEnd(5)} ${e.path}${extra}`);
    }
    const spec = JSON.parse(await readFile(path.join(bundle, 'config.json'), 'utf8')) as {
      process: { args: string[]; env: string[]; cwd: string; user: { uid: number; gid: number } };
    };
    console.log(`\nconfig.json process.args=${JSON.stringify(spec.process.args)} user=${spec.process.user.uid}:${spec.process.user.gid} cwd=${spec.process.cwd}`);
    console.log(`           env=${JSON.stringify(spec.process.env)}`);
  } finally {
    await daemon?.stop();
    await registry.stop();
    // The bundle's rootfs is an overlay mount (snapshotter auto): unmount before removing.
    await removeTree(tmp);
  }
  console.log('\nstopped daemon and registry; removed', tmp);
}

main().catch((e: unknown) => {
  console.error('demo failed:', e instanceof Error ? e.message : e);
  process.exitCode = 1;
});
