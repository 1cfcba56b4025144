/**
 * The guestpull CLI as a user runs it (through tsx from src/): help, version, usage and
 * configuration errors with their one stderr line and exit codes; flag parsing as pure functions;
 * `serve` from start to SIGTERM. The pull itself is integration-tested elsewhere.
 */
import { spawn, spawnSync } from 'node:child_process';
import { lstat, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { parsePullArgs } from '../../src/cli/pull.js';
import { parseServeArgs } from '../../src/cli/serve.js';
import { exitCodeFor, reportFailure } from '../../src/cli/exit-codes.js';
import { ErrorCode, GuestpullError } from '../../src/errors.js';
import { connectClient } from '../helpers/grpc-client.js';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const CLI = path.join(root, 'src', 'cli.ts');

function run(...args: string[]): { status: number | null; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, ['--import', 'tsx', CLI, ...args], { cwd: root, encoding: 'utf8', timeout: 30_000 });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

/** stderr must be exactly one `guestpull: CODE: message` line. */
function failureLine(stderr: string, code: string): string {
  const lines = stderr.split('\n').filter((l) => l !== '');
  expect(lines, stderr).toHaveLength(1);
  expect(lines[0]).toMatch(new RegExp(`^guestpull: ${code}: `));
  return lines[0]!;
}

let tmp: string;
beforeAll(async () => {
  tmp = await mkdtemp(path.join(os.tmpdir(), 'guestpull-cli-'));
});
afterAll(async () => {
  await rm(tmp, { recursive: true, force: true });
});

describe('help and version', () => {
  it('--help and help print the command list on stdout, exit 0', () => {
    for (const args of [['--help'], ['-h'], ['help']]) {
      const r = run(...args);
      expect(r.status, args.join(' ')).toBe(0);
      expect(r.stdout).toMatch(/^Usage: guestpull <command>/);
      expect(r.stdout).toMatch(/^\s+serve\s/m);
      expect(r.stdout).toMatch(/^\s+pull IMAGE BUNDLE\s/m);
      expect(r.stderr).toBe('');
    }
  });

  it('each command has --help with its options and the exit code table', () => {
    const serve = run('serve', '--help');
    expect(serve.status).toBe(0);
    expect(serve.stdout).toMatch(/^Usage: guestpull serve/);
    for (const flag of ['--config', '--listen', '--work-dir', '--log-level']) expect(serve.stdout).toContain(flag);
    const pull = run('pull', '--help');
    expect(pull.status).toBe(0);
    expect(pull.stdout).toMatch(/^Usage: guestpull pull IMAGE BUNDLE_DIR/);
    for (const n of [0, 1, 2, 3, 4, 5, 6, 7]) expect(pull.stdout).toMatch(new RegExp(`^\\s+${n}\\s+\\S`, 'm'));
    expect(run('help', 'pull').stdout).toBe(pull.stdout);
  });

  it('--version prints the package.json version', async () => {
    const pkg = JSON.parse(await readFile(path.join(root, 'package.json'), 'utf8')) as { version: string };
    const r = run('--version');
    expect(r.status).toBe(0);
    expect(r.stdout).toBe(`${pkg.version}\n`);
  });
});

describe('usage errors exit 2 with one stderr line', () => {
  it('no command prints the usage on stderr', () => {
    const r = run();
    expect(r.status).toBe(2);
    expect(r.stdout).toBe('');
    expect(r.stderr).toMatch(/^Usage: guestpull/);
  });

  it.each([
    [['frob'], /unknown command "frob"/],
    [['pull', 'only-image'], /expected IMAGE and BUNDLE_DIR, got 1/],
    [['pull', 'a', 'b', 'c'], /got 3/],
    [['pull', 'img', '/b', '--bogus'], /--bogus/],
    [['pull', 'img', '/b', '--log-level', 'loud'], /--log-level "loud"/],
    [['pull', 'img', '/b', '--config'], /--config/],
    [['serve', '--listen', 'unix://relative.sock'], /--listen: .*must be absolute/],
    [['serve', 'extra'], /unexpected argument "extra"/],
    [['help', 'frob'], /no help for "frob"/],
  ])('%j', (args, message) => {
    const r = run(...args);
    expect(r.status).toBe(2);
    expect(r.stdout).toBe('');
    expect(failureLine(r.stderr, 'INVALID_ARGUMENT')).toMatch(message);
  });
});

describe('configuration errors exit 3', () => {
  it('a missing --config file', () => {
    const missing = path.join(tmp, 'missing.toml');
    const r = run('pull', 'registry.test/a:1', path.join(tmp, 'b'), '--config', missing);
    expect(r.status).toBe(3);
    expect(failureLine(r.stderr, 'CONFIG')).toContain(missing);
  });

  it('a wrong type names the key', async () => {
    const file = path.join(tmp, 'bad.toml');
    await writeFile(file, '[image]\nmax_concurrent_layer_downloads_per_image = "many"\n');
    const r = run('serve', '--config', file);
    expect(r.status).toBe(3);
    expect(failureLine(r.stderr, 'CONFIG')).toMatch(/image\.max_concurrent_layer_downloads_per_image: expected a number/);
  });

  it('an unusable socket in cdh.toml', async () => {
    const file = path.join(tmp, 'socket.toml');
    await writeFile(file, 'socket = "relative/cdh.sock"\n');
    const r = run('serve', '--config', file);
    expect(r.status).toBe(3);
    expect(failureLine(r.stderr, 'CONFIG')).toContain('relative/cdh.sock');
  });
});

describe('flag parsing', () => {
  it('pull: resolves BUNDLE_DIR and --work-dir to absolute paths, normalises the level', () => {
    const a = parsePullArgs(['reg.test/x:1', 'bundle', '--work-dir', 'w', '--log-level', 'DEBUG', '-c', '/etc/cdh.toml']);
    expect(a).toEqual({
      help: false,
      image: 'reg.test/x:1',
      bundle: path.resolve('bundle'),
      workDir: path.resolve('w'),
      logLevel: 'debug',
      config: '/etc/cdh.toml',
    });
  });

  it('serve: keeps --listen, no defaults filled in by the parser', () => {
    expect(parseServeArgs(['--listen', '127.0.0.1:0'])).toEqual({ help: false, listen: '127.0.0.1:0' });
    expect(parseServeArgs([])).toEqual({ help: false });
    expect(parseServeArgs(['--help', 'anything'])).toMatchObject({ help: true });
  });

  it('exit codes follow the documented table', () => {
    const table: [ErrorCode, number][] = [
      [ErrorCode.INTERNAL, 1], [ErrorCode.UNIMPLEMENTED, 1], [ErrorCode.CANCELLED, 1], [ErrorCode.RESOURCE_EXHAUSTED, 1],
      [ErrorCode.INVALID_ARGUMENT, 2], [ErrorCode.INVALID_REFERENCE, 2], [ErrorCode.ALREADY_EXISTS, 2],
      [ErrorCode.CONFIG, 3], [ErrorCode.NOT_FOUND, 4], [ErrorCode.UNAVAILABLE, 5], [ErrorCode.DEADLINE_EXCEEDED, 5],
      [ErrorCode.DIGEST_MISMATCH, 6], [ErrorCode.BAD_IMAGE, 6], [ErrorCode.PERMISSION_DENIED, 7], [ErrorCode.UNAUTHENTICATED, 7],
      [ErrorCode.INITDATA_MISMATCH, 8],
    ];
    expect(new Set(table.map(([c]) => c))).toEqual(new Set(Object.values(ErrorCode)));
    for (const [code, exit] of table) expect(exitCodeFor(code), code).toBe(exit);
  });

  it('a failure is reported on one line even when the message has several', () => {
    let written = '';
    const sink = { write: (s: string) => ((written += s), true) } as unknown as NodeJS.WritableStream;
    const code = reportFailure(new GuestpullError(ErrorCode.NOT_FOUND, 'manifest unknown\n  for registry.test/a:1'), sink);
    expect(code).toBe(4);
    expect(written).toBe('guestpull: NOT_FOUND: manifest unknown for registry.test/a:1\n');
  });
});

describe('serve', () => {
  it('logs one listening line, answers health, and exits 0 on SIGTERM removing the socket', async () => {
    const socket = path.join(tmp, 'serve', 'cdh.sock');
    const child = spawn(process.execPath, ['--import', 'tsx', CLI, 'serve', '--listen', `unix://${socket}`, '--work-dir', path.join(tmp, 'work')], {
      cwd: root,
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stderr = '';
    let stdout = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    const exited = new Promise<number | null>((r) => child.on('exit', (code) => r(code)));
    try {
      const listening = await new Promise<Record<string, unknown>>((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`no listening line within 20 s:\n${stderr}`)), 20_000);
        child.stderr.on('data', (d: Buffer) => {
          stderr += d.toString();
          const line = stderr.split('\n').find((l) => l.includes('"event":"listening"'));
          if (line) {
            clearTimeout(timer);
            resolve(JSON.parse(line) as Record<string, unknown>);
          }
        });
        void exited.then((code) => reject(new Error(`serve exited with ${code}:\n${stderr}`)));
      });
      expect(listening).toMatchObject({ level: 'info', event: 'listening', address: `unix://${socket}` });
      const client = connectClient(`unix://${socket}`);
      expect(await client.health('api.ImagePullService')).toBe('SERVING');
      client.close();
    } finally {
      child.kill('SIGTERM');
    }
    expect(await exited).toBe(0);
    expect(stdout).toBe('');
    expect(stderr.split('\n').filter((l) => l.includes('"event":"listening"'))).toHaveLength(1);
    await expect(lstat(socket)).rejects.toMatchObject({ code: 'ENOENT' });
  });
});
