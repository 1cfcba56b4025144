/**
 * `guestpull serve`: flags → configuration (init-data verified and installed, or --config) →
 * Puller → gRPC server, until SIGTERM or SIGINT, then a graceful stop (10 s for running pulls) and
 * exit 0. Init-data that does not match the TEE stops it before anything is written or listens.
 */
import { DEFAULT_SOCKET } from '../config/index.js';
import { parseListenAddress, startServer, type RunningServer } from '../service/index.js';
import { asGuestpullError } from '../errors.js';
import { createLogger } from '../log.js';
import { COMMON_OPTIONS, commonFlags, parseFlags, type CommonFlags } from './common.js';
import { usageError } from './exit-codes.js';
import { BUNDLE_ROOT_OPTION, bundleRootFlags, loadSettings, makeLogger, type SettingsOptions } from './settings.js';
import { packageVersion } from './version.js';

export interface ServeArgs extends CommonFlags {
  listen?: string;
  /** --bundle-root: bundle paths must lie below one of these (absolute). */
  bundleRoots?: string[];
}

const STOP_GRACE_MS = 10_000;

export function parseServeArgs(args: string[]): ServeArgs {
  const { values, positionals } = parseFlags('serve', args, { ...COMMON_OPTIONS, ...BUNDLE_ROOT_OPTION, listen: { type: 'string' } });
  const parsed: ServeArgs = commonFlags('serve', values);
  if (parsed.help) return parsed;
  if (positionals.length > 0) throw usageError(`unexpected argument ${JSON.stringify(positionals[0])}`, 'serve');
  if (values.listen !== undefined) {
    try {
      parseListenAddress(values.listen);
    } catch (e) {
      throw usageError(`--listen: ${asGuestpullError(e).message}`, 'serve');
    }
    parsed.listen = values.listen;
  }
  const roots = bundleRootFlags('serve', values['bundle-root']);
  if (roots !== undefined) parsed.bundleRoots = roots;
  return parsed;
}

/** The first of `signals` to arrive; its listeners are removed afterwards. */
function firstSignal(signals: NodeJS.Signals[]): Promise<NodeJS.Signals> {
  return new Promise((resolve) => {
    const handler = (signal: NodeJS.Signals): void => {
      for (const s of signals) process.off(s, handler);
      resolve(signal);
    };
    for (const s of signals) process.on(s, handler);
  });
}

/** Resolves with the exit code once the daemon has stopped after a signal. Throws GuestpullError. */
/** How often a serving daemon collects the records of bundles the runtime has removed. */
const SWEEP_EVERY_MS = 5 * 60_000;

export async function runServe(args: ServeArgs, hooks: Partial<SettingsOptions> = {}): Promise<number> {
  const settings = await loadSettings(args, { logger: createLogger({ level: args.logLevel ?? 'info' }), ...hooks });
  const { config } = settings.loaded;
  const logger = makeLogger(args.logLevel ?? config.log.level ?? 'info', settings);
  const version = packageVersion();
  const listen = args.listen ?? config.socket ?? DEFAULT_SOCKET;
  parseListenAddress(listen); // a bad `socket` in cdh.toml is a CONFIG error before anything starts

  // Loaded here rather than at the top so --help and flag errors never pay for the pull stack.
  const { Puller } = await import('../pull/index.js');
  const puller = new Puller({
    config,
    logger,
    version,
    pullWarnings: settings.pullWarnings,
    ...(args.bundleRoots !== undefined ? { bundleRoots: args.bundleRoots } : {}),
  });
  let server: RunningServer;
  try {
    server = await startServer({ listen, puller, logger, version });
  } catch (e) {
    await puller.close();
    throw e;
  }
  logger.info(
    { event: 'listening', address: server.address, version, workDir: config.image.workDir, bundleRoots: args.bundleRoots ?? 'any' },
    'listening',
  );

  // The runtime unmounts and removes bundles without telling us: their store records (and upper
  // directories) are collected now and then, as `guestpull gc` would; layers stay (gc --drop-unused).
  const sweeper = setInterval(() => void puller.sweep(), SWEEP_EVERY_MS);
  sweeper.unref();

  const stopSignal = await firstSignal(['SIGTERM', 'SIGINT']);
  clearInterval(sweeper);
  logger.info({ event: 'stopping', signal: stopSignal, graceMs: STOP_GRACE_MS }, 'stopping');
  // A second signal while stopping is swallowed: the stop is bounded by the grace period.
  const ignore = (): void => logger.warn({ event: 'signal_ignored' }, 'already stopping');
  process.on('SIGTERM', ignore).on('SIGINT', ignore);
  try {
    await server.stop(STOP_GRACE_MS);
    await puller.close();
  } finally {
    process.off('SIGTERM', ignore).off('SIGINT', ignore);
  }
  return 0;
}
