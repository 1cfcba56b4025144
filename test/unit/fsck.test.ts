/**
 * `guestpull fsck` on stores built by hand on disk (layers with records and tree summaries, bundle
 * records, configs, staging), each corrupted one way: every corruption is found with its kind, a
 * clean store is clean, --repair removes only the safe cases. Also the tree summary itself, and
 * the CLI's flags, exit codes, stderr summary and --json report.
 */
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Writable } from 'node:stream';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { parseFsckArgs, runFsck } from '../../src/cli/fsck.js';
import { GuestpullError } from '../../src/errors.js';
import { silentLogger } from '../../src/log.js';
import { lsetxattr, mknod, nativeAvailable } from '../../src/native/index.js';
import { fsckStore, summarizeTree, summarizeTreeWithContent, type FsckKind, type FsckReport } from '../../src/pull/store/fsck.js';
import { chainHex, chainIds, Layout } from '../../src/pull/store/layout.js';
import { ownerTag } from '../../src/pull/store/lock.js';
import type { MountEntry } from '../../src/pull/store/mountinfo.js';
import type { BundleRecord, LayerRecord } from '../../src/pull/store/records.js';

const native = nativeAvailable();
const isRoot = process.getuid?.() === 0;
let tmp: string;
let layout: Layout;

beforeEach(() => {
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'guestpull-fsck-'));
  layout = new Layout(path.join(tmp, 'work'));
  for (const d of [layout.layersDir, layout.stagingDir, layout.bundlesDir, layout.configsDir]) fs.mkdirSync(d, { recursive: true });
});
afterEach(() => {
  fs.rmSync(tmp, { recursive: true, force: true });
});

const diffId = (s: string): string => 'sha256:' + createHash('sha256').update(s).digest('hex');
const DEAD_OWNER = '4199999999-1'; // a pid beyond pid_max: never alive

type Populate = (diff: string) => void;

/** A published layer: diff/ filled by `populate`, its record (with a tree summary unless `noTree`). */
async function addLayer(diff: string, parent: LayerRecord | null, populate: Populate, opts: { noTree?: boolean; content?: boolean } = {}): Promise<LayerRecord> {
  const chainId = parent === null ? diff : chainIds([parent.chainId, diff])[1]!;
  // chainIds([p, d]) hashes "p d" exactly as the chain rule does for a parent chain ID p.
  const hex = chainHex(chainId);
  const dir = layout.layerDiff(hex);
  fs.mkdirSync(dir, { recursive: true });
  fs.chmodSync(dir, 0o755);
  populate(dir);
  const rec: LayerRecord = {
    version: 1, chainId, hex, diffId: diff, parent: parent?.hex ?? null, layerDigest: diffId(`blob of ${diff}`),
    mediaType: 'application/vnd.oci.image.layer.v1.tar+gzip', compressedBytes: 10, uncompressedBytes: 20, entries: 3,
    created: '2024-01-01T00:00:00.000Z',
  };
  if (!opts.noTree) rec.tree = opts.content ? await summarizeTreeWithContent(dir) : await summarizeTree(dir);
  writeRecord(hex, rec);
  return rec;
}

function writeRecord(hex: string, rec: unknown): void {
  fs.writeFileSync(layout.layerRecord(hex), JSON.stringify(rec));
}

function readLayerRecord(hex: string): LayerRecord {
  return JSON.parse(fs.readFileSync(layout.layerRecord(hex), 'utf8')) as LayerRecord;
}

const baseFiles: Populate = (d) => {
  fs.mkdirSync(path.join(d, 'etc'), { mode: 0o755 });
  fs.writeFileSync(path.join(d, 'etc/os-release'), 'ID=base\n', { mode: 0o644 });
  fs.symlinkSync('os-release', path.join(d, 'etc/release'));
};
const topFiles: Populate = (d) => {
  fs.mkdirSync(path.join(d, 'usr/bin'), { recursive: true, mode: 0o755 });
  fs.writeFileSync(path.join(d, 'usr/bin/app'), '#!/bin/sh\necho app\n', { mode: 0o755 });
};

/** A mounted bundle record over `layers`, and the mount table that shows it mounted. */
function addBundle(id: string, layers: LayerRecord[], state: BundleRecord['state'] = 'mounted', owner = ownerTag()): { rec: BundleRecord; mount: MountEntry } {
  const bundle = path.join(tmp, 'bundles', id);
  fs.mkdirSync(path.join(bundle, 'rootfs'), { recursive: true });
  fs.writeFileSync(path.join(bundle, 'config.json'), '{}');
  for (const sub of ['upper', 'work']) fs.mkdirSync(path.join(layout.bundleDir(id), sub), { recursive: true });
  const rec: BundleRecord = {
    version: 1, id, state, owner, bundle, rootfs: state === 'mounted' ? path.join(bundle, 'rootfs') : '',
    layers: layers.map((l) => l.hex), image: 'registry.test/app:v1', manifestDigest: diffId('manifest'), configDigest: diffId('config'),
    created: '2024-01-01T00:00:00.000Z',
  };
  fs.writeFileSync(layout.bundleRecord(id), JSON.stringify(rec));
  const mount: MountEntry = {
    id: 100, parent: 1, mountPoint: rec.rootfs, fstype: 'overlay', source: 'overlay',
    superOptions: new Map([['upperdir', layout.bundleUpper(id)], ['workdir', path.join(layout.bundleDir(id), 'work')]]),
  };
  return { rec, mount };
}

function addConfig(bytes: string): string {
  const hex = createHash('sha256').update(bytes).digest('hex');
  fs.mkdirSync(path.join(layout.configsDir, 'sha256'), { recursive: true });
  fs.writeFileSync(path.join(layout.configsDir, 'sha256', hex), bytes);
  return hex;
}

interface Store { base: LayerRecord; mid: LayerRecord; top: LayerRecord; mounts: MountEntry[] }

/** base → mid → top, one mounted bundle over all three, one config. */
async function cleanStore(): Promise<Store> {
  const base = await addLayer(diffId('base'), null, baseFiles);
  const mid = await addLayer(diffId('mid'), base, (d) => fs.writeFileSync(path.join(d, 'mid.txt'), 'mid\n'));
  const top = await addLayer(diffId('top'), mid, topFiles);
  const { mount } = addBundle('0123456789abcdef', [base, mid, top]);
  addConfig('{"config":{}}');
  return { base, mid, top, mounts: [mount] };
}

async function fsck(s: Store | { mounts: MountEntry[] }, opts: { deep?: boolean; repair?: boolean } = {}): Promise<FsckReport> {
  return fsckStore(layout, { logger: silentLogger(), mounts: () => s.mounts, ...opts });
}

const kinds = (r: FsckReport): FsckKind[] => r.problems.map((p) => p.kind).sort();

describe.skipIf(!native || !isRoot)('fsckStore', () => {
  it('finds nothing wrong in a clean store', async () => {
    const s = await cleanStore();
    const r = await fsck(s, { deep: true });
    expect(r.problems).toEqual([]);
    expect(r.clean).toBe(true);
    expect(r.counts).toEqual({ layers: 3, verified: 3, bundles: 1, configs: 1, inProgress: 0 });
    // --deep without recorded content digests: metadata verified, contents noted as unverifiable.
    expect(r.unverifiable.map((u) => u.path).sort()).toEqual([s.base, s.mid, s.top].map((l) => layout.layerDiff(l.hex)).sort());
    expect((await fsck(s)).unverifiable).toEqual([]);
  });

  it('reports a record whose hex does not name its directory', async () => {
    const s = await cleanStore();
    writeRecord(s.mid.hex, { ...readLayerRecord(s.mid.hex), hex: 'f'.repeat(64) });
    const r = await fsck(s);
    // The bundle and the child lose their layer as well: the mid layer is no longer valid.
    expect(kinds(r)).toEqual(['bundle-layer-missing', 'parent-missing', 'record-hex-mismatch']);
    expect(r.problems.find((p) => p.kind === 'record-hex-mismatch')!.path).toBe(layout.layerRecord(s.mid.hex));
    expect(r.clean).toBe(false);
  });

  it('reports a chain ID that does not follow from the parent and the diff ID', async () => {
    const s = await cleanStore();
    writeRecord(s.top.hex, { ...readLayerRecord(s.top.hex), diffId: diffId('something else') });
    expect(kinds(await fsck(s))).toEqual(['chain-mismatch']);
  });

  it("reports a base layer whose chain ID is not its diff ID", async () => {
    const s = await cleanStore();
    writeRecord(s.base.hex, { ...readLayerRecord(s.base.hex), diffId: diffId('other base') });
    expect(kinds(await fsck(s))).toEqual(['chain-mismatch']);
  });

  it('reports a missing parent', async () => {
    const s = await cleanStore();
    fs.rmSync(layout.layerDir(s.mid.hex), { recursive: true });
    const r = await fsck(s);
    expect(kinds(r)).toEqual(['bundle-layer-missing', 'parent-missing']);
    expect(r.problems.find((p) => p.kind === 'parent-missing')!.detail).toContain(s.mid.hex);
  });

  it('reports a layer without a record, an unreadable record, a record without a tree', async () => {
    const s = await cleanStore();
    fs.rmSync(layout.layerRecord(s.top.hex));
    fs.mkdirSync(layout.layerDiff('a'.repeat(64)), { recursive: true });
    fs.writeFileSync(layout.layerRecord('a'.repeat(64)), '{"version": 1, "hex": ');
    const noDiff = 'b'.repeat(64);
    fs.mkdirSync(layout.layerDir(noDiff));
    const r = await fsck(s);
    expect(kinds(r)).toEqual(['bundle-layer-missing', 'record-invalid', 'record-missing', 'record-missing']);
    expect(r.problems.filter((p) => p.kind === 'record-missing').map((p) => p.path).sort()).toEqual([layout.layerDir(s.top.hex), layout.layerDir(noDiff)].sort());
  });

  it('reports a record whose tree directory is missing', async () => {
    const s = await cleanStore();
    fs.rmSync(layout.layerDiff(s.top.hex), { recursive: true });
    expect(kinds(await fsck(s))).toEqual(['bundle-layer-missing', 'tree-missing']);
  });

  it('reports staging leftovers of dead processes, not the work in progress of live ones', async () => {
    const s = await cleanStore();
    const dead = path.join(layout.stagingDir, `${DEAD_OWNER}-0123456789abcdef`);
    fs.mkdirSync(path.join(dead, 'layer/diff'), { recursive: true });
    const junk = path.join(layout.stagingDir, 'junk');
    fs.writeFileSync(junk, '');
    fs.mkdirSync(path.join(layout.stagingDir, `${ownerTag()}-fedcba9876543210`));
    const r = await fsck(s);
    expect(kinds(r)).toEqual(['staging-leftover', 'staging-leftover']);
    expect(r.problems.map((p) => p.path).sort()).toEqual([dead, junk].sort());
    expect(r.counts.inProgress).toBe(1);
  });

  describe('a tree changed after it was published', () => {
    const changes: [string, (d: string) => void, RegExp][] = [
      ['a byte appended to a file', (d) => fs.appendFileSync(path.join(d, 'usr/bin/app'), 'x'), /file bytes/],
      ['a mode change', (d) => fs.chmodSync(path.join(d, 'usr/bin/app'), 0o4755), /metadata digest/],
      ['an extra file', (d) => fs.writeFileSync(path.join(d, 'usr/extra'), ''), /entries/],
      ['a file removed', (d) => fs.rmSync(path.join(d, 'usr/bin/app')), /entries/],
      ['an owner change', (d) => fs.lchownSync(path.join(d, 'usr/bin'), 1000, 1000), /metadata digest/],
      ['a symlink retargeted (same length)', (d) => {
        fs.rmSync(path.join(d, 'usr/bin/app'));
        fs.symlinkSync('/bin/zz', path.join(d, 'usr/bin/app'));
      }, /metadata digest/],
      ['an xattr added', (d) => lsetxattr(path.join(d, 'usr'), 'trusted.guestpull-test', Buffer.from('x')), /metadata digest/],
    ];
    for (const [what, change, detail] of changes) {
      it(`finds ${what}`, async () => {
        const s = await cleanStore();
        change(layout.layerDiff(s.top.hex));
        const r = await fsck(s);
        expect(kinds(r)).toEqual(['tree-mismatch']);
        expect(r.problems[0]!.path).toBe(layout.layerDiff(s.top.hex));
        expect(r.problems[0]!.detail).toMatch(detail);
        expect(r.counts.verified).toBe(2);
      });
    }

    it('finds a same-size content change only with --deep, and only against a recorded content digest', async () => {
      const base = await addLayer(diffId('base'), null, baseFiles, { content: true });
      const other = await addLayer(diffId('other'), null, topFiles);
      const s = { mounts: [] };
      fs.writeFileSync(path.join(layout.layerDiff(base.hex), 'etc/os-release'), 'ID=evil\n', { mode: 0o644 });
      fs.writeFileSync(path.join(layout.layerDiff(other.hex), 'usr/bin/app'), '#!/bin/sh\necho bad\n');
      expect((await fsck(s)).problems).toEqual([]);
      const deep = await fsck(s, { deep: true });
      expect(kinds(deep)).toEqual(['content-mismatch']);
      expect(deep.problems[0]!.path).toBe(layout.layerDiff(base.hex));
      expect(deep.unverifiable.map((u) => u.path)).toEqual([layout.layerDiff(other.hex)]);
    });
  });

  it('notes layers recorded without a tree summary as unverifiable, not as problems', async () => {
    const base = await addLayer(diffId('base'), null, baseFiles, { noTree: true });
    fs.writeFileSync(path.join(layout.layerDiff(base.hex), 'changed'), '');
    const r = await fsck({ mounts: [] });
    expect(r.problems).toEqual([]);
    expect(r.clean).toBe(true);
    expect(r.unverifiable).toEqual([{ kind: 'unverifiable', path: layout.layerDiff(base.hex), detail: expect.stringMatching(/no tree summary/), repaired: false }]);
    expect(r.counts).toMatchObject({ layers: 1, verified: 0 });
  });

  it('reports a bundle record naming a missing layer, or layers out of chain order', async () => {
    const s = await cleanStore();
    const missing = addBundle('1111222233334444', [s.base, { ...s.mid, hex: 'c'.repeat(64) }]);
    const swapped = addBundle('5555666677778888', [s.mid, s.base]);
    const r = await fsck({ mounts: [...s.mounts, missing.mount, swapped.mount] });
    expect(kinds(r)).toEqual(['bundle-chain-mismatch', 'bundle-layer-missing']);
    expect(r.problems.find((p) => p.kind === 'bundle-layer-missing')).toMatchObject({ path: layout.bundleRecord('1111222233334444'), detail: expect.stringContaining('c'.repeat(64)) });
    expect(r.problems.find((p) => p.kind === 'bundle-chain-mismatch')!.path).toBe(layout.bundleRecord('5555666677778888'));
  });

  it('reports mounted records whose overlay is gone, dead pending records, orphan bundle dirs, temp files', async () => {
    const s = await cleanStore();
    addBundle('aaaabbbbccccdddd', [s.base], 'pending', DEAD_OWNER);
    addBundle('9999888877776666', [s.base, s.mid], 'pending'); // a live pull: its layers may still come
    fs.mkdirSync(layout.bundleDir('0000111122223333'));
    fs.writeFileSync(path.join(layout.bundlesDir, '0000111122223333.json.tmp-abcdef'), '{');
    fs.writeFileSync(path.join(layout.layerDir(s.base.hex), 'layer.json.tmp-123456'), '{');
    const r = await fsck({ mounts: [] }); // the first bundle's overlay is no longer mounted
    expect(kinds(r)).toEqual(['bundle-dead', 'bundle-orphan', 'bundle-unmounted', 'temp-file', 'temp-file']);
    expect(r.problems.find((p) => p.kind === 'bundle-unmounted')!.path).toBe(layout.bundleRecord('0123456789abcdef'));
    expect(r.problems.find((p) => p.kind === 'bundle-dead')!.path).toBe(layout.bundleRecord('aaaabbbbccccdddd'));
    expect(r.counts.inProgress).toBe(1);
  });

  it('reports a mounted bundle of a dead process that never wrote config.json', async () => {
    const s = await cleanStore();
    const half = addBundle('abababababababab', [s.base], 'mounted', DEAD_OWNER);
    fs.rmSync(path.join(half.rec.bundle, 'config.json'));
    expect(kinds(await fsck({ mounts: [...s.mounts, half.mount] }))).toEqual(['bundle-dead']);
  });

  it('reports cached configs that do not match their digest, and strays', async () => {
    const s = await cleanStore();
    const hex = addConfig('{"a":1}');
    fs.writeFileSync(path.join(layout.configsDir, 'sha256', hex), '{"a":2}');
    fs.writeFileSync(path.join(layout.layersDir, 'README'), '');
    const r = await fsck(s);
    expect(kinds(r)).toEqual(['config-mismatch', 'stray']);
    expect(r.counts.configs).toBe(1);
  });

  it('--repair removes staging leftovers, incomplete layers and temp files, and only reports the rest', async () => {
    const s = await cleanStore();
    const dead = path.join(layout.stagingDir, `${DEAD_OWNER}-0123456789abcdef`);
    fs.mkdirSync(dead);
    const incomplete = layout.layerDir('d'.repeat(64));
    fs.mkdirSync(path.join(incomplete, 'diff'), { recursive: true });
    const temp = path.join(layout.layerDir(s.base.hex), 'layer.json.tmp-123456');
    fs.writeFileSync(temp, '{');
    fs.appendFileSync(path.join(layout.layerDiff(s.top.hex), 'usr/bin/app'), 'x');
    const r = await fsck(s, { repair: true });
    expect(r.problems.map((p) => [p.kind, p.repaired]).sort()).toEqual([
      ['record-missing', true],
      ['staging-leftover', true],
      ['temp-file', true],
      ['tree-mismatch', false],
    ]);
    expect(r.clean).toBe(false);
    for (const p of [dead, incomplete, temp]) expect(fs.existsSync(p), p).toBe(false);
    expect(fs.existsSync(layout.layerDiff(s.top.hex))).toBe(true);
    // What is left is only the tree that changed.
    expect(kinds(await fsck(s))).toEqual(['tree-mismatch']);
  });

  it('--repair never removes below a mount', async () => {
    const s = await cleanStore();
    const dead = path.join(layout.stagingDir, `${DEAD_OWNER}-0123456789abcdef`);
    fs.mkdirSync(path.join(dead, 'merged'), { recursive: true });
    const stuck: MountEntry = { id: 7, parent: 1, mountPoint: path.join(dead, 'merged'), fstype: 'tmpfs', source: 'x', superOptions: new Map() };
    // The mount table keeps showing the mount (the unmount is not real here): nothing is removed.
    const r = await fsck({ mounts: [...s.mounts, stuck] }, { repair: true });
    expect(r.problems).toMatchObject([{ kind: 'staging-leftover', repaired: false }]);
    expect(fs.existsSync(dead)).toBe(true);
  });
});

describe.skipIf(!native || !isRoot)('summarizeTree', () => {
  function build(root: string, order: 'forward' | 'reverse'): void {
    const steps: (() => void)[] = [
      () => fs.mkdirSync(path.join(root, 'a'), { mode: 0o755 }),
      () => fs.mkdirSync(path.join(root, 'b'), { mode: 0o700 }),
      () => fs.writeFileSync(path.join(root, 'z'), 'zz', { mode: 0o600 }),
      () => fs.symlinkSync('../z', path.join(root, 'l')),
    ];
    fs.mkdirSync(root, { mode: 0o755 });
    fs.chmodSync(root, 0o755);
    for (const step of order === 'forward' ? steps : [...steps].reverse()) step();
    fs.writeFileSync(path.join(root, 'a/f'), 'hello', { mode: 0o644 });
  }

  it('is the same for the same tree whatever the creation order, and counts entries and file bytes', async () => {
    build(path.join(tmp, 't1'), 'forward');
    build(path.join(tmp, 't2'), 'reverse');
    const a = await summarizeTree(path.join(tmp, 't1'));
    const b = await summarizeTree(path.join(tmp, 't2'));
    expect(a).toEqual(b);
    expect(a).toMatchObject({ entries: 6, bytes: 7 });
    expect(a.digest).toMatch(/^[0-9a-f]{64}$/);
    expect(a.contentDigest).toBeUndefined();
  });

  it('metadata digest ignores same-size content; the content digest does not', async () => {
    const root = path.join(tmp, 't');
    build(root, 'forward');
    const before = await summarizeTreeWithContent(root);
    fs.writeFileSync(path.join(root, 'a/f'), 'HELLO');
    const after = await summarizeTreeWithContent(root);
    expect(after.digest).toBe(before.digest);
    expect(after.contentDigest).not.toBe(before.contentDigest);
    expect((await summarizeTree(root)).digest).toBe(before.digest);
  });

  it('hashes exactly the documented lines', async () => {
    const root = path.join(tmp, 't');
    fs.mkdirSync(root);
    fs.chmodSync(root, 0o755);
    fs.writeFileSync(path.join(root, 'f'), 'hello', { mode: 0o640 });
    fs.chmodSync(path.join(root, 'f'), 0o640);
    fs.symlinkSync('f', path.join(root, 'l'));
    const line = (p: string, type: string, mode: string, size: number, extra: string): string => {
      const st = fs.lstatSync(path.join(root, p));
      return `${p}\0${type}\0${mode}\0${st.uid}\0${st.gid}\0${size}\0${extra}\0${0}\0`;
    };
    const lines = [line('.', 'd', '0755', 0, ''), line('f', 'f', '0640', 5, ''), line('l', 'l', '0777', 0, 'f')];
    const sha = (s: string): string => createHash('sha256').update(s).digest('hex');
    const fileSha = sha('hello');
    expect(await summarizeTreeWithContent(root)).toEqual({
      entries: 3,
      bytes: 5,
      digest: sha(lines.map((l) => `${l}\n`).join('')),
      contentDigest: sha(`${lines[0]}\n${lines[1]}${fileSha}\n${lines[2]}\n`),
    });
  });

  it('hashes the content of files larger than one read (streamed) too', async () => {
    const root = path.join(tmp, 't');
    fs.mkdirSync(root);
    const big = Buffer.alloc(3 * 1024 * 1024, 7);
    fs.writeFileSync(path.join(root, 'big'), big);
    const a = await summarizeTreeWithContent(root);
    big[2 * 1024 * 1024] = 8;
    fs.writeFileSync(path.join(root, 'big'), big);
    const b = await summarizeTreeWithContent(root);
    expect(b.digest).toBe(a.digest);
    expect(b.contentDigest).not.toBe(a.contentDigest);
    expect(b.bytes).toBe(big.length);
  });

  it('does not follow symlinks and hashes a character device by its number', async () => {
    const root = path.join(tmp, 't');
    fs.mkdirSync(root);
    fs.symlinkSync('/etc', path.join(root, 'etc'));
    const s = await summarizeTree(root);
    expect(s.entries).toBe(2);
    fs.rmSync(path.join(root, 'etc'));
    fs.symlinkSync('/usr', path.join(root, 'etc'));
    const retargeted = await summarizeTree(root);
    expect(retargeted.digest).not.toBe(s.digest);
    mknod(path.join(root, 'null'), 'char', 0o666, 1, 3);
    const withDevice = await summarizeTree(root);
    fs.rmSync(path.join(root, 'null'));
    mknod(path.join(root, 'null'), 'char', 0o666, 1, 5);
    const otherDevice = await summarizeTree(root);
    expect(withDevice).toMatchObject({ entries: 3, bytes: 0 });
    expect(new Set([retargeted.digest, withDevice.digest, otherDevice.digest]).size).toBe(3);
  });
});

function capture(): { stream: Writable; text: () => string } {
  let out = '';
  const stream = new Writable({
    write(chunk: Buffer, _enc, cb) {
      out += chunk.toString('utf8');
      cb();
    },
  });
  return { stream, text: () => out };
}

describe('guestpull fsck (CLI)', () => {
  it('parses its flags and refuses others', () => {
    expect(parseFsckArgs(['--work-dir', 'w', '--deep', '--repair', '--json'])).toMatchObject({ workDir: path.resolve('w'), deep: true, repair: true, json: true, help: false });
    expect(parseFsckArgs([])).toMatchObject({ deep: false, repair: false, json: false });
    expect(parseFsckArgs(['-h']).help).toBe(true);
    expect(() => parseFsckArgs(['extra'])).toThrow(GuestpullError);
    expect(() => parseFsckArgs(['--drop-unused'])).toThrow(/Unknown option/);
  });

  it.skipIf(!native || !isRoot)('exits 0 on a clean store and 1 with problems, a summary on stderr, the report as JSON on stdout', async () => {
    const s = await cleanStore();
    // The CLI reads the real mount table, where the hand-made bundle is not mounted: drop it.
    fs.rmSync(layout.bundleRecord('0123456789abcdef'));
    fs.rmSync(layout.bundleDir('0123456789abcdef'), { recursive: true });
    let out = capture();
    let err = capture();
    expect(await runFsck(parseFsckArgs(['--work-dir', layout.root, '--json']), { stdout: out.stream, stderr: err.stream })).toBe(0);
    expect(err.text()).toBe(`work dir ${layout.root}: 3 layers (3 verified, 0 unverifiable), 0 bundle records, 1 configs, 0 in progress: clean\n`);
    const clean = JSON.parse(out.text()) as FsckReport;
    expect(clean).toMatchObject({ version: 1, workDir: layout.root, clean: true, problems: [], counts: { layers: 3, verified: 3 } });

    fs.appendFileSync(path.join(layout.layerDiff(s.top.hex), 'usr/bin/app'), 'x');
    out = capture();
    err = capture();
    expect(await runFsck(parseFsckArgs(['--work-dir', layout.root]), { stdout: out.stream, stderr: err.stream })).toBe(1);
    expect(out.text()).toBe('');
    const lines = err.text().trimEnd().split('\n');
    expect(lines[0]).toMatch(/: 3 layers \(2 verified, 0 unverifiable\), .*: 1 problems$/);
    expect(lines[1]).toBe(`  problem tree-mismatch ${layout.layerDiff(s.top.hex)}: the tree changed since it was published: 20 file bytes, recorded 19; metadata digest ${lines[1]!.split('metadata digest ')[1]}`);
    expect(fs.existsSync(layout.lockFile)).toBe(false);
  });

  it('says so when the work dir does not exist', async () => {
    const out = capture();
    const err = capture();
    const missing = path.join(tmp, 'nope');
    expect(await runFsck(parseFsckArgs(['--work-dir', missing, '--json']), { stdout: out.stream, stderr: err.stream })).toBe(0);
    expect(err.text()).toBe(`work dir ${missing} does not exist: nothing to check\n`);
    expect(JSON.parse(out.text())).toMatchObject({ workDir: missing, clean: true, problems: [] });
  });
});
