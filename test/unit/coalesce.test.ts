import { describe, expect, it } from 'vitest';
import { ErrorCode, GuestpullError } from '../../src/errors.js';
import { Coalescer } from '../../src/pull/coalesce.js';

/** Work the test finishes by hand, recording the signal it was started with. */
function manualWork<T>() {
  const starts: AbortSignal[] = [];
  const finishers: { resolve(v: T): void; reject(e: unknown): void }[] = [];
  const start = (signal: AbortSignal): Promise<T> => {
    starts.push(signal);
    return new Promise<T>((resolve, reject) => finishers.push({ resolve, reject }));
  };
  return { start, starts, finishers };
}

/** Work that, like a pull, rejects with the abort reason once its signal fires and its cleanup is released. */
function abortableWork() {
  const starts: AbortSignal[] = [];
  const finish: ((v: string) => void)[] = [];
  let release: () => void = () => undefined;
  const cleanupGate = new Promise<void>((r) => (release = r));
  const start = (signal: AbortSignal): Promise<string> => {
    starts.push(signal);
    return new Promise<string>((resolve, reject) => {
      finish.push(resolve);
      signal.addEventListener('abort', () => void cleanupGate.then(() => reject(signal.reason)));
    });
  };
  return { start, starts, finish, release: () => release() };
}

const tick = (): Promise<void> => new Promise((r) => setImmediate(r));

function cancelled(who: string): GuestpullError {
  return new GuestpullError(ErrorCode.CANCELLED, `${who} cancelled`);
}

describe('Coalescer', () => {
  it('runs a lone caller and forgets the key once done', async () => {
    const c = new Coalescer<string>();
    const w = manualWork<string>();
    const p = c.run('/b/1', 'img:a', undefined, w.start);
    expect(c.size).toBe(1);
    w.finishers[0]!.resolve('sha256:1');
    await expect(p).resolves.toBe('sha256:1');
    await tick();
    expect(c.size).toBe(0);
  });

  it('joins identical callers to one start and gives both the result', async () => {
    const joins: number[] = [];
    const c = new Coalescer<string>({ onJoin: (_k, _i, n) => joins.push(n) });
    const w = manualWork<string>();
    const a = c.run('/b/1', 'img:a', new AbortController().signal, w.start);
    const b = c.run('/b/1', 'img:a', new AbortController().signal, w.start);
    await tick();
    expect(w.starts).toHaveLength(1);
    expect(c.callers('/b/1')).toBe(2);
    expect(joins).toEqual([2]);
    w.finishers[0]!.resolve('sha256:x');
    await expect(Promise.all([a, b])).resolves.toEqual(['sha256:x', 'sha256:x']);
  });

  it('one of two cancels: it fails at once with its own reason, the other gets the result', async () => {
    const c = new Coalescer<string>();
    const w = manualWork<string>();
    const ca = new AbortController();
    const a = c.run('/b/1', 'img:a', ca.signal, w.start);
    const b = c.run('/b/1', 'img:a', new AbortController().signal, w.start);
    await tick();
    const reason = cancelled('caller a');
    ca.abort(reason);
    await expect(a).rejects.toBe(reason);
    expect(w.starts[0]!.aborted).toBe(false);
    expect(c.callers('/b/1')).toBe(1);
    w.finishers[0]!.resolve('sha256:y');
    await expect(b).resolves.toBe('sha256:y');
  });

  it('both cancel: each gets its own reason and the work is aborted, naming the image', async () => {
    const abandoned: string[] = [];
    const c = new Coalescer<string>({ onAbandon: (k, i) => abandoned.push(`${k} ${i}`) });
    const w = abortableWork();
    const ca = new AbortController();
    const cb = new AbortController();
    const a = c.run('/b/1', 'img:a', ca.signal, w.start);
    const b = c.run('/b/1', 'img:a', cb.signal, w.start);
    await tick();
    const ra = cancelled('a');
    const rb = new GuestpullError(ErrorCode.DEADLINE_EXCEEDED, 'deadline of b');
    ca.abort(ra);
    expect(w.starts[0]!.aborted).toBe(false);
    cb.abort(rb);
    await expect(a).rejects.toBe(ra);
    await expect(b).rejects.toBe(rb);
    const signal = w.starts[0]!;
    expect(signal.aborted).toBe(true);
    expect(signal.reason).toBeInstanceOf(GuestpullError);
    expect(signal.reason).toMatchObject({ code: ErrorCode.CANCELLED, message: expect.stringMatching(/img:a.*all callers cancelled/) });
    expect(abandoned).toEqual(['/b/1 img:a']);
    // The bundle stays busy until the aborted work has unwound.
    expect(c.size).toBe(1);
    w.release();
    await c.drain(1000);
    expect(c.size).toBe(0);
  });

  it('a work failure reaches every caller', async () => {
    const c = new Coalescer<string>();
    const w = manualWork<string>();
    const a = c.run('/b/1', 'img:a', undefined, w.start);
    const b = c.run('/b/1', 'img:a', new AbortController().signal, w.start);
    const err = new GuestpullError(ErrorCode.NOT_FOUND, 'no such image');
    w.finishers[0]!.reject(err);
    await expect(a).rejects.toBe(err);
    await expect(b).rejects.toBe(err);
    await tick();
    expect(c.size).toBe(0);
  });

  it('another image for a busy bundle is ALREADY_EXISTS naming both; free again afterwards', async () => {
    const c = new Coalescer<string>();
    const w = manualWork<string>();
    const a = c.run('/b/1', 'img:a', undefined, w.start);
    const other = c.run('/b/1', 'img:b', undefined, w.start);
    await expect(other).rejects.toMatchObject({ code: ErrorCode.ALREADY_EXISTS, message: expect.stringMatching(/\/b\/1.*img:a.*img:b/) });
    expect(w.starts).toHaveLength(1);
    // Other bundles are independent.
    const elsewhere = c.run('/b/2', 'img:b', undefined, w.start);
    expect(w.starts).toHaveLength(2);
    w.finishers[0]!.resolve('a');
    w.finishers[1]!.resolve('b');
    await expect(a).resolves.toBe('a');
    await expect(elsewhere).resolves.toBe('b');
    await tick();
    const again = c.run('/b/1', 'img:b', undefined, w.start);
    w.finishers[2]!.resolve('b again');
    await expect(again).resolves.toBe('b again');
  });

  it('a caller whose signal is already aborted neither starts nor joins', async () => {
    const c = new Coalescer<string>();
    const w = manualWork<string>();
    const ctl = new AbortController();
    const reason = cancelled('early');
    ctl.abort(reason);
    await expect(c.run('/b/1', 'img:a', ctl.signal, w.start)).rejects.toBe(reason);
    expect(w.starts).toHaveLength(0);
    expect(c.size).toBe(0);
  });

  it('a synchronous throw of start is a rejection and frees the key', async () => {
    const c = new Coalescer<string>();
    const err = new GuestpullError(ErrorCode.INTERNAL, 'boom');
    await expect(
      c.run('/b/1', 'img:a', undefined, () => {
        throw err;
      }),
    ).rejects.toBe(err);
    await tick();
    expect(c.size).toBe(0);
  });

  it('the same image while abandoned work unwinds waits for it, then starts afresh; another image is refused', async () => {
    const c = new Coalescer<string>();
    const w = abortableWork();
    const ca = new AbortController();
    const a = c.run('/b/1', 'img:a', ca.signal, w.start);
    ca.abort(cancelled('a'));
    await expect(a).rejects.toMatchObject({ code: ErrorCode.CANCELLED });
    await expect(c.run('/b/1', 'img:b', undefined, w.start)).rejects.toMatchObject({
      code: ErrorCode.ALREADY_EXISTS,
      message: expect.stringContaining('cleaned up after a cancelled pull of img:a'),
    });
    const b = c.run('/b/1', 'img:a', undefined, w.start);
    const waitingCaller = new AbortController();
    const gone = c.run('/b/1', 'img:a', waitingCaller.signal, w.start);
    await tick();
    expect(w.starts).toHaveLength(1); // not started while the old work unwinds
    const r = cancelled('waiting caller');
    waitingCaller.abort(r);
    await expect(gone).rejects.toBe(r);
    w.release();
    await tick();
    await tick();
    expect(w.starts).toHaveLength(2);
    expect(w.starts[1]!.aborted).toBe(false);
    expect(c.callers('/b/1')).toBe(1);
    w.finish[1]!('fresh');
    await expect(b).resolves.toBe('fresh');
  });

  it('drain resolves once running work settles, false on timeout', async () => {
    const c = new Coalescer<string>();
    const w = manualWork<string>();
    const p = c.run('/b/1', 'img:a', undefined, w.start);
    expect(await c.drain(20)).toBe(false);
    w.finishers[0]!.resolve('ok');
    expect(await c.drain(1000)).toBe(true);
    await expect(p).resolves.toBe('ok');
  });
});
