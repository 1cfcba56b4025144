/**
 * Image `Config.User` → uid / gid / additional gids, resolved through the unpacked rootfs's own
 * /etc/passwd and /etc/group (image-spec conversion.md, "Config.User"; lookup rules as runc's
 * GetExecUser where the spec leaves room).
 *
 * The databases are image content: they are resolved inside the rootfs (an absolute symlink such as
 * `/etc/passwd -> /../../host/passwd` lands inside the rootfs), read with a size bound, never
 * through a FIFO or device, and parsed tolerantly (malformed lines are skipped, like libc does).
 *
 * Rules:
 * - absent or empty User → 0:0, no lookup;
 * - a decimal part is an id and is never looked up as a name (`1000` is uid 1000). A numeric uid
 *   found in passwd takes that entry's gid; one not found runs with gid 0. A numeric gid is copied
 *   verbatim;
 * - a name must exist in the database, else BAD_IMAGE (conversion.md: "MUST return an error");
 * - ids are 0..2^32-2 ((uid_t)-1 means "no change" to the kernel); `-1`, `+5`, `0x10` are refused;
 * - additionalGids: only when the user was given by NAME and no group was given. conversion.md says
 *   a converter SHOULD NOT set them for a numeric user or an explicit group; we follow the spec here
 *   (runc would also add them for a numeric uid found in passwd). Deduplicated, primary gid excluded.
 */
import { constants } from 'node:fs';
import { open } from 'node:fs/promises';
import { ErrorCode, GuestpullError, asGuestpullError } from '../../errors.js';
import { resolveInRoot } from '../layers/rootpath.js';

export interface ResolvedUser {
  uid: number;
  gid: number;
  additionalGids: number[];
  /** The passwd name, when the user was found there. */
  username?: string;
}

/** Largest valid id: 2^32 - 2. 2^32 - 1 is (uid_t)-1, which setuid/chown treat as "unchanged". */
export const MAX_ID = 4294967294;
/** Largest /etc/passwd or /etc/group we read. */
export const MAX_DB_BYTES = 4 * 1024 * 1024;

export interface PasswdEntry {
  name: string;
  uid: number;
  gid: number;
}

export interface GroupEntry {
  name: string;
  gid: number;
  members: string[];
}

/** A decimal id in range, or undefined. */
export function parseId(s: string): number | undefined {
  if (!/^[0-9]{1,10}$/.test(s)) return undefined;
  const n = Number(s);
  return n <= MAX_ID ? n : undefined;
}

function dbLines(text: string): string[][] {
  const out: string[][] = [];
  for (const raw of text.split('\n')) {
    const line = raw.endsWith('\r') ? raw.slice(0, -1) : raw;
    if (line.trim() === '' || line.startsWith('#')) continue;
    out.push(line.split(':'));
  }
  return out;
}

/** passwd(5): name:password:uid:gid:gecos:home:shell. Lines without a name or valid ids are skipped. */
export function parsePasswd(text: string): PasswdEntry[] {
  const out: PasswdEntry[] = [];
  for (const f of dbLines(text)) {
    if (f.length < 4) continue;
    const uid = parseId(f[2]!);
    const gid = parseId(f[3]!);
    if (f[0] === '' || uid === undefined || gid === undefined) continue;
    out.push({ name: f[0]!, uid, gid });
  }
  return out;
}

/** group(5): name:password:gid:member,member. Lines without a name or a valid gid are skipped. */
export function parseGroup(text: string): GroupEntry[] {
  const out: GroupEntry[] = [];
  for (const f of dbLines(text)) {
    if (f.length < 3) continue;
    const gid = parseId(f[2]!);
    if (f[0] === '' || gid === undefined) continue;
    const members = (f[3] ?? '').split(',').map((m) => m.trim()).filter((m) => m !== '');
    out.push({ name: f[0]!, gid, members });
  }
  return out;
}

type Part = { kind: 'id'; id: number } | { kind: 'name'; name: string };

/** Classify one side of `user[:group]`; numeric-looking text that is not a valid id is refused. */
function classify(part: string, what: 'user' | 'group', spec: string, image: string): Part {
  if (/^[0-9]+$/.test(part)) {
    const id = parseId(part);
    if (id === undefined) {
      throw new GuestpullError(
        ErrorCode.BAD_IMAGE,
        `image ${image} has User ${JSON.stringify(spec)}: ${what} id ${part} is out of range (0..${MAX_ID})`,
        { image },
      );
    }
    return { kind: 'id', id };
  }
  if (/^[+-][0-9]+$/.test(part) || /^0[xX][0-9a-fA-F]*$/.test(part)) {
    throw new GuestpullError(
      ErrorCode.BAD_IMAGE,
      `image ${image} has User ${JSON.stringify(spec)}: ${what} id ${JSON.stringify(part)} is not a decimal id in 0..${MAX_ID}`,
      { image },
    );
  }
  return { kind: 'name', name: part };
}

/** Read `/etc/<name>` of the rootfs, resolved inside it; undefined when it does not exist. */
async function readDb(rootfs: string, rel: 'etc/passwd' | 'etc/group', image: string): Promise<string | undefined> {
  const where = `/${rel} of image ${image}`;
  let host: string;
  try {
    host = await resolveInRoot(rootfs, rel, { followFinal: true });
  } catch (e) {
    throw asGuestpullError(e);
  }
  let fh;
  try {
    fh = await open(host, constants.O_RDONLY | constants.O_NOFOLLOW | constants.O_NONBLOCK);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'ENOENT' || code === 'ENOTDIR') return undefined;
    const g = asGuestpullError(e);
    throw new GuestpullError(g.code, `cannot open ${where}: ${g.message}`, { image }, { cause: e });
  }
  try {
    const st = await fh.stat();
    if (!st.isFile()) {
      throw new GuestpullError(ErrorCode.BAD_IMAGE, `${where} is not a regular file; fix the image`, { image });
    }
    if (st.size > MAX_DB_BYTES) {
      throw new GuestpullError(ErrorCode.BAD_IMAGE, `${where} is ${st.size} bytes, over the ${MAX_DB_BYTES}-byte limit`, { image });
    }
    // Read at most limit + 1 bytes: the file cannot grow past the bound unnoticed.
    const buf = Buffer.alloc(Math.min(st.size, MAX_DB_BYTES) + 1);
    let len = 0;
    for (;;) {
      const { bytesRead } = await fh.read(buf, len, buf.length - len, len);
      if (bytesRead === 0) break;
      len += bytesRead;
      if (len === buf.length) {
        if (len > MAX_DB_BYTES) {
          throw new GuestpullError(ErrorCode.BAD_IMAGE, `${where} is over the ${MAX_DB_BYTES}-byte limit`, { image });
        }
        break;
      }
    }
    return buf.subarray(0, len).toString('utf8');
  } catch (e) {
    if (e instanceof GuestpullError) throw e;
    const g = asGuestpullError(e);
    throw new GuestpullError(g.code, `cannot read ${where}: ${g.message}`, { image }, { cause: e });
  } finally {
    await fh.close();
  }
}

/** Resolve an image's `Config.User` against the rootfs at `rootfs`. */
export async function resolveUser(rootfs: string, user: string | undefined, image: string): Promise<ResolvedUser> {
  if (user === undefined || user === '') return { uid: 0, gid: 0, additionalGids: [] };
  if (user.includes('\0')) {
    throw new GuestpullError(ErrorCode.BAD_IMAGE, `image ${image} has a User containing a NUL byte`, { image });
  }
  const parts = user.split(':');
  if (parts.length > 2) {
    throw new GuestpullError(
      ErrorCode.BAD_IMAGE,
      `image ${image} has User ${JSON.stringify(user)}: expected user, uid, user:group or uid:gid`,
      { image },
    );
  }
  // `:gid` means uid 0 (like runc's default user); `name:` means no explicit group.
  const u: Part = parts[0] === '' ? { kind: 'id', id: 0 } : classify(parts[0]!, 'user', user, image);
  const g: Part | undefined = parts[1] === undefined || parts[1] === '' ? undefined : classify(parts[1], 'group', user, image);

  const passwd = parsePasswd((await readDb(rootfs, 'etc/passwd', image)) ?? '');
  const out: ResolvedUser = { uid: 0, gid: 0, additionalGids: [] };
  if (u.kind === 'id') {
    out.uid = u.id;
    const entry = passwd.find((p) => p.uid === u.id);
    if (entry) {
      out.gid = entry.gid;
      out.username = entry.name;
    }
  } else {
    const entry = passwd.find((p) => p.name === u.name);
    if (!entry) {
      throw new GuestpullError(
        ErrorCode.BAD_IMAGE,
        `image ${image} runs as user ${JSON.stringify(u.name)}, which is not in the image's /etc/passwd; fix the image's USER or /etc/passwd`,
        { image },
      );
    }
    out.uid = entry.uid;
    out.gid = entry.gid;
    out.username = entry.name;
  }

  if (g?.kind === 'id') {
    out.gid = g.id;
  } else if (g?.kind === 'name' || u.kind === 'name') {
    const groups = parseGroup((await readDb(rootfs, 'etc/group', image)) ?? '');
    if (g?.kind === 'name') {
      const entry = groups.find((e) => e.name === g.name);
      if (!entry) {
        throw new GuestpullError(
          ErrorCode.BAD_IMAGE,
          `image ${image} runs as group ${JSON.stringify(g.name)}, which is not in the image's /etc/group; fix the image's USER or /etc/group`,
          { image },
        );
      }
      out.gid = entry.gid;
    } else if (out.username !== undefined) {
      const name = out.username;
      const gids = new Set<number>();
      for (const e of groups) if (e.gid !== out.gid && e.members.includes(name)) gids.add(e.gid);
      out.additionalGids = [...gids];
    }
  }
  return out;
}
