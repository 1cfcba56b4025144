/**
 * The gRPC server: CDH `api.ImagePullService` backed by an ImagePuller, the other three CDH
 * services answering UNIMPLEMENTED, and grpc.health.v1. Owns the listen socket (unix or TCP) and a
 * graceful stop: stop accepting, let running pulls finish within a grace period, abort the rest.
 */
import { chmod } from 'node:fs/promises';
import * as grpc from '@grpc/grpc-js';
import { ErrorCode, GuestpullError } from '../errors.js';
import type { Logger } from '../log.js';
import { formatTcp, parseListenAddress, prepareUnixSocket, removeSocket } from './address.js';
import { pullImageDeserializer, pullImageHandler, type ImagePuller, type InflightPull } from './image-pull.js';
import { healthService, unimplementedService } from './other-services.js';
import { SERVICE_NAMES, serviceDefinition } from './protos.js';

export type { ImagePuller } from './image-pull.js';
export { toGrpcStatus } from './status.js';
export { parseListenAddress } from './address.js';

export interface ServerOptions {
  /** `unix:///path` or `host:port` / `[::1]:port` (port 0 picks a free port). */
  listen: string;
  puller: ImagePuller;
  logger: Logger;
  version: string;
}

export interface RunningServer {
  /** The bound address: `unix:///path` or `host:port` with the real port. */
  address: string;
  /** Stop accepting, wait up to graceMs (default 10 s) for running pulls, then abort them. */
  stop(graceMs?: number): Promise<void>;
}

/** Requests are two short strings; anything bigger is not a CDH client. */
const MAX_RECEIVE_BYTES = 64 * 1024;
/** After aborting pulls at the end of the grace period, how long they get to unwind. */
const ABORT_UNWIND_MS = 2_000;

/** ImagePullService with PullImage's request bytes checked before decoding (./request-bytes.ts). */
function imagePullDefinition(): grpc.ServiceDefinition {
  const def = serviceDefinition(SERVICE_NAMES.imagePull);
  const method = def['PullImage'];
  if (method === undefined) throw new Error(`${SERVICE_NAMES.imagePull} has no PullImage method`);
  return { ...def, PullImage: { ...method, requestDeserialize: pullImageDeserializer(method.requestDeserialize) } };
}

function bind(server: grpc.Server, target: string): Promise<number> {
  return new Promise((resolve, reject) =>
    server.bindAsync(target, grpc.ServerCredentials.createInsecure(), (err, port) => (err ? reject(err) : resolve(port))),
  );
}

/** Resolves true when `p` settles first, false after `ms`; never leaves a timer behind. */
async function within(p: Promise<unknown>, ms: number): Promise<boolean> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<boolean>((resolve) => (timer = setTimeout(() => resolve(false), ms)));
  try {
    return await Promise.race([p.then(() => true), timeout]);
  } finally {
    clearTimeout(timer);
  }
}

export async function startServer(opts: ServerOptions): Promise<RunningServer> {
  const listen = parseListenAddress(opts.listen);
  const log = opts.logger.child({ component: 'service' });
  const inflight = new Set<InflightPull>();
  let stopping = false;

  const server = new grpc.Server({ 'grpc.max_receive_message_length': MAX_RECEIVE_BYTES });
  server.addService(imagePullDefinition(), {
    PullImage: pullImageHandler({ puller: opts.puller, logger: log, inflight, isStopping: () => stopping }),
  });
  server.addService(serviceDefinition(SERVICE_NAMES.sealedSecret), unimplementedService(SERVICE_NAMES.sealedSecret, 'UnsealSecret'));
  server.addService(serviceDefinition(SERVICE_NAMES.getResource), unimplementedService(SERVICE_NAMES.getResource, 'GetResource'));
  server.addService(serviceDefinition(SERVICE_NAMES.secureMount), unimplementedService(SERVICE_NAMES.secureMount, 'SecureMount'));
  server.addService(serviceDefinition(SERVICE_NAMES.health), healthService(() => (stopping ? 'NOT_SERVING' : 'SERVING')));

  let address: string;
  try {
    if (listen.kind === 'unix') {
      await prepareUnixSocket(listen.path);
      await bind(server, listen.target);
      await chmod(listen.path, 0o600);
      address = listen.target;
    } else {
      const port = await bind(server, listen.target);
      address = formatTcp(listen.host, port);
    }
  } catch (e) {
    server.forceShutdown();
    if (e instanceof GuestpullError) throw e;
    throw new GuestpullError(
      ErrorCode.CONFIG,
      `cannot listen on ${opts.listen}: ${(e as Error).message}; choose another --listen address`,
      { address: opts.listen },
      { cause: e },
    );
  }

  log.debug({ event: 'bound', address, version: opts.version }, 'gRPC server bound');

  let stopped: Promise<void> | undefined;
  async function stop(graceMs = 10_000): Promise<void> {
    stopping = true;
    const shutdown = new Promise<void>((resolve) => server.tryShutdown(() => resolve()));
    if (!(await within(shutdown, graceMs))) {
      log.warn({ event: 'stop', running: inflight.size, graceMs }, 'grace period over; aborting running pulls');
      const reason = new GuestpullError(ErrorCode.UNAVAILABLE, 'guestpull is shutting down; retry the pull');
      const running = [...inflight];
      for (const p of running) p.controller.abort(reason);
      await within(Promise.allSettled(running.map((p) => p.done)), ABORT_UNWIND_MS);
      server.forceShutdown();
    }
    if (listen.kind === 'unix') await removeSocket(listen.path);
    log.info({ event: 'stopped', address }, 'server stopped');
  }

  return {
    address,
    stop: (graceMs) => (stopped ??= stop(graceMs)),
  };
}
