/**
 * Test helper: a document from `initdata-examples/` loaded the way the daemon loads it (the
 * init-data document parser, then the cdh.toml parser on `data["cdh.toml"]`), with ONLY its
 * addresses rewritten so that it points at servers on loopback.
 *
 * A rewrite is an exact-string substitution in the cdh.toml text: a proxy URL, a registry or
 * mirror host, a CA PEM block, a placeholder secret. Each `from` must occur in the example (so a
 * changed example fails loudly instead of being silently tested half), and the rewritten Config
 * must be deep-equal to the original Config with the same substitutions applied to its string
 * values: proof that the rewrite changed those strings and nothing else (no key, no flag, no
 * number, no table).
 */
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { isDeepStrictEqual } from 'node:util';
import { parseConfig, type Config, type LoadedConfig } from '../../src/config/index.js';
import { parseInitdataDocument, type InitdataDocument } from '../../src/initdata/index.js';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');

export const EXAMPLES_DIR = path.join(root, 'initdata-examples');

export interface LoadedExample {
  name: string;
  file: string;
  doc: InitdataDocument;
  /** `doc.data["cdh.toml"]`, as written. */
  cdhToml: string;
  /** The example's own configuration, unchanged. */
  loaded: LoadedConfig;
}

export interface Rewrite {
  /** Exact text in the example's cdh.toml (every occurrence is replaced). */
  from: string;
  to: string;
  /** Why, for failure messages and for the reader. */
  what: string;
}

export interface RewrittenExample {
  /** The cdh.toml text after the rewrites. */
  text: string;
  config: Config;
}

export async function loadExample(name: string): Promise<LoadedExample> {
  const file = path.join(EXAMPLES_DIR, name);
  const doc = parseInitdataDocument(await readFile(file), file);
  const cdhToml = doc.data['cdh.toml'];
  if (cdhToml === undefined) throw new Error(`${file}: no "cdh.toml" in [data]`);
  return { name, file, doc, cdhToml, loaded: parseConfig(cdhToml, `${name} cdh.toml`) };
}

function substitute(s: string, rewrites: readonly Rewrite[]): string {
  return rewrites.reduce((acc, r) => acc.split(r.from).join(r.to), s);
}

/** Apply `f` to every string in a JSON-like value (object keys included). */
function mapStrings(v: unknown, f: (s: string) => string): unknown {
  if (typeof v === 'string') return f(v);
  if (Array.isArray(v)) return v.map((x) => mapStrings(x, f));
  if (typeof v === 'object' && v !== null) {
    return Object.fromEntries(Object.entries(v).map(([k, x]) => [f(k), mapStrings(x, f)]));
  }
  return v;
}

/** The example with its addresses rewritten, parsed by the real configuration parser. */
export function rewriteExample(ex: LoadedExample, rewrites: readonly Rewrite[]): RewrittenExample {
  for (const r of rewrites) {
    if (r.from === '' || !ex.cdhToml.includes(r.from)) {
      throw new Error(`${ex.name}: the rewrite of ${r.what} expects ${JSON.stringify(r.from.slice(0, 80))} in its cdh.toml, which is not there`);
    }
    for (const other of rewrites) {
      if (other !== r && other.from.includes(r.from)) throw new Error(`${ex.name}: rewrite ${JSON.stringify(r.from)} overlaps ${JSON.stringify(other.from)}`);
    }
  }
  const text = substitute(ex.cdhToml, rewrites);
  const rewritten = parseConfig(text, `${ex.name} cdh.toml (addresses rewritten for loopback)`);
  const expected = mapStrings(ex.loaded.config, (s) => substitute(s, rewrites));
  if (!isDeepStrictEqual(rewritten.config, expected)) {
    throw new Error(
      `${ex.name}: rewriting ${rewrites.map((r) => r.what).join(', ')} changed more than those strings:\n` +
        `expected ${JSON.stringify(expected, null, 1)}\ngot ${JSON.stringify(rewritten.config, null, 1)}`,
    );
  }
  if (rewritten.warnings.length !== ex.loaded.warnings.length) {
    throw new Error(`${ex.name}: the rewrite changed the configuration warnings: ${rewritten.warnings.join('; ')}`);
  }
  return { text, config: rewritten.config };
}

/**
 * `config` with its layer store under `workDir`: the examples leave `work_dir` at the guest's
 * default (/run/kata-containers/image/), which a test on the host must not use.
 */
export function withWorkDir(config: Config, workDir: string): Config {
  // Copy mode: these tests assert per-blob registry traffic, which a layer cache would hide.
  return { ...config, image: { ...config.image, workDir, snapshotter: 'copy' } };
}

/** The one PEM certificate block in `pem` (for rewriting an example's CA by its exact text). */
export function pemBlock(pem: string): string {
  const blocks = pem.match(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g) ?? [];
  if (blocks.length !== 1) throw new Error(`expected exactly one PEM certificate block, found ${blocks.length}`);
  return blocks[0]!;
}
