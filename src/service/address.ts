/**
 * Listen addresses: `unix:///abs/path` (the kata agent's default) or TCP `host:port` /
 * `[v6]:port`. For unix sockets this also prepares the path: parent directory created 0755, a
 * stale socket left by a dead daemon removed, but never a regular file or a live socket.
 */
import { lstat, mkdir, unlink } from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { ErrorCode, GuestpullError } from '../errors.js';

export type ListenAddress =
  | { kind: 'unix'; path: string; target: string }
  | { kind: 'tcp'; host: string; port: number; target: string };

const USAGE = 'use unix:///absolute/path.sock, host:port or [ipv6]:port';

export function parseListenAddress(addr: string): ListenAddress {
  const bad = (why: string): GuestpullError =>
    new GuestpullError(ErrorCode.CONFIG, `invalid listen address ${JSON.stringify(addr)}: ${why}; ${USAGE}`, { address: addr });
  if (addr.startsWith('unix:')) {
    const p = addr.startsWith('unix://') ? addr.slice('unix://'.length) : addr.slice('unix:'.length);
    if (!path.isAbsolute(p)) throw bad('the socket path must be absolute');
    if (p.includes('\0')) throw bad('the socket path contains NUL');
    const norm = path.normalize(p);
    // sun_path is 108 bytes on Linux, including the terminating NUL.
    if (Buffer.byteLength(norm) > 107) throw bad('the socket path is longer than 107 bytes');
    return { kind: 'unix', path: norm, target: `unix://${norm}` };
  }
  const m = /^(?:\[([0-9A-Fa-f:.]+)\]|([A-Za-z0-9.-]+)):(\d{1,5})$/.exec(addr);
  if (!m) throw bad('not a unix: URL or host:port');
  const port = Number(m[3]);
  if (port > 65535) throw bad('port out of range');
  if (m[1] !== undefined) {
    if (net.isIPv6(m[1]) === false) throw bad(`${m[1]} is not an IPv6 address`);
    return { kind: 'tcp', host: m[1], port, target: `[${m[1]}]:${port}` };
  }
  const host = m[2]!;
  return { kind: 'tcp', host, port, target: `${host}:${port}` };
}

/** `host:port` with brackets for IPv6, as grpc targets and the `listening` log line use it. */
export function formatTcp(host: string, port: number): string {
  return net.isIPv6(host) ? `[${host}]:${port}` : `${host}:${port}`;
}

/** Does something accept connections on this unix socket? */
function socketIsLive(p: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.connect(p);
    const done = (live: boolean): void => {
      s.destroy();
      resolve(live);
    };
    s.once('connect', () => done(true));
    s.once('error', () => done(false));
    s.setTimeout(1000, () => done(true));
  });
}

export async function prepareUnixSocket(p: string): Promise<void> {
  const dir = path.dirname(p);
  try {
    await mkdir(dir, { recursive: true, mode: 0o755 });
  } catch (e) {
    throw new GuestpullError(
      ErrorCode.CONFIG,
      `cannot create socket directory ${dir}: ${(e as Error).message}; choose another --listen path`,
      { address: p },
      { cause: e },
    );
  }
  let isSocket: boolean;
  try {
    isSocket = (await lstat(p)).isSocket();
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return;
    throw new GuestpullError(ErrorCode.CONFIG, `cannot inspect ${p}: ${(e as Error).message}`, { address: p }, { cause: e });
  }
  if (!isSocket) {
    throw new GuestpullError(
      ErrorCode.CONFIG,
      `${p} exists and is not a unix socket; refusing to remove it. Remove it yourself or choose another --listen path`,
      { address: p },
    );
  }
  if (await socketIsLive(p)) {
    throw new GuestpullError(
      ErrorCode.CONFIG,
      `another server is already listening on ${p}; stop it or choose another --listen path`,
      { address: p },
    );
  }
  await removeSocket(p);
}

/** Remove a socket file if it is (still) a socket; missing is fine. */
export async function removeSocket(p: string): Promise<void> {
  try {
    if (!(await lstat(p)).isSocket()) return;
    await unlink(p);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e;
  }
}
