import { execFileSync } from 'node:child_process';
import { mkdir, mkdtemp, rm, symlink, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ErrorCode, GuestpullError } from '../../src/errors.js';
import type { ImageConfig } from '../../src/oci.js';
import { DEFAULT_CAPABILITIES, DEFAULT_PATH, buildRuntimeSpec } from '../../src/pull/bundle/spec.js';
import { MAX_DB_BYTES, parseGroup, parsePasswd, resolveUser } from '../../src/pull/bundle/user.js';

const IMAGE = 'registry.test/app:1';

const PASSWD = [
  'root:x:0:0:root:/root:/bin/sh',
  '# a comment line',
  'daemon:x:1:1::/:/usr/sbin/nologin',
  'this line is broken',
  'bad:x:notanumber:5::/:/bin/sh',
  '',
  'alice:x:1000:1000::/home/alice:/bin/sh\r',
  'bob:x:1001:1001::/home/bob:/bin/sh',
  'alice:x:7777:7777:second alice, ignored:/:/bin/sh',
  'top:x:4294967294:4294967294::/:/bin/sh',
  '+nis::::::',
].join('\n');

const GROUP = [
  'root:x:0:',
  'wheel:x:10:alice,bob',
  'alice:x:1000:alice',
  'docker:x:999: alice , carol',
  'wheel2:x:10:alice',
  'staff:x:50:',
  'garbage',
  'badgid:x:-3:alice',
].join('\n');

let tmp: string;

async function makeRootfs(name: string, files: Record<string, string>): Promise<string> {
  const root = path.join(tmp, name);
  await mkdir(path.join(root, 'etc'), { recursive: true });
  for (const [rel, text] of Object.entries(files)) {
    await mkdir(path.dirname(path.join(root, rel)), { recursive: true });
    await writeFile(path.join(root, rel), text);
  }
  return root;
}

async function codeOf(p: Promise<unknown>): Promise<string> {
  try {
    await p;
  } catch (e) {
    expect(e).toBeInstanceOf(GuestpullError);
    return (e as GuestpullError).code;
  }
  return 'OK';
}

function imageConfig(config: NonNullable<ImageConfig['config']> | null, extra: Partial<ImageConfig> = {}): ImageConfig {
  return { architecture: 'amd64', os: 'linux', config, rootfs: { type: 'layers', diff_ids: [] }, ...extra };
}

beforeAll(async () => {
  tmp = await mkdtemp(path.join(os.tmpdir(), 'guestpull-bundle-spec-'));
});
afterAll(async () => {
  await rm(tmp, { recursive: true, force: true });
});

describe('passwd / group parsing', () => {
  it('skips malformed lines and keeps order', () => {
    expect(parsePasswd(PASSWD).map((p) => `${p.name}=${p.uid}:${p.gid}`)).toEqual([
      'root=0:0', 'daemon=1:1', 'alice=1000:1000', 'bob=1001:1001', 'alice=7777:7777', 'top=4294967294:4294967294',
    ]);
    expect(parseGroup(GROUP).map((g) => `${g.name}=${g.gid}[${g.members.join('|')}]`)).toEqual([
      'root=0[]', 'wheel=10[alice|bob]', 'alice=1000[alice]', 'docker=999[alice|carol]', 'wheel2=10[alice]', 'staff=50[]',
    ]);
  });
});

describe('resolveUser', () => {
  let root: string;
  beforeAll(async () => {
    root = await makeRootfs('users', { 'etc/passwd': PASSWD, 'etc/group': GROUP });
  });

  const ok: [string | undefined, { uid: number; gid: number; additionalGids: number[]; username?: string }][] = [
    [undefined, { uid: 0, gid: 0, additionalGids: [] }],
    ['', { uid: 0, gid: 0, additionalGids: [] }],
    // By name: passwd gid; supplementary groups listing alice, deduplicated, primary (1000) left out.
    ['alice', { uid: 1000, gid: 1000, additionalGids: [10, 999], username: 'alice' }],
    ['bob', { uid: 1001, gid: 1001, additionalGids: [10], username: 'bob' }],
    // Numeric uid in passwd: its gid, but no supplementary groups (conversion.md).
    ['1000', { uid: 1000, gid: 1000, additionalGids: [], username: 'alice' }],
    ['0', { uid: 0, gid: 0, additionalGids: [], username: 'root' }],
    // Numeric uid not in passwd: gid 0.
    ['4242', { uid: 4242, gid: 0, additionalGids: [] }],
    ['1000:50', { uid: 1000, gid: 50, additionalGids: [], username: 'alice' }],
    ['4242:4343', { uid: 4242, gid: 4343, additionalGids: [] }],
    ['alice:staff', { uid: 1000, gid: 50, additionalGids: [], username: 'alice' }],
    ['alice:4343', { uid: 1000, gid: 4343, additionalGids: [], username: 'alice' }],
    ['4242:staff', { uid: 4242, gid: 50, additionalGids: [] }],
    ['alice:', { uid: 1000, gid: 1000, additionalGids: [10, 999], username: 'alice' }],
    [':50', { uid: 0, gid: 50, additionalGids: [], username: 'root' }],
    ['top', { uid: 4294967294, gid: 4294967294, additionalGids: [], username: 'top' }],
    ['4294967294:4294967294', { uid: 4294967294, gid: 4294967294, additionalGids: [], username: 'top' }],
    ['0010', { uid: 10, gid: 0, additionalGids: [] }],
  ];
  it.each(ok)('resolves %j', async (spec, want) => {
    expect(await resolveUser(root, spec, IMAGE)).toEqual(want);
  });

  const bad: [string, string][] = [
    ['unknown name', 'nobody'],
    ['malformed passwd line is not a user', 'bad'],
    ['unknown group name', 'alice:nogroup'],
    ['unknown group for a numeric uid', '1000:nogroup'],
    ['uid 2^32-1', '4294967295'],
    ['gid 2^32-1', '0:4294967295'],
    ['uid far out of range', '99999999999999999999'],
    ['negative uid', '-1'],
    ['plus-signed uid', '+5'],
    ['negative gid', 'alice:-1'],
    ['hex uid', '0x10'],
    ['three fields', 'alice:staff:extra'],
    ['NUL byte', 'ali\0ce'],
  ];
  it.each(bad)('refuses %s (%j) with BAD_IMAGE', async (_name, spec) => {
    expect(await codeOf(resolveUser(root, spec, IMAGE))).toBe(ErrorCode.BAD_IMAGE);
  });

  it('names the user and the image when a name is unknown', async () => {
    await expect(resolveUser(root, 'nobody', IMAGE)).rejects.toThrow(/"nobody".*registry\.test\/app:1|registry\.test\/app:1.*"nobody"/);
  });

  it('works without /etc/passwd and /etc/group for numeric ids only', async () => {
    const bare = await makeRootfs('bare', {});
    expect(await resolveUser(bare, '1000', IMAGE)).toEqual({ uid: 1000, gid: 0, additionalGids: [] });
    expect(await resolveUser(bare, '1000:20', IMAGE)).toEqual({ uid: 1000, gid: 20, additionalGids: [] });
    expect(await codeOf(resolveUser(bare, 'alice', IMAGE))).toBe(ErrorCode.BAD_IMAGE);
    expect(await codeOf(resolveUser(bare, '1000:staff', IMAGE))).toBe(ErrorCode.BAD_IMAGE);
  });

  describe('symlinked /etc/passwd resolves inside the rootfs', () => {
    const inside = 'alice:x:1234:1234::/:/bin/sh\n';
    const decoy = 'alice:x:6666:6666::/:/bin/sh\n';

    it('absolute target climbing with ..', async () => {
      const r = await makeRootfs('abs/rootfs', { 'host/passwd': inside });
      await symlink('/../../../host/passwd', path.join(r, 'etc/passwd'));
      expect((await resolveUser(r, 'alice', IMAGE)).uid).toBe(1234);
    });

    it('absolute target naming the decoy by its host path', async () => {
      const decoyFile = path.join(tmp, 'decoy-abs', 'passwd');
      await mkdir(path.dirname(decoyFile), { recursive: true });
      await writeFile(decoyFile, decoy);
      const r = await makeRootfs('abs2/rootfs', { [decoyFile.slice(1)]: inside });
      await symlink(decoyFile, path.join(r, 'etc/passwd'));
      expect((await resolveUser(r, 'alice', IMAGE)).uid).toBe(1234);
    });

    it('relative target climbing out of the rootfs', async () => {
      // Naively followed, rel/rootfs/etc/../../host/passwd is the decoy at rel/host/passwd.
      await mkdir(path.join(tmp, 'rel', 'host'), { recursive: true });
      await writeFile(path.join(tmp, 'rel', 'host', 'passwd'), decoy);
      const r = await makeRootfs('rel/rootfs', { 'host/passwd': inside });
      await symlink('../../host/passwd', path.join(r, 'etc/passwd'));
      expect((await resolveUser(r, 'alice', IMAGE)).uid).toBe(1234);
    });

    it('a symlinked /etc/group is resolved the same way', async () => {
      await mkdir(path.join(tmp, 'grp', 'host'), { recursive: true });
      await writeFile(path.join(tmp, 'grp', 'host', 'group'), 'staff:x:6666:\n');
      const r = await makeRootfs('grp/rootfs', { 'etc/passwd': inside, 'host/group': 'staff:x:77:\n' });
      await symlink('../../host/group', path.join(r, 'etc/group'));
      expect((await resolveUser(r, 'alice:staff', IMAGE)).gid).toBe(77);
    });
  });

  it('refuses an oversized /etc/passwd', async () => {
    const r = await makeRootfs('huge', { 'etc/passwd': 'alice:x:1:1::/:/bin/sh\n' + '#'.repeat(MAX_DB_BYTES) });
    await expect(resolveUser(r, 'alice', IMAGE)).rejects.toMatchObject({ code: ErrorCode.BAD_IMAGE, message: expect.stringContaining('limit') });
  });

  it('refuses an /etc/passwd that is a directory or a FIFO (without blocking)', async () => {
    const d = await makeRootfs('dirpasswd', {});
    await mkdir(path.join(d, 'etc/passwd'));
    expect(await codeOf(resolveUser(d, '1000', IMAGE))).toBe(ErrorCode.BAD_IMAGE);
    const f = await makeRootfs('fifopasswd', {});
    execFileSync('mkfifo', [path.join(f, 'etc/passwd')]);
    expect(await codeOf(resolveUser(f, 'alice', IMAGE))).toBe(ErrorCode.BAD_IMAGE);
  });

  it('refuses a symlink loop at /etc/passwd', async () => {
    const r = await makeRootfs('loop', {});
    await symlink('/etc/passwd', path.join(r, 'etc/passwd'));
    expect(await codeOf(resolveUser(r, 'alice', IMAGE))).toBe(ErrorCode.BAD_IMAGE);
  });
});

describe('buildRuntimeSpec', () => {
  let root: string;
  beforeAll(async () => {
    root = await makeRootfs('spec', { 'etc/passwd': PASSWD, 'etc/group': GROUP });
  });
  const build = (ic: ImageConfig, manifestAnnotations?: Record<string, string>) =>
    buildRuntimeSpec({ imageConfig: ic, rootfs: root, image: IMAGE, manifestAnnotations });

  it('joins Entrypoint and Cmd into args', async () => {
    expect((await build(imageConfig({ Entrypoint: ['/bin/app', '-v'], Cmd: ['serve', '--port=1'] }))).process.args).toEqual([
      '/bin/app', '-v', 'serve', '--port=1',
    ]);
    expect((await build(imageConfig({ Cmd: ['sh', '-c', 'true'] }))).process.args).toEqual(['sh', '-c', 'true']);
    expect((await build(imageConfig({ Entrypoint: ['/init'], Cmd: null }))).process.args).toEqual(['/init']);
    expect((await build(imageConfig(null))).process.args).toEqual([]);
  });

  it('adds the default PATH only when the image has none', async () => {
    expect((await build(imageConfig({ Env: ['A=1', 'PATHX=2'] }))).process.env).toEqual([DEFAULT_PATH, 'A=1', 'PATHX=2']);
    expect((await build(imageConfig({ Env: ['A=1', 'PATH=/opt/bin'] }))).process.env).toEqual(['A=1', 'PATH=/opt/bin']);
    expect((await build(imageConfig({ Env: ['PATH='] }))).process.env).toEqual(['PATH=']);
    expect((await build(imageConfig({}))).process.env).toEqual([DEFAULT_PATH]);
  });

  it('sets cwd from WorkingDir, absolute', async () => {
    expect((await build(imageConfig({}))).process.cwd).toBe('/');
    expect((await build(imageConfig({ WorkingDir: '' }))).process.cwd).toBe('/');
    expect((await build(imageConfig({ WorkingDir: '/srv/app' }))).process.cwd).toBe('/srv/app');
    expect((await build(imageConfig({ WorkingDir: 'srv/app' }))).process.cwd).toBe('/srv/app');
  });

  it('resolves User through the rootfs', async () => {
    expect((await build(imageConfig({ User: 'alice' }))).process.user).toEqual({ uid: 1000, gid: 1000, additionalGids: [10, 999] });
    expect((await build(imageConfig({ User: '4242' }))).process.user).toEqual({ uid: 4242, gid: 0 });
    expect(await codeOf(build(imageConfig({ User: 'nobody' })))).toBe(ErrorCode.BAD_IMAGE);
  });

  it('emits the fixed defaults', async () => {
    const s = await build(imageConfig({}));
    expect(s.ociVersion).toBe('1.1.0');
    expect(s.root).toEqual({ path: 'rootfs', readonly: false });
    expect(s.process.terminal).toBe(false);
    expect(s.process.noNewPrivileges).toBe(false);
    expect(s.process.rlimits).toEqual([{ type: 'RLIMIT_NOFILE', hard: 1024, soft: 1024 }]);
    expect(DEFAULT_CAPABILITIES).toHaveLength(14);
    for (const set of [s.process.capabilities.bounding, s.process.capabilities.effective, s.process.capabilities.permitted]) {
      expect([...set].sort()).toEqual([...DEFAULT_CAPABILITIES].sort());
      expect(set).not.toContain('CAP_SYS_ADMIN');
    }
    expect(s.linux.namespaces.map((n) => n.type)).toEqual(['pid', 'ipc', 'uts', 'mount', 'network']);
    expect(s.linux.maskedPaths).toContain('/proc/kcore');
    expect(s.linux.readonlyPaths).toContain('/proc/sys');
    expect(s.mounts.map((m) => m.destination)).toEqual(['/proc', '/dev', '/dev/pts', '/dev/shm', '/dev/mqueue', '/sys', '/sys/fs/cgroup']);
    expect(s.mounts.find((m) => m.destination === '/sys')?.options).toContain('ro');
    expect(s.mounts.find((m) => m.destination === '/sys/fs/cgroup')?.options).toContain('ro');
    const json = JSON.parse(JSON.stringify(s)) as Record<string, unknown>;
    expect('hostname' in json).toBe(false);
  });

  it('builds annotations: implicit < manifest < labels', async () => {
    const ic = imageConfig(
      {
        StopSignal: 'SIGQUIT',
        ExposedPorts: { '80/tcp': {}, '53/udp': {} },
        Labels: { 'org.opencontainers.image.author': 'label-author', 'x.label': 'L', 'shared': 'from-label' },
      },
      { variant: 'v8', 'os.version': '6.1', 'os.features': ['a', 'b'], author: 'cfg-author', created: '2024-01-02T03:04:05Z', architecture: 'arm64' },
    );
    const a = (await build(ic, { shared: 'from-manifest', 'org.opencontainers.image.created': 'manifest-created', 'm.only': 'M' })).annotations;
    expect(a).toEqual({
      'org.opencontainers.image.os': 'linux',
      'org.opencontainers.image.architecture': 'arm64',
      'org.opencontainers.image.variant': 'v8',
      'org.opencontainers.image.os.version': '6.1',
      'org.opencontainers.image.os.features': 'a,b',
      'org.opencontainers.image.author': 'label-author',
      'org.opencontainers.image.created': 'manifest-created',
      'org.opencontainers.image.stopSignal': 'SIGQUIT',
      'org.opencontainers.image.exposedPorts': '80/tcp,53/udp',
      'x.label': 'L',
      shared: 'from-label',
      'm.only': 'M',
    });
  });

  it('omits annotations for absent fields', async () => {
    const a = (await build(imageConfig({ ExposedPorts: {} }))).annotations;
    expect(a).toEqual({ 'org.opencontainers.image.os': 'linux', 'org.opencontainers.image.architecture': 'amd64' });
  });

  it('turns Volumes into tmpfs mounts, cleaned, deduplicated, parents first', async () => {
    const s = await build(imageConfig({
      Volumes: { '/data/sub': {}, '/data': {}, '/data/': {}, '/var/../../../x': {}, '//cache/./y': {}, '/dev/shm': {}, '/proc/foo': {}, '/sys/fs/cgroup': {} },
    }));
    const vols = s.mounts.slice(7);
    expect(vols.map((m) => m.destination)).toEqual(['/cache/y', '/data', '/data/sub', '/x']);
    for (const m of vols) expect(m).toEqual({ destination: m.destination, type: 'tmpfs', source: 'tmpfs', options: ['nosuid', 'nodev', 'mode=755'] });
  });

  it.each([
    ['relative, climbing', '../../x'],
    ['relative', 'data'],
    ['the root', '/'],
    ['the root via ..', '/a/../..'],
    ['a NUL byte', '/da\0ta'],
  ])('refuses a volume that is %s', async (_name, vol) => {
    expect(await codeOf(build(imageConfig({ Volumes: { [vol]: {} } })))).toBe(ErrorCode.BAD_IMAGE);
  });

  it('refuses non-linux images', async () => {
    await expect(build(imageConfig({}, { os: 'windows' }))).rejects.toMatchObject({
      code: ErrorCode.BAD_IMAGE,
      message: `image ${IMAGE} is for os windows; only linux images can run here`,
    });
  });
});
