// Guest test: the kata agent stand-in, run by the guest /init (plain JS: the guest has node but no
// tsx). It waits (bounded) for the data hub socket, calls api.ImagePullService/PullImage for each
// image of the plan into /run/kata-containers/<container-id> (then once more for an image already
// pulled, into a new bundle: its layers come from the store), checks every bundle against the
// expectations the host computed from the images it built (tree: types, modes, owners, sizes,
// contents, links; config.json: args, env, cwd, user) and that its rootfs is an overlay mount whose
// upper and lower dirs lie under the work dir on tmpfs. Then it runs one one-shot
// `guestpull pull` in copy mode (a cdh.toml derived from the installed init-data one, own work dir)
// and checks that rootfs is a plain directory with the same tree as the overlay bundle of the same
// image. It prints machine-readable lines on the console:
//   GUESTPULL-DAEMON-READY {...}       the socket appeared
//   GUESTPULL-RESULT {...}             one per check: {"image","check","ok",...}
//   GUESTPULL-STATS {...}              daemon peak RSS (VmHWM), tmpfs usage of /run (statfs) and
//                                      its breakdown (du -x: mounted rootfs are not counted again)
//   GUESTPULL-GUEST-TEST-DONE {"passed":N,"failed":M}
// Usage: node agent-client.mjs PLAN.json PIDFILE
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { createReadStream, existsSync, lstatSync, readFileSync, statfsSync } from 'node:fs';
import { lstat, mkdir, readdir, readFile, readlink, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { promisify } from 'node:util';
import { setTimeout as sleep } from 'node:timers/promises';
import grpc from '@grpc/grpc-js';
import protoLoader from '@grpc/proto-loader';

const [planFile, pidFile] = process.argv.slice(2);
if (!planFile || !pidFile) {
  console.log('GUESTPULL-GUEST-TEST-DONE {"passed":0,"failed":1,"error":"usage: agent-client.mjs PLAN.json PIDFILE"}');
  process.exit(2);
}
const plan = JSON.parse(readFileSync(planFile, 'utf8'));
const started = Date.now();
const results = [];

function report(r) {
  results.push(r);
  console.log(`GUESTPULL-RESULT ${JSON.stringify(r)}`);
}

function daemonPid() {
  try {
    const pid = Number(readFileSync(pidFile, 'utf8').trim());
    return Number.isInteger(pid) && pid > 0 ? pid : undefined;
  } catch {
    return undefined;
  }
}

const alive = (pid) => existsSync(`/proc/${pid}`) && !/^State:\s+Z/m.test(readFileSync(`/proc/${pid}/status`, 'utf8'));

/** Waits for the socket file while the daemon lives; 'ready' | 'exited' | 'timeout'. */
async function waitForSocket() {
  const deadline = Date.now() + plan.socketWaitMs;
  while (Date.now() < deadline) {
    if (existsSync(plan.socket)) return 'ready';
    const pid = daemonPid();
    if (pid !== undefined && !alive(pid)) return 'exited';
    await sleep(100);
  }
  return 'timeout';
}

function pullImage(client, request, timeoutMs) {
  return new Promise((resolve, reject) => {
    client.PullImage(request, { deadline: new Date(Date.now() + timeoutMs) }, (err, res) => (err ? reject(err) : resolve(res)));
  });
}

/** Every entry under root (root itself as '.'), never following symlinks. */
async function walk(root) {
  const out = new Map();
  async function visit(rel) {
    const abs = rel === '.' ? root : path.join(root, rel);
    const st = await lstat(abs);
    const type = st.isDirectory() ? 'dir' : st.isFile() ? 'file' : st.isSymbolicLink() ? 'symlink' : 'other';
    const e = { type, mode: st.mode & 0o7777, uid: st.uid, gid: st.gid, size: type === 'file' ? st.size : 0, ino: st.ino, abs };
    if (type === 'symlink') e.target = await readlink(abs);
    out.set(rel, e);
    if (type === 'dir') {
      for (const name of (await readdir(abs)).sort()) await visit(rel === '.' ? name : `${rel}/${name}`);
    }
  }
  await visit('.');
  return out;
}

async function sha256File(file) {
  const h = createHash('sha256');
  for await (const chunk of createReadStream(file, { highWaterMark: 1 << 20 })) h.update(chunk);
  return h.digest('hex');
}

const octal = (n) => `0${n.toString(8)}`;

/** Differences between the expected tree and the rootfs, as short human-readable lines. */
async function compareTree(rootfs, expected, exact) {
  const actual = await walk(rootfs);
  const problems = [];
  let hashed = 0;
  for (const want of expected) {
    const got = actual.get(want.path);
    if (!got) {
      problems.push(`${want.path}: missing`);
      continue;
    }
    if (got.type !== want.type) {
      problems.push(`${want.path}: type ${got.type}, want ${want.type}`);
      continue;
    }
    if (want.mode !== undefined && got.mode !== want.mode) problems.push(`${want.path}: mode ${octal(got.mode)}, want ${octal(want.mode)}`);
    if (want.uid !== undefined && got.uid !== want.uid) problems.push(`${want.path}: uid ${got.uid}, want ${want.uid}`);
    if (want.gid !== undefined && got.gid !== want.gid) problems.push(`${want.path}: gid ${got.gid}, want ${want.gid}`);
    if (want.type === 'file' && got.size !== want.size) problems.push(`${want.path}: size ${got.size}, want ${want.size}`);
    if (want.target !== undefined && got.target !== want.target) problems.push(`${want.path}: target ${got.target}, want ${want.target}`);
    if (want.sha256 !== undefined) {
      hashed++;
      const sum = await sha256File(got.abs);
      if (sum !== want.sha256) problems.push(`${want.path}: sha256 ${sum.slice(0, 12)}…, want ${want.sha256.slice(0, 12)}…`);
    }
    if (want.linkTo !== undefined) {
      const other = actual.get(want.linkTo);
      if (!other || other.ino !== got.ino) problems.push(`${want.path}: not a hard link to ${want.linkTo}`);
    }
  }
  if (exact) {
    const names = new Set(expected.map((e) => e.path));
    for (const p of actual.keys()) if (!names.has(p)) problems.push(`${p}: unexpected`);
  }
  let files = 0;
  let bytes = 0;
  for (const e of actual.values()) if (e.type === 'file') (files++, (bytes += e.size));
  return { problems, entries: actual.size, files, bytes, hashed };
}

async function checkConfig(bundle, want) {
  const spec = JSON.parse(await readFile(path.join(bundle, 'config.json'), 'utf8'));
  const problems = [];
  const same = (a, b) => JSON.stringify(a) === JSON.stringify(b);
  const p = spec.process ?? {};
  if (!same(p.args, want.args)) problems.push(`process.args ${JSON.stringify(p.args)}, want ${JSON.stringify(want.args)}`);
  for (const v of want.env) if (!(p.env ?? []).includes(v)) problems.push(`process.env lacks ${JSON.stringify(v)}`);
  if (p.cwd !== want.cwd) problems.push(`process.cwd ${JSON.stringify(p.cwd)}, want ${JSON.stringify(want.cwd)}`);
  if (p.user?.uid !== want.uid || p.user?.gid !== want.gid) problems.push(`process.user ${JSON.stringify(p.user)}, want uid ${want.uid} gid ${want.gid}`);
  if (spec.root?.path !== 'rootfs') problems.push(`root.path ${JSON.stringify(spec.root?.path)}, want "rootfs"`);
  if (typeof spec.ociVersion !== 'string') problems.push('ociVersion missing');
  return problems;
}

function statusLine(pid) {
  try {
    const status = readFileSync(`/proc/${pid}/status`, 'utf8');
    const kib = (key) => Number(new RegExp(`^${key}:\\s+(\\d+) kB`, 'm').exec(status)?.[1] ?? NaN);
    return { vmHwmKiB: kib('VmHWM'), vmRssKiB: kib('VmRSS') };
  } catch {
    return { vmHwmKiB: null, vmRssKiB: null };
  }
}

/** Bytes allocated under dir on its own filesystem (du -x): mount points below it (overlay rootfs) are skipped, hard links counted once. */
async function duX(dir) {
  if (!existsSync(dir)) return 0;
  const dev = lstatSync(dir).dev;
  const seen = new Set();
  let total = 0;
  async function visit(abs) {
    const st = await lstat(abs);
    if (st.dev !== dev) return;
    if (!seen.has(st.ino)) {
      seen.add(st.ino);
      total += st.blocks * 512;
    }
    if (st.isDirectory()) for (const name of await readdir(abs)) await visit(path.join(abs, name));
  }
  await visit(dir);
  return total;
}

/** /proc/self/mountinfo octal escapes (\040 for a space, \134 for a backslash). */
const unescapeMount = (s) => s.replace(/\\([0-7]{3})/g, (_, o) => String.fromCharCode(parseInt(o, 8)));

/** The mounts of this namespace: {mountPoint, fstype, superOptions: [[key, value]]}. */
function mountinfo() {
  const out = [];
  for (const line of readFileSync('/proc/self/mountinfo', 'utf8').split('\n')) {
    if (line.trim() === '') continue;
    const f = line.split(' ');
    const sep = f.indexOf('-', 6);
    if (sep < 0 || f.length < sep + 4) throw new Error(`mountinfo line not understood: ${line}`);
    const superOptions = f[sep + 3].split(',').map((o) => {
      const i = o.indexOf('=');
      return i < 0 ? [unescapeMount(o), ''] : [unescapeMount(o.slice(0, i)), unescapeMount(o.slice(i + 1))];
    });
    out.push({ mountPoint: unescapeMount(f[4]), fstype: f[sep + 1], superOptions });
  }
  return out;
}

/** The mount holding path p: the longest mount point that is p or one of its parents (the last one mounted wins). */
function mountOf(mounts, p) {
  let best;
  for (const m of mounts) {
    const mp = m.mountPoint;
    if (p === mp || p.startsWith(mp === '/' ? '/' : `${mp}/`)) if (!best || mp.length >= best.mountPoint.length) best = m;
  }
  return best;
}

const under = (p, dir) => p.startsWith(`${dir}/`);

/** Problems with <bundle>/rootfs as an overlay mount of the store: fstype, upper/work/lower dirs under workDir, workDir on tmpfs. */
function overlayProblems(rootfs, workDir) {
  const mounts = mountinfo();
  const here = mounts.filter((m) => m.mountPoint === rootfs);
  const m = here[here.length - 1];
  if (!m) return { problems: [`${rootfs} is not a mount point`] };
  const problems = [];
  if (m.fstype !== 'overlay') problems.push(`${rootfs} is ${m.fstype}, want overlay`);
  const opt = (k) => m.superOptions.filter(([key]) => key === k).map(([, v]) => v);
  const upper = opt('upperdir')[0];
  const work = opt('workdir')[0];
  // lowerdir=a:b:c (colons in names escaped as \:), or one lowerdir+=… per layer on newer kernels.
  const lowers = [...opt('lowerdir').flatMap((v) => v.split(/(?<!\\):/)), ...opt('lowerdir+')].filter((v) => v !== '');
  if (upper === undefined || !under(upper, workDir)) problems.push(`upperdir ${upper} not under ${workDir}`);
  if (work === undefined || !under(work, workDir)) problems.push(`workdir ${work} not under ${workDir}`);
  if (lowers.length === 0) problems.push('no lowerdir');
  for (const l of lowers) if (!under(l, workDir)) problems.push(`lowerdir ${l} not under ${workDir}`);
  const wm = mountOf(mounts, workDir);
  if (wm?.fstype !== 'tmpfs') problems.push(`${workDir} is on ${wm?.fstype} (${wm?.mountPoint}), want tmpfs`);
  return { problems, upper, lowers: lowers.length, workDirFs: `${wm?.fstype} ${wm?.mountPoint}` };
}

/** Problems with rootfs as a plain directory on the /run tmpfs (no mount at or above it below /run). */
function plainDirProblems(rootfs) {
  const problems = [];
  const st = lstatSync(rootfs);
  if (!st.isDirectory()) problems.push(`${rootfs} is not a directory`);
  const m = mountOf(mountinfo(), rootfs);
  if (m?.mountPoint !== '/run' || m.fstype !== 'tmpfs') problems.push(`${rootfs} is on ${m?.fstype} mounted at ${m?.mountPoint}, want the /run tmpfs`);
  if (st.dev !== lstatSync('/run').dev) problems.push(`${rootfs} is on another device than /run`);
  return problems;
}

/** Differences between two rootfs trees: every entry's type, mode, owner, size, link target, content hash and hard-link group. */
async function diffTrees(a, b) {
  const [ta, tb] = [await walk(a), await walk(b)];
  const problems = [];
  // Hard links: each entry's group is named by the first path (in walk order) sharing its inode.
  const groups = (t) => {
    const first = new Map();
    const out = new Map();
    for (const [p, e] of t) {
      if (e.type !== 'file') continue;
      if (!first.has(e.ino)) first.set(e.ino, p);
      out.set(p, first.get(e.ino));
    }
    return out;
  };
  const [ga, gb] = [groups(ta), groups(tb)];
  for (const p of new Set([...ta.keys(), ...tb.keys()])) {
    const x = ta.get(p);
    const y = tb.get(p);
    if (!x || !y) {
      problems.push(`${p}: only in ${x ? a : b}`);
      continue;
    }
    for (const k of ['type', 'mode', 'uid', 'gid', 'size', 'target']) if (x[k] !== y[k]) problems.push(`${p}: ${k} ${x[k]} vs ${y[k]}`);
    if (x.type === 'file' && y.type === 'file') {
      if (ga.get(p) !== gb.get(p)) problems.push(`${p}: hard link to ${ga.get(p)} vs ${gb.get(p)}`);
      if ((await sha256File(x.abs)) !== (await sha256File(y.abs))) problems.push(`${p}: content differs`);
    }
  }
  return { problems, entries: ta.size };
}

/** pull, mount, rootfs and config checks of one daemon pull; returns the pull time (ms) or undefined. */
async function daemonPull(client, pid, label, img, bundle) {
  const t0 = Date.now();
  let res;
  try {
    res = await pullImage(client, { image_url: img.imageUrl, bundle_path: bundle }, plan.pullTimeoutMs);
  } catch (e) {
    report({ image: label, check: 'pull', ok: false, imageUrl: img.imageUrl, error: `${grpc.status[e.code] ?? e.code}: ${e.details ?? e.message}`, ms: Date.now() - t0 });
    return undefined;
  }
  const pullMs = Date.now() - t0;
  const digestOk = res.manifest_digest === img.manifestDigest;
  report({ image: label, check: 'pull', ok: digestOk, imageUrl: img.imageUrl, manifestDigest: res.manifest_digest, ...(digestOk ? {} : { want: img.manifestDigest }), ms: pullMs, rss: pid ? statusLine(pid) : null });
  const rootfs = path.join(bundle, 'rootfs');
  try {
    const o = overlayProblems(rootfs, plan.workDir);
    report({ image: label, check: 'overlay mount', ok: o.problems.length === 0, rootfs, upperdir: o.upper, lowers: o.lowers, workDirFs: o.workDirFs, problems: o.problems });
  } catch (e) {
    report({ image: label, check: 'overlay mount', ok: false, error: String(e?.message ?? e) });
  }
  await checkBundle(label, img, bundle);
  return pullMs;
}

async function checkBundle(label, img, bundle) {
  const t1 = Date.now();
  try {
    const tree = await compareTree(path.join(bundle, 'rootfs'), img.tree, img.exactTree);
    report({ image: label, check: 'rootfs', ok: tree.problems.length === 0, entries: tree.entries, files: tree.files, bytes: tree.bytes, hashed: tree.hashed, problems: tree.problems.slice(0, 12), problemCount: tree.problems.length, ms: Date.now() - t1 });
  } catch (e) {
    report({ image: label, check: 'rootfs', ok: false, error: String(e?.message ?? e) });
  }
  try {
    const problems = await checkConfig(bundle, img.config);
    report({ image: label, check: 'config', ok: problems.length === 0, problems });
  } catch (e) {
    report({ image: label, check: 'config', ok: false, error: String(e?.message ?? e) });
  }
}

/** The installed init-data cdh.toml with snapshotter = "copy" and its own work_dir, written for the one-shot pull. */
async function copyModeConfig(cp) {
  const text = await readFile(cp.installedConfig, 'utf8');
  const snap = /^snapshotter = "overlay"$/m;
  const wd = /^work_dir = ".*"$/m;
  if (!snap.test(text) || !wd.test(text)) throw new Error(`${cp.installedConfig} has no snapshotter = "overlay" or work_dir line to change`);
  const out = text.replace(snap, 'snapshotter = "copy"').replace(wd, `work_dir = "${cp.workDir}"`);
  await mkdir(path.dirname(cp.configFile), { recursive: true, mode: 0o700 });
  await writeFile(cp.configFile, out, { mode: 0o600 });
}

/** One one-shot `guestpull pull` in copy mode; checks it against the expectations and against the overlay bundle of the same image. */
async function copyPull(cp) {
  const img = plan.images.find((i) => i.name === cp.image);
  const label = cp.label;
  const bundle = path.join('/run/kata-containers', cp.containerId);
  const t0 = Date.now();
  let stdout = '';
  try {
    await copyModeConfig(cp);
    const r = await promisify(execFile)(process.execPath, [path.join(plan.appDir, 'dist', 'cli.js'), 'pull', img.imageUrl, bundle, '--config', cp.configFile], { timeout: plan.pullTimeoutMs, maxBuffer: 4 << 20, encoding: 'utf8' });
    stdout = r.stdout.trim();
  } catch (e) {
    report({ image: label, check: 'pull', ok: false, imageUrl: img.imageUrl, exitCode: e?.code, error: String(e?.stderr ?? e?.message ?? e).trim().split('\n').slice(-3).join(' | '), ms: Date.now() - t0 });
    return undefined;
  }
  const ms = Date.now() - t0;
  report({ image: label, check: 'pull', ok: stdout === img.manifestDigest, mode: 'copy (one-shot guestpull pull)', manifestDigest: stdout, ms });
  const rootfs = path.join(bundle, 'rootfs');
  try {
    const problems = plainDirProblems(rootfs);
    report({ image: label, check: 'plain directory', ok: problems.length === 0, rootfs, problems });
  } catch (e) {
    report({ image: label, check: 'plain directory', ok: false, error: String(e?.message ?? e) });
  }
  await checkBundle(label, img, bundle);
  try {
    const other = path.join('/run/kata-containers', img.containerId, 'rootfs');
    const d = await diffTrees(rootfs, other);
    report({ image: label, check: 'same tree as overlay bundle', ok: d.problems.length === 0, against: other, entries: d.entries, problems: d.problems.slice(0, 12), problemCount: d.problems.length });
  } catch (e) {
    report({ image: label, check: 'same tree as overlay bundle', ok: false, error: String(e?.message ?? e) });
  }
  return ms;
}

async function main() {
  const waited = await waitForSocket();
  const pid = daemonPid();
  const packageDefinition = protoLoader.loadSync(plan.proto, { keepCase: true, longs: String, enums: String, defaults: true, oneofs: true });
  const api = grpc.loadPackageDefinition(packageDefinition).api;
  const client = new api.ImagePullService(`unix://${plan.socket}`, grpc.credentials.createInsecure());

  if (waited !== 'ready') {
    // Show that nothing answers where the agent expects the data hub: one call with a short deadline.
    let callError = 'none';
    try {
      await pullImage(client, { image_url: plan.images[0]?.imageUrl ?? 'x', bundle_path: '/run/kata-containers/never' }, 5_000);
    } catch (e) {
      callError = `${grpc.status[e.code] ?? e.code}: ${e.details ?? e.message}`;
    }
    report({ check: 'connect', ok: false, socket: plan.socket, waited, daemonAlive: pid !== undefined && alive(pid), callError, ms: Date.now() - started });
    return;
  }
  console.log(`GUESTPULL-DAEMON-READY ${JSON.stringify({ waitedMs: Date.now() - started, pid })}`);
  report({ check: 'connect', ok: true, socket: plan.socket, ms: Date.now() - started });

  const firstMs = new Map();
  for (const img of plan.images) firstMs.set(img.name, await daemonPull(client, pid, img.name, img, path.join('/run/kata-containers', img.containerId)));
  // Again into a new bundle: every layer is in the store now.
  for (const again of plan.repulls) {
    const img = plan.images.find((i) => i.name === again.image);
    const ms = await daemonPull(client, pid, again.label, img, path.join('/run/kata-containers', again.containerId));
    if (ms !== undefined) console.log(`GUESTPULL-REPULL ${JSON.stringify({ image: img.name, label: again.label, firstMs: firstMs.get(img.name) ?? null, againMs: ms })}`);
  }
  client.close();
  const copyMs = await copyPull(plan.copyPull);

  const fs = statfsSync('/run');
  const bundleIds = [...plan.images.map((i) => i.containerId), ...plan.repulls.map((r) => r.containerId), plan.copyPull.containerId];
  let bundlesBytes = 0;
  for (const id of bundleIds) bundlesBytes += await duX(path.join('/run/kata-containers', id));
  console.log(`GUESTPULL-STATS ${JSON.stringify({
    daemon: statusLine(pid),
    run: { sizeBytes: fs.blocks * fs.bsize, usedBytes: (fs.blocks - fs.bfree) * fs.bsize },
    workDirBytes: await duX(plan.workDir),
    copyWorkDirBytes: await duX(plan.copyPull.workDir),
    bundlesBytes,
    copyMs: copyMs ?? null,
    memAvailableKiB: Number(/^MemAvailable:\s+(\d+)/m.exec(readFileSync('/proc/meminfo', 'utf8'))?.[1] ?? NaN),
    clientMs: Date.now() - started,
  })}`);
}

try {
  await main();
} catch (e) {
  report({ check: 'client', ok: false, error: String(e?.stack ?? e) });
}
const passed = results.filter((r) => r.ok).length;
console.log(`GUESTPULL-GUEST-TEST-DONE ${JSON.stringify({ passed, failed: results.length - passed })}`);
process.exit(results.length > 0 && passed === results.length ? 0 : 1);
