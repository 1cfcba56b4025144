/**
 * After a good digest check: write the raw document and the configuration files it carries where
 * the rest of the guest expects them (as the kata agent does: `<dir>/initdata.toml`, `cdh.toml`,
 * `aa.toml`, plus `policy.rego`). Directory 0700, files 0600; each file is written to a temp file in
 * the same directory, fsynced, then renamed over the target, so a reader never sees half a file.
 * A known file the new document does not carry is removed, so no stale configuration survives.
 */
import { chmod, lstat, mkdir, rm } from 'node:fs/promises';
import path from 'node:path';
import { syncDir, writeFileAtomic } from '../fsutil.js';
import { ErrorCode, GuestpullError } from '../errors.js';
import type { InitdataDocument } from './document.js';

export const DEFAULT_INITDATA_DIR = '/run/confidential-containers/initdata';
/** The `[data]` keys installed as files, by the kata agent's names. */
export const INSTALLED_DATA_KEYS = ['cdh.toml', 'aa.toml', 'policy.rego'] as const;

async function writeAtomic(dir: string, name: string, content: Buffer): Promise<string> {
  const target = path.join(dir, name);
  await writeFileAtomic(target, content, 0o600);
  return target;
}

export async function installInitdata(doc: InitdataDocument, dir: string = DEFAULT_INITDATA_DIR): Promise<string[]> {
  try {
    await mkdir(dir, { recursive: true, mode: 0o700 });
    const st = await lstat(dir);
    if (!st.isDirectory()) throw new GuestpullError(ErrorCode.CONFIG, `init-data directory ${dir} is not a directory`, { path: dir });
    await chmod(dir, 0o700);
    const written = [await writeAtomic(dir, 'initdata.toml', doc.raw)];
    for (const key of INSTALLED_DATA_KEYS) {
      const value = Object.prototype.hasOwnProperty.call(doc.data, key) ? doc.data[key] : undefined;
      if (value === undefined) await rm(path.join(dir, key), { force: true });
      else written.push(await writeAtomic(dir, key, Buffer.from(value, 'utf8')));
    }
    await syncDir(dir);
    return written;
  } catch (e) {
    if (e instanceof GuestpullError) throw e;
    throw new GuestpullError(
      ErrorCode.CONFIG,
      `cannot install init-data into ${dir}: ${(e as Error).message}; check --initdata-dir and that it is writable`,
      { path: dir },
      { cause: e },
    );
  }
}
