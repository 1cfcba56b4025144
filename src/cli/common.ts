/**
 * What the commands share: flag parsing with node:util parseArgs (errors become usage errors),
 * loading the configuration with --config / --work-dir applied, and the logger.
 */
import path from 'node:path';
import { parseArgs, type ParseArgsConfig } from 'node:util';
import { defaultConfig, loadConfigFile, normaliseLogLevel, type Config, type LoadedConfig } from '../config/index.js';
import { createLogger, type Logger } from '../log.js';
import { usageError } from './exit-codes.js';

export interface CommonFlags {
  help: boolean;
  config?: string;
  workDir?: string;
  logLevel?: string;
}

export const COMMON_OPTIONS = {
  help: { type: 'boolean', short: 'h' },
  config: { type: 'string', short: 'c' },
  'work-dir': { type: 'string' },
  'log-level': { type: 'string' },
} as const satisfies ParseArgsConfig['options'];

type Options = NonNullable<ParseArgsConfig['options']>;

/** parseArgs with strict checking; its TypeErrors become usage errors naming the command. */
export function parseFlags<O extends Options>(command: string, args: string[], options: O) {
  try {
    return parseArgs({ args, options, strict: true, allowPositionals: true });
  } catch (e) {
    throw usageError(e instanceof Error ? e.message : String(e), command);
  }
}

function nonEmpty(command: string, flag: string, v: string | undefined): string | undefined {
  if (v === '') throw usageError(`--${flag} must not be empty`, command);
  return v;
}

/** The flags every command has, checked. */
export function commonFlags(
  command: string,
  values: { help?: boolean | undefined; config?: string | undefined; 'work-dir'?: string | undefined; 'log-level'?: string | undefined },
): CommonFlags {
  const flags: CommonFlags = { help: values.help === true };
  const config = nonEmpty(command, 'config', values.config);
  const workDir = nonEmpty(command, 'work-dir', values['work-dir']);
  const level = values['log-level'];
  if (config !== undefined) flags.config = config;
  if (workDir !== undefined) flags.workDir = path.resolve(workDir);
  if (level !== undefined) {
    const l = normaliseLogLevel(level);
    if (l === undefined) throw usageError(`--log-level ${JSON.stringify(level)} is not a log level`, command);
    flags.logLevel = l;
  }
  return flags;
}

/** The configuration file (or the defaults) with --work-dir applied. Throws CONFIG errors. */
export async function loadSettings(flags: CommonFlags): Promise<LoadedConfig> {
  const loaded: LoadedConfig = flags.config
    ? await loadConfigFile(flags.config)
    : { config: defaultConfig(), warnings: [], ignored: [] };
  const config: Config = flags.workDir
    ? { ...loaded.config, image: { ...loaded.config.image, workDir: flags.workDir } }
    : loaded.config;
  return { ...loaded, config };
}

/** The logger at `level`, with the configuration's warnings and ignored keys reported once. */
export function makeLogger(level: string, loaded: LoadedConfig, source: string | undefined): Logger {
  const logger = createLogger({ level });
  for (const w of loaded.warnings) logger.warn({ event: 'config_warning', source }, w);
  if (loaded.ignored.length > 0) {
    logger.debug({ event: 'config_ignored', source, keys: loaded.ignored }, 'cdh.toml keys accepted but not used by guestpull');
  }
  return logger;
}
