/**
 * Test helper: a fault-injecting TCP proxy on 127.0.0.1 (port 0) in front of one target host:port
 * (a registry, or squid when guestpull uses it as its HTTP proxy). It parses just enough HTTP/1.1
 * to see each request (request line + headers, a Content-Length or chunked request body) and each
 * response (head, then a Content-Length, chunked, or close-delimited body), and injects one fault
 * per request matched by method + target regex (the path, or `host:port` for CONNECT), optionally
 * only for the first `times` matching requests so a retry can succeed:
 *
 *   cut            forward `afterBytes` body bytes, then destroy both sockets (FIN)
 *   stall          hold the response (before its head, or after `afterBytes` body bytes) for `ms`,
 *                  or until the client goes away when `ms` is omitted
 *   drip           forward the body at `bytesPerSecond`
 *   reset          RST the client socket (resetAndDestroy): on the request itself, before the
 *                  target is contacted (also a CONNECT), or after `afterBytes` body bytes (those
 *                  are flushed and given 20 ms to arrive first)
 *   status         answer `status` itself (optional Retry-After) without contacting the target
 *   wrong-length   rewrite Content-Length by `delta` bytes, forward the real body, then close
 *   truncate-gzip  forward only `keepBytes` of the body as a complete close-delimited response
 *                  (no Content-Length, `Connection: close`, a clean FIN)
 *
 * After a successful CONNECT the connection becomes a raw tunnel; a fault on the CONNECT then
 * applies to the tunnel's target-to-client bytes (`afterBytes` counts them). Body bytes are
 * counted as they travel on the wire (a chunked body with its framing). Everything seen is
 * recorded (requests with their headers and timings, connections with bytes and close times,
 * faults fired) for assertions; records are live objects, updated as an exchange goes on, and
 * times are `performance.now()` values of this process. The wire parsing is in ./http-wire.ts.
 */
import net from 'node:net';
import { chunkedBody, contentLength, firstEvent, Gone, isChunked, parseHead, Reader, serialize, wantsClose, withoutHeaders, type Head } from './http-wire.js';

export type Fault =
  | { kind: 'cut'; afterBytes: number }
  | { kind: 'stall'; afterBytes?: number; ms?: number }
  | { kind: 'drip'; bytesPerSecond: number }
  | { kind: 'reset'; afterBytes?: number }
  | { kind: 'status'; status: number; retryAfter?: number | string; body?: string }
  | { kind: 'wrong-length'; delta: number }
  | { kind: 'truncate-gzip'; keepBytes: number };

export type FaultKind = Fault['kind'];

export interface FaultRule {
  /** Request method (any case); every method when omitted. */
  method?: string;
  /** Tested against the request target: the path with its query, or `host:port` for CONNECT. */
  path: RegExp;
  /** Fire only on the first `times` matching requests; on every one when omitted. */
  times?: number;
  fault: Fault;
}

export interface RequestRecord {
  id: number;
  connection: number;
  method: string;
  target: string;
  /** Request headers, names lowercased (repeated ones joined with ", "). */
  headers: Record<string, string>;
  /** The status the client was sent (the injected one for `status`), once known. */
  status?: number;
  /** Response body bytes (tunnel bytes for a CONNECT) forwarded to the client. */
  bodyBytes: number;
  /** The fault of the rule this request matched (it counts towards the rule's `times`). */
  fault?: FaultKind;
  /** Whether that fault acted: a limit-based one (cut after N bytes, …) only does once N is reached. */
  faultFired?: boolean;
  receivedAt: number;
  /** When the response head went to the client. */
  respondedAt?: number;
  /** When the response (or tunnel) ended, however it ended. */
  endedAt?: number;
}

export interface ConnectionRecord {
  id: number;
  openedAt: number;
  /** When the client side closed. */
  closedAt?: number;
  /** Connections made to the target for this client connection (more than one after keep-alive drops). */
  upstreams: number;
  /** When the last target connection closed; undefined while one is open. */
  upstreamClosedAt?: number;
  upstreamOpen: boolean;
  /** Bytes written to the target / to the client. */
  bytesUp: number;
  bytesDown: number;
  requests: number[];
  /** `host:port` once this connection became a CONNECT tunnel. */
  tunnel?: string;
}

export interface FaultProxyStats {
  connectionsOpened: number;
  connectionsOpen: number;
  upstreamsOpen: number;
  requests: number;
  /** Bytes written to clients, all connections. */
  bytesForwarded: number;
  /** Faults that acted, by kind. */
  faultsFired: Partial<Record<FaultKind, number>>;
}

export interface FaultProxy {
  /** '127.0.0.1:PORT' */
  host: string;
  port: number;
  /** 'http://127.0.0.1:PORT' */
  url: string;
  /** Replace the rules (their `times` counters start again). */
  setRules(rules: FaultRule[]): void;
  requests(): RequestRecord[];
  connections(): ConnectionRecord[];
  stats(): FaultProxyStats;
  /** Forget the records (not the rules). */
  clearRecords(): void;
  /** Close every open connection (client and target side), keep listening. */
  dropConnections(): Promise<void>;
  /** Destroy every connection and stop listening. */
  close(): Promise<void>;
}

export interface FaultProxyOptions {
  /** 'host:port' of the target. */
  target: string;
  rules?: FaultRule[];
}

const MAX_HEAD = 64 * 1024;
const MAX_REQUEST_BODY = 16 * 1024 * 1024;
const DRIP_TICK_MS = 50;
/** Pause between the last bytes sent and a RST after them. */
const RESET_GRACE_MS = 20;

const REASONS: Record<number, string> = { 429: 'Too Many Requests', 500: 'Internal Server Error', 502: 'Bad Gateway', 503: 'Service Unavailable', 504: 'Gateway Timeout' };

function now(): number {
  return performance.now();
}

export async function startFaultProxy(opts: FaultProxyOptions): Promise<FaultProxy> {
  const m = /^(.+):(\d+)$/.exec(opts.target);
  if (!m) throw new Error(`startFaultProxy: target must be host:port, got ${JSON.stringify(opts.target)}`);
  const targetHost = m[1]!.replace(/^\[|\]$/g, '');
  const targetPort = Number(m[2]);
  let rules: { rule: FaultRule; fired: number }[] = [];
  const setRules = (rs: FaultRule[]): void => {
    rules = rs.map((rule) => ({ rule, fired: 0 }));
  };
  setRules(opts.rules ?? []);

  let requests: RequestRecord[] = [];
  let connections: ConnectionRecord[] = [];
  let nextRequest = 0;
  let nextConnection = 0;
  const fired: Partial<Record<FaultKind, number>> = {};
  const sockets = new Set<net.Socket>();
  let closing = false;

  /** The fault acted (not only matched): counted once per request. */
  function fire(rec: RequestRecord, fault: Fault | undefined): void {
    if (!fault || rec.faultFired) return;
    rec.faultFired = true;
    fired[fault.kind] = (fired[fault.kind] ?? 0) + 1;
  }

  function match(method: string, target: string): Fault | undefined {
    for (const r of rules) {
      const { rule } = r;
      if (rule.method !== undefined && rule.method.toUpperCase() !== method.toUpperCase()) continue;
      rule.path.lastIndex = 0;
      if (!rule.path.test(target)) continue;
      if (rule.times !== undefined && r.fired >= rule.times) continue;
      r.fired++;
      return rule.fault;
    }
    return undefined;
  }

  function handle(client: net.Socket): void {
    sockets.add(client);
    const conn: ConnectionRecord = { id: ++nextConnection, openedAt: now(), upstreams: 0, upstreamOpen: false, bytesUp: 0, bytesDown: 0, requests: [] };
    connections.push(conn);
    let upstream: { socket: net.Socket; reader: Reader } | undefined;
    let gone = false;
    let onGone: (() => void) | undefined;
    const goneP = new Promise<void>((resolve) => (onGone = resolve));
    client.on('error', () => undefined);
    client.once('close', () => {
      gone = true;
      conn.closedAt = now();
      sockets.delete(client);
      upstream?.socket.destroy();
      onGone?.();
    });
    const clientReader = new Reader(client);

    /** Wait `ms` (forever when undefined), or until the client is gone. */
    async function pause(ms: number | undefined): Promise<void> {
      if (ms === undefined) await goneP;
      else {
        let timer: NodeJS.Timeout | undefined;
        await Promise.race([goneP, new Promise<void>((r) => (timer = setTimeout(r, ms)))]);
        clearTimeout(timer);
      }
      if (gone) throw new Gone('client went away while stalled');
    }

    async function write(sock: net.Socket, data: Buffer, toClient: boolean): Promise<void> {
      if (sock.destroyed || (toClient && gone)) throw new Gone('socket closed');
      if (toClient) conn.bytesDown += data.length;
      else conn.bytesUp += data.length;
      if (sock.write(data)) return;
      await firstEvent(sock, ['drain', 'close', 'error']);
      if (sock.destroyed) throw new Gone('socket closed while writing');
    }
    const toClient = (b: Buffer): Promise<void> => write(client, b, true);

    async function connectUpstream(): Promise<{ socket: net.Socket; reader: Reader }> {
      if (upstream && !upstream.socket.destroyed && !upstream.reader.atEnd) return upstream;
      upstream?.socket.destroy();
      const socket = net.connect(targetPort, targetHost);
      sockets.add(socket);
      conn.upstreams++;
      conn.upstreamOpen = true;
      conn.upstreamClosedAt = undefined;
      socket.on('error', () => undefined);
      socket.once('close', () => {
        sockets.delete(socket);
        if (upstream?.socket === socket) {
          conn.upstreamOpen = false;
          conn.upstreamClosedAt = now();
        }
      });
      const reader = new Reader(socket);
      upstream = { socket, reader };
      if (gone) socket.destroy();
      if ((await firstEvent(socket, ['connect', 'close', 'error'])) !== 'connect') throw new Gone('the target refused or closed the connection');
      return upstream;
    }

    /** Body bytes through the fault; 'closed' when the fault ended the connection. */
    async function forwardBody(each: (sink: (b: Buffer) => Promise<void>) => Promise<void>, fault: Fault | undefined, rec: RequestRecord): Promise<'done' | 'closed'> {
      let limit = Infinity;
      if (fault?.kind === 'cut' || (fault?.kind === 'reset' && fault.afterBytes !== undefined) || (fault?.kind === 'stall' && fault.afterBytes !== undefined)) {
        limit = fault.afterBytes ?? 0;
      }
      if (fault?.kind === 'truncate-gzip') limit = fault.keepBytes;
      const slice = fault?.kind === 'drip' ? Math.max(1, Math.floor((fault.bytesPerSecond * DRIP_TICK_MS) / 1000)) : Infinity;
      if (fault?.kind === 'drip') fire(rec, fault);
      let sent = 0;
      /** Apply the fault at the limit; true when the connection is over. */
      const atLimit = async (): Promise<boolean> => {
        if (fault?.kind === 'stall') {
          fire(rec, fault);
          await pause(fault.ms);
          limit = Infinity;
          return false;
        }
        fire(rec, fault);
        upstream?.socket.destroy();
        if (fault?.kind === 'truncate-gzip') {
          client.end();
          return true;
        }
        // Everything counted as sent is handed to the kernel before the socket goes.
        await new Promise<void>((resolve) => client.write(Buffer.alloc(0), () => resolve()));
        if (fault?.kind === 'reset') {
          // A RST racing the last bytes would make the client's kernel report a plain end of
          // stream instead of the reset: give them a moment to arrive.
          await new Promise((resolve) => setTimeout(resolve, RESET_GRACE_MS));
          if (!client.destroyed) client.resetAndDestroy();
        } else {
          client.destroy();
        }
        return true;
      };
      try {
        await each(async (chunk) => {
          let rest = chunk;
          while (rest.length > 0) {
            if (sent >= limit && (await atLimit())) throw new Gone('fault ended the connection');
            const n = Math.min(rest.length, limit - sent, slice);
            await toClient(rest.subarray(0, n));
            sent += n;
            rec.bodyBytes = sent;
            rest = rest.subarray(n);
            if (fault?.kind === 'drip') await pause((n * 1000) / fault.bytesPerSecond);
          }
        });
      } catch (e) {
        if (e instanceof Gone && (gone || client.destroyed || client.writableEnded)) return 'closed';
        throw e;
      }
      if (sent >= limit && limit !== Infinity && (await atLimit())) return 'closed';
      return 'done';
    }

    async function tunnel(rec: RequestRecord, fault: Fault | undefined): Promise<void> {
      const up = upstream!;
      const upward = (async () => {
        for (;;) {
          const b = await clientReader.some(64 * 1024);
          if (b === undefined) break;
          await write(up.socket, b, false);
        }
        up.socket.end();
      })();
      const downward = forwardBody(async (sink) => {
        for (;;) {
          const b = await up.reader.some(64 * 1024);
          if (b === undefined) break;
          await sink(b);
        }
      }, fault, rec).then((outcome) => {
        if (outcome === 'done') client.end();
      });
      await Promise.allSettled([upward, downward]);
    }

    async function serve(): Promise<void> {
      for (;;) {
        const raw = await clientReader.until('\r\n\r\n', MAX_HEAD);
        if (raw === undefined) return;
        const head = parseHead(raw);
        const [method = '', target = ''] = head.start.split(' ');
        const headers: Record<string, string> = {};
        for (const [n, v] of head.headers) headers[n.toLowerCase()] = headers[n.toLowerCase()] === undefined ? v : `${headers[n.toLowerCase()]}, ${v}`;
        const rec: RequestRecord = { id: ++nextRequest, connection: conn.id, method, target, headers, bodyBytes: 0, receivedAt: now() };
        requests.push(rec);
        conn.requests.push(rec.id);
        const body: Buffer[] = [];
        const collect = async (b: Buffer): Promise<void> => {
          body.push(b);
          if (body.reduce((n, x) => n + x.length, 0) > MAX_REQUEST_BODY) throw new Error('request body too large for the fault proxy');
        };
        const reqLength = contentLength(head);
        if (isChunked(head)) await chunkedBody(clientReader, collect);
        else if (reqLength !== undefined) await clientReader.exactly(reqLength, collect);

        let fault = match(method, target);
        if (fault) rec.fault = fault.kind;
        try {
          if (fault?.kind === 'reset' && fault.afterBytes === undefined) {
            fire(rec, fault);
            upstream?.socket.destroy();
            client.resetAndDestroy();
            return;
          }
          if (fault?.kind === 'status') {
            fire(rec, fault);
            const text = fault.body ?? JSON.stringify({ errors: [{ code: 'UNAVAILABLE', message: `fault proxy: injected HTTP ${fault.status}` }] });
            const res: Head = {
              start: `HTTP/1.1 ${fault.status} ${REASONS[fault.status] ?? 'Injected'}`,
              headers: [
                ['Content-Type', 'application/json'],
                ['Content-Length', String(Buffer.byteLength(text))],
                ...(fault.retryAfter !== undefined ? ([['Retry-After', String(fault.retryAfter)]] as [string, string][]) : []),
              ],
            };
            rec.status = fault.status;
            await toClient(serialize(res));
            rec.respondedAt = now();
            await toClient(Buffer.from(text));
            rec.bodyBytes = Buffer.byteLength(text);
            if (wantsClose(head)) {
              client.end();
              return;
            }
            continue;
          }
          const up = await connectUpstream();
          await write(up.socket, raw, false);
          for (const b of body) await write(up.socket, b, false);
          const resRaw = await up.reader.until('\r\n\r\n', MAX_HEAD);
          if (resRaw === undefined) throw new Gone('the target closed without answering');
          const res = parseHead(resRaw);
          const status = Number(res.start.split(' ')[1]);
          rec.status = status;
          const isConnect = method.toUpperCase() === 'CONNECT';
          const noBody = method.toUpperCase() === 'HEAD' || (status >= 100 && status < 200) || status === 204 || status === 304 || (isConnect && status >= 200 && status < 300);
          const length = contentLength(res);
          const chunked = isChunked(res);
          // Rewriting a length needs one; truncating needs a body the proxy can re-frame.
          if ((fault?.kind === 'wrong-length' && length === undefined) || (fault?.kind === 'truncate-gzip' && (noBody || chunked))) fault = undefined;
          let out = res;
          let closeAfter = wantsClose(head) || wantsClose(res) || (!noBody && !chunked && length === undefined);
          if (fault?.kind === 'wrong-length' && length !== undefined) {
            fire(rec, fault);
            out = { start: res.start, headers: [...withoutHeaders(res, 'content-length'), ['Content-Length', String(Math.max(0, length + fault.delta))]] };
            closeAfter = true;
          }
          if (fault?.kind === 'truncate-gzip') {
            out = { start: res.start, headers: [...withoutHeaders(res, 'content-length', 'transfer-encoding', 'connection'), ['Connection', 'close']] };
            closeAfter = true;
          }
          if (fault?.kind === 'stall' && fault.afterBytes === undefined) {
            fire(rec, fault);
            await pause(fault.ms);
          }
          await toClient(serialize(out));
          rec.respondedAt = now();
          if (isConnect && status >= 200 && status < 300) {
            conn.tunnel = target;
            await tunnel(rec, fault);
            return;
          }
          const outcome = noBody
            ? 'done'
            : await forwardBody(async (sink) => {
                if (chunked) await chunkedBody(up.reader, sink);
                else if (length !== undefined) await up.reader.exactly(length, sink);
                else for (let b = await up.reader.some(64 * 1024); b !== undefined; b = await up.reader.some(64 * 1024)) await sink(b);
              }, fault, rec);
          if (outcome === 'closed') return;
          if (closeAfter) {
            client.end();
            up.socket.destroy();
            return;
          }
        } finally {
          rec.endedAt = now();
        }
      }
    }

    serve()
      .catch(() => undefined)
      .finally(() => {
        // Whatever ended the exchange, nothing more moves on this connection. A clean end (FIN)
        // is left to flush; everything else goes at once.
        if (!client.writableEnded) client.destroy();
        upstream?.socket.destroy();
      });
  }

  const server = net.createServer(handle);
  server.on('error', () => undefined);
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve());
  });
  const port = (server.address() as net.AddressInfo).port;

  return {
    host: `127.0.0.1:${port}`,
    port,
    url: `http://127.0.0.1:${port}`,
    setRules,
    requests: () => requests.slice(),
    connections: () => connections.slice(),
    stats: () => ({
      connectionsOpened: connections.length,
      connectionsOpen: connections.filter((c) => c.closedAt === undefined).length,
      upstreamsOpen: connections.filter((c) => c.upstreamOpen).length,
      requests: requests.length,
      bytesForwarded: connections.reduce((n, c) => n + c.bytesDown, 0),
      faultsFired: { ...fired },
    }),
    clearRecords: () => {
      requests = [];
      connections = connections.filter((c) => c.closedAt === undefined);
      for (const k of Object.keys(fired) as FaultKind[]) delete fired[k];
    },
    async dropConnections() {
      const all = [...sockets];
      const gone = all.map((s) => firstEvent(s, ['close']));
      for (const s of all) s.destroy();
      await Promise.all(gone);
    },
    async close() {
      if (closing) return;
      closing = true;
      const closed = new Promise<void>((resolve) => server.close(() => resolve()));
      const all = [...sockets];
      const gone = all.map((s) => firstEvent(s, ['close']));
      for (const s of all) s.destroy();
      await Promise.all([closed, ...gone]);
    },
  };
}
