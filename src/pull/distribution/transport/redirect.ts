/**
 * Redirect policy, as pure functions so it can be tested with URL pairs: which status codes
 * redirect, where a Location points (relative ones resolved against the current URL), which hops
 * are refused (anything but http/https, and https → http), and when credentials must be dropped.
 */
import { ErrorCode, GuestpullError } from '../../../errors.js';
import { redactUrl } from '../../../log.js';

export const REDIRECT_STATUSES: ReadonlySet<number> = new Set([301, 302, 303, 307, 308]);

/** The URL of the next hop, or a PERMISSION_DENIED / UNAVAILABLE error when the hop is refused. */
export function redirectTarget(from: URL, location: string): URL {
  let to: URL;
  try {
    to = new URL(location, from);
  } catch {
    throw new GuestpullError(
      ErrorCode.UNAVAILABLE,
      `${from.origin} answered with a redirect to an invalid location ${JSON.stringify(location.slice(0, 200))}`,
      { endpoint: from.origin },
    );
  }
  if (to.protocol !== 'http:' && to.protocol !== 'https:') {
    throw new GuestpullError(
      ErrorCode.PERMISSION_DENIED,
      `refused redirect from ${loggableUrl(from)} to ${loggableUrl(to)}: only http and https are followed`,
      { endpoint: from.origin },
    );
  }
  if (from.protocol === 'https:' && to.protocol === 'http:') {
    throw new GuestpullError(
      ErrorCode.PERMISSION_DENIED,
      `refused redirect from ${loggableUrl(from)} to ${loggableUrl(to)}: a downgrade from https to plain http`,
      { endpoint: from.origin },
    );
  }
  return to;
}

/** Scheme, host and port equal (URL.origin normalises default ports and case). */
export function sameOrigin(a: URL, b: URL): boolean {
  return a.origin === b.origin;
}

/** A URL safe for logs and messages: no userinfo, and no query (pre-signed storage URLs carry secrets there). */
export function loggableUrl(u: URL | string): string {
  try {
    const url = new URL(redactUrl(typeof u === 'string' ? u : u.href));
    const hadQuery = url.search !== '';
    url.search = '';
    url.hash = '';
    return hadQuery ? `${url.href}?…` : url.href;
  } catch {
    return redactUrl(String(u));
  }
}
