/**
 * Soak: counts the daemon's pino JSON log lines by `msg` as they stream past (split across
 * chunks, bounded per line and in distinct keys). The messages that mean a retry or a resume are
 * the ones src/pull/distribution/transport/index.ts (`retrying request`) and
 * src/pull/distribution/client.ts (manifest re-read, blob resume) write; if their text changes
 * there, change it here.
 */
import { z } from 'zod';

export const MSG = {
  /** Transport: a request retried after a connection error, 429 or 5xx (reason, attempt, delayMs). */
  retry: 'retrying request',
  /** Client: a manifest body broke off and is fetched again. */
  manifestRetry: 'manifest download interrupted; fetching it again',
  /** Client: a blob body broke off and the download goes on with Range (or from the start). */
  resume: 'blob download interrupted; resuming',
  /** Coalescing: a PullImage joined an identical pull in progress. */
  join: 'joining identical pull already in progress',
  /** Coalescing: every caller of a pull went away (deadline, cancel). */
  abandon: 'every caller of this pull has gone: stopping it',
  pullDone: 'PullImage done',
  pullFailed: 'PullImage failed',
} as const;

/** pino's level: a number, or its label when the logger formats it (guestpull does). */
const Line = z.object({ msg: z.string().max(500), level: z.union([z.number(), z.string().max(20)]).optional(), reason: z.string().max(500).optional() });
const ERROR_LABELS = new Set(['error', 'fatal']);

const MAX_LINE = 64 * 1024;
const MAX_KEYS = 400;
const TAIL = 30;

export class LogCounter {
  readonly byMsg = new Map<string, number>();
  /** Reasons of retries and resumes, numbers folded to "#". */
  readonly reasons = new Map<string, number>();
  lines = 0;
  /** Lines at pino level error (50, "error") or above. */
  errors = 0;
  /** The last few error lines, for the summary. */
  readonly lastErrors: string[] = [];
  unparsed = 0;
  /** The last lines of any kind (a crash's stack trace is not JSON). */
  private readonly tailLines: string[] = [];
  private rest = '';

  feed(chunk: Buffer): void {
    const text = this.rest + chunk.toString('utf8');
    const parts = text.split('\n');
    this.rest = parts.pop() ?? '';
    if (this.rest.length > MAX_LINE) this.rest = '';
    for (const p of parts) this.line(p);
  }

  /** Count what is left of a line cut by an exit. */
  flush(): void {
    if (this.rest !== '') this.line(this.rest);
    this.rest = '';
  }

  /** The last `n` lines seen, oldest first. */
  tail(n = TAIL): string[] {
    return this.tailLines.slice(-n);
  }

  count(msg: string): number {
    return this.byMsg.get(msg) ?? 0;
  }

  private bump(map: Map<string, number>, key: string): void {
    if (map.has(key) || map.size < MAX_KEYS) map.set(key, (map.get(key) ?? 0) + 1);
  }

  private line(text: string): void {
    this.tailLines.push(text.slice(0, 1000));
    if (this.tailLines.length > TAIL) this.tailLines.shift();
    if (!text.startsWith('{')) return;
    let parsed: z.infer<typeof Line>;
    try {
      const r = Line.safeParse(JSON.parse(text));
      if (!r.success) {
        this.unparsed++;
        return;
      }
      parsed = r.data;
    } catch {
      this.unparsed++;
      return;
    }
    this.lines++;
    this.bump(this.byMsg, parsed.msg);
    const level = parsed.level;
    if (typeof level === 'number' ? level >= 50 : level !== undefined && ERROR_LABELS.has(level)) {
      this.errors++;
      this.lastErrors.push(text.slice(0, 600));
      if (this.lastErrors.length > 5) this.lastErrors.shift();
    }
    if ((parsed.msg === MSG.retry || parsed.msg === MSG.manifestRetry || parsed.msg === MSG.resume) && parsed.reason !== undefined) {
      this.bump(this.reasons, parsed.reason.replace(/\d+/g, '#').slice(0, 80));
    }
  }
}
