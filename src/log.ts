/**
 * The one logger factory. JSON lines via pino, one event per step with `image`, `layer`, `bytes`,
 * `ms`. Secrets are redacted here, by path, so callers never have to remember to.
 */
import { pino, type Logger, type DestinationStream } from 'pino';

export type { Logger };

/** Paths pino censors wherever they appear in a log event. */
export const REDACT_PATHS = [
  'authorization',
  'Authorization',
  'password',
  'token',
  'auth',
  'identitytoken',
  'proxyAuthorization',
  '*.authorization',
  '*.Authorization',
  '*.password',
  '*.token',
  '*.auth',
  '*.identitytoken',
  '*.proxyAuthorization',
  'headers.authorization',
  'headers["proxy-authorization"]',
  'credentials',
  '*.credentials',
];

export interface LoggerOptions {
  level?: string;
  /** Where to write; defaults to stderr (stdout belongs to command output such as a digest). */
  destination?: DestinationStream;
}

export function createLogger(opts: LoggerOptions = {}): Logger {
  return pino(
    {
      name: 'guestpull',
      level: opts.level ?? 'info',
      base: { pid: process.pid },
      redact: { paths: REDACT_PATHS, censor: '[redacted]' },
      timestamp: pino.stdTimeFunctions.isoTime,
      formatters: { level: (label) => ({ level: label }) },
    },
    opts.destination ?? pino.destination({ fd: 2, sync: true }),
  );
}

/** A logger that drops everything; for unit tests and library callers that do not want logs. */
export function silentLogger(): Logger {
  return pino({ level: 'silent' });
}

/** Strip userinfo (user:pass@) from a URL before it goes into a message or log line. */
export function redactUrl(url: string): string {
  try {
    const u = new URL(url);
    if (u.username || u.password) {
      u.username = u.username ? '***' : '';
      u.password = u.password ? '***' : '';
    }
    return u.toString();
  } catch {
    return url.replace(/\/\/[^/@]*@/, '//***@');
  }
}
