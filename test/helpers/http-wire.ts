/**
 * Test helper: the HTTP/1.1 wire pieces of the fault proxy (./fault-proxy.ts): pull-style reads
 * over a socket with backpressure, request/response heads as ordered header lists (parsed and
 * written back byte for byte), Content-Length / chunked / connection-close framing, and a
 * never-rejecting wait for the first of some socket events.
 */
import net from 'node:net';

const READ_HIGH_WATER = 256 * 1024;

/** Ended early: the connection is gone (client or proxy closed); not an error of the proxy. */
export class Gone extends Error {}

/** Pull-style reads over a socket, with backpressure (the socket is paused while much is buffered). */
export class Reader {
  private buf: Buffer = Buffer.alloc(0);
  private ended = false;
  private failure: Error | undefined;
  private wake: (() => void) | undefined;

  constructor(private readonly socket: net.Socket) {
    socket.on('data', (d: Buffer) => {
      this.buf = this.buf.length === 0 ? d : Buffer.concat([this.buf, d]);
      if (this.buf.length > READ_HIGH_WATER) socket.pause();
      this.notify();
    });
    const end = (): void => {
      this.ended = true;
      this.notify();
    };
    socket.on('end', end);
    socket.on('close', end);
    socket.on('error', (e: Error) => {
      this.failure = e;
      end();
    });
  }

  private notify(): void {
    const w = this.wake;
    this.wake = undefined;
    w?.();
  }

  /** Wait for more data; false at end of stream. */
  private async more(): Promise<boolean> {
    if (this.ended) return false;
    this.socket.resume();
    await new Promise<void>((resolve) => (this.wake = resolve));
    return true;
  }

  private take(n: number): Buffer {
    const out = this.buf.subarray(0, n);
    this.buf = this.buf.subarray(n);
    if (this.buf.length <= READ_HIGH_WATER) this.socket.resume();
    return out;
  }

  get atEnd(): boolean {
    return this.ended && this.buf.length === 0;
  }

  /** Bytes up to and including the first `delimiter`; undefined at a clean end with nothing buffered. */
  async until(delimiter: string, max: number): Promise<Buffer | undefined> {
    for (;;) {
      const i = this.buf.indexOf(delimiter, 0, 'latin1');
      if (i >= 0) return this.take(i + delimiter.length);
      if (this.buf.length > max) throw new Error(`more than ${max} bytes without ${JSON.stringify(delimiter)}`);
      if (!(await this.more())) {
        if (this.buf.length === 0) return undefined;
        throw new Gone(`stream ended inside a head or line (${this.failure?.message ?? 'EOF'})`);
      }
    }
  }

  /** Whatever is buffered (at most `max` bytes, waiting for at least one); undefined at the end. */
  async some(max: number): Promise<Buffer | undefined> {
    while (this.buf.length === 0) if (!(await this.more())) return undefined;
    return this.take(Math.min(max, this.buf.length));
  }

  /** Exactly `n` bytes, as one or more chunks handed to `each`. */
  async exactly(n: number, each: (b: Buffer) => Promise<void>): Promise<void> {
    let left = n;
    while (left > 0) {
      const b = await this.some(left);
      if (b === undefined) throw new Gone(`stream ended ${left} bytes early (${this.failure?.message ?? 'EOF'})`);
      left -= b.length;
      await each(b);
    }
  }
}

export interface Head {
  start: string;
  headers: [string, string][];
}

export function parseHead(raw: Buffer): Head {
  const lines = raw.toString('latin1').split('\r\n');
  const start = lines.shift() ?? '';
  const headers: [string, string][] = [];
  for (const line of lines) {
    if (line === '') continue;
    const i = line.indexOf(':');
    if (i <= 0) throw new Error(`bad header line ${JSON.stringify(line.slice(0, 100))}`);
    headers.push([line.slice(0, i).trim(), line.slice(i + 1).trim()]);
  }
  return { start, headers };
}

export function header(h: Head, name: string): string | undefined {
  const vals = h.headers.filter(([n]) => n.toLowerCase() === name).map(([, v]) => v);
  return vals.length ? vals.join(', ') : undefined;
}

export function withoutHeaders(h: Head, ...names: string[]): [string, string][] {
  return h.headers.filter(([n]) => !names.includes(n.toLowerCase()));
}

export function serialize(h: Head): Buffer {
  return Buffer.from(`${h.start}\r\n${h.headers.map(([n, v]) => `${n}: ${v}\r\n`).join('')}\r\n`, 'latin1');
}

export function contentLength(h: Head): number | undefined {
  const v = header(h, 'content-length');
  return v !== undefined && /^\d+$/.test(v) ? Number(v) : undefined;
}

export function isChunked(h: Head): boolean {
  return /\bchunked\b/i.test(header(h, 'transfer-encoding') ?? '');
}

export function wantsClose(h: Head): boolean {
  return /\bclose\b/i.test(header(h, 'connection') ?? '') || /HTTP\/1\.0/.test(h.start);
}

/** Raw chunked-body bytes (framing included) through `each`, up to and including the last chunk's trailers. */
export async function chunkedBody(r: Reader, each: (b: Buffer) => Promise<void>): Promise<void> {
  for (;;) {
    const line = await r.until('\r\n', 4096);
    if (line === undefined) throw new Gone('stream ended inside a chunked body');
    await each(line);
    const size = parseInt(line.toString('latin1').split(';')[0]!.trim(), 16);
    if (!Number.isFinite(size) || size < 0) throw new Error(`bad chunk size line ${JSON.stringify(line.toString('latin1').slice(0, 40))}`);
    if (size === 0) {
      for (;;) {
        const t = await r.until('\r\n', 8192);
        if (t === undefined) throw new Gone('stream ended inside chunked trailers');
        await each(t);
        if (t.length === 2) return;
      }
    }
    await r.exactly(size + 2, each);
  }
}

/** The first of `events` on `sock` (its name), listeners removed afterwards; never rejects. */
export function firstEvent(sock: net.Socket, events: readonly string[]): Promise<string> {
  return new Promise((resolve) => {
    const handlers = events.map((ev) => [ev, () => done(ev)] as const);
    const done = (ev: string): void => {
      for (const [e, h] of handlers) sock.removeListener(e, h);
      resolve(ev);
    };
    for (const [e, h] of handlers) sock.once(e, h);
  });
}
