/**
 * The work dir: the layer store (layers by chain ID, image configs by digest, overlay bundle
 * records), its lock, start-up cleanup and garbage collection. See ./store.ts and ./layout.ts.
 */
export { Store, type BundleLease, type BundleMode, type LayerSpec, type StoreOptions, type UnpackHooks, type UnpackResult } from './store.js';
export { bundleLive, collectGarbage, validLayer, type GcOptions, type GcReport } from './cleanup.js';
export { chainHex, chainIds, Layout } from './layout.js';
export { unmountQuietly } from './overlay.js';
export { isOverlayMounted, readMounts } from './mountinfo.js';
export { gcWorkDir, type GcWorkDirOptions } from './gc.js';
export {
  formatFsckReport, fsckStore, fsckWorkDir, summarizeTree, summarizeTreeWithContent,
  type FsckKind, type FsckOptions, type FsckProblem, type FsckReport, type FsckWorkDirOptions, type TreeSummary,
} from './fsck.js';
