// dm commands are never retried after a timeout: a timed-out umount or `dmsetup remove` may still be
// running in the kernel, and a second command on that device is exactly what ADR-0001 forbids. The
// one exception is a "busy" answer (the command ran and the kernel said no, e.g. a reader closing the
// device): it gets ONE more try after a fixed delay, logged. Everything else fails dumb at once.
import { isDmError } from "../dm/errors.ts";
import { CommandError } from "../exec.ts";
import { withRetry } from "../util/retry.ts";

export const BUSY_RETRY_DELAY_MS = 1_000;

/** The command answered "busy" (and did not time out). */
export function isBusyAnswer(e: unknown): boolean {
  if (!(e instanceof CommandError) || e.result.timedOut || isDmError(e, "timeout")) return false;
  return isDmError(e, "busy") || /target is busy|device is busy|Device or resource busy/i.test(e.result.stderr);
}

/** fn, and once more after `delayMs` if (and only if) its first answer was "busy". */
export async function retryBusyOnce<T>(label: string, fn: () => Promise<T>, delayMs = BUSY_RETRY_DELAY_MS): Promise<T> {
  return withRetry(label, fn, {
    attempts: 2,
    baseDelayMs: delayMs,
    transient: isBusyAnswer,
    note: (e) => `${label}: busy (${(e as Error).message}); one more try in ${delayMs} ms`,
  });
}

/** The command timed out: its outcome is unknown and it may still be running in the kernel. */
export function isTimeout(e: unknown): boolean {
  return (e instanceof CommandError && e.result.timedOut) || isDmError(e, "timeout");
}
