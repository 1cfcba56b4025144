/**
 * Soak: the command line of test/soak/soak.ts (scripts/soak.sh passes its arguments through),
 * parsed with node:util parseArgs and checked with zod, so a typo is an error naming the flag.
 */
import { parseArgs } from 'node:util';
import { z } from 'zod';
import { MIX_KINDS } from './faults.js';

export const SNAPSHOTTERS = ['auto', 'copy', 'overlay'] as const;
export type Snapshotter = (typeof SNAPSHOTTERS)[number];

export interface SoakOptions {
  /** Length of the run in seconds (--minutes N or --seconds N; default 10 minutes). */
  seconds: number;
  concurrency: number;
  /** SIGKILL + restart the daemon every this many seconds; 0 = never. */
  killEverySecs: number;
  /** Run `guestpull gc --drop-unused` beside the daemon every this many seconds (0 = never): layers leave the store, pulls fetch again. */
  gcEverySecs: number;
  /** Push a new generation of every image (all chain IDs new) every this many seconds; 0 = never. */
  newImagesEverySecs: number;
  /** Fault kinds left out of the mix (faults.ts MIX_KINDS). */
  without: string[];
  /** Share of client rounds that pull an image pushed just for them (every layer fetched). */
  cold: number;
  seed: number;
  snapshotter: Snapshotter;
  /** Check the tree of every Nth OK bundle (1 = all). */
  verifyEvery: number;
  /** Image sizes relative to the default set (1 = a few MB to ~50 MB). */
  scale: number;
  /** Client deadline of an ordinary pull, seconds. */
  deadlineSecs: number;
  /** Write the summary JSON here. */
  json?: string;
  /** Write the daemon's log here (default: inside the run directory, copied out only on failure). */
  log?: string;
  /** Keep the run directory (work dir, bundles, logs). */
  keep: boolean;
  /** Self-test: change one file of every bundle about to be verified; the run must then fail. */
  tamper: boolean;
}

export const USAGE = `usage: scripts/soak.sh [options]
  --minutes N         run for N minutes (default 10)
  --seconds N         run for N seconds (instead of --minutes)
  --concurrency C     concurrent clients (default 8)
  --kill-every S      SIGKILL and restart the daemon every S seconds (default 0 = never)
  --gc-every S        run "guestpull gc --drop-unused" every S seconds (default 10, 0 = never)
  --new-images-every S  push a new generation of every image every S seconds, so that layers are
                      fetched and unpacked again (default 10, 0 = never)
  --cold F            share of client rounds that first push an image of their own (a new bottom
                      layer) and pull that: every layer fetched (default 0.25)
  --without K,K…      leave these fault kinds out of the mix; kinds:
                      ${MIX_KINDS.join(', ')}
  --seed N            seed of the fault schedule and the clients' choices (default: random, printed)
  --snapshotter M     auto | copy | overlay (default auto)
  --verify-every N    check the rootfs tree of every Nth OK bundle (default 3; 1 = all)
  --scale F           image sizes relative to the default set, 0.02..4 (default 1: ~1.5 MB to ~46 MB)
  --deadline S        client deadline of an ordinary pull (default 60)
  --json FILE         also write the summary as JSON to FILE
  --log FILE          write the daemon's log to FILE (default: kept only when the run fails)
  --keep              keep the run directory
  --tamper            self-test: corrupt each bundle before verifying it (the run must fail)
`;

const num = (flag: string, min: number, max: number, int = true) =>
  z.coerce
    .number({ error: `${flag}: expected a number` })
    .refine((n) => Number.isFinite(n) && (!int || Number.isInteger(n)), `${flag}: expected ${int ? 'an integer' : 'a number'}`)
    .refine((n) => n >= min && n <= max, `${flag}: expected ${min}..${max}`);

const Raw = z.object({
  minutes: num('--minutes', 0.05, 24 * 60, false).optional(),
  seconds: num('--seconds', 1, 24 * 3600, false).optional(),
  concurrency: num('--concurrency', 1, 64).default(8),
  'kill-every': num('--kill-every', 0, 24 * 3600, false).default(0),
  'gc-every': num('--gc-every', 0, 24 * 3600, false).default(10),
  cold: num('--cold', 0, 1, false).default(0.25),
  'new-images-every': num('--new-images-every', 0, 24 * 3600, false).default(10),
  without: z
    .string()
    .transform((v) => v.split(',').map((k) => k.trim()).filter((k) => k !== ''))
    .refine((ks) => ks.every((k) => MIX_KINDS.includes(k)), `--without: expected fault kinds from ${MIX_KINDS.join(', ')}`)
    .default([]),
  seed: num('--seed', 0, 2 ** 32 - 1).optional(),
  snapshotter: z.enum(SNAPSHOTTERS, { error: '--snapshotter: expected auto, copy or overlay' }).default('auto'),
  'verify-every': num('--verify-every', 1, 1_000_000).default(3),
  scale: num('--scale', 0.02, 4, false).default(1),
  deadline: num('--deadline', 1, 3600, false).default(60),
  json: z.string().min(1).optional(),
  log: z.string().min(1).optional(),
  keep: z.boolean().default(false),
  tamper: z.boolean().default(false),
  help: z.boolean().default(false),
});

/** The options, or 'help'. Throws an Error whose message names the bad flag. */
export function parseSoakArgs(argv: string[], randomSeed: () => number): SoakOptions | 'help' {
  const { values, positionals } = parseArgs({
    args: argv,
    strict: true,
    allowPositionals: true,
    options: {
      minutes: { type: 'string' },
      seconds: { type: 'string' },
      concurrency: { type: 'string' },
      'kill-every': { type: 'string' },
      'gc-every': { type: 'string' },
      'new-images-every': { type: 'string' },
      cold: { type: 'string' },
      without: { type: 'string' },
      seed: { type: 'string' },
      snapshotter: { type: 'string' },
      'verify-every': { type: 'string' },
      scale: { type: 'string' },
      deadline: { type: 'string' },
      json: { type: 'string' },
      log: { type: 'string' },
      keep: { type: 'boolean' },
      tamper: { type: 'boolean' },
      help: { type: 'boolean', short: 'h' },
    },
  });
  if (positionals.length > 0) throw new Error(`unexpected argument ${JSON.stringify(positionals[0])}`);
  const parsed = Raw.safeParse(values);
  if (!parsed.success) throw new Error(parsed.error.issues.map((i) => i.message).join('; '));
  const r = parsed.data;
  if (r.help) return 'help';
  if (r.minutes !== undefined && r.seconds !== undefined) throw new Error('--minutes and --seconds: give one of them');
  return {
    seconds: r.seconds ?? (r.minutes ?? 10) * 60,
    concurrency: r.concurrency,
    killEverySecs: r['kill-every'],
    gcEverySecs: r['gc-every'],
    newImagesEverySecs: r['new-images-every'],
    cold: r.cold,
    without: r.without,
    seed: r.seed ?? randomSeed(),
    snapshotter: r.snapshotter,
    verifyEvery: r['verify-every'],
    scale: r.scale,
    deadlineSecs: r.deadline,
    ...(r.json !== undefined ? { json: r.json } : {}),
    ...(r.log !== undefined ? { log: r.log } : {}),
    keep: r.keep,
    tamper: r.tamper,
  };
}
