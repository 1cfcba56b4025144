/**
 * Layer semantics decided in src/pull/layers/apply.ts, on the real kernel: SCHILY.xattr records
 * (raw bytes, allow-list, overlayfs attributes refused), device nodes and FIFOs (as root and not),
 * char 0:0 refused, sparse and unknown types refused; and the bounds: PAX header size, and every
 * bound's message naming the cdh.toml key that raises it (parsed by src/config).
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { DEFAULT_IMAGE_LIMITS, parseConfig } from '../../src/config/index.js';
import { lgetxattr, llistxattr, lsetxattr } from '../../src/native/index.js';
import { LayerApplier } from '../../src/pull/layers/apply.js';
import { DEFAULT_LAYER_LIMITS } from '../../src/pull/layers/index.js';
import { readTar } from '../../src/pull/layers/tar.js';
import { applyTar, dataBlocks, LAYER_DIGEST, listTree, MTIME, packTar, paxData, rawHeader, rawTar, type PackEntry } from './_layers-tar.js';

const isRoot = process.getuid?.() === 0;
let base: string;
let root: string;

beforeEach(() => {
  base = fs.mkdtempSync(path.join(os.tmpdir(), 'gp-special-'));
  root = path.join(base, 'rootfs');
  fs.mkdirSync(root);
});
afterEach(() => {
  fs.rmSync(base, { recursive: true, force: true });
});

const at = (p: string): string => path.join(root, p);
const tree = (): string[] => listTree(root);

/** PAX records with raw byte values (binary xattrs), as a `x` header plus its data. */
function paxHeader(records: Array<[string, Buffer | string]>): Buffer {
  const parts: Buffer[] = [];
  for (const [k, v] of records) {
    const value = typeof v === 'string' ? Buffer.from(v) : v;
    const body = Buffer.concat([Buffer.from(` ${k}=`), value, Buffer.from('\n')]);
    let len = body.length + 1;
    while (String(len).length + body.length !== len) len = String(len).length + body.length;
    parts.push(Buffer.concat([Buffer.from(String(len)), body]));
  }
  const data = Buffer.concat(parts);
  return Buffer.concat([rawHeader({ name: 'PaxHeaders/x', flag: 'x', size: data.length }), dataBlocks(data)]);
}

function fileEntry(name: string, content: string, mode = 0o644, uid = 0): Buffer {
  return Buffer.concat([rawHeader({ name, flag: '0', size: Buffer.byteLength(content), mode, uid }), dataBlocks(content)]);
}

/** A ustar device header (flag '3' char, '4' block) with device numbers written as 7 octal digits. */
function deviceHeader(name: string, flag: '3' | '4', major: number, minor: number): Buffer {
  const b = rawHeader({ name, flag, mode: 0o600 });
  b.write(`${major.toString(8).padStart(7, '0')}\0`, 329, 8, 'latin1');
  b.write(`${minor.toString(8).padStart(7, '0')}\0`, 337, 8, 'latin1');
  b.fill(0x20, 148, 156);
  let sum = 0;
  for (const x of b) sum += x;
  b.write(`${sum.toString(8).padStart(6, '0')}\0 `, 148, 8, 'latin1');
  return b;
}

/** VFS_CAP_REVISION_2 with the effective flag: CAP_SETUID (7) and CAP_NET_RAW (13) permitted. */
const CAPABILITY = Buffer.from([0x01, 0x00, 0x00, 0x02, 0x80, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
const BINARY = Buffer.from([0x00, 0xff, 0xfe, 0x80, 0x0a, 0x3d, 0x20]);

/** Apply a tar with a LayerApplier of our choice (`root: false` shows the unprivileged behaviour). */
async function applyAs(tarBytes: Buffer, asRoot: boolean): Promise<LayerApplier> {
  const ctx = { image: 'registry.test/special:unit', layer: LAYER_DIGEST };
  const applier = new LayerApplier(root, ctx, DEFAULT_LAYER_LIMITS, { root: asRoot });
  await pipeline(Readable.from([tarBytes]), readTar(ctx, (h, b) => applier.apply(h, b)));
  await applier.finish();
  return applier;
}

describe.skipIf(!isRoot)('extended attributes (root)', () => {
  it('sets security.capability, user.* and trusted.* with their raw bytes, after chown', async () => {
    const t = rawTar([
      paxHeader([
        ['SCHILY.xattr.security.capability', CAPABILITY],
        ['SCHILY.xattr.user.mime', BINARY],
        ['SCHILY.xattr.trusted.tag', 'file'],
      ]),
      fileEntry('ping', 'p', 0o4755, 1000),
      paxHeader([
        ['SCHILY.xattr.user.dir', 'd'],
        ['SCHILY.xattr.trusted.dir', 't'],
      ]),
      rawHeader({ name: 'etc/', flag: '5', mode: 0o750 }),
      paxHeader([
        ['SCHILY.xattr.trusted.link', 'l'],
        ['SCHILY.xattr.user.nope', 'kernel allows user.* on files and directories only'],
      ]),
      rawHeader({ name: 'etc/link', flag: '2', linkname: '../ping' }),
    ]);
    const r = await applyTar(root, t);
    expect(r).toMatchObject({ entries: 3, xattrs: 6, ignoredXattrs: 1 });
    expect(lgetxattr(at('ping'), 'security.capability')).toEqual(CAPABILITY);
    expect(lgetxattr(at('ping'), 'user.mime')).toEqual(BINARY);
    expect(lgetxattr(at('ping'), 'trusted.tag')?.toString()).toBe('file');
    const st = fs.statSync(at('ping'));
    expect([st.uid, st.mode & 0o7777]).toEqual([1000, 0o4755]);
    expect(llistxattr(at('etc')).sort()).toEqual(['trusted.dir', 'user.dir']);
    expect(fs.statSync(at('etc')).mode & 0o7777).toBe(0o750);
    expect(lgetxattr(at('etc/link'), 'trusted.link')?.toString()).toBe('l');
    expect(llistxattr(at('etc/link'))).toEqual(['trusted.link']);
    expect(llistxattr(at('ping'))).not.toContain('trusted.link');
  });

  it('leaves out other namespaces, LIBARCHIVE records and hard link metadata, and logs them', async () => {
    const t = rawTar([
      paxHeader([
        ['SCHILY.xattr.security.selinux', 'system_u:object_r:bin_t:s0'],
        ['SCHILY.xattr.system.posix_acl_access', BINARY],
        ['LIBARCHIVE.xattr.user.x', 'eA=='],
        ['SCHILY.xattr.user.kept', 'yes'],
      ]),
      fileEntry('f', 'f'),
      paxHeader([['SCHILY.xattr.user.link', 'x']]),
      rawHeader({ name: 'hard', flag: '1', linkname: 'f' }),
    ]);
    const r = await applyTar(root, t);
    expect(r).toMatchObject({ xattrs: 1, ignoredXattrs: 3 });
    expect(llistxattr(at('f')).filter((n) => !n.startsWith('security.'))).toEqual(['user.kept']);
    expect(lgetxattr(at('f'), 'security.selinux')).toBeUndefined();
    expect(fs.statSync(at('hard')).ino).toBe(fs.statSync(at('f')).ino);
  });

  it('keeps lower attributes of a directory merged by a directory entry, and adds the upper ones', async () => {
    fs.mkdirSync(at('d'));
    lsetxattr(at('d'), 'user.lower', Buffer.from('1'));
    await applyTar(root, rawTar([paxHeader([['SCHILY.xattr.user.upper', '2']]), rawHeader({ name: 'd/', flag: '5' })]));
    expect(llistxattr(at('d')).sort()).toEqual(['user.lower', 'user.upper']);
  });

  it('refuses overlayfs attributes from the image: they would forge whiteouts and opaque directories', async () => {
    for (const name of ['trusted.overlay.opaque', 'trusted.overlay.redirect', 'user.overlay.opaque']) {
      const t = rawTar([fileEntry('before', 'b'), paxHeader([[`SCHILY.xattr.${name}`, 'y']]), rawHeader({ name: 'dir/', flag: '5' })]);
      await expect(applyTar(root, t), name).rejects.toMatchObject({
        code: 'BAD_IMAGE',
        message: expect.stringContaining(`overlayfs attribute "${name}"`),
      });
      expect(tree()).toEqual(['before']);
      fs.rmSync(at('before'));
    }
  });

  it('fails an attribute the kernel refuses with BAD_IMAGE (a malformed capability)', async () => {
    const t = rawTar([paxHeader([['SCHILY.xattr.security.capability', '\u0001']]), fileEntry('f', 'f')]);
    await expect(applyTar(root, t)).rejects.toMatchObject({ code: 'BAD_IMAGE', message: expect.stringContaining('kernel refuses (EINVAL)') });
  });

  it('refuses xattr values above the Linux size limit', async () => {
    const t = rawTar([paxHeader([['SCHILY.xattr.user.big', Buffer.alloc(65537, 0x61)]]), fileEntry('f', 'f')]);
    await expect(applyTar(root, t)).rejects.toMatchObject({ code: 'BAD_IMAGE', message: expect.stringContaining('more than Linux allows') });
    expect(tree()).toEqual([]);
  });
});

describe('extended attributes without root', () => {
  it('sets user.* only; security.capability and trusted.* are left out', async () => {
    const t = rawTar([
      paxHeader([
        ['SCHILY.xattr.security.capability', CAPABILITY],
        ['SCHILY.xattr.trusted.tag', 'x'],
        ['SCHILY.xattr.user.kept', BINARY],
      ]),
      fileEntry('f', 'f'),
    ]);
    const applier = await applyAs(t, false);
    expect([applier.xattrs, applier.ignoredXattrs]).toEqual([1, 2]);
    expect([...applier.ignoredXattrNames].sort()).toEqual(['security.capability', 'trusted.tag']);
    expect(lgetxattr(at('f'), 'user.kept')).toEqual(BINARY);
    expect(lgetxattr(at('f'), 'security.capability')).toBeUndefined();
  });
});

describe('device nodes and FIFOs', () => {
  const devices: PackEntry[] = [
    { name: 'dev/', type: 'directory' },
    { name: 'dev/null', type: 'character-device', devmajor: 1, devminor: 3, mode: 0o666 },
    { name: 'dev/loop0', type: 'block-device', devmajor: 7, devminor: 0, mode: 0o660, gid: 6 },
    { name: 'run/pipe', type: 'fifo', mode: 0o620, uid: 33, gid: 33 },
  ];

  it.skipIf(!isRoot)('creates char and block devices and FIFOs as root, with mode, owner and mtime', async () => {
    const r = await applyTar(root, await packTar(devices));
    expect(r.entries).toBe(4);
    const nul = fs.lstatSync(at('dev/null'));
    expect([nul.isCharacterDevice(), nul.rdev, nul.mode & 0o7777, nul.uid]).toEqual([true, (1 << 8) | 3, 0o666, 0]);
    const loop = fs.lstatSync(at('dev/loop0'));
    expect([loop.isBlockDevice(), loop.rdev, loop.mode & 0o7777, loop.gid]).toEqual([true, 7 << 8, 0o660, 6]);
    const fifo = fs.lstatSync(at('run/pipe'));
    expect([fifo.isFIFO(), fifo.mode & 0o7777, fifo.uid, fifo.gid]).toEqual([true, 0o620, 33, 33]);
    expect(fifo.mtimeMs).toBe(MTIME.getTime());
  });

  it.skipIf(!isRoot)('replaces a lower file by a device, and a device by a file', async () => {
    fs.mkdirSync(at('dev'));
    fs.writeFileSync(at('dev/null'), 'lower');
    fs.symlinkSync('/etc/passwd', at('dev/tty'));
    await applyTar(
      root,
      await packTar([
        { name: 'dev/null', type: 'character-device', devmajor: 1, devminor: 3 },
        { name: 'dev/tty', type: 'character-device', devmajor: 5, devminor: 0 },
      ]),
    );
    expect(fs.lstatSync(at('dev/null')).isCharacterDevice()).toBe(true);
    expect(fs.lstatSync(at('dev/tty')).rdev).toBe(5 << 8);
    await applyTar(root, await packTar([{ name: 'dev/null', content: 'upper' }]));
    expect(fs.readFileSync(at('dev/null'), 'utf8')).toBe('upper');
  });

  it('refuses device nodes without root, but creates FIFOs', async () => {
    await expect(applyAs(await packTar([devices[0]!, devices[1]!]), false)).rejects.toMatchObject({
      code: 'BAD_IMAGE',
      message: expect.stringContaining('device nodes need root'),
    });
    expect(tree()).toEqual(['dev']);
    await applyAs(await packTar([devices[3]!]), false);
    expect(fs.lstatSync(at('run/pipe')).isFIFO()).toBe(true);
  });

  it('refuses a char device 0:0 (an overlayfs whiteout in disguise) and impossible device numbers', async () => {
    const cases: Array<[Buffer, string]> = [
      [deviceHeader('etc/passwd', '3', 0, 0), 'overlayfs whiteout in disguise'],
      [deviceHeader('dev/x', '3', 4096, 0), 'invalid device numbers 4096:0'],
      [deviceHeader('dev/y', '4', 8, 0x100000), 'invalid device numbers 8:1048576'],
    ];
    for (const [header, text] of cases) {
      await expect(applyTar(root, rawTar([header])), text).rejects.toMatchObject({
        code: 'BAD_IMAGE',
        message: expect.stringContaining(text),
      });
    }
    expect(tree()).toEqual([]);
    // The same numbers one below the limits are fine.
    if (isRoot) {
      await applyTar(root, rawTar([deviceHeader('c', '3', 4095, 0), deviceHeader('b', '4', 8, 0xfffff)]));
      expect(fs.lstatSync(at('b')).isBlockDevice()).toBe(true);
    }
  });

  it('still refuses sparse files, contiguous files and unknown entry types', async () => {
    await expect(applyTar(root, await packTar([{ name: 's', content: 'x', pax: { 'GNU.sparse.major': '1', 'GNU.sparse.minor': '0' } }]))).rejects.toMatchObject({
      code: 'BAD_IMAGE',
      message: expect.stringContaining('sparse'),
    });
    await expect(applyTar(root, await packTar([{ name: 'c', type: 'contiguous-file', content: 'x' }]))).rejects.toMatchObject({
      code: 'BAD_IMAGE',
      message: expect.stringContaining('unsupported tar entry type'),
    });
    await expect(applyTar(root, rawTar([rawHeader({ name: 'gnu-sparse', flag: 'S' })]))).rejects.toMatchObject({ code: 'BAD_IMAGE' });
    expect(tree()).toEqual([]);
  });
});

describe('bounds name their cdh.toml key', () => {
  it('bounds one PAX header by maxPaxHeaderBytes (1 MiB by default, as Go)', async () => {
    const big = (n: number): Buffer => rawTar([paxHeader([['comment', 'c'.repeat(n)]]), fileEntry('f', 'f')]);
    await applyTar(root, big(500_000));
    expect(tree()).toEqual(['f']);
    await expect(applyTar(root, big(1_100_000))).rejects.toMatchObject({
      code: 'BAD_IMAGE',
      message: expect.stringMatching(/PAX header of \d+ bytes .* max_pax_header_bytes/),
    });
    await expect(applyTar(root, big(10_000), { limits: { maxPaxHeaderBytes: 8192 } })).rejects.toMatchObject({
      code: 'BAD_IMAGE',
      message: expect.stringContaining('max_pax_header_bytes'),
    });
  });

  it('bounds GNU long names by the same key', async () => {
    const name = `${'d/'.repeat(3000)}f`;
    const t = rawTar([rawHeader({ name: '././@LongLink', flag: 'L', size: name.length + 1, format: 'gnu' }), dataBlocks(`${name}\0`), fileEntry('short', 'x')]);
    await expect(applyTar(root, t, { limits: { maxPaxHeaderBytes: 4096, maxPathLength: 65536, maxPathDepth: 65536 } })).rejects.toMatchObject({
      code: 'BAD_IMAGE',
      message: expect.stringMatching(/GNU long name header .* max_pax_header_bytes/),
    });
  });

  it('refuses a malformed PAX header', async () => {
    const data = Buffer.from('99 path=short\n');
    const t = rawTar([rawHeader({ name: 'x', flag: 'x', size: data.length }), dataBlocks(data), fileEntry('f', 'f')]);
    await expect(applyTar(root, t)).rejects.toMatchObject({ code: 'BAD_IMAGE', message: expect.stringContaining('malformed PAX header') });
    expect(tree()).toEqual([]);
  });

  it('a gzip bomb stops at its bound with the key to raise', async () => {
    const t = await packTar([{ name: 'zeros', content: Buffer.alloc(8 * 1024 * 1024) }]);
    await expect(applyTar(root, t)).rejects.toMatchObject({
      code: 'BAD_IMAGE',
      message: expect.stringMatching(/decompression bomb .*raise \[image\] max_layer_ratio in cdh\.toml/),
    });
    await expect(applyTar(root, t, { limits: { maxRatio: 1e6, maxUncompressedBytes: 2 * 1024 * 1024 } })).rejects.toMatchObject({
      code: 'BAD_IMAGE',
      message: expect.stringContaining('raise [image] max_layer_bytes in cdh.toml'),
    });
  });

  it('entries, path length and depth name max_layer_entries, max_path_length, max_path_depth', async () => {
    const entries = Array.from({ length: 3 }, (_, i) => ({ name: `f${i}`, content: '' }));
    await expect(applyTar(root, await packTar(entries), { limits: { maxEntries: 2 } })).rejects.toMatchObject({
      message: expect.stringContaining('[image] max_layer_entries'),
    });
    await expect(applyTar(root, await packTar([{ name: 'a'.repeat(300), content: '' }]), { limits: { maxPathLength: 256 } })).rejects.toMatchObject({
      message: expect.stringContaining('[image] max_path_length'),
    });
    await expect(applyTar(root, await packTar([{ name: 'a/b/c', content: '' }]), { limits: { maxPathDepth: 2 } })).rejects.toMatchObject({
      message: expect.stringContaining('[image] max_path_depth'),
    });
  });
});

describe('cdh.toml [image] bounds', () => {
  it('has the documented defaults, the layer ones equal to the layer pipeline defaults', () => {
    const { config } = parseConfig('', 'test');
    expect(config.image.limits).toEqual(DEFAULT_IMAGE_LIMITS);
    expect(DEFAULT_IMAGE_LIMITS).toMatchObject({ maxManifestBytes: 4 * 1024 * 1024, maxConfigBytes: 4 * 1024 * 1024, ...DEFAULT_LAYER_LIMITS });
  });

  it('reads every key into Config.image.limits', () => {
    const { config, warnings } = parseConfig(
      `[image]
max_manifest_bytes = 1048576
max_config_bytes = 2097152
max_layer_bytes = 10737418240
max_layer_ratio = 5000
max_layer_entries = 2000000
max_path_length = 8192
max_path_depth = 512
max_pax_header_bytes = 4194304
`,
      'test',
    );
    expect(warnings).toEqual([]);
    expect(config.image.limits).toEqual({
      maxManifestBytes: 1048576,
      maxConfigBytes: 2097152,
      maxUncompressedBytes: 10737418240,
      maxRatio: 5000,
      maxEntries: 2000000,
      maxPathLength: 8192,
      maxPathDepth: 512,
      maxPaxHeaderBytes: 4194304,
    });
  });

  it('refuses nonsense values naming the key', () => {
    for (const line of ['max_layer_ratio = 0', 'max_layer_entries = -1', 'max_path_length = 10', 'max_pax_header_bytes = "1M"', 'max_layer_bytes = 1.5']) {
      const key = line.split(' ')[0]!;
      expect(() => parseConfig(`[image]\n${line}\n`, 'test'), line).toThrow(expect.objectContaining({ code: 'CONFIG', message: expect.stringContaining(`image.${key}`) }));
    }
  });
});

// paxData is the helper's text-only variant; make sure both agree on a text record.
it('test helper sanity: paxHeader encodes like paxData', () => {
  expect(paxHeader([['path', 'abc']]).subarray(512, 512 + paxData({ path: 'abc' }).length)).toEqual(paxData({ path: 'abc' }));
});
