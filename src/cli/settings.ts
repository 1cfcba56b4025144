/**
 * Where the configuration of `serve` and `pull` comes from, in one place:
 *   --initdata  the document is read and its digest checked against --initdata-digest or the TEE
 *               (a mismatch throws INITDATA_MISMATCH before anything is written); then it is
 *               installed in --initdata-dir and its cdh.toml is the configuration;
 *   --config    that cdh.toml;   neither: the defaults.
 * Then the kernel command line fallback (only without init-data and without [image]) and --work-dir.
 * Warnings that the configuration is unmeasured are logged at start-up and returned for every pull.
 * Also here: `--bundle-root` (serve and pull), which is not configuration from cdh.toml but a
 * start-up setting of the Puller.
 */
import path from 'node:path';
import { defaultLoadedConfig, loadConfigFile, parseConfig, type LoadedConfig } from '../config/index.js';
import { withKernelCmdline } from '../config/cmdline.js';
import { installInitdata, loadVerifiedInitdata, type InitdataLimits } from '../initdata/index.js';
import { createLogger, type Logger } from '../log.js';
import type { CommonFlags, InitdataFlags } from './common.js';
import { usageError } from './exit-codes.js';

/** The `--bundle-root` option of serve and pull: repeatable. */
export const BUNDLE_ROOT_OPTION = { 'bundle-root': { type: 'string', multiple: true } } as const;

/**
 * `--bundle-root DIR` values, made absolute (relative to the current directory); undefined when
 * the flag was not given. Existence and symlinks are the Puller's start-up check.
 */
export function bundleRootFlags(command: string, values: string[] | undefined): string[] | undefined {
  if (values === undefined || values.length === 0) return undefined;
  return values.map((v) => {
    if (v === '') throw usageError('--bundle-root must not be empty', command);
    return path.resolve(v);
  });
}

export interface InitdataSummary {
  source: string;
  measured: boolean;
  digestHex: string;
  expectedFrom?: string;
  installed: string[];
}

export interface Settings {
  loaded: LoadedConfig;
  /** What the configuration was read from, for log lines (a path, `init-data cdh.toml`, or none). */
  source?: string;
  /** `configuration is unmeasured: …` lines, repeated at every pull (Puller pullWarnings). */
  pullWarnings: string[];
  /**
   * Warnings still to be logged once at start-up. The unmeasured init-data warning is not among
   * them: loadVerifiedInitdata has logged it already, and it is said once.
   */
  startupWarnings: string[];
  initdata?: InitdataSummary;
}

export interface SettingsOptions {
  /** Logs the init-data steps (the final logger needs the configuration's [log] level). */
  logger: Logger;
  /** Test hooks: another kernel command line, TEE roots and /dev. */
  cmdlinePath?: string;
  tee?: { sysfsRoot?: string; configfsRoot?: string };
  devRoot?: string;
}

export const INITDATA_CDH_SOURCE = 'init-data cdh.toml';

async function fromInitdata(flags: InitdataFlags, opts: SettingsOptions): Promise<Settings> {
  const limits: Partial<InitdataLimits> | undefined =
    flags.maxBytes === undefined ? undefined : { maxDeviceBytes: flags.maxBytes, maxDecompressedBytes: flags.maxBytes };
  const verified = await loadVerifiedInitdata({
    spec: flags.spec,
    allowUnmeasured: flags.allowUnmeasured,
    logger: opts.logger,
    ...(flags.expectedDigest !== undefined ? { expectedDigest: flags.expectedDigest } : {}),
    ...(limits !== undefined ? { limits } : {}),
    ...(opts.tee !== undefined ? { tee: opts.tee } : {}),
    ...(opts.devRoot !== undefined ? { devRoot: opts.devRoot } : {}),
  });
  const installed = await installInitdata(verified.doc, flags.dir);
  const cdh = verified.doc.data['cdh.toml'];
  let loaded: LoadedConfig;
  if (cdh === undefined) {
    loaded = defaultLoadedConfig();
    loaded.warnings.push(`init-data from ${verified.source} has no "cdh.toml" entry in [data]: using the default configuration`);
  } else {
    loaded = parseConfig(cdh, INITDATA_CDH_SOURCE);
  }
  const pullWarnings = verified.measured
    ? []
    : [
        `configuration is unmeasured: init-data from ${verified.source} (${verified.doc.algorithm} ${verified.digestHex}) ` +
          'was not checked against the TEE (no --initdata-digest and no TEE measurement available); ' +
          'it is used only because --allow-unmeasured-initdata was given',
      ];
  const summary: InitdataSummary = { source: verified.source, measured: verified.measured, digestHex: verified.digestHex, installed };
  if (verified.expectedFrom !== undefined) summary.expectedFrom = verified.expectedFrom;
  return { loaded, source: INITDATA_CDH_SOURCE, pullWarnings, startupWarnings: [], initdata: summary };
}

/** The configuration the flags name, checked; throws GuestpullError (INITDATA_MISMATCH, CONFIG, …). */
export async function loadSettings(flags: CommonFlags, opts: SettingsOptions): Promise<Settings> {
  let settings: Settings;
  if (flags.initdata !== undefined) {
    settings = await fromInitdata(flags.initdata, opts);
  } else {
    const loaded = flags.config !== undefined ? await loadConfigFile(flags.config) : defaultLoadedConfig();
    settings = { loaded, pullWarnings: [], startupWarnings: [] };
    if (flags.config !== undefined) settings.source = flags.config;
  }
  const fallback = await withKernelCmdline(settings.loaded, {
    initdata: flags.initdata !== undefined,
    ...(opts.cmdlinePath !== undefined ? { path: opts.cmdlinePath } : {}),
  });
  let loaded = fallback.loaded;
  if (flags.workDir !== undefined) {
    loaded = { ...loaded, config: { ...loaded.config, image: { ...loaded.config.image, workDir: flags.workDir } } };
  }
  return {
    ...settings,
    loaded,
    pullWarnings: [...settings.pullWarnings, ...fallback.unmeasured],
    startupWarnings: [...settings.startupWarnings, ...fallback.unmeasured],
  };
}

/**
 * The command's logger at `level`, with the start-up report written once: the init-data installed,
 * the configuration's warnings, the start-up warnings (one line each), keys accepted but unused.
 */
export function makeLogger(level: string, settings: Settings): Logger {
  const logger = createLogger({ level });
  const { loaded, source, initdata } = settings;
  if (initdata !== undefined) {
    logger.info({ event: 'initdata_installed', ...initdata }, 'init-data installed; its cdh.toml is the configuration');
  }
  for (const w of loaded.warnings) logger.warn({ event: 'config_warning', source }, w);
  for (const w of settings.startupWarnings) logger.warn({ event: 'config_unmeasured', source }, w);
  if (loaded.ignored.length > 0) {
    logger.debug({ event: 'config_ignored', source, keys: loaded.ignored }, 'cdh.toml keys accepted but not used by guestpull');
  }
  return logger;
}
