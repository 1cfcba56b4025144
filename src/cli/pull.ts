/**
 * `guestpull pull IMAGE BUNDLE_DIR`: one pull through the same Puller the daemon uses, with the same
 * configuration sources (init-data, --config, defaults). Prints the manifest digest on stdout;
 * SIGINT/SIGTERM abort the pull (the bundle is left untouched).
 */
import path from 'node:path';
import { ErrorCode, GuestpullError } from '../errors.js';
import { createLogger } from '../log.js';
import { COMMON_OPTIONS, commonFlags, parseFlags, type CommonFlags } from './common.js';
import { usageError } from './exit-codes.js';
import { BUNDLE_ROOT_OPTION, bundleRootFlags, loadSettings, makeLogger, type SettingsOptions } from './settings.js';
import { packageVersion } from './version.js';

export interface PullArgs extends CommonFlags {
  image: string;
  bundle: string;
  /** --bundle-root: BUNDLE_DIR must lie below one of these (absolute). */
  bundleRoots?: string[];
}

export function parsePullArgs(args: string[]): PullArgs {
  const { values, positionals } = parseFlags('pull', args, { ...COMMON_OPTIONS, ...BUNDLE_ROOT_OPTION });
  const flags = commonFlags('pull', values);
  if (flags.help) return { ...flags, image: '', bundle: '' };
  if (positionals.length !== 2) {
    throw usageError(`expected IMAGE and BUNDLE_DIR, got ${positionals.length} argument(s)`, 'pull');
  }
  const [image, bundle] = positionals as [string, string];
  if (image === '' || bundle === '') throw usageError('IMAGE and BUNDLE_DIR must not be empty', 'pull');
  const roots = bundleRootFlags('pull', values['bundle-root']);
  return { ...flags, image, bundle: path.resolve(bundle), ...(roots !== undefined ? { bundleRoots: roots } : {}) };
}

/** Resolves with the exit code after printing the digest. Throws GuestpullError. */
export async function runPull(
  args: PullArgs,
  stdout: NodeJS.WritableStream = process.stdout,
  hooks: Partial<SettingsOptions> = {},
): Promise<number> {
  const level = args.logLevel ?? 'warn';
  const settings = await loadSettings(args, { logger: createLogger({ level }), ...hooks });
  const logger = makeLogger(level, settings);
  const { Puller } = await import('../pull/index.js');
  const puller = new Puller({
    config: settings.loaded.config,
    logger,
    version: packageVersion(),
    pullWarnings: settings.pullWarnings,
    ...(args.bundleRoots !== undefined ? { bundleRoots: args.bundleRoots } : {}),
  });

  const controller = new AbortController();
  const onSignal = (signal: NodeJS.Signals): void =>
    controller.abort(new GuestpullError(ErrorCode.CANCELLED, `pull of ${args.image} interrupted by ${signal}`, { image: args.image }));
  process.on('SIGINT', onSignal).on('SIGTERM', onSignal);
  try {
    const { manifestDigest } = await puller.pull(args.image, args.bundle, { signal: controller.signal });
    stdout.write(`${manifestDigest}\n`);
    return 0;
  } catch (e) {
    const reason: unknown = controller.signal.aborted ? controller.signal.reason : undefined;
    throw reason instanceof GuestpullError ? reason : e;
  } finally {
    process.off('SIGINT', onSignal).off('SIGTERM', onSignal);
    await puller.close();
  }
}
