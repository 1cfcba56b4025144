/**
 * Command dispatch for the guestpull CLI: `serve`, `pull`, `gc`, `fsck`, `initdata …`, `help`, `--help`, `--version`.
 * Every failure leaves as one stderr line and an exit code from ./exit-codes.ts.
 */
import { asGuestpullError } from '../errors.js';
import { reportFailure, usageError } from './exit-codes.js';
import {
  FSCK_HELP,
  GC_HELP,
  INITDATA_ANNOTATION_HELP,
  INITDATA_CHECK_HELP,
  INITDATA_DIGEST_HELP,
  INITDATA_HELP,
  INITDATA_PACK_HELP,
  MAIN_HELP,
  PULL_HELP,
  SERVE_HELP,
} from './help.js';
import { packageVersion } from './version.js';

// Each command's module is loaded when that command runs: `pull` does not pay for the gRPC
// server's modules, nor `--version` for any (start-up is part of every one-shot pull's time).

const HELP: Readonly<Record<string, string>> = {
  serve: SERVE_HELP,
  pull: PULL_HELP,
  gc: GC_HELP,
  fsck: FSCK_HELP,
  initdata: INITDATA_HELP,
  'initdata digest': INITDATA_DIGEST_HELP,
  'initdata pack': INITDATA_PACK_HELP,
  'initdata annotation': INITDATA_ANNOTATION_HELP,
  'initdata check': INITDATA_CHECK_HELP,
};

export async function main(argv: string[]): Promise<number> {
  const out = (text: string): number => {
    process.stdout.write(`${text}\n`);
    return 0;
  };
  try {
    const [command, ...rest] = argv;
    switch (command) {
      case undefined:
        process.stderr.write(`${MAIN_HELP}\n`);
        return 2;
      case '-h':
      case '--help':
        return out(MAIN_HELP);
      case '--version':
        return out(packageVersion());
      case 'help': {
        if (rest.length === 0) return out(MAIN_HELP);
        const topic = rest.join(' ');
        const text = Object.hasOwn(HELP, topic) ? HELP[topic] : undefined;
        if (text === undefined) throw usageError(`no help for ${JSON.stringify(topic)}`);
        return out(text);
      }
      case 'serve': {
        const { parseServeArgs, runServe } = await import('./serve.js');
        const args = parseServeArgs(rest);
        return args.help ? out(SERVE_HELP) : await runServe(args);
      }
      case 'pull': {
        const { parsePullArgs, runPull } = await import('./pull.js');
        const args = parsePullArgs(rest);
        return args.help ? out(PULL_HELP) : await runPull(args);
      }
      case 'gc': {
        const { parseGcArgs, runGc } = await import('./gc.js');
        const args = parseGcArgs(rest);
        return args.help ? out(GC_HELP) : await runGc(args);
      }
      case 'fsck': {
        const { parseFsckArgs, runFsck } = await import('./fsck.js');
        const args = parseFsckArgs(rest);
        return args.help ? out(FSCK_HELP) : await runFsck(args);
      }
      case 'initdata': {
        const { runInitdata } = await import('./initdata.js');
        return await runInitdata(rest);
      }
      default:
        throw usageError(`unknown command ${JSON.stringify(command)}`);
    }
  } catch (e) {
    return reportFailure(asGuestpullError(e));
  }
}
