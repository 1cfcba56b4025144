/**
 * Test helper: a tiny path-rewriting reverse proxy on 127.0.0.1, shaped like a Harbor proxy
 * project. `GET /v2/` answers 200; `/v2/<project>/<rest>` is forwarded to the target registry's
 * `/v2/<rest>` (method, headers and body passed through, the response streamed back); anything
 * else is 404. Every request's method, path and whether it carried Authorization are recorded, so
 * a test can see exactly which URLs a client built.
 */
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { pipeline } from 'node:stream/promises';

export interface PathProxyOptions {
  /** The registry to forward to, e.g. 'http://127.0.0.1:5000' (plain HTTP only). */
  target: string;
  /** The project segment after /v2/, e.g. 'proxy-project'. */
  project: string;
}

export interface PathProxyRequest {
  method: string;
  /** The request path as received (with query). */
  path: string;
  authorization: boolean;
  /** What it was answered with (0 until answered). */
  status: number;
}

export interface RunningPathProxy {
  /** '127.0.0.1:PORT' */
  host: string;
  /** 'http://127.0.0.1:PORT' */
  url: string;
  /** 'http://127.0.0.1:PORT/v2/<project>': the mirror location for override-path. */
  projectUrl: string;
  requests: PathProxyRequest[];
  stop(): Promise<void>;
}

export async function startPathProxy(opts: PathProxyOptions): Promise<RunningPathProxy> {
  const target = new URL(opts.target);
  if (target.protocol !== 'http:') throw new Error('path proxy: only http:// targets');
  const prefix = `/v2/${opts.project}/`;
  const requests: PathProxyRequest[] = [];

  const server = http.createServer((req, res) => {
    const rec: PathProxyRequest = { method: req.method ?? '', path: req.url ?? '', authorization: req.headers.authorization !== undefined, status: 0 };
    requests.push(rec);
    const reply = (status: number, body: string): void => {
      rec.status = status;
      res.writeHead(status, { 'content-type': 'application/json', 'docker-distribution-api-version': 'registry/2.0' });
      res.end(body);
    };
    const p = rec.path;
    if (p === '/v2/' || p === '/v2') return reply(200, '{}');
    if (!p.startsWith(prefix)) return reply(404, JSON.stringify({ errors: [{ code: 'NAME_UNKNOWN', message: `path proxy: no project in ${p}` }] }));
    const headers = { ...req.headers, host: target.host };
    const upstream = http.request(
      { host: target.hostname, port: target.port, method: req.method, path: `/v2/${p.slice(prefix.length)}`, headers },
      (up) => {
        rec.status = up.statusCode ?? 0;
        res.writeHead(up.statusCode ?? 502, up.headers);
        pipeline(up, res).catch(() => res.destroy());
      },
    );
    upstream.on('error', (e) => {
      if (!res.headersSent) reply(502, JSON.stringify({ errors: [{ code: 'UNAVAILABLE', message: e.message }] }));
      else res.destroy();
    });
    pipeline(req, upstream).catch(() => upstream.destroy());
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve());
  });
  const port = (server.address() as AddressInfo).port;
  const url = `http://127.0.0.1:${port}`;
  let stopped: Promise<void> | undefined;
  return {
    host: `127.0.0.1:${port}`,
    url,
    projectUrl: `${url}/v2/${opts.project}`,
    requests,
    stop() {
      stopped ??= new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      });
      return stopped;
    },
  };
}
