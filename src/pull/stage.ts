/**
 * The bundle directory during a pull. Copy mode builds the rootfs in a private staging directory
 * inside the bundle and publishes it by rename, then config.json is written atomically; overlay
 * mode mounts the rootfs in place (./bundle/overlay.ts) and only needs the bundle directory. On any
 * failure everything the pull made is removed (the bundle directory too, if the pull created it),
 * so a bundle holds either nothing of ours or a complete rootfs + config.json.
 */
import { randomBytes } from 'node:crypto';
import { chmod, mkdir, rename, rm } from 'node:fs/promises';
import path from 'node:path';
import { prepareBundleDir } from './bundle/dir.js';

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
  const dirOfBundle = await prepareBundleDir(bundle);
  const dir = path.join(bundle, `.guestpull-staging-${randomBytes(6).toString('hex')}`);
  await mkdir(dir, { mode: 0o700 });
  const rootfs = path.join(dir, 'rootfs');
  await mkdir(rootfs);
  // Not subject to the umask: the same root mode an overlay bundle starts from.
  await chmod(rootfs, 0o755);
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
      await dirOfBundle.removeIfCreated();
    },
  };
}
