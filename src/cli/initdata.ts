/**
 * `guestpull initdata digest|pack|annotation|check`: host-side tooling for operators preparing
 * init-data. Arguments are parsed into a typed command (pure, tested), then run against the
 * ../initdata/ module: the same reader, parser and digest code the daemon uses in the guest.
 */
import { writeFile } from 'node:fs/promises';
import path from 'node:path';
import { ErrorCode, GuestpullError } from '../errors.js';
import {
  FIELD_LENGTH,
  digestMatches,
  encodeAnnotation,
  fitToField,
  initdataDigest,
  packInitdataImage,
  parseDigestValue,
  parseInitdataDocument,
  parseInitdataHeader,
  readInitdata,
  type TeePlatform,
} from '../initdata/index.js';
import { silentLogger } from '../log.js';
import { parseFlags } from './common.js';
import { usageError } from './exit-codes.js';
import {
  INITDATA_ANNOTATION_HELP,
  INITDATA_CHECK_HELP,
  INITDATA_DIGEST_HELP,
  INITDATA_HELP,
  INITDATA_PACK_HELP,
} from './help.js';

export type DigestEncoding = 'hex' | 'base64';

export type InitdataCommand =
  | { kind: 'help'; text: string }
  | { kind: 'digest'; file: string; platform: TeePlatform; encoding: DigestEncoding }
  | { kind: 'pack'; file: string; out: string; force: boolean }
  | { kind: 'annotation'; file: string }
  | { kind: 'check'; file: string; expected: Buffer; expectedText: string; platform?: TeePlatform };

export const INITDATA_SUBCOMMAND_HELP: Readonly<Record<string, string>> = {
  digest: INITDATA_DIGEST_HELP,
  pack: INITDATA_PACK_HELP,
  annotation: INITDATA_ANNOTATION_HELP,
  check: INITDATA_CHECK_HELP,
};

const PLATFORMS: readonly TeePlatform[] = ['none', ...(Object.keys(FIELD_LENGTH) as Exclude<TeePlatform, 'none'>[])];

function platformOf(command: string, v: string): TeePlatform {
  const p = PLATFORMS.find((x) => x === v);
  if (p === undefined) throw usageError(`--platform ${JSON.stringify(v)} is not one of ${PLATFORMS.join(', ')}`, command);
  return p;
}

function positionals(command: string, got: string[], names: string[]): string[] {
  if (got.length !== names.length) {
    throw usageError(`expected ${names.join(' and ')}, got ${got.length} argument(s)`, command);
  }
  const empty = got.findIndex((a) => a === '');
  if (empty >= 0) throw usageError(`${names[empty]} must not be empty`, command);
  return got.map((a) => path.resolve(a));
}

/** `initdata …` arguments (after the word `initdata`) → a typed command. Throws usage errors. */
export function parseInitdataArgs(argv: string[]): InitdataCommand {
  const [sub, ...rest] = argv;
  if (sub === '-h' || sub === '--help') return { kind: 'help', text: INITDATA_HELP };
  if (sub === undefined) throw usageError('expected a command: digest, pack, annotation or check', 'initdata');
  const help = Object.hasOwn(INITDATA_SUBCOMMAND_HELP, sub) ? INITDATA_SUBCOMMAND_HELP[sub] : undefined;
  if (help === undefined) {
    throw usageError(`unknown initdata command ${JSON.stringify(sub)} (digest, pack, annotation or check)`, 'initdata');
  }
  const command = `initdata ${sub}`;
  const h = { help: { type: 'boolean', short: 'h' } } as const;
  switch (sub) {
    case 'digest': {
      const { values, positionals: pos } = parseFlags(command, rest, {
        ...h,
        platform: { type: 'string' },
        encoding: { type: 'string' },
      });
      if (values.help === true) return { kind: 'help', text: help };
      const [file] = positionals(command, pos, ['FILE']) as [string];
      const encoding = values.encoding ?? 'hex';
      if (encoding !== 'hex' && encoding !== 'base64') {
        throw usageError(`--encoding ${JSON.stringify(encoding)} must be hex or base64`, command);
      }
      return { kind: 'digest', file, platform: platformOf(command, values.platform ?? 'none'), encoding };
    }
    case 'pack': {
      const { values, positionals: pos } = parseFlags(command, rest, { ...h, force: { type: 'boolean' } });
      if (values.help === true) return { kind: 'help', text: help };
      const [file, out] = positionals(command, pos, ['FILE', 'OUT.img']) as [string, string];
      if (file === out) throw usageError('OUT.img must not be FILE itself', command);
      return { kind: 'pack', file, out, force: values.force === true };
    }
    case 'annotation': {
      const { values, positionals: pos } = parseFlags(command, rest, h);
      if (values.help === true) return { kind: 'help', text: help };
      const [file] = positionals(command, pos, ['FILE']) as [string];
      return { kind: 'annotation', file };
    }
    default: {
      const { values, positionals: pos } = parseFlags(command, rest, {
        ...h,
        digest: { type: 'string' },
        platform: { type: 'string' },
      });
      if (values.help === true) return { kind: 'help', text: help };
      const [file] = positionals(command, pos, ['FILE']) as [string];
      if (values.digest === undefined || values.digest === '') throw usageError('--digest VALUE is required', command);
      let expected: Buffer;
      try {
        expected = parseDigestValue(values.digest);
      } catch (e) {
        throw usageError(`--digest: ${e instanceof Error ? e.message : String(e)}`, command);
      }
      const cmd: InitdataCommand = { kind: 'check', file, expected, expectedText: values.digest };
      if (values.platform !== undefined) cmd.platform = platformOf(command, values.platform);
      return cmd;
    }
  }
}

async function read(file: string): Promise<{ raw: Buffer; source: string }> {
  return readInitdata(file, { logger: silentLogger() });
}

function encode(b: Buffer, encoding: DigestEncoding): string {
  return encoding === 'hex' ? b.toString('hex') : b.toString('base64');
}

/** Run a parsed command; resolves with the exit code. Throws GuestpullError. */
export async function runInitdataCommand(cmd: InitdataCommand, stdout: NodeJS.WritableStream = process.stdout): Promise<number> {
  const print = (line: string): void => void stdout.write(`${line}\n`);
  switch (cmd.kind) {
    case 'help':
      print(cmd.text);
      return 0;
    case 'digest': {
      const { raw, source } = await read(cmd.file);
      const doc = parseInitdataDocument(raw, source);
      print(encode(fitToField(initdataDigest(raw, doc.algorithm), cmd.platform), cmd.encoding));
      return 0;
    }
    case 'annotation': {
      const { raw, source } = await read(cmd.file);
      parseInitdataDocument(raw, source);
      print(encodeAnnotation(raw));
      return 0;
    }
    case 'pack': {
      const { raw, source } = await read(cmd.file);
      parseInitdataDocument(raw, source);
      const image = packInitdataImage(raw);
      try {
        await writeFile(cmd.out, image, { flag: cmd.force ? 'w' : 'wx', mode: 0o644 });
      } catch (e) {
        const errno = (e as NodeJS.ErrnoException).code;
        if (errno === 'EEXIST') {
          throw new GuestpullError(ErrorCode.ALREADY_EXISTS, `${cmd.out} already exists; pass --force to overwrite it`, { path: cmd.out });
        }
        throw new GuestpullError(ErrorCode.INTERNAL, `cannot write ${cmd.out} (${errno ?? String(e)})`, { path: cmd.out });
      }
      return 0;
    }
    case 'check': {
      const { raw, source } = await read(cmd.file);
      const { algorithm } = parseInitdataHeader(raw, source);
      const digest = initdataDigest(raw, algorithm);
      const computed = cmd.platform === undefined ? digest : fitToField(digest, cmd.platform);
      const match = cmd.platform === undefined ? digestMatches(digest, cmd.expected) : computed.equals(cmd.expected);
      const what = cmd.platform === undefined || cmd.platform === 'none' ? algorithm : `${algorithm} fitted to ${cmd.platform}`;
      if (match) {
        print(`match: ${source} (${what} ${computed.toString('hex')}) matches the expected value`);
        return 0;
      }
      print(`mismatch: ${source} has ${what} ${computed.toString('hex')}, expected ${cmd.expected.toString('hex')}`);
      return 1;
    }
  }
}

/** `guestpull initdata …`: parse and run. */
export async function runInitdata(argv: string[], stdout: NodeJS.WritableStream = process.stdout): Promise<number> {
  return runInitdataCommand(parseInitdataArgs(argv), stdout);
}
