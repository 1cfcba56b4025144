/**
 * Copy-mode staging in the bundle (src/pull/stage.ts): names carry the owner tag; a new staging
 * removes the staging directories of dead processes from the same bundle and leaves live ones,
 * recent owner-less ones, anything mounted, symlinks and names that are not ours.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { createStaging, parseStagingName, PUBLISHED_MARK, removeStaleStaging, STALE_UNOWNED_MS, stagingDirName } from '../../src/pull/stage.js';
import { ownerTag, processStart } from '../../src/pull/store/lock.js';
import type { MountEntry } from '../../src/pull/store/mountinfo.js';

let tmp: string;
let bundle: string;
const children: ChildProcess[] = [];

beforeEach(() => {
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'guestpull-stage-'));
  bundle = path.join(tmp, 'bundle');
  fs.mkdirSync(bundle);
});

afterEach(() => {
  for (const c of children.splice(0)) c.kill('SIGKILL');
  fs.rmSync(tmp, { recursive: true, force: true });
});

async function tagOf(child: ChildProcess): Promise<string> {
  await new Promise((r) => child.once('spawn', r));
  return `${child.pid}-${processStart(child.pid!) ?? '0'}`;
}

/** The owner tag of a process that is gone. */
async function deadOwner(): Promise<string> {
  const child = spawn('true', { stdio: 'ignore' });
  const tag = await tagOf(child);
  await new Promise((r) => child.once('exit', r));
  return tag;
}

/** The owner tag of another process that runs until the test ends. */
async function liveOwner(): Promise<string> {
  const child = spawn('sleep', ['60'], { stdio: 'ignore' });
  children.push(child);
  return tagOf(child);
}

/** A staging directory as a pull leaves it: rootfs with a file in it. */
function leftStaging(name: string): string {
  const dir = path.join(bundle, name);
  fs.mkdirSync(path.join(dir, 'rootfs/usr'), { recursive: true });
  fs.writeFileSync(path.join(dir, 'rootfs/usr/f'), 'x');
  return dir;
}

function age(dir: string, ms: number): void {
  const t = new Date(Date.now() - ms);
  for (const p of [path.join(dir, 'rootfs'), dir]) fs.utimesSync(p, t, t);
}

const stagingNames = (): string[] => fs.readdirSync(bundle).filter((n) => n.startsWith('.guestpull-staging-')).sort();

describe('staging names', () => {
  it('carry the owner tag and parse back; old-style names are owner-less; others are not ours', () => {
    const name = stagingDirName(ownerTag(), 'a1b2c3d4e5f6');
    expect(name).toBe(`.guestpull-staging-${ownerTag()}-a1b2c3d4e5f6`);
    expect(parseStagingName(name)).toEqual({ owner: ownerTag() });
    expect(parseStagingName(stagingDirName('12-34'))).toEqual({ owner: '12-34' });
    expect(parseStagingName('.guestpull-staging-a1b2c3d4e5f6')).toBe('unowned');
    for (const n of ['rootfs', '.guestpull-staging-', '.guestpull-staging-12-34-xyz', '.guestpull-staging-12-a1b2c3d4e5f6', 'x.guestpull-staging-12-34-a1b2c3d4e5f6']) {
      expect(parseStagingName(n), n).toBeUndefined();
    }
  });
});

describe('createStaging', () => {
  it('makes its staging under its own owner tag, publishes by rename and removes the staging', async () => {
    const s = await createStaging(bundle);
    expect(parseStagingName(path.basename(path.dirname(s.rootfs)))).toEqual({ owner: ownerTag() });
    expect(fs.statSync(s.rootfs).mode & 0o777).toBe(0o755);
    fs.writeFileSync(path.join(s.rootfs, 'f'), 'y');
    expect(await s.publishRootfs()).toBe(path.join(bundle, 'rootfs'));
    // Until complete(), the staging stays, marked: config.json may not be written yet.
    const staging = path.dirname(s.rootfs);
    expect(fs.readdirSync(staging)).toEqual([PUBLISHED_MARK]);
    await s.complete();
    expect(fs.readdirSync(bundle)).toEqual(['rootfs']);
    expect(fs.readFileSync(path.join(bundle, 'rootfs/f'), 'utf8')).toBe('y');
  });

  it('removes the rootfs a dead pull published without config.json, and keeps it when config.json is there', async () => {
    const half = leftStaging(stagingDirName(await deadOwner(), '00000000000d'));
    fs.rmSync(path.join(half, 'rootfs'), { recursive: true });
    fs.writeFileSync(path.join(half, PUBLISHED_MARK), 'rootfs\n');
    fs.mkdirSync(path.join(bundle, 'rootfs'));
    fs.writeFileSync(path.join(bundle, 'rootfs/f'), 'half');
    expect(await removeStaleStaging(bundle)).toEqual([half]);
    expect(fs.readdirSync(bundle)).toEqual([]);

    const done = leftStaging(stagingDirName(await deadOwner(), '00000000000e'));
    fs.rmSync(path.join(done, 'rootfs'), { recursive: true });
    fs.writeFileSync(path.join(done, PUBLISHED_MARK), 'rootfs\n');
    fs.mkdirSync(path.join(bundle, 'rootfs'));
    fs.writeFileSync(path.join(bundle, 'config.json'), '{}');
    expect(await removeStaleStaging(bundle)).toEqual([done]);
    expect(fs.readdirSync(bundle).sort()).toEqual(['config.json', 'rootfs']);
  });

  it('removes dead processes\' staging from the bundle and keeps live, recent owner-less and foreign entries', async () => {
    const deadA = leftStaging(stagingDirName(await deadOwner(), '000000000001'));
    const deadB = leftStaging(stagingDirName(await deadOwner(), '000000000002'));
    const otherLive = leftStaging(stagingDirName(await liveOwner(), '000000000003'));
    const mine = leftStaging(stagingDirName(ownerTag(), '000000000004'));
    const oldUnowned = leftStaging('.guestpull-staging-00000000000a');
    age(oldUnowned, STALE_UNOWNED_MS + 60_000);
    const recentUnowned = leftStaging('.guestpull-staging-00000000000b');
    // Old directory, but its rootfs changed a minute ago: still in use.
    const busyUnowned = leftStaging('.guestpull-staging-00000000000c');
    age(busyUnowned, STALE_UNOWNED_MS + 60_000);
    fs.utimesSync(path.join(busyUnowned, 'rootfs'), new Date(), new Date(Date.now() - 60_000));
    // Not ours: a name we do not make, and things that are not directories under a dead owner's name.
    const foreign = leftStaging('.guestpull-staging-notours');
    const target = path.join(tmp, 'target');
    fs.mkdirSync(target);
    fs.writeFileSync(path.join(target, 'keep'), 'k');
    const link = path.join(bundle, stagingDirName(await deadOwner(), '000000000005'));
    fs.symlinkSync(target, link);
    const file = path.join(bundle, stagingDirName(await deadOwner(), '000000000006'));
    fs.writeFileSync(file, 'f');

    const s = await createStaging(bundle);
    expect(s.cleaned.sort()).toEqual([deadA, deadB, oldUnowned].sort());
    const left = stagingNames();
    for (const gone of [deadA, deadB, oldUnowned]) expect(left).not.toContain(path.basename(gone));
    for (const kept of [otherLive, mine, recentUnowned, busyUnowned, foreign, link, file, path.dirname(s.rootfs)]) expect(left).toContain(path.basename(kept));
    expect(fs.lstatSync(link).isSymbolicLink()).toBe(true);
    expect(fs.readFileSync(path.join(target, 'keep'), 'utf8')).toBe('k');
    expect(fs.readFileSync(path.join(mine, 'rootfs/usr/f'), 'utf8')).toBe('x');
    await s.discard();
    expect(stagingNames()).not.toContain(path.basename(path.dirname(s.rootfs)));
  });

  it('a second staging in the same bundle by the same live process leaves the first alone', async () => {
    const a = await createStaging(bundle);
    const b = await createStaging(bundle);
    expect(b.cleaned).toEqual([]);
    expect(fs.existsSync(a.rootfs)).toBe(true);
    await a.discard();
    await b.discard();
    expect(stagingNames()).toEqual([]);
  });
});

describe('removeStaleStaging', () => {
  it('keeps a dead staging with something mounted below it', async () => {
    const dead = leftStaging(stagingDirName(await deadOwner(), '000000000007'));
    const fake: MountEntry = { id: 1, parent: 0, mountPoint: path.join(dead, 'rootfs/usr'), fstype: 'tmpfs', source: 'x', superOptions: new Map() };
    expect(await removeStaleStaging(bundle, { mounts: () => [fake] })).toEqual([]);
    expect(fs.existsSync(path.join(dead, 'rootfs/usr/f'))).toBe(true);
    expect(await removeStaleStaging(bundle, { mounts: () => [] })).toEqual([dead]);
    expect(fs.existsSync(dead)).toBe(false);
  });

  it('judges owner-less staging by the clock it is given', async () => {
    const unowned = leftStaging('.guestpull-staging-0000000000dd');
    expect(await removeStaleStaging(bundle, { now: Date.now() + STALE_UNOWNED_MS - 60_000 })).toEqual([]);
    expect(await removeStaleStaging(bundle, { now: Date.now() + STALE_UNOWNED_MS + 60_000 })).toEqual([unowned]);
  });

  it('is empty for a bundle that does not exist', async () => {
    expect(await removeStaleStaging(path.join(tmp, 'missing'))).toEqual([]);
  });
});
