/**
 * `guestpull gc [--work-dir DIR] [--config FILE] [--drop-unused]`: garbage collection of a work dir,
 * safe while a daemon uses it (they share the work dir mutex). Removes what killed processes left
 * (staging directories, build mounts), incomplete layers and the records of overlay bundles that
 * are no longer mounted; with --drop-unused also every layer and image config no live bundle uses.
 * Prints one summary line.
 */
import { createLogger } from '../log.js';
import { commonFlags, parseFlags, type CommonFlags } from './common.js';
import { usageError } from './exit-codes.js';
import { loadSettings, makeLogger, type SettingsOptions } from './settings.js';

export interface GcArgs extends CommonFlags {
  dropUnused: boolean;
}

const GC_OPTIONS = {
  help: { type: 'boolean', short: 'h' },
  config: { type: 'string', short: 'c' },
  'work-dir': { type: 'string' },
  'log-level': { type: 'string' },
  'drop-unused': { type: 'boolean' },
} as const;

export function parseGcArgs(args: string[]): GcArgs {
  const { values, positionals } = parseFlags('gc', args, GC_OPTIONS);
  const flags = commonFlags('gc', values);
  if (flags.help) return { ...flags, dropUnused: false };
  if (positionals.length > 0) throw usageError(`unexpected argument ${JSON.stringify(positionals[0])}`, 'gc');
  return { ...flags, dropUnused: values['drop-unused'] === true };
}

/** Resolves with the exit code after printing the summary. Throws GuestpullError. */
export async function runGc(args: GcArgs, stdout: NodeJS.WritableStream = process.stdout, hooks: Partial<SettingsOptions> = {}): Promise<number> {
  const level = args.logLevel ?? 'warn';
  const settings = await loadSettings(args, { logger: createLogger({ level }), ...hooks });
  const logger = makeLogger(level, settings);
  const workDir = settings.loaded.config.image.workDir;
  const { gcWorkDir } = await import('../pull/store/index.js');
  const report = await gcWorkDir({ workDir, dropUnused: args.dropUnused, logger });
  if (report === undefined) {
    stdout.write(`work dir ${workDir} does not exist: nothing to collect\n`);
    return 0;
  }
  stdout.write(
    `work dir ${workDir}: removed ${report.staging} staging, ${report.incompleteLayers} incomplete layers, ` +
      `${report.deadBundles} dead bundle records, ${report.unusedLayers} unused layers, ${report.unusedConfigs} unused configs, ` +
      `${report.strays} stray files; kept ${report.layers} layers, ${report.liveBundles} live bundles\n`,
  );
  return 0;
}
