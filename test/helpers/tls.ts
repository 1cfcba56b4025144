/**
 * Test helper: certificates made by `openssl` at test time, in a temp dir. A private CA and a
 * server certificate it signs (SAN IP:127.0.0.1 and DNS:localhost by default), and a self-signed
 * leaf with `CA:TRUE` used directly as a server certificate (what many self-hosted registries
 * have, and what webpki-based TLS stacks reject). EC P-256 keys, valid two days; each certificate
 * has its own openssl config file, so the host's openssl.cnf plays no part.
 */
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { requireBinary } from './binaries.js';

export interface CertFiles {
  certFile: string;
  keyFile: string;
  /** PEM text of the certificate. */
  cert: string;
  /** PEM text of the private key. */
  key: string;
}

export interface Pki {
  dir: string;
  ca: CertFiles;
  /** Signed by `ca`, for 127.0.0.1 and localhost. */
  server: CertFiles;
  /** Self-signed, CA:TRUE, serverAuth, for 127.0.0.1 and localhost. */
  selfSignedCaLeaf: CertFiles;
  cleanup(): void;
}

const DEFAULT_HOSTS = ['127.0.0.1', 'localhost'];

function openssl(args: string[]): void {
  execFileSync(requireBinary('openssl'), args, { stdio: ['ignore', 'ignore', 'pipe'] });
}

function sanList(hosts: string[]): string {
  return hosts.map((h) => (net.isIP(h) ? `IP:${h}` : `DNS:${h}`)).join(',');
}

function configFile(dir: string, name: string, cn: string, ext: string[]): string {
  const file = path.join(dir, `${name}.cnf`);
  writeFileSync(
    file,
    ['[req]', 'prompt = no', 'distinguished_name = dn', 'x509_extensions = ext', '[dn]', `CN = ${cn}`, '[ext]', ...ext, ''].join('\n'),
  );
  return file;
}

function files(dir: string, name: string): CertFiles {
  const certFile = path.join(dir, `${name}.pem`);
  const keyFile = path.join(dir, `${name}.key`);
  return { certFile, keyFile, cert: readFileSync(certFile, 'utf8'), key: readFileSync(keyFile, 'utf8') };
}

function selfSigned(dir: string, name: string, cn: string, ext: string[]): CertFiles {
  const cnf = configFile(dir, name, cn, ext);
  openssl([
    'req', '-x509', '-config', cnf, '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
    '-keyout', path.join(dir, `${name}.key`), '-out', path.join(dir, `${name}.pem`), '-days', '2',
    '-set_serial', `0x${randomBytes(8).toString('hex')}`,
  ]);
  return files(dir, name);
}

/** A private root CA. */
export function makeCa(dir: string, name: string, cn = `guestpull test CA ${name}`): CertFiles {
  return selfSigned(dir, name, cn, [
    'basicConstraints = critical, CA:TRUE',
    'keyUsage = critical, keyCertSign, cRLSign',
    'subjectKeyIdentifier = hash',
  ]);
}

/** A server certificate for `hosts`, signed by `ca`. */
export function issueServerCert(ca: CertFiles, dir: string, name: string, hosts: string[] = DEFAULT_HOSTS): CertFiles {
  const ext = [
    'basicConstraints = critical, CA:FALSE',
    'keyUsage = critical, digitalSignature',
    'extendedKeyUsage = serverAuth',
    `subjectAltName = ${sanList(hosts)}`,
    'authorityKeyIdentifier = keyid',
  ];
  const cnf = configFile(dir, name, hosts[0] ?? 'localhost', ext);
  const csr = path.join(dir, `${name}.csr`);
  openssl(['req', '-new', '-config', cnf, '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', path.join(dir, `${name}.key`), '-out', csr]);
  openssl([
    'x509', '-req', '-in', csr, '-CA', ca.certFile, '-CAkey', ca.keyFile, '-set_serial', `0x${randomBytes(8).toString('hex')}`,
    '-days', '2', '-extfile', cnf, '-extensions', 'ext', '-out', path.join(dir, `${name}.pem`),
  ]);
  return files(dir, name);
}

/** A self-signed certificate with CA:TRUE that is also the server's own (leaf) certificate. */
export function selfSignedCaLeaf(dir: string, name: string, hosts: string[] = DEFAULT_HOSTS): CertFiles {
  return selfSigned(dir, name, hosts[0] ?? 'localhost', [
    'basicConstraints = critical, CA:TRUE',
    'keyUsage = critical, digitalSignature, keyCertSign',
    'extendedKeyUsage = serverAuth',
    `subjectAltName = ${sanList(hosts)}`,
    'subjectKeyIdentifier = hash',
  ]);
}

/** A CA, a server certificate from it and a self-signed CA leaf, in a fresh temp dir. */
export function createPki(prefix = 'guestpull-pki-'): Pki {
  const dir = mkdtempSync(path.join(os.tmpdir(), prefix));
  try {
    const ca = makeCa(dir, 'ca');
    return {
      dir,
      ca,
      server: issueServerCert(ca, dir, 'server'),
      selfSignedCaLeaf: selfSignedCaLeaf(dir, 'self-signed-ca-leaf'),
      cleanup: () => rmSync(dir, { recursive: true, force: true }),
    };
  } catch (e) {
    rmSync(dir, { recursive: true, force: true });
    throw e;
  }
}
