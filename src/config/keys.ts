/**
 * Key-path helpers for configuration diagnostics: finding keys a schema does not declare (they
 * become warnings, not errors, so a newer cdh.toml still loads) and printing dotted TOML paths.
 */
import { z } from 'zod';

/** `image.image_pull_proxy.no_proxy`, `credentials[1].path`, `a."odd key"`. */
export function formatKeyPath(segments: readonly PropertyKey[]): string {
  let out = '';
  for (const seg of segments) {
    if (typeof seg === 'number') {
      out += `[${seg}]`;
      continue;
    }
    const s = String(seg);
    const bare = /^[A-Za-z0-9_-]+$/.test(s) ? s : JSON.stringify(s);
    out += out === '' ? bare : `.${bare}`;
  }
  return out;
}

function isTable(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v) && !(v instanceof Date);
}

/**
 * Dotted paths of keys present in `value` that `schema` does not declare. Descends through
 * optional/default/nullable wrappers, pipes (their input side), objects and arrays; anything else
 * (records, unknown) is opaque.
 */
export function unknownKeys(schema: z.core.$ZodType, value: unknown, prefix: PropertyKey[] = []): string[] {
  const out: string[] = [];
  walk(schema, value, prefix, out);
  return out;
}

function walk(schema: z.core.$ZodType, value: unknown, at: PropertyKey[], out: string[]): void {
  if (schema instanceof z.ZodOptional || schema instanceof z.ZodNullable || schema instanceof z.ZodDefault) {
    walk(schema.unwrap(), value, at, out);
  } else if (schema instanceof z.ZodPipe) {
    walk(schema.in, value, at, out);
  } else if (schema instanceof z.ZodObject) {
    if (!isTable(value)) return;
    const shape: Record<string, z.core.$ZodType> = schema.shape;
    for (const [key, child] of Object.entries(value)) {
      const childSchema = shape[key];
      if (childSchema === undefined) out.push(formatKeyPath([...at, key]));
      else walk(childSchema, child, [...at, key], out);
    }
  } else if (schema instanceof z.ZodArray) {
    if (!Array.isArray(value)) return;
    value.forEach((item, i) => walk(schema.element, item, [...at, i], out));
  }
}
