/**
 * `no_proxy` as a pure function: which registry hosts bypass the proxy. The list is the one from
 * `[image] image_pull_proxy.no_proxy` (never the environment). Entries, comma-separated:
 *
 * - `*` alone: every host;
 * - `registry.example.com`: exactly that host (no subdomains);
 * - `.example.com` or `*.example.com`: the domain itself and every subdomain;
 * - `192.168.0.1`, `::1`, `[::1]`: that IP literal (IPv4-mapped IPv6 equals its IPv4 form);
 * - `10.0.0.0/8`, `fd00::/8`: a CIDR range, matched against IP-literal hosts only (no DNS);
 * - any of the above with `:port` (`[::1]:5000` for IPv6): only that port.
 *
 * Case-insensitive; a trailing dot is ignored on both sides; whitespace and empty entries are
 * skipped. A name never matches an IP literal or the reverse (`localhost` is not `127.0.0.1`).
 * Entries that are none of these are reported by `parseNoProxy` so the caller can refuse them.
 */
import net from 'node:net';

export type NoProxyRule =
  | { kind: 'all' }
  /** `suffix: true` matches the name and its subdomains. */
  | { kind: 'name'; name: string; suffix: boolean; port?: number }
  | { kind: 'ip'; list: net.BlockList; port?: number };

export interface ParsedNoProxy {
  rules: NoProxyRule[];
  /** Entries that could not be understood, as written (trimmed). */
  invalid: string[];
}

const LABEL = /^[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?$/;

function isHostName(s: string): boolean {
  return s.length > 0 && s.length <= 253 && s.split('.').every((l) => l.length <= 63 && LABEL.test(l));
}

function parsePort(s: string): number | undefined {
  if (!/^\d{1,5}$/.test(s)) return undefined;
  const p = Number(s);
  return p >= 1 && p <= 65535 ? p : undefined;
}

function stripDot(s: string): string {
  return s.endsWith('.') ? s.slice(0, -1) : s;
}

/** An IP literal without brackets, or undefined. */
function ipFamily(s: string): 'ipv4' | 'ipv6' | undefined {
  const v = net.isIP(s);
  return v === 4 ? 'ipv4' : v === 6 ? 'ipv6' : undefined;
}

/** Split `host[:port]` where host may be `[v6]`, a bare v6 literal (no port then), or a name / v4 / CIDR. */
function splitHostPort(entry: string): { host: string; port?: number } | undefined {
  if (entry.startsWith('[')) {
    // `[v6]`, `[v6]:port`, `[v6/bits]`, `[v6]/bits`, `[v6]/bits:port`
    const m = /^\[([^\]]+)\](\/\d+)?(?::(\d+))?$/.exec(entry);
    if (!m) return undefined;
    const host = `${m[1]!}${m[2] ?? ''}`;
    if (m[3] === undefined) return { host };
    const port = parsePort(m[3]);
    return port === undefined ? undefined : { host, port };
  }
  const colons = entry.split(':').length - 1;
  if (colons === 0) return { host: entry };
  if (colons > 1) return { host: entry }; // a bare IPv6 literal or v6 CIDR: no port possible
  const i = entry.lastIndexOf(':');
  const port = parsePort(entry.slice(i + 1));
  return port === undefined ? undefined : { host: entry.slice(0, i), port };
}

function parseEntry(raw: string): NoProxyRule | undefined {
  const entry = stripDot(raw.toLowerCase());
  if (entry === '*') return { kind: 'all' };
  const hp = splitHostPort(entry);
  if (!hp) return undefined;
  const host = stripDot(hp.host);
  const port = hp.port === undefined ? {} : { port: hp.port };
  const slash = host.indexOf('/');
  if (slash >= 0) {
    const addr = host.slice(0, slash);
    const family = ipFamily(addr);
    const bitsText = host.slice(slash + 1);
    if (!family || !/^\d{1,3}$/.test(bitsText)) return undefined;
    const bits = Number(bitsText);
    if (bits > (family === 'ipv4' ? 32 : 128)) return undefined;
    const list = new net.BlockList();
    list.addSubnet(addr, bits, family);
    return { kind: 'ip', list, ...port };
  }
  const family = ipFamily(host);
  if (family) {
    const list = new net.BlockList();
    list.addAddress(host, family);
    return { kind: 'ip', list, ...port };
  }
  let name = host;
  let suffix = false;
  if (name.startsWith('*.')) {
    name = name.slice(2);
    suffix = true;
  } else if (name.startsWith('.')) {
    name = name.slice(1);
    suffix = true;
  }
  if (!isHostName(name)) return undefined;
  return { kind: 'name', name, suffix, ...port };
}

export function parseNoProxy(list: string): ParsedNoProxy {
  const rules: NoProxyRule[] = [];
  const invalid: string[] = [];
  for (const part of list.split(',')) {
    const entry = part.trim();
    if (entry === '') continue;
    const rule = parseEntry(entry);
    if (rule) rules.push(rule);
    else invalid.push(entry);
  }
  return { rules, invalid };
}

/**
 * Does any rule match this host and port? `host` is a URL hostname (IPv6 in brackets or not,
 * any case, trailing dot allowed); `port` the effective port (443 / 80 when the URL has none).
 */
export function noProxyMatches(rules: readonly NoProxyRule[], host: string, port: number): boolean {
  let h = stripDot(host.toLowerCase());
  if (h.startsWith('[') && h.endsWith(']')) h = h.slice(1, -1);
  const family = ipFamily(h);
  return rules.some((r) => {
    if (r.kind === 'all') return true;
    if (r.port !== undefined && r.port !== port) return false;
    if (r.kind === 'ip') return family !== undefined && r.list.check(h, family);
    if (family !== undefined) return false;
    return h === r.name || (r.suffix && h.endsWith(`.${r.name}`));
  });
}

/** The effective port of an http(s) URL. */
export function effectivePort(url: URL): number {
  if (url.port !== '') return Number(url.port);
  return url.protocol === 'https:' ? 443 : 80;
}
