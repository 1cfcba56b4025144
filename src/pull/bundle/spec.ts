/**
 * Image config → OCI runtime `config.json` (image-spec conversion.md; runtime-spec config.md and
 * config-linux.md). The defaults the image does not decide (capabilities, mounts, namespaces,
 * masked paths) are containerd's default Unix spec with Docker's 14 default capabilities.
 *
 * In a CoCo guest the kata agent builds the container from the spec the host sent; this file is the
 * bundle's own, standalone-runnable description of the image (what umoci / image-rs write).
 */
import path from 'node:path';
import { ErrorCode, GuestpullError } from '../../errors.js';
import type { ImageConfig } from '../../oci.js';
import { cleanEntryPath } from '../layers/rootpath.js';
import { resolveUser } from './user.js';

export const OCI_RUNTIME_VERSION = '1.1.0';
export const DEFAULT_PATH = 'PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin';

export interface Mount {
  destination: string;
  type: string;
  source: string;
  options: string[];
}

export interface RuntimeProcess {
  terminal: boolean;
  user: { uid: number; gid: number; additionalGids?: number[] };
  args: string[];
  env: string[];
  cwd: string;
  capabilities: { bounding: string[]; effective: string[]; permitted: string[] };
  rlimits: { type: string; hard: number; soft: number }[];
  noNewPrivileges: boolean;
}

export interface RuntimeLinux {
  namespaces: { type: 'pid' | 'network' | 'mount' | 'ipc' | 'uts' | 'user' | 'cgroup' | 'time' }[];
  maskedPaths: string[];
  readonlyPaths: string[];
  resources: { devices: { allow: boolean; access: string }[] };
}

export interface RuntimeSpec {
  ociVersion: string;
  process: RuntimeProcess;
  root: { path: string; readonly: boolean };
  /** Never set by us: the runtime (kata) decides the hostname. */
  hostname?: string;
  mounts: Mount[];
  annotations: Record<string, string>;
  linux: RuntimeLinux;
}

export interface BuildSpecOptions {
  imageConfig: ImageConfig;
  /** Host path of the unpacked rootfs (for /etc/passwd and /etc/group). */
  rootfs: string;
  /** The image reference, for messages. */
  image: string;
  /** The platform manifest's annotations; image Labels win over them. */
  manifestAnnotations?: Record<string, string>;
}

/** Docker's (and containerd 1.x's) default capability set. */
export const DEFAULT_CAPABILITIES: readonly string[] = [
  'CAP_CHOWN', 'CAP_DAC_OVERRIDE', 'CAP_FSETID', 'CAP_FOWNER', 'CAP_MKNOD', 'CAP_NET_RAW',
  'CAP_SETGID', 'CAP_SETUID', 'CAP_SETFCAP', 'CAP_SETPCAP', 'CAP_NET_BIND_SERVICE',
  'CAP_SYS_CHROOT', 'CAP_KILL', 'CAP_AUDIT_WRITE',
];

function defaultMounts(): Mount[] {
  return [
    { destination: '/proc', type: 'proc', source: 'proc', options: ['nosuid', 'noexec', 'nodev'] },
    { destination: '/dev', type: 'tmpfs', source: 'tmpfs', options: ['nosuid', 'strictatime', 'mode=755', 'size=65536k'] },
    {
      destination: '/dev/pts', type: 'devpts', source: 'devpts',
      options: ['nosuid', 'noexec', 'newinstance', 'ptmxmode=0666', 'mode=0620', 'gid=5'],
    },
    { destination: '/dev/shm', type: 'tmpfs', source: 'shm', options: ['nosuid', 'noexec', 'nodev', 'mode=1777', 'size=65536k'] },
    { destination: '/dev/mqueue', type: 'mqueue', source: 'mqueue', options: ['nosuid', 'noexec', 'nodev'] },
    { destination: '/sys', type: 'sysfs', source: 'sysfs', options: ['nosuid', 'noexec', 'nodev', 'ro'] },
    { destination: '/sys/fs/cgroup', type: 'cgroup', source: 'cgroup', options: ['nosuid', 'noexec', 'nodev', 'relatime', 'ro'] },
  ];
}

const MASKED_PATHS = [
  '/proc/acpi', '/proc/asound', '/proc/kcore', '/proc/keys', '/proc/latency_stats', '/proc/timer_list',
  '/proc/timer_stats', '/proc/sched_debug', '/sys/firmware', '/sys/devices/virtual/powercap', '/proc/scsi',
];
const READONLY_PATHS = ['/proc/bus', '/proc/fs', '/proc/irq', '/proc/sys', '/proc/sysrq-trigger'];

const VOLUME_OPTIONS = ['nosuid', 'nodev', 'mode=755'];

function envName(entry: string): string {
  const i = entry.indexOf('=');
  return i < 0 ? entry : entry.slice(0, i);
}

/** `dest` equals `base` or lies below it. */
function isAtOrUnder(dest: string, base: string): boolean {
  return dest === base || dest.startsWith(base.endsWith('/') ? base : `${base}/`);
}

/**
 * Volumes → tmpfs mounts. A volume must be absolute; it is cleaned lexically (`/a/../../x` → `/x`:
 * `..` is clamped at the root, so it can never name a place outside the container) and refused
 * when it is relative, holds a NUL, or cleans to `/`. Volumes at or under a default mount are
 * skipped (that mount already provides them); duplicates collapse; parents come before children.
 */
function volumeMounts(volumes: Record<string, unknown> | null | undefined, defaults: Mount[], image: string): Mount[] {
  const dests = new Set<string>();
  for (const raw of Object.keys(volumes ?? {})) {
    const bad = (why: string): GuestpullError =>
      new GuestpullError(ErrorCode.BAD_IMAGE, `image ${image} declares volume ${JSON.stringify(raw)}, which ${why}`, { image });
    if (raw.includes('\0')) throw bad('contains a NUL byte');
    if (!raw.startsWith('/')) throw bad('is not an absolute path');
    const parts = cleanEntryPath(raw);
    if (parts.length === 0) throw bad('names the root directory');
    const dest = `/${parts.join('/')}`;
    if (defaults.some((m) => isAtOrUnder(dest, m.destination))) continue;
    dests.add(dest);
  }
  // A parent is a string prefix of its child, so plain sorting mounts parents first.
  return [...dests].sort().map((destination) => ({ destination, type: 'tmpfs', source: 'tmpfs', options: [...VOLUME_OPTIONS] }));
}

function buildAnnotations(ic: ImageConfig, manifest: Record<string, string> | undefined): Record<string, string> {
  const c = ic.config;
  const a: Record<string, string> = {};
  const set = (k: string, v: string | undefined): void => {
    if (v !== undefined) a[`org.opencontainers.image.${k}`] = v;
  };
  set('os', ic.os);
  set('architecture', ic.architecture);
  set('variant', ic.variant);
  set('os.version', ic['os.version']);
  if (ic['os.features'] && ic['os.features'].length > 0) set('os.features', ic['os.features'].join(','));
  set('author', ic.author);
  set('created', ic.created);
  set('stopSignal', c?.StopSignal);
  const ports = Object.keys(c?.ExposedPorts ?? {});
  if (ports.length > 0) set('exposedPorts', ports.join(','));
  // conversion.md says converters SHOULD NOT take manifest annotations; our contract does, below
  // the labels, so that image Labels still win every conflict as conversion.md requires.
  Object.assign(a, manifest ?? {}, c?.Labels ?? {});
  return a;
}

export async function buildRuntimeSpec(opts: BuildSpecOptions): Promise<RuntimeSpec> {
  const { imageConfig: ic, rootfs, image } = opts;
  if (ic.os !== 'linux') {
    throw new GuestpullError(ErrorCode.BAD_IMAGE, `image ${image} is for os ${ic.os}; only linux images can run here`, { image });
  }
  const c = ic.config;

  // Entrypoint + Cmd. Both absent gives [] (conversion.md leaves it open; umoci writes it as is):
  // the runtime then refuses to start the container with a clear error of its own.
  const args = [...(c?.Entrypoint ?? []), ...(c?.Cmd ?? [])];

  // Image Env verbatim; the conventional PATH is added (first, as containerd does) only when the
  // image sets none: conversion.md forbids adding a variable the image names.
  const imageEnv = c?.Env ?? [];
  const env = imageEnv.some((e) => envName(e) === 'PATH') ? [...imageEnv] : [DEFAULT_PATH, ...imageEnv];

  // WorkingDir verbatim when absolute; relative is taken from `/` as Docker does; empty → `/`.
  const wd = c?.WorkingDir ?? '';
  if (wd.includes('\0')) {
    throw new GuestpullError(ErrorCode.BAD_IMAGE, `image ${image} has a WorkingDir containing a NUL byte`, { image });
  }
  const cwd = wd === '' ? '/' : wd.startsWith('/') ? wd : path.posix.join('/', wd);

  const user = await resolveUser(rootfs, c?.User, image);
  const defaults = defaultMounts();

  return {
    ociVersion: OCI_RUNTIME_VERSION,
    process: {
      terminal: false,
      user: {
        uid: user.uid,
        gid: user.gid,
        ...(user.additionalGids.length > 0 ? { additionalGids: [...user.additionalGids] } : {}),
      },
      args,
      env,
      cwd,
      capabilities: {
        bounding: [...DEFAULT_CAPABILITIES],
        effective: [...DEFAULT_CAPABILITIES],
        permitted: [...DEFAULT_CAPABILITIES],
      },
      rlimits: [{ type: 'RLIMIT_NOFILE', hard: 1024, soft: 1024 }],
      noNewPrivileges: false,
    },
    root: { path: 'rootfs', readonly: false },
    mounts: [...defaults, ...volumeMounts(c?.Volumes, defaults, image)],
    annotations: buildAnnotations(ic, opts.manifestAnnotations),
    linux: {
      namespaces: [{ type: 'pid' }, { type: 'ipc' }, { type: 'uts' }, { type: 'mount' }, { type: 'network' }],
      maskedPaths: [...MASKED_PATHS],
      readonlyPaths: [...READONLY_PATHS],
      resources: { devices: [{ allow: false, access: 'rwm' }] },
    },
  };
}
