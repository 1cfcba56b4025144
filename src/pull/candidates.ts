/**
 * Try each candidate location in order until one yields the image's manifest. When every candidate
 * fails, the error lists each one with its own failure, so an operator can see which mirror or
 * location said what.
 */
import { ErrorCode, GuestpullError, asGuestpullError } from '../errors.js';

export interface Attempt<C> {
  candidate: C;
  error: GuestpullError;
}

/** Codes that end the search at once: trying another location cannot help or would be wrong. */
const FINAL_CODES: ReadonlySet<ErrorCode> = new Set<ErrorCode>([
  ErrorCode.CANCELLED,
  ErrorCode.DEADLINE_EXCEEDED,
  ErrorCode.DIGEST_MISMATCH,
  ErrorCode.CONFIG,
  ErrorCode.INTERNAL,
]);

export async function firstSuccessful<C, T>(
  candidates: readonly C[],
  describe: (c: C) => string,
  image: string,
  attempt: (c: C) => Promise<T>,
): Promise<{ candidate: C; value: T }> {
  const failures: Attempt<C>[] = [];
  for (const candidate of candidates) {
    try {
      return { candidate, value: await attempt(candidate) };
    } catch (e) {
      const error = asGuestpullError(e);
      if (FINAL_CODES.has(error.code) || candidates.length === 1) throw error;
      failures.push({ candidate, error });
    }
  }
  if (failures.length === 0) {
    throw new GuestpullError(ErrorCode.CONFIG, `no registry location to pull ${image} from`, { image });
  }
  // Every candidate failed: NOT_FOUND only when all said not found; otherwise the first other code.
  const code = failures.every((f) => f.error.code === ErrorCode.NOT_FOUND)
    ? ErrorCode.NOT_FOUND
    : failures.find((f) => f.error.code !== ErrorCode.NOT_FOUND)!.error.code;
  const lines = failures.map((f, i) => `  ${i + 1}. ${describe(f.candidate)}: ${f.error.code}: ${f.error.message}`);
  throw new GuestpullError(code, `every location for ${image} failed:\n${lines.join('\n')}`, {
    image,
    attempts: failures.map((f) => ({ location: describe(f.candidate), code: f.error.code })),
  });
}
