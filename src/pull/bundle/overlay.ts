/**
 * An overlay bundle: `<bundle>/rootfs` is an overlay mount of the image's store layers (read-only,
 * shared) below an upper and work directory of its own under `work_dir/bundles/<id>/`. The bundle
 * was leased in the store before its layers were checked (a pending record naming them); mounting
 * marks the record mounted at this rootfs, which is how garbage collection tells a live bundle from
 * one the runtime has unmounted. `undo` takes everything down again.
 */
import { mkdir, rmdir } from 'node:fs/promises';
import path from 'node:path';
import { asGuestpullError, ErrorCode, GuestpullError } from '../../errors.js';
import type { Logger } from '../../log.js';
import { unmountQuietly, type BundleLease, type Store } from '../store/index.js';
import { prepareBundleDir } from './dir.js';

export interface OverlayBundleOptions {
  store: Store;
  lease: BundleLease;
  bundle: string;
  image: string;
  logger: Logger;
}

export interface OverlayBundle {
  rootfs: string;
  /** Unmount and remove the rootfs directory (and the bundle directory, if this pull made it); safe to call more than once. */
  undo(): Promise<void>;
}

export async function mountOverlayBundle(opts: OverlayBundleOptions): Promise<OverlayBundle> {
  const { store, bundle } = opts;
  const dir = await prepareBundleDir(bundle);
  const rootfs = path.join(bundle, 'rootfs');
  let madeRootfs = false;
  let mounted = false;
  const undo = async (): Promise<void> => {
    if (mounted) unmountQuietly(rootfs);
    mounted = false;
    if (madeRootfs) await rmdir(rootfs).catch(() => undefined);
    madeRootfs = false;
    await dir.removeIfCreated();
  };
  try {
    try {
      await mkdir(rootfs, { mode: 0o755 });
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
      throw new GuestpullError(ErrorCode.ALREADY_EXISTS, `bundle ${bundle} already holds rootfs; use a fresh bundle path or remove the old bundle`, { bundle });
    }
    madeRootfs = true;
    await store.mountBundle(opts.lease, rootfs);
    mounted = true;
    opts.logger.info({ bundle, rootfs, bundleId: opts.lease.id, layers: opts.lease.layers.length }, 'rootfs mounted (overlay of the layer store)');
    return { rootfs, undo };
  } catch (e) {
    await undo().catch(() => undefined);
    if (e instanceof GuestpullError) throw e;
    const g = asGuestpullError(e);
    throw new GuestpullError(g.code, `cannot mount the overlay rootfs of bundle ${bundle} for ${opts.image}: ${g.message}`, { image: opts.image, bundle }, { cause: e });
  }
}
