// Retry transient failures with exponential backoff; anything else is thrown at once.
import { log } from "../log.ts";

export interface RetryOptions {
  attempts: number;
  baseDelayMs: number;
  transient: (e: unknown) => boolean;
  /** The warning logged before a retry; default names the attempt and the delay. */
  note?: (e: unknown, attempt: number, delayMs: number) => string;
}

export async function withRetry<T>(label: string, fn: () => Promise<T>, o: RetryOptions): Promise<T> {
  for (let i = 1; ; i++) {
    try {
      return await fn();
    } catch (e) {
      if (i >= o.attempts || !o.transient(e)) throw e;
      const delay = o.baseDelayMs * 2 ** (i - 1);
      log.warn(o.note?.(e, i, delay) ?? `${label}: transient failure (attempt ${i}/${o.attempts}), retrying in ${delay} ms: ${(e as Error).message}`);
      await Bun.sleep(delay);
    }
  }
}
