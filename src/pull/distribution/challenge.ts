/**
 * WWW-Authenticate parsing (RFC 7235 §4.1, §2.1): one or more challenges, each an auth-scheme
 * followed by either a token68 or comma-separated auth-params whose values are tokens or quoted
 * strings with backslash escapes. Several challenges may share one header line or come in
 * several header lines. A hand parser, tested in test/unit/distribution.test.ts.
 */

export interface Challenge {
  /** Lower-cased auth scheme, e.g. 'bearer', 'basic'. */
  scheme: string;
  /** Lower-cased parameter names; the first occurrence of a name wins. */
  params: Record<string, string>;
  token68?: string;
}

const TCHAR = /[!#$%&'*+\-.^_`|~0-9A-Za-z]/;
const TOKEN68 = /^[A-Za-z0-9\-._~+/]+=*/;

class Cursor {
  pos = 0;
  constructor(readonly s: string) {}
  get done(): boolean {
    return this.pos >= this.s.length;
  }
  peek(): string {
    return this.s[this.pos] ?? '';
  }
  skipWs(): void {
    while (this.peek() === ' ' || this.peek() === '\t') this.pos++;
  }
  skipWsAndCommas(): void {
    while (this.peek() === ' ' || this.peek() === '\t' || this.peek() === ',') this.pos++;
  }
  token(): string {
    const start = this.pos;
    while (!this.done && TCHAR.test(this.peek())) this.pos++;
    return this.s.slice(start, this.pos);
  }
  /** A quoted-string starting at the current '"'; undefined when unterminated. */
  quoted(): string | undefined {
    this.pos++; // opening quote
    let out = '';
    while (!this.done) {
      const c = this.peek();
      this.pos++;
      if (c === '"') return out;
      if (c === '\\') {
        if (this.done) return undefined;
        out += this.peek();
        this.pos++;
      } else {
        out += c;
      }
    }
    return undefined;
  }
}

/**
 * Try to read `name = value` at the cursor. Returns undefined (cursor restored) when what follows
 * is not an auth-param, which is how the start of the next challenge is recognised.
 */
function authParam(c: Cursor): [string, string] | undefined {
  const start = c.pos;
  c.skipWs();
  const name = c.token();
  c.skipWs();
  if (name === '' || c.peek() !== '=') {
    c.pos = start;
    return undefined;
  }
  c.pos++;
  c.skipWs();
  let value: string | undefined;
  if (c.peek() === '"') value = c.quoted();
  else {
    value = c.token();
    if (value === '') value = undefined;
  }
  if (value === undefined) {
    c.pos = start;
    return undefined;
  }
  return [name.toLowerCase(), value];
}

/** Parse one header value into its challenges. Malformed trailing input ends the parse; what came before is kept. */
export function parseChallenges(header: string): Challenge[] {
  const c = new Cursor(header);
  const out: Challenge[] = [];
  for (;;) {
    c.skipWsAndCommas();
    if (c.done) break;
    const scheme = c.token();
    if (scheme === '') break;
    const ch: Challenge = { scheme: scheme.toLowerCase(), params: {} };
    out.push(ch);
    c.skipWs();
    const paramsStart = c.pos;
    if (!authParam(c)) {
      // Not `name=value`: maybe a token68 (the rest up to the next comma is one opaque token).
      const m = TOKEN68.exec(c.s.slice(c.pos));
      if (m && /^[ \t]*(,|$)/.test(c.s.slice(c.pos + m[0].length))) {
        ch.token68 = m[0];
        c.pos += m[0].length;
      }
      c.skipWs();
      if (!c.done && c.peek() !== ',') break;
      continue;
    }
    c.pos = paramsStart;
    const params = new Map<string, string>();
    for (;;) {
      const p = authParam(c);
      if (!p) break;
      if (!params.has(p[0])) params.set(p[0], p[1]);
      c.skipWs();
      if (c.peek() !== ',') break;
      // A comma: either another param of this challenge or the start of the next challenge.
      const save = c.pos;
      c.skipWsAndCommas();
      if (!authParam(c)) {
        c.pos = save;
        break;
      }
      c.pos = save;
      c.skipWsAndCommas();
    }
    // fromEntries defines own properties: a parameter called __proto__ stays a plain key.
    ch.params = Object.fromEntries(params);
    // Anything unparseable here stops the parse; a new challenge must start with a token.
    c.skipWs();
    if (!c.done && c.peek() !== ',') break;
  }
  return out;
}

/** All challenges of a (possibly repeated) WWW-Authenticate header. */
export function challengesOf(header: string | string[] | undefined): Challenge[] {
  if (header === undefined) return [];
  const lines = Array.isArray(header) ? header : [header];
  return lines.flatMap(parseChallenges);
}
