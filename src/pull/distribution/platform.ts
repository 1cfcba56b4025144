/**
 * Platforms: the one this process runs on, normalisation of architecture/variant spellings, and
 * the choice of one manifest from an image index (os + architecture must match, the variant
 * exactly or by its normalised equivalent; attestation and platform-less entries never chosen).
 */
import type { Descriptor, Platform } from '../../oci.js';

const ARCH_BY_NODE: Record<string, string> = {
  x64: 'amd64',
  arm64: 'arm64',
  arm: 'arm',
  ia32: '386',
  ppc64: 'ppc64le',
  s390x: 's390x',
  riscv64: 'riscv64',
  loong64: 'loong64',
  mips64el: 'mips64le',
};

/** The ARM version Node was built for (process.config.variables.arm_version), if known. */
function nodeArmVersion(): string | undefined {
  const vars = process.config.variables as unknown as Record<string, unknown>;
  const v = vars['arm_version'];
  return typeof v === 'string' && /^[5-8]$/.test(v) ? v : typeof v === 'number' ? String(v) : undefined;
}

export function currentPlatform(): Platform {
  const architecture = ARCH_BY_NODE[process.arch] ?? process.arch;
  if (architecture === 'arm64') return { os: 'linux', architecture, variant: 'v8' };
  if (architecture === 'arm') return { os: 'linux', architecture, variant: `v${nodeArmVersion() ?? '7'}` };
  return { os: 'linux', architecture };
}

/** containerd-style normalisation: aliases to Go names, variants to their canonical spelling. */
export function normalizePlatform(p: Platform): { os: string; architecture: string; variant: string } {
  const os = p.os.toLowerCase();
  let architecture = p.architecture.toLowerCase();
  let variant = (p.variant ?? '').toLowerCase();
  switch (architecture) {
    case 'x86_64':
    case 'x86-64':
      architecture = 'amd64';
      break;
    case 'i386':
      architecture = '386';
      break;
    case 'aarch64':
      architecture = 'arm64';
      break;
    case 'armhf':
      architecture = 'arm';
      variant = 'v7';
      break;
    case 'armel':
      architecture = 'arm';
      variant = 'v6';
      break;
  }
  if (architecture === 'amd64' && variant === 'v1') variant = '';
  if (architecture === 'arm64' && (variant === 'v8' || variant === '8')) variant = '';
  if (architecture === 'arm') {
    if (variant === '') variant = 'v7';
    else if (/^[5-8]$/.test(variant)) variant = `v${variant}`;
  }
  return { os, architecture, variant };
}

export function formatPlatform(p: Platform): string {
  return [p.os, p.architecture, p.variant].filter((x) => x !== undefined && x !== '').join('/');
}

/** Attestations (BuildKit provenance/SBOM) live in indexes as unknown/unknown manifests. */
export function isAttestation(d: Descriptor): boolean {
  if (d.annotations?.['vnd.docker.reference.type'] === 'attestation-manifest') return true;
  return d.platform?.os === 'unknown' && d.platform.architecture === 'unknown';
}

/** The entries of an index that name a runnable platform. */
export function platformEntries(candidates: Descriptor[]): Array<Descriptor & { platform: Platform }> {
  return candidates.filter((d): d is Descriptor & { platform: Platform } => d.platform !== undefined && !isAttestation(d));
}

export function choosePlatform(candidates: Descriptor[], want: Platform): Descriptor | undefined {
  const w = normalizePlatform(want);
  const matching = platformEntries(candidates).filter((d) => {
    const n = normalizePlatform(d.platform);
    return n.os === w.os && n.architecture === w.architecture && n.variant === w.variant;
  });
  return matching.find((d) => (d.platform.variant ?? '') === (want.variant ?? '')) ?? matching[0];
}
