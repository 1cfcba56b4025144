/**
 * The flags `serve` and `pull` share (--config, --work-dir, --log-level and the init-data flags),
 * parsed with node:util parseArgs; every error is a usage error (exit 2). Loading the
 * configuration they name is ./settings.ts.
 */
import path from 'node:path';
import { parseArgs, type ParseArgsConfig } from 'node:util';
import { normaliseLogLevel } from '../config/index.js';
import { DEFAULT_INITDATA_DIR, parseDigestValue } from '../initdata/index.js';
import { usageError } from './exit-codes.js';

/** The init-data flags of `serve` and `pull` (present only when --initdata was given). */
export interface InitdataFlags {
  /** An absolute path (TOML file, disk image or block device) or `auto`. */
  spec: string;
  /** --initdata-digest as given (hex or base64), already checked to decode. */
  expectedDigest?: string;
  allowUnmeasured: boolean;
  /** Where the verified document and its cdh.toml / aa.toml / policy.rego are installed. */
  dir: string;
  /** --initdata-max-bytes: bound on the document and on a device's declared payload. */
  maxBytes?: number;
}

export interface CommonFlags {
  help: boolean;
  config?: string;
  workDir?: string;
  logLevel?: string;
  initdata?: InitdataFlags;
}

export const COMMON_OPTIONS = {
  help: { type: 'boolean', short: 'h' },
  config: { type: 'string', short: 'c' },
  'work-dir': { type: 'string' },
  'log-level': { type: 'string' },
  initdata: { type: 'string' },
  'initdata-digest': { type: 'string' },
  'allow-unmeasured-initdata': { type: 'boolean' },
  'initdata-dir': { type: 'string' },
  'initdata-max-bytes': { type: 'string' },
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

/** The largest --initdata-max-bytes accepted: init-data is a few KiB of TOML. */
const MAX_INITDATA_BYTES_FLAG = 64 * 1024 * 1024;

interface CommonValues {
  help?: boolean | undefined;
  config?: string | undefined;
  'work-dir'?: string | undefined;
  'log-level'?: string | undefined;
  initdata?: string | undefined;
  'initdata-digest'?: string | undefined;
  'allow-unmeasured-initdata'?: boolean | undefined;
  'initdata-dir'?: string | undefined;
  'initdata-max-bytes'?: string | undefined;
}

function initdataFlags(command: string, values: CommonValues): InitdataFlags | undefined {
  const spec = nonEmpty(command, 'initdata', values.initdata);
  if (spec === undefined) {
    const stray = (['initdata-digest', 'allow-unmeasured-initdata', 'initdata-dir', 'initdata-max-bytes'] as const).find(
      (f) => values[f] !== undefined,
    );
    if (stray !== undefined) throw usageError(`--${stray} needs --initdata`, command);
    return undefined;
  }
  if (values.config !== undefined) {
    throw usageError('--config and --initdata cannot be used together: with init-data, its cdh.toml is the configuration', command);
  }
  const flags: InitdataFlags = {
    spec: spec === 'auto' ? 'auto' : path.resolve(spec),
    allowUnmeasured: values['allow-unmeasured-initdata'] === true,
    dir: path.resolve(nonEmpty(command, 'initdata-dir', values['initdata-dir']) ?? DEFAULT_INITDATA_DIR),
  };
  const digest = nonEmpty(command, 'initdata-digest', values['initdata-digest']);
  if (digest !== undefined) {
    try {
      parseDigestValue(digest);
    } catch (e) {
      throw usageError(`--initdata-digest: ${e instanceof Error ? e.message : String(e)}`, command);
    }
    flags.expectedDigest = digest;
  }
  const max = values['initdata-max-bytes'];
  if (max !== undefined) {
    const n = /^[0-9]{1,9}$/.test(max) ? Number(max) : NaN;
    if (!(n >= 1 && n <= MAX_INITDATA_BYTES_FLAG)) {
      throw usageError(`--initdata-max-bytes ${JSON.stringify(max)} must be a whole number of bytes from 1 to ${MAX_INITDATA_BYTES_FLAG}`, command);
    }
    flags.maxBytes = n;
  }
  return flags;
}

/** The flags every command has, checked. */
export function commonFlags(command: string, values: CommonValues): CommonFlags {
  const flags: CommonFlags = { help: values.help === true };
  if (flags.help) return flags;
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
  const initdata = initdataFlags(command, values);
  if (initdata !== undefined) flags.initdata = initdata;
  return flags;
}
