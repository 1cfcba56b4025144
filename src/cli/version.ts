/** The package version, read from package.json at run time (two levels up from src/cli or dist/cli). */
import { readFileSync } from 'node:fs';
import { z } from 'zod';

const PackageJson = z.object({ version: z.string() });

let cached: string | undefined;

export function packageVersion(): string {
  if (cached === undefined) {
    const text = readFileSync(new URL('../../package.json', import.meta.url), 'utf8');
    cached = PackageJson.parse(JSON.parse(text)).version;
  }
  return cached;
}
