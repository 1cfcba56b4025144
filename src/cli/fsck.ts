/**
 * `guestpull fsck [--work-dir DIR] [--config FILE] [--deep] [--repair] [--json]`: checks a work
 * dir's layer store (src/pull/store/fsck.ts) under the work dir mutex, so also while a daemon uses
 * it. A human summary goes to stderr; with --json the report goes to stdout as one JSON document.
 * Exit 0 when clean (unverifiable notices do not count), 1 when problems are left.
 */
import { createLogger } from '../log.js';
import type { FsckReport } from '../pull/store/index.js';
import { commonFlags, parseFlags, type CommonFlags } from './common.js';
import { usageError } from './exit-codes.js';
import { loadSettings, makeLogger, type SettingsOptions } from './settings.js';

export interface FsckArgs extends CommonFlags {
  deep: boolean;
  repair: boolean;
  json: boolean;
}

/** Exit code when the check found problems it did not repair. */
export const EXIT_FSCK_PROBLEMS = 1;

const FSCK_OPTIONS = {
  help: { type: 'boolean', short: 'h' },
  config: { type: 'string', short: 'c' },
  'work-dir': { type: 'string' },
  'log-level': { type: 'string' },
  deep: { type: 'boolean' },
  repair: { type: 'boolean' },
  json: { type: 'boolean' },
} as const;

export function parseFsckArgs(args: string[]): FsckArgs {
  const { values, positionals } = parseFlags('fsck', args, FSCK_OPTIONS);
  const flags = commonFlags('fsck', values);
  const own = { deep: values.deep === true, repair: values.repair === true, json: values.json === true };
  if (flags.help) return { ...flags, ...own };
  if (positionals.length > 0) throw usageError(`unexpected argument ${JSON.stringify(positionals[0])}`, 'fsck');
  return { ...flags, ...own };
}

/** Resolves with the exit code after printing the report. Throws GuestpullError. */
export async function runFsck(
  args: FsckArgs,
  out: { stdout: NodeJS.WritableStream; stderr: NodeJS.WritableStream } = { stdout: process.stdout, stderr: process.stderr },
  hooks: Partial<SettingsOptions> = {},
): Promise<number> {
  const level = args.logLevel ?? 'warn';
  const settings = await loadSettings(args, { logger: createLogger({ level }), ...hooks });
  const logger = makeLogger(level, settings);
  const workDir = settings.loaded.config.image.workDir;
  const { formatFsckReport, fsckWorkDir } = await import('../pull/store/index.js');
  const report = await fsckWorkDir({ workDir, logger, deep: args.deep, repair: args.repair });
  if (report === undefined) {
    out.stderr.write(`work dir ${workDir} does not exist: nothing to check\n`);
    if (args.json) {
      const empty: FsckReport = {
        version: 1, workDir, deep: args.deep, repair: args.repair, clean: true,
        counts: { layers: 0, verified: 0, bundles: 0, configs: 0, inProgress: 0 }, problems: [], unverifiable: [],
      };
      out.stdout.write(`${JSON.stringify(empty, null, 2)}\n`);
    }
    return 0;
  }
  out.stderr.write(formatFsckReport(report));
  if (args.json) out.stdout.write(`${JSON.stringify(report, null, 2)}\n`);
  return report.clean ? 0 : EXIT_FSCK_PROBLEMS;
}
