/**
 * Test helper: the external programs the integration tests rely on, and a check that fails with
 * the Debian package to install (scripts/test.sh installs them) instead of skipping silently.
 */
import { accessSync, constants } from 'node:fs';

export const Binaries = {
  registry: { path: '/usr/bin/docker-registry', pkg: 'docker-registry' },
  htpasswd: { path: '/usr/bin/htpasswd', pkg: 'apache2-utils' },
  setpriv: { path: '/usr/bin/setpriv', pkg: 'util-linux' },
  unshare: { path: '/usr/bin/unshare', pkg: 'util-linux' },
  mount: { path: '/usr/bin/mount', pkg: 'mount' },
  skopeo: { path: '/usr/bin/skopeo', pkg: 'skopeo' },
  umoci: { path: '/usr/bin/umoci', pkg: 'umoci' },
  openssl: { path: '/usr/bin/openssl', pkg: 'openssl' },
} as const;

export type BinaryName = keyof typeof Binaries;

export function hasBinary(name: BinaryName): boolean {
  try {
    accessSync(Binaries[name].path, constants.X_OK);
    return true;
  } catch {
    return false;
  }
}

/** Throws when the program is missing, naming the Debian package that provides it. */
export function requireBinary(name: BinaryName): string {
  const b = Binaries[name];
  if (!hasBinary(name)) {
    throw new Error(`${b.path} is missing: install the Debian package '${b.pkg}' (apt-get install -y ${b.pkg}; scripts/test.sh does this)`);
  }
  return b.path;
}
