/**
 * Bundle staging: the rootfs is built in a private directory inside the bundle and published by
 * rename, then config.json is written atomically. On any failure the staging directory (and a
 * bundle directory this pull created) is removed, so a bundle holds either nothing of ours or a
 * complete rootfs + config.json.
 */
import { randomBytes } from 'node:crypto';
import { mkdir, rename, rm, rmdir } from 'node:fs/promises';
import path from 'node:path';

export interface Staging {
  bundle: string;
  /** The staging rootfs: layers are applied here. */
  rootfs: string;
  /** Move the staging rootfs to `<bundle>/rootfs`. */
  publishRootfs(): Promise<string>;
  /** Remove everything this staging created; safe to call more than once. */
  discard(): Promise<void>;
}

export async function createStaging(bundle: string): Promise<Staging> {
  let createdBundle = false;
  try {
    await mkdir(bundle, { mode: 0o755 });
    createdBundle = true;
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'EEXIST') {
      await mkdir(bundle, { recursive: true, mode: 0o755 });
      createdBundle = true;
    }
  }
  const dir = path.join(bundle, `.guestpull-staging-${randomBytes(6).toString('hex')}`);
  await mkdir(dir, { mode: 0o700 });
  const rootfs = path.join(dir, 'rootfs');
  await mkdir(rootfs, { mode: 0o755 });
  let published: string | undefined;
  return {
    bundle,
    rootfs,
    async publishRootfs() {
      const target = path.join(bundle, 'rootfs');
      await rename(rootfs, target);
      published = target;
      await rm(dir, { recursive: true, force: true });
      return target;
    },
    async discard() {
      await rm(dir, { recursive: true, force: true });
      if (published) await rm(published, { recursive: true, force: true });
      published = undefined;
      if (createdBundle) await rmdir(bundle).catch(() => undefined);
    },
  };
}
