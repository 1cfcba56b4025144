/**
 * Loads the two protocol files this daemon serves (CDH `api.proto`, gRPC `health.proto`) with
 * @grpc/proto-loader. Paths resolve relative to this module, so the same code works from src/
 * (tsx, tests) and from dist/ (the built CLI); both sit two levels below the package root.
 */
import { fileURLToPath } from 'node:url';
import type { ServiceDefinition } from '@grpc/grpc-js';
import { loadSync, type PackageDefinition } from '@grpc/proto-loader';

const PROTO_ROOT = fileURLToPath(new URL('../../protos/', import.meta.url));
const PROTO_FILES = ['confidential-data-hub/api.proto', 'grpc/health/v1/health.proto'];

/** Field names as in the .proto (`image_url`), enums as their names (`SERVING`), defaults filled. */
export const LOADER_OPTIONS = {
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
  includeDirs: [PROTO_ROOT],
};

export const SERVICE_NAMES = {
  imagePull: 'api.ImagePullService',
  sealedSecret: 'api.SealedSecretService',
  getResource: 'api.GetResourceService',
  secureMount: 'api.SecureMountService',
  health: 'grpc.health.v1.Health',
} as const;

let cached: PackageDefinition | undefined;

export function loadProtos(): PackageDefinition {
  cached ??= loadSync(PROTO_FILES, LOADER_OPTIONS);
  return cached;
}

/** The service definition for a fully-qualified service name; throws if the protos lack it. */
export function serviceDefinition(name: string): ServiceDefinition {
  const def = loadProtos()[name];
  // Message and enum definitions carry a `format` field; service definitions are method maps.
  if (def === undefined || 'format' in def) {
    throw new Error(`protocol files under ${PROTO_ROOT} do not declare service ${name}`);
  }
  return def;
}
