/**
 * Command dispatch for the guestpull CLI: `serve`, `pull`, `gc`, `fsck`, `initdata …`, `help`, `--help`, `--version`.
 * Every failure leaves as one stderr line and an exit code from ./exit-codes.ts.
 */
import { asGuestpullError } from '../errors.js';
import { reportFailure, usageError } from './exit-codes.js';
import { parseFsckArgs, runFsck } from './fsck.js';
import { parseGcArgs, runGc } from './gc.js';
import { FSCK_HELP, GC_HELP, INITDATA_HELP, MAIN_HELP, PULL_HELP, SERVE_HELP } from './help.js';
import { INITDATA_SUBCOMMAND_HELP, runInitdata } from './initdata.js';
import { parsePullArgs, runPull } from './pull.js';
import { parseServeArgs, runServe } from './serve.js';
import { packageVersion } from './version.js';

const HELP: Readonly<Record<string, string>> = {
  serve: SERVE_HELP,
  pull: PULL_HELP,
  gc: GC_HELP,
  fsck: FSCK_HELP,
  initdata: INITDATA_HELP,
  ...Object.fromEntries(Object.entries(INITDATA_SUBCOMMAND_HELP).map(([k, v]) => [`initdata ${k}`, v])),
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
        const args = parseServeArgs(rest);
        return args.help ? out(SERVE_HELP) : await runServe(args);
      }
      case 'pull': {
        const args = parsePullArgs(rest);
        return args.help ? out(PULL_HELP) : await runPull(args);
      }
      case 'gc': {
        const args = parseGcArgs(rest);
        return args.help ? out(GC_HELP) : await runGc(args);
      }
      case 'fsck': {
        const args = parseFsckArgs(rest);
        return args.help ? out(FSCK_HELP) : await runFsck(args);
      }
      case 'initdata':
        return await runInitdata(rest);
      default:
        throw usageError(`unknown command ${JSON.stringify(command)}`);
    }
  } catch (e) {
    return reportFailure(asGuestpullError(e));
  }
}
