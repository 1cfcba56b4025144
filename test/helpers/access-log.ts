/**
 * Test helper: the access-log lines of the distribution registry (`registry.logs()`), parsed.
 * distribution writes one combined-log-format line per request, e.g.
 * `127.0.0.1 - - [date] "GET /v2/app/manifests/v1 HTTP/1.1" 200 527 "" "guestpull/0.1.0"`,
 * whatever its log level: the tests read from them where the traffic went and who sent it.
 */

export interface AccessLogEntry {
  method: string;
  path: string;
  status: number;
  userAgent: string;
}

const LINE = /"([A-Z]+) (\S+) HTTP\/[\d.]+" (\d{3}) \S+ "[^"]*" "([^"]*)"/;

export function accessLog(logs: string): AccessLogEntry[] {
  const out: AccessLogEntry[] = [];
  for (const line of logs.split('\n')) {
    const m = LINE.exec(line);
    if (m) out.push({ method: m[1]!, path: m[2]!, status: Number(m[3]), userAgent: m[4]! });
  }
  return out;
}

/** Requests whose path starts with `/v2/<repository>/`. */
export function requestsFor(logs: string, repository: string): AccessLogEntry[] {
  return accessLog(logs).filter((e) => e.path.startsWith(`/v2/${repository}/`));
}

/**
 * The registry's logs once every request answered so far has been logged: distribution writes a
 * request's access-log line after answering it, so a test reading the logs right after its pull
 * could miss the last lines. A marker request is sent and the logs are read once it shows up.
 */
export async function settledLogs(registry: { url: string; logs(): string }, timeoutMs = 5000): Promise<string> {
  const marker = `/v2/log-marker-${Date.now().toString(36)}${Math.random().toString(36).slice(2)}/tags/list`;
  const res = await fetch(`${registry.url}${marker}`);
  await res.arrayBuffer();
  const deadline = Date.now() + timeoutMs;
  while (!registry.logs().includes(`"GET ${marker} HTTP/`)) {
    if (Date.now() > deadline) throw new Error(`the registry at ${registry.url} did not log ${marker} within ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 20));
  }
  return registry.logs();
}
