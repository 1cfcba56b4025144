/**
 * The bundle directory itself during a pull: made when missing (0755, with missing parents), and
 * removed again on failure only if this pull made it.
 */
import { mkdir, rmdir } from 'node:fs/promises';

export interface BundleDir {
  bundle: string;
  /** Whether this pull created the bundle directory (and so removes it on failure). */
  created: boolean;
  /** Remove the bundle directory if this pull created it and it is empty again. */
  removeIfCreated(): Promise<void>;
}

export async function prepareBundleDir(bundle: string): Promise<BundleDir> {
  let created = false;
  try {
    await mkdir(bundle, { mode: 0o755 });
    created = true;
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'EEXIST') {
      await mkdir(bundle, { recursive: true, mode: 0o755 });
      created = true;
    }
  }
  return {
    bundle,
    created,
    async removeIfCreated() {
      if (created) await rmdir(bundle).catch(() => undefined);
    },
  };
}
