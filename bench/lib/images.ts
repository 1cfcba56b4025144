/**
 * The benchmark images, as parameters for the generator (plan.ts): full size, and the tiny
 * `--smoke` versions that go through exactly the same code. A size class is a log-uniform range of
 * file sizes; a layer's drawn sizes are then scaled so its files sum to its byte target.
 */

export type Compression = 'gzip' | 'zstd';

export interface SizeClass {
  /** share of the layer's files */
  share: number;
  minBytes: number;
  maxBytes: number;
  /** probability that a file of this class is text (else binary) */
  text: number;
}

export interface LayerParams {
  files: number;
  /** total bytes of file content in the layer (before scaling rounding: exact) */
  bytes: number;
  /** files of lower layers replaced with new content (share of the live lower files) */
  overwrite: number;
  /** files of lower layers deleted by a whiteout (share of the live lower files) */
  whiteout: number;
}

export interface ImageParams {
  name: BenchImageName;
  seed: number;
  compression: Compression;
  /** directories in the shared tree (each layer uses a subset) */
  dirs: number;
  classes: SizeClass[];
  layers: LayerParams[];
  /** share of files that get a symlink beside them, and that get a hard link */
  symlinks: number;
  hardlinks: number;
}

export const IMAGE_NAMES = ['small', 'medium', 'large', 'medium-zstd', 'many-files'] as const;
export type BenchImageName = (typeof IMAGE_NAMES)[number];
/** The images of the `--concurrent` section. */
export const CONCURRENT_IMAGES: readonly BenchImageName[] = ['medium', 'large', 'medium-zstd', 'many-files'];

export function isImageName(s: string): s is BenchImageName {
  return (IMAGE_NAMES as readonly string[]).includes(s);
}

const KiB = 1024;
const MiB = 1024 * 1024;

/** A distribution-like mix: mostly small text files, a quarter medium, a few large binaries. */
const REALISTIC: SizeClass[] = [
  { share: 0.75, minBytes: 64, maxBytes: 16 * KiB, text: 0.75 },
  { share: 0.24, minBytes: 16 * KiB, maxBytes: 512 * KiB, text: 0.3 },
  { share: 0.01, minBytes: 1 * MiB, maxBytes: 8 * MiB, text: 0 },
];
/** Model weights, archives, toolchains: most bytes in files of 4-64 MiB. */
const LARGE_FILES: SizeClass[] = [
  { share: 0.6, minBytes: 64, maxBytes: 16 * KiB, text: 0.7 },
  { share: 0.3, minBytes: 16 * KiB, maxBytes: 512 * KiB, text: 0.2 },
  { share: 0.1, minBytes: 4 * MiB, maxBytes: 64 * MiB, text: 0 },
];
/** node_modules / site-packages: tens of thousands of small sources. */
const SMALL_FILES: SizeClass[] = [
  { share: 0.97, minBytes: 64, maxBytes: 16 * KiB, text: 0.85 },
  { share: 0.03, minBytes: 16 * KiB, maxBytes: 128 * KiB, text: 0.5 },
];

function layer(files: number, bytes: number, overwrite = 0, whiteout = 0): LayerParams {
  return { files, bytes, overwrite, whiteout };
}

function medium(name: BenchImageName, compression: Compression, files: number, bytes: number, dirs: number): ImageParams {
  // one layer spec for both compressions: `medium-zstd` has exactly `medium`'s tars
  return {
    name, seed: 7001, compression, dirs, classes: REALISTIC, symlinks: 0.02, hardlinks: 0.005,
    layers: [
      layer(Math.round(files * 0.35), Math.round(bytes * 0.3)),
      layer(Math.round(files * 0.3), Math.round(bytes * 0.35), 0.01, 0.005),
      layer(Math.round(files * 0.25), Math.round(bytes * 0.25), 0.01, 0.005),
      layer(Math.round(files * 0.1), Math.round(bytes * 0.1), 0.01, 0.005),
    ],
  };
}

/** Parameters of one image; `smoke` shrinks it to a few hundred KB and a few hundred files. */
export function imageParams(name: BenchImageName, smoke: boolean): ImageParams {
  switch (name) {
    case 'small':
      return {
        name, seed: 7000, compression: 'gzip', dirs: 20, classes: REALISTIC, symlinks: 0.03, hardlinks: 0.01,
        layers: smoke ? [layer(60, 200 * KiB)] : [layer(180, 2e6)],
      };
    case 'medium':
    case 'medium-zstd':
      // smoke: 300 files, 600 KiB over the same 4 layers
      return smoke ? medium(name, name === 'medium' ? 'gzip' : 'zstd', 300, 600 * KiB, 24) : medium(name, name === 'medium' ? 'gzip' : 'zstd', 9_000, 650e6, 700);
    case 'large':
      return {
        name, seed: 7002, compression: 'gzip', dirs: smoke ? 6 : 40, classes: LARGE_FILES, symlinks: 0.01, hardlinks: 0,
        layers: smoke ? [layer(40, 800 * KiB)] : [layer(400, 700e6)],
      };
    case 'many-files':
      return {
        name, seed: 7003, compression: 'gzip', dirs: smoke ? 16 : 2000, classes: SMALL_FILES, symlinks: 0.02, hardlinks: 0.002,
        layers: smoke ? [layer(200, 200 * KiB), layer(200, 200 * KiB, 0.02, 0.01)] : [layer(25_000, 75e6), layer(25_000, 75e6, 0.01, 0.005)],
      };
  }
}
