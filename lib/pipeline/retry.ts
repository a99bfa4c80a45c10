// Retry transient failures with exponential backoff; anything else is thrown at once.
import { isDmError } from "../dm/errors.ts";
import { CommandError } from "../exec.ts";
import { log } from "../log.ts";

/** Transient: a device briefly busy (udev-less settle, a reader closing), a command timeout. */
export function isTransient(e: unknown): boolean {
  if (isDmError(e, "busy") || isDmError(e, "timeout")) return true;
  if (e instanceof CommandError) {
    if (e.result.timedOut) return true;
    if (/target is busy|device is busy|Device or resource busy/i.test(e.result.stderr)) return true;
  }
  return false;
}

export async function withRetry<T>(
  label: string,
  fn: () => Promise<T>,
  o: { attempts: number; baseDelayMs: number; transient?: (e: unknown) => boolean },
): Promise<T> {
  const transient = o.transient ?? isTransient;
  for (let i = 1; ; i++) {
    try {
      return await fn();
    } catch (e) {
      if (i >= o.attempts || !transient(e)) throw e;
      const delay = o.baseDelayMs * 2 ** (i - 1);
      log.warn(`${label}: transient failure (attempt ${i}/${o.attempts}), retrying in ${delay} ms: ${(e as Error).message}`);
      await Bun.sleep(delay);
    }
  }
}
