/**
 * Guest test, host side (`npx tsx test/guest/run.ts --kernel-dir DIR`; scripts/guest-test.sh runs
 * it): starts an HTTPS registry (private CA), a plain-HTTP registry and squid on 127.0.0.1, builds
 * and pushes the images (one above 100 MB), writes the init-data document and packs it (plus a
 * copy with one byte changed), builds the initramfs, then boots the Debian kernel under QEMU TCG
 * twice: with the good disk (the agent stand-in pulls every image and checks the bundles) and with
 * the tampered disk (the daemon must refuse to start, exit 8, and the agent must fail to connect).
 * Asserts on the console markers, the proxy's access log and the registries' logs; prints a summary
 * and `guest: N passed, N failed`; exit status 0 only when everything passed.
 *
 * The guest's network: QEMU user networking with restrict=on and exactly two guestfwd rules,
 *   10.0.2.100:5000 → the plain registry (reached directly: listed in no_proxy),
 *   10.0.2.101:3128 → squid, which maps registry.guest.test to the HTTPS registry on 127.0.0.1.
 */
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { buildImage, buildSyntheticImage, sampleImage, type BuiltImage } from '../helpers/image-builder.js';
import { pushImage } from '../helpers/push.js';
import { startRegistry, type RunningRegistry } from '../helpers/registry.js';
import { issueServerCert, makeCa } from '../helpers/tls.js';
import { expectedRootfs, type PlanEntry } from './expect.js';
import { buildInitramfs, GUEST_APP_DIR } from './initramfs.js';
import { boot, consoleTail, markers, type BootResult, type Marker } from './qemu.js';
import { startSquid, type GuestProxy } from './squid.js';

const PROJECT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const REGISTRY_NAME = 'registry.guest.test';
const PLAIN_GUEST = '10.0.2.100:5000';
const PROXY_GUEST = '10.0.2.101:3128';
const SOCKET_PATH = '/run/confidential-containers/cdh.sock';
const WORK_DIR = '/run/kata-containers/image';
/** The one-shot copy-mode pull: its own work dir, and a cdh.toml the agent stand-in derives from the installed one. */
const COPY_WORK_DIR = '/run/kata-containers/image-copy';
const INSTALLED_CDH_TOML = '/run/confidential-containers/initdata/cdh.toml';
const COPY_CDH_TOML = '/run/guestpull-copy/cdh.toml';
const BIG_IMAGE_BYTES = 110 * 1024 * 1024;
const GOOD_BOOT_TIMEOUT_MS = 180_000;
const TAMPERED_BOOT_TIMEOUT_MS = 60_000;
const GUEST_MEM_MIB = 2048;
const GUEST_CPUS = 2;

interface ImagePlan {
  name: string;
  imageUrl: string;
  containerId: string;
  manifestDigest: string;
  tree: PlanEntry[];
  exactTree: boolean;
  config: { args: string[]; env: string[]; cwd: string; uid: number; gid: number };
}

interface Check { name: string; ok: boolean; detail?: string }

const checks: Check[] = [];
function check(name: string, ok: boolean, detail?: string): boolean {
  checks.push({ name, ok, ...(detail !== undefined ? { detail } : {}) });
  console.log(`guest-test: ${ok ? 'ok  ' : 'FAIL'} ${name}${detail !== undefined ? ` — ${detail}` : ''}`);
  return ok;
}

const log = (msg: string): void => console.log(`guest-test: ${msg}`);
const secs = (ms: number): string => `${(ms / 1000).toFixed(1)} s`;
const mib = (bytes: number): string => `${(bytes / 1024 / 1024).toFixed(1)} MiB`;

/** An image with the ownership and mode cases a bundle must keep: setuid, setgid dir, sticky, other owners, hard link, whiteout, opaque dir. */
async function toolsImage(): Promise<BuiltImage> {
  const data = createHash('sha512').update('guestpull tools').digest();
  const blob = Buffer.concat(Array.from({ length: 4096 }, (_, i) => Buffer.concat([data, Buffer.from([i & 0xff])])));
  return await buildImage({
    format: 'docker',
    layers: [
      [
        { type: 'dir', path: 'etc' },
        { type: 'file', path: 'etc/passwd', content: 'root:x:0:0:root:/root:/bin/sh\nsvc:x:4242:4343:svc:/opt/tools:/bin/sh\n' },
        { type: 'file', path: 'etc/group', content: 'root:x:0:\nsvc:x:4343:\n' },
        { type: 'dir', path: 'opt' },
        { type: 'dir', path: 'opt/tools', mode: 0o750, uid: 4242, gid: 4343 },
        { type: 'file', path: 'opt/tools/run', content: '#!/bin/sh\necho tools\n', mode: 0o4755 },
        { type: 'hardlink', path: 'opt/tools/run-again', target: 'opt/tools/run' },
        { type: 'file', path: 'opt/tools/data.bin', content: blob, mode: 0o640, uid: 4242, gid: 4343 },
        { type: 'dir', path: 'usr' },
        { type: 'dir', path: 'usr/local' },
        { type: 'dir', path: 'usr/local/bin' },
        { type: 'symlink', path: 'usr/local/bin/run', target: '/opt/tools/run' },
        { type: 'dir', path: 'var' },
        { type: 'dir', path: 'var/cache' },
        { type: 'dir', path: 'var/cache/tools', mode: 0o2775, gid: 4343 },
        { type: 'file', path: 'var/cache/tools/old.txt', content: 'old\n' },
        { type: 'file', path: 'var/cache/tools/keep.txt', content: 'hidden by the opaque marker\n' },
        { type: 'dir', path: 'tmp', mode: 0o1777 },
        { type: 'file', path: 'etc/obsolete.conf', content: 'removed by the upper layer\n' },
      ],
      [
        { type: 'whiteout', path: 'etc/obsolete.conf' },
        { type: 'opaque', path: 'var/cache/tools' },
        { type: 'file', path: 'var/cache/tools/new.txt', content: 'new\n', uid: 4242, gid: 4343, mode: 0o664 },
        { type: 'file', path: 'etc/motd', content: 'guestpull guest test\n' },
      ],
    ],
    config: {
      Entrypoint: ['/opt/tools/run'],
      Cmd: ['--serve'],
      Env: ['PATH=/usr/local/bin:/usr/bin:/bin', 'TOOLS_HOME=/opt/tools'],
      WorkingDir: '/opt/tools',
      User: 'svc',
    },
  });
}

/** The init-data document: its cdh.toml routes registry traffic through the proxy and trusts the test CA. */
function initdataDocument(caPem: string): string {
  const cdh = [
    '# guestpull QEMU guest test: the data hub configuration, measured through init-data',
    'socket = "unix:///run/confidential-containers/cdh.sock"',
    '',
    '[log]',
    'level = "info"',
    '',
    '[image]',
    `work_dir = "${WORK_DIR}"`,
    'snapshotter = "overlay"',
    'max_concurrent_layer_downloads_per_image = 3',
    `extra_root_certificates = ["""\n${caPem.trim()}\n"""]`,
    '',
    '[image.image_pull_proxy]',
    `https_proxy = "http://${PROXY_GUEST}"`,
    `http_proxy = "http://${PROXY_GUEST}"`,
    `no_proxy = "${PLAIN_GUEST.split(':')[0]}"`,
    '',
    '[image.registry_config]',
    '[[image.registry_config.registry]]',
    `prefix = "${PLAIN_GUEST}"`,
    `location = "${PLAIN_GUEST}"`,
    'insecure = true',
  ].join('\n');
  return ['version = "0.1.0"', 'algorithm = "sha256"', '', '[data]', `"cdh.toml" = '''\n${cdh}\n'''`, ''].join('\n');
}

/** The same document with one byte changed: the proxy redirected to another address (10.0.2.101 → 10.0.2.102). */
function tamper(doc: string): string {
  const from = `http://${PROXY_GUEST}`;
  const i = doc.indexOf(from);
  if (i < 0) throw new Error('tamper: proxy address not found in the document');
  const at = i + from.indexOf('101') + 2;
  return doc.slice(0, at) + '2' + doc.slice(at + 1);
}

function guestpull(...args: string[]): string {
  return execFileSync(process.execPath, [path.join(PROJECT, 'dist', 'cli.js'), ...args], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
}

/**
 * squid access.log lines that are requests: squid also logs connections closed before any request
 * (method `-`, URL `error:transaction-end-before-headers`), such as the readiness probes.
 */
function proxyRequests(lines: string[]): string[] {
  return lines.filter((l) => !['-', 'NONE', undefined].includes(l.trim().split(/\s+/)[5]));
}

function results(ms: Marker[], name: string): Marker[] {
  return ms.filter((m) => m.name === name);
}

function num(v: unknown): number | undefined {
  return typeof v === 'number' && Number.isFinite(v) ? v : undefined;
}

function failBoot(label: string, r: BootResult, why: string): void {
  check(`${label}: boot`, false, why);
  console.log(`guest-test: ${label}: QEMU exit ${r.exitCode}${r.timedOut ? ' (killed by the watchdog)' : ''} after ${secs(r.ms)}; console tail:\n${consoleTail(r)}`);
  if (r.stderr.trim() !== '') console.log(`guest-test: ${label}: QEMU stderr:\n${r.stderr.trim().split('\n').slice(-20).join('\n')}`);
}

interface Summary { [k: string]: string | number | undefined }

async function main(): Promise<number> {
  const t0 = Date.now();
  const { values } = parseArgs({
    options: {
      'kernel-dir': { type: 'string' },
      'cache-dir': { type: 'string' },
      verbose: { type: 'boolean', short: 'v' },
    },
  });
  const kernelDir = values['kernel-dir'];
  if (kernelDir === undefined) throw new Error('usage: run.ts --kernel-dir DIR (holding vmlinuz and modules/*.ko) [--cache-dir DIR] [--verbose]');
  const cacheDir = path.resolve(values['cache-dir'] ?? path.join(PROJECT, '.cache', 'guest'));
  const vmlinuz = path.join(kernelDir, 'vmlinuz');
  if (!existsSync(vmlinuz)) throw new Error(`${vmlinuz} is missing (scripts/guest-test.sh fetches the kernel)`);
  const work = mkdtempSync(path.join(os.tmpdir(), 'guestpull-guest-'));
  const summary: Summary = {};
  const stops: (() => Promise<void> | void)[] = [() => rmSync(work, { recursive: true, force: true })];
  let proxy: GuestProxy | undefined;
  try {
    // Servers and images.
    let t = Date.now();
    // The registry's certificate names what the guest asks for (through the proxy) and 127.0.0.1
    // (what the host pushes to). The guest trusts the CA only through init-data's
    // extra_root_certificates: it is deliberately not put anywhere in the initramfs.
    const pkiDir = mkdtempSync(path.join(os.tmpdir(), 'guestpull-guest-pki-'));
    stops.push(() => rmSync(pkiDir, { recursive: true, force: true }));
    const ca = makeCa(pkiDir, 'ca', 'guestpull guest test CA');
    const serverCert = issueServerCert(ca, pkiDir, 'registry', [REGISTRY_NAME, '127.0.0.1']);
    const [tlsRegistry, plainRegistry, sample, big, tools] = await Promise.all([
      startRegistry({ tls: { certFile: serverCert.certFile, keyFile: serverCert.keyFile }, logLevel: 'info' }),
      startRegistry({ logLevel: 'info' }),
      sampleImage(),
      buildSyntheticImage({ seed: 6, layers: 4, totalBytes: BIG_IMAGE_BYTES, files: 400 }),
      toolsImage(),
    ]);
    stops.push(() => tlsRegistry.stop(), () => plainRegistry.stop());
    const tlsPort = Number(tlsRegistry.host.split(':')[1]);
    const plainPort = Number(plainRegistry.host.split(':')[1]);
    proxy = await startSquid({ hosts: { [REGISTRY_NAME]: '127.0.0.1' }, ports: [tlsPort] });
    stops.push(() => proxy?.stop());
    await pushImage(tlsRegistry.url, 'guest/sample', 'v1', sample, { ca: ca.cert });
    await pushImage(tlsRegistry.url, 'guest/big', 'v1', big, { ca: ca.cert });
    await pushImage(plainRegistry.url, 'plain/tools', 'v1', tools);
    const bigTree = await expectedRootfs(big, 25);
    const bigUncompressed = bigTree.reduce((a, e) => a + e.size, 0);
    check('big image above 100 MB uncompressed', bigUncompressed > 100 * 1024 * 1024, mib(bigUncompressed));
    summary['images (build + push)'] = secs(Date.now() - t);

    const images: ImagePlan[] = [
      {
        name: 'sample', imageUrl: `${REGISTRY_NAME}:${tlsPort}/guest/sample:v1`, containerId: 'c1-sample',
        manifestDigest: sample.manifest.digest, tree: await expectedRootfs(sample), exactTree: true,
        config: { args: ['/bin/sh', '/usr/bin/hello'], env: ['PATH=/usr/sbin:/usr/bin:/sbin:/bin', 'GREETING=hello'], cwd: '/home/app', uid: 1000, gid: 1000 },
      },
      {
        name: 'big', imageUrl: `${REGISTRY_NAME}:${tlsPort}/guest/big:v1`, containerId: 'c2-big',
        manifestDigest: big.manifest.digest, tree: bigTree, exactTree: true,
        config: { args: ['/bin/sh'], env: ['PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'], cwd: '/', uid: 0, gid: 0 },
      },
      {
        name: 'tools', imageUrl: `${PLAIN_GUEST}/plain/tools@${tools.manifest.digest}`, containerId: 'c3-tools',
        manifestDigest: tools.manifest.digest, tree: await expectedRootfs(tools), exactTree: true,
        config: { args: ['/opt/tools/run', '--serve'], env: ['PATH=/usr/local/bin:/usr/bin:/bin', 'TOOLS_HOME=/opt/tools'], cwd: '/opt/tools', uid: 4242, gid: 4343 },
      },
    ];
    // Every daemon pull is an overlay bundle (snapshotter = "overlay" in the init-data cdh.toml); big
    // is pulled a second time into a new bundle (layers from the store), and tools once more by a
    // one-shot `guestpull pull` in copy mode, compared with its overlay bundle.
    const repulls = [{ label: 'big-again', image: 'big', containerId: 'c4-big-again' }];
    const copyPull = { label: 'tools-copy', image: 'tools', containerId: 'c5-tools-copy', workDir: COPY_WORK_DIR, installedConfig: INSTALLED_CDH_TOML, configFile: COPY_CDH_TOML };
    const plan = {
      socket: SOCKET_PATH,
      proto: `${GUEST_APP_DIR}/protos/confidential-data-hub/api.proto`,
      socketWaitMs: 60_000,
      pullTimeoutMs: 100_000,
      workDir: WORK_DIR,
      appDir: GUEST_APP_DIR,
      images,
      repulls,
      copyPull,
    };

    // Init-data: the document, its digest (what the TEE would hold), the good and the tampered disk.
    const doc = initdataDocument(ca.cert);
    const bad = tamper(doc);
    const [docBytes, badBytes] = [Buffer.from(doc), Buffer.from(bad)];
    const differing = docBytes.filter((b, i) => b !== badBytes[i]).length;
    check('tampered document differs in exactly one byte', differing === 1 && bad.length === doc.length, `${differing} byte(s)`);
    const digest = createHash('sha256').update(doc).digest('hex');
    writeFileSync(path.join(work, 'initdata.toml'), doc);
    writeFileSync(path.join(work, 'initdata-tampered.toml'), bad);
    guestpull('initdata', 'pack', path.join(work, 'initdata.toml'), path.join(work, 'initdata.img'));
    guestpull('initdata', 'pack', path.join(work, 'initdata-tampered.toml'), path.join(work, 'initdata-tampered.img'));

    // Initramfs.
    const initrd = await buildInitramfs({
      projectDir: PROJECT, cacheDir, modulesDir: path.join(kernelDir, 'modules'),
      planJson: JSON.stringify(plan), outFile: path.join(work, 'initrd.cpio'),
    });
    summary['initramfs build'] = `${secs(initrd.ms)} (base ${mib(initrd.baseBytes)}${initrd.baseCached ? ', cached' : ', built'}, app ${mib(initrd.appBytes)})`;

    const bootOpts = {
      kernel: vmlinuz, initrd: initrd.file, memMiB: GUEST_MEM_MIB, cpus: GUEST_CPUS,
      append: [`guestpull.initdata_digest=${digest}`],
      guestfwd: [{ guest: PLAIN_GUEST, hostPort: plainPort }, { guest: PROXY_GUEST, hostPort: proxy.port }],
      ...(values.verbose ? { onLine: (text: string, ms: number) => console.log(`  ${(ms / 1000).toFixed(1).padStart(6)}s | ${text}`) } : {}),
    };

    // Boot 1: the good disk.
    t = Date.now();
    log('boot 1: good init-data, pulling 3 images');
    const good = await boot({ ...bootOpts, disk: path.join(work, 'initdata.img'), timeoutMs: GOOD_BOOT_TIMEOUT_MS });
    summary['good boot (QEMU start to power-off)'] = secs(Date.now() - t);
    const gm = markers(good);
    const done = results(gm, 'GUESTPULL-GUEST-TEST-DONE')[0];
    if (!done || good.timedOut) failBoot('good boot', good, done ? 'watchdog timeout' : 'no GUESTPULL-GUEST-TEST-DONE marker');
    const guestResults = results(gm, 'GUESTPULL-RESULT');
    for (const r of guestResults) {
      const d = r.data;
      const label = `guest: ${typeof d['image'] === 'string' ? `${d['image']} ` : ''}${String(d['check'])}`;
      const ms = num(d['ms']);
      const detail = d['ok'] === true
        ? [
            ms !== undefined ? secs(ms) : undefined,
            typeof d['files'] === 'number' ? `${d['files']} files, ${mib(Number(d['bytes']))}` : undefined,
            typeof d['lowers'] === 'number' ? `${d['lowers']} lower dir(s), upper ${String(d['upperdir'])}, work dir on ${String(d['workDirFs'])}` : undefined,
            typeof d['against'] === 'string' ? `${String(d['entries'])} entries compared with ${d['against']}` : undefined,
          ].filter(Boolean).join(', ')
        : JSON.stringify(d);
      check(label, d['ok'] === true, detail === '' ? undefined : detail);
    }
    const daemonChecks = ['pull', 'overlay mount', 'rootfs', 'config'];
    const expectedChecks = [
      'connect',
      ...[...images.map((i) => i.name), ...repulls.map((r) => r.label)].flatMap((n) => daemonChecks.map((c) => `${n} ${c}`)),
      ...['pull', 'plain directory', 'rootfs', 'config', 'same tree as overlay bundle'].map((c) => `${copyPull.label} ${c}`),
    ];
    const seen = new Set(guestResults.map((r) => (typeof r.data['image'] === 'string' ? `${r.data['image']} ${String(r.data['check'])}` : String(r.data['check']))));
    const missing = expectedChecks.filter((c) => !seen.has(c));
    check('good boot: every planned guest check reported', missing.length === 0, missing.length ? `missing: ${missing.join(', ')}` : `${expectedChecks.length} checks`);
    if (done) {
      const passed = num(done.data['passed']);
      check('good boot: guest marker counts match its results', passed === guestResults.filter((r) => r.data['ok'] === true).length && num(done.data['failed']) === guestResults.length - (passed ?? 0), JSON.stringify(done.data));
    }
    const goodExit = results(gm, 'GUESTPULL-DAEMON-EXIT')[0];
    check('good boot: daemon stopped cleanly on SIGTERM (exit 0)', num(goodExit?.data['code']) === 0, JSON.stringify(goodExit?.data ?? 'no exit marker'));
    const ready = results(gm, 'GUESTPULL-DAEMON-READY')[0];
    if (ready) summary['boot to daemon ready'] = secs(ready.ms);
    for (const r of guestResults.filter((x) => x.data['check'] === 'pull')) {
      const name = String(r.data['image']);
      const how = name === copyPull.label ? ' (copy, CLI)' : repulls.some((x) => x.label === name) ? ' (overlay, cached)' : ' (overlay)';
      summary[`pull ${name}${how}`] = secs(num(r.data['ms']) ?? NaN);
    }
    for (const m of results(gm, 'GUESTPULL-REPULL')) {
      const [first, again] = [num(m.data['firstMs']), num(m.data['againMs'])];
      if (first !== undefined && again !== undefined) summary[`re-pull ${String(m.data['image'])} vs first`] = `${secs(again)} vs ${secs(first)} (${(first / again).toFixed(1)}x faster)`;
    }
    const stats = results(gm, 'GUESTPULL-STATS')[0]?.data;
    if (stats) {
      const daemon = stats['daemon'] as Record<string, unknown> | undefined;
      const run = stats['run'] as Record<string, unknown> | undefined;
      summary['daemon peak RSS (VmHWM)'] = `${((num(daemon?.['vmHwmKiB']) ?? NaN) / 1024).toFixed(1)} MiB`;
      // statfs of /run is the truth; the parts are du -x (mounted overlay rootfs not counted again).
      const used = num(run?.['usedBytes']) ?? NaN;
      const parts = { 'work dir': num(stats['workDirBytes']) ?? NaN, 'copy work dir': num(stats['copyWorkDirBytes']) ?? NaN, bundles: num(stats['bundlesBytes']) ?? NaN };
      const other = used - Object.values(parts).reduce((a, b) => a + b, 0);
      summary['tmpfs /run used after pulls (statfs)'] = `${mib(used)} of ${mib(num(run?.['sizeBytes']) ?? NaN)}`;
      summary['  of which (du -x)'] = `${Object.entries(parts).map(([k, v]) => `${k} ${mib(v)}`).join(', ')}, other ${mib(other)}`;
      check('tmpfs breakdown does not exceed statfs used bytes (no double counting)', other >= 0, `parts ${mib(used - other)}, used ${mib(used)}`);
    }
    if (!good.timedOut && done && checks.some((c) => !c.ok)) {
      console.log(`guest-test: good boot console tail:\n${consoleTail(good)}`);
    }

    // Evidence on the host: the pulls went through the proxy and to the plain registry directly.
    await proxy.stop();
    const access = proxyRequests(proxy.accessLog());
    const tunnels = access.filter((l) => new RegExp(`\\sCONNECT ${REGISTRY_NAME.replace(/\./g, '\\.')}:${tlsPort}\\s`).test(l) && /\/200\s/.test(l));
    summary['squid access.log requests'] = access.length;
    if (values.verbose) for (const l of access) console.log(`  squid | ${l}`);
    const tunnelled = tunnels.reduce((a, l) => a + Number(l.trim().split(/\s+/)[4] ?? 0), 0);
    const bigLayers = big.layers.reduce((a, l) => a + l.size, 0);
    check('squid access.log shows the guest\'s CONNECTs to the HTTPS registry, carrying the big image', tunnels.length > 0 && tunnelled >= bigLayers, `${tunnels.length} tunnel(s), ${mib(tunnelled)} through them, big image layers ${mib(bigLayers)}`);
    check('squid access.log shows nothing for the no_proxy registry', !access.some((l) => l.includes(PLAIN_GUEST) || l.includes(`:${plainPort}`)));
    const guestGets = (r: RunningRegistry, host: string): string[] =>
      r.logs().split('\n').filter((l) => /http\.request\.method=GET/.test(l) && l.includes(`http.request.host="${host}"`));
    const tlsGets = guestGets(tlsRegistry, `${REGISTRY_NAME}:${tlsPort}`);
    check('HTTPS registry served the guest under its TLS name', tlsGets.some((l) => /uri="\/v2\/guest\/big\/blobs\/sha256:/.test(l)), `${tlsGets.length} GET(s)`);
    const refetched = big.layers.map((l) => tlsGets.filter((g) => g.includes(`uri="/v2/guest/big/blobs/${l.digest}"`)).length);
    check('cached re-pull of big fetched no layer again (each layer GET once)', refetched.every((n) => n === 1), `GETs per layer: ${refetched.join(', ')}`);
    const plainGets = guestGets(plainRegistry, PLAIN_GUEST);
    check('plain registry served the guest directly at 10.0.2.100:5000', plainGets.some((l) => l.includes(`uri="/v2/plain/tools/manifests/${tools.manifest.digest}"`)), `${plainGets.length} GET(s)`);

    // Boot 2: the tampered disk, same expected digest.
    t = Date.now();
    log('boot 2: tampered init-data (one byte), same expected digest');
    const proxy2 = await startSquid({ hosts: { [REGISTRY_NAME]: '127.0.0.1' }, ports: [tlsPort] });
    stops.push(() => proxy2.stop());
    const tampered = await boot({ ...bootOpts, guestfwd: [{ guest: PLAIN_GUEST, hostPort: plainPort }, { guest: PROXY_GUEST, hostPort: proxy2.port }], disk: path.join(work, 'initdata-tampered.img'), timeoutMs: TAMPERED_BOOT_TIMEOUT_MS });
    summary['tampered boot (QEMU start to power-off)'] = secs(Date.now() - t);
    const tm = markers(tampered);
    const tDone = results(tm, 'GUESTPULL-GUEST-TEST-DONE')[0];
    if (!tDone || tampered.timedOut) failBoot('tampered boot', tampered, tDone ? 'watchdog timeout' : 'no GUESTPULL-GUEST-TEST-DONE marker');
    const refusal = tampered.lines.find((l) => /^guestpull: INITDATA_MISMATCH: /.test(l.text));
    check('tampered boot: daemon refused with its INITDATA_MISMATCH stderr line', refusal !== undefined, refusal?.text.slice(0, 160));
    const tExit = results(tm, 'GUESTPULL-DAEMON-EXIT')[0];
    check('tampered boot: daemon exit code 8', num(tExit?.data['code']) === 8, JSON.stringify(tExit?.data ?? 'no exit marker'));
    const connect = results(tm, 'GUESTPULL-RESULT').find((r) => r.data['check'] === 'connect');
    check('tampered boot: agent could not connect', connect?.data['ok'] === false && connect.data['waited'] === 'exited', JSON.stringify(connect?.data ?? 'no connect result'));
    check('tampered boot: guest marker reports the failure', tDone !== undefined && num(tDone.data['passed']) === 0 && (num(tDone.data['failed']) ?? 0) >= 1, JSON.stringify(tDone?.data ?? 'no marker'));
    await proxy2.stop();
    const access2 = proxyRequests(proxy2.accessLog());
    check('tampered boot: nothing went through the proxy', access2.length === 0, `${access2.length} request(s)`);
    const fetched = guestGets(tlsRegistry, `${REGISTRY_NAME}:${tlsPort}`).length - tlsGets.length + guestGets(plainRegistry, PLAIN_GUEST).length - plainGets.length;
    check('tampered boot: no registry request from the guest', fetched === 0, `${fetched} request(s)`);
    if (checks.some((c) => c.name.startsWith('tampered') && !c.ok) && tDone) console.log(`guest-test: tampered boot console tail:\n${consoleTail(tampered)}`);
  } finally {
    for (const stop of stops.reverse()) {
      try {
        await stop();
      } catch (e) {
        console.log(`guest-test: cleanup: ${e instanceof Error ? e.message : String(e)}`);
      }
    }
  }
  summary['total'] = secs(Date.now() - t0);
  console.log('guest-test: summary');
  for (const [k, v] of Object.entries(summary)) console.log(`  ${k.padEnd(40)} ${v}`);
  const failed = checks.filter((c) => !c.ok);
  for (const c of failed) console.log(`guest-test: failed: ${c.name}${c.detail ? ` — ${c.detail}` : ''}`);
  console.log(`guest: ${checks.length - failed.length} passed, ${failed.length} failed`);
  return failed.length === 0 && checks.length > 0 ? 0 : 1;
}

main().then(
  (code) => process.exit(code),
  (e: unknown) => {
    console.log(`guest-test: error: ${e instanceof Error ? (e.stack ?? e.message) : String(e)}`);
    console.log('guest: 0 passed, 1 failed');
    process.exit(1);
  },
);
