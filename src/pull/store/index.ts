/**
 * The work directory (`[image] work_dir`). For now it only has to exist, be private and be ours;
 * the layer store (unpacked layers keyed by diff_id) moves in here next.
 */
import { mkdir, stat } from 'node:fs/promises';
import { ErrorCode, GuestpullError } from '../../errors.js';

export async function openWorkDir(dir: string): Promise<string> {
  try {
    await mkdir(dir, { recursive: true, mode: 0o700 });
    const st = await stat(dir);
    if (!st.isDirectory()) throw new Error('not a directory');
  } catch (e) {
    throw new GuestpullError(
      ErrorCode.CONFIG,
      `cannot use work_dir ${dir}: ${(e as Error).message}; set [image] work_dir in cdh.toml or --work-dir`,
      { workDir: dir },
      { cause: e },
    );
  }
  return dir;
}
