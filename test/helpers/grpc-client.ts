/**
 * A small typed gRPC client for the daemon's surface (CDH api.proto + grpc health), for
 * integration tests and the demo. Failures reject with the grpc-js ServiceError (code, details).
 */
import * as grpc from '@grpc/grpc-js';
import { z } from 'zod';
import { SERVICE_NAMES, serviceDefinition } from '../../src/service/protos.js';

export interface PullClient {
  pullImage(imageUrl: string, bundlePath: string, opts?: { deadlineMs?: number }): Promise<{ manifest_digest: string }>;
  /** grpc.health.v1 Check: 'SERVING', 'NOT_SERVING', ... */
  health(service?: string): Promise<string>;
  /** Call one of the services guestpull does not implement, with an empty request. */
  call(service: 'SealedSecretService' | 'GetResourceService' | 'SecureMountService'): Promise<never>;
  close(): void;
}

const ImagePullResponse = z.object({ manifest_digest: z.string() });
const HealthCheckResponse = z.object({ status: z.string() });

const UNIMPLEMENTED_METHODS = {
  SealedSecretService: { service: SERVICE_NAMES.sealedSecret, method: 'UnsealSecret' },
  GetResourceService: { service: SERVICE_NAMES.getResource, method: 'GetResource' },
  SecureMountService: { service: SERVICE_NAMES.secureMount, method: 'SecureMount' },
} as const;

export function connectClient(address: string): PullClient {
  const client = new grpc.Client(address, grpc.credentials.createInsecure());

  function unary(service: string, method: string, request: object, deadlineMs?: number): Promise<unknown> {
    const def = serviceDefinition(service)[method];
    if (!def) throw new Error(`${service} has no method ${method}`);
    const options: grpc.CallOptions = deadlineMs === undefined ? {} : { deadline: Date.now() + deadlineMs };
    return new Promise((resolve, reject) => {
      client.makeUnaryRequest(
        def.path,
        def.requestSerialize,
        def.responseDeserialize,
        request,
        new grpc.Metadata(),
        options,
        (err: grpc.ServiceError | null, value?: unknown) => (err ? reject(err) : resolve(value)),
      );
    });
  }

  return {
    async pullImage(imageUrl, bundlePath, opts = {}) {
      const res = await unary(SERVICE_NAMES.imagePull, 'PullImage', { image_url: imageUrl, bundle_path: bundlePath }, opts.deadlineMs);
      return ImagePullResponse.parse(res);
    },
    async health(service = '') {
      return HealthCheckResponse.parse(await unary(SERVICE_NAMES.health, 'Check', { service })).status;
    },
    async call(which) {
      const { service, method } = UNIMPLEMENTED_METHODS[which];
      await unary(service, method, {});
      throw new Error(`${service}/${method} unexpectedly succeeded`);
    },
    close() {
      client.close();
    },
  };
}
