/**
 * Where everything lives under `work_dir`, and the chain IDs that name store layers.
 *
 *   lock                         a short-lived mutex between processes sharing the work dir (./lock.ts)
 *   layers/<hex>/diff/           one unpacked layer in overlay form (whiteouts char 0:0, opaque xattr)
 *   layers/<hex>/layer.json      its record; the two are published together by one rename
 *   configs/<algo>/<hex>         image config blobs, by digest
 *   staging/<owner>-<random>/    layers being built and test mounts, by owning process; removed
 *                                once that process is gone
 *   bundles/<id>/{upper,work}    the writable part of one overlay bundle
 *   bundles/<id>.json            which bundle that is, which layers it stacks, whether it is mounted
 *
 * Layers are named by chain ID, not diff ID: a layer is unpacked on top of its parents (through an
 * overlay mount), so what lands in its directory depends on them (hard links to lower files, the
 * metadata of directories a layer creates implicitly, symlinked parents). The chain ID names
 * exactly that: ChainID(L1) = DiffID(L1); ChainID(L1..Ln) = sha256(ChainID(L1..Ln-1) + " " + DiffID(Ln))
 * (image-spec config.md).
 */
import { createHash } from 'node:crypto';
import path from 'node:path';
import { parseDigest } from '../../oci.js';

const HEX64 = /^[0-9a-f]{64}$/;
/** The record file inside a layer directory. */
export const LAYER_RECORD = 'layer.json';

/** True for the 64 lowercase hex digits of a sha256 chain ID (what store layer names are). */
export function isChainHex(s: string): boolean {
  return HEX64.test(s);
}

/**
 * Chain IDs (`sha256:<hex>`) of a stack of diff IDs, bottom first. Every diff ID is validated
 * (algorithm, lowercase hex, length) first; a sha512 diff ID still gives a sha256 chain ID.
 */
export function chainIds(diffIds: readonly string[]): string[] {
  const out: string[] = [];
  for (const d of diffIds) {
    parseDigest(d);
    const prev = out[out.length - 1];
    out.push(prev === undefined ? d : `sha256:${createHash('sha256').update(`${prev} ${d}`).digest('hex')}`);
  }
  return out;
}

/** The hex naming a chain ID's directory: the sha256 hex itself, or the sha256 of a sha512 base layer's diff ID. */
export function chainHex(chainId: string): string {
  const { algorithm, hex } = parseDigest(chainId);
  return algorithm === 'sha256' ? hex : createHash('sha256').update(chainId).digest('hex');
}

export class Layout {
  constructor(readonly root: string) {}

  get lockFile(): string {
    return path.join(this.root, 'lock');
  }
  get layersDir(): string {
    return path.join(this.root, 'layers');
  }
  layerDir(hex: string): string {
    return path.join(this.root, 'layers', hex);
  }
  /** The layer's tree: what overlay mounts stack. */
  layerDiff(hex: string): string {
    return path.join(this.root, 'layers', hex, 'diff');
  }
  layerRecord(hex: string): string {
    return path.join(this.root, 'layers', hex, LAYER_RECORD);
  }
  get configsDir(): string {
    return path.join(this.root, 'configs');
  }
  configFile(digest: string): string {
    const { algorithm, hex } = parseDigest(digest);
    return path.join(this.root, 'configs', algorithm, hex);
  }
  get stagingDir(): string {
    return path.join(this.root, 'staging');
  }
  get bundlesDir(): string {
    return path.join(this.root, 'bundles');
  }
  bundleDir(id: string): string {
    return path.join(this.root, 'bundles', id);
  }
  bundleUpper(id: string): string {
    return path.join(this.root, 'bundles', id, 'upper');
  }
  bundleRecord(id: string): string {
    return path.join(this.root, 'bundles', `${id}.json`);
  }
}
