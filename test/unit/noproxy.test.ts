/**
 * no_proxy matching (a table of list × URL → bypass or not), the entries refused as not
 * understood, and the route choice built on it: https_proxy for https origins, http_proxy for http
 * origins, direct when no_proxy matches or no proxy is set for the scheme.
 */
import { describe, expect, it } from 'vitest';
import { ErrorCode, GuestpullError } from '../../src/errors.js';
import { effectivePort, noProxyMatches, parseNoProxy } from '../../src/pull/distribution/transport/noproxy.js';
import { proxyLabel, ProxyRouter } from '../../src/pull/distribution/transport/proxy.js';

function bypass(list: string, url: string): boolean {
  const { rules, invalid } = parseNoProxy(list);
  expect(invalid).toEqual([]);
  const u = new URL(url);
  return noProxyMatches(rules, u.hostname, effectivePort(u));
}

// [no_proxy, URL, bypasses the proxy?]
const TABLE: Array<[string, string, boolean]> = [
  // nothing configured
  ['', 'https://registry.example.com/v2/', false],
  [' , ,', 'https://registry.example.com/v2/', false],
  // * alone
  ['*', 'https://registry.example.com/v2/', true],
  ['*', 'http://10.1.2.3:5000/v2/', true],
  ['*', 'https://[::1]/v2/', true],
  ['foo.example, *', 'https://anything.test/', true],
  // exact host
  ['registry.example.com', 'https://registry.example.com/v2/', true],
  ['registry.example.com', 'https://registry.example.com:5000/v2/', true],
  ['registry.example.com', 'https://sub.registry.example.com/v2/', false],
  ['registry.example.com', 'https://example.com/v2/', false],
  ['registry.example.com', 'https://xregistry.example.com/v2/', false],
  ['example.com', 'https://registry.example.com/', false],
  ['localhost', 'http://localhost:5000/', true],
  ['localhost', 'http://127.0.0.1:5000/', false],
  // case-insensitive, both sides
  ['Registry.EXAMPLE.com', 'https://registry.example.com/', true],
  ['registry.example.com', 'https://REGISTRY.Example.COM/', true],
  // trailing dot, both sides
  ['registry.example.com.', 'https://registry.example.com/', true],
  ['registry.example.com', 'https://registry.example.com./', true],
  ['.example.com.', 'https://a.example.com./', true],
  // whitespace and empty entries
  ['  a.test ,, registry.example.com  ,', 'https://registry.example.com/', true],
  ['\tregistry.example.com\n', 'https://registry.example.com/', true],
  // .domain and *.domain: subdomains and the apex
  ['.example.com', 'https://example.com/', true],
  ['.example.com', 'https://registry.example.com/', true],
  ['.example.com', 'https://a.b.example.com/', true],
  ['.example.com', 'https://notexample.com/', false],
  ['.example.com', 'https://example.com.evil.test/', false],
  ['*.example.com', 'https://example.com/', true],
  ['*.example.com', 'https://registry.example.com/', true],
  ['*.example.com', 'https://registry-example.com/', false],
  ['*.Example.COM', 'https://deep.sub.example.com/', true],
  // IPv4 literals
  ['192.168.0.1', 'http://192.168.0.1:5000/', true],
  ['192.168.0.1', 'http://192.168.0.10:5000/', false],
  ['192.168.0.1,localhost', 'https://192.168.0.1/', true],
  ['10.0.0.1', 'https://[::ffff:10.0.0.1]/', true],
  // IPv6 literals, bracketed or not
  ['::1', 'https://[::1]/', true],
  ['[::1]', 'https://[::1]:5000/', true],
  ['[::1]', 'https://[::2]/', false],
  ['2001:db8::1', 'https://[2001:0db8:0000:0000:0000:0000:0000:0001]/', true],
  ['2001:DB8::1', 'https://[2001:db8::1]/', true],
  ['::ffff:10.0.0.1', 'https://10.0.0.1/', true],
  // CIDR ranges, v4 and v6, matched against IP literals only
  ['10.0.0.0/8', 'https://10.200.3.4/', true],
  ['10.0.0.0/8', 'https://11.0.0.1/', false],
  ['192.168.0.0/16', 'http://192.168.44.5:5000/', true],
  ['192.168.1.0/24', 'http://192.168.2.1/', false],
  ['0.0.0.0/0', 'https://8.8.8.8/', true],
  ['10.0.0.0/8', 'https://ten.example/', false],
  ['10.1.2.3/32', 'https://10.1.2.3/', true],
  ['10.1.2.3/32', 'https://10.1.2.4/', false],
  ['fd00::/8', 'https://[fd12:3456::1]/', true],
  ['fd00::/8', 'https://[fe80::1]/', false],
  ['[fd00::]/8', 'https://[fdff::1]/', true],
  ['[2001:db8::/32]', 'https://[2001:db8:ffff::1]/', true],
  ['10.0.0.0/8', 'https://[::ffff:10.9.9.9]/', true],
  // host:port entries match only that port (default ports count)
  ['registry.example.com:5000', 'https://registry.example.com:5000/', true],
  ['registry.example.com:5000', 'https://registry.example.com/', false],
  ['registry.example.com:443', 'https://registry.example.com/', true],
  ['registry.example.com:80', 'http://registry.example.com/', true],
  ['registry.example.com:80', 'https://registry.example.com/', false],
  ['10.0.0.1:5000', 'http://10.0.0.1:5000/', true],
  ['10.0.0.1:5000', 'http://10.0.0.1:5001/', false],
  ['[::1]:5000', 'http://[::1]:5000/', true],
  ['[::1]:5000', 'http://[::1]:5001/', false],
  ['.example.com:8443', 'https://r.example.com:8443/', true],
  ['.example.com:8443', 'https://r.example.com/', false],
  ['10.0.0.0/8:5000', 'http://10.3.3.3:5000/', true],
  ['10.0.0.0/8:5000', 'http://10.3.3.3:5001/', false],
  // the seed's example
  ['192.168.0.1,localhost', 'https://registry.example.com/', false],
];

describe('no_proxy matching', () => {
  it.each(TABLE)('no_proxy=%j, %s → bypass %s', (list, url, expected) => {
    expect(bypass(list, url)).toBe(expected);
  });

  it('reports entries it cannot understand, keeping the others', () => {
    const { rules, invalid } = parseNoProxy('good.example, 10.0.0.0/33, fd00::/129, bad host, a:b, x:99999, [::1, *foo, http://x.example, ok.test:80');
    expect(invalid).toEqual(['10.0.0.0/33', 'fd00::/129', 'bad host', 'a:b', 'x:99999', '[::1', '*foo', 'http://x.example']);
    expect(rules).toHaveLength(2);
    expect(noProxyMatches(rules, 'good.example', 443)).toBe(true);
    expect(noProxyMatches(rules, 'ok.test', 80)).toBe(true);
    expect(noProxyMatches(rules, 'ok.test', 443)).toBe(false);
  });
});

describe('route choice', () => {
  const settings = { httpsProxy: 'http://user:p%40ss@10.0.0.1:3128', httpProxy: 'http://10.0.0.2:3128', noProxy: '.internal.example, 192.168.0.0/16' };

  it('sends https origins to https_proxy and http origins to http_proxy', () => {
    const r = new ProxyRouter(settings);
    const a = r.routeFor(new URL('https://registry.example.com/v2/'));
    expect(a.kind === 'proxy' && a.proxy.href).toBe('http://user:p%40ss@10.0.0.1:3128/');
    const b = r.routeFor(new URL('http://registry.example.com:5000/v2/'));
    expect(b.kind === 'proxy' && b.proxy.href).toBe('http://10.0.0.2:3128/');
    expect(r.enabled).toBe(true);
  });

  it('goes direct when no_proxy matches, or no proxy is set for the scheme', () => {
    const r = new ProxyRouter(settings);
    expect(r.routeFor(new URL('https://r.internal.example/v2/')).kind).toBe('direct');
    expect(r.routeFor(new URL('http://192.168.3.4:5000/v2/')).kind).toBe('direct');
    const onlyHttps = new ProxyRouter({ httpsProxy: 'https://proxy.example:3129' });
    expect(onlyHttps.routeFor(new URL('http://registry.example.com/')).kind).toBe('direct');
    expect(onlyHttps.routeFor(new URL('https://registry.example.com/')).kind).toBe('proxy');
    const none = new ProxyRouter({ noProxy: '*' });
    expect(none.enabled).toBe(false);
    expect(none.routeFor(new URL('https://registry.example.com/')).kind).toBe('direct');
    expect(new ProxyRouter().routeFor(new URL('https://registry.example.com/')).kind).toBe('direct');
  });

  it('names a proxy without its credentials', () => {
    expect(proxyLabel(new URL('http://user:secret@10.0.0.1:3128'))).toBe('http://10.0.0.1:3128');
    expect(proxyLabel(new URL('https://proxy.example'))).toBe('https://proxy.example');
  });

  it('refuses unusable proxy settings as configuration errors naming the key', () => {
    const cases: Array<[ConstructorParameters<typeof ProxyRouter>[0], RegExp]> = [
      [{ httpsProxy: 'socks5://10.0.0.1:1080' }, /image_pull_proxy\.https_proxy: socks5:\/\/10\.0\.0\.1:1080 is not an http/],
      [{ httpProxy: 'not a url' }, /image_pull_proxy\.http_proxy: not a URL/],
      [{ httpsProxy: 'http://u:secret@10.0.0.1:3128/path' }, /https_proxy: http:\/\/10\.0\.0\.1:3128 must be scheme/],
      [{ noProxy: 'ok.example, 10.0.0.0/40' }, /no_proxy: "10\.0\.0\.0\/40" not understood/],
    ];
    for (const [s, re] of cases) {
      let err: unknown;
      try {
        new ProxyRouter(s);
      } catch (e) {
        err = e;
      }
      expect(err).toBeInstanceOf(GuestpullError);
      expect((err as GuestpullError).code).toBe(ErrorCode.CONFIG);
      expect((err as GuestpullError).message).toMatch(re);
      expect((err as GuestpullError).message).not.toContain('secret');
    }
  });
});
