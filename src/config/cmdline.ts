/**
 * The kernel command line fallback: `agent.https_proxy`, `agent.http_proxy`, `agent.no_proxy` and
 * `agent.image_registry_auth`, which the kata agent hands to the reference data hub when its
 * cdh.toml has no `[image]` table. The host writes the kernel command line, so nothing read here is
 * measured: the values apply only when there is no init-data AND the configuration has no `[image]`
 * table (no configuration at all counts as none), and every value that applies is reported as a
 * warning. This is the only module that reads /proc/cmdline. Proxy environment variables
 * (HTTPS_PROXY, NO_PROXY, …) are never read, here or anywhere else.
 */
import { open } from 'node:fs/promises';
import { ErrorCode, GuestpullError } from '../errors.js';
import { redactUrl } from '../log.js';
import type { LoadedConfig } from './index.js';
import { ImageSection } from './schema.js';

export const KERNEL_CMDLINE_PATH = '/proc/cmdline';
/** Kernels cap the command line at a few KiB (COMMAND_LINE_SIZE); anything far beyond is not one. */
const MAX_CMDLINE_BYTES = 64 * 1024;

/** The parameters read, and the `[image]` key each one stands in for. */
export const CMDLINE_PARAMS = {
  'agent.https_proxy': 'image_pull_proxy.https_proxy',
  'agent.http_proxy': 'image_pull_proxy.http_proxy',
  'agent.no_proxy': 'image_pull_proxy.no_proxy',
  'agent.image_registry_auth': 'authenticated_registry_credentials_uri',
} as const;
export type CmdlineParam = keyof typeof CMDLINE_PARAMS;

/** The fallback parameters found on a command line (empty values count as absent). */
export type KernelCmdlineSettings = Partial<Record<CmdlineParam, string>>;

function isCmdlineParam(key: string): key is CmdlineParam {
  return Object.hasOwn(CMDLINE_PARAMS, key);
}

/**
 * Parse a kernel command line as the reference does: parameters separated by whitespace, each split
 * at its first `=`; a later occurrence of a key wins. Only the four fallback keys are kept.
 */
export function parseKernelCmdline(text: string): KernelCmdlineSettings {
  const out: KernelCmdlineSettings = {};
  for (const param of text.split(/[ \t\n\r\f\v]+/)) {
    const eq = param.indexOf('=');
    if (eq <= 0) continue;
    const key = param.slice(0, eq);
    const value = param.slice(eq + 1);
    if (!isCmdlineParam(key)) continue;
    if (value === '') delete out[key];
    else out[key] = value;
  }
  return out;
}

/** Read and parse the kernel command line; a missing file (not Linux, no /proc) means no parameters. */
export async function readKernelCmdline(file: string = KERNEL_CMDLINE_PATH): Promise<KernelCmdlineSettings> {
  let fh;
  try {
    fh = await open(file, 'r');
  } catch (e) {
    const errno = (e as NodeJS.ErrnoException).code;
    if (errno === 'ENOENT') return {};
    throw new GuestpullError(ErrorCode.CONFIG, `cannot read the kernel command line ${file} (${errno ?? String(e)})`, { source: file });
  }
  try {
    // /proc files report size 0: read up to the bound, and one byte more to notice an excess.
    const buf = Buffer.alloc(MAX_CMDLINE_BYTES + 1);
    let used = 0;
    for (;;) {
      const { bytesRead } = await fh.read(buf, used, buf.length - used, null);
      if (bytesRead === 0) break;
      used += bytesRead;
      if (used > MAX_CMDLINE_BYTES) {
        throw new GuestpullError(ErrorCode.CONFIG, `kernel command line ${file} is longer than ${MAX_CMDLINE_BYTES} bytes`, { source: file });
      }
    }
    return parseKernelCmdline(buf.subarray(0, used).toString('utf8'));
  } finally {
    await fh.close();
  }
}

/** Check the values with the same rules as the cdh.toml keys they stand in for. */
function validate(settings: KernelCmdlineSettings, source: string): void {
  const r = ImageSection.safeParse({
    image_pull_proxy: {
      https_proxy: settings['agent.https_proxy'],
      http_proxy: settings['agent.http_proxy'],
      no_proxy: settings['agent.no_proxy'],
    },
    authenticated_registry_credentials_uri: settings['agent.image_registry_auth'],
  });
  if (r.success) return;
  const lines = r.error.issues.map((i) => {
    const key = i.path.map(String).join('.');
    const param = (Object.keys(CMDLINE_PARAMS) as CmdlineParam[]).find((p) => CMDLINE_PARAMS[p] === key) ?? key;
    return `${param}: ${i.message}`;
  });
  throw new GuestpullError(
    ErrorCode.CONFIG,
    `invalid kernel command line parameter in ${source}: ${lines.join('; ')}; fix or remove it (better: configure [image] in init-data cdh.toml)`,
    { source },
  );
}

function shown(param: CmdlineParam, value: string): string {
  return param === 'agent.no_proxy' || param === 'agent.image_registry_auth' ? value : redactUrl(value);
}

/** The configuration after the fallback, and one warning per parameter that was applied. */
export interface CmdlineFallback {
  loaded: LoadedConfig;
  /**
   * `configuration is unmeasured: …`, one per parameter applied (not in `loaded.warnings`: the
   * caller logs them at start-up and repeats them at every pull).
   */
  unmeasured: string[];
}

/**
 * Apply the kernel command line fallback to a loaded configuration. When init-data is in use or the
 * configuration has an `[image]` table, the parameters are ignored (a warning each in
 * `loaded.warnings`: a host that sets them may expect them to work); otherwise they fill `[image]`
 * and each one is reported in `unmeasured`. Invalid values are CONFIG errors.
 */
export function applyKernelCmdline(
  loaded: LoadedConfig,
  settings: KernelCmdlineSettings,
  opts: { initdata: boolean; source?: string },
): CmdlineFallback {
  const source = opts.source ?? KERNEL_CMDLINE_PATH;
  const params = (Object.keys(settings) as CmdlineParam[]).filter((p) => settings[p] !== undefined);
  if (params.length === 0) return { loaded, unmeasured: [] };
  if (opts.initdata || loaded.hasImageSection) {
    const why = opts.initdata ? 'init-data is in use' : 'the configuration has an [image] table';
    const warnings = params.map((p) => `kernel command line ${p} ignored: ${why} (the fallback applies only without both)`);
    return { loaded: { ...loaded, warnings: [...loaded.warnings, ...warnings] }, unmeasured: [] };
  }
  validate(settings, source);
  const image = { ...loaded.config.image };
  const proxy = { ...image.imagePullProxy };
  const https = settings['agent.https_proxy'];
  const http = settings['agent.http_proxy'];
  const noProxy = settings['agent.no_proxy'];
  const auth = settings['agent.image_registry_auth'];
  if (https !== undefined) proxy.httpsProxy = https;
  if (http !== undefined) proxy.httpProxy = http;
  if (noProxy !== undefined) proxy.noProxy = noProxy;
  if (Object.keys(proxy).length > 0) image.imagePullProxy = proxy;
  if (auth !== undefined) image.authenticatedRegistryCredentialsUri = auth;
  const unmeasured = params.map(
    (p) =>
      `configuration is unmeasured: [image] ${CMDLINE_PARAMS[p]} = ${JSON.stringify(shown(p, settings[p]!))} comes from ` +
      `the kernel command line (${p}), which the host controls; deliver it in init-data cdh.toml instead`,
  );
  return { loaded: { ...loaded, config: { ...loaded.config, image } }, unmeasured };
}

/** Read the kernel command line and apply it (see applyKernelCmdline). */
export async function withKernelCmdline(
  loaded: LoadedConfig,
  opts: { initdata: boolean; path?: string },
): Promise<CmdlineFallback> {
  const file = opts.path ?? KERNEL_CMDLINE_PATH;
  return applyKernelCmdline(loaded, await readKernelCmdline(file), { initdata: opts.initdata, source: file });
}
