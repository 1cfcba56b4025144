/**
 * The fixture images of the integration tests, built by the project's image builder at test time.
 * `richImage` carries every layer feature issue 2 names: files, directories, absolute and relative
 * symlinks, hardlinks (same and lower layer), a deleted file and a deleted directory (whiteouts), an
 * opaque directory, a file owned by 1000:1000 with mode 0640, a setuid binary, a file replaced by
 * a directory.
 */
import { buildImage, buildIndex, type BuiltImage, type BuiltIndex, type EntrySpec } from '../helpers/image-builder.js';

export const PASSWD = 'root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n';
export const GROUP = 'root:x:0:\napp:x:1000:\nextra:x:2000:app\n';

export const richLayers: EntrySpec[][] = [
  [
    { type: 'dir', path: 'etc', mode: 0o755 },
    { type: 'file', path: 'etc/passwd', content: PASSWD, mode: 0o644 },
    { type: 'file', path: 'etc/group', content: GROUP, mode: 0o644 },
    { type: 'dir', path: 'bin', mode: 0o755 },
    { type: 'file', path: 'bin/tool', content: '#!/bin/sh\necho tool\n', mode: 0o755 },
    { type: 'file', path: 'bin/suid', content: 'setuid binary\n', mode: 0o4755 },
    { type: 'hardlink', path: 'bin/tool-hard', target: 'bin/tool' },
    { type: 'symlink', path: 'bin/abs', target: '/bin/tool' },
    { type: 'symlink', path: 'rel', target: 'bin/tool' },
    { type: 'dir', path: 'data', mode: 0o755 },
    { type: 'file', path: 'data/secret', content: 'owned by app\n', mode: 0o640, uid: 1000, gid: 1000 },
    { type: 'file', path: 'gone.txt', content: 'deleted by layer 2\n' },
    { type: 'dir', path: 'old', mode: 0o755 },
    { type: 'file', path: 'old/a', content: 'a\n' },
    { type: 'file', path: 'old/b', content: 'b\n' },
    { type: 'dir', path: 'opq', mode: 0o755 },
    { type: 'file', path: 'opq/lower1', content: 'hidden by the opaque marker\n' },
    { type: 'dir', path: 'opq/lowerdir', mode: 0o755 },
    { type: 'file', path: 'opq/lowerdir/x', content: 'x\n' },
    { type: 'file', path: 'flip', content: 'a file that becomes a directory\n' },
  ],
  [
    { type: 'whiteout', path: 'gone.txt' },
    { type: 'whiteout', path: 'old' },
    { type: 'dir', path: 'opq', mode: 0o755 },
    { type: 'file', path: 'opq/upper', content: 'from layer 2\n' },
    { type: 'opaque', path: 'opq' },
    { type: 'file', path: 'data/new.txt', content: 'new in layer 2\n', mode: 0o600 },
    { type: 'dir', path: 'home', mode: 0o755 },
    { type: 'dir', path: 'home/app', mode: 0o750, uid: 1000, gid: 1000 },
    { type: 'dir', path: 'tmp', mode: 0o1777 },
  ],
  [
    { type: 'file', path: 'etc/motd', content: 'hello from layer 3\n' },
    { type: 'symlink', path: 'etc/alt', target: '../bin/tool' },
    { type: 'hardlink', path: 'data/secret-link', target: 'data/secret' },
    { type: 'dir', path: 'flip', mode: 0o700 },
    { type: 'file', path: 'flip/inside', content: 'inside\n' },
  ],
];

export const richConfig = {
  Entrypoint: ['/bin/tool'],
  Cmd: ['--flag'],
  Env: ['PATH=/usr/bin:/bin', 'FOO=bar'],
  WorkingDir: '/data',
  User: 'app',
  Labels: { 'org.example.team': 'guestpull', 'org.opencontainers.image.author': 'label-wins' },
  StopSignal: 'SIGTERM',
};

export function richImage(format: 'oci' | 'docker' = 'oci'): Promise<BuiltImage> {
  return buildImage({ layers: richLayers, config: richConfig, format, created: '2024-01-01T00:00:00Z' });
}

export function goarch(): string {
  const m: Record<string, string> = { x64: 'amd64', arm64: 'arm64', arm: 'arm', ppc64: 'ppc64le', s390x: 's390x' };
  return m[process.arch] ?? process.arch;
}

/** An index with two platforms: the running one and another; each says in /platform which it is. */
export async function twoPlatformIndex(format: 'oci' | 'docker' = 'oci'): Promise<BuiltIndex> {
  const here = goarch();
  const other = here === 'arm64' ? 'amd64' : 'arm64';
  const mk = (arch: string) =>
    buildImage({
      layers: [[{ type: 'file', path: 'platform', content: `${arch}\n` }]],
      config: { Cmd: ['/platform'] },
      architecture: arch,
      ...(arch === 'arm64' ? { variant: 'v8' } : {}),
      format,
    });
  return buildIndex([await mk(other), await mk(here)], { format });
}
