/**
 * The rest of the CDH surface: the three api services guestpull does not implement (answered
 * UNIMPLEMENTED, naming themselves) and grpc.health.v1.Health/Check.
 */
import * as grpc from '@grpc/grpc-js';
import { z } from 'zod';
import { SERVICE_NAMES } from './protos.js';

export function unimplementedService(service: string, method: string): grpc.UntypedServiceImplementation {
  const handler: grpc.handleUnaryCall<unknown, never> = (_call, callback) =>
    callback({
      code: grpc.status.UNIMPLEMENTED,
      details: `${service} is not implemented by guestpull; it only serves ${SERVICE_NAMES.imagePull}`,
    });
  return { [method]: handler };
}

const HealthCheckRequest = z.object({ service: z.string() });
type ServingStatus = 'SERVING' | 'NOT_SERVING';

/** Check: SERVING (or NOT_SERVING while stopping) for '' and the image pull service; NOT_FOUND otherwise. */
export function healthService(current: () => ServingStatus): grpc.UntypedServiceImplementation {
  const check: grpc.handleUnaryCall<unknown, { status: string }> = (call, callback) => {
    const req = HealthCheckRequest.safeParse(call.request);
    const service = req.success ? req.data.service : '';
    if (service !== '' && service !== SERVICE_NAMES.imagePull) {
      callback({ code: grpc.status.NOT_FOUND, details: `unknown service ${JSON.stringify(service)}` });
      return;
    }
    callback(null, { status: current() });
  };
  const watch: grpc.handleServerStreamingCall<unknown, { status: string }> = (call) => {
    call.emit('error', { code: grpc.status.UNIMPLEMENTED, details: 'grpc.health.v1.Health/Watch is not implemented; use Check' });
  };
  return { Check: check, Watch: watch };
}
