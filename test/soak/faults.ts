/**
 * Soak: the rotating fault mix. `nextMix` draws, from a seeded PRNG, what the fault proxy
 * (test/helpers/fault-proxy.ts) does for the next few seconds: nothing, or one or two of cuts
 * mid-blob, resets, stalls shorter than the idle timeout (now and then a longer one that the idle
 * timeout must end), slow drips, 503/429 with Retry-After, truncated close-delimited bodies, a
 * short outage (every request reset), rarely a wrong Content-Length (DATA_LOSS, not retried).
 * Most rules fire on a few requests only (`times`), so retries and resumes get through.
 * `FaultRotation` applies one mix after the other to a running proxy and counts what fired.
 */
import type { FaultKind, FaultProxy, FaultRule } from '../helpers/fault-proxy.js';

export interface FaultMix {
  /** Short label for the log, e.g. "cut+503". */
  name: string;
  rules: FaultRule[];
  /** How long this mix stays, ms. */
  ms: number;
}

export interface MixLimits {
  /** The daemon's idle (body) timeout and headers timeout, ms: "short" stalls stay below both. */
  idleTimeoutMs: number;
  headersTimeoutMs: number;
  /** The large layer blobs: faults that act after N body bytes aim at these, not at configs and tiny layers. */
  bigBlobs: RegExp;
  /** Kinds (MIX_KINDS) never to draw. */
  without?: ReadonlySet<string>;
}

/** A regex for GET paths of these blobs in any repository. */
export function blobsRegex(digests: string[]): RegExp {
  return new RegExp(`/blobs/(${digests.map((d) => d.replace(/[^a-z0-9]/gi, (c) => `\\${c}`)).join('|')})$`);
}

const BLOBS = /\/blobs\/sha256:[0-9a-f]{64}$/;
const MANIFESTS = /\/manifests\/[^/]+$/;
const ANY = /^\//;

type Rnd = () => number;
const int = (rnd: Rnd, lo: number, hi: number): number => lo + Math.floor(rnd() * (hi - lo + 1));
const pick = <T>(rnd: Rnd, xs: readonly T[]): T => xs[Math.floor(rnd() * xs.length)]!;

type Maker = (rnd: Rnd, lim: MixLimits) => FaultRule[];

/** name, weight, rules. */
const KINDS: [string, number, Maker][] = [
  ['cut', 6, (r, l) => [{ method: 'GET', path: l.bigBlobs, times: int(r, 1, 6), fault: { kind: 'cut', afterBytes: int(r, 0, 3 * 1024 * 1024) } }]],
  ['cut-manifest', 1, (r) => [{ method: 'GET', path: MANIFESTS, times: int(r, 1, 2), fault: { kind: 'cut', afterBytes: int(r, 0, 200) } }]],
  ['reset', 2, (r) => [{ method: 'GET', path: pick(r, [BLOBS, MANIFESTS, ANY]), times: int(r, 1, 3), fault: { kind: 'reset' } }]],
  ['reset-mid', 3, (r, l) => [{ method: 'GET', path: l.bigBlobs, times: int(r, 1, 4), fault: { kind: 'reset', afterBytes: int(r, 1, 2 * 1024 * 1024) } }]],
  [
    'stall',
    3,
    (r, lim) => {
      const mid = r() < 0.6;
      const ms = int(r, 100, Math.max(150, (mid ? lim.idleTimeoutMs : Math.min(lim.idleTimeoutMs, lim.headersTimeoutMs)) - 500));
      return [{ path: mid ? lim.bigBlobs : pick(r, [BLOBS, MANIFESTS]), times: int(r, 1, 4), fault: mid ? { kind: 'stall', afterBytes: int(r, 0, 1024 * 1024), ms } : { kind: 'stall', ms } }];
    },
  ],
  ['stall-long', 1, (r, lim) => [{ path: lim.bigBlobs, times: 1, fault: { kind: 'stall', afterBytes: int(r, 1, 1024 * 1024), ms: lim.idleTimeoutMs + 1000 } }]],
  ['drip', 2, (r, l) => [{ method: 'GET', path: l.bigBlobs, times: int(r, 1, 2), fault: { kind: 'drip', bytesPerSecond: int(r, 2, 10) * 1024 * 1024 } }]],
  ['503', 2, (r) => [{ path: pick(r, [BLOBS, MANIFESTS]), times: int(r, 1, 3), fault: { kind: 'status', status: 503, retryAfter: 1 } }]],
  ['429', 1, (r) => [{ path: pick(r, [BLOBS, MANIFESTS]), times: int(r, 1, 2), fault: { kind: 'status', status: 429, retryAfter: int(r, 1, 2) } }]],
  ['truncate', 2, (r, l) => [{ method: 'GET', path: l.bigBlobs, times: int(r, 1, 3), fault: { kind: 'truncate-gzip', keepBytes: int(r, 1, 2 * 1024 * 1024) } }]],
  ['wrong-length', 0.3, () => [{ method: 'GET', path: BLOBS, times: 1, fault: { kind: 'wrong-length', delta: -100 } }]],
];

/** Every kind a mix can be made of, as --without names them. */
export const MIX_KINDS: readonly string[] = [...KINDS.map((k) => k[0]), 'outage'];

function drawKind(rnd: Rnd, lim: MixLimits): { name: string; rules: FaultRule[] } {
  const kinds = KINDS.filter(([name]) => !lim.without?.has(name));
  let x = rnd() * kinds.reduce((n, k) => n + k[1], 0);
  for (const [name, weight, make] of kinds) {
    x -= weight;
    if (x < 0) return { name, rules: make(rnd, lim) };
  }
  const last = kinds[kinds.length - 1];
  return last ? { name: last[0], rules: last[2](rnd, lim) } : { name: 'none', rules: [] };
}

/** The next mix. `first` is never "none" nor an outage, so even a short run sees faults it can get through at once. */
export function nextMix(rnd: Rnd, lim: MixLimits, first = false): FaultMix {
  const ms = int(rnd, 1500, 5000);
  const x = rnd();
  if (!first && x < 0.15) return { name: 'none', rules: [], ms };
  if (!first && x < 0.2 && !lim.without?.has('outage')) return { name: 'outage', rules: [{ path: ANY, fault: { kind: 'reset' } }], ms: int(rnd, 500, 2000) };
  const one = drawKind(rnd, lim);
  if (rnd() < 0.35) {
    const two = drawKind(rnd, lim);
    if (two.name !== 'none' && one.name !== 'none') return { name: `${one.name}+${two.name}`, rules: [...one.rules, ...two.rules], ms };
  }
  return { name: one.name, rules: one.rules, ms };
}

/** Rotates the proxy's faults (`nextMix`, from the first mix on) and keeps its counts across its cleared records. */
export class FaultRotation {
  mixes = 0;
  readonly byMix: Record<string, number> = {};
  readonly fired: Record<string, number> = {};
  requests = 0;
  rangeRequests = 0;
  private timer: NodeJS.Timeout | undefined;

  constructor(
    private readonly proxy: FaultProxy,
    private readonly rnd: Rnd,
    private readonly limits: MixLimits,
  ) {}

  start(): void {
    this.next(true);
  }

  private next(first = false): void {
    this.harvest();
    const mix = nextMix(this.rnd, this.limits, first);
    this.proxy.setRules(mix.rules);
    this.mixes++;
    this.byMix[mix.name] = (this.byMix[mix.name] ?? 0) + 1;
    this.timer = setTimeout(() => this.next(), mix.ms);
  }

  /** Add the proxy's counts to ours and clear its records (in one tick: nothing is lost in between). */
  private harvest(): void {
    const st = this.proxy.stats();
    for (const [k, n] of Object.entries(st.faultsFired) as [FaultKind, number][]) this.fired[k] = (this.fired[k] ?? 0) + n;
    this.requests += st.requests;
    this.rangeRequests += this.proxy.requests().filter((r) => r.headers['range'] !== undefined).length;
    this.proxy.clearRecords();
  }

  /** No faults from now on; the counts are final. */
  stop(): void {
    clearTimeout(this.timer);
    this.proxy.setRules([]);
    this.harvest();
  }
}
