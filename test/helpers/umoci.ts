/**
 * Test helper: the independent reference pull + unpack (skopeo 1.9 copy to an OCI layout, then
 * umoci 0.4.7 unpack, which keeps owners when run as root). Both run with a scrubbed environment
 * whose HOME, XDG dirs, TMPDIR, registries.conf and registries.d all point inside workDir, no
 * proxy variables, `--insecure-policy`, and `--src-tls-verify=false` (which also allows plain http).
 * As root, skopeo writes its blob-info cache to /var/lib/containers/cache whatever the
 * environment says, so it runs in a private mount namespace with `<workDir>/varlib` bound over /var/lib.
 */
import { execFile } from 'node:child_process';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import { hasBinary, requireBinary } from './binaries.js';

const run = promisify(execFile);

export function hasSkopeoUmoci(): boolean {
  return hasBinary('skopeo') && hasBinary('umoci');
}

export interface ReferenceUnpackOptions {
  auth?: { username: string; password: string };
  /** Platform to pick from an index (default: the machine's). */
  os?: string;
  architecture?: string;
  variant?: string;
  /** Directory of CA certificates (`*.crt`) for an https registry; TLS is then verified. */
  certDir?: string;
}

function sandboxEnv(workDir: string): NodeJS.ProcessEnv {
  const d = (name: string): string => {
    const p = path.join(workDir, name);
    mkdirSync(p, { recursive: true });
    return p;
  };
  const conf = path.join(d('etc'), 'registries.conf');
  writeFileSync(conf, '# guestpull test: no mirrors, no search registries\n');
  return {
    PATH: '/usr/sbin:/usr/bin:/sbin:/bin',
    HOME: d('home'),
    XDG_RUNTIME_DIR: d('run'),
    XDG_CONFIG_HOME: d('config'),
    XDG_CACHE_HOME: d('cache'),
    XDG_DATA_HOME: d('data'),
    TMPDIR: d('tmp'),
    CONTAINERS_REGISTRIES_CONF: conf,
    REGISTRIES_CONFIG_PATH: conf,
  };
}

async function runTool(file: string, args: string[], env: NodeJS.ProcessEnv, cwd: string): Promise<void> {
  try {
    await run(file, args, { env, cwd, maxBuffer: 16 * 1024 * 1024, timeout: 300_000 });
  } catch (err) {
    const e = err as { stderr?: string; stdout?: string; message?: string; code?: unknown; signal?: unknown };
    const output = `${e.stderr ?? ''}${e.stdout ?? ''}`.trim();
    throw new Error(`${path.basename(file)} ${args.join(' ')} failed (exit ${String(e.code)}${e.signal ? `, ${String(e.signal)}` : ''}):\n${output || e.message}`);
  }
}

/**
 * Pulls host/repository:tag with skopeo into `<workDir>/layout` and unpacks it with umoci into
 * `<workDir>/bundle`; returns the rootfs path and umoci's generated config.json.
 */
export async function referenceUnpack(
  registryHost: string,
  repository: string,
  tag: string,
  workDir: string,
  opts: ReferenceUnpackOptions = {},
): Promise<{ rootfs: string; configJson: unknown }> {
  const skopeo = requireBinary('skopeo');
  const umoci = requireBinary('umoci');
  const env = sandboxEnv(workDir);
  const layout = path.join(workDir, 'layout');
  const bundle = path.join(workDir, 'bundle');
  const regd = path.join(workDir, 'registries.d');
  mkdirSync(regd, { recursive: true });

  const global = ['--insecure-policy', '--registries.d', regd, '--tmpdir', env['TMPDIR']!];
  if (opts.os) global.push('--override-os', opts.os);
  if (opts.architecture) global.push('--override-arch', opts.architecture);
  if (opts.variant) global.push('--override-variant', opts.variant);
  const copy = ['copy', '--quiet'];
  if (opts.certDir) copy.push('--src-tls-verify=true', '--src-cert-dir', opts.certDir);
  else copy.push('--src-tls-verify=false');
  if (opts.auth) copy.push('--src-creds', `${opts.auth.username}:${opts.auth.password}`);
  else copy.push('--src-no-creds');
  copy.push(`docker://${registryHost}/${repository}:${tag}`, `oci:${layout}:${tag}`);
  const varlib = path.join(workDir, 'varlib');
  mkdirSync(varlib, { recursive: true });
  requireBinary('mount');
  const privateVarLib = ['--mount', '--propagation', 'private', '--', '/bin/sh', '-c', 'mount --bind "$1" /var/lib && shift && exec "$@"', 'sh', varlib];
  await runTool(requireBinary('unshare'), [...privateVarLib, skopeo, ...global, ...copy], env, workDir);

  await runTool(umoci, ['unpack', '--image', `${layout}:${tag}`, bundle], env, workDir);
  const configJson: unknown = JSON.parse(readFileSync(path.join(bundle, 'config.json'), 'utf8'));
  return { rootfs: path.join(bundle, 'rootfs'), configJson };
}
