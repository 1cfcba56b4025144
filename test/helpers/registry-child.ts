/**
 * Test fixture process: starts a registry, prints `READY <pid-of-registry> <temp dir>` and waits to be
 * killed. helpers.test.ts SIGKILLs it to prove the registry dies with its parent (pdeathsig).
 */
import { startRegistry } from './registry.js';

const reg = await startRegistry();
const pid = reg.pid;
process.stdout.write(`READY ${pid ?? -1} ${reg.dir}\n`);
setInterval(() => undefined, 60_000);
