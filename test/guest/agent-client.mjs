// Guest test: the kata agent stand-in, run by the guest /init (plain JS: the guest has node but no
// tsx). It waits (bounded) for the data hub socket, calls api.ImagePullService/PullImage for each
// image of the plan into /run/kata-containers/<container-id>, checks every bundle against the
// expectations the host computed from the images it built (tree: types, modes, owners, sizes,
// contents, links; config.json: args, env, cwd, user), and prints machine-readable lines on the
// console:
//   GUESTPULL-DAEMON-READY {...}       the socket appeared
//   GUESTPULL-RESULT {...}             one per check: {"image","check","ok",...}
//   GUESTPULL-STATS {...}              daemon peak RSS (VmHWM), tmpfs usage of /run
//   GUESTPULL-GUEST-TEST-DONE {"passed":N,"failed":M}
// Usage: node agent-client.mjs PLAN.json PIDFILE
import { createHash } from 'node:crypto';
import { createReadStream, existsSync, readFileSync, statfsSync } from 'node:fs';
import { lstat, readdir, readFile, readlink } from 'node:fs/promises';
import path from 'node:path';
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

async function du(dir) {
  if (!existsSync(dir)) return 0;
  let total = 0;
  for (const e of (await walk(dir)).values()) if (e.type === 'file') total += e.size;
  return total;
}

async function bundlesBytes() {
  let total = 0;
  for (const img of plan.images) total += await du(path.join('/run/kata-containers', img.containerId));
  return total;
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

  for (const img of plan.images) {
    const bundle = path.join('/run/kata-containers', img.containerId);
    const t0 = Date.now();
    let res;
    try {
      res = await pullImage(client, { image_url: img.imageUrl, bundle_path: bundle }, plan.pullTimeoutMs);
    } catch (e) {
      report({ image: img.name, check: 'pull', ok: false, imageUrl: img.imageUrl, error: `${grpc.status[e.code] ?? e.code}: ${e.details ?? e.message}`, ms: Date.now() - t0 });
      continue;
    }
    const pullMs = Date.now() - t0;
    const digestOk = res.manifest_digest === img.manifestDigest;
    report({ image: img.name, check: 'pull', ok: digestOk, imageUrl: img.imageUrl, manifestDigest: res.manifest_digest, ...(digestOk ? {} : { want: img.manifestDigest }), ms: pullMs, rss: pid ? statusLine(pid) : null });

    // TODO(issue 5): when the overlay snapshotter exists, the plan names a storage mode per image
    // ('overlay' for all but one, 'copy' for one); check here that <bundle>/rootfs is an overlay
    // mount (/proc/self/mountinfo) with its upper and work dirs on the /run tmpfs, and that the
    // copy-mode image is a plain directory. Today every pull is copy mode into the tmpfs.
    const t1 = Date.now();
    try {
      const tree = await compareTree(path.join(bundle, 'rootfs'), img.tree, img.exactTree);
      report({ image: img.name, check: 'rootfs', ok: tree.problems.length === 0, entries: tree.entries, files: tree.files, bytes: tree.bytes, hashed: tree.hashed, problems: tree.problems.slice(0, 12), problemCount: tree.problems.length, ms: Date.now() - t1 });
    } catch (e) {
      report({ image: img.name, check: 'rootfs', ok: false, error: String(e?.message ?? e) });
    }
    try {
      const problems = await checkConfig(bundle, img.config);
      report({ image: img.name, check: 'config', ok: problems.length === 0, problems });
    } catch (e) {
      report({ image: img.name, check: 'config', ok: false, error: String(e?.message ?? e) });
    }
  }
  client.close();

  const fs = statfsSync('/run');
  console.log(`GUESTPULL-STATS ${JSON.stringify({
    daemon: statusLine(pid),
    run: { sizeBytes: fs.blocks * fs.bsize, usedBytes: (fs.blocks - fs.bfree) * fs.bsize },
    workDirBytes: await du(plan.workDir),
    bundlesBytes: await bundlesBytes(),
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
