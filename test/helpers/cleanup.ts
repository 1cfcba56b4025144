/**
 * Removes a test's temp tree after unmounting whatever guestpull mounted below it (overlay bundle
 * rootfs and layer-build mounts), deepest first, so `rm -rf` never hits EBUSY and no mount of a
 * test outlives it.
 */
import { rm } from 'node:fs/promises';
import { MNT_DETACH, umount } from '../../src/native/index.js';
import { mountsUnder, readMounts } from '../../src/pull/store/mountinfo.js';

export async function removeTree(dir: string): Promise<void> {
  const mounts = mountsUnder(readMounts(), dir);
  for (const m of mounts) {
    try {
      umount(m.mountPoint, MNT_DETACH);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EINVAL' && (e as NodeJS.ErrnoException).code !== 'ENOENT') throw e;
    }
  }
  await rm(dir, { recursive: true, force: true });
}
