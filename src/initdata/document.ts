/**
 * The init-data document (kata `initdata.rs`, trustee `kbs/docs/initdata.md`): TOML with
 * `version = "0.1.0"`, `algorithm` (sha256 | sha384 | sha512, exactly these spellings) and a `[data]`
 * table of string → string.
 *
 * Two stages, on purpose: `parseInitdataHeader` is a small hand scanner that reads only the leading
 * `version` / `algorithm` assignments, so the digest can be checked before anything else of an
 * untrusted document is parsed; `parseInitdataDocument` is the full TOML parse, run only after the
 * digest matched. The header must come first: `version` and `algorithm`, in any order, before any
 * other key or table (blank lines and comments allowed).
 */
import { parse, TomlError } from 'smol-toml';
import { ErrorCode, GuestpullError } from '../errors.js';

export type InitdataAlgorithm = 'sha256' | 'sha384' | 'sha512';
export const INITDATA_ALGORITHMS: readonly InitdataAlgorithm[] = ['sha256', 'sha384', 'sha512'];
export const INITDATA_VERSION = '0.1.0';

export interface InitdataHeader {
  version: '0.1.0';
  algorithm: InitdataAlgorithm;
}

export interface InitdataDocument extends InitdataHeader {
  data: Record<string, string>;
  raw: Buffer;
}

function configError(source: string, where: string, message: string, line?: number): GuestpullError {
  return new GuestpullError(ErrorCode.CONFIG, `init-data ${source}${where}: ${message}`, {
    source,
    ...(line !== undefined ? { line } : {}),
  });
}

/** Offset of the first byte that is not valid UTF-8 (overlongs, surrogates, > U+10FFFF refused), or -1. */
export function firstInvalidUtf8(buf: Uint8Array): number {
  let i = 0;
  while (i < buf.length) {
    const b = buf[i]!;
    if (b < 0x80) {
      i++;
      continue;
    }
    let need: number;
    let min: number;
    let cp: number;
    if (b >= 0xc2 && b <= 0xdf) [need, min, cp] = [1, 0x80, b & 0x1f];
    else if (b >= 0xe0 && b <= 0xef) [need, min, cp] = [2, 0x800, b & 0x0f];
    else if (b >= 0xf0 && b <= 0xf4) [need, min, cp] = [3, 0x10000, b & 0x07];
    else return i;
    if (i + need >= buf.length) return i; // truncated sequence
    for (let k = 1; k <= need; k++) {
      const c = buf[i + k]!;
      if ((c & 0xc0) !== 0x80) return i;
      cp = (cp << 6) | (c & 0x3f);
    }
    if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return i;
    i += need + 1;
  }
  return -1;
}

function lineOfOffset(buf: Buffer, offset: number): number {
  let line = 1;
  for (let i = 0; i < offset; i++) if (buf[i] === 0x0a) line++;
  return line;
}

type Scan<T> = { ok: true; value: T; rest: string } | { ok: false; reason: string };

const BASIC_ESCAPES: Record<string, string> = { b: '\b', t: '\t', n: '\n', f: '\f', r: '\r', '"': '"', '\\': '\\' };

/** A single-line basic ("…") or literal ('…') string at the start of `s`. */
function scanString(s: string): Scan<string> {
  const q = s[0];
  if (q !== '"' && q !== "'") return { ok: false, reason: 'not a string' };
  if (s.startsWith(q.repeat(3))) return { ok: false, reason: 'must be a single-line string, not a multi-line one' };
  let out = '';
  for (let i = 1; i < s.length; i++) {
    const c = s[i]!;
    if (c === q) return { ok: true, value: out, rest: s.slice(i + 1) };
    if (q === '"' && c === '\\') {
      const e = s[i + 1] ?? '';
      if (e in BASIC_ESCAPES) {
        out += BASIC_ESCAPES[e];
        i++;
        continue;
      }
      const len = e === 'u' ? 4 : e === 'U' ? 8 : 0;
      const hex = s.slice(i + 2, i + 2 + len);
      if (len === 0 || !/^[0-9a-fA-F]+$/.test(hex) || hex.length !== len) {
        return { ok: false, reason: `invalid escape \\${e}` };
      }
      const cp = parseInt(hex, 16);
      if (cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return { ok: false, reason: `invalid escape \\${e}${hex}` };
      out += String.fromCodePoint(cp);
      i += 1 + len;
      continue;
    }
    out += c;
  }
  return { ok: false, reason: 'unterminated string' };
}

/** `key =` at the start of a line: the key (bare or quoted) and whether it is dotted. */
function scanKey(line: string): { key: string; dotted: boolean; rest: string } | undefined {
  const s = line.replace(/^[ \t]+/, '');
  let key: string;
  let rest: string;
  if (s[0] === '"' || s[0] === "'") {
    const r = scanString(s);
    if (!r.ok) return undefined;
    [key, rest] = [r.value, r.rest];
  } else {
    const m = /^[A-Za-z0-9_-]+/.exec(s);
    if (!m) return undefined;
    [key, rest] = [m[0], s.slice(m[0].length)];
  }
  rest = rest.replace(/^[ \t]+/, '');
  if (rest[0] === '.') return { key, dotted: true, rest };
  if (rest[0] !== '=') return undefined;
  return { key, dotted: false, rest: rest.slice(1).replace(/^[ \t]+/, '') };
}

/** Reads only the header; see the module comment. Errors name the line. */
export function parseInitdataHeader(raw: Buffer, source: string): InitdataHeader {
  const seen: { version?: { value: string; line: number }; algorithm?: { value: string; line: number } } = {};
  let pos = 0;
  let lineNo = 0;
  let stoppedAt: number | undefined;
  while (pos < raw.length) {
    const nl = raw.indexOf(0x0a, pos);
    const end = nl === -1 ? raw.length : nl;
    let bytes = raw.subarray(pos, end);
    if (bytes[bytes.length - 1] === 0x0d) bytes = bytes.subarray(0, bytes.length - 1);
    pos = end + 1;
    lineNo++;
    const bad = firstInvalidUtf8(bytes);
    if (bad >= 0) throw configError(source, ` line ${lineNo}`, `invalid UTF-8 (byte 0x${bytes[bad]!.toString(16)} at column ${bad + 1})`, lineNo);
    const line = bytes.toString('utf8');
    if (lineNo === 1 && line.startsWith('\uFEFF')) {
      throw configError(source, ' line 1', 'starts with a byte-order mark; save the document as UTF-8 without a BOM', 1);
    }
    const t = line.trim();
    if (t === '' || t.startsWith('#')) continue;
    const kv = t.startsWith('[') ? undefined : scanKey(line);
    if (!kv || kv.dotted || (kv.key !== 'version' && kv.key !== 'algorithm')) {
      stoppedAt = lineNo;
      break;
    }
    const prev = seen[kv.key];
    if (prev) throw configError(source, ` line ${lineNo}`, `duplicate key \`${kv.key}\` (first set on line ${prev.line})`, lineNo);
    const v = scanString(kv.rest);
    if (!v.ok) {
      const why = v.reason === 'not a string' ? 'must be a string' : v.reason;
      throw configError(source, ` line ${lineNo}`, `\`${kv.key}\` ${why}`, lineNo);
    }
    const after = v.rest.trim();
    if (after !== '' && !after.startsWith('#')) {
      throw configError(source, ` line ${lineNo}`, `unexpected text after the value of \`${kv.key}\`: ${JSON.stringify(after.slice(0, 40))}`, lineNo);
    }
    seen[kv.key] = { value: v.value, line: lineNo };
  }
  const where = stoppedAt === undefined ? 'before the end of the document' : `before line ${stoppedAt}`;
  for (const k of ['version', 'algorithm'] as const) {
    if (!seen[k]) {
      throw configError(source, '', `missing \`${k}\`: the document must start with \`version\` and \`algorithm\` (${where}, ahead of any other key or table)`, stoppedAt);
    }
  }
  const version = seen.version!;
  if (version.value !== INITDATA_VERSION) {
    throw configError(source, ` line ${version.line}`, `unsupported version ${JSON.stringify(version.value)}; only "${INITDATA_VERSION}" is supported`, version.line);
  }
  const algorithm = seen.algorithm!;
  if (!(INITDATA_ALGORITHMS as readonly string[]).includes(algorithm.value)) {
    throw configError(source, ` line ${algorithm.line}`, `unknown algorithm ${JSON.stringify(algorithm.value)}; use exactly "sha256", "sha384" or "sha512"`, algorithm.line);
  }
  return { version: INITDATA_VERSION, algorithm: algorithm.value as InitdataAlgorithm };
}

function tomlTypeName(v: unknown): string {
  if (Array.isArray(v)) return 'array';
  if (v instanceof Date) return 'date';
  if (v !== null && typeof v === 'object') return 'table';
  return typeof v === 'number' ? (Number.isInteger(v) ? 'integer' : 'float') : typeof v;
}

/** Full parse, only after the digest check. Errors name the key or the line. */
export function parseInitdataDocument(raw: Buffer, source: string): InitdataDocument {
  const header = parseInitdataHeader(raw, source);
  const bad = firstInvalidUtf8(raw);
  if (bad >= 0) {
    const line = lineOfOffset(raw, bad);
    throw configError(source, ` line ${line}`, `invalid UTF-8 (byte 0x${raw[bad]!.toString(16)})`, line);
  }
  const text = raw.toString('utf8');
  let table: Record<string, unknown>;
  try {
    table = parse(text, { maxDepth: 16, unsafeKeyBehaviour: 'throw' });
  } catch (e) {
    if (e instanceof TomlError) {
      const first = e.message.split('\n')[0]!.replace(/^Invalid TOML document: /, '');
      const offending = text.split(/\r?\n/)[e.line - 1] ?? '';
      const key = /^\s*([^=[\]#]+?)\s*=/.exec(offending)?.[1];
      const keyPart = key ? ` (key ${key})` : '';
      throw configError(source, ` line ${e.line}, column ${e.column}`, `invalid TOML: ${first}${keyPart}`, e.line);
    }
    throw configError(source, '', `invalid TOML: ${e instanceof Error ? e.message : String(e)}`);
  }
  for (const key of Object.keys(table)) {
    if (key !== 'version' && key !== 'algorithm' && key !== 'data') {
      throw configError(source, '', `unknown top-level key \`${key}\`; only version, algorithm and [data] are allowed`);
    }
  }
  if (table.version !== header.version || table.algorithm !== header.algorithm) {
    throw configError(source, '', 'the header read before the digest check does not match the parsed document; refusing it');
  }
  const dataTable = table.data;
  if (dataTable === undefined) throw configError(source, '', 'missing the [data] table');
  if (dataTable === null || typeof dataTable !== 'object' || Array.isArray(dataTable) || dataTable instanceof Date) {
    throw configError(source, '', `\`data\` must be a table of strings, got ${tomlTypeName(dataTable)}`);
  }
  const data: Record<string, string> = {};
  for (const [k, v] of Object.entries(dataTable)) {
    if (typeof v !== 'string') {
      throw configError(source, '', `data.${JSON.stringify(k)} must be a string, got ${tomlTypeName(v)}`);
    }
    Object.defineProperty(data, k, { value: v, enumerable: true, writable: true, configurable: true });
  }
  return { ...header, data, raw };
}
