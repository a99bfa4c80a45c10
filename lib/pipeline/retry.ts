// Which dm command failures are worth another try (lib/util/retry.ts does the backing off).
import { isDmError } from "../dm/errors.ts";
import { CommandError } from "../exec.ts";
import { withRetry as retry } from "../util/retry.ts";

/** Transient: a device briefly busy (udev-less settle, a reader closing), a command timeout. */
export function isTransient(e: unknown): boolean {
  if (isDmError(e, "busy") || isDmError(e, "timeout")) return true;
  if (e instanceof CommandError) {
    if (e.result.timedOut) return true;
    if (/target is busy|device is busy|Device or resource busy/i.test(e.result.stderr)) return true;
  }
  return false;
}

/** withRetry for dm commands: transient = isTransient unless told otherwise. */
export function withRetry<T>(label: string, fn: () => Promise<T>, o: { attempts: number; baseDelayMs: number; transient?: (e: unknown) => boolean }): Promise<T> {
  return retry(label, fn, { ...o, transient: o.transient ?? isTransient });
}
